"""Wrapper-side packing shared by the kernels: query tokens into per-(block, KV head) tiles and back.

A kernel program owns one query block (Qb consecutive tokens of one sequence) and one KV head, and
sees its queries as a 2-D tile [M, H] with M = Qb * Gp: row i is token i // Gp of the block and query
head i % Gp of the KV head's group. The group G is padded to Gp (zeros) so that M meets the backend's
tile rules (a power of two >= 16 for Triton dots, a multiple of 8 sublanes for Mosaic). The padding
rows cost a little compute, never a KV read: each page is loaded once for the whole group (GQA
without repeating KV heads).

Packing and unpacking are small XLA gathers/scatters over q and the output ([T, N, H]), not over KV.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.step_metadata import StepInputs


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class QueryBlocks:
    q: jax.Array  # [NB, K, M, H], M = Qb * Gp
    rows: jax.Array  # [NB] int32, sequence (row) of each block
    pos0: jax.Array  # [NB] int32, position of the block's first token
    lens: jax.Array  # [NB] int32, valid tokens in the block (0 for padding blocks)
    kv_stop: jax.Array  # [NB] int32, KV tokens the block may read: min(last position + 1, kv_len); 0 if padding
    dest: jax.Array  # [NB * Qb] int32, flat token of each block slot; T (dropped on scatter) for padding
    query_block: int = dataclasses.field(metadata=dict(static=True))  # Qb
    group_pad: int = dataclasses.field(metadata=dict(static=True))  # Gp


def next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pack_query_blocks(q: jax.Array, step: StepInputs, *, num_kv_heads: int, group_pad: int,
                      per_token: bool = False) -> QueryBlocks:
    """Tiles q [T, N, H] by the step's query blocks (Qb = step.query_block), or one token per block."""
    T, N, H = q.shape
    K, G = num_kv_heads, N // num_kv_heads
    n_valid = step.query_starts[-1]
    if per_token:
        Qb = 1
        tokens = jnp.arange(T, dtype=jnp.int32)
        rows = jnp.clip(jnp.searchsorted(step.query_starts, tokens, side="right") - 1, 0, step.num_rows - 1)
        starts, lens = tokens, (tokens < n_valid).astype(jnp.int32)
        rows = rows.astype(jnp.int32)
    else:
        Qb = step.query_block
        rows, starts, lens = step.qblock_rows, step.qblock_starts, step.qblock_lens
    NB = rows.shape[0]
    offsets = jnp.arange(Qb, dtype=jnp.int32)
    slot_ok = offsets[None, :] < lens[:, None]  # [NB, Qb]
    tok = jnp.where(slot_ok, starts[:, None] + offsets[None, :], 0)  # [NB, Qb]
    qb = jnp.where(slot_ok[..., None, None], q[tok], 0).reshape(NB, Qb, K, G, H)
    qb = jnp.pad(qb, ((0, 0), (0, 0), (0, 0), (0, group_pad - G), (0, 0)))
    qb = qb.transpose(0, 2, 1, 3, 4).reshape(NB, K, Qb * group_pad, H)  # [NB, K, M, H]
    pos0 = step.positions[starts]
    kv_stop = jnp.where(lens > 0, jnp.minimum(pos0 + lens, step.kv_lens[rows]), 0)
    dest = jnp.where(slot_ok, tok, T).reshape(-1)
    return QueryBlocks(qb, rows, pos0.astype(jnp.int32), lens, kv_stop.astype(jnp.int32), dest.astype(jnp.int32),
                       query_block=Qb, group_pad=group_pad)


def unpack_query_blocks(out: jax.Array, blocks: QueryBlocks, num_tokens: int, num_heads: int,
                        dtype) -> jax.Array:
    """out [NB, K, M, H] -> [T, N, H]; padding tokens get zeros."""
    NB, K, _, H = out.shape
    Qb, Gp, G = blocks.query_block, blocks.group_pad, num_heads // K
    out = out.reshape(NB, K, Qb, Gp, H)[:, :, :, :G].transpose(0, 2, 1, 3, 4).reshape(NB * Qb, num_heads, H)
    return jnp.zeros((num_tokens, num_heads, H), dtype).at[blocks.dest].set(out.astype(dtype), mode="drop")


def pad_page_tables(page_tables: jax.Array, multiple: int) -> jax.Array:
    """Pads [R, P_max] with null pages to a multiple of `multiple` columns (kernels read whole KV blocks)."""
    extra = -page_tables.shape[1] % multiple
    return jnp.pad(page_tables, ((0, 0), (0, extra))) if extra else page_tables
