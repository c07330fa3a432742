"""Time breakdown of one serving step (a `jax.profiler` trace, ops attributed to the model's named scopes).

    python scripts/profile_step.py                                   # decode at 1 and 16 rows, a mixed step
    python scripts/profile_step.py --rows 16 --prompt-len 480 --engine-kwarg activation_quantization=int8

Prints a table per case and writes JSON (--out). Every engine option is a flag (generated from EngineConfig).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # NOTE: this checkout, not an installed jaxserve

from jaxserve.bench import report  # noqa: E402
from jaxserve.bench.step_profile import profile_step, synthetic_step  # noqa: E402
from jaxserve.config import EngineConfig  # noqa: E402
from jaxserve.server.__main__ import add_engine_flags  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default="1:1,16:1,16:480", help="ROWS:PROMPT_LEN,... (prompt 1: a decode step)")
    p.add_argument("--out", default="bench_results/profile_step.json")
    add_engine_flags(p)
    p.set_defaults(max_num_seqs=16, max_num_batched_tokens=512)
    args = p.parse_args(argv)
    from jaxserve.model_registry import resolve_engine_model
    from jaxserve.worker.model_runner import ModelRunner

    config = EngineConfig(**{k: v for k, v in vars(args).items() if k in EngineConfig.__dataclass_fields__})
    runner = ModelRunner(config, resolve_engine_model(config))
    results = []
    for case in args.cases.split(","):
        rows, prompt_len = (int(x) for x in case.split(":"))
        # Decoding rows' context: 200, or what the bucket and the KV pool allow (each row its own pages).
        pages_per_row = (runner.num_pages - 1) // rows
        context = min(200, runner.max_model_len - 2, pages_per_row * runner.page_size - 2)
        if max(prompt_len, context) + 1 > pages_per_row * runner.page_size:
            p.error(f"case {case}: {rows} rows of {max(prompt_len, context) + 1} tokens do not fit "
                    f"{runner.num_pages} KV pages of {runner.page_size}")
        out = profile_step(runner, *synthetic_step(rows, prompt_len, runner.page_size, context))
        results.append({"rows": rows, "prompt_len": prompt_len, **out})
        print(f"\n{rows} rows, row 0 {'a ' + str(prompt_len) + '-token prompt' if prompt_len > 1 else 'decoding'}: "
              f"{out['wall_ms']:.1f} ms a step (CPU ms summed over threads)")
        for label, ms in out["scopes_ms"].items():
            print(f"  {ms:9.2f}  {label}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": report.machine(), "config": vars(args), "cases": results},
                                         indent=1, default=str))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
