"""The attention backend registry: `--attention-backend auto|xla|pallas|native` -> one attention function.

`BACKENDS` is the one table: a backend name -> a factory that builds the attention function for a
platform ("cpu", "gpu" or "tpu"). Every function it returns has the signature of
`jaxserve.model.attention.AttentionFn` and is hashable with a stable identity (jit caches keep hitting).
`select_attention` is what the model runner, the draft proposer and `scripts/export_step.py` call; the
runner wraps the result in `sharding.shard_attention`, so under tensor parallelism a Pallas kernel runs
per device on its own heads (XLA does not partition a `pallas_call`).

  * xla: `paged_attention_xla`, every platform.
  * pallas: `paged_attention_pallas`, which picks the kernel per bucket shape at trace time (static
    Python, so each compiled bucket holds exactly one kernel):
      - TPU: `tpu_ragged_paged_attention` (Mosaic) for every bucket;
      - GPU: `ragged_paged_attention` (Triton) for buckets with prefill chunks; for decode-shaped buckets
        (one token per query block) whose longest context reaches `SPLIT_K_MIN_KV_TOKENS`, the split-K
        `paged_decode_attention`, with enough splits to give the GPU ~`TARGET_PROGRAMS` programs;
      - CPU: the GPU kernels in interpret mode (correct but slow: tests, and `--attention-backend pallas`).
  * native (CPU only): `pallas_kernels.cpu_attention`, an XLA FFI custom call compiled on first use; steps it
    cannot take (int8 KV pages, other head sizes) run the XLA path, decided per bucket at trace time.
  * auto: Pallas on GPU and TPU if the start-up probe (this platform's kernels, on a tiny step at the
    model's head shapes and KV dtype) compiles and runs; else XLA, with a warning naming the error. On
    CPU, native where the kernel builds (AVX512 + VNNI and a C++ compiler), else XLA.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ATTENTION_BACKENDS as BACKEND_NAMES
from jaxserve.config import ModelConfig, cache_dir
from jaxserve.model.attention import AttentionFn, paged_attention_xla
from jaxserve.model.step_inputs import SeqChunk, StepInputs, build_step_inputs
from pallas_kernels import cpu_attention
from pallas_kernels.decode_attention import paged_decode_attention
from pallas_kernels.kv_cache import KVPages, allocate_kv_pages
from pallas_kernels.ragged_attention import default_pages_per_block, ragged_paged_attention
from pallas_kernels.tpu_ragged_attention import tpu_ragged_paged_attention

logger = logging.getLogger(__name__)

# NOTE: heuristics, not yet tuned on hardware (no GPU was available when they were written):
# split-K pays once a decode program would walk >= 1k tokens alone, and ~4 programs per SM hide latency.
SPLIT_K_MIN_KV_TOKENS = 1024
TARGET_PROGRAMS = 512


def kernel_platform(platform: str | None = None) -> str:
    """"cpu", "gpu" or "tpu": the kernel family for a JAX platform name (default: this process's backend)."""
    platform = (platform or jax.default_backend()).lower()
    return "gpu" if platform in ("gpu", "cuda", "rocm") else platform


def decode_num_splits(num_tokens: int, num_kv_heads: int, max_kv_tokens: int, kv_tokens_per_block: int) -> int:
    """Splits per sequence so that T * K * S approaches TARGET_PROGRAMS, each split >= 2 KV blocks."""
    want = max(1, TARGET_PROGRAMS // max(1, num_tokens * num_kv_heads))
    most = max(1, max_kv_tokens // (2 * kv_tokens_per_block))
    splits = 1
    while splits * 2 <= min(want, most, 16):
        splits *= 2
    return splits


def paged_attention_pallas(q: jax.Array, kv_pages: KVPages, layer: jax.Array, step: StepInputs, *, scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           platform: str | None = None, interpret: bool | None = None) -> jax.Array:
    """The Pallas backend: the engine's attention signature, kernel chosen statically per bucket.

    `platform` defaults to `jax.default_backend()`; `interpret` defaults to True exactly on CPU.
    """
    platform = kernel_platform(platform)
    if interpret is None:
        interpret = platform == "cpu"
    opts = dict(scale=scale, sliding_window=sliding_window, soft_cap=soft_cap, interpret=interpret)
    if platform == "tpu":
        return tpu_ragged_paged_attention(q, kv_pages, layer, step, **opts)
    page_size, K, H = kv_pages.shape[2], kv_pages.shape[3] // 2, q.shape[2]
    max_kv_tokens = step.page_tables.shape[1] * page_size
    if step.query_block == 1 and max_kv_tokens >= SPLIT_K_MIN_KV_TOKENS:
        block_tokens = max(default_pages_per_block(H, page_size) * page_size, 16)
        splits = decode_num_splits(q.shape[0], K, max_kv_tokens, block_tokens)
        return paged_decode_attention(q, kv_pages, layer, step, num_splits=splits, **opts)
    return ragged_paged_attention(q, kv_pages, layer, step, **opts)


@functools.lru_cache(maxsize=None)
def make_pallas_attention(*, platform: str | None = None, interpret: bool | None = None,
                          sliding_window: int | None = None, soft_cap: float | None = None) -> AttentionFn:
    """`paged_attention_pallas` with these options bound (cached: the same options give the same object)."""
    return functools.partial(paged_attention_pallas, platform=kernel_platform(platform), interpret=interpret,
                             sliding_window=sliding_window, soft_cap=soft_cap)


def paged_attention_native(q: jax.Array, kv_pages: KVPages, layer: jax.Array, step: StepInputs, *,
                           scale: float) -> jax.Array:
    """The native CPU kernel where it takes these inputs (decided at trace time), else the XLA path."""
    if cpu_attention.unsupported(q, kv_pages):
        return paged_attention_xla(q, kv_pages, layer, step, scale=scale)
    with jax.named_scope("paged_attention"):  # profiles (jaxserve/bench/step_profile.py) find it by this name
        return cpu_attention.cpu_paged_attention(q, kv_pages, layer, step, scale=scale)


# The layer writes its K/V through this (`llama.forward`): in place, where XLA:CPU would copy a 16-bit cache.
paged_attention_native.write_kv = cpu_attention.cpu_write_kv


def native_available() -> bool:
    """The native CPU attention builds and loads here (logs why not, once)."""
    return cpu_attention.available(cache_dir() / "kernels")


BACKENDS: dict[str, Callable[[str], AttentionFn]] = {
    "xla": lambda platform: paged_attention_xla,
    "pallas": lambda platform: make_pallas_attention(platform=platform),
    "native": lambda platform: paged_attention_native,
}
if set(BACKEND_NAMES) != {"auto", *BACKENDS}:  # config.py (no JAX) validates the names the flag accepts
    raise ImportError(f"config.ATTENTION_BACKENDS {BACKEND_NAMES} and the registry {sorted(BACKENDS)} disagree")


@dataclasses.dataclass(frozen=True)
class ProbeShape:
    """The head layout and KV dtype the start-up probe runs the kernels at (the served model's)."""

    num_kv_heads: int = 1
    group: int = 2
    head_dim: int = 128
    page_size: int = 16
    kv_dtype: str = "bfloat16"

    @classmethod
    def for_model(cls, cfg: ModelConfig, page_size: int, kv_dtype, tensor_parallel_size: int = 1) -> ProbeShape:
        """The per-device shape of `cfg` (its served KV heads split `tensor_parallel_size` ways)."""
        return cls(max(1, cfg.num_kv_heads // tensor_parallel_size), cfg.num_heads // cfg.num_kv_heads,
                   cfg.head_dim, page_size, jnp.dtype(kv_dtype).name)


def probe_kernels(platform: str, shape: ProbeShape = ProbeShape(), *, interpret: bool = False) -> None:
    """Runs this platform's kernels on a tiny mixed step and a tiny decode step; raises if any fails."""
    platform = kernel_platform(platform)
    K, G, H, page = shape.num_kv_heads, shape.group, shape.head_dim, shape.page_size
    kv = allocate_kv_pages((1, 4, page, 2 * K, H), jnp.dtype(shape.kv_dtype))
    q_dtype = jnp.float32 if jnp.dtype(shape.kv_dtype) == jnp.float32 else jnp.bfloat16
    kernels = [tpu_ragged_paged_attention] if platform == "tpu" else [ragged_paged_attention, paged_decode_attention]
    for num_tokens, chunks in ((32, [SeqChunk([0] * 3, 0, [1]), SeqChunk([0], page + 4, [2, 3])]),
                               (2, [SeqChunk([0], 2, [1]), SeqChunk([0], page + 4, [2, 3])])):
        step = build_step_inputs(chunks, num_tokens=num_tokens, num_rows=2, page_size=page, max_pages_per_seq=2)
        step = jax.tree.map(jnp.asarray, step)
        q = jnp.zeros((num_tokens, K * G, H), q_dtype)
        for kernel in kernels:
            out = kernel(q, kv, jnp.int32(0), step, scale=1.0, interpret=interpret)
            if not np.isfinite(np.asarray(out, np.float32)).all():
                raise FloatingPointError(f"{kernel.__name__} returned non-finite values on zero inputs")


@functools.lru_cache(maxsize=None)
def probe_error(platform: str, shape: ProbeShape = ProbeShape()) -> Exception | None:
    """The error that stops this platform's Pallas kernels from running here, or None (probed once)."""
    try:
        probe_kernels(platform, shape)
        return None
    except Exception as e:  # noqa: BLE001 - any lowering, compile or run failure means "not available"
        return e


def pallas_available(platform: str | None = None, shape: ProbeShape = ProbeShape()) -> bool:
    """Whether the Pallas kernels compile and run on this GPU / TPU (always False on CPU: interpret mode only)."""
    platform = kernel_platform(platform)
    return platform in ("gpu", "tpu") and probe_error(platform, shape) is None


def resolve_attention_backend(name: str, platform: str | None = None, shape: ProbeShape = ProbeShape()) -> str:
    """`auto|xla|pallas|native` -> the backend for this machine; `auto` falls back to XLA with a warning, and so
    does `native` where the kernel cannot build."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"attention backend must be one of {', '.join(BACKEND_NAMES)}; got {name!r}")
    platform = kernel_platform(platform)
    if name == "native" and platform != "cpu":
        raise ValueError(f"--attention-backend native is a CPU kernel; this platform is {platform}")
    if name in ("auto", "native") and platform == "cpu":
        return "native" if native_available() else "xla"
    if name != "auto":
        return name
    if platform not in ("gpu", "tpu"):
        return "xla"
    if pallas_available(platform, shape):
        return "pallas"
    e = probe_error(platform, shape)
    logger.warning("attention backend auto: the Pallas kernels failed the start-up probe on %s (%s: %s); "
                   "falling back to XLA", platform, type(e).__name__, e)
    return "xla"


def select_attention(name: str, platform: str | None = None,
                     shape: ProbeShape = ProbeShape()) -> tuple[str, AttentionFn]:
    """(the backend in effect, its attention function) for `--attention-backend name` on `platform`."""
    resolved = resolve_attention_backend(name, platform, shape)
    logger.info("attention backend: %s (asked for %s, platform %s)", resolved, name, kernel_platform(platform))
    return resolved, BACKENDS[resolved](kernel_platform(platform))
