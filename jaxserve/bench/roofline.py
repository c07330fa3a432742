"""The roofline of a Llama step on this machine: measured memory bandwidth and matmul rate, and the floors.

A step can be no faster than the larger of
  * bytes / bandwidth: every weight is read once per step (however many tokens the step computes), plus
    the KV cache each token attends over (reads) and the KV it appends (writes);
  * FLOPs / matmul rate: 2 FLOPs per weight per token for the matmuls, plus attention's
    4 * L * N * H FLOPs per (query token, attended token) pair (QK^T and PV).
Both rates are measured here with small jitted probes, not taken from a datasheet: the bandwidth is the
better of `jaxserve.bench.kernels.measure_copy_bandwidth` (a jitted `x + 1`, read and write) and a
jitted sum (reads only; on a CPU the copy probe pays for touching a fresh output buffer every call), the
matmul rate the best of jitted products in the engine's dtype: two squares and the model's own
[max tokens per step, D] @ [D, F] MLP matmul. A fraction
above 1 means the probes missed this machine's peak (or the load on a shared machine changed). So "fraction of
the floor" says how close the engine gets to what this machine's XLA can do, not to the chip's marketing numbers.

Decode (TPOT): a step of B sequences with contexts c_b reads the weights and sum(c_b) KV tokens and does
2 * P_matmul * B + 4 L N H sum(c_b) FLOPs. Prefill (TTFT) of B prompts of T tokens: weights once,
B * T KV tokens written, 2 * P_matmul * B * T + 4 L N H * B * T (T + 1) / 2 FLOPs (causal).
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.bench.kernels import measure_copy_bandwidth
from jaxserve.config import ModelConfig


def _best_seconds(fn, args, iters: int) -> float:
    """The fastest of `iters` calls after one warm-up call: a roofline is the best this machine does."""
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - t0)
    return best


def measure_matmul_flops(m: int = 1024, k: int | None = None, n: int | None = None, dtype=jnp.float32,
                         iters: int = 10) -> float:
    """FLOP/s of a jitted [m, k] @ [k, n] matmul (2 m k n FLOPs; square by default), best of `iters` calls."""
    k, n = k or m, n or m
    a = jax.random.normal(jax.random.key(0), (m, k), dtype)
    b = jax.random.normal(jax.random.key(1), (k, n), dtype)
    return 2 * m * k * n / _best_seconds(jax.jit(jnp.matmul), (a, b), iters)


def measure_read_bandwidth(mib: int = 256, iters: int = 10) -> float:
    """Bytes/s of a jitted sum over `mib` MiB: reads only, no output buffer to allocate (decode mostly reads)."""
    x = jnp.ones((mib * (1 << 20) // 4,), jnp.float32)
    return x.nbytes / _best_seconds(jax.jit(jnp.sum), (x,), iters)


@dataclasses.dataclass(frozen=True)
class Machine:
    bandwidth: float  # bytes/s: the larger of the read and the copy probe
    flops: float  # FLOP/s
    device: str
    copy_bandwidth: float = 0.0  # jaxserve.bench.kernels's probe (allocates its output every call)
    read_bandwidth: float = 0.0

    @classmethod
    def measure(cls, dtype=jnp.float32, copy_mib: int | None = None,
                matmul_shapes: tuple[tuple[int, int, int], ...] = ()) -> "Machine":
        """`matmul_shapes`: (m, k, n) products to try besides the squares, e.g. the model's own MLP matmul."""
        on_cpu = jax.default_backend() == "cpu"
        mib = copy_mib or (256 if on_cpu else 2048)
        copy = measure_copy_bandwidth(mib)
        read = measure_read_bandwidth(mib)
        squares = ((1024,) * 3, (2048,) * 3) if on_cpu else ((4096,) * 3, (8192,) * 3)
        flops = max(measure_matmul_flops(m, k, n, dtype) for m, k, n in squares + tuple(matmul_shapes))
        return cls(max(copy, read), flops, f"{jax.default_backend()} ({jax.devices()[0].device_kind})", copy, read)


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: the projections, the MLP and the LM head."""
    D, F, N, K, H, L = (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                        cfg.num_layers)
    per_layer = D * N * H + 2 * D * K * H + N * H * D + 3 * D * F
    return L * per_layer + D * cfg.vocab_size


def num_params(cfg: ModelConfig) -> int:
    """Every parameter of the model, from its one weight description (`llama.weight_info`)."""
    from jaxserve.model import llama

    return sum(math.prod(info.shape) for info in jax.tree.leaves(llama.weight_info(cfg)))


def kv_bytes_per_token(cfg: ModelConfig, itemsize: int) -> int:
    return cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * itemsize


def weight_bytes(weights) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(weights)))


@dataclasses.dataclass(frozen=True)
class Floor:
    seconds: float
    bytes: float
    flops: float
    bound: str  # "memory" | "compute"


def _floor(nbytes: float, flops: float, machine: Machine) -> Floor:
    t_mem, t_flop = nbytes / machine.bandwidth, flops / machine.flops
    return Floor(max(t_mem, t_flop), nbytes, flops, "memory" if t_mem >= t_flop else "compute")


def decode_floor(cfg: ModelConfig, wbytes: int, itemsize: int, contexts: list[int], machine: Machine) -> Floor:
    """One decode step of len(contexts) sequences, each attending `contexts[b]` tokens."""
    attended = sum(contexts)
    nbytes = wbytes + attended * kv_bytes_per_token(cfg, itemsize) + len(contexts) * kv_bytes_per_token(cfg, itemsize)
    flops = 2 * matmul_params(cfg) * len(contexts) + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * attended
    return _floor(nbytes, flops, machine)


def prefill_floor(cfg: ModelConfig, wbytes: int, itemsize: int, batch: int, prompt_len: int,
                  machine: Machine) -> Floor:
    """Prefilling `batch` prompts of `prompt_len` tokens (the first token of each comes out of it)."""
    tokens = batch * prompt_len
    nbytes = wbytes + tokens * kv_bytes_per_token(cfg, itemsize)
    pairs = batch * prompt_len * (prompt_len + 1) / 2
    flops = 2 * matmul_params(cfg) * tokens + 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * pairs
    return _floor(nbytes, flops, machine)


# Datasheet peaks (dense bf16 FLOP/s, HBM bytes/s) for the floors in docs/accelerators.md: what a chip
# promises, not what it reaches (Machine.measure measures that).
DATASHEETS = {
    "H100 SXM": Machine(bandwidth=3.35e12, flops=989e12, device="H100 SXM (HBM3)"),
    "H200": Machine(bandwidth=4.8e12, flops=989e12, device="H200 (HBM3e)"),
    "TPU v5e": Machine(bandwidth=819e9, flops=197e12, device="TPU v5e"),
    "TPU v6e": Machine(bandwidth=1640e9, flops=918e12, device="TPU v6e"),
}


def datasheet_decode_floors(models: dict[str, ModelConfig], batches: tuple[int, ...], context: int,
                            itemsize: int = 2) -> list[dict]:
    """Decode TPOT floors on every datasheet machine: each model's weights (every parameter, at `itemsize`
    bytes) plus the KV of `context` tokens per sequence, read once a step; FLOPs over the peak."""
    rows = []
    for name, cfg in models.items():
        wbytes = num_params(cfg) * itemsize
        for batch in batches:
            for chip, machine in DATASHEETS.items():
                f = decode_floor(cfg, wbytes, itemsize, [context] * batch, machine)
                rows.append(dict(model=name, batch=batch, chip=chip, tpot_ms=1e3 * f.seconds,
                                 memory_ms=1e3 * f.bytes / machine.bandwidth, compute_ms=1e3 * f.flops / machine.flops,
                                 gbytes=f.bytes / 1e9, bound=f.bound, tok_s=batch / f.seconds))
    return rows
