"""Output tok/s with and without a JSON-schema constraint, and the host ms per step its masks add
(jaxserve/bench/structured.py).

    python scripts/bench_structured.py                                 # SmolLM2-135M, 1 and 16 streams
    python scripts/bench_structured.py --streams 1,16,64 --max-tokens 128 --out bench_results/structured.json
    python scripts/bench_structured.py --prefetch off                  # masks on the engine thread, on the spot

The last line printed is one JSON object: {"output_tok_s": {"1_free": ..., "1_json": ..., ...},
"json_over_free": {...}, "mask_ms_per_step": {...}, "prefetch_ms_per_step": {...}}.
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
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--streams", default="1,16", help="comma list of concurrent requests")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per request (both modes)")
    p.add_argument("--max-model-len", type=int, default=512)
    p.add_argument("--prefetch", choices=("auto", "on", "off"), default="auto",
                   help="masks computed ahead on a worker thread (on), on the spot (off), or this machine's default")
    p.add_argument("--out", default=None, help="write the full result as JSON here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from jaxserve.bench import structured

    streams = [int(s) for s in args.streams.split(",") if s.strip()]
    prefetch = {"auto": None, "on": True, "off": False}[args.prefetch]
    result = structured.run(args.model, streams, max_tokens=args.max_tokens, max_model_len=args.max_model_len,
                            prefetch=prefetch)
    print(structured.format_table(result))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(structured.summary(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
