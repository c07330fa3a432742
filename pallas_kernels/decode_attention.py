"""Split-K paged attention for decode-shaped steps on GPU (Pallas Triton backend; `interpret=True` on CPU).

A decode step has one query token per sequence, so the ragged kernel's grid (tokens x KV heads) is
small exactly when contexts are long: batch 4 x 8 KV heads is 32 programs for an H100's 132 SMs, each
walking 32k tokens alone. This kernel adds a third grid axis that splits each sequence's pages into
`num_splits` contiguous ranges; every program returns an unnormalised partial (acc, m, l) and a small
XLA epilogue merges them (the flash-decoding / split-K scheme of JAX's `ops/gpu/paged_attention.py`).

Grid = (T tokens, K KV heads, S splits). A program's queries are the [Gp, H] tile of one token's GQA
group (Gp >= 16 for Triton dots); it reads only the pages of its split that lie before the token's
causal bound. Tokens are handled one by one, so the kernel is exact for any step (a prefill chunk just
re-reads its KV per token); `paged_attention.py` sends it decode-shaped buckets only.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import online_softmax
from pallas_kernels.kv_cache import KVPages
from pallas_kernels.query_blocks import next_power_of_two, pack_query_blocks, pad_page_tables, unpack_query_blocks
from pallas_kernels.ragged_attention import default_pages_per_block, split_kv, triton_compiler_params, validate
from pallas_kernels.reference import ragged_paged_attention_reference
from pallas_kernels.step_metadata import StepInputs


def decode_attention_kernel(layer_ref,  # [1] int32
                            rows_ref, pos_ref, lens_ref, stop_ref,  # [T] int32 each
                            tables_ref,  # [R, P_pad] int32
                            q_ref,  # [Gp, H]
                            kv_ref,  # [L, P, page_size, 2K, H]
                            scales_ref,  # [L, P, page_size, 2K] float32, or None
                            acc_ref,  # [Gp, H] float32, unnormalised
                            m_ref,  # [Gp, 1] float32
                            l_ref,  # [Gp, 1] float32
                            *, scale: float, pages_per_block: int, blocks_per_split: int,
                            sliding_window: int | None, soft_cap: float | None):
    t, k, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer, row, stop = layer_ref[0], rows_ref[t], stop_ref[t]
    M, H = q_ref.shape
    C = pages_per_block * kv_ref.shape[2]
    q = q_ref[...]
    q_pos, q_ok = online_softmax.query_positions(M, M, pos_ref[t], lens_ref[t])
    first = split * blocks_per_split
    if sliding_window is not None:
        first = jnp.maximum(first, jnp.maximum(pos_ref[t] - sliding_window + 1, 0) // C)
    last = jnp.minimum((split + 1) * blocks_per_split, pl.cdiv(stop, C))

    def body(j, state):
        pages = tables_ref[row, pl.ds(j * pages_per_block, pages_per_block)]  # [pages_per_block]
        kk = kv_ref[layer, pages, :, 2 * k, :].reshape(C, H)
        vv = kv_ref[layer, pages, :, 2 * k + 1, :].reshape(C, H)
        ks = vs = None
        if scales_ref is not None:
            ks = scales_ref[layer, pages, :, 2 * k].reshape(1, C)
            vs = scales_ref[layer, pages, :, 2 * k + 1].reshape(1, C)
        return online_softmax.attend_block(q, kk, vv, ks, vs, j * C, stop, q_pos, q_ok, state, scale=scale,
                                           sliding_window=sliding_window, soft_cap=soft_cap)

    m, l, acc = jax.lax.fori_loop(first, last, body, online_softmax.init_state(M, H))
    acc_ref[...], m_ref[...], l_ref[...] = acc, m, l


def _decode_attention_call(tile_q, layer, rows, pos, lens, stop, tables, values, scales, *, scale, num_splits,
                           pages_per_block, sliding_window, soft_cap, num_warps, num_stages, interpret):
    T, K, M, H = tile_q.shape
    blocks_per_split = tables.shape[1] // (pages_per_block * num_splits)

    def whole(x):
        return None if x is None else pl.BlockSpec(x.shape, lambda t, k, s, n=x.ndim: (0,) * n)

    kernel = functools.partial(decode_attention_kernel, scale=scale, pages_per_block=pages_per_block,
                               blocks_per_split=blocks_per_split, sliding_window=sliding_window, soft_cap=soft_cap)
    operands = (layer, rows, pos, lens, stop, tables, tile_q, values, scales)
    part = lambda *tail: pl.BlockSpec((None, None, None, M, *tail), lambda t, k, s: (t, k, s, 0, 0))  # noqa: E731
    return pl.pallas_call(
        kernel,
        grid=(T, K, num_splits),
        in_specs=[whole(x) for x in operands[:6]]
        + [pl.BlockSpec((None, None, M, H), lambda t, k, s: (t, k, 0, 0)), whole(values), whole(scales)],
        out_specs=[part(H), part(1), part(1)],
        out_shape=[jax.ShapeDtypeStruct((T, K, num_splits, M, H), jnp.float32),
                   jax.ShapeDtypeStruct((T, K, num_splits, M, 1), jnp.float32),
                   jax.ShapeDtypeStruct((T, K, num_splits, M, 1), jnp.float32)],
        compiler_params=triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"paged_decode_attention_M{M}_H{H}_S{num_splits}",
    )(*operands)


def merge_splits(acc: jax.Array, m: jax.Array, l: jax.Array) -> jax.Array:
    """Combines per-split partials acc [.., S, M, H], m, l [.., S, M, 1] over S; zero where nothing was seen."""
    m_max = jnp.max(m, axis=-3, keepdims=True)
    w = jnp.exp(m - m_max)  # [.., S, M, 1]; an empty split has l = 0 and contributes nothing
    l_sum = jnp.sum(l * w, axis=-3)
    acc_sum = jnp.sum(acc * w, axis=-3)
    return jnp.where(l_sum > 0, acc_sum / jnp.where(l_sum > 0, l_sum, 1.0), 0.0)


def default_num_splits(max_kv_tokens: int, kv_tokens_per_block: int) -> int:
    """About four KV blocks per split, at most 16 splits, a power of two."""
    blocks = -(-max_kv_tokens // kv_tokens_per_block)
    return max(1, min(16, next_power_of_two(max(1, blocks // 4))))


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "soft_cap", "num_splits", "pages_per_block",
                                             "num_warps", "num_stages", "interpret"))
def paged_decode_attention(q: jax.Array, kv_pages: KVPages, layer: jax.Array, step: StepInputs, *, scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           num_splits: int | None = None, pages_per_block: int | None = None, num_warps: int = 4,
                           num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """Split-K paged attention, one program per (token, KV head, split); exact for any step.

    Args:
      q: [T, N, H] float32 or bfloat16.
      kv_pages: [L, P, page_size, 2K, H] float32 / bfloat16 pages or a `QuantizedKV` (int8 + scales).
      layer: int32 scalar (may be traced).
      step: `StepInputs` (positions [T], page_tables [R, P_max], kv_lens [R], query_starts [R + 1]).
      scale, sliding_window, soft_cap: as in `ragged_paged_attention_reference`.
      num_splits: KV splits per sequence (default: `default_num_splits` of the bucket's P_max).
      pages_per_block: KV pages per inner block (default: `default_pages_per_block`).
    Returns:
      [T, N, H] in q's dtype; zeros for padding tokens.
    """
    validate(q, kv_pages, layer, step, gpu=not interpret)  # Triton's size rules bind only where Triton compiles
    T, N, H = q.shape
    page_size, K = kv_pages.shape[2], kv_pages.shape[3] // 2
    ppb = max(pages_per_block or default_pages_per_block(H, page_size), -(-16 // page_size))
    splits = num_splits or default_num_splits(step.page_tables.shape[1] * page_size, ppb * page_size)
    group_pad = max(16, next_power_of_two(N // K))
    blocks = pack_query_blocks(q, step, num_kv_heads=K, group_pad=group_pad, per_token=True)
    values, scales = split_kv(kv_pages)
    acc, m, l = _decode_attention_call(
        blocks.q, jnp.reshape(layer, (1,)).astype(jnp.int32), blocks.rows, blocks.pos0, blocks.lens, blocks.kv_stop,
        pad_page_tables(step.page_tables, ppb * splits), values, scales, scale=scale, num_splits=splits,
        pages_per_block=ppb, sliding_window=sliding_window, soft_cap=soft_cap, num_warps=num_warps,
        num_stages=num_stages, interpret=interpret)
    return unpack_query_blocks(merge_splits(acc, m, l), blocks, T, N, q.dtype)


paged_decode_attention_reference = ragged_paged_attention_reference
