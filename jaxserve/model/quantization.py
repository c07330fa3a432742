"""Weight-only quantization: int8 and int4 weights that stay quantized in device memory.

Decode is memory-bandwidth-bound, so the bytes of weights read per step are the cost. A quantized weight
is a registered-dataclass pytree that replaces a dense projection weight in `LlamaWeights`; `qdot` is the
one matmul the model calls, and it accepts either kind.

Layout. A dense projection is [*in, *out] (wq [D, N, H], wo [N, H, D], w_down [F, D]; its
`ArrayInfo.contract` counts the `in` axes). Quantized, its `in` axes are flattened to I and split into
G groups of g = I / G consecutive inputs, with layers stacked in front as usual:

    Int8Weight  values int8  [L, G, g, *out]     w = values * scales              (symmetric)
                scales       [L, G, *out]
    Int4Weight  packed uint8 [L, G, g/2, *out]   w = q * scales + mins, q in 0..15 (asymmetric)
                scales, mins [L, G, *out]

int8 defaults to one group (G = 1: per output channel); int4 to g = 128 along the input dimension (lowered
to the largest even divisor of I where 128 does not divide it: `effective_group`). Byte b
of a packed int4 group holds inputs b (low nibble) and b + g/2 (high nibble): exactly the nibble order of
GGUF's Q4_0 / Q4_1 blocks, so those (g = 32) repack by copying bytes (`checkpoints_conv.gguf_quant`).

The embedding table is quantized as the tied LM head it also is, [D, V] (in = D, out = V): a token lookup
gathers columns (`embedding_lookup`), and the head needs no transpose (`tied_head`).

Tensor parallelism: scales and mins carry the same logical axis names as the values they scale (the out
axes, and the group axis G, named after the weight's first input axis), so `ShardingRules` maps them the
same way and each device holds exactly the scales of its own shard; `quantized_info` gives the names.
Row-parallel weights (wo over heads, w_down over ffw) shard G, which needs (I / tp) % g == 0; with a
single group (per-channel int8) the input axis name sits on g instead and the scales are replicated.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.model.weight_info import ArrayInfo
from pallas_kernels.quantized_matmul import default_block_m, quantized_matmul, supported_block_n
from pallas_kernels.quantized_weights import (
    COMPONENTS,
    Int4Weight,
    Int8Weight,
    QuantizedWeight,
    dequantize_weight,
    is_quantized,
    pack_int4,
)

SCHEMES = ("none", "int8", "int4")
INT8_MAX = 127
INT4_MAX = 15
INT4_GROUP = 128  # default int4 group along the input dimension
# NOTE: below this many rows (tokens) XLA:CPU's int8 dot is slower than a float one (0.43 vs 0.20 ms for one
# token through a 576 x 1536 weight), so W8A8 keeps small decode steps in float: they are also exact.
W8A8_MIN_ROWS = 8
SCHEME_OF = {Int8Weight: "int8", Int4Weight: "int4"}


def scheme_of(w: Any) -> str:
    return SCHEME_OF.get(type(w), "none")


# ---------------------------------------------------------------------------------- quantize / dequantize


def effective_group(num_inputs: int, group_size: int | None) -> int:
    """The group size used for a weight of `num_inputs` inputs: `group_size` (None: all inputs), or where it
    does not divide them, the largest even divisor below it (SmolLM2's D = 576 takes 96 for 128)."""
    if not group_size or group_size >= num_inputs:
        return num_inputs
    for g in range(group_size - group_size % 2, 1, -2):
        if num_inputs % g == 0:
            return g
    raise ValueError(f"no even group size <= {group_size} divides {num_inputs} inputs")


def _grouped(w: jax.Array, in_ndim: int, lead_ndim: int, group_size: int | None):
    """w [*lead, *in, *out] → (float32 [*lead, G, g, *out], in_shape, out_ndim)."""
    in_shape = tuple(w.shape[lead_ndim:lead_ndim + in_ndim])
    out_shape = tuple(w.shape[lead_ndim + in_ndim:])
    size = math.prod(in_shape)
    g = effective_group(size, group_size)
    x = jnp.asarray(w, jnp.float32).reshape(*w.shape[:lead_ndim], size // g, g, *out_shape)
    return x, in_shape, len(out_shape)


# NOTE: jitted so that quantizing a model while loading compiles one program per weight shape, instead of
# dispatching (and compiling) each op eagerly.
@functools.partial(jax.jit, static_argnames=("in_ndim", "lead_ndim", "group_size", "scale_dtype"))
def quantize_int8(w: jax.Array, in_ndim: int, *, lead_ndim: int = 0, group_size: int | None = None,
                  scale_dtype=jnp.float32) -> Int8Weight:
    """Symmetric absmax int8 over groups of `group_size` inputs (None: all of them, i.e. per output channel).

    Args:
      w: dense [*lead, *in, *out]; `in_ndim` and `lead_ndim` count the `in` and leading (layer) axes.
    Returns:
      an `Int8Weight` with |dequantize(q) - w| <= scale / 2 elementwise. A group size that does not divide
      the inputs is lowered to one that does (`effective_group`).
    """
    x, in_shape, out_ndim = _grouped(w, in_ndim, lead_ndim, group_size)
    g_axis = lead_ndim + 1
    amax = jnp.max(jnp.abs(x), axis=g_axis)
    scales = jnp.where(amax > 0, amax / INT8_MAX, 1.0).astype(scale_dtype)
    # NOTE: round against the stored (possibly rounded) scale, so the error bound holds for what is stored.
    q = jnp.round(x / jnp.expand_dims(scales.astype(jnp.float32), g_axis))
    values = jnp.clip(q, -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return Int8Weight(values, scales, in_shape, out_ndim)


@functools.partial(jax.jit, static_argnames=("in_ndim", "lead_ndim", "group_size", "scale_dtype"))
def quantize_int4(w: jax.Array, in_ndim: int, *, lead_ndim: int = 0, group_size: int = INT4_GROUP,
                  scale_dtype=jnp.float32) -> Int4Weight:
    """Asymmetric (min/max) int4 over groups of `group_size` consecutive inputs, packed two per byte.

    Args:
      w: dense [*lead, *in, *out]; `in_ndim` and `lead_ndim` count the `in` and leading (layer) axes.
    Returns:
      an `Int4Weight` with |dequantize(q) - w| <= scale / 2 elementwise (float32 scales).
    """
    if group_size % 2:
        raise ValueError(f"int4 group size must be even (two values per byte), got {group_size}")
    x, in_shape, out_ndim = _grouped(w, in_ndim, lead_ndim, group_size)
    g_axis = lead_ndim + 1
    lo, hi = jnp.min(x, axis=g_axis), jnp.max(x, axis=g_axis)
    scales = jnp.where(hi > lo, (hi - lo) / INT4_MAX, 1.0).astype(scale_dtype)
    mins = lo.astype(scale_dtype)
    s, m = (jnp.expand_dims(a.astype(jnp.float32), g_axis) for a in (scales, mins))
    q = jnp.clip(jnp.round((x - m) / s), 0, INT4_MAX)
    return Int4Weight(pack_int4(q, g_axis), scales, mins, in_shape, out_ndim)


def quantize(w: jax.Array, scheme: str, in_ndim: int, *, lead_ndim: int = 0, group_size: int | None = None,
             scale_dtype=jnp.float32) -> jax.Array | QuantizedWeight:
    """`quantize_int8` / `quantize_int4` by name ("none" returns `w`); group_size None: the scheme's default."""
    if scheme == "int8":
        return quantize_int8(w, in_ndim, lead_ndim=lead_ndim, group_size=group_size, scale_dtype=scale_dtype)
    if scheme == "int4":
        return quantize_int4(w, in_ndim, lead_ndim=lead_ndim, group_size=group_size or INT4_GROUP,
                             scale_dtype=scale_dtype)
    if scheme == "none":
        return w
    raise ValueError(f"quantization scheme must be one of {SCHEMES}; got {scheme!r}")


# ------------------------------------------------------------------------------------- the matmul


def qdot(spec: str, x: jax.Array, w: jax.Array | QuantizedWeight, **einsum_kwargs) -> jax.Array:
    """`jnp.einsum(spec, x, w)` for a dense or quantized `w`, where x's contracted axes are its last ones and
    w's out axes end the output (true of every projection in llama.py).

    Per-channel int8 (one group) multiplies the scales into the output: einsum over the int8 values converted
    to x's dtype (exact: |q| <= 127), then one [*out] multiply. Grouped int8 and int4 dequantize group by
    group and contract x [..., G, g] with the [G, g, *out] weight in one dot; int4 does it as two dots, over
    the low and the high nibbles (x's first and second half of each group), so no unpacked copy is built.
    All of it is plain XLA: the convert / mask / shift / scale chain is elementwise on the weight operand,
    which XLA can fuse into the dot's operand read (on CPU it does for the layer projections, not for the LM
    head: docs/quantization.md). Dequantization is in float32, rounded once to x's dtype.

    bfloat16 x accumulates in float32 and rounds the result once to bfloat16, as GPUs and TPUs do anyway.
    NOTE: on CPU this is also the fast path: XLA:CPU runs bf16 x bf16 -> f32 dots on AMX / AVX512-BF16 (about
    4x a float32 dot at 512 rows here), but bf16 x bf16 -> bf16 dots about 4x slower than float32.
    """
    if jnp.dtype(x.dtype) == jnp.bfloat16 and einsum_kwargs.get("preferred_element_type") is None:
        return qdot(spec, x, w, **einsum_kwargs, preferred_element_type=jnp.float32).astype(jnp.bfloat16)
    if not is_quantized(w):
        return jnp.einsum(spec, x, w, **einsum_kwargs)
    n_out, in_shape = w.out_ndim, w.in_shape
    if tuple(x.shape[x.ndim - len(in_shape):]) != tuple(in_shape):
        raise ValueError(f"qdot {spec!r}: x {tuple(x.shape)} does not end in the weight's inputs {in_shape}")
    if isinstance(w, Int8Weight) and _per_channel(w):
        values, scales = _per_channel_arrays(w)
        y = jnp.einsum(spec, x, values.astype(x.dtype), **einsum_kwargs)
        return y * scales.astype(y.dtype)
    if (w.values if isinstance(w, Int8Weight) else w.packed).ndim != n_out + 2:
        raise ValueError("qdot takes one layer's weight (inside the layer scan), not a stacked one")
    kwargs = {"preferred_element_type": einsum_kwargs.get("preferred_element_type")}
    batch = x.shape[:x.ndim - len(in_shape)]
    # NOTE: dequantize in float32 and round once to x's dtype, as a dense weight of that dtype would be
    # (float16 GGUF scales do not fit bfloat16).
    s = w.scales.astype(jnp.float32)[:, None]  # [G, 1, *out]
    if isinstance(w, Int8Weight):
        G, g = w.values.shape[:2]
        dense = (w.values.astype(jnp.float32) * s).astype(x.dtype)  # [G, g, *out]
        return jnp.tensordot(x.reshape(*batch, G, g), dense, axes=2, **kwargs)
    G, half = w.packed.shape[:2]
    m = w.mins.astype(jnp.float32)[:, None]
    xg = x.reshape(*batch, G, 2, half)
    lo = ((w.packed & 0xF).astype(jnp.float32) * s + m).astype(x.dtype)  # inputs b of each group
    hi = ((w.packed >> 4).astype(jnp.float32) * s + m).astype(x.dtype)  # inputs b + g/2
    return (jnp.tensordot(xg[..., 0, :], lo, axes=2, **kwargs)
            + jnp.tensordot(xg[..., 1, :], hi, axes=2, **kwargs))


def w8a8_weights(weights, infos, dtype, quantize_embeddings: bool = False):
    """Every projection (and with `quantize_embeddings` the embedding) as int8 per output channel, what
    `qdot_w8a8` multiplies in int8; weights stored in another scheme or group size are dequantized and
    quantized again. NOTE: the embedding stays as stored by default: a one-token step reads the float LM
    head at memory speed, but an int8 one converts it first (13 ms against 7 ms for SmolLM2 here)."""
    spec = QuantSpec("int8", "int8" if quantize_embeddings else "none", int8_group_size=0)

    def one(info: ArrayInfo, w):
        if spec.scheme_for(info) == "none" or (isinstance(w, Int8Weight) and _per_channel(w)):
            return w
        if is_quantized(w):
            w = dequantize_weight(w, dtype)
            w = w.T if info.transpose else w  # back to the description's layout (embed [V, D])
        return quantize_weights(w, info, spec)

    return jax.tree.map(one, infos, weights)


def _per_channel(w: Int8Weight) -> bool:
    return w.values.shape[-w.out_ndim - 2] == 1


def _per_channel_arrays(w: Int8Weight) -> tuple[jax.Array, jax.Array]:
    """A one-group int8 weight as a plain einsum operand: values [*lead, *in, *out], scales [*lead, *out]."""
    n_out = w.out_ndim
    values = w.values.reshape(*w.values.shape[:-n_out - 2], *w.in_shape, *w.values.shape[-n_out:])
    return values, w.scales.reshape(w.scales.shape[:-n_out - 1] + w.scales.shape[-n_out:])


def qdot_w8a8(spec: str, x: jax.Array, w: jax.Array | QuantizedWeight, **einsum_kwargs) -> jax.Array:
    """`qdot` with x quantized to int8 on the fly (symmetric absmax per token over the contracted axes) for an
    int8 per-channel weight: one int8 x int8 -> int32 dot, then one multiply by both scales. Other weights go
    to `qdot`.

    `--activation-quantization int8` (W8A8, as llama.cpp multiplies its Q4/Q8 blocks by Q8 activations): on
    CPUs with AVX512-VNNI XLA runs these dots about 2x (16 rows) to 10x (512 rows) faster than float32, at the
    price of rounding activations to 8 bits (docs/quantization.md gives the measured quality).
    """
    if not (isinstance(w, Int8Weight) and _per_channel(w)) or set(einsum_kwargs) - {"preferred_element_type"}:
        return qdot(spec, x, w, **einsum_kwargs)
    n_out, in_shape = w.out_ndim, w.in_shape
    if x.size // math.prod(in_shape) < W8A8_MIN_ROWS:
        return qdot(spec, x, w, **einsum_kwargs)  # exact float activations: faster than an int8 GEMV on CPU
    if tuple(x.shape[x.ndim - len(in_shape):]) != tuple(in_shape):
        raise ValueError(f"qdot_w8a8 {spec!r}: x {tuple(x.shape)} does not end in the weight's inputs {in_shape}")
    batch = x.shape[:x.ndim - len(in_shape)]
    values, scales = _per_channel_arrays(w)
    scales = scales.astype(jnp.float32)
    xf = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(xf), axis=tuple(range(len(batch), x.ndim)))  # [*batch]
    sx = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
    xq = jnp.clip(jnp.round(xf / sx.reshape(*batch, *(1,) * len(in_shape))), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    y = jnp.einsum(spec, xq, values, preferred_element_type=jnp.int32).astype(jnp.float32)
    y = y * sx.reshape(*batch, *(1,) * n_out) * scales
    return y.astype(einsum_kwargs.get("preferred_element_type") or x.dtype)


def qdot_pallas(spec: str, x: jax.Array, w: jax.Array | QuantizedWeight, *, interpret: bool | None = None,
                **einsum_kwargs) -> jax.Array:
    """`qdot` through the Pallas kernel (`pallas_kernels.quantized_matmul`) for one layer's quantized weight:
    x [*batch, *in] → [M, I], the weight's out axes → O, and the result back to [*batch, *out]. Dense
    weights, stacked ones, x neither float32 nor bfloat16, O without a block size dividing it, and other
    einsum options go to `qdot`.

    `--quantized-matmul pallas`, one device only (XLA does not partition a pallas_call); `interpret`
    defaults to True exactly on CPU (correctness only there).
    """
    if (not is_quantized(w) or set(einsum_kwargs) - {"preferred_element_type"}
            or jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))):
        return qdot(spec, x, w, **einsum_kwargs)
    first = w.values if isinstance(w, Int8Weight) else w.packed  # [G, R, *out] for one layer
    in_shape, out_shape = tuple(w.in_shape), first.shape[2:]
    block_n = supported_block_n(math.prod(out_shape))
    if first.ndim != w.out_ndim + 2 or tuple(x.shape[x.ndim - len(in_shape):]) != in_shape or block_n is None:
        return qdot(spec, x, w, **einsum_kwargs)
    flat = {c: getattr(w, c).reshape(*getattr(w, c).shape[:-w.out_ndim], -1) for c in COMPONENTS[type(w)]}
    w2 = dataclasses.replace(w, **flat, in_shape=(math.prod(in_shape),), out_ndim=1)  # [G, R, O], [G, O]
    batch = x.shape[:x.ndim - len(in_shape)]
    x2 = x.reshape(-1, math.prod(in_shape))  # [M, I]
    y = quantized_matmul(x2, w2, block_m=default_block_m(x2.shape[0]), block_n=block_n,
                         preferred_element_type=einsum_kwargs.get("preferred_element_type"),
                         interpret=jax.default_backend() == "cpu" if interpret is None else interpret)
    return y.reshape(*batch, *out_shape)


def embedding_lookup(embed: jax.Array | QuantizedWeight, token_ids: jax.Array, dtype) -> jax.Array:
    """Rows [T, D] of the embedding table: dense [V, D], or quantized as the head [D, V] (columns gathered)."""
    if not is_quantized(embed):
        return embed[token_ids]
    cols = {name: jnp.take(getattr(embed, name), token_ids, axis=-1) for name in COMPONENTS[type(embed)]}
    return dequantize_weight(dataclasses.replace(embed, **cols), dtype).T  # [D, T] → [T, D]


def tied_head(embed: jax.Array | QuantizedWeight) -> jax.Array | QuantizedWeight:
    """The LM head [D, V] of tied embeddings: the transpose of a dense table; a quantized table already is it."""
    return embed if is_quantized(embed) else embed.T


def weight_bytes(tree) -> int:
    """Bytes of every array in a pytree (weights as they sit in device memory)."""
    return sum(int(a.size) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(tree))


# ----------------------------------------------------------------------- which weights, and their layout


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Which weights are quantized how. Projections: q/k/v/o, gate/up/down; embeddings: embed and lm_head.

    Norms (and biases) always stay in full precision.
    """

    weights: str = "none"  # scheme of the projections: none | int8 | int4
    embeddings: str = "none"  # scheme of embed and lm_head
    int8_group_size: int = 0  # 0: per output channel (one group)
    int4_group_size: int = INT4_GROUP
    scale_dtype: str = "float32"  # of scales and mins; GGUF repacks keep the file's float16

    def __post_init__(self):
        for name in ("weights", "embeddings"):
            if getattr(self, name) not in SCHEMES:
                raise ValueError(f"QuantSpec.{name} must be one of {SCHEMES}; got {getattr(self, name)!r}")
        if self.int8_group_size < 0 or self.int4_group_size <= 0 or self.int4_group_size % 2:
            raise ValueError(f"bad group sizes: int8 {self.int8_group_size} (0: per channel), "
                             f"int4 {self.int4_group_size} (positive, even)")
        if self.scale_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"scale_dtype must be float32, bfloat16 or float16; got {self.scale_dtype!r}")

    @property
    def active(self) -> bool:
        return self.weights != "none" or self.embeddings != "none"

    def scheme_for(self, info: ArrayInfo) -> str:
        """The scheme of a weight ("none" for norms, biases and anything that is not a matmul)."""
        if info.embedding:
            return self.embeddings
        return self.weights if info.contract > 0 else "none"

    def group_size(self, scheme: str) -> int | None:
        return (self.int8_group_size or None) if scheme == "int8" else self.int4_group_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> QuantSpec:
        return cls(**(d or {}))


def quantized_info(info: ArrayInfo, scheme: str, group_size: int | None,
                   scale_dtype) -> ArrayInfo | QuantizedWeight:
    """One weight's description quantized: an `Int8Weight` / `Int4Weight` whose arrays are `ArrayInfo`s
    (shape, dtype and logical axes of values / packed, scales and mins). "none" returns `info`."""
    if scheme == "none":
        return info
    shape, axes = (info.shape[::-1], info.axes[::-1]) if info.transpose else (info.shape, info.axes)
    lead, n_in = info.lead, info.contract
    in_shape, out_shape = shape[lead:lead + n_in], shape[lead + n_in:]
    size = math.prod(in_shape)
    g = effective_group(size, group_size)
    G = size // g
    lead_shape, lead_axes, out_axes = shape[:lead], axes[:lead], axes[lead + n_in:]
    in_name = axes[lead]  # the first input axis: the outermost part of the flattened I
    g_axes = (in_name, None) if G > 1 else (None, in_name)
    scales = ArrayInfo((*lead_shape, G, *out_shape), (*lead_axes, g_axes[0], *out_axes), scale_dtype)
    layout = dict(in_shape=tuple(in_shape), out_ndim=len(out_shape))
    if scheme == "int8":  # values [*lead, G, g, *out]
        values = ArrayInfo((*lead_shape, G, g, *out_shape), (*lead_axes, *g_axes, *out_axes), jnp.int8)
        return Int8Weight(values, scales, **layout)
    packed = ArrayInfo((*lead_shape, G, g // 2, *out_shape), (*lead_axes, *g_axes, *out_axes), jnp.uint8)
    return Int4Weight(packed, scales, scales, **layout)


def quantize_info(infos, spec: QuantSpec):
    """The description of the weights `spec` quantizes, quantized (scales in `spec.scale_dtype`)."""
    return jax.tree.map(lambda i: quantized_info(i, spec.scheme_for(i), spec.group_size(spec.scheme_for(i)),
                                                 spec.scale_dtype), infos)


def info_like(infos, weights):
    """The description of `weights` as they are: each quantized weight by its own scheme, group size and scale
    dtype (after `engine_quantization` these may differ weight by weight)."""
    return jax.tree.map(lambda i, w: quantized_info(i, scheme_of(w), w.group_size, w.scales.dtype)
                        if is_quantized(w) else i, infos, weights)


def quantize_weights(weights, infos, spec: QuantSpec):
    """Quantizes the dense weights that `spec` names; others (and quantized ones) pass through."""

    def one(info: ArrayInfo, w):
        scheme = spec.scheme_for(info)
        if scheme == "none" or is_quantized(w):
            return w
        return quantize(w.T if info.transpose else w, scheme, info.contract, lead_ndim=info.lead,
                        group_size=spec.group_size(scheme), scale_dtype=jnp.dtype(spec.scale_dtype))

    return jax.tree.map(one, infos, weights)


def dequantize_weights(weights, infos, dtype):
    """Every quantized weight back to dense `dtype` (embed back to [V, D])."""

    def one(info: ArrayInfo, w):
        if not is_quantized(w):
            return w
        w = dequantize_weight(w, dtype)
        return w.T if info.transpose else w

    return jax.tree.map(one, infos, weights)


def np_tree(tree):
    """A pytree of host numpy arrays (for writing checkpoints)."""
    return jax.tree.map(np.asarray, tree)


def engine_quantization(weights, infos, quantization: str, quantize_embeddings: bool, dtype):
    """The engine's `--quantization` applied to loaded weights (a tree like `infos`, the dense description).

    auto: as stored. none: every weight dequantized to `dtype`. int8 / int4: the projections (and, with
    `quantize_embeddings`, embed and lm_head) in that scheme at its default group size; a weight already
    stored in that scheme (e.g. a repacked GGUF) is kept as it is, one stored in another is dequantized and
    quantized again. Weights the request leaves out stay as stored.
    """
    if quantization == "auto":
        return weights
    if quantization == "none":
        return dequantize_weights(weights, infos, dtype)
    spec = QuantSpec(quantization, quantization if quantize_embeddings else "none")

    def one(info: ArrayInfo, w):
        scheme = spec.scheme_for(info)
        if scheme == "none" or scheme_of(w) == scheme:
            return w
        return quantize_weights(dequantize_weights(w, info, dtype), info, spec)

    return jax.tree.map(one, infos, weights)
