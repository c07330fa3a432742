"""A Llama-family decoder as pure functions over a parameter pytree.

RMSNorm, RoPE (HF "rotate half" layout, optional Llama-3 / linear scaling), GQA, SwiGLU, tied or untied
embeddings, optional Qwen2 qkv biases. The layers are stacked on a leading L axis and run under
`lax.scan`, so compile time does not grow with depth. The KV cache is paged and threaded through the
step: `forward(...)` takes the page array and returns the updated one (jit it with donation).

Shapes use the alphabet of `jaxserve.config`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.model.attention import AttentionFn
from jaxserve.model.native_matmul import LayerOf, layer_stack
from jaxserve.model.quantization import embedding_lookup, qdot, tied_head
from jaxserve.model.sharding import ShardingPlan
from jaxserve.model.step_inputs import SeqChunk, StepInputs, build_step_inputs
from jaxserve.model.weight_info import ArrayInfo, init_arrays
from pallas_kernels.kv_cache import write_kv

MatmulFn = Callable[..., jax.Array]  # qdot's signature: (spec, x, w, **einsum_kwargs) -> y


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerWeights:
    """Every field carries a leading L axis (layers are stacked for `lax.scan`)."""

    attn_norm: jax.Array  # [L, D]
    wq: jax.Array  # [L, D, N, H]
    wk: jax.Array  # [L, D, K, H]
    wv: jax.Array  # [L, D, K, H]
    wo: jax.Array  # [L, N, H, D]
    mlp_norm: jax.Array  # [L, D]
    w_gate: jax.Array  # [L, D, F]
    w_up: jax.Array  # [L, D, F]
    w_down: jax.Array  # [L, F, D]
    bq: jax.Array | None = None  # [L, N, H]  (Qwen2)
    bk: jax.Array | None = None  # [L, K, H]
    bv: jax.Array | None = None  # [L, K, H]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LlamaWeights:
    embed: jax.Array  # [V, D]
    layers: LayerWeights
    final_norm: jax.Array  # [D]
    lm_head: jax.Array | None = None  # [D, V]; None when tied to `embed`


def weight_info(cfg: ModelConfig, dtype=jnp.float32) -> LlamaWeights:
    """Every weight described once (`ArrayInfo`: shape, dtype, logical axes), as a `LlamaWeights` tree.

    Init, abstract shapes, shardings and the quantized variants are functions of this tree
    (`jaxserve.model.weight_info`, `ShardingPlan.shardings`, `quantization.quantize_info`).
    """
    L, D, F, N, K, H, V = (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads,
                           cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size)

    def info(shape, axes, **kw) -> ArrayInfo:
        return ArrayInfo(shape, axes, dtype, **kw)

    norm = info((L, D), ("layers", None), norm=True)
    bias = cfg.attention_bias  # Qwen2
    layers = LayerWeights(
        attn_norm=norm,
        wq=info((L, D, N, H), ("layers", "embed", "heads", None), contract=1),
        wk=info((L, D, K, H), ("layers", "embed", "kv_heads", None), contract=1),
        wv=info((L, D, K, H), ("layers", "embed", "kv_heads", None), contract=1),
        wo=info((L, N, H, D), ("layers", "heads", None, "embed"), contract=2),
        mlp_norm=norm,
        w_gate=info((L, D, F), ("layers", "embed", "ffw"), contract=1),
        w_up=info((L, D, F), ("layers", "embed", "ffw"), contract=1),
        w_down=info((L, F, D), ("layers", "ffw", "embed"), contract=1),
        bq=info((L, N, H), ("layers", "heads", None)) if bias else None,
        bk=info((L, K, H), ("layers", "kv_heads", None)) if bias else None,
        bv=info((L, K, H), ("layers", "kv_heads", None)) if bias else None)
    # NOTE: the embedding [V, D] is quantized as the tied head it also is, [D, V] (one `in` axis: D).
    return LlamaWeights(
        embed=info((V, D), ("vocab", "embed"), contract=1, transpose=True, embedding=True),
        layers=layers,
        final_norm=info((D,), (None,), norm=True),
        lm_head=None if cfg.tie_word_embeddings else info((D, V), ("embed", "vocab"), contract=1, embedding=True))


def init_weights(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, scale: float = 0.05) -> LlamaWeights:
    """Random weights for unit tests (tiny configs); norms start at one, perturbed so they matter."""
    return init_arrays(weight_info(cfg, dtype), key, scale)


# ---------------------------------------------------------------------------------------------- math


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    # NOTE: like HF, normalise in float32 and cast back before scaling by the weight.
    x32 = x.astype(jnp.float32)
    mean_square = row_invariant_sum(x32 * x32)[..., None] / x.shape[-1]
    normed = x32 * jax.lax.rsqrt(mean_square + eps)
    return weight * normed.astype(x.dtype)


def row_invariant_sum(a: jax.Array) -> jax.Array:
    """Sum over the last axis in one fixed order (halving by elementwise adds), whatever the other axes hold.

    NOTE(why): XLA:CPU's own row reduction rounds differently from 8 rows on (one ulp in `rms_norm`), so a
    request's numerics depended on its step's row count; the q8 mode's int8 rounding amplified that to different
    greedy tokens (docs/performance.md, "Weights in column tiles")."""
    n = a.shape[-1]
    while n > 1:
        if n % 2:  # fold the last element into the first
            a = jnp.concatenate([a[..., :1] + a[..., n - 1:n], a[..., 1:n - 1]], axis=-1)
            n -= 1
        a = a[..., :n // 2] + a[..., n // 2:n]
        n //= 2
    return a[..., 0]


def rope_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """Inverse frequencies [H/2], with the config's scaling applied (computed on the host, once)."""
    H = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, H, 2, dtype=np.float64) / H))
    s = cfg.rope_scaling
    if s.kind == "linear":
        inv_freq = inv_freq / s.factor
    elif s.kind == "llama3":
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor)
        scaled = np.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        inv_freq = np.where(mid, (1 - smooth) * inv_freq / s.factor + smooth * inv_freq, scaled)
    return inv_freq.astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """x: [T, heads, H]; positions: [T]. HF layout: the first and second halves of H form the pairs."""
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, H/2]
    cos = jnp.cos(angles).astype(x.dtype)[:, None, :]
    sin = jnp.sin(angles).astype(x.dtype)[:, None, :]
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def forward(weights: LlamaWeights, kv_pages: jax.Array, step: StepInputs, cfg: ModelConfig,
            attention: AttentionFn, plan: ShardingPlan | None = None,
            matmul: MatmulFn = qdot, return_hidden: bool = False) -> tuple[jax.Array, ...]:
    """One model step over a flat batch of tokens from many sequences.

    Args:
      weights: the parameter pytree.
      kv_pages: [L, P, page_size, 2K, H], K and V interleaved per KV head.
      step: token ids, positions, KV slots and page tables (see `StepInputs`).
      attention: the paged-attention implementation (`jaxserve.model.attention_backends.select_attention`).
      plan: the mesh and sharding rules under tensor parallelism (None: one device). It only adds
        `with_sharding_constraint`s by logical axis; XLA derives the collectives from them.
      matmul: every projection's `qdot(spec, x, w)`: `qdot` (XLA), `quantization.qdot_pallas` (the Pallas
        dequantize-in-the-matmul kernel, `--quantized-matmul pallas`) or `native_matmul.qdot_native[_q8]` (the
        native CPU kernel, `--quantized-matmul native`, the default on CPU).
      return_hidden: also return the last layer's output x [T, D] for every token (before the final norm),
        for `lm_head` at other tokens (prompt logprobs).
    Returns:
      (logits [M, V] float32 at `step.logits_indices`, updated kv_pages[, x [T, D]]).
    """
    dtype = weights.final_norm.dtype  # NOTE: norms stay in the model dtype; other weights may be quantized
    inv_freq = rope_inv_freq(cfg)
    scale = 1.0 / math.sqrt(cfg.head_dim)
    # NOTE: the only tensor-parallel lines: sharding constraints by logical axis (see jaxserve.model.sharding).
    shard = (lambda a, axes: a) if plan is None else plan.constrain
    x = shard(embedding_lookup(weights.embed, step.token_ids, dtype), ("batch", "embed"))  # [T, D]

    # NOTE: a matmul that `indexes_layers` (the native CPU kernel) gets each quantized weight's whole layer stack
    # and the index (`native_matmul.LayerOf`): a scan slice handed to a custom call would be copied every layer.
    scanned, stacked = weights.layers, {}
    if getattr(matmul, "indexes_layers", False):
        stacked = {f.name: getattr(scanned, f.name) for f in dataclasses.fields(scanned)
                   if layer_stack(getattr(scanned, f.name))}
        scanned = dataclasses.replace(scanned, **dict.fromkeys(stacked))

    # NOTE: a matmul that `skips_padding` (the native CPU kernel) multiplies only the step's real tokens; padding
    # tokens' projections come back as zeros (their K/V go to the null page, their logits are never read).
    layer_matmul = matmul
    if getattr(matmul, "skips_padding", False):
        layer_matmul = functools.partial(matmul, valid_rows=step.query_starts[-1])

    # NOTE: a backend may bring its own KV write (the native CPU one writes 16-bit pages in place).
    write_pages = getattr(attention, "write_kv", write_kv)

    def layer(carry, layer_in):
        x, kv_pages = carry
        w, layer_idx = layer_in
        if stacked:
            w = dataclasses.replace(w, **{n: LayerOf(a, layer_idx) for n, a in stacked.items()})
        with jax.named_scope("attention"):
            h = rms_norm(x, w.attn_norm, cfg.rms_norm_eps)
            q = layer_matmul("TD,DNH->TNH", h, w.wq)
            k = layer_matmul("TD,DKH->TKH", h, w.wk)
            v = layer_matmul("TD,DKH->TKH", h, w.wv)
            if w.bq is not None:
                q, k, v = q + w.bq, k + w.bk, v + w.bv
            q = shard(q, ("batch", "heads", None))
            k, v = (shard(a, ("batch", "kv_heads", None)) for a in (k, v))
            q = apply_rope(q, step.positions, inv_freq)
            k = apply_rope(k, step.positions, inv_freq)
            kv_pages = write_pages(kv_pages, layer_idx, k, v, step.slot_mapping)
            attn = attention(q, kv_pages, layer_idx, step, scale=scale)  # [T, N, H]
            attn = shard(attn, ("batch", "heads", None))
            x = shard(x + layer_matmul("TNH,NHD->TD", attn.astype(dtype), w.wo), ("batch", "embed"))
        with jax.named_scope("mlp"):
            h = rms_norm(x, w.mlp_norm, cfg.rms_norm_eps)
            gate = layer_matmul("TD,DF->TF", h, w.w_gate)
            up = layer_matmul("TD,DF->TF", h, w.w_up)
            act = shard(jax.nn.silu(gate) * up, ("batch", "ffw"))
            x = shard(x + layer_matmul("TF,FD->TD", act, w.w_down), ("batch", "embed"))
        return (x, kv_pages), None

    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    (x, kv_pages), _ = jax.lax.scan(layer, (x, kv_pages), (scanned, layer_ids))
    logits = shard(lm_head(weights, x[step.logits_indices], cfg, matmul), ("batch", "vocab"))
    return (logits, kv_pages, x) if return_hidden else (logits, kv_pages)


def lm_head(weights: LlamaWeights, x: jax.Array, cfg: ModelConfig, matmul: MatmulFn = qdot) -> jax.Array:
    """Final norm and vocabulary projection: x [M, D] (last layer's output) → logits [M, V] float32."""
    with jax.named_scope("lm_head"):
        h = rms_norm(x, weights.final_norm, cfg.rms_norm_eps)  # [M, D]
        head = tied_head(weights.embed) if weights.lm_head is None else weights.lm_head
        return matmul("MD,DV->MV", h, head, preferred_element_type=jnp.float32)


def kv_cache_shape(cfg: ModelConfig, num_pages: int, page_size: int) -> tuple[int, ...]:
    return (cfg.num_layers, num_pages, page_size, 2 * cfg.num_kv_heads, cfg.head_dim)


def kv_bytes_per_page(cfg: ModelConfig, page_size: int, dtype) -> int:
    """Bytes of one page over all layers; int8 pages add a float32 scale per token and combined head."""
    values = int(np.prod(kv_cache_shape(cfg, 1, page_size)))
    if jnp.dtype(dtype) == jnp.int8:
        return values + values // cfg.head_dim * 4
    return values * jnp.dtype(dtype).itemsize


def sequence_logits(weights: LlamaWeights, cfg: ModelConfig, token_ids: list[int], *,
                    attention: AttentionFn | None = None, page_size: int = 16,
                    matmul: MatmulFn = qdot) -> jax.Array:
    """Logits [T, V] at every position of one sequence, through the paged path (scoring and tests)."""
    from jaxserve.model.attention import paged_attention_xla

    num_pages = -(-len(token_ids) // page_size)
    step = build_step_inputs([SeqChunk(token_ids, 0, list(range(1, num_pages + 1)))], num_tokens=len(token_ids),
                             num_rows=1, page_size=page_size, max_pages_per_seq=num_pages, all_logits=True)
    kv = jnp.zeros(kv_cache_shape(cfg, num_pages + 1, page_size), weights.final_norm.dtype)
    fn = jax.jit(forward, static_argnames=("cfg", "attention", "matmul"))
    logits, _ = fn(weights, kv, jax.tree.map(jnp.asarray, step), cfg, attention or paged_attention_xla,
                   matmul=matmul)
    return logits


ForwardFn = Callable[..., tuple[jax.Array, jax.Array]]
