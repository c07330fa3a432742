"""A native CPU matmul of float32 activations by int4 / int8 group-quantized weights (XLA FFI custom call).

XLA:CPU does not fuse int4 dequantization into its dot: it writes every projection's float32 weights each step,
which made int4 slower than float32 here (docs/performance.md). `cpu_qmatmul.cc` dequantizes in registers
instead and never writes the weights, threads over output columns on XLA's intra-op pool, and has two modes:

* exact (default): float32 FMA; equals `cpu_qmatmul_reference` to float32 rounding.
* q8 (int4 weights, groups of 32k): activations quantized per 32 inputs to int8 (llama.cpp's Q8_1 blocks) and
  multiplied by the 4-bit weights with AVX512-VNNI integer dots; lossy, faster at many rows.

`cpu_build` compiles the .cc on first use; `available()` says False (the caller falls back to XLA) where the
compiler, the ISA (AVX512F/BW/VL/DQ + VNNI) or the backend is missing.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp

from pallas_kernels import cpu_build
from pallas_kernels.quantized_weights import COMPONENTS, Int4Weight, QuantizedWeight

TARGET = "jaxserve_cpu_qmatmul"
TILE = 32  # output columns of a tile (the kernel's work item)


def available(build_dir: str | os.PathLike) -> bool:
    """True if the kernel is built and registered for the CPU backend; logs why not, once."""
    return cpu_build.available("cpu_qmatmul.cc", "JaxserveQMatmul", TARGET, build_dir, "quantized matmul")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ColumnTiles:
    """A layer stack of a quantized weight in the kernel's tiled layout (`tile_columns`): the same values, each
    tile of 32 output columns stored contiguously, so a work item streams its bytes instead of reading 32 of every
    weight row O bytes apart (docs/performance.md: twice as fast at one row on SmolLM2's weights)."""

    weight: QuantizedWeight  # packed / values [L, T, G, R, 32], scales (mins) [L, T, G, 32]
    out_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))  # the dense output axes

    @property
    def columns(self) -> int:  # O; T = ceil(O / 32) tiles, zero past O
        return math.prod(self.out_shape)


def tile_columns(w: QuantizedWeight) -> ColumnTiles:
    """A layer stack [L, G, R, *out] (scales [L, G, *out]) → its tiled layout."""
    out_shape = tuple((w.packed if isinstance(w, Int4Weight) else w.values).shape[-w.out_ndim:])
    O = math.prod(out_shape)
    T = -(-O // TILE)

    def tiles(a: jax.Array) -> jax.Array:  # [L, ..., *out] → [L, T, ..., 32]
        a = a.reshape(*a.shape[:a.ndim - w.out_ndim], O)
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, T * TILE - O)])
        return jnp.moveaxis(a.reshape(*a.shape[:-1], T, TILE), -2, 1)

    arrays = {c: tiles(getattr(w, c)) for c in COMPONENTS[type(w)]}
    return ColumnTiles(dataclasses.replace(w, **arrays, out_ndim=1), out_shape)


def untile_columns(t: ColumnTiles, layer: jax.Array | int | None = None) -> QuantizedWeight:
    """`tile_columns` undone: the [L, G, R, *out] stack, or with `layer` that layer's [G, R, *out]."""
    def untile(a: jax.Array) -> jax.Array:  # [L, T, ..., 32] → [L, ..., *out]
        a = a if layer is None else a[layer][None]
        a = jnp.moveaxis(a, 1, -2)
        a = a.reshape(*a.shape[:-2], -1)[..., :t.columns].reshape(*a.shape[:-2], *t.out_shape)
        return a if layer is None else a[0]

    arrays = {c: untile(getattr(t.weight, c)) for c in COMPONENTS[type(t.weight)]}
    return dataclasses.replace(t.weight, **arrays, out_ndim=len(t.out_shape))


def _check(x: jax.Array, w: QuantizedWeight | ColumnTiles, layer) -> tuple[int, int, int, int]:
    if isinstance(w, ColumnTiles):
        first = w.weight.packed if isinstance(w.weight, Int4Weight) else w.weight.values  # [L, T, G, R, 32]
        if (first.ndim != 5 or first.shape[1] != -(-w.columns // TILE) or first.shape[4] != TILE
                or w.weight.scales.shape != (*first.shape[:3], TILE)):
            raise ValueError(f"cpu_qmatmul: want a [L, T, G, R, 32] weight with [L, T, G, 32] scales for "
                             f"{w.columns} columns; got {first.shape} and {w.weight.scales.shape}")
        (L, _, G, R, _), O, w = first.shape, w.columns, w.weight
    else:
        first = w.packed if isinstance(w, Int4Weight) else w.values  # [L, G, R, O]
        if first.ndim != 4 or w.scales.shape != (first.shape[0], first.shape[1], first.shape[3]):
            raise ValueError(f"cpu_qmatmul: want a [L, G, R, O] weight with [L, G, O] scales; got {first.shape} "
                             f"and {w.scales.shape}")
        L, G, R, O = first.shape
    g = 2 * R if isinstance(w, Int4Weight) else R
    if x.ndim != 2 or x.shape[1] != G * g:
        raise ValueError(f"cpu_qmatmul: x {x.shape} is not [M, {G * g}] (G {G} x g {g})")
    return L, G, R, O


def cpu_qmatmul(x: jax.Array, w: QuantizedWeight | ColumnTiles, layer: jax.Array | int = 0, *, q8: bool = False,
                rows: jax.Array | int | None = None) -> jax.Array:
    """x @ dequantize(w[layer]) with the weight dequantized in registers (load() must have succeeded).

    Args:
      x: float32 [M, I].
      w: `Int4Weight` (packed uint8 [L, G, g/2, O], scales and mins [L, G, O]) or `Int8Weight` (values int8
        [L, G, g, O], scales [L, G, O]); scales float32, float16 or bfloat16; or either as `ColumnTiles`. A
        layer stack is passed whole with the index `layer`, so a scan over layers copies no weight slice.
      layer: int32 scalar index into L.
      q8: quantize x per 32 inputs to int8 and use VNNI dots (int4 with g % 32 == 0 only).
      rows: int32 scalar (may be traced): only x's first `rows` rows are multiplied, the rest of the output is
        zero (a step's padding tokens); default all M.
    Returns:
      float32 [M, O].
    """
    L, G, R, O = _check(x, w, layer)
    tiled = isinstance(w, ColumnTiles)
    w = w.weight if tiled else w
    int4 = isinstance(w, Int4Weight)
    if q8 and not (int4 and (2 * R) % 32 == 0):
        raise ValueError(f"cpu_qmatmul: q8 needs int4 weights in groups of a multiple of 32; got {type(w).__name__} "
                         f"g {2 * R if int4 else R}")
    if x.dtype != jnp.float32:
        raise ValueError(f"cpu_qmatmul: x must be float32, got {x.dtype}")
    data = w.packed if int4 else w.values
    mins = w.mins if int4 else w.scales
    if w.scales.dtype not in (jnp.float32, jnp.float16, jnp.bfloat16) or mins.dtype != w.scales.dtype:
        raise ValueError(f"cpu_qmatmul: scales/mins must share float32, float16 or bfloat16; got {w.scales.dtype}")
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x.shape[0], O), jnp.float32))
    rows = x.shape[0] if rows is None else rows
    return call(x, data, w.scales, mins, jnp.asarray(layer, jnp.int32), jnp.asarray(rows, jnp.int32), int4=int4,
                q8=q8, tiled=tiled)


def quantize_q8_reference(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x float32 [M, I] → (int8 values [M, I], float32 block scales [M, I / 32]), llama.cpp's Q8 blocks."""
    M, I = x.shape
    xb = x.reshape(M, I // 32, 32)
    d = jnp.max(jnp.abs(xb), axis=-1) / 127.0
    inv = jnp.where(d > 0, 1.0 / d, 0.0)
    q = jnp.clip(jnp.round(xb * inv[..., None]), -127, 127).astype(jnp.int8)
    return q.reshape(M, I), d


def cpu_qmatmul_reference(x: jax.Array, w: QuantizedWeight, layer: jax.Array | int = 0, *,
                          q8: bool = False) -> jax.Array:
    """Plain-jnp `cpu_qmatmul`: dequantize the layer in float32 and multiply at HIGHEST precision (q8: x first
    rounded through its Q8 blocks)."""
    _check(x, w, layer)
    if q8:
        q, d = quantize_q8_reference(x)
        x = (q.astype(jnp.float32).reshape(x.shape[0], -1, 32) * d[..., None]).reshape(x.shape)
    if isinstance(w, Int4Weight):
        p = w.packed[layer]  # [G, R, O]
        q = jnp.concatenate([p & 0xF, p >> 4], axis=1).astype(jnp.float32)  # [G, g, O]: low nibbles first
        dense = q * w.scales[layer].astype(jnp.float32)[:, None] + w.mins[layer].astype(jnp.float32)[:, None]
    else:
        dense = w.values[layer].astype(jnp.float32) * w.scales[layer].astype(jnp.float32)[:, None]
    return jnp.dot(x, dense.reshape(-1, dense.shape[-1]), precision=jax.lax.Precision.HIGHEST)
