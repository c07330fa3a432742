"""Ragged paged attention for GPU: one kernel call for a mixed step of decode rows and prefill chunks.

Written with the generic Pallas API (`pl.pallas_call`, refs, `lax.fori_loop`), so it lowers through the
Pallas Triton backend, the GPU Pallas lowering that jax 0.10 ships for generic kernels (Mosaic GPU
needs the `plgpu` warpgroup API and is not used here). On CPU it runs with `interpret=True`; the tests
also lower it for CUDA on CPU (`lowering_platforms=("cuda",)`) to check the Triton rules hold.

Design (grid = (NB query blocks, K KV heads)):
  * a program owns one query block (Qb <= 16 consecutive tokens of one sequence, the step's own query
    blocks) and one KV head: its queries are a [Qb * Gp, H] tile (see `query_blocks.py`), so each page
    is read once for the whole GQA group and KV heads are never repeated;
  * it walks its sequence's page table in KV blocks of `pages_per_block` pages, gathering the pages
    with one indexed load each for K and V (the interleaved head 2k and 2k+1), up to the block's causal
    bound only: a prefill chunk stops at its last token, a decode row at its length;
  * online softmax in float32 (`online_softmax.attend_block`), int8 pages dequantized in registers.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import online_softmax
from pallas_kernels.kv_cache import KVPages, QuantizedKV
from pallas_kernels.query_blocks import next_power_of_two, pack_query_blocks, pad_page_tables, unpack_query_blocks
from pallas_kernels.reference import ragged_paged_attention_reference
from pallas_kernels.step_metadata import StepInputs


def ragged_attention_kernel(layer_ref,  # [1] int32
                            rows_ref, pos0_ref, lens_ref, stop_ref,  # [NB] int32 each
                            tables_ref,  # [R, P_pad] int32
                            q_ref,  # [M, H], M = Qb * Gp
                            kv_ref,  # [L, P, page_size, 2K, H]
                            scales_ref,  # [L, P, page_size, 2K] float32, or None
                            o_ref,  # [M, H]
                            *, scale: float, group_pad: int, pages_per_block: int, sliding_window: int | None,
                            soft_cap: float | None):
    b, k = pl.program_id(0), pl.program_id(1)
    layer, row, stop = layer_ref[0], rows_ref[b], stop_ref[b]
    M, H = q_ref.shape
    C = pages_per_block * kv_ref.shape[2]  # KV tokens per block
    q = q_ref[...]
    q_pos, q_ok = online_softmax.query_positions(M, group_pad, pos0_ref[b], lens_ref[b])
    first = 0 if sliding_window is None else jnp.maximum(pos0_ref[b] - sliding_window + 1, 0) // C

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

    state = jax.lax.fori_loop(first, pl.cdiv(stop, C), body, online_softmax.init_state(M, H))
    o_ref[...] = online_softmax.finish(state).astype(o_ref.dtype)


def _ragged_attention_call(blocks_q, layer, rows, pos0, lens, stop, tables, values, scales, *, scale, group_pad,
                           pages_per_block, sliding_window, soft_cap, num_warps, num_stages, interpret):
    NB, K, M, H = blocks_q.shape

    def whole(x):  # the full array as one block: Triton indexes it through a pointer, nothing is copied
        return None if x is None else pl.BlockSpec(x.shape, lambda b, k, n=x.ndim: (0,) * n)

    tile = pl.BlockSpec((None, None, M, H), lambda b, k: (b, k, 0, 0))
    kernel = functools.partial(ragged_attention_kernel, scale=scale, group_pad=group_pad,
                               pages_per_block=pages_per_block, sliding_window=sliding_window, soft_cap=soft_cap)
    operands = (layer, rows, pos0, lens, stop, tables, blocks_q, values, scales)
    return pl.pallas_call(
        kernel,
        grid=(NB, K),
        in_specs=[whole(x) for x in operands[:6]] + [tile, whole(values), whole(scales)],
        out_specs=tile,
        out_shape=jax.ShapeDtypeStruct(blocks_q.shape, blocks_q.dtype),
        compiler_params=triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"ragged_paged_attention_M{M}_H{H}_C{pages_per_block * values.shape[2]}",
    )(*operands)


def triton_compiler_params(num_warps: int, num_stages: int):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def default_pages_per_block(head_dim: int, page_size: int) -> int:
    """KV tokens per block: 64 for H >= 128 (register pressure of the [M, H] accumulator), else 128."""
    tokens = 64 if head_dim >= 128 else 128
    return max(1, tokens // page_size)


def split_kv(kv_pages: KVPages) -> tuple[jax.Array, jax.Array | None]:
    if isinstance(kv_pages, QuantizedKV):
        return kv_pages.values, kv_pages.scales
    return kv_pages, None


def validate(q: jax.Array, kv_pages: KVPages, layer: jax.Array, step: StepInputs, *, gpu: bool) -> None:
    if q.ndim != 3 or len(kv_pages.shape) != 5:
        raise ValueError(f"expected q [T, N, H] and kv_pages [L, P, page_size, 2K, H]; got q {q.shape}, "
                         f"kv_pages {kv_pages.shape}")
    T, N, H = q.shape
    _, _, page_size, two_k, H_kv = kv_pages.shape
    if two_k % 2 or N % (two_k // 2):
        raise ValueError(f"kv_pages {kv_pages.shape}: 2K = {two_k} must be even and K must divide N = {N} "
                         f"(q {q.shape})")
    if H != H_kv:
        raise ValueError(f"head_dim of q {q.shape} and kv_pages {kv_pages.shape} differ")
    if jnp.ndim(layer) != 0:
        raise ValueError(f"layer must be a scalar; got shape {jnp.shape(layer)}")
    if step.num_tokens != T:
        raise ValueError(f"q {q.shape} has {T} tokens but the step has {step.num_tokens}")
    if isinstance(kv_pages, QuantizedKV) and kv_pages.scales.shape != kv_pages.values.shape[:-1]:
        raise ValueError(f"int8 scales {kv_pages.scales.shape} must be values {kv_pages.values.shape} without H")
    if gpu:
        pow2 = lambda n: n & (n - 1) == 0  # noqa: E731
        if not (pow2(H) and H >= 16 and pow2(page_size)):
            raise ValueError(f"the Triton kernel needs head_dim a power of two >= 16 and a power-of-two page "
                             f"size; got kv_pages {kv_pages.shape}")
        if not pow2(step.query_block):
            raise ValueError(f"the Triton kernel needs a power-of-two query block; got {step.query_block}")


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "soft_cap", "pages_per_block",
                                             "num_warps", "num_stages", "interpret"))
def ragged_paged_attention(q: jax.Array, kv_pages: KVPages, layer: jax.Array, step: StepInputs, *, scale: float,
                           sliding_window: int | None = None, soft_cap: float | None = None,
                           pages_per_block: int | None = None, num_warps: int = 4, num_stages: int = 2,
                           interpret: bool = False) -> jax.Array:
    """Ragged paged attention over a mixed step (GPU / Triton; `interpret=True` on CPU).

    Args:
      q: [T, N, H] float32 or bfloat16 queries of the step's flat tokens.
      kv_pages: [L, P, page_size, 2K, H] float32 / bfloat16 pages, K and V interleaved per KV head, or a
        `QuantizedKV` (int8 values + float32 [L, P, page_size, 2K] scales). This step's K/V already written.
      layer: int32 scalar (may be traced, e.g. under `lax.scan`).
      step: `StepInputs`: positions [T], page_tables [R, P_max], kv_lens [R], query_starts [R + 1] and the
        query blocks qblock_rows / qblock_starts / qblock_lens [NB] of Qb = step.query_block tokens.
      scale: softmax scale. sliding_window / soft_cap: as in `ragged_paged_attention_reference`.
      pages_per_block: KV pages per inner block (default: `default_pages_per_block(H, page_size)`).
      num_warps, num_stages: Triton launch parameters.
    Returns:
      [T, N, H] in q's dtype; zeros for padding tokens.
    """
    validate(q, kv_pages, layer, step, gpu=not interpret)  # Triton's size rules bind only where Triton compiles
    T, N, H = q.shape
    K = kv_pages.shape[3] // 2
    ppb = pages_per_block or default_pages_per_block(H, kv_pages.shape[2])
    ppb = max(ppb, -(-16 // kv_pages.shape[2]))  # Triton dots need >= 16 KV tokens per block
    G = N // K
    group_pad = max(next_power_of_two(G), -(-16 // step.query_block))  # M = Qb * Gp >= 16, a power of two
    blocks = pack_query_blocks(q, step, num_kv_heads=K, group_pad=group_pad)
    values, scales = split_kv(kv_pages)
    out = _ragged_attention_call(
        blocks.q, jnp.reshape(layer, (1,)).astype(jnp.int32), blocks.rows, blocks.pos0, blocks.lens, blocks.kv_stop,
        pad_page_tables(step.page_tables, ppb), values, scales, scale=scale, group_pad=group_pad,
        pages_per_block=ppb, sliding_window=sliding_window, soft_cap=soft_cap, num_warps=num_warps,
        num_stages=num_stages, interpret=interpret)
    return unpack_query_blocks(out, blocks, T, N, q.dtype)


ragged_paged_attention_reference = ragged_paged_attention_reference
