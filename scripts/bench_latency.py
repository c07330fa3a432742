"""TTFT and TPOT of the engine in-process, against the roofline measured on this machine.

    python scripts/bench_latency.py                                   # batches 1,4,16 x prompt 128 x output 64
    python scripts/bench_latency.py --batch-sizes 1,8,32 --prompt-lens 128,1024 --output-len 128 --dtype bfloat16
    python scripts/bench_latency.py --quick                           # a smoke run (small shapes)
    python scripts/bench_latency.py --quantization none,int8,int4 --batch-sizes 1,32   # side by side, one run
    python scripts/bench_latency.py --engine-kwarg kv_cache_dtype=int8  # any EngineConfig field, passed through

Every engine option is a flag (generated from EngineConfig, like the server's); --engine-kwarg KEY=VALUE
passes anything else (VALUE parsed as JSON when it parses). --max-num-seqs defaults to the largest batch.
The floors (jaxserve/bench/roofline.py): weight + KV bytes over the measured copy bandwidth, FLOPs over the
measured matmul rate; "% floor" is floor / measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import logging
import sys
from pathlib import Path

# NOTE: import the checkout this script lives in, even where another one is installed in the environment.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxserve.config import EngineConfig  # noqa: E402
from jaxserve.server.__main__ import add_engine_flags  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def _kwarg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", type=_ints, default=[1, 4, 16])
    p.add_argument("--prompt-lens", type=_ints, default=[128])
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--repeats", type=int, default=1, help="runs per case (the median is reported)")
    p.add_argument("--quick", action="store_true", help="smoke run: batches 1,4, prompt 32, output 8")
    p.add_argument("--engine-kwarg", type=_kwarg, action="append", default=[], metavar="KEY=VALUE",
                   help="repeatable: an engine option without its own flag")
    p.add_argument("--result-json", default="bench_results/bench_latency.json")
    add_engine_flags(p)
    p.set_defaults(max_num_seqs=None)
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.prompt_lens, args.output_len = [1, 4], [32], 8
    logging.basicConfig(level=logging.WARNING)

    from tqdm import tqdm

    from jaxserve.bench import latency, roofline
    from jaxserve.engine import LLMEngine

    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}
    options["max_num_seqs"] = options["max_num_seqs"] or max(args.batch_sizes)
    options.update(dict(args.engine_kwarg))
    # NOTE: --quantization takes a comma list: one engine per scheme, measured in turn on the same machine.
    schemes = [q.strip() for q in str(options["quantization"]).split(",") if q.strip()]
    try:
        cases = [latency.LatencyCase(b, t, args.output_len) for t in args.prompt_lens for b in args.batch_sizes]
        configs = [EngineConfig(**{**options, "quantization": q}) for q in schemes]
    except (TypeError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    machine = None
    reports = {}
    with tqdm(total=len(cases) * len(configs), desc="cases", unit="case") as bar:
        for cfg in configs:
            engine = LLMEngine(cfg, warmup=True)
            if machine is None:
                mc = engine.runner.model_config
                machine = roofline.Machine.measure(engine.runner.dtype, matmul_shapes=(
                    (cfg.max_num_batched_tokens, mc.hidden_size, mc.intermediate_size),))
            report = latency.run(engine, cases, machine, repeats=args.repeats, progress=bar)
            report["engine"] = dataclasses.asdict(cfg)
            reports[cfg.quantization] = report
            del engine
            gc.collect()  # NOTE: free this engine's weights and KV pages before the next one loads
    for name, report in reports.items():
        print(f"\n--quantization {name}\n{latency.format_table(report)}")
    if len(reports) > 1:
        print(f"\n{latency.format_comparison(reports)}")
    result = next(iter(reports.values())) if len(reports) == 1 else {"by_quantization": reports}
    Path(args.result_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result_json).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.result_json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
