"""The per-step metadata every attention implementation reads: one registered pytree of device arrays.

A step is a flat batch of T query tokens drawn from R sequences (decode rows contribute one token, prefill
chunks many), padded to bucket sizes. Padding tokens write their K/V into the null page 0; padding rows have
`kv_lens == 0` and a page table of null pages. The engine builds it on the host
(`jaxserve.model.step_inputs.build_step_inputs`); it is defined here so the kernels import nothing above JAX.
"""

from __future__ import annotations

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class StepInputs:
    token_ids: jax.Array  # [T] int32
    positions: jax.Array  # [T] int32, position of each token in its sequence
    slot_mapping: jax.Array  # [T] int32, page * page_size + offset where the token's K/V is written
    page_tables: jax.Array  # [R, P_max] int32, page ids (0 = null page)
    kv_lens: jax.Array  # [R] int32, KV length of each row after this step (0 for padding rows)
    query_starts: jax.Array  # [R + 1] int32, cumulative query lengths: row r owns tokens [qs[r], qs[r+1])
    logits_indices: jax.Array  # [M] int32, flat tokens whose logits are returned (M = R * logits_per_row)
    qblock_rows: jax.Array  # [NB] int32, row of each query block (XLA attention)
    qblock_starts: jax.Array  # [NB] int32, first flat token of each query block
    qblock_lens: jax.Array  # [NB] int32, valid tokens in each query block (0 for padding blocks)
    # The XLA attention's work list: iteration i, slot s reads KV chunk work_chunks[i, s] for query block
    # work_blocks[i, s] (NB: an idle slot); a block appears at most once per iteration. Kernels ignore it.
    work_blocks: jax.Array  # [I, S] int32
    work_chunks: jax.Array  # [I, S] int32
    num_work_iters: jax.Array  # [] int32, iterations actually used (<= I)
    query_block: int = dataclasses.field(default=1, metadata=dict(static=True))  # Qb
    kv_block_pages: int = dataclasses.field(default=8, metadata=dict(static=True))

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]

    @property
    def num_rows(self) -> int:
        return self.page_tables.shape[0]
