"""Per-step device inputs: one registered pytree, built on the host from plain per-sequence chunks.

A step is a flat batch of T query tokens drawn from R sequences (decode rows contribute one token,
prefill chunks many). Both axes are padded up to buckets so only a fixed set of shapes is compiled.
Padding tokens write their K/V into the null page 0 and their outputs are ignored; padding rows have
`kv_lens == 0` and a page table of null pages.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np

from pallas_kernels.step_metadata import StepInputs

# Query tokens per query block in the XLA attention path when a step carries prefill chunks; decode-only
# steps use blocks of one token (see `query_block_for`).
PREFILL_QUERY_BLOCK = 16


@dataclasses.dataclass
class SeqChunk:
    """What one sequence contributes to a step (host side)."""

    token_ids: Sequence[int]  # the tokens computed this step
    start_pos: int  # position of token_ids[0]; tokens before it are already in the KV cache
    page_table: Sequence[int]  # page ids covering at least start_pos + len(token_ids) tokens
    num_spec: int = 0  # the last num_spec tokens are speculative proposals to verify


def query_block_for(num_tokens: int, num_rows: int, tokens_per_row: int = 1) -> int:
    """Blocks of one query for decode-shaped steps, one block a row for verify-shaped steps (R rows of up to L =
    `tokens_per_row` tokens: the next power of two >= L), larger blocks when prefill chunks dominate.

    NOTE: a verify row's 1 + K queries read the same KV, so one block gathers it once; a prefill-sized block
    would compute 16 query slots for 5 (K = 4: the verify step's attention cost about 3x its need, 15% of
    a single-stream verify step on the CPU; docs/performance.md, "Speculative verify").
    """
    if num_tokens <= num_rows:
        return 1
    if 1 < tokens_per_row and num_tokens <= num_rows * tokens_per_row:
        return min(PREFILL_QUERY_BLOCK, 1 << (tokens_per_row - 1).bit_length())
    return PREFILL_QUERY_BLOCK


def num_query_blocks(num_tokens: int, num_rows: int, query_block: int) -> int:
    # Each row wastes at most one partly filled block.
    return num_tokens if query_block == 1 else -(-num_tokens // query_block) + num_rows


def build_step_inputs(chunks: Sequence[SeqChunk], *, num_tokens: int, num_rows: int, page_size: int,
                      max_pages_per_seq: int, kv_block_pages: int = 8, all_logits: bool = False,
                      logits_per_row: int = 1) -> StepInputs:
    """Packs chunks into padded numpy arrays of T = num_tokens and R = num_rows (bucket sizes).

    With `all_logits`, logits come back for every token slot (M = T, for scoring). Otherwise each row gets
    `logits_per_row` = L (M = R * L, row-major): entry j of a row is the logit at its token
    `n - 1 - num_spec + j`, clamped to its last token. So with L = 1 it is the row's last token, and a
    speculative row's first 1 + num_spec entries score its last known token and each of its proposals.
    """
    # NOTE: vectorized: a handful of numpy calls per step whatever the row count, and no per-token Python (the
    # step is rebuilt on the host every few milliseconds; see docs/performance.md, "host overhead").
    n_rows = len(chunks)
    lens = np.fromiter((len(c.token_ids) for c in chunks), np.int64, n_rows)  # [r] query tokens per row
    total = int(lens.sum())
    if total > num_tokens or n_rows > num_rows:
        raise ValueError(f"step of {total} tokens / {n_rows} rows exceeds bucket {num_tokens} / {num_rows}")
    p_max = -(-max_pages_per_seq // kv_block_pages) * kv_block_pages
    qb = query_block_for(num_tokens, num_rows, logits_per_row)
    nb = num_query_blocks(num_tokens, num_rows, qb)

    token_ids = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    slot_mapping = np.zeros(num_tokens, np.int32)
    page_tables = np.zeros((num_rows, p_max), np.int32)
    kv_lens = np.zeros(num_rows, np.int32)
    query_starts = np.zeros(num_rows + 1, np.int32)
    logits_indices = np.zeros((num_rows, logits_per_row), np.int32)
    qblock_rows = np.zeros(nb, np.int32)
    qblock_starts = np.zeros(nb, np.int32)
    qblock_lens = np.zeros(nb, np.int32)

    if n_rows:
        starts = np.fromiter((c.start_pos for c in chunks), np.int64, n_rows)
        num_spec = np.fromiter((getattr(c, "num_spec", 0) for c in chunks), np.int64, n_rows)
        table_lens = np.fromiter((len(c.page_table) for c in chunks), np.int64, n_rows)
        ends = starts + lens
        bad = np.flatnonzero((table_lens * page_size < ends) | (table_lens > p_max))
        if bad.size:
            r = int(bad[0])
            raise ValueError(f"row {r}: page table of {table_lens[r]} pages cannot hold {ends[r]} tokens")
        bad = np.flatnonzero(num_spec >= np.minimum(lens, logits_per_row))
        if bad.size:
            r = int(bad[0])
            raise ValueError(f"row {r}: {num_spec[r]} proposals need more than {lens[r]} tokens or "
                             f"{logits_per_row} logits")
        qs = np.cumsum(lens)  # [r] end of each row's tokens
        query_starts[1:n_rows + 1] = qs
        query_starts[n_rows + 1:] = total
        first = qs - lens  # [r] start of each row's tokens
        token_ids[:total] = np.fromiter(itertools.chain.from_iterable(c.token_ids for c in chunks), np.int32,
                                        total)
        row_of = np.repeat(np.arange(n_rows), lens)  # [t] row of each real token
        pos = starts[row_of] + np.arange(total) - first[row_of]  # [t]
        positions[:total] = pos
        # Page tables, row by row, left to right: a boolean mask assigns in that (C) order.
        page_tables[:n_rows][np.arange(p_max) < table_lens[:, None]] = np.fromiter(
            itertools.chain.from_iterable(c.page_table for c in chunks), np.int32, int(table_lens.sum()))
        slot_mapping[:total] = page_tables[row_of, pos // page_size] * page_size + pos % page_size
        kv_lens[:n_rows] = ends
        last = (qs - 1)[:, None]  # [r, 1]
        logits_indices[:n_rows] = np.minimum(last - num_spec[:, None] + np.arange(logits_per_row), last)
        if qb == 1:
            qblock_rows[:total], qblock_starts[:total], qblock_lens[:total] = row_of, np.arange(total), 1
        else:
            blocks = -(-lens // qb)  # [r] query blocks of each row
            nb_used = int(blocks.sum())
            block_row = np.repeat(np.arange(n_rows), blocks)
            k = np.arange(nb_used) - np.repeat(np.cumsum(blocks) - blocks, blocks)  # block index within its row
            qblock_rows[:nb_used] = block_row
            qblock_starts[:nb_used] = first[block_row] + k * qb
            qblock_lens[:nb_used] = np.minimum(qb, lens[block_row] - k * qb)
    logits_indices = logits_indices.reshape(-1)
    if all_logits:
        logits_indices = np.arange(num_tokens, dtype=np.int32)
    # KV chunks each query block can see: up to its last query's position (causal), never past its row.
    kv_stop = np.where(qblock_lens > 0, positions[qblock_starts] + qblock_lens, 0)
    chunk_tokens = kv_block_pages * page_size
    work_blocks, work_chunks, num_iters = attention_work_list(-(-kv_stop // chunk_tokens), p_max // kv_block_pages)
    return StepInputs(token_ids, positions, slot_mapping, page_tables, kv_lens, query_starts, logits_indices,
                      qblock_rows, qblock_starts, qblock_lens, work_blocks, work_chunks, num_iters,
                      query_block=qb, kv_block_pages=kv_block_pages)


def attention_slots(num_blocks: int) -> int:
    """(query block, KV chunk) pairs the XLA attention computes per iteration: half the blocks, so a step whose
    blocks see ragged amounts of KV (prefill chunks beside decodes, ragged contexts) does about the work it
    needs rather than every block times the longest row's chunks."""
    return max(1, -(-num_blocks // 2))


def attention_work_list(block_chunks: np.ndarray, max_chunks: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Schedules each query block's KV chunks into iterations of `attention_slots` pairs, a block at most once
    per iteration, the blocks with the most chunks left first (so iterations = max(longest, ceil(work /
    slots)) for these ragged lists). Arrays are padded to the bucket's worst case; idle slots name block NB.

    Args:
      block_chunks: [NB] KV chunks each query block reads (0 for padding blocks).
      max_chunks: chunks in the longest page table the bucket allows.
    """
    nb = len(block_chunks)
    slots = attention_slots(nb)
    max_iters = -(-nb * max_chunks // slots)
    blocks = np.full((max_iters, slots), nb, np.int32)
    chunks = np.zeros((max_iters, slots), np.int32)
    left = block_chunks.astype(np.int64).copy()
    it = 0
    while left.max(initial=0) > 0:
        take = np.argsort(-left, kind="stable")[:slots]
        take = take[left[take] > 0]
        blocks[it, :len(take)] = take
        chunks[it, :len(take)] = block_chunks[take] - left[take]
        left[take] -= 1
        it += 1
    return blocks, chunks, np.asarray(it, np.int32)


# Mixed-step token buckets grow by powers of two up to max(MIN_MIXED_TOKEN_STEP, budget / MIXED_TOKEN_STEPS),
# then in steps of that size: at most about MIXED_TOKEN_STEPS + log2(step) shapes whatever the budget.
MIXED_TOKEN_STEPS = 8
MIN_MIXED_TOKEN_STEP = 64


def _powers_of_two_up_to(limit: int, start: int = 1) -> list[int]:
    sizes, n = [], start
    while n < limit:
        sizes.append(n)
        n *= 2
    return sizes + [limit]


@dataclasses.dataclass(frozen=True)
class StepBuckets:
    """The fixed set of (T, R) step shapes: all compiled at warm-up, nothing else ever.

    Decode-shaped steps (one token per row) use T == R in powers of two up to max_num_seqs. Any step
    with a longer chunk pads R to max_num_seqs (rows are cheap) and T to a power of two, which keeps
    the set small: about log2(max_num_seqs) + log2(max_num_batched_tokens) shapes.
    """

    max_num_seqs: int
    max_num_batched_tokens: int
    tokens_per_row: int = 1  # L > 1 (speculative decoding): also R rows of up to L tokens, (R * L, R)

    @property
    def decode_rows(self) -> list[int]:
        return _powers_of_two_up_to(self.max_num_seqs)

    @property
    def mixed_tokens(self) -> list[int]:
        """Powers of two above max_num_seqs up to `mixed_token_step`, then its multiples up to the budget.

        NOTE: a step costs about its padded token count, and a mixed step usually holds one prompt beside the
        decodes; power-of-two buckets waste a quarter of such a step on average, steps of a budget's eighth
        about a tenth (`bench_throughput.py`: docs/performance.md, "Scheduler policy"). Small budgets keep
        their powers of two (vLLM's TPU runner pads the same way: powers of two, then a fixed gap).
        """
        start = 1 << self.max_num_seqs.bit_length()  # the smallest power of two above max_num_seqs
        if start >= self.max_num_batched_tokens:
            return [self.max_num_batched_tokens]
        gap = self.mixed_token_step
        # NOTE: with many seats (64 beside a budget of 512) the first power of two is already past the step.
        sizes = [t for t in _powers_of_two_up_to(self.max_num_batched_tokens, start) if t <= gap] or [start]
        sizes += range(sizes[-1] + gap, self.max_num_batched_tokens, gap)
        return sorted(set(sizes) | {self.max_num_batched_tokens})

    @property
    def mixed_token_step(self) -> int:
        return max(MIN_MIXED_TOKEN_STEP, self.max_num_batched_tokens // MIXED_TOKEN_STEPS)

    def shapes(self) -> list[tuple[int, int]]:
        mixed = [(t, self.max_num_seqs) for t in self.mixed_tokens if t > self.max_num_seqs]
        # NOTE: verify-shaped steps (each row its last token + K proposals) keep R small; padded to the mixed
        # shapes instead, a single stream would compute max_num_seqs * L rows of logits every step.
        verify = [(r * self.tokens_per_row, r) for r in self.decode_rows
                  if self.tokens_per_row > 1 and r * self.tokens_per_row <= self.max_num_batched_tokens]
        shapes = [(r, r) for r in self.decode_rows] + mixed
        return shapes + [s for s in verify if s not in shapes]

    def choose(self, num_tokens: int, num_rows: int) -> tuple[int, int]:
        """The smallest compiled shape that holds the step."""
        for t, r in sorted(self.shapes()):
            if t >= num_tokens and r >= num_rows:
                return t, r
        raise ValueError(f"step of {num_tokens} tokens / {num_rows} rows exceeds the configured limits")
