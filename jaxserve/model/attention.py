"""Paged attention behind one small interface, and the XLA implementation every platform can run.

An attention function has the signature

    attention(q [T, N, H], kv_pages [L, P, page_size, 2K, H], layer, step: StepInputs, *, scale) -> [T, N, H]

and must have seen this step's K/V written by `pallas_kernels.kv_cache.write_kv` first (a token attends to
itself). Pallas kernels (`pallas_kernels/`) implement the same signature; `pallas_kernels.reference` is the dense
float32 reference every implementation is tested against. Which implementation serves a step is chosen in
one place, the registry `jaxserve.model.attention_backends.BACKENDS` (`--attention-backend auto|xla|pallas|native`).
"""

from __future__ import annotations

from typing import Protocol

import jax
import jax.numpy as jnp

from jaxserve.model.step_inputs import StepInputs


class AttentionFn(Protocol):
    def __call__(self, q: jax.Array, kv_pages: jax.Array, layer: jax.Array, step: StepInputs, *,
                 scale: float) -> jax.Array: ...


def paged_attention_xla(q: jax.Array, kv_pages: jax.Array, layer: jax.Array, step: StepInputs, *,
                        scale: float) -> jax.Array:
    """Ragged paged attention in plain XLA: online softmax over KV chunks of `kv_block_pages` pages.

    Queries are grouped into blocks of Qb tokens of one sequence each, so K/V are gathered once per block,
    not once per token. Each iteration computes S (query block, KV chunk) pairs of the step's work list
    (`step.work_blocks` / `work_chunks`, built on the host): a block visits only the chunks it can see
    (causally, within its own row), so a prefill chunk's early blocks and short rows beside long ones cost
    what they read, not the longest row's length. A block is at most once in an iteration, so merging the
    pairs into the per-block softmax state is a plain gather and scatter.
    """
    T, N, H = q.shape
    _, _, page_size, two_k, _ = kv_pages.shape
    K = two_k // 2
    G = N // K
    Qb, Bk = step.query_block, step.kv_block_pages
    C = Bk * page_size  # KV tokens per chunk

    offsets = jnp.arange(Qb, dtype=jnp.int32)
    q_valid = offsets[None, :] < step.qblock_lens[:, None]  # [NB, Qb]
    tok = jnp.where(q_valid, step.qblock_starts[:, None] + offsets[None, :], 0)  # [NB, Qb]
    NB = tok.shape[0]
    qb = q[tok].reshape(NB, Qb, K, G, H)
    q_pos = step.positions[tok]  # [NB, Qb]
    tables = step.page_tables[step.qblock_rows]  # [NB, P_max]
    kv_lens = step.kv_lens[step.qblock_rows]  # [NB]
    S = step.work_blocks.shape[1]

    def iteration(i, carry):
        m, l, acc = carry  # [NB + 1, K, G, Qb], [NB + 1, K, G, Qb], [NB + 1, K, G, Qb, H]; row NB: idle slots
        dest = jax.lax.dynamic_index_in_dim(step.work_blocks, i, keepdims=False)  # [S] (NB: idle)
        chunk = jax.lax.dynamic_index_in_dim(step.work_chunks, i, keepdims=False)  # [S]
        idle = dest >= NB
        blk = jnp.where(idle, 0, dest)  # idle slots read block 0's first chunk, masked out below
        cols = chunk[:, None] * Bk + jnp.arange(Bk, dtype=jnp.int32)[None, :]  # [S, Bk]
        pages = jnp.take_along_axis(tables[blk], cols, axis=1)  # [S, Bk]
        kv = kv_pages[layer, pages].reshape(S, C, K, 2, H)
        k, v = kv[:, :, :, 0], kv[:, :, :, 1]  # [S, C, K, H]
        kv_pos = chunk[:, None] * C + jnp.arange(C, dtype=jnp.int32)[None, :]  # [S, C]
        # NOTE: zero V past the sequence's end: a page it does not own may hold anything (even NaN), and
        # a zero softmax weight times NaN is still NaN. Pages are a boundary between users.
        v = jnp.where((kv_pos < kv_lens[blk][:, None])[:, :, None, None], v, 0)
        s = jnp.einsum("SQKGH,SCKH->SKGQC", qb[blk], k, preferred_element_type=jnp.float32) * scale
        mask = (kv_pos[:, None, :] <= q_pos[blk][:, :, None]) & (q_valid[blk] & ~idle[:, None])[:, :, None]
        mask = mask[:, None, None]  # [S, 1, 1, Qb, C]
        m_pair = jnp.maximum(jnp.max(jnp.where(mask, s, -jnp.inf), axis=-1), -1e30)  # [S, K, G, Qb]
        p = jnp.where(mask, jnp.exp(s - m_pair[..., None]), 0.0)
        l_pair = jnp.sum(p, axis=-1)
        acc_pair = jnp.einsum("SKGQC,SCKH->SKGQH", p, v.astype(jnp.float32))
        m_old = m[dest]
        m_new = jnp.maximum(m_old, m_pair)
        keep, add = jnp.exp(m_old - m_new), jnp.exp(m_pair - m_new)
        l = l.at[dest].set(l[dest] * keep + l_pair * add)
        acc = acc.at[dest].set(acc[dest] * keep[..., None] + acc_pair * add[..., None])
        return m.at[dest].set(m_new), l, acc

    # NOTE: m starts at a large finite negative so fully masked rows give exp(0) * 0, never inf - inf.
    m0 = jnp.full((NB + 1, K, G, Qb), -1e30, jnp.float32)
    l0 = jnp.zeros((NB + 1, K, G, Qb), jnp.float32)
    acc0 = jnp.zeros((NB + 1, K, G, Qb, H), jnp.float32)
    _, l, acc = jax.lax.fori_loop(0, step.num_work_iters, iteration, (m0, l0, acc0))
    l, acc = l[:NB], acc[:NB]
    out = jnp.where(l[..., None] > 0, acc / jnp.where(l > 0, l, 1.0)[..., None], 0.0)
    out = out.transpose(0, 3, 1, 2, 4).reshape(NB * Qb, N, H)  # [NB*Qb, N, H]
    # Padding query slots scatter to index T, which mode="drop" discards.
    dest = jnp.where(q_valid, tok, T).reshape(-1)
    return jnp.zeros((T, N, H), q.dtype).at[dest].set(out.astype(q.dtype), mode="drop")

