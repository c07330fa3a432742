"""Dense float32 ragged paged attention with every option the kernels have: the one reference they share.

Each kernel module re-exports it as its own `*_reference` (same signature as the kernel's public
function, tunables accepted and ignored), so a test can always compare `f` with `f_reference`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.kv_cache import KVPages
from pallas_kernels.step_metadata import StepInputs


def ragged_paged_attention_reference(q: jax.Array, kv_pages: KVPages, layer: jax.Array, step: StepInputs, *,
                                     scale: float, sliding_window: int | None = None,
                                     soft_cap: float | None = None, **unused_tunables) -> jax.Array:
    """Per token, gathers its row's whole KV (dequantized), masks causally (and to the window), softmax.

    Args:
      q: [T, N, H] queries.
      kv_pages: [L, P, page_size, 2K, H] pages (float or `QuantizedKV`).
      layer: int32 scalar.
      step: positions, page tables, kv_lens and query_starts of the step.
      scale: the softmax scale applied to q·k.
      sliding_window: if set, a token at position p sees KV positions in (p - sliding_window, p].
      soft_cap: if set, logits become soft_cap * tanh(logits / soft_cap) before masking.
    Returns:
      [T, N, H] in q's dtype; zero for padding tokens (index >= query_starts[-1]).
    """
    del unused_tunables
    T, N, H = q.shape
    K = kv_pages.shape[3] // 2
    rows = jnp.searchsorted(step.query_starts, jnp.arange(T), side="right") - 1  # [T]
    rows = jnp.clip(rows, 0, step.num_rows - 1)
    kv = kv_pages[layer, step.page_tables[rows]].astype(jnp.float32)  # [T, P_max, page_size, 2K, H]
    kv = kv.reshape(T, -1, K, 2, H)
    k = jnp.repeat(kv[:, :, :, 0], N // K, axis=2)  # [T, S, N, H]
    v = jnp.repeat(kv[:, :, :, 1], N // K, axis=2)
    s = jnp.einsum("TNH,TSNH->TNS", q.astype(jnp.float32), k, precision="highest") * scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    kv_pos = jnp.arange(k.shape[1])[None, :]
    mask = (kv_pos <= step.positions[:, None]) & (kv_pos < step.kv_lens[rows][:, None])  # [T, S]
    if sliding_window is not None:
        mask &= kv_pos > step.positions[:, None] - sliding_window
    s = jnp.where(mask[:, None, :], s, -jnp.inf)
    v = jnp.where(mask[:, :, None, None], v, 0.0)
    out = jnp.einsum("TNS,TSNH->TNH", jax.nn.softmax(s, axis=-1), v, precision="highest")
    valid = jnp.arange(T) < step.query_starts[-1]
    return jnp.where(valid[:, None, None], out, 0.0).astype(q.dtype)
