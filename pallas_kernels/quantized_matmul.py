"""Dequantize-in-the-matmul for int8 / int4 weights: y [M, O] = x [M, I] @ w [I, O], w read quantized.

Written with the generic Pallas API (`pl.pallas_call`, BlockSpecs, `lax.fori_loop`), so it lowers through
the Pallas Triton backend on GPU and runs with `interpret=True` on CPU (correctness only there); it does
not lower for TPU (Mosaic) as written. The
weight is one layer's `Int8Weight` / `Int4Weight` with its out axes flattened to one O (the layout of
`jaxserve/model/quantization.py`): int8 values [G, g, O] with scales [G, O]; int4 packed [G, g/2, O] (byte b of a
group holds input b in its low nibble and input b + g/2 in its high one) with scales and mins [G, O].

Design (grid = (M / block_m, O / block_n)):
  * a program owns a [block_m, block_n] output tile; it keeps the whole input row of its x block and the
    [G, R, block_n] column strip of the quantized weight (R = g, or g/2 packed) as refs, and walks the
    input dimension itself: over the G groups, and within a group over chunks of `block_k` stored rows;
  * each [block_k, block_n] weight chunk is loaded quantized (1 or 1/2 byte per weight), dequantized in
    float32 with its group's scale (and min) and rounded once to x's dtype, as `qdot` does, then fed to a
    float32-accumulating dot. An int4 chunk is two dots: its low nibbles against x's chunk in the first
    half of the group, its high nibbles against the same chunk in the second half (no unpacked copy);
  * per-channel int8 (G == 1) dots the int8 values exactly and multiplies the float32 accumulator by the
    channel scales once at the end;
  * the dense weight never exists outside the program's registers. M is padded here to a multiple of
    block_m (it is the token count: decode is 1..R rows), O must be a multiple of block_n.

Nothing here was timed on a GPU or TPU (none was available when it was written): the default block sizes
are guesses, and `--quantized-matmul` defaults to XLA's `qdot` (docs/quantization.md).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.quantized_weights import Int4Weight, Int8Weight, QuantizedWeight, dequantize_weight
from pallas_kernels.ragged_attention import triton_compiler_params

MAX_BLOCK_K = 128  # stored rows per inner step by default (the largest power of two <= this dividing R)


def quantized_matmul_kernel(x_ref,  # [bm, I] float32 / bfloat16
                            q_ref,  # [G, R, bn] int8 values (R = g), or uint8 packed nibbles (R = g/2)
                            scales_ref,  # [G, bn] float
                            mins_ref,  # [G, bn] float (int4), or None (int8)
                            o_ref,  # [bm, bn]
                            *, block_k: int):
    G, R, bn = q_ref.shape
    bm = x_ref.shape[0]
    int4 = mins_ref is not None
    g = 2 * R if int4 else R  # inputs per group
    per_channel = not int4 and G == 1
    dtype = x_ref.dtype  # the dot's operand dtype; accumulation is float32

    def dot(a, b):
        return jnp.dot(a, b, preferred_element_type=jnp.float32)

    def group(j, acc):
        s = scales_ref[pl.ds(j, 1), :].astype(jnp.float32)  # [1, bn]
        m = mins_ref[pl.ds(j, 1), :].astype(jnp.float32) if int4 else None  # [1, bn]

        def chunk(c, acc):
            r0 = pl.multiple_of(c * block_k, block_k)
            q = q_ref[j, pl.ds(r0, block_k), :]  # [bk, bn]
            x_a = x_ref[:, pl.ds(j * g + r0, block_k)]  # [bm, bk]: inputs r0.. of group j
            if int4:
                x_b = x_ref[:, pl.ds(j * g + R + r0, block_k)]  # [bm, bk]: inputs R + r0.. (the high nibbles)
                lo = ((q & 0xF).astype(jnp.float32) * s + m).astype(dtype)  # [bk, bn]
                hi = ((q >> 4).astype(jnp.float32) * s + m).astype(dtype)
                return acc + dot(x_a, lo) + dot(x_b, hi)
            w = q.astype(jnp.float32)
            if not per_channel:
                w = w * s
            return acc + dot(x_a, w.astype(dtype))  # per channel: exact, |q| <= 127

        return jax.lax.fori_loop(0, R // block_k, chunk, acc)

    acc = jax.lax.fori_loop(0, G, group, jnp.zeros((bm, bn), jnp.float32))  # [bm, bn]
    if per_channel:
        acc = acc * scales_ref[...].astype(jnp.float32)  # [1, bn]: the channel scales, once
    o_ref[...] = acc.astype(o_ref.dtype)


def _quantized_matmul_call(x, q, scales, mins, *, block_m, block_n, block_k, out_dtype, num_warps, num_stages,
                           interpret):
    M, I = x.shape
    G, R, O = q.shape

    def strip(a):  # all of the weight's rows, one block of its O columns
        if a is None:
            return None
        return pl.BlockSpec((*a.shape[:-1], block_n), lambda i, j, n=a.ndim - 1: (*(0,) * n, j))

    kind = "int4" if mins is not None else "int8"
    return pl.pallas_call(
        functools.partial(quantized_matmul_kernel, block_k=block_k),
        grid=(M // block_m, O // block_n),
        in_specs=[pl.BlockSpec((block_m, I), lambda i, j: (i, 0)), strip(q), strip(scales), strip(mins)],
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((M, O), out_dtype),
        compiler_params=triton_compiler_params(num_warps, num_stages),
        interpret=interpret,
        name=f"quantized_matmul_{kind}_G{G}_R{R}_bm{block_m}_bn{block_n}_bk{block_k}",
    )(x, q, scales, mins)


def _arrays(w: QuantizedWeight):
    """(q [G, R, O], scales [G, O], mins [G, O] or None, inputs per group g)."""
    if isinstance(w, Int8Weight):
        return w.values, w.scales, None, w.values.shape[1]
    if isinstance(w, Int4Weight):
        return w.packed, w.scales, w.mins, 2 * w.packed.shape[1]
    raise ValueError(f"quantized_matmul takes an Int8Weight or Int4Weight; got {type(w).__name__}")


def default_block_k(rows: int) -> int:
    """The largest power of two <= MAX_BLOCK_K that divides a group's stored rows (R = g, or g/2 for int4)."""
    return math.gcd(rows, MAX_BLOCK_K)


def default_block_m(num_tokens: int) -> int:
    """16 for decode-sized M (Triton's smallest dot), up to 64 rows for prefill; a guess, not tuned."""
    return min(64, max(16, 1 << max(0, num_tokens - 1).bit_length()))


def supported_block_n(num_outputs: int) -> int | None:
    """The largest of 128, 64, 32, 16 dividing O, or None (then use `qdot`)."""
    return next((b for b in (128, 64, 32, 16) if num_outputs % b == 0), None)


def validate(x: jax.Array, w: QuantizedWeight, block_m: int, block_n: int, block_k: int | None) -> int:
    """Raises ValueError on unsupported shapes; returns the block_k to use."""
    q, scales, mins, g = _arrays(w)
    if x.ndim != 2 or q.ndim != 3 or w.out_ndim != 1:
        raise ValueError(f"expected x [M, I] and one layer's weight with one out axis, [G, R, O]; got x {x.shape}, "
                         f"weight {q.shape} (out_ndim {w.out_ndim})")
    G, R, O = q.shape
    if x.shape[1] != G * g:
        raise ValueError(f"x {x.shape} has {x.shape[1]} inputs but the weight {q.shape} has G * g = {G * g}")
    for name, a in (("scales", scales), ("mins", mins)):
        if a is not None and a.shape != (G, O):
            raise ValueError(f"{name} {a.shape} must be [G, O] = {(G, O)} for the weight {q.shape}")
    if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        raise ValueError(f"x must be float32 or bfloat16; got {x.dtype}")
    if block_m < 1 or block_n < 1:
        raise ValueError(f"block_m = {block_m} and block_n = {block_n} must be positive")
    if O % block_n:
        raise ValueError(f"O = {O} of the weight {q.shape} must be a multiple of block_n = {block_n} "
                         f"(M = {x.shape[0]} need not be: it is padded to block_m)")
    block_k = block_k or default_block_k(R)
    if block_k < 1 or R % block_k:
        raise ValueError(f"block_k = {block_k} must divide the {R} stored rows per group of the weight {q.shape}")
    return block_k


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "block_k", "preferred_element_type",
                                             "num_warps", "num_stages", "interpret"))
def quantized_matmul(x: jax.Array, w: QuantizedWeight, *, block_m: int = 16, block_n: int = 128,
                     block_k: int | None = None, preferred_element_type=None, num_warps: int = 4,
                     num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """x @ w for one layer's quantized weight, dequantized tile by tile inside the kernel.

    Args:
      x: [M, I] float32 or bfloat16 activations, any M (padded to a multiple of block_m here).
      w: an `Int8Weight` (values int8 [G, g, O], scales [G, O]; G == 1: per output channel) or an
        `Int4Weight` (packed uint8 [G, g/2, O], scales and mins [G, O]) with out_ndim 1; I = G * g.
        Scales and mins may be float32, bfloat16 or float16.
      block_m, block_n: output tile; O must be a multiple of block_n.
      block_k: stored weight rows per inner step; must divide R (g, or g/2 for int4). Default:
        `default_block_k(R)`.
      preferred_element_type: output dtype (default x's). Accumulation is always float32.
      num_warps, num_stages: Triton launch parameters.
    Returns:
      [M, O] in preferred_element_type or x's dtype.
    """
    block_k = validate(x, w, block_m, block_n, block_k)
    q, scales, mins, _ = _arrays(w)
    M = x.shape[0]
    pad = -M % block_m
    xp = jnp.pad(x, ((0, pad), (0, 0))) if pad else x
    out = _quantized_matmul_call(xp, q, scales, mins, block_m=block_m, block_n=block_n, block_k=block_k,
                                 out_dtype=jnp.dtype(preferred_element_type or x.dtype), num_warps=num_warps,
                                 num_stages=num_stages, interpret=interpret)
    return out[:M]


def quantized_matmul_reference(x: jax.Array, w: QuantizedWeight, *, block_m: int = 16, block_n: int = 128,
                               block_k: int | None = None, preferred_element_type=None, num_warps: int = 4,
                               num_stages: int = 2, interpret: bool = False) -> jax.Array:
    """The same product in plain jnp: the whole weight dequantized in float32, one float32 dot (block sizes and
    launch parameters are accepted and ignored)."""
    del block_m, block_n, block_k, num_warps, num_stages, interpret
    q, _, _, _ = _arrays(w)
    dense = dequantize_weight(w, jnp.float32).reshape(-1, q.shape[-1])  # [I, O]
    out = jnp.dot(x.astype(jnp.float32), dense, precision=jax.lax.Precision.HIGHEST)
    return out.astype(preferred_element_type or x.dtype)
