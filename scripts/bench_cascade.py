"""Small alone, large alone and the cascade on a labelled prompt set: accuracy, the share kept small, speed, cost.

    python scripts/make_small_model.py          # once: the small model (SmolLM2, int4 projections)
    python scripts/bench_cascade.py             # large: SmolLM2-135M-Instruct

1. Tune split: the small and the large model each answer every prompt (greedy); the small model's confidence
   signal (mean sampled-token logprob, as the server's cascade computes it) is kept per prompt.
2. The threshold: the one keeping the most prompts on the small model while the cascade's tune accuracy
   stays within --max-drop of the large model's (greedy decoding makes the cascade's answer exactly the
   small or the large model's own, so the tune split is scored without running the cascade).
3. Test split: small alone, large alone, and the real cascade (`CascadeEngine`) at that threshold, each timed.
   tokens/s counts prompt + output tokens of the answers delivered, over wall time (the fastest of
   --repeats runs); $ per 1M tokens is --price-per-hour over that throughput (jaxserve.server.cost, every
   token alike).

The last line is one JSON object: accuracy_small, accuracy_large, accuracy_cascade, share_small (test split,
at the chosen threshold), with the threshold and the throughputs.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from jaxserve.bench.cascade_data import DATA, is_correct, load_items
from jaxserve.cascade import CascadeEngine, CascadePolicy
from jaxserve.config import EngineConfig
from jaxserve.core.sampling_params import SamplingParams
from jaxserve.engine import LLMEngine
from jaxserve.server.cost import Accelerator, unit_costs
from jaxserve.text.chat_template import render_chat


def run(engine, prompts: list[list[int]], params: SamplingParams) -> dict:
    """Every prompt through `engine` (driven step by step): texts, signals, who answered, tokens, seconds."""
    start = time.perf_counter()
    streams = [engine.add_request(ids, params) for ids in prompts]
    texts, logprobs, done = [""] * len(streams), [[] for _ in streams], 0
    index = {s.request_id: i for i, s in enumerate(streams)}
    out_tokens = [0] * len(streams)
    while done < len(streams):
        engine.step()
        for s in streams:
            for d in s.ready():
                i = index[d.request_id]
                texts[i] += d.new_text
                logprobs[i] += [e.logprob for e in d.logprobs or ()]
                out_tokens[i] = max(out_tokens[i], d.num_output_tokens)
                done += d.finished
    seconds = time.perf_counter() - start
    tokens = sum(map(len, prompts)) + sum(out_tokens)
    return {"texts": texts, "signals": [CascadePolicy().score(lp) for lp in logprobs], "seconds": seconds,
            "tokens": tokens, "answered_by": [getattr(s, "answered_by", None) for s in streams]}


def pick_threshold(signals: list[float], small_ok: list[bool], large_ok: list[bool], max_drop: float,
                   ) -> tuple[float, list[tuple[float, float, float]]]:
    """The threshold with the largest small share whose accuracy is within max_drop of the large model's,
    and the sweep (threshold, accuracy, share) it was chosen from."""
    n = len(signals)
    target = sum(large_ok) / n - max_drop
    sweep = []
    for t in sorted({-math.inf, math.inf, *signals}):
        keep = [s >= t for s in signals]
        acc = sum(so if k else lo for k, so, lo in zip(keep, small_ok, large_ok)) / n
        sweep.append((t, acc, sum(keep) / n))
    ok = [row for row in sweep if row[1] >= target - 1e-9]
    best = max(ok, key=lambda row: (row[2], row[1]))
    return best[0], sweep


def cost_per_million(price_per_hour: float, tokens_per_s: float) -> float:
    return unit_costs(Accelerator(price_per_hour, 1.0, 0.0, tokens_per_s))["cost_per_million_output_tokens"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--large", default="SmolLM2-135M-Instruct")
    ap.add_argument("--small", default=None, help="default: scripts/make_small_model.py's output (made if missing)")
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--max-drop", type=float, default=0.02, help="accuracy the cascade may lose on the tune split")
    ap.add_argument("--price-per-hour", type=float, default=1.0, help="$ per accelerator hour, for $ per 1M tokens")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--limit", type=int, default=0, help="use only the first N items of each split (0: all)")
    ap.add_argument("--repeats", type=int, default=2,
                    help="time each test-split run this many times and keep the fastest (a shared machine)")
    ap.add_argument("--dump", default=None, help="write every test item's three answers here (JSON lines)")
    args = ap.parse_args()

    small_path = args.small
    if small_path is None:
        import sys

        sys.path.insert(0, str(Path(__file__).parent))
        from make_small_model import default_out, make_small_model

        small_path = default_out()
        if not (Path(small_path) / "params").exists():
            make_small_model("SmolLM2-135M-Instruct", "0-29", small_path)
    opts = dict(max_num_seqs=args.max_num_seqs, max_num_batched_tokens=512, max_model_len=256,
                kv_cache_memory=64 * 2**20)
    t0 = time.perf_counter()
    large = LLMEngine(EngineConfig(model=args.large, **opts), warmup=True)
    small = LLMEngine(EngineConfig(model=str(small_path), **opts), warmup=True)
    print(f"loaded and warmed up both models in {time.perf_counter() - t0:.0f} s")
    tok = large.tokenizer

    items = load_items(args.data)
    splits = {name: [it for it in items if it["split"] == name] for name in ("tune", "test")}
    if args.limit:
        splits = {k: v[:args.limit] for k, v in splits.items()}
    prompts = {k: [tok.encode(render_chat(tok.chat_template, [{"role": "user", "content": it["prompt"]}],
                                          add_generation_prompt=True, bos_token=tok.bos_token,
                                          eos_token=tok.eos_token), add_special_tokens=False) for it in v]
               for k, v in splits.items()}
    greedy = SamplingParams(temperature=0.0, max_tokens=args.max_tokens)
    with_lp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=0)

    # 1-2. Tune split: both models alone, then the threshold.
    tune_small = run(small, prompts["tune"], with_lp)
    tune_large = run(large, prompts["tune"], greedy)
    s_ok = [is_correct(it, t) for it, t in zip(splits["tune"], tune_small["texts"])]
    l_ok = [is_correct(it, t) for it, t in zip(splits["tune"], tune_large["texts"])]
    threshold, sweep = pick_threshold(tune_small["signals"], s_ok, l_ok, args.max_drop)
    print(f"\ntune split ({len(s_ok)} prompts): small {sum(s_ok) / len(s_ok):.3f}, large {sum(l_ok) / len(l_ok):.3f}")
    print(f"{'threshold':>10} {'accuracy':>9} {'share_small':>12}")
    for t, acc, share in sweep[:: max(1, len(sweep) // 12)] + [sweep[-1]]:
        print(f"{t:>10.3f} {acc:>9.3f} {share:>12.3f}")
    print(f"chosen threshold {threshold:.3f}: the largest small share within {args.max_drop} of the large "
          f"model's tune accuracy")

    # 3. Test split: each alone, then the real cascade.
    test = splits["test"]
    rows = {}
    cascade = CascadeEngine(small, large, CascadePolicy(threshold=threshold))

    def fastest(engine, params) -> dict:
        runs = [run(engine, prompts["test"], params) for _ in range(max(1, args.repeats))]
        if any(r["texts"] != runs[0]["texts"] for r in runs):
            print("NOTE: repeated greedy runs differ (batch composition changes float sums)")
        return min(runs, key=lambda r: r["seconds"])

    for name, engine, params in (("small", small, with_lp), ("large", large, greedy)):
        r = fastest(engine, params)
        rows[name] = dict(r, ok=[is_correct(it, t) for it, t in zip(test, r["texts"])], share_small=float(
            name == "small"))
    r = fastest(cascade, greedy)
    rows["cascade"] = dict(r, ok=[is_correct(it, t) for it, t in zip(test, r["texts"])],
                           share_small=sum(a == "small" for a in r["answered_by"]) / len(test))
    simulated = [so if s >= threshold else lo for s, so, lo in zip(rows["small"]["signals"], rows["small"]["ok"],
                                                                      rows["large"]["ok"])]
    n = len(test)
    print(f"\ntest split ({n} prompts), threshold {threshold:.3f}, ${args.price_per_hour:g}/h")
    print(f"{'':<9}{'accuracy':>9}{'share_small':>12}{'tokens/s':>10}{'$/1M tok':>10}{'seconds':>9}")
    for name, row in rows.items():
        tps = row["tokens"] / row["seconds"]
        row["tokens_per_s"] = tps
        print(f"{name:<9}{sum(row['ok']) / n:>9.3f}{row['share_small']:>12.3f}{tps:>10.1f}"
              f"{cost_per_million(args.price_per_hour, tps):>10.4f}{row['seconds']:>9.1f}")
    by_kind: dict[str, list] = {}
    for it, a, b, c in zip(test, rows["small"]["ok"], rows["large"]["ok"], rows["cascade"]["ok"]):
        by_kind.setdefault(it["kind"], []).append((a, b, c))
    for kind, oks in sorted(by_kind.items()):
        print(f"  {kind:<8} n={len(oks):<4} small {sum(o[0] for o in oks) / len(oks):.3f}  large "
              f"{sum(o[1] for o in oks) / len(oks):.3f}  cascade {sum(o[2] for o in oks) / len(oks):.3f}")
    print(f"cascade accuracy predicted from the two alone runs: {sum(simulated) / n:.3f}")
    if args.dump:
        with open(args.dump, "w") as f:
            for i, it in enumerate(test):
                f.write(json.dumps({**it, "signal": rows["small"]["signals"][i], **{
                    f"{k}_text": rows[k]["texts"][i] for k in rows}, **{f"{k}_ok": rows[k]["ok"][i] for k in rows},
                    "answered_by": rows["cascade"]["answered_by"][i]}) + "\n")
    print(json.dumps({"accuracy_small": sum(rows["small"]["ok"]) / n, "accuracy_large": sum(rows["large"]["ok"]) / n,
                      "accuracy_cascade": sum(rows["cascade"]["ok"]) / n, "share_small": rows["cascade"]["share_small"],
                      "threshold": threshold, "num_test": n,
                      **{f"tokens_per_s_{k}": round(v["tokens_per_s"], 1) for k, v in rows.items()},
                      **{f"cost_per_million_tokens_{k}": round(cost_per_million(args.price_per_hour,
                                                                                v["tokens_per_s"]), 4)
                         for k, v in rows.items()}}))


if __name__ == "__main__":
    main()
