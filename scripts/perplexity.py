"""Perplexity of a model on a text file, through the engine's own path (prompt logprobs, as the server computes
them for `echo` + `logprobs`).

    python scripts/perplexity.py tests/data/perplexity_text.txt [--model NAME] [--context 512]

The text is tokenized once and cut into windows of `--context` tokens (default: the model's context length
less one, the room the engine needs to sample one token); each window is scored from its own start, so its
first token is not predicted. Perplexity = exp(mean negative log-likelihood over every predicted token).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from jaxserve import LLM


def perplexity(llm: LLM, token_ids: list[int], context: int) -> dict:
    """Scores `token_ids` in windows of `context` tokens through `llm.score`; returns the counts and perplexity."""
    windows = [token_ids[s:s + context] for s in range(0, len(token_ids), context)]
    windows = [w for w in windows if len(w) >= 2]
    scored = llm.score(windows, use_tqdm=False)
    nll = -sum(s.sum_logprob for s in scored)
    count = sum(s.num_scored for s in scored)
    return {"tokens": len(token_ids), "windows": len(windows), "context": context, "predicted_tokens": count,
            "mean_nll": nll / count, "perplexity": math.exp(nll / count)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file")
    parser.add_argument("--model", default=None, help="model name or path (default: the engine's default)")
    parser.add_argument("--context", type=int, default=None, help="tokens per window (default: max_model_len - 1)")
    parser.add_argument("--max-model-len", type=int, default=None)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    args = parser.parse_args()

    options = dict(max_num_batched_tokens=args.max_num_batched_tokens)
    if args.max_model_len:
        options["max_model_len"] = args.max_model_len
    llm = LLM(args.model, **options) if args.model else LLM(**options)
    ids = llm.tokenizer.encode(Path(args.file).read_text(), add_special_tokens=False)
    context = args.context or llm.engine.max_model_len - 1
    if not 2 <= context < llm.engine.max_model_len:
        raise SystemExit(f"--context must be in [2, {llm.engine.max_model_len - 1}]")
    print(json.dumps({"file": args.file, **perplexity(llm, ids, context)}))

if __name__ == "__main__":
    main()
