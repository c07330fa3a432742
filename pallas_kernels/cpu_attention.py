"""Ragged paged attention on the CPU as a native XLA FFI custom call (`cpu_attention.cc`).

The engine's attention signature (`jaxserve.model.attention.AttentionFn`) over the same pages and step inputs as
the XLA path and the Pallas kernels. Each (row, KV head, up to 16 query tokens) is one work item that reads its
row's pages in place, once for every query head of the group, so a decode row costs a decode row's work whatever
else the step holds, and no KV is gathered, transposed or padded (docs/performance.md, "Native attention").

float32 arithmetic throughout (bfloat16 / float16 pages are widened on load); equals
`reference.ragged_paged_attention_reference` to float32 rounding. int8 pages, sliding windows and soft caps are
not implemented here: `supports` says so and the caller uses XLA. `cpu_write_kv` writes a step's K/V into the
pages in place (the backend's KV write, which `llama.forward` uses): XLA:CPU copies a 16-bit cache on scatter.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import cpu_build
from pallas_kernels.kv_cache import KVPages, QuantizedKV, write_kv
from pallas_kernels.step_metadata import StepInputs

TARGET = "jaxserve_cpu_attention"
WRITE_TARGET = "jaxserve_cpu_write_kv"
HEAD_DIMS = (8, 16, 32, 64, 128, 256)
KV_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)


def available(build_dir: str | os.PathLike) -> bool:
    """True if the kernel and its KV write are built and registered for the CPU backend; logs why not, once."""
    return (cpu_build.available("cpu_attention.cc", "JaxserveAttention", TARGET, build_dir, "attention")
            and cpu_build.available("cpu_attention.cc", "JaxserveWriteKV", WRITE_TARGET, build_dir, "KV write"))


def unsupported_pages(kv_pages: KVPages) -> str | None:
    """Why the kernel and the KV write cannot take these pages (None: they can)."""
    if isinstance(kv_pages, QuantizedKV):
        return "int8 KV pages"
    if kv_pages.dtype not in KV_DTYPES:
        return f"{kv_pages.dtype} KV pages"
    return None


def unsupported(q: jax.Array, kv_pages: KVPages) -> str | None:
    """Why the kernel cannot take these inputs (None: it can)."""
    why = unsupported_pages(kv_pages)
    if why is None and q.shape[-1] not in HEAD_DIMS:
        why = f"head_dim {q.shape[-1]}"
    return why


def cpu_paged_attention(q: jax.Array, kv_pages: jax.Array, layer: jax.Array, step: StepInputs, *,
                        scale: float) -> jax.Array:
    """Causal attention of each step token over its own row's KV (`available()` must have succeeded).

    Args:
      q: [T, N, H] (float32, or cast to it); N = K * G.
      kv_pages: [L, P, page_size, 2K, H] float32, bfloat16 or float16, this step's K/V already written.
      layer: int32 scalar (may be traced: the layer scan passes its index).
      step: the step's inputs; reads positions, page_tables, kv_lens and query_starts.
    Returns:
      [T, N, H] in q's dtype; zero for padding tokens.
    """
    why = unsupported(q, kv_pages)
    if why:
        raise ValueError(f"cpu_paged_attention: {why} not supported")
    if kv_pages.ndim != 5 or kv_pages.shape[-1] != q.shape[-1] or q.shape[1] % (kv_pages.shape[3] // 2):
        raise ValueError(f"cpu_paged_attention: q {q.shape} and kv_pages {kv_pages.shape} disagree")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    out = call(q.astype(jnp.float32), kv_pages, jnp.asarray(layer, jnp.int32), step.positions, step.page_tables,
               step.kv_lens, step.query_starts, scale=np.float32(scale))
    return out.astype(q.dtype)


def cpu_write_kv(kv_pages: KVPages, layer: jax.Array, k: jax.Array, v: jax.Array, slot_mapping: jax.Array) -> KVPages:
    """`kv_cache.write_kv` in place through the native handler (`available()` must have succeeded).

    k, v [T, K, H] go to their slots of layer `layer`, K and V interleaved per head, rounded to the pages' dtype
    (to nearest even, as `astype` does). Why: XLA:CPU copies a bfloat16 / float16 cache whole on every scatter
    (`cpu_attention.cc`). int8 pages (and other dtypes) take `kv_cache.write_kv`.
    """
    if unsupported_pages(kv_pages):
        return write_kv(kv_pages, layer, k, v, slot_mapping)
    T, K, H = k.shape
    kv = jnp.stack([k, v], axis=2).reshape(T, 2 * K, H).astype(jnp.float32)
    call = jax.ffi.ffi_call(WRITE_TARGET, jax.ShapeDtypeStruct(kv_pages.shape, kv_pages.dtype),
                            input_output_aliases={0: 0})
    return call(kv_pages, kv, jnp.asarray(layer, jnp.int32), slot_mapping.astype(jnp.int32))

