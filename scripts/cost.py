"""Serving arithmetic: $ per 1M input / output tokens, per month for a traffic profile, vs API prices.

    python scripts/cost.py --bench-json bench_results/bench_serving.json --price-per-hour 3.50 \
        --utilization 0.6 --requests-per-day 200000 --api-price gpt-4o-mini=0.15,0.60 --api-price my-api=0.5,1.5
    python scripts/cost.py --output-tokens-per-s 2400 --input-tokens-per-s 1900 --price-per-hour 1.2

The throughput is the best run of a bench_serving.py JSON (highest output tok/s, or --run LABEL), or
stated with --output-tokens-per-s / --input-tokens-per-s. The traffic profile's tokens per request
default to the benchmark's means. See jaxserve/server/cost.py for the model (input weight, utilization).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# NOTE: import the checkout this script lives in, even where another one is installed in the environment.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxserve.server import cost  # noqa: E402


def bench_run(path: str, label: str | None) -> dict:
    runs = json.loads(Path(path).read_text())["runs"]
    if label is not None:
        picked = [r for r in runs if r["label"] == label]
        if not picked:
            raise SystemExit(f"no run {label!r} in {path}; have {[r['label'] for r in runs]}")
        return picked[0]["result"]
    return max((r["result"] for r in runs), key=lambda r: r["output_throughput"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("throughput (one of)")
    src.add_argument("--bench-json", help="a bench_serving.py result")
    src.add_argument("--run", default=None, help="the run label in --bench-json (default: highest output tok/s)")
    src.add_argument("--output-tokens-per-s", type=float, default=None)
    src.add_argument("--input-tokens-per-s", type=float, default=0.0)
    p.add_argument("--price-per-hour", type=float, required=True, help="$ per accelerator hour")
    p.add_argument("--utilization", "--utilisation", type=float, default=1.0,
                   help="average busy fraction you provision for (0, 1]")
    p.add_argument("--requests-per-day", type=float, default=100_000)
    p.add_argument("--input-tokens", type=float, default=None, help="per request (default: the bench mean, else 500)")
    p.add_argument("--output-tokens", type=float, default=None, help="per request (default: the bench mean, else 200)")
    p.add_argument("--api-price", action="append", default=[], type=cost.ApiPrice.parse, metavar="NAME=IN,OUT",
                   help="repeatable: an API's $ per 1M input and output tokens")
    p.add_argument("--input-weight", type=float, default=None,
                   help="an input token's cost in output tokens (default: the first API's price ratio, else 1)")
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args(argv)

    in_tok, out_tok = 500.0, 200.0
    if args.bench_json:
        r = bench_run(args.bench_json, args.run)
        rate_in, rate_out = r["input_throughput"], r["output_throughput"]
        if r["completed"]:
            in_tok, out_tok = r["total_input_tokens"] / r["completed"], r["total_output_tokens"] / r["completed"]
    elif args.output_tokens_per_s is not None:
        rate_in, rate_out = args.input_tokens_per_s, args.output_tokens_per_s
    else:
        p.error("give --bench-json or --output-tokens-per-s")
    try:
        acc = cost.Accelerator(args.price_per_hour, args.utilization, rate_in, rate_out)
        traffic = cost.Traffic(args.requests_per_day, args.input_tokens if args.input_tokens is not None else in_tok,
                               args.output_tokens if args.output_tokens is not None else out_tok)
        report = cost.analyse(acc, traffic, args.api_price, args.input_weight)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(cost.format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
