"""The quantized-weight layout the matmul kernel reads: int8 and int4 weights as registered-dataclass pytrees.

A dense projection is [*in, *out]. Quantized, its `in` axes are flattened to I and split into G groups of
g = I / G consecutive inputs, with any leading (layer) axes in front:

    Int8Weight  values int8  [*lead, G, g, *out]     w = values * scales              (symmetric)
                scales       [*lead, G, *out]
    Int4Weight  packed uint8 [*lead, G, g/2, *out]   w = q * scales + mins, q in 0..15 (asymmetric)
                scales, mins [*lead, G, *out]

Byte b of a packed int4 group holds inputs b (low nibble) and b + g/2 (high nibble), the nibble order of
GGUF's Q4_0 / Q4_1 blocks. How weights are quantized, sharded and multiplied by XLA lives in
`jaxserve.model.quantization`, which imports this module; this one imports only JAX.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int8Weight:
    values: jax.Array  # [*lead, G, g, *out] int8
    scales: jax.Array  # [*lead, G, *out] float
    in_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))  # the dense `in` axes
    out_ndim: int = dataclasses.field(metadata=dict(static=True))

    @property
    def group_size(self) -> int:
        return self.values.shape[-self.out_ndim - 1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Int4Weight:
    packed: jax.Array  # [*lead, G, g/2, *out] uint8, two 4-bit values per byte
    scales: jax.Array  # [*lead, G, *out] float
    mins: jax.Array  # [*lead, G, *out] float: the value of q = 0
    in_shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    out_ndim: int = dataclasses.field(metadata=dict(static=True))

    @property
    def group_size(self) -> int:
        return 2 * self.packed.shape[-self.out_ndim - 1]


QuantizedWeight = Int8Weight | Int4Weight
COMPONENTS = {Int8Weight: ("values", "scales"), Int4Weight: ("packed", "scales", "mins")}


def is_quantized(w) -> bool:
    return isinstance(w, (Int8Weight, Int4Weight))


# ------------------------------------------------------------------------------------ int4 packing


def pack_int4(q: jax.Array, axis: int) -> jax.Array:
    """q [..., g, ...] of values 0..15 (any int dtype) → uint8 [..., g/2, ...]: byte b = q[b] | q[b + g/2] << 4."""
    lo, hi = jnp.split(q.astype(jnp.uint8), 2, axis=axis)
    return lo | (hi << 4)


def unpack_int4(packed: jax.Array, axis: int) -> jax.Array:
    """The inverse of `pack_int4`: uint8 [..., g/2, ...] → uint8 [..., g, ...] of values 0..15."""
    return jnp.concatenate([packed & 0xF, packed >> 4], axis=axis)


def dequantize_weight(w: jax.Array | QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """The dense [*lead, *in, *out] weight, computed in float32 and cast to `dtype` (a dense `w` is cast)."""
    if not is_quantized(w):
        return w.astype(dtype)
    first = w.values if isinstance(w, Int8Weight) else w.packed
    g_axis = first.ndim - w.out_ndim - 1
    s = jnp.expand_dims(w.scales.astype(jnp.float32), g_axis)  # [*lead, G, 1, *out]
    if isinstance(w, Int8Weight):
        x = w.values.astype(jnp.float32) * s
    else:
        x = unpack_int4(w.packed, g_axis).astype(jnp.float32) * s + jnp.expand_dims(w.mins.astype(jnp.float32),
                                                                                    g_axis)
    lead = x.shape[:g_axis - 1]
    return x.reshape(*lead, *w.in_shape, *x.shape[g_axis + 1:]).astype(dtype)
