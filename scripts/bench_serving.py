"""Serving benchmark against any OpenAI-compatible server (vLLM `bench serve` methodology).

    python -m jaxserve.server --no-guardrail-pii --no-guardrail-content-policy &   # token-by-token streaming
    python scripts/bench_serving.py --base-url http://127.0.0.1:8000 --sweep-concurrency 1,4,16,32
    python scripts/bench_serving.py --request-rate 4 --num-requests 200              # Poisson arrivals
    python scripts/bench_serving.py --smoke --sweep-concurrency 1,4                  # a quick check
    python scripts/bench_serving.py --dataset sharegpt --dataset-path ShareGPT_V3.json --sweep-rate 1,2,4,inf

Prompts: synthetic (seeded random words; prompt lengths uniform in input-len*(1 +- range-ratio), output
lengths likewise with output-range-ratio, fixed by default), ShareGPT-style JSON, or JSONL. Prompt
lengths are counted with the server's /tokenize, else the local tokenizer of --tokenizer-model.
Reports request and token throughput and TTFT / TPOT / ITL / E2E mean, median, p95, p99 (see
jaxserve/bench/stats.py for the definitions); writes JSON and, for a sweep, a latency-vs-throughput PNG.
Only loopback servers unless --allow-remote.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from pathlib import Path

import aiohttp

# NOTE: import the checkout this script lives in, even where another one is installed in the environment.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxserve.bench import client, datasets, report


def _floats(text: str) -> list[float]:
    return [math.inf if v.strip() == "inf" else float(v) for v in text.split(",") if v.strip()]


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server (its /v1 is appended)")
    p.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --base-url")
    p.add_argument("--model", default=None, help="the model id to send (default: the server's first model)")
    p.add_argument("--endpoint", choices=sorted(client.ENDPOINTS), default="completions")
    p.add_argument("--api-key", default=None)
    d = p.add_argument_group("dataset")
    d.add_argument("--dataset", choices=("synthetic", "sharegpt", "jsonl"), default="synthetic")
    d.add_argument("--dataset-path", default=None, help="for sharegpt and jsonl")
    d.add_argument("--num-requests", type=int, default=64, help="requests per run")
    d.add_argument("--input-len", type=int, default=100, help="synthetic: mean prompt tokens")
    d.add_argument("--output-len", type=int, default=None,
                   help="synthetic and jsonl: output tokens (default 128); sharegpt: override the reply lengths")
    d.add_argument("--range-ratio", type=float, default=0.8,
                   help="synthetic: prompt lengths uniform in input-len*(1 +- ratio); 0: fixed")
    d.add_argument("--output-range-ratio", type=float, default=0.0,
                   help="synthetic: output lengths uniform in output-len*(1 +- ratio); 0: fixed")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--tokenizer", choices=("server", "local"), default="server",
                   help="count prompt tokens with the server's /tokenize (falls back to local) or locally")
    d.add_argument("--tokenizer-model", default="SmolLM2-135M-Instruct", help="the local tokenizer's model")
    lo = p.add_argument_group("load")
    lo.add_argument("--request-rate", type=float, default=math.inf,
                    help="Poisson arrivals per second; inf: all at once")
    lo.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of the gaps; 1: Poisson")
    lo.add_argument("--max-concurrency", type=int, default=None, help="cap on requests in flight")
    lo.add_argument("--sweep-rate", type=_floats, default=[], metavar="R1,R2,...", help="one run per rate (inf ok)")
    lo.add_argument("--sweep-concurrency", type=_ints, default=[], metavar="C1,C2,...",
                    help="one run per concurrency (rate inf)")
    lo.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                    help="generate exactly the requested output lengths")
    lo.add_argument("--temperature", type=float, default=0.0)
    lo.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    o = p.add_argument_group("output")
    o.add_argument("--result-json", default="bench_results/bench_serving.json")
    o.add_argument("--plot", default="bench_results/bench_serving.png", help="sweeps: the PNG ('' for none)")
    o.add_argument("--label", default="", help="a note stored in the JSON and the plot title (e.g. 'jaxserve')")
    o.add_argument("--no-progress", action="store_true")
    o.add_argument("--smoke", action="store_true", help="a quick check: 4 requests of 16 output tokens per run")
    return p


def make_dataset(args, base_url: str) -> list[datasets.BenchRequest]:
    count = None
    if args.tokenizer == "server":
        count = datasets.server_counter(base_url, api_key=args.api_key)
        try:
            count("probe")
        except OSError as e:
            print(f"note: {base_url}/tokenize failed ({e}); counting with {args.tokenizer_model}'s tokenizer",
                  file=sys.stderr)
            count = None
    count = count or datasets.local_counter(args.tokenizer_model)
    n, out_len = args.num_requests, args.output_len or 128
    if args.dataset == "synthetic":
        spec = datasets.SyntheticSpec(n, args.input_len, out_len, args.range_ratio, args.seed,
                                      args.output_range_ratio)
        return datasets.synthetic(spec, count)
    if not args.dataset_path:
        raise SystemExit(f"--dataset {args.dataset} needs --dataset-path")
    if args.dataset == "sharegpt":
        return datasets.load_sharegpt(args.dataset_path, count, num_prompts=n, seed=args.seed,
                                      output_len=args.output_len)
    return datasets.load_jsonl(args.dataset_path, count, num_prompts=n, seed=args.seed, output_len=out_len)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.smoke:
        args.num_requests, args.output_len = min(args.num_requests, 4), 16
    try:
        base_url = client.check_target(args.base_url, args.allow_remote)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        card = asyncio.run(client.served_model(base_url, args.api_key))
    except (OSError, aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
        if not args.model:
            print(f"error: {base_url}/v1/models failed ({type(e).__name__}: {e}); is the server up? "
                  "(or pass --model)", file=sys.stderr)
            return 2
        card = {}
    model = args.model or card.get("id")
    requests = make_dataset(args, base_url)
    base = client.LoadConfig(base_url, model, args.endpoint, args.request_rate, args.max_concurrency,
                             args.burstiness, args.ignore_eos, args.temperature, args.api_key, args.timeout,
                             args.seed)
    runs = client.sweep_configs(base, rates=args.sweep_rate, concurrencies=args.sweep_concurrency)
    in_lens, out_lens = datasets.lengths(requests)
    settings = {"base_url": base_url, "model": model, "endpoint": args.endpoint, "dataset": args.dataset,
                "num_requests": len(requests), "prompt_tokens": f"{min(in_lens)}-{max(in_lens)}",
                "output_tokens": f"{min(out_lens)}-{max(out_lens)}", "ignore_eos": args.ignore_eos,
                "seed": args.seed, "label": args.label}
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out = {"started": started, "machine": report.machine(), "server_model": card, "settings": settings,
           "runs": client.run_sweep(requests, runs, progress=not args.no_progress)}
    print(report.run_table(out))
    if len(out["runs"]) > 1:
        print()
        print(report.sweep_table(out))
    Path(args.result_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result_json).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.result_json}")
    if len(out["runs"]) > 1 and args.plot:
        title = f"{args.label or model} @ {base_url}, {settings['prompt_tokens']} in / {settings['output_tokens']} out"
        report.plot_sweep(out["runs"], args.plot, title)
        print(f"wrote {args.plot}")
    return 0 if all(r["result"]["completed"] for r in out["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
