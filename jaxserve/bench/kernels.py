"""Kernel benchmark behind `scripts/bench_kernels.py`: Pallas kernels against the XLA path, in bytes per second.

Each case is one attention call on one layer of a paged cache (shuffled page tables), timed as the median
of `iters` jitted calls after a warm-up. Achieved bandwidth counts the bytes a perfect kernel must move:
every KV token a query may attend (K and V, int8 scales included), q and the output. The peak is
measured, not taken from a datasheet: a jitted `x + 1` over a buffer of `copy_mib` MiB reads and writes
it once, so peak = 2 * size / time.

On CPU only the XLA path is timed; with `interpret=True` the Pallas kernels run in interpret mode on
small cases and are checked against the XLA path (correctness only, no timings).

`run_quantized_matmul` times the int8 / int4 dequantize-in-the-matmul kernel against XLA's `qdot` the same
way (bytes: the quantized weight, x and the output).
"""

from __future__ import annotations

import dataclasses
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.model.attention import paged_attention_xla
from jaxserve.model.attention_backends import paged_attention_pallas
from jaxserve.model.step_inputs import SeqChunk, build_step_inputs
from pallas_kernels.decode_attention import paged_decode_attention
from pallas_kernels.kv_cache import QuantizedKV, quantize_kv
from pallas_kernels.ragged_attention import ragged_paged_attention
from pallas_kernels.tpu_ragged_attention import tpu_ragged_paged_attention


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    num_heads: int = 32  # N
    num_kv_heads: int = 8  # K
    head_dim: int = 128  # H
    page_size: int = 16
    kv_dtype: str = "bfloat16"  # bfloat16 | float32 | int8


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    chunks: tuple[tuple[int, int], ...]  # (tokens already cached, new tokens) per sequence
    num_tokens: int  # T bucket


def decode_case(batch: int, context: int) -> Case:
    return Case(f"decode b={batch} ctx={context}", ((context - 1, 1),) * batch, batch)


def mixed_case(prefill: int, decode_rows: int, context: int) -> Case:
    chunks = ((0, prefill),) + ((context - 1, 1),) * decode_rows
    name = f"prefill {prefill}" + (f" + {decode_rows} decode ctx={context}" if decode_rows else "")
    return Case(name, chunks,
                1 << (prefill + decode_rows - 1).bit_length())


def kv_bytes(case: Case, shape: AttentionShape) -> int:
    tokens = sum(start + n for start, n in case.chunks)
    per_token = 2 * shape.num_kv_heads * shape.head_dim * jnp.dtype(shape.kv_dtype).itemsize
    if shape.kv_dtype == "int8":
        per_token += 2 * shape.num_kv_heads * 4
    return tokens * per_token


def build(case: Case, shape: AttentionShape, seed: int = 0):
    """Random q and pages for `case`, page tables a random permutation of the pages."""
    rng = np.random.default_rng(seed)
    P = shape.page_size
    need = [-(-(s + n) // P) for s, n in case.chunks]
    order = rng.permutation(np.arange(1, sum(need) + 1))
    chunks, used = [], 0
    for (start, n), k in zip(case.chunks, need):
        chunks.append(SeqChunk([0] * n, start, [int(p) for p in order[used:used + k]]))
        used += k
    R = len(case.chunks)
    step = build_step_inputs(chunks, num_tokens=case.num_tokens, num_rows=R, page_size=P,
                             max_pages_per_seq=max(need))
    K, H = shape.num_kv_heads, shape.head_dim
    key_q, key_kv = jax.random.split(jax.random.key(seed))
    q_dtype = jnp.float32 if shape.kv_dtype == "float32" else jnp.bfloat16
    q = jax.random.normal(key_q, (case.num_tokens, shape.num_heads, H), q_dtype)
    kv_shape = (1, sum(need) + 1, P, 2 * K, H)
    if shape.kv_dtype == "int8":
        kv = QuantizedKV(*quantize_kv(jax.random.normal(key_kv, kv_shape, jnp.bfloat16)))
    else:
        kv = jax.random.normal(key_kv, kv_shape, shape.kv_dtype)
    return q, kv, jax.tree.map(jnp.asarray, step)


def kernels_for(platform: str) -> dict:
    kernels = {"xla": paged_attention_xla}
    if platform == "gpu":
        kernels.update({"pallas": paged_attention_pallas, "pallas-ragged": ragged_paged_attention,
                        "pallas-splitk": paged_decode_attention})
    elif platform == "tpu":
        kernels["pallas"] = tpu_ragged_paged_attention
    return kernels


def time_call(fn, args, iters: int) -> float:
    out = fn(*args)
    jax.block_until_ready(out)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_copy_bandwidth(mib: int, iters: int = 10) -> float:
    """Bytes per second of a jitted read-and-write of `mib` MiB."""
    x = jnp.ones((mib * (1 << 20) // 4,), jnp.float32)
    seconds = time_call(jax.jit(lambda a: a + 1), (x,), iters)
    return 2 * x.nbytes / seconds


def run(cases: list[Case], shape: AttentionShape, *, iters: int, max_kv_bytes: int, copy_mib: int) -> dict:
    platform = jax.default_backend()
    copy_bw = measure_copy_bandwidth(copy_mib)
    results = []
    for case in cases:
        kvb = kv_bytes(case, shape)
        if kvb > max_kv_bytes:
            results.append(dict(case=case.name, kernel="-", skipped=f"KV {kvb / 2**30:.1f} GiB > budget"))
            continue
        q, kv, step = build(case, shape)
        moved = kvb + 2 * q.nbytes
        for name, fn in kernels_for(platform).items():
            jitted = jax.jit(functools.partial(fn, scale=shape.head_dim ** -0.5))
            try:
                seconds = time_call(jitted, (q, kv, jnp.int32(0), step), iters)
            except Exception as e:  # noqa: BLE001 - report a failing kernel, keep benchmarking the rest
                results.append(dict(case=case.name, kernel=name, error=f"{type(e).__name__}: {e}"[:200]))
                continue
            bw = moved / seconds
            results.append(dict(case=case.name, kernel=name, ms=seconds * 1e3, gbps=bw / 1e9,
                                frac_of_copy=bw / copy_bw, kv_mib=kvb / 2**20))
    return dict(platform=platform, device=str(jax.devices()[0].device_kind), shape=dataclasses.asdict(shape),
                copy_gbps=copy_bw / 1e9, results=results)


# (M tokens, I, O, scheme, group size): SmolLM2's w_gate and LM head, Llama-3-8B's w_up and w_down.
QMM_SHAPES = [(m, i, o, scheme, group) for m in (1, 16, 256) for i, o in ((576, 1536), (576, 49152),
                                                                          (4096, 14336), (14336, 4096))
              for scheme, group in (("int8", None), ("int4", 128 if i % 128 == 0 else 96))]
QMM_TINY_SHAPES = [(4, 256, 256, "int8", None), (4, 256, 256, "int4", 128)]  # CPU: the interpreted kernel


def run_quantized_matmul(shapes, *, iters: int, copy_bw: float, interpret: bool) -> list[dict]:
    """The Pallas quantized matmul against XLA's `qdot` on one layer's weight; bytes = quantized weight + x + y.

    Interpreted (CPU) kernel times measure the interpreter, not the kernel: they only show it runs.
    """
    from jaxserve.model import (
        quantization as qz,  # NOTE: here, not at the top: the attention benchmark needs none of it
    )

    results = []
    dtype = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    for M, I, O, scheme, group in shapes:
        key_x, key_w = jax.random.split(jax.random.key(M + I + O))
        w = qz.quantize(jax.random.normal(key_w, (I, O), jnp.float32) * 0.02, scheme, 1, group_size=group)
        x = jax.random.normal(key_x, (M, I), dtype)
        moved = qz.weight_bytes(w) + x.nbytes + M * O * x.dtype.itemsize
        case = f"qmm {scheme} M={M} {I}x{O}"
        for name, fn in (("xla-qdot", qz.qdot), ("pallas-interp" if interpret else "pallas", qz.qdot_pallas)):
            jitted = jax.jit(functools.partial(fn, "MI,IO->MO"))
            try:
                seconds = time_call(jitted, (x, w), iters)
            except Exception as e:  # noqa: BLE001 - report a failing kernel, keep benchmarking the rest
                results.append(dict(case=case, kernel=name, error=f"{type(e).__name__}: {e}"[:200]))
                continue
            results.append(dict(case=case, kernel=name, ms=seconds * 1e3, gbps=moved / seconds / 1e9,
                                frac_of_copy=moved / seconds / copy_bw, weight_mib=qz.weight_bytes(w) / 2**20))
    return results


def check_interpret(shape: AttentionShape) -> list[dict]:
    """Pallas kernels in interpret mode against the XLA path on small cases (correctness only)."""
    small = dataclasses.replace(shape, num_heads=shape.num_heads // shape.num_kv_heads * 2, num_kv_heads=2)
    checks = []
    for case in (decode_case(4, 100), mixed_case(24, 3, 70)):
        q, kv, step = build(case, small)
        ref = jax.jit(functools.partial(paged_attention_xla, scale=0.1))(q, kv, jnp.int32(0), step)
        n = int(step.query_starts[-1])
        for name, fn in (("gpu-ragged", ragged_paged_attention), ("gpu-splitk", paged_decode_attention),
                         ("tpu-ragged", tpu_ragged_paged_attention)):
            out = fn(q, kv, jnp.int32(0), step, scale=0.1, interpret=True)
            err = float(jnp.max(jnp.abs(out[:n].astype(jnp.float32) - ref[:n].astype(jnp.float32))))
            checks.append(dict(case=case.name, kernel=name, max_abs_err=err, finite=bool(jnp.isfinite(out).all())))
    return checks


def format_table(report: dict) -> str:
    lines = [f"{report['platform']} ({report['device']}), measured copy bandwidth {report['copy_gbps']:.1f} GB/s",
             f"{'case':<44} {'kernel':<14} {'ms':>9} {'GB/s':>8} {'% copy':>7}"]
    for r in report["results"]:
        if "ms" in r:
            lines.append(f"{r['case']:<44} {r['kernel']:<14} {r['ms']:>9.3f} {r['gbps']:>8.1f} "
                         f"{100 * r['frac_of_copy']:>6.1f}%")
        else:
            lines.append(f"{r['case']:<44} {r['kernel']:<14} {r.get('skipped') or r.get('error')}")
    for c in report.get("interpret_checks", []):
        lines.append(f"[interpret] {c['case']:<40} {c['kernel']:<12} max|err| {c['max_abs_err']:.2e} "
                     f"finite={c['finite']}")
    return "\n".join(lines)
