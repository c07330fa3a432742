"""Host time per engine step over a stand-in model that costs the device nothing (jaxserve/bench/engine_overhead.py).

    python scripts/bench_engine_overhead.py                      # 16 and 64 decoding rows, in-process
    python scripts/bench_engine_overhead.py --server             # the same through the HTTP server (loopback SSE)
    python scripts/bench_engine_overhead.py --server --no-guardrails   # without the output guardrails' scans
    python scripts/bench_engine_overhead.py --device-ms 3        # a stand-in device taking 3 ms a step
    python scripts/bench_engine_overhead.py --rows 4 --steps 20 --out bench_results/overhead.json

The last line printed is one JSON object: {"host_ms_per_step": {"16": ..., "64": ...}, "steps_per_s": {...}}.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

# NOTE: import the checkout this script lives in, even where another one is installed in the environment.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="16,64", help="comma list of concurrent decoding requests")
    p.add_argument("--steps", type=int, default=200, help="steps measured per case (--server: tokens per request)")
    p.add_argument("--server", action="store_true", help="through the HTTP server, one loopback client a row")
    p.add_argument("--no-guardrails", action="store_true", help="--server: output guardrails off (on by default)")
    p.add_argument("--device-ms", type=float, default=0.0, help="stand-in device time per step")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--out", default=None, help="write the full result as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from jaxserve.bench import engine_overhead

    rows = [int(r) for r in args.rows.split(",") if r.strip()]
    result = engine_overhead.run(rows, server=args.server, steps=args.steps, device_ms=args.device_ms,
                                 max_num_seqs=args.max_num_seqs, guardrails=not args.no_guardrails)
    print(engine_overhead.format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(engine_overhead.summary_line(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
