"""Ragged paged attention for TPU: Pallas on Mosaic, page tables by scalar prefetch, double-buffered page DMAs.

Grid = (NB query blocks,), "parallel" (no state crosses programs, so megacore may split it). A program
owns one query block (Qb tokens of one sequence) for all KV heads, as a [K, M, H] VMEM tile with
M = Qb * Gp rows (Gp pads the GQA group so M is a multiple of 8 sublanes). The KV cache stays in HBM
(`memory_space=pl.ANY`); the program walks its sequence's page table in KV blocks of
`pages_per_block` pages, copying each page ([page_size, 2K, H]: every head's K and V at once) with its
own DMA into one half of a two-slot VMEM buffer while it computes on the other half. Pages past the
block's causal bound are never requested: their slots get the null page 0, which the mask ignores.

The page tables, lengths and layer index arrive by scalar prefetch (SMEM), so page addresses are
known before any vector work. The running softmax (m, l, acc) lives in float32 VMEM scratch.

Written with the constructs that jax 0.10.2's TPU interpret mode supports, so it runs on CPU with
`interpret=True` (`pltpu.InterpretParams()`) or under `pltpu.force_tpu_interpret_mode()`. In particular
it never reshapes a ref (interpret mode rejects `ReshapeTransform`, which is why JAX's own
`ragged_paged_attention` cannot run there): K and V of head k are read as `buf[slot, :, :, 2k]` and
reshaped as values. NOTE: not yet compiled on a real TPU; Mosaic's rules for that strided
second-minor read on packed dtypes (bf16, int8) are the first thing to check on hardware.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import online_softmax
from pallas_kernels.kv_cache import KVPages
from pallas_kernels.query_blocks import pack_query_blocks, pad_page_tables, unpack_query_blocks
from pallas_kernels.ragged_attention import split_kv, validate
from pallas_kernels.reference import ragged_paged_attention_reference
from pallas_kernels.step_metadata import StepInputs

LANES = 128


def tpu_ragged_attention_kernel(
        # scalar prefetch (SMEM)
        layer_ref,  # [1] int32
        rows_ref, pos0_ref, lens_ref, stop_ref,  # [NB] int32 each
        tables_ref,  # [R, P_pad] int32
        # inputs
        q_ref,  # [K, M, H] VMEM
        kv_hbm,  # [L, P, page_size, 2K, H] HBM
        *refs,  # scales_hbm [L, P, page_size, 2K] HBM (int8 only), then the outputs and scratch below
        scale: float, group_pad: int, pages_per_block: int, quantized: bool, sliding_window: int | None,
        soft_cap: float | None):
    if quantized:
        scales_hbm, o_ref, kv_buf, sc_buf, sems, m_ref, l_ref, acc_ref = refs
    else:
        (o_ref, kv_buf, sems, m_ref, l_ref, acc_ref), scales_hbm, sc_buf = refs, None, None
    # o_ref: [K, M, H]; kv_buf: [2, ppb, page_size, 2K, H]; sc_buf: [2, ppb, page_size, 2K] float32;
    # sems: DMA [2]; m_ref, l_ref: [K, M, 128] float32 (lane-replicated); acc_ref: [K, M, H] float32
    b = pl.program_id(0)
    layer, row, stop = layer_ref[0], rows_ref[b], stop_ref[b]
    K, M, H = q_ref.shape
    page_size = kv_buf.shape[2]
    C = pages_per_block * page_size
    q_pos, q_ok = online_softmax.query_positions(M, group_pad, pos0_ref[b], lens_ref[b])
    first = 0 if sliding_window is None else jnp.maximum(pos0_ref[b] - sliding_window + 1, 0) // C
    last = pl.cdiv(stop, C)

    def copies(j, slot):
        out = []
        for i in range(pages_per_block):
            p = j * pages_per_block + i
            page = jnp.where(p * page_size < stop, tables_ref[row, p], 0)  # never fetch past the sequence
            out.append(pltpu.make_async_copy(kv_hbm.at[layer, page], kv_buf.at[slot, i], sems.at[slot]))
            if quantized:
                out.append(pltpu.make_async_copy(scales_hbm.at[layer, page], sc_buf.at[slot, i], sems.at[slot]))
        return out

    m0, l0, acc0 = online_softmax.init_state(M, H)
    m_ref[...] = jnp.broadcast_to(m0[None], m_ref.shape)
    l_ref[...] = jnp.broadcast_to(l0[None], l_ref.shape)
    acc_ref[...] = jnp.broadcast_to(acc0[None], acc_ref.shape)

    @pl.when(first < last)
    def _():
        for c in copies(first, 0):
            c.start()

    def body(j, carry):
        slot = (j - first) % 2

        @pl.when(j + 1 < last)
        def _():
            for c in copies(j + 1, 1 - slot):
                c.start()

        for c in copies(j, slot):
            c.wait()
        for k in range(K):
            kk = kv_buf[slot, :, :, 2 * k, :].reshape(C, H)
            vv = kv_buf[slot, :, :, 2 * k + 1, :].reshape(C, H)
            ks = vs = None
            if quantized:
                ks = sc_buf[slot, :, :, 2 * k].reshape(1, C)
                vs = sc_buf[slot, :, :, 2 * k + 1].reshape(1, C)
            state = (m_ref[k][:, :1], l_ref[k][:, :1], acc_ref[k])
            m, l, acc = online_softmax.attend_block(q_ref[k], kk, vv, ks, vs, j * C, stop, q_pos, q_ok, state,
                                                    scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
            m_ref[k] = jnp.broadcast_to(m, (M, LANES))
            l_ref[k] = jnp.broadcast_to(l, (M, LANES))
            acc_ref[k] = acc
        return carry

    jax.lax.fori_loop(first, last, body, 0)
    for k in range(K):
        o_ref[k] = online_softmax.finish((None, l_ref[k][:, :1], acc_ref[k])).astype(o_ref.dtype)


def _tpu_ragged_attention_call(tile_q, layer, rows, pos0, lens, stop, tables, values, scales, *, scale, group_pad,
                               pages_per_block, sliding_window, soft_cap, interpret):
    NB, K, M, H = tile_q.shape
    _, _, page_size, two_k, _ = values.shape
    quantized = scales is not None
    tile = pl.BlockSpec((None, K, M, H), lambda b, *_: (b, 0, 0, 0))
    hbm = pl.BlockSpec(memory_space=pl.ANY)
    scratch = [pltpu.VMEM((2, pages_per_block, page_size, two_k, H), values.dtype)]
    if quantized:
        scratch.append(pltpu.VMEM((2, pages_per_block, page_size, two_k), jnp.float32))
    scratch += [pltpu.SemaphoreType.DMA((2,)), pltpu.VMEM((K, M, LANES), jnp.float32),
                pltpu.VMEM((K, M, LANES), jnp.float32), pltpu.VMEM((K, M, H), jnp.float32)]
    kernel = functools.partial(tpu_ragged_attention_kernel, scale=scale, group_pad=group_pad,
                               pages_per_block=pages_per_block, quantized=quantized, sliding_window=sliding_window,
                               soft_cap=soft_cap)
    inputs = (tile_q, values) + ((scales,) if quantized else ())
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6, grid=(NB,), in_specs=[tile, hbm] + ([hbm] if quantized else []),
            out_specs=tile, scratch_shapes=scratch),
        out_shape=jax.ShapeDtypeStruct(tile_q.shape, tile_q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel",)),
        interpret=pltpu.InterpretParams() if interpret else False,
        name=f"tpu_ragged_paged_attention_M{M}_H{H}_C{pages_per_block * page_size}",
    )(layer, rows, pos0, lens, stop, tables, *inputs)


def tpu_group_pad(group: int, query_block: int) -> int:
    """The smallest Gp >= G with Qb * Gp a multiple of 8 (sublanes)."""
    step = 8 // math.gcd(query_block, 8)
    return -(-group // step) * step


def default_tpu_pages_per_block(page_size: int) -> int:
    """KV blocks of at least 128 tokens, so logits tiles [M, C] fill the 128 lanes."""
    return max(1, 128 // page_size)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "soft_cap", "pages_per_block", "interpret"))
def tpu_ragged_paged_attention(q: jax.Array, kv_pages: KVPages, layer: jax.Array, step: StepInputs, *,
                               scale: float, sliding_window: int | None = None, soft_cap: float | None = None,
                               pages_per_block: int | None = None, interpret: bool = False) -> jax.Array:
    """Ragged paged attention over a mixed step on TPU (`interpret=True`: TPU interpret mode on CPU).

    Args:
      q: [T, N, H] float32 or bfloat16.
      kv_pages: [L, P, page_size, 2K, H] float32 / bfloat16 pages, K and V interleaved per KV head, or a
        `QuantizedKV` (int8 values + float32 [L, P, page_size, 2K] scales, both DMA'd per page).
      layer: int32 scalar (may be traced).
      step: `StepInputs`; its query blocks (Qb = step.query_block tokens of one row each) are the grid.
      scale, sliding_window, soft_cap: as in `ragged_paged_attention_reference`.
      pages_per_block: pages per DMA'd KV block (default: `default_tpu_pages_per_block`).
    Returns:
      [T, N, H] in q's dtype; zeros for padding tokens.
    """
    validate(q, kv_pages, layer, step, gpu=False)
    T, N, H = q.shape
    page_size, K = kv_pages.shape[2], kv_pages.shape[3] // 2
    ppb = pages_per_block or default_tpu_pages_per_block(page_size)
    group_pad = tpu_group_pad(N // K, step.query_block)
    blocks = pack_query_blocks(q, step, num_kv_heads=K, group_pad=group_pad)
    values, scales = split_kv(kv_pages)
    out = _tpu_ragged_attention_call(
        blocks.q, jnp.reshape(layer, (1,)).astype(jnp.int32), blocks.rows, blocks.pos0, blocks.lens, blocks.kv_stop,
        pad_page_tables(step.page_tables, ppb), values, scales, scale=scale, group_pad=group_pad,
        pages_per_block=ppb, sliding_window=sliding_window, soft_cap=soft_cap, interpret=interpret)
    return unpack_query_blocks(out, blocks, T, N, q.dtype)


tpu_ragged_paged_attention_reference = ragged_paged_attention_reference
