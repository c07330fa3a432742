"""Perplexity of a model on a text file, through the engine's own path (prompt logprobs, as the server computes
them for `echo` + `logprobs`).

    python scripts/perplexity.py tests/data/perplexity_text.txt [--model NAME] [--context 512]

The text is tokenized once and cut into windows of `--context` tokens (default: the model's context length
less one, the room the engine needs to sample one token); each window is scored from its own start, so its
first token is not predicted. Perplexity = exp(mean negative log-likelihood over every predicted token).
`--score-from N` counts only positions N and later of each window, as llama.cpp's `llama-perplexity` does
with N = context / 2 (every counted token then has at least N tokens before it):

    python scripts/perplexity.py tests/data/perplexity_text.txt --context 512 --score-from 256
    python scripts/perplexity.py tests/data/perplexity_text.txt --activation-quantization int8   # int8 activations
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from jaxserve import LLM


def perplexity(llm: LLM, token_ids: list[int], context: int, score_from: int = 1) -> dict:
    """Scores `token_ids` in windows of `context` tokens through `llm.score`, counting positions `score_from`
    and later of each window; returns the counts and perplexity."""
    windows = [token_ids[s:s + context] for s in range(0, len(token_ids), context)]
    windows = [w for w in windows if len(w) > score_from]
    scored = llm.score(windows, use_tqdm=False)
    counted = [lp for s in scored for lp in s.token_logprobs[score_from - s.start:]]
    nll = -sum(counted)
    mean = nll / len(counted)
    return {"tokens": len(token_ids), "windows": len(windows), "context": context, "score_from": score_from,
            "predicted_tokens": len(counted), "mean_nll": mean, "perplexity": math.exp(mean)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--model", default=None, help="model name or path (default: the engine's default)")
    parser.add_argument("--context", type=int, default=None, help="tokens per window (default: max_model_len - 1)")
    parser.add_argument("--score-from", type=int, default=1,
                        help="count positions N and later of each window (llama-perplexity: context / 2)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--quantized-matmul", default="auto", help="auto, native, xla or pallas (as the server's)")
    parser.add_argument("--activation-quantization", default="none", help="none or int8 (as the server's)")
    args = parser.parse_args()

    options = dict(max_num_batched_tokens=args.max_num_batched_tokens, quantized_matmul=args.quantized_matmul,
                   activation_quantization=args.activation_quantization)
    if args.max_model_len:
        options["max_model_len"] = args.max_model_len
    llm = LLM(args.model, **options) if args.model else LLM(**options)
    ids = llm.tokenizer.encode(Path(args.file).read_text(), add_special_tokens=False)
    context = args.context or llm.engine.max_model_len - 1
    if not 2 <= context < llm.engine.max_model_len:
        raise SystemExit(f"--context must be in [2, {llm.engine.max_model_len - 1}]")
    if not 1 <= args.score_from < context:
        raise SystemExit(f"--score-from must be in [1, {context - 1}]")
    print(json.dumps({"file": args.file, **perplexity(llm, ids, context, args.score_from)}))

if __name__ == "__main__":
    main()
