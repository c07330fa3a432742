"""Offline throughput of the engine: continuous against static batching on one mixed workload.

    python scripts/bench_throughput.py                      # 64 requests, prompts 20-400, outputs 16-256
    python scripts/bench_throughput.py --num-requests 16 --quick

The same engine runs the same requests twice: (a) continuous batching (all requests queued at once, the
scheduler admits one whenever a seat and pages are free), (b) static batching (max_num_seqs requests
admitted together; the next batch only when every one of them has finished). Prompts are random token ids
and every request generates exactly its output length (ignore_eos), so both runs do the same work.

It also measures single-stream decode TPOT against the memory-bandwidth floor (weight bytes / measured
bandwidth, probes from `jaxserve.bench.roofline`), batch-max_num_seqs decode throughput against the matmul
roofline (measured FLOP/s / FLOPs per token), the host's share of step time (all but waiting for the
device), and KV waste (allocated but unfilled token slots over allocated slots, sampled every step).
Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # NOTE: this checkout, not an installed jaxserve

from jaxserve import LLMEngine, SamplingParams  # noqa: E402
from jaxserve.bench import roofline  # noqa: E402
from jaxserve.config import ACTIVATION_QUANTIZATIONS, ATTENTION_BACKENDS, EngineConfig  # noqa: E402


def make_workload(num_requests: int, seed: int, vocab_size: int, prompt_range, output_range):
    rng = np.random.default_rng(seed)
    prompts = [[int(t) for t in rng.integers(100, vocab_size - 100, rng.integers(*prompt_range, endpoint=True))]
               for _ in range(num_requests)]
    outputs = [int(n) for n in rng.integers(*output_range, size=num_requests, endpoint=True)]
    return prompts, outputs


def drain(engine: LLMEngine, streams, bar, waste: list[float]) -> None:
    """Steps the engine until every stream has finished, sampling KV waste after each step."""
    pending = set(range(len(streams)))
    while pending:
        engine.step()
        kv = engine.kv_cache
        allocated = kv.pool.num_used_pages * kv.page_size
        if allocated:
            waste.append(kv.kv_waste_tokens() / allocated)
        for i in list(pending):
            stream = streams[i]
            for delta in stream.ready():
                bar.update(len(delta.new_token_ids))
                if delta.finished:
                    pending.discard(i)


_runs = itertools.count()


def run(engine: LLMEngine, prompts, outputs, *, static_batch: int | None, desc: str) -> dict:
    # NOTE: every run's prompts start with their own token: same lengths and work, but no page of an earlier run's
    # prompts is in the prefix cache (it would make every run after the first skip most of its prefill).
    salt = 10 + next(_runs)
    prompts = [[salt] + p[1:] for p in prompts]
    steps0, step_s0, host_s0 = engine.stats.steps, engine.stats.step_seconds, engine.stats.host_seconds
    waste: list[float] = []
    t0 = time.perf_counter()
    order = list(range(len(prompts)))
    batches = [order] if static_batch is None else [order[i:i + static_batch]
                                                    for i in range(0, len(order), static_batch)]
    with tqdm(total=sum(outputs), desc=desc, unit="tok") as bar:
        for batch in batches:
            streams = [engine.add_request(prompts[i], SamplingParams(max_tokens=outputs[i], temperature=0.0,
                                                                     ignore_eos=True)) for i in batch]
            drain(engine, streams, bar, waste)
    seconds = time.perf_counter() - t0
    steps = engine.stats.steps - steps0
    return dict(seconds=seconds, output_tokens=sum(outputs), prompt_tokens=sum(map(len, prompts)),
                output_tokens_per_s=sum(outputs) / seconds, requests_per_s=len(prompts) / seconds, steps=steps,
                host_fraction=(engine.stats.host_seconds - host_s0) / max(engine.stats.step_seconds - step_s0, 1e-9),
                kv_waste_mean=float(np.mean(waste)) if waste else 0.0)


def decode_tpot(engine: LLMEngine, batch: int, num_tokens: int, vocab_size: int) -> float:
    """Seconds per decode step with `batch` streams of short prompts (prefill excluded)."""
    prompts, _ = make_workload(batch, 1, vocab_size, (16, 16), (1, 1))
    streams = [engine.add_request(p, SamplingParams(max_tokens=num_tokens, temperature=0.0, ignore_eos=True))
               for p in prompts]
    first = last = None
    done = 0
    while done < batch:
        engine.step()
        for stream in streams:
            for delta in stream.ready():
                now = delta.time
                if delta.num_output_tokens == 1:
                    first = now if first is None else max(first, now)
                last = now
                done += delta.finished
    return (last - first) / (num_tokens - 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=EngineConfig.model)
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, nargs=2, default=[20, 400], metavar=("MIN", "MAX"))
    parser.add_argument("--output-len", type=int, nargs=2, default=[16, 256], metavar=("MIN", "MAX"))
    parser.add_argument("--max-num-seqs", type=int, default=16,
                        help="seats (the server's default); the static batch size too, so keep it below the "
                             "request count or both modes admit everything at once")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of both modes, the first mode alternating by round (medians reported)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--activation-quantization", default=EngineConfig.activation_quantization,
                        choices=ACTIVATION_QUANTIZATIONS, help="as the server's flag (int8: llama.cpp's q8 numerics)")
    parser.add_argument("--attention-backend", default=EngineConfig.attention_backend, choices=ATTENTION_BACKENDS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="skip the static-batching run and the TPOT probes")
    parser.add_argument("--out", default="bench_results/throughput.json")
    args = parser.parse_args()

    engine = LLMEngine(EngineConfig(model=args.model, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                                    max_num_batched_tokens=args.max_num_batched_tokens,
                                    activation_quantization=args.activation_quantization,
                                    attention_backend=args.attention_backend))
    cfg, runner = engine.runner.model_config, engine.runner
    prompts, outputs = make_workload(args.num_requests, args.seed, cfg.vocab_size, args.prompt_len, args.output_len)
    report = dict(machine=dict(platform=platform.platform(), processor=platform.processor(),
                               backend=jax.default_backend(), devices=[str(d) for d in jax.devices()],
                               jax=jax.__version__),
                  settings=vars(args), warmup_seconds=engine.warmup_seconds,
                  compiled_shapes=len(runner.buckets.shapes()))
    # NOTE: one short untimed pass first: the first run in a process pays one-off costs (first touch of the
    # KV pages, the executables' first runs) that would otherwise fall on whichever mode goes first.
    run(engine, prompts[:4], [min(o, 8) for o in outputs[:4]], static_batch=None, desc="warm")
    modes = {"continuous": None} if args.quick else {"continuous": None, "static": args.max_num_seqs}
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for round_index in range(1 if args.quick else args.rounds):
        order = list(modes) if round_index % 2 == 0 else list(modes)[::-1]
        for mode in order:
            runs[mode].append(run(engine, prompts, outputs, static_batch=modes[mode], desc=f"{mode} {round_index}"))
    for mode, results in runs.items():  # the last round's fields, with the median throughput over rounds
        report[mode] = dict(results[-1], output_tokens_per_s=float(np.median([r["output_tokens_per_s"]
                                                                              for r in results])),
                            rounds_output_tokens_per_s=[r["output_tokens_per_s"] for r in results])
    if not args.quick:
        report["continuous_over_static"] = (report["continuous"]["output_tokens_per_s"]
                                            / report["static"]["output_tokens_per_s"])
        weight_bytes = roofline.weight_bytes(runner.weights)
        machine = roofline.Machine.measure(runner.dtype, matmul_shapes=(
            (args.max_num_seqs, cfg.hidden_size, cfg.intermediate_size),))
        bandwidth, flops = machine.bandwidth, machine.flops
        tpot_1 = decode_tpot(engine, 1, 64, cfg.vocab_size)
        tpot_b = decode_tpot(engine, args.max_num_seqs, 32, cfg.vocab_size)
        flops_per_token = 2 * roofline.matmul_params(cfg)
        report["roofline"] = dict(
            weight_bytes=weight_bytes, bandwidth_bytes_per_s=bandwidth, matmul_flops_per_s=flops,
            tpot_batch1_s=tpot_1, tpot_floor_s=weight_bytes / bandwidth,
            floor_over_tpot_batch1=weight_bytes / bandwidth / tpot_1,
            decode_tokens_per_s_at_max_batch=args.max_num_seqs / tpot_b,
            matmul_roofline_tokens_per_s=flops / flops_per_token,
            fraction_of_matmul_roofline=args.max_num_seqs / tpot_b / (flops / flops_per_token))
    assert engine.runner.num_compiled() == report["compiled_shapes"], "a shape compiled after warm-up"
    print(format_table(report))
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {args.out}")


def format_table(r: dict) -> str:
    s = r["settings"]
    lines = [f"machine: {r['machine']['platform']} ({r['machine']['backend']}, jax {r['machine']['jax']})",
             f"model {s['model']}, {s['num_requests']} requests, prompts {s['prompt_len']}, outputs "
             f"{s['output_len']}, max_num_seqs {s['max_num_seqs']}, max_num_batched_tokens "
             f"{s['max_num_batched_tokens']}, dtype {s['dtype']}; warm-up {r['warmup_seconds']:.1f}s for "
             f"{r['compiled_shapes']} shapes",
             f"{'mode':<12}{'seconds':>9}{'out tok/s':>11}{'req/s':>8}{'steps':>7}{'host %':>8}{'KV waste %':>12}"]
    for mode in ("continuous", "static"):
        if mode in r:
            m = r[mode]
            lines.append(f"{mode:<12}{m['seconds']:>9.1f}{m['output_tokens_per_s']:>11.1f}{m['requests_per_s']:>8.2f}"
                         f"{m['steps']:>7}{100 * m['host_fraction']:>8.1f}{100 * m['kv_waste_mean']:>12.1f}")
    if "continuous_over_static" in r:
        lines.append(f"continuous / static throughput: {r['continuous_over_static']:.2f}x")
    if "roofline" in r:
        f = r["roofline"]
        lines += [f"single-stream TPOT {1e3 * f['tpot_batch1_s']:.1f} ms; "
                  f"bandwidth floor {1e3 * f['tpot_floor_s']:.1f} ms "
                  f"({f['weight_bytes'] / 2**20:.0f} MiB weights at {f['bandwidth_bytes_per_s'] / 1e9:.1f} GB/s): "
                  f"{100 * f['floor_over_tpot_batch1']:.0f}% of the floor",
                  f"batch-{s['max_num_seqs']} decode {f['decode_tokens_per_s_at_max_batch']:.0f} tok/s; "
                  "matmul roofline "
                  f"{f['matmul_roofline_tokens_per_s']:.0f} tok/s ({f['matmul_flops_per_s'] / 1e9:.0f} GFLOP/s): "
                  f"{100 * f['fraction_of_matmul_roofline']:.0f}%"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
