"""The model's quantized projections through the native CPU kernel (`pallas_kernels.cpu_qmatmul`).

`--quantized-matmul` picks the matmul every projection calls (`llama.forward(matmul=...)`):

    auto    (default) native on the CPU backend with one device when the kernel builds, else xla
    native  the kernel (falls back to xla, logged once, where it cannot build or the CPU lacks AVX512-VNNI)
    xla     `quantization.qdot`: XLA dequantizes (on CPU it writes float32 weights every step) and dots
    pallas  `quantization.qdot_pallas` (GPU; interpret mode on CPU)

With `--activation-quantization int8` the native kernel runs its q8 mode on the int4 weights as stored
(activations in int8 blocks of 32, llama.cpp's Q8_1) instead of the XLA W8A8 path (per-channel int8 weights,
per-token activations).

The layer scan: a custom call's operand that is a dynamic slice of the stacked weights would be copied every
layer, so `llama.forward` keeps quantized weights stacked when the matmul asks for it (`indexes_layers`) and
passes `LayerOf(stack, layer)`; the kernel reads the layer in place. The engine stores those stacks in the
kernel's tiled layout (`tile_layers`: each 32-column tile contiguous, read as one stream).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp

from jaxserve.config import QUANTIZED_MATMULS, cache_dir
from jaxserve.model.quantization import qdot, qdot_w8a8, quantize_int8
from pallas_kernels import cpu_qmatmul
from pallas_kernels.cpu_qmatmul import ColumnTiles
from pallas_kernels.quantized_weights import COMPONENTS, Int4Weight, QuantizedWeight, dequantize_weight, is_quantized


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerOf:
    """Layer `layer` of a quantized weight stacked over layers, not sliced (the kernel indexes it)."""

    stack: QuantizedWeight | ColumnTiles  # [L, G, R, *out] (scales [L, G, *out]), or tiled
    layer: jax.Array  # int32 []

    def take(self) -> QuantizedWeight:
        """The layer's weight in the standard layout (for the XLA fallbacks)."""
        if isinstance(self.stack, ColumnTiles):
            return cpu_qmatmul.untile_columns(self.stack, self.layer)
        return dataclasses.replace(self.stack, **{c: getattr(self.stack, c)[self.layer]
                                                 for c in COMPONENTS[type(self.stack)]})


def layer_stack(w) -> bool:
    """Whether `llama.forward` should pass this layer weight whole with an index (`LayerOf`) to the kernel."""
    return is_quantized(w) or isinstance(w, ColumnTiles)


def tile_layers(weights):
    """The quantized layer stacks of `weights` in the kernel's tiled layout (one stack at a time, each donated,
    so the copy costs one stack of memory at most). For the native matmul at one device only."""
    layers = weights.layers
    tiled = {}
    with warnings.catch_warnings():
        # NOTE: a stack whose O is not a multiple of 32 grows by its padding, so XLA cannot reuse the donated
        # buffer for the result and says so; it still frees it.
        warnings.filterwarnings("ignore", "Some donated buffers were not usable")
        for f in dataclasses.fields(layers):
            w = getattr(layers, f.name)
            if is_quantized(w):
                tiled[f.name] = jax.jit(cpu_qmatmul.tile_columns, donate_argnums=0)(w)
    return dataclasses.replace(weights, layers=dataclasses.replace(layers, **tiled))


def available() -> bool:
    """The kernel builds and loads here, on the CPU backend (logs why not, once)."""
    return jax.default_backend() == "cpu" and cpu_qmatmul.available(cache_dir() / "kernels")


def resolve(choice: str, num_devices: int) -> str:
    """`--quantized-matmul` as it will run: auto → native or xla; native → xla where the kernel cannot run."""
    if choice not in QUANTIZED_MATMULS:
        raise ValueError(f"quantized_matmul must be one of {QUANTIZED_MATMULS}; got {choice!r}")
    if choice == "native" and jax.default_backend() != "cpu":
        raise ValueError(f"--quantized-matmul native is a CPU kernel; this backend is {jax.default_backend()}")
    if choice == "native" and num_devices > 1:  # NOTE: XLA does not partition a custom call
        raise ValueError("--quantized-matmul native runs on one device only")
    if choice in ("auto", "native"):
        return "native" if num_devices == 1 and available() else "xla"
    return choice


def _native(spec: str, x: jax.Array, w, q8: bool, valid_rows=None, **einsum_kwargs) -> jax.Array:
    """x [*batch, *in] times one layer's quantized weight → [*batch, *out], through the kernel when it applies.

    `valid_rows` (int32 scalar, traced): with one batch axis, only its first `valid_rows` entries are real (a
    step's tokens before its padding); the kernel skips the rest and returns zeros there."""
    stack, layer = (w.stack, w.layer) if isinstance(w, LayerOf) else (w, None)
    plain = w.take() if isinstance(w, LayerOf) else w
    fallback = qdot_w8a8 if q8 else qdot
    if not layer_stack(stack) or set(einsum_kwargs) - {"preferred_element_type"} or x.dtype != jnp.float32:
        return fallback(spec, x, plain, **einsum_kwargs)
    inner = stack.weight if isinstance(stack, ColumnTiles) else stack
    in_shape = tuple(inner.in_shape)
    if isinstance(stack, ColumnTiles):  # a layer stack, laid out for the kernel already
        lead, kernel_weight, out_shape = 1, stack, stack.out_shape
    else:
        first = stack.packed if isinstance(stack, Int4Weight) else stack.values
        lead = first.ndim - stack.out_ndim - 2  # 1 for a stack, 0 for one weight (the LM head)
        out_shape = first.shape[first.ndim - stack.out_ndim:]

        # [L, G, R, *out] → [L, G, R, O], scales [L, G, O]: reshapes of contiguous arrays (no copies); one weight
        # (the LM head) gets a layer axis of 1.
        def flat(a: jax.Array) -> jax.Array:
            a = a.reshape(*a.shape[:a.ndim - stack.out_ndim], -1)
            return a if lead else a[None]

        arrays = {c: flat(getattr(stack, c)) for c in COMPONENTS[type(stack)]}
        kernel_weight = dataclasses.replace(stack, **arrays, in_shape=(math.prod(in_shape),), out_ndim=1)
    if lead != (0 if layer is None else 1) or tuple(x.shape[x.ndim - len(in_shape):]) != in_shape:
        return fallback(spec, x, plain, **einsum_kwargs)
    use_q8 = q8 and isinstance(inner, Int4Weight) and inner.group_size % 32 == 0
    batch = x.shape[:x.ndim - len(in_shape)]
    rows = valid_rows if len(batch) == 1 else None
    y = cpu_qmatmul.cpu_qmatmul(x.reshape(-1, math.prod(in_shape)), kernel_weight, 0 if layer is None else layer,
                                q8=use_q8, rows=rows)
    return y.reshape(*batch, *out_shape).astype(einsum_kwargs.get("preferred_element_type") or x.dtype)


def qdot_native(spec: str, x: jax.Array, w, valid_rows=None, **einsum_kwargs) -> jax.Array:
    """`qdot` with quantized weights through the native kernel's exact mode (float32 activations)."""
    return _native(spec, x, w, False, valid_rows, **einsum_kwargs)


def qdot_native_q8(spec: str, x: jax.Array, w, valid_rows=None, **einsum_kwargs) -> jax.Array:
    """`qdot_w8a8` with int4 weights (groups of 32k) through the kernel's q8 mode (int8 activation blocks)."""
    return _native(spec, x, w, True, valid_rows, **einsum_kwargs)


# `llama.forward` keeps quantized weights stacked for these (see the module docstring), and passes the step's
# real token count as `valid_rows` to the layers' projections (padding tokens are not multiplied).
for _fn in (qdot_native, qdot_native_q8):
    _fn.indexes_layers = True
    _fn.skips_padding = True


def lossless_int8_head(weights, infos):
    """The dense embedding (and untied LM head) as int8 in groups of 32 where that represents it exactly, so the
    LM head reads a quarter of the bytes through the kernel. A GGUF Q8_0 table is such a case: each of its values
    is q * d with q an int8 and one float16 d per 32, and absmax requantizing finds the same q and d (127 * d
    and (127 * d) / 127 are exact in float32). Any other table stays as it is (checked bit for bit).

    Args:
      weights: the `LlamaWeights` tree; infos: its dense description (`llama.weight_info`).
    """
    changes = {}
    for name in ("embed", "lm_head"):
        w, info = getattr(weights, name), getattr(infos, name)
        if w is None or is_quantized(w) or w.dtype != jnp.float32:
            continue
        dense = w.T if info.transpose else w  # [D, V]
        q = quantize_int8(dense, info.contract, group_size=32)
        if bool(jnp.array_equal(dequantize_weight(q, jnp.float32), dense)):
            changes[name] = q
    return dataclasses.replace(weights, **changes)


def prepare(choice: str, num_devices: int, weights, infos):
    """`resolve` plus the lossless int8 head, for loaded weights: returns (matmul as it will run, weights).

    NOTE: builds the kernel only when some weight would use it, so a float model on CPU neither compiles nor
    writes anything under the cache folder.
    """
    if choice not in ("auto", "native") or jax.default_backend() != "cpu" or num_devices > 1:
        return resolve(choice, num_devices), weights
    candidate = lossless_int8_head(weights, infos)
    if not any(is_quantized(w) for w in jax.tree.leaves(candidate, is_leaf=is_quantized)):
        return "xla", weights
    resolved = resolve(choice, num_devices)
    return resolved, candidate if resolved == "native" else weights
