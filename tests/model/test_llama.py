"""The tiny random Llama: paged prefill + chunked prefill + decode equals one full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.config import ModelConfig, RopeScaling
from jaxserve.model import llama
from jaxserve.model.attention import paged_attention_xla
from jaxserve.model.step_inputs import SeqChunk, build_step_inputs

PAGE = 4


def tiny_config(**overrides):
    base = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                head_dim=8, rope_theta=500.0, max_position_embeddings=256)
    return ModelConfig(**{**base, **overrides})


def dense_logits(w: llama.LlamaWeights, cfg: ModelConfig, ids: list[int]) -> np.ndarray:
    """An independent, unpaged float64 numpy forward of the same weights (no shared code but the RoPE table)."""
    f = lambda a: np.asarray(a, np.float64)  # noqa: E731
    x = f(w.embed)[ids]
    T, H = len(ids), cfg.head_dim
    angles = np.arange(T)[:, None] * f(llama.rope_inv_freq(cfg))[None, :]
    cos, sin = np.cos(np.concatenate([angles] * 2, -1)), np.sin(np.concatenate([angles] * 2, -1))

    def rope(t):  # [T, heads, H]
        rot = np.concatenate([-t[..., H // 2:], t[..., :H // 2]], -1)
        return t * cos[:, None] + rot * sin[:, None]

    def norm(t, g):
        return g * t / np.sqrt(np.mean(t * t, -1, keepdims=True) + cfg.rms_norm_eps)

    lw = jax.tree.map(f, w.layers)
    for i in range(cfg.num_layers):
        h = norm(x, lw.attn_norm[i])
        q = np.einsum("td,dnh->tnh", h, lw.wq[i])
        k = np.einsum("td,dkh->tkh", h, lw.wk[i])
        v = np.einsum("td,dkh->tkh", h, lw.wv[i])
        if lw.bq is not None:
            q, k, v = q + lw.bq[i], k + lw.bk[i], v + lw.bv[i]
        q, k = rope(q), rope(k)
        k, v = (np.repeat(a, cfg.group_size, axis=1) for a in (k, v))
        s = np.einsum("tnh,snh->nts", q, k) / np.sqrt(H)
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("nts,snh,nhd->td", p, v, lw.wo[i])
        h = norm(x, lw.mlp_norm[i])
        g, u = h @ lw.w_gate[i], h @ lw.w_up[i]
        x = x + (g / (1 + np.exp(-g)) * u) @ lw.w_down[i]
    x = norm(x, f(w.final_norm))
    head = f(w.embed).T if w.lm_head is None else f(w.lm_head)
    return x @ head


CONFIGS = {
    "gqa_untied": tiny_config(),
    "mha_tied": tiny_config(num_kv_heads=4, tie_word_embeddings=True),
    "qwen2_bias_llama3_rope": tiny_config(attention_bias=True, rope_scaling=RopeScaling(
        kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_full_forward_matches_numpy(name):
    cfg = CONFIGS[name]
    w = llama.init_weights(cfg, jax.random.key(1))
    ids = list(np.random.default_rng(0).integers(0, cfg.vocab_size, 19))
    got = np.asarray(llama.sequence_logits(w, cfg, ids, page_size=PAGE))
    np.testing.assert_allclose(got, dense_logits(w, cfg, ids), rtol=1e-4, atol=1e-4)


def test_chunked_prefill_and_decode_with_a_neighbour_match_full_forward():
    cfg = tiny_config()
    w = llama.init_weights(cfg, jax.random.key(2))
    rng = np.random.default_rng(3)
    ids = [int(t) for t in rng.integers(0, cfg.vocab_size, 23)]
    other = [int(t) for t in rng.integers(0, cfg.vocab_size, 9)]
    full = dense_logits(w, cfg, ids)
    table = [int(p) for p in rng.permutation(np.arange(1, 30))[:8]]  # shuffled, non-contiguous pages
    other_table = [p for p in range(1, 30) if p not in table][:3]
    fwd = jax.jit(llama.forward, static_argnames=("cfg", "attention"))
    kv = jnp.zeros(llama.kv_cache_shape(cfg, 30, PAGE))

    def run(chunks, T, R):
        nonlocal kv
        step = build_step_inputs(chunks, num_tokens=T, num_rows=R, page_size=PAGE, max_pages_per_seq=16,
                                 kv_block_pages=2)
        logits, kv = fwd(w, kv, jax.tree.map(jnp.asarray, step), cfg, paged_attention_xla)
        return np.asarray(logits)

    # Chunk 1: 13 prompt tokens beside another sequence's whole 9-token prompt.
    out = run([SeqChunk(ids[:13], 0, table), SeqChunk(other, 0, other_table)], 32, 4)
    np.testing.assert_allclose(out[0], full[12], rtol=1e-4, atol=1e-4)
    # Chunk 2: the other 8 prompt tokens; then two single-token decodes sharing a step with the neighbour.
    out = run([SeqChunk(ids[13:21], 13, table)], 16, 4)
    np.testing.assert_allclose(out[0], full[20], rtol=1e-4, atol=1e-4)
    for pos in (21, 22):
        out = run([SeqChunk([other[0]], 9 + pos - 21, other_table), SeqChunk([ids[pos]], pos, table)], 2, 2)
        np.testing.assert_allclose(out[1], full[pos], rtol=1e-4, atol=1e-4)


def test_bfloat16_forward_is_close_to_float32():
    cfg = tiny_config()
    w = llama.init_weights(cfg, jax.random.key(4))
    ids = list(range(1, 30))
    ref = np.asarray(llama.sequence_logits(w, cfg, ids, page_size=PAGE))
    w16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16), w)
    got = np.asarray(llama.sequence_logits(w16, cfg, ids, page_size=PAGE))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=0.05)


@pytest.mark.parametrize("width", [576, 100, 64, 9])
def test_rms_norm_rounds_a_row_the_same_whatever_the_rows_beside_it(width):
    """`rms_norm` of a row is bit for bit the same alone and among 2-16 rows (XLA's own reduction was not, from 8
    rows on), and within float32 rounding of the float64 norm."""
    rng = np.random.default_rng()
    x = jnp.asarray(rng.standard_normal((16, width)) * 3, jnp.float32)
    w = jnp.asarray(rng.standard_normal(width), jnp.float32)
    norm = jax.jit(lambda x: llama.rms_norm(x, w, 1e-5))
    alone = np.asarray(norm(x[:1]))[0]
    for rows in range(2, 17):
        np.testing.assert_array_equal(np.asarray(norm(x[:rows]))[0], alone)
    x64 = np.asarray(x[0], np.float64)
    want = np.asarray(w, np.float64) * x64 / np.sqrt(np.mean(x64 * x64) + 1e-5)
    np.testing.assert_allclose(alone, want, rtol=1e-5, atol=1e-5)
