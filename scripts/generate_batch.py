"""Offline batch generation: an OpenAI Batch API input JSONL in, its output JSONL out, with the engine in-process.

    python scripts/generate_batch.py requests.jsonl results.jsonl
    python scripts/generate_batch.py requests.jsonl results.jsonl --max-num-seqs 64 --dtype bfloat16

Each input line: {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
"body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64, "temperature": 0}}.
Every request is queued at once and the engine batches them; results are appended as they finish, so a
second run resumes (custom_ids already in the output are skipped). A bad line becomes an error record
and the rest go on. Engine options are the server's flags (--max-num-seqs, --dtype, --max-model-len, ...).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

# NOTE: import the checkout this script lives in, even where another one is installed in the environment.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxserve.config import EngineConfig  # noqa: E402
from jaxserve.server.__main__ import add_engine_flags  # noqa: E402
from jaxserve.server.batch import run_batch  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="batch input JSONL")
    p.add_argument("output", help="batch output JSONL (appended to; existing custom_ids are skipped)")
    p.add_argument("--served-model-name", default=None, help="the `model` in the responses (default: --model)")
    p.add_argument("--summary-json", default=None, help="also write the run's summary here")
    p.add_argument("--no-progress", action="store_true")
    add_engine_flags(p)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from jaxserve.engine import LLMEngine  # JAX: only once the arguments are known to be good

    try:
        cfg = EngineConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    engine = LLMEngine(cfg, warmup=True)
    model = args.served_model_name or Path(cfg.model).name.removesuffix(".gguf")
    summary = run_batch(engine, args.input, args.output, model=model, progress=not args.no_progress)
    print(json.dumps(summary))
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
