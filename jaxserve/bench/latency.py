"""In-process engine latency: TTFT and TPOT for a batch of equal prompts, against the roofline floors.

For each (batch size B, prompt length T, output length O): B requests of distinct random token ids
(seeded; no prefix-cache hits) with `max_tokens=O`, `ignore_eos`, greedy, are added at once and the caller
drives `engine.step()` until all finish. Per request, on the engine's clock (`RequestDelta.time`):
TTFT = first token - submission, TPOT = (last token - first token) / (O - 1); the row reports their means.
The floors (`roofline`): TTFT ≥ prefill of B x T tokens; TPOT ≥ one decode step of B sequences at the
mean context T + O / 2. "Fraction of the floor" = floor / measured (1.0 = at the roofline).
"""

from __future__ import annotations

import dataclasses
import queue
import time
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from jaxserve.bench import roofline
from jaxserve.core.sampling_params import SamplingParams


@dataclasses.dataclass(frozen=True)
class LatencyCase:
    batch_size: int
    prompt_len: int
    output_len: int

    def __post_init__(self):
        if self.batch_size < 1 or self.prompt_len < 1 or self.output_len < 2:
            raise ValueError(f"need batch_size >= 1, prompt_len >= 1, output_len >= 2; got {self}")


def measure_case(engine: Any, case: LatencyCase, seed: int = 0) -> dict[str, float]:
    """Mean TTFT and TPOT (seconds) of one batch, and the wall time from first submit to last token."""
    rng = np.random.default_rng(seed)
    vocab = engine.runner.vocab_size
    params = SamplingParams(max_tokens=case.output_len, temperature=0.0, ignore_eos=True)
    t0 = time.monotonic()
    streams = [engine.add_request(rng.integers(0, vocab, case.prompt_len).tolist(), params)
               for _ in range(case.batch_size)]
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    open_ = {s.request_id for s in streams}
    while open_:
        engine.step()
        for s in streams:
            while True:
                try:
                    d = s.get(timeout=0)
                except queue.Empty:
                    break
                if d.new_token_ids:
                    first.setdefault(d.request_id, d.time)
                    last[d.request_id] = d.time
                if d.finished:
                    if d.finish_reason not in ("length", "stop"):
                        raise RuntimeError(f"request {d.request_id} ended with {d.finish_reason}: {d.error}")
                    open_.discard(d.request_id)
    ttft = [first[s.request_id] - t0 for s in streams]
    tpot = [(last[s.request_id] - first[s.request_id]) / (case.output_len - 1) for s in streams]
    return {"ttft_s": float(np.mean(ttft)), "tpot_s": float(np.mean(tpot)),
            "wall_s": max(last.values()) - t0}


def run(engine: Any, cases: Sequence[LatencyCase], machine: roofline.Machine, *, repeats: int = 1,
        progress=None) -> dict:
    cfg = engine.runner.model_config
    dtype = engine.runner.dtype
    itemsize = jnp.dtype(dtype).itemsize
    wbytes = roofline.weight_bytes(engine.runner.weights)
    measure_case(engine, LatencyCase(1, 8, 2), seed=12345)  # first-call effects off the clock
    rows = []
    for case in cases:
        runs = [measure_case(engine, case, seed=i) for i in range(repeats)]
        got = {k: float(np.median([r[k] for r in runs])) for k in runs[0]}
        pre = roofline.prefill_floor(cfg, wbytes, itemsize, case.batch_size, case.prompt_len, machine)
        ctx = case.prompt_len + case.output_len // 2
        dec = roofline.decode_floor(cfg, wbytes, itemsize, [ctx] * case.batch_size, machine)
        rows.append({**dataclasses.asdict(case), **got,
                     "ttft_floor_s": pre.seconds, "ttft_bound": pre.bound,
                     "ttft_frac_of_floor": pre.seconds / got["ttft_s"],
                     "tpot_floor_s": dec.seconds, "tpot_bound": dec.bound,
                     "tpot_frac_of_floor": dec.seconds / got["tpot_s"],
                     "decode_tok_s": case.batch_size / got["tpot_s"]})
        if progress is not None:
            progress.update(1)
    return {"device": machine.device, "bandwidth_gbps": machine.bandwidth / 1e9, "matmul_gflops": machine.flops / 1e9,
            "copy_gbps": machine.copy_bandwidth / 1e9, "read_gbps": machine.read_bandwidth / 1e9,
            "dtype": jnp.dtype(dtype).name, "weight_bytes": wbytes,
            "kv_bytes_per_token": roofline.kv_bytes_per_token(cfg, itemsize),
            "matmul_params": roofline.matmul_params(cfg), "rows": rows}


def format_table(report: dict) -> str:
    lines = [f"{report['device']}: measured bandwidth {report['bandwidth_gbps']:.1f} GB/s "
             f"(read {report['read_gbps']:.1f}, copy {report['copy_gbps']:.1f}), matmul "
             f"{report['matmul_gflops']:.1f} GFLOP/s ({report['dtype']}); "
             f"weights {report['weight_bytes'] / 2**20:.1f} MiB, "
             f"KV {report['kv_bytes_per_token'] / 1024:.1f} KiB/token",
             f"{'batch':>5}{'prompt':>7}{'output':>7} | {'TTFT ms':>9}{'floor':>9}{'% floor':>8} {'bound':<8}| "
             f"{'TPOT ms':>8}{'floor':>9}{'% floor':>8} {'bound':<8}| {'decode tok/s':>12}"]
    for r in report["rows"]:
        lines.append(f"{r['batch_size']:>5}{r['prompt_len']:>7}{r['output_len']:>7} | {1e3 * r['ttft_s']:>9.1f}"
                     f"{1e3 * r['ttft_floor_s']:>9.1f}{100 * r['ttft_frac_of_floor']:>7.1f}% {r['ttft_bound']:<8}| "
                     f"{1e3 * r['tpot_s']:>8.2f}{1e3 * r['tpot_floor_s']:>9.2f}{100 * r['tpot_frac_of_floor']:>7.1f}% "
                     f"{r['tpot_bound']:<8}| {r['decode_tok_s']:>12.1f}")
    return "\n".join(lines)


def format_comparison(reports: dict[str, dict]) -> str:
    """One row per (scheme, case): weight bytes, TPOT against its bandwidth floor, and TPOT as a ratio of the
    first scheme's (the baseline) for the same case."""
    base_name, base = next(iter(reports.items()))
    base_tpot = {(r["batch_size"], r["prompt_len"]): r["tpot_s"] for r in base["rows"]}
    lines = [f"{'quantization':<13}{'weights MiB':>12}{'batch':>6}{'prompt':>7} | {'TPOT ms':>8}{'floor':>8}"
             f"{'% floor':>8} {'bound':<8}| {'decode tok/s':>12} | TPOT / {base_name}"]
    for name, report in reports.items():
        for r in report["rows"]:
            ratio = r["tpot_s"] / base_tpot[(r["batch_size"], r["prompt_len"])]
            mib = report['weight_bytes'] / 2**20
            lines.append(f"{name:<13}{mib:>12.1f}{r['batch_size']:>6}{r['prompt_len']:>7} | "
                         f"{1e3 * r['tpot_s']:>8.2f}{1e3 * r['tpot_floor_s']:>8.2f}"
                         f"{100 * r['tpot_frac_of_floor']:>7.1f}% "
                         f"{r['tpot_bound']:<8}| {r['decode_tok_s']:>12.1f} | {ratio:.2f}x")
    return "\n".join(lines)
