"""Speculative decoding benchmark: TPOT with and without speculation, single stream and batch 8.

    python scripts/bench_speculative.py --quick                      # smoke run (a few minutes on CPU)
    python scripts/bench_speculative.py --draft /tmp/smollm2-draft   # + the distilled draft (distill_draft.py)

For each method (none, ngram, draft when --draft is given) and each prompt set, (a) repetitive /
extraction prompts (copy, extract, edit: the output repeats the context) and (b) open chat, it measures
greedy generation through `LLMEngine` at batch 1 (one request at a time) and batch 8 (8 requests at
once): TPOT = (last token time - first token time) / (tokens - 1) per request, averaged; end-to-end
latency; acceptance rate and mean accepted length. Each workload first runs once untimed so that every
step shape it needs is compiled, then `--repeats` times per method, interleaved (medians reported). Greedy
outputs are checked against method `none` ("same" column).
Prints a table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # NOTE: this checkout, not an installed jaxserve

from jaxserve import SamplingParams  # noqa: E402
from jaxserve.config import ACTIVATION_QUANTIZATIONS, EngineConfig  # noqa: E402
from jaxserve.engine import LLMEngine  # noqa: E402

PASSAGE = ("The Apollo 11 mission launched on July 16, 1969, from Kennedy Space Center. Neil Armstrong and Buzz "
           "Aldrin landed the lunar module Eagle on July 20, while Michael Collins orbited the Moon in the command "
           "module Columbia. Armstrong stepped onto the surface and said: one small step for man, one giant leap "
           "for mankind. The crew returned to Earth on July 24, 1969, splashing down in the Pacific Ocean.")
CODE = ("def total_price(items, tax_rate):\n    total = 0\n    for item in items:\n        total += item.price * "
        "item.quantity\n    total = total * (1 + tax_rate)\n    return round(total, 2)\n")
REPETITIVE = [
    f"Copy the following text exactly, word for word:\n\n{PASSAGE}",
    f"Rename the variable `total` to `subtotal` in this code and output the whole function:\n\n{CODE}",
    f"Repeat every sentence of this passage that mentions a date:\n\n{PASSAGE}",
    f"Add a docstring to this function and output the complete code:\n\n{CODE}",
]
CHAT = [
    "Tell me a short story about a dragon who learns to paint.",
    "What are three tips for staying productive while working from home?",
    "Explain why the sky is blue to a ten-year-old.",
    "Write a haiku about autumn leaves, then explain its imagery.",
]


def run_workload(engine: LLMEngine, prompts: list[str], batch: int, max_tokens: int) -> dict:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    tpots, latencies, outputs = [], [], []
    for start in range(0, len(prompts), batch):
        group = prompts[start:start + batch]
        streams = [engine.add_request(p, params) for p in group]
        first, last, tokens = [None] * len(group), [None] * len(group), [[] for _ in group]
        done = [False] * len(group)
        t0 = time.monotonic()
        while not all(done):
            engine.step()
            for i, s in enumerate(streams):
                for delta in s.ready():
                    if delta.new_token_ids:
                        first[i] = first[i] or delta.time
                        last[i] = delta.time
                        tokens[i].extend(delta.new_token_ids)
                    done[i] = done[i] or delta.finished
        for i in range(len(group)):
            n = len(tokens[i])
            if n > 1:
                tpots.append((last[i] - first[i]) / (n - 1))
            latencies.append(last[i] - t0)
            outputs.append(tokens[i])
    return {"tpot_ms": 1e3 * float(np.mean(tpots)), "latency_s": float(np.mean(latencies)), "outputs": outputs,
            "tokens": sum(len(o) for o in outputs)}


def chat_prompts(engine: LLMEngine, texts: list[str]) -> list[str]:
    from jaxserve.text.chat_template import render_chat

    tok = engine.tokenizer
    return [render_chat(tok.chat_template, [{"role": "user", "content": t}], add_generation_prompt=True,
                        bos_token=tok.bos_token, eos_token=tok.eos_token) for t in texts]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="SmolLM2-135M-Instruct")
    ap.add_argument("--draft", default=None, help="a draft checkpoint (e.g. from distill_draft.py)")
    ap.add_argument("--num-speculative-tokens", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--quick", action="store_true", help="2 prompts a set, 32 tokens, batch 1 and 4")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per workload and method (median)")
    ap.add_argument("--speculative-min-accepted", type=float, default=EngineConfig.speculative_min_accepted,
                    help="the back-off threshold (0: never back off)")
    ap.add_argument("--speculative-disable-by-batch-size", type=int,
                    default=EngineConfig.speculative_disable_by_batch_size,
                    help="no proposals while more requests than this run (0: never)")
    ap.add_argument("--activation-quantization", default=EngineConfig.activation_quantization,
                    choices=ACTIVATION_QUANTIZATIONS, help="as the server's flag (int8: llama.cpp's q8 numerics)")
    ap.add_argument("--out", default="bench_speculative.json")
    args = ap.parse_args(argv)
    max_tokens = 32 if args.quick else args.max_tokens
    repeats = 1 if args.quick else args.repeats
    sets = {"repetitive": REPETITIVE[:2] if args.quick else REPETITIVE, "chat": CHAT[:2] if args.quick else CHAT}
    batches = [1, 4] if args.quick else [1, 8]
    methods = {"none": {}, "ngram": {"speculative_method": "ngram"}}
    if args.draft:
        methods["draft"] = {"speculative_model": args.draft}
    base = dict(model=args.model, max_num_seqs=8, max_num_batched_tokens=256, max_model_len=args.max_model_len,
                kv_cache_memory=128 * 2**20, num_speculative_tokens=args.num_speculative_tokens,
                speculative_min_accepted=args.speculative_min_accepted,
                speculative_disable_by_batch_size=args.speculative_disable_by_batch_size,
                activation_quantization=args.activation_quantization)

    # NOTE: all engines are built first and each workload runs on them in turn, `--repeats` times, taking the
    # median: on a shared machine the load drifts, and interleaving keeps it from favouring one method.
    engines = {m: LLMEngine(EngineConfig(**base, **extra), warmup=False) for m, extra in methods.items()}
    rows = []
    for set_name, texts in sets.items():
        prompts = chat_prompts(engines["none"], texts)
        for batch in batches:
            # The batch-8 workload repeats the set's prompts up to 8 requests at once.
            work = (prompts * batch)[:max(batch, len(prompts))] if batch > 1 else prompts
            for engine in engines.values():
                run_workload(engine, work, batch, max_tokens)  # compile every shape this workload needs
            before = {m: dict(vars(e.spec.stats)) for m, e in engines.items() if e.spec is not None}
            results = {m: [] for m in engines}
            for _ in range(repeats):
                for method, engine in engines.items():
                    results[method].append(run_workload(engine, work, batch, max_tokens))
            base_tpot = float(np.median([r["tpot_ms"] for r in results["none"]]))
            for method, engine in engines.items():
                rs = results[method]
                tpot = float(np.median([r["tpot_ms"] for r in rs]))
                row = {"method": method, "set": set_name, "batch": batch, "tpot_ms": tpot,
                       "latency_s": float(np.median([r["latency_s"] for r in rs])), "tokens": rs[0]["tokens"],
                       "speedup": base_tpot / tpot}
                if engine.spec is not None:
                    s, b = vars(engine.spec.stats), before[method]
                    delta = {k: s[k] - b[k] for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens",
                                                      "num_emitted_tokens")}
                    row["acceptance_rate"] = delta["num_accepted_tokens"] / max(1, delta["num_draft_tokens"])
                    row["mean_accepted_length"] = delta["num_emitted_tokens"] / max(1, delta["num_drafts"])
                    row["same_as_none"] = all(r["outputs"] == results["none"][0]["outputs"] for r in rs)
                rows.append(row)
                print(json.dumps(row), flush=True)

    print()
    header = (f"{'method':<7}{'set':<12}{'batch':>6}{'TPOT ms':>10}{'speedup':>9}{'e2e s':>8}{'accept':>8}"
              f"{'len':>6}  same")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['method']:<7}{r['set']:<12}{r['batch']:>6}{r['tpot_ms']:>10.1f}{r.get('speedup', 1.0):>9.2f}"
              f"{r['latency_s']:>8.2f}{r.get('acceptance_rate', float('nan')):>8.2f}"
              f"{r.get('mean_accepted_length', float('nan')):>6.2f}  {r.get('same_as_none', '')}")
    with open(args.out, "w") as f:
        json.dump({"config": {**base, "max_tokens": max_tokens, "quick": args.quick, "draft": args.draft,
                              "repeats": repeats},
                   "rows": rows}, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
