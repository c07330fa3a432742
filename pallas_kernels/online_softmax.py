"""One flash-attention step over a KV block, shared by every kernel body (GPU and TPU).

Everything is 2-D ([M, 1] columns, [1, C] rows) because Mosaic lays out 1-D vectors poorly and Triton is
indifferent. The running state (m, l, acc) is float32 whatever the storage dtype.

Masking is where the security boundary between sequences lives: a KV slot is used only if it lies
before the block's `kv_stop` (inside the sequence's own pages) and causally before the query. Slots
past `kv_stop` may hold anything, NaN included (another user's stale data, the null page), so V is
zeroed there and the logits are replaced, never multiplied, by the mask: 0 * NaN would still be NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# A large finite negative: fully masked rows give exp(0) * 0 = 0, never inf - inf.
MASK_VALUE = -1e30


def init_state(M: int, H: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(m [M, 1], l [M, 1], acc [M, H]) for an empty softmax."""
    return (jnp.full((M, 1), MASK_VALUE, jnp.float32), jnp.zeros((M, 1), jnp.float32),
            jnp.zeros((M, H), jnp.float32))


def query_positions(M: int, group_pad: int, pos0: jax.Array, num_valid: jax.Array):
    """Per tile row (token i // group_pad): its position [M, 1] and whether it is a real token [M, 1]."""
    tok = lax.broadcasted_iota(jnp.int32, (M, 1), 0) // group_pad
    return pos0 + tok, tok < num_valid


def attend_block(q: jax.Array, k: jax.Array, v: jax.Array, k_scale: jax.Array | None, v_scale: jax.Array | None,
                 kv_start: jax.Array, kv_stop: jax.Array, q_pos: jax.Array, q_ok: jax.Array,
                 state: tuple[jax.Array, jax.Array, jax.Array], *, scale: float, sliding_window: int | None,
                 soft_cap: float | None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Folds KV tokens [kv_start, kv_start + C) into the running softmax of the query tile.

    Args:
      q: [M, H] queries (float).
      k, v: [C, H] in storage dtype (float or int8).
      k_scale, v_scale: [1, C] float32 dequantization scales (int8 storage), else None.
      kv_start: position of k[0]; kv_stop: the block's KV bound (slots at or past it are masked and zeroed).
      q_pos, q_ok: [M, 1] query positions and validity.
      state: (m [M, 1], l [M, 1], acc [M, H]) float32.
    """
    m, l, acc = state
    C = k.shape[0]
    # int8 is exact in any float type; bf16 pages meet bf16 queries on the tensor cores / MXU.
    dot_dtype = q.dtype if k.dtype == jnp.int8 else jnp.promote_types(q.dtype, k.dtype)
    # NOTE: float32 pages ask for true float32 dots: Triton would otherwise use TF32 (10-bit mantissa).
    precision = lax.Precision.HIGHEST if dot_dtype == jnp.float32 else None
    kv_pos = kv_start + lax.broadcasted_iota(jnp.int32, (1, C), 1)  # [1, C]
    in_seq = kv_pos < kv_stop  # [1, C]
    s = lax.dot_general(q.astype(dot_dtype), k.astype(dot_dtype), (((1,), (1,)), ((), ())), precision=precision,
                        preferred_element_type=jnp.float32)  # [M, C]
    if k_scale is not None:
        s = s * k_scale
    s = s * scale
    if soft_cap is not None:
        s = soft_cap * jnp.tanh(s / soft_cap)
    mask = in_seq & q_ok & (kv_pos <= q_pos)  # [M, C]
    if sliding_window is not None:
        mask = mask & (kv_pos > q_pos - sliding_window)
    m_new = jnp.maximum(m, jnp.max(jnp.where(mask, s, MASK_VALUE), axis=1, keepdims=True))  # [M, 1]
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)  # [M, C]
    correction = jnp.exp(m - m_new)
    l = l * correction + jnp.sum(p, axis=1, keepdims=True)
    if v_scale is not None:
        p = p * jnp.where(in_seq, v_scale, 0.0)  # a foreign slot's scale may be NaN too
    # NOTE: column mask on V, as a [C, 1] column: NaN in a foreign slot must not reach acc through p = 0.
    v_ok = kv_start + lax.broadcasted_iota(jnp.int32, (C, 1), 0) < kv_stop
    v = jnp.where(v_ok, v.astype(dot_dtype), jnp.zeros((), dot_dtype))
    pv = lax.dot_general(p.astype(dot_dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                         preferred_element_type=jnp.float32)
    return m_new, l, acc * correction + pv


def finish(state: tuple[jax.Array, jax.Array, jax.Array]) -> jax.Array:
    """acc / l, and zero for rows that saw no KV (padding)."""
    _, l, acc = state
    return jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)
