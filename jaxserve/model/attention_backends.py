"""Choosing a kernel: per platform once at start-up, per bucket shape at trace time.

`paged_attention_pallas` has the engine's attention signature and is what `--attention-backend pallas`
registers. Its choice is static (Python, at trace time), so each compiled bucket holds exactly one kernel:

  * TPU: `tpu_ragged_paged_attention` for every bucket.
  * GPU: `ragged_paged_attention` for buckets with prefill chunks; for decode-shaped buckets (one token per
    query block) whose longest context reaches `SPLIT_K_MIN_KV_TOKENS`, the split-K
    `paged_decode_attention`, with enough splits to give the GPU ~`TARGET_PROGRAMS` programs.
  * CPU: the GPU kernels in interpret mode (correctness only: tests, `--attention-backend pallas` on CPU).

`resolve_attention_backend("auto")` picks Pallas on GPU/TPU and XLA on CPU, and falls back to XLA with a
logged warning if the Pallas kernel does not compile on this machine (a probe on a tiny step).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.model.step_inputs import SeqChunk, StepInputs, build_step_inputs
from pallas_kernels.decode_attention import paged_decode_attention
from pallas_kernels.kv_cache import KVPages
from pallas_kernels.ragged_attention import default_pages_per_block, ragged_paged_attention
from pallas_kernels.tpu_ragged_attention import tpu_ragged_paged_attention

logger = logging.getLogger(__name__)

# NOTE: heuristics, not yet tuned on hardware (no GPU was available when they were written):
# split-K pays once a decode program would walk >= 1k tokens alone, and ~4 programs per SM hide latency.
SPLIT_K_MIN_KV_TOKENS = 1024
TARGET_PROGRAMS = 512


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
    """The `--attention-backend pallas` entry point: the engine's attention signature, kernel chosen statically.

    `platform` defaults to `jax.default_backend()`; `interpret` defaults to True exactly on CPU.
    """
    platform = platform or jax.default_backend()
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
                          sliding_window: int | None = None, soft_cap: float | None = None):
    """A hashable attention function with these options bound (stable identity: jit caches keep hitting)."""
    return functools.partial(paged_attention_pallas, platform=platform, interpret=interpret,
                             sliding_window=sliding_window, soft_cap=soft_cap)


def probe_kernels(platform: str, *, interpret: bool = False) -> None:
    """Runs this platform's kernels on a tiny mixed step and a tiny decode step; raises if any fails."""
    page, K, G, H = 16, 1, 2, 128
    kv = jnp.zeros((1, 4, page, 2 * K, H), jnp.bfloat16)
    kernels = [tpu_ragged_paged_attention] if platform == "tpu" else [ragged_paged_attention, paged_decode_attention]
    for num_tokens, chunks in ((32, [SeqChunk([0] * 3, 0, [1]), SeqChunk([0], 20, [2, 3])]),
                               (2, [SeqChunk([0], 2, [1]), SeqChunk([0], 20, [2, 3])])):
        step = build_step_inputs(chunks, num_tokens=num_tokens, num_rows=2, page_size=page, max_pages_per_seq=2)
        step = jax.tree.map(jnp.asarray, step)
        q = jnp.zeros((num_tokens, K * G, H), jnp.bfloat16)
        for kernel in kernels:
            out = kernel(q, kv, jnp.int32(0), step, scale=1.0, interpret=interpret)
            if not np.isfinite(np.asarray(out, np.float32)).all():
                raise FloatingPointError(f"{kernel.__name__} returned non-finite values on zero inputs")


@functools.lru_cache(maxsize=None)
def pallas_available(platform: str | None = None) -> bool:
    """Whether the Pallas kernels for this platform compile and run here (probed once)."""
    platform = platform or jax.default_backend()
    if platform not in ("gpu", "tpu"):
        return False
    try:
        probe_kernels(platform)
        return True
    except Exception as e:  # noqa: BLE001 - any lowering or compile failure means "not available"
        logger.warning("Pallas attention kernel unavailable on %s (%s: %s)", platform, type(e).__name__, e)
        return False


def resolve_attention_backend(name: str, platform: str | None = None) -> str:
    """`auto|xla|pallas` -> `xla` or `pallas` for this machine; `auto` falls back to XLA with a warning."""
    if name not in ("auto", "xla", "pallas"):
        raise ValueError(f"attention backend must be auto, xla or pallas; got {name!r}")
    platform = platform or jax.default_backend()
    if name != "auto":
        return name
    if platform == "cpu":
        return "xla"
    if pallas_available(platform):
        return "pallas"
    logger.warning("attention backend auto: Pallas unavailable on %s, falling back to XLA", platform)
    return "xla"
