"""The paged KV cache as the kernels see it: plain pages, or int8 pages with per-token-per-head scales.

Layout (shared with JAX's and vLLM's TPU kernels): `[L, P, page_size, 2K, H]`, K and V interleaved per KV
head (index 2k is K of head k, 2k+1 its V), so one page copy brings a token's K and V for every head.

int8 storage keeps one float32 scale per (token, combined head): `scales [L, P, page_size, 2K]`, i.e.
4 bytes per H int8 values (6% on top of H = 64, 3% for H = 128). Quantization is symmetric absmax
(`x ≈ q * scale`, q in [-127, 127]), done once on write; the kernels dequantize on the fly (the K scale
multiplies the logits, the V scale the probabilities) so no dequantized copy of a page ever exists.

`QuantizedKV` duck-types the two operations the XLA path and the dense reference use on a page array,
`.shape` and `kv[layer, pages]` (gather, dequantized to float32), so `jaxserve.model.attention.paged_attention_xla`
and `reference.ragged_paged_attention_reference` run unchanged on an int8 cache.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

INT8_MAX = 127.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QuantizedKV:
    values: jax.Array  # [L, P, page_size, 2K, H] int8
    scales: jax.Array  # [L, P, page_size, 2K] float32, one per token and combined head

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def dtype(self):
        return self.values.dtype

    def __getitem__(self, index) -> jax.Array:
        """Gather pages, dequantized to float32: `kv[layer, pages]` as on a plain page array."""
        return self.values[index].astype(jnp.float32) * self.scales[index][..., None]

    @classmethod
    def zeros(cls, shape: tuple[int, ...]) -> QuantizedKV:
        """An empty cache of logical shape [L, P, page_size, 2K, H]."""
        return cls(jnp.zeros(shape, jnp.int8), jnp.zeros(shape[:-1], jnp.float32))


KVPages = jax.Array | QuantizedKV


def kv_cache_dtype(name: str, model_dtype) -> jnp.dtype:
    """Resolves `--kv-cache-dtype auto|bf16|fp32|int8` (auto: the model's dtype)."""
    names = {"auto": model_dtype, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16, "fp32": jnp.float32,
             "float32": jnp.float32, "int8": jnp.int8}
    if name not in names:
        raise ValueError(f"kv cache dtype must be one of {sorted(names)}; got {name!r}")
    return jnp.dtype(names[name])


def allocate_kv_pages(shape: tuple[int, ...], dtype) -> KVPages:
    """Zeroed pages of logical shape [L, P, page_size, 2K, H]: a plain array, or `QuantizedKV` for int8."""
    if jnp.dtype(dtype) == jnp.int8:
        return QuantizedKV.zeros(shape)
    return jnp.zeros(shape, dtype)


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Symmetric absmax over the last axis: x [..., H] -> (int8 [..., H], float32 scale [...])."""
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1)
    scale = jnp.where(amax > 0, amax / INT8_MAX, 1.0)
    q = jnp.clip(jnp.round(x / scale[..., None]), -INT8_MAX, INT8_MAX).astype(jnp.int8)
    return q, scale


def dequantize_kv(kv_pages: KVPages) -> jax.Array:
    """The whole cache as float32 (tests and references only: it materialises everything)."""
    if isinstance(kv_pages, QuantizedKV):
        return kv_pages.values.astype(jnp.float32) * kv_pages.scales[..., None]
    return kv_pages.astype(jnp.float32)


def write_kv(kv_pages: KVPages, layer: jax.Array, k: jax.Array, v: jax.Array,
             slot_mapping: jax.Array) -> KVPages:
    """Scatters this step's k, v [T, K, H] into their slots of layer `layer`, K and V interleaved per head,
    quantizing on write for int8.

    One fused XLA scatter per array; with the cache donated to the jitted step it updates in place.
    """
    T, K, H = k.shape
    page_size = kv_pages.shape[2]
    page, offset = slot_mapping // page_size, slot_mapping % page_size
    kv = jnp.stack([k, v], axis=2).reshape(T, 2 * K, H)  # [T, 2K, H]
    if isinstance(kv_pages, QuantizedKV):
        q, scale = quantize_kv(kv)  # [T, 2K, H], [T, 2K]
        return QuantizedKV(kv_pages.values.at[layer, page, offset].set(q),
                           kv_pages.scales.at[layer, page, offset].set(scale))
    if jnp.dtype(kv_pages.dtype).itemsize == 2:
        # NOTE: XLA:CPU upcasts a bfloat16 / float16 scatter to float32 and back, copying the whole cache for
        # every layer (16 s a decode step for SmolLM2); the same bits scattered as uint16 update in place.
        # Bitcasts cost nothing on any backend.
        bits = jax.lax.bitcast_convert_type(kv_pages, jnp.uint16)
        new = jax.lax.bitcast_convert_type(kv.astype(kv_pages.dtype), jnp.uint16)
        return jax.lax.bitcast_convert_type(bits.at[layer, page, offset].set(new), kv_pages.dtype)
    return kv_pages.at[layer, page, offset].set(kv.astype(kv_pages.dtype))
