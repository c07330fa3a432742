"""Sampling on the device: every row of a batch with its own parameters, in one compiled program.

The host packs each row's `SamplingParams` into `SamplingMetadata` (per-row arrays: every value is data,
nothing is static, so mixed batches compile once per (R, Kb, S) shape). `sample` then follows vLLM's order:

    raw logits → logit bias and banned ids → repetition / presence / frequency penalties
               → greedy rows: argmax
               → random rows: temperature → top-k → top-p → min-p → draw

Cost on CPU decides the shape of the code (V ≈ 49k, R ≤ 64): a full sort of the vocabulary costs ~20 ms a
row there, so nothing sorts it. Penalties, random sampling and top-k/top-p each sit behind a `lax.cond`
that skips them when no row needs them. Top-k/top-p thresholds come from the top `NUM_CANDIDATES` tokens
when that is exact for a row, else from a bisection over the whole vocabulary. Argmax, top-k and the draw
work on blocks of `BLOCK` tokens (block maxima or sums first, then one block), and the draw takes one
uniform per row through an inverse CDF rather than V Gumbel variates. On CPU, rows go through in chunks
of `CPU_ROWS_PER_CHUNK` so that a chunk's [rows, V] temporaries stay in cache.

Each random row's key is `fold_in(key(seed), position)`: a row's token depends only on its logits, its
parameters, its seed and its position, never on the rest of the batch or on its row index.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxserve.core.sampling_params import SamplingParams

# Temperatures at or below this are greedy (vLLM's _SAMPLING_EPS).
GREEDY_TEMPERATURE = 1e-5
# Most likely tokens the top-k/top-p filter looks at; rows whose threshold lies deeper fall back to a
# bisection over the whole vocabulary (exact, 32 passes over [R, V]).
NUM_CANDIDATES = 128
# Entries of every row's sparse bias table (logit_bias, then banned ids: EOS and stop_token_ids before
# min_tokens). NOTE: one fixed width, compiled at warm-up, so no valid request compiles a new step; it holds
# SamplingParams.MAX_LOGIT_BIAS + MAX_STOP_TOKEN_IDS with room for the tokenizer's end-of-generation ids.
BIAS_WIDTH = 512
# Tokens per block in the two-level reductions over the vocabulary (argmax, top-k, the draw's inverse CDF).
BLOCK = 128
# On CPU, rows are sampled this many at a time so that each chunk's [rows, V] arrays stay in cache.
CPU_ROWS_PER_CHUNK = 16


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingMetadata:
    """Per-row sampling parameters (R rows, padding rows greedy and neutral). Shapes: S history, Kb bias width."""

    temperature: jax.Array  # [R] f32, 0 = greedy
    top_k: jax.Array  # [R] i32, 0 = off
    top_p: jax.Array  # [R] f32, 1 = off
    min_p: jax.Array  # [R] f32, 0 = off
    repetition_penalty: jax.Array  # [R] f32, 1 = off
    presence_penalty: jax.Array  # [R] f32, 0 = off
    frequency_penalty: jax.Array  # [R] f32, 0 = off
    seeds: jax.Array  # [R] u32
    positions: jax.Array  # [R] i32, index in its sequence of the token being sampled
    bias_ids: jax.Array  # [R, Kb] i32, padded with id 0 ...
    bias_values: jax.Array  # [R, Kb] f32, ... and value 0; -inf bans a token
    history: jax.Array  # [R, S] i32, prompt then output token ids, padded with -1 (only rows with penalties)
    prompt_lens: jax.Array  # [R] i32, how many of `history` are prompt tokens
    # [R, W] i32, W = ceil(V / 32): bit t % 32 of word t // 32 set = token t allowed (structured outputs,
    # allowed_token_ids); all ones (-1) on free rows, so any mix of rows shares one compiled step
    token_bitmask: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SampleOutput:
    """What `sample` returns. Log-probs are under the model's raw distribution, log_softmax(raw logits)."""

    token_ids: jax.Array  # [R] i32
    logprobs: jax.Array  # [R] f32, log-prob of the chosen token
    top_ids: jax.Array  # [R, n] i32, the n most likely tokens, best first
    top_logprobs: jax.Array  # [R, n] f32
    prompt: PromptLogprobs | None = None  # the serving step's per-token-slot prompt logprobs


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PromptLogprobInputs:
    """Per token slot of a step, the token whose log-prob its logits should give (prompt logprobs)."""

    targets: jax.Array  # [T] i32, the next prompt token after each slot's token; -1 where nobody asked


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PromptLogprobs:
    """What `prompt_logprobs` returns per token slot (zeros where the target is -1)."""

    logprobs: jax.Array  # [T] f32, log-prob of the target
    top_ids: jax.Array  # [T, n] i32
    top_logprobs: jax.Array  # [T, n] f32


def build_prompt_logprob_inputs(targets: Sequence[Sequence[int] | None], lens: Sequence[int],
                                num_tokens: int) -> PromptLogprobInputs:
    """Packs per-chunk targets (one per chunk token, -1 for none; None: the chunk asks for none) into the flat
    [T] layout of `build_step_inputs` (chunk i's tokens follow chunk i - 1's)."""
    flat = np.full(num_tokens, -1, np.int32)
    offset = 0
    for chunk_targets, n in zip(targets, lens):
        if chunk_targets is not None:
            if len(chunk_targets) != n:
                raise ValueError(f"{len(chunk_targets)} prompt-logprob targets for a chunk of {n} tokens")
            flat[offset:offset + n] = chunk_targets
        offset += n
    return PromptLogprobInputs(flat)


# Token slots whose [slots, V] logits `prompt_logprobs` computes at a time (bounds its memory to ~25 MB at V=49k).
PROMPT_LOGPROB_SLOTS = 128


def prompt_logprobs(x: jax.Array, inputs: PromptLogprobInputs, head, *, num_logprobs: int) -> PromptLogprobs:
    """The log-prob of each slot's target and the slot's top-n, under log_softmax(raw logits).

    Args:
      x: [T, D] the last layer's output of every token slot.
      inputs: targets [T]; -1 where no request asked.
      head: x [M, D] -> logits [M, V] float32 (final norm and vocabulary projection).
      num_logprobs: n, static.
    NOTE: one compiled program per step bucket with the decode and prefill paths: the [T, V] logits are only
    computed (behind a `lax.cond`) in steps where a slot has a target, in blocks of PROMPT_LOGPROB_SLOTS slots.
    """
    num_tokens = x.shape[0]
    targets = inputs.targets

    def block(x_blk, t_blk):  # [S, D], [S]
        logits = head(x_blk).astype(jnp.float32)  # [S, V]
        lse = jax.nn.logsumexp(logits, axis=-1)
        top_vals, top_ids = _top_k(logits, num_logprobs)
        chosen = jnp.take_along_axis(logits, jnp.maximum(t_blk, 0)[:, None], axis=-1)[:, 0] - lse
        return PromptLogprobs(jnp.where(t_blk >= 0, chosen, 0.0), top_ids, top_vals - lse[:, None])

    def compute(x):
        slots = PROMPT_LOGPROB_SLOTS
        if num_tokens <= slots or num_tokens % slots:
            return block(x, targets)
        out = lax.map(lambda a: block(*a), (x.reshape(-1, slots, x.shape[1]), targets.reshape(-1, slots)))
        return jax.tree.map(lambda a: a.reshape(num_tokens, *a.shape[2:]), out)

    def skip(x):
        return PromptLogprobs(jnp.zeros(num_tokens, jnp.float32), jnp.zeros((num_tokens, num_logprobs), jnp.int32),
                              jnp.zeros((num_tokens, num_logprobs), jnp.float32))

    return lax.cond(jnp.any(targets >= 0), compute, skip, x)


@dataclasses.dataclass(frozen=True)
class RowSampling:
    """One row's sampling request (host side), built by the engine for each sampled sequence."""

    params: SamplingParams
    seed: int  # resolved: the request's seed, or one the engine drew for it
    position: int  # index in the sequence of the token being sampled (prompt + output so far)
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    banned_ids: Sequence[int] = ()  # never sampled this step (e.g. EOS and stop tokens before min_tokens)
    allowed: np.ndarray | None = None  # [W] i32 bitmask of the tokens allowed this step; None: all


def _has_penalties(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.presence_penalty != 0.0 or p.frequency_penalty != 0.0


def build_sampling_metadata(rows: list[RowSampling | None], num_rows: int, vocab_size: int,
                            history_len: int) -> SamplingMetadata:
    """Packs per-row sampling into numpy arrays of R = num_rows rows; None rows are greedy padding.

    Args:
      rows: one entry per row (at most num_rows); None for rows that are not sampled.
      num_rows: R, the padded batch size.
      vocab_size: V; logit-bias and banned ids must lie in [0, V).
      history_len: S, the width of the token history (prompt + output of any sequence fits in it).
    Returns:
      SamplingMetadata of numpy arrays (the jitted step moves them to the device).
    """
    if len(rows) > num_rows:
        raise ValueError(f"{len(rows)} rows do not fit in a batch of {num_rows}")
    # NOTE: one tuple per live row, then one array per field (no per-field Python stores): this runs every step.
    live = [r for r, row in enumerate(rows) if row is not None]
    fields = np.zeros((num_rows, 7), np.float64)  # temperature, top_k, top_p, min_p, rep., presence, frequency
    fields[:, 2] = fields[:, 4] = 1.0
    seeds = np.zeros(num_rows, np.uint32)
    positions = np.zeros(num_rows, np.int32)
    if live:
        values = []
        for r in live:
            p = rows[r].params
            if p.temperature > GREEDY_TEMPERATURE:
                # Filters only matter to random rows; keeping them neutral on greedy rows lets the batch skip them.
                values.append((p.temperature, p.top_k if 0 < p.top_k < vocab_size else 0, p.top_p, p.min_p,
                               p.repetition_penalty, p.presence_penalty, p.frequency_penalty))
            else:
                values.append((0.0, 0, 1.0, 0.0, p.repetition_penalty, p.presence_penalty, p.frequency_penalty))
        fields[live] = values
        seeds[live] = [rows[r].seed % 2**32 for r in live]  # NOTE: seeds 2**32 apart share a key
        positions[live] = [rows[r].position for r in live]
    temperature, top_p, min_p = (fields[:, i].astype(np.float32) for i in (0, 2, 3))
    top_k = fields[:, 1].astype(np.int32)
    repetition, presence, frequency = (fields[:, i].astype(np.float32) for i in (4, 5, 6))
    penalized = [r for r in live if _has_penalties(rows[r].params)]
    if penalized:
        history = np.full((num_rows, history_len), -1, np.int32)
    else:
        # NOTE: no row reads the history: share one read-only block of -1 per shape instead of filling
        # R x S int32s (a megabyte at 64 rows x 4096) every step.
        history = _empty_history(num_rows, history_len)
    prompt_lens = np.zeros(num_rows, np.int32)
    for r in penalized:
        # NOTE: history is filled only where a penalty reads it; other rows keep -1 (counted as nothing).
        row = rows[r]
        n_prompt, n_out = len(row.prompt_token_ids), len(row.output_token_ids)
        if n_prompt + n_out > history_len:
            raise ValueError(f"row {r}: {n_prompt + n_out} tokens of history exceed history_len {history_len}")
        history[r, :n_prompt] = row.prompt_token_ids
        history[r, n_prompt:n_prompt + n_out] = row.output_token_ids
        prompt_lens[r] = n_prompt
    biases: dict[int, dict[int, float]] = {}
    for r in live:
        row = rows[r]
        if not row.params.logit_bias and not row.banned_ids:
            continue
        bias = {int(t): float(v) for t, v in (row.params.logit_bias or {}).items()}
        bias.update({int(t): -math.inf for t in row.banned_ids})
        bad = [t for t in bias if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"row {r}: token ids {bad} in logit_bias / banned ids are outside [0, {vocab_size})")
        biases[r] = bias
    width = BIAS_WIDTH
    too_wide = [r for r, b in biases.items() if len(b) > width]
    if too_wide:
        raise ValueError(f"rows {too_wide}: more than {width} logit_bias and banned ids")
    bias_ids = np.zeros((num_rows, width), np.int32)
    bias_values = np.zeros((num_rows, width), np.float32)
    for r, bias in biases.items():
        bias_ids[r, :len(bias)] = list(bias.keys())
        bias_values[r, :len(bias)] = list(bias.values())
    constrained = [r for r in live if rows[r].allowed is not None]
    if constrained:
        token_bitmask = np.full((num_rows, bitmask_width(vocab_size)), -1, np.int32)
        for r in constrained:
            token_bitmask[r] = rows[r].allowed
    else:
        token_bitmask = _all_allowed(num_rows, bitmask_width(vocab_size))
    return SamplingMetadata(temperature, top_k, top_p, min_p, repetition, presence, frequency, seeds, positions,
                            bias_ids, bias_values, history, prompt_lens, token_bitmask)


def bitmask_width(vocab_size: int) -> int:
    """W: int32 words of a token bitmask row, ceil(V / 32)."""
    return -(-vocab_size // 32)


@functools.lru_cache(maxsize=64)
def _all_allowed(num_rows: int, width: int) -> np.ndarray:
    mask = np.full((num_rows, width), -1, np.int32)
    mask.flags.writeable = False
    return mask


@functools.lru_cache(maxsize=64)
def _empty_history(num_rows: int, history_len: int) -> np.ndarray:
    history = np.full((num_rows, history_len), -1, np.int32)
    history.flags.writeable = False
    return history


def sample(logits: jax.Array, md: SamplingMetadata, *, num_logprobs: int, num_candidates: int = NUM_CANDIDATES,
           rows_per_chunk: int | None = None) -> SampleOutput:
    """Samples one token per row, each row under its own parameters.

    Args:
      logits: [R, V] raw model logits (any float dtype; computed in f32).
      md: SamplingMetadata with R rows.
      num_logprobs: n, static; how many top alternatives to return per row (0 for none).
      num_candidates: static; tokens the top-k/top-p filter looks at before it falls back to bisection.
      rows_per_chunk: static; rows sampled at a time (default: CPU_ROWS_PER_CHUNK on CPU, all rows elsewhere).
    Returns:
      SampleOutput. `logprobs`, `top_ids` and `top_logprobs` are under the model's raw distribution,
      log_softmax(raw logits), before bias, penalties, temperature or filtering (as OpenAI and vLLM report).
    """
    num_rows = logits.shape[0]
    chunk = rows_per_chunk or (CPU_ROWS_PER_CHUNK if jax.default_backend() == "cpu" else num_rows)
    if num_rows > chunk and num_rows % chunk == 0:
        def split(a):  # [R, ...] -> [R / chunk, chunk, ...]
            return a.reshape(num_rows // chunk, chunk, *a.shape[1:])
        out = lax.map(lambda a: _sample_rows(*a, num_logprobs, num_candidates),
                      (split(logits), jax.tree.map(split, md)))
        return jax.tree.map(lambda a: a.reshape(num_rows, *a.shape[2:]), out)
    return _sample_rows(logits, md, num_logprobs, num_candidates)


def _sample_rows(logits, md, num_logprobs, num_candidates):
    logits = logits.astype(jnp.float32)  # [R, V]
    num_rows = logits.shape[0]
    with jax.named_scope("raw_logprobs"):
        lse = jax.nn.logsumexp(logits, axis=-1)  # [R]
        if num_logprobs:
            top_vals, top_ids = _top_k(logits, num_logprobs)  # [R, n]
        else:
            top_vals, top_ids = jnp.zeros((num_rows, 0), jnp.float32), jnp.zeros((num_rows, 0), jnp.int32)
    x = process_logits(logits, md)
    greedy_ids = _argmax(x)
    is_random = md.temperature > GREEDY_TEMPERATURE  # [R]
    token_ids = lax.cond(jnp.any(is_random),
                         lambda: jnp.where(is_random, _sample_random(x, md, is_random, num_candidates), greedy_ids),
                         lambda: greedy_ids)
    logprobs = jnp.take_along_axis(logits, token_ids[:, None], axis=-1)[:, 0] - lse
    return SampleOutput(token_ids.astype(jnp.int32), logprobs, top_ids.astype(jnp.int32), top_vals - lse[:, None])


def process_logits(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """Token bitmask, logit bias and banned ids, then penalties: [R, V] f32 logits that greedy rows take the
    argmax of."""
    with jax.named_scope("token_bitmask"):
        x = apply_token_bitmask(logits.astype(jnp.float32), md.token_bitmask)
    with jax.named_scope("logit_bias"):
        x = apply_logit_bias(x, md)
    with jax.named_scope("penalties"):
        any_penalty = jnp.any((md.repetition_penalty != 1) | (md.presence_penalty != 0) | (md.frequency_penalty != 0))
        return lax.cond(any_penalty, apply_penalties, lambda x, md: x, x, md)


def apply_token_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    """-inf where a row's bitmask bit is clear; skipped when every row allows everything.

    Args:
      logits: [R, V] f32.
      bitmask: [R, W] i32, W = ceil(V / 32), bit t % 32 of word t // 32 for token t.
    """
    def mask(x):
        num_rows, vocab = x.shape
        # NOTE: >> on int32 is arithmetic, but & 1 picks the shifted bit all the same.
        bits = (bitmask[:, :, None] >> jnp.arange(32, dtype=jnp.int32)) & 1  # [R, W, 32]
        allowed = bits.reshape(num_rows, -1)[:, :vocab] != 0  # [R, V]
        return jnp.where(allowed, x, -jnp.inf)

    return lax.cond(jnp.any(bitmask != -1), mask, lambda x: x, logits)


def apply_logit_bias(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """Adds each row's sparse bias (padding entries add 0 to id 0; -inf bans); skipped when no row has one."""
    def add(x):
        rows = jnp.arange(x.shape[0])[:, None]
        return x.at[rows, md.bias_ids].add(md.bias_values)

    return lax.cond(jnp.any(md.bias_values != 0), add, lambda x: x, logits)


def apply_penalties(logits: jax.Array, md: SamplingMetadata) -> jax.Array:
    """vLLM penalties: repetition over prompt + output tokens, then frequency and presence over output tokens."""
    num_rows, vocab = logits.shape
    rows = jnp.arange(num_rows)[:, None]
    hist = md.history  # [R, S]
    is_output = jnp.arange(hist.shape[1])[None, :] >= md.prompt_lens[:, None]  # [R, S]
    ids = jnp.where(hist >= 0, hist, vocab)  # padding goes out of range and is dropped
    seen = jnp.zeros((num_rows, vocab), jnp.bool_).at[rows, ids].set(True, mode="drop")  # [R, V]
    counts = jnp.zeros((num_rows, vocab), jnp.int32).at[rows, ids].add(is_output.astype(jnp.int32), mode="drop")
    rep = md.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - md.frequency_penalty[:, None] * counts
    return logits - md.presence_penalty[:, None] * (counts > 0)


def _blocks(x: jax.Array) -> jax.Array:
    """[R, V] → [R, NB, BLOCK], padded with -inf."""
    num_rows, vocab = x.shape
    num_blocks = -(-vocab // BLOCK)
    x = jnp.pad(x, ((0, 0), (0, num_blocks * BLOCK - vocab)), constant_values=-jnp.inf)
    return x.reshape(num_rows, num_blocks, BLOCK)


def _top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """lax.top_k over rows, exact, via the k blocks with the largest maxima (ties in any order).

    NOTE: the k largest values lie in at most k blocks, each with a maximum at least the k-th value, so the
    k blocks with the largest maxima hold them. On CPU this is ~3x faster than lax.top_k over V ≈ 49k.
    """
    num_rows, vocab = x.shape
    if -(-vocab // BLOCK) <= 2 * k:
        vals, ids = lax.top_k(x, k)
    else:
        blocks = _blocks(x)  # [R, NB, BLOCK]
        _, block_ids = lax.top_k(blocks.max(-1), k)  # [R, k]
        cand = jnp.take_along_axis(blocks, block_ids[:, :, None], 1).reshape(num_rows, k * BLOCK)
        vals, pos = lax.top_k(cand, k)
        ids = jnp.take_along_axis(block_ids, pos // BLOCK, 1) * BLOCK + pos % BLOCK
    # NOTE: the barrier keeps XLA from folding a caller's slice of the result into the sort + slice that
    # TopK lowers to on CPU; folded, it no longer matches the fast TopK rewrite and becomes a full sort (~100x).
    # One barrier per output: a barrier over the (vals, ids) pair takes the TopK tuple itself once the module is
    # partitioned over several devices (tensor parallelism), and XLA's CPU TopkDecomposer then aborts.
    return lax.optimization_barrier(vals), lax.optimization_barrier(ids.astype(jnp.int32))


def _argmax(x: jax.Array) -> jax.Array:
    """First index of each row's maximum, by blocks of BLOCK: block maxima, then one block.

    NOTE: on CPU, XLA's argmax over [64, 49152] (a variadic reduce) takes ~10x longer than this.
    """
    blocks = _blocks(x)  # [R, NB, BLOCK]
    block_max = blocks.max(-1)  # [R, NB]
    row_max = block_max.max(-1, keepdims=True)  # [R, 1]
    b = jnp.argmax(block_max == row_max, axis=-1)  # first block holding the maximum
    block = jnp.take_along_axis(blocks, b[:, None, None], 1)[:, 0]  # [R, BLOCK]
    return (b * BLOCK + jnp.argmax(block == row_max, axis=-1)).astype(jnp.int32)


def _sample_random(x: jax.Array, md: SamplingMetadata, is_random: jax.Array, num_candidates: int) -> jax.Array:
    """Temperature, top-k, top-p, min-p, then one draw per row. Returns [R] token ids."""
    probs = filtered_probs(x, md, is_random, num_candidates)
    with jax.named_scope("draw"):
        return _inverse_cdf(probs, draw_uniforms(md))


def draw_uniforms(md: SamplingMetadata, stream: int | None = None) -> jax.Array:
    """[R] uniforms in [0, 1) from `fold_in(key(seed), position)` (the draw's); `stream` folds in once more,
    for other independent draws at the same position (speculative acceptance tests)."""
    def one(seed, pos):
        key = jax.random.fold_in(jax.random.key(seed), pos)
        if stream is not None:
            key = jax.random.fold_in(key, stream)
        return jax.random.uniform(key, (), jnp.float32)
    return jax.vmap(one)(md.seeds, md.positions)


def filtered_probs(x: jax.Array, md: SamplingMetadata, is_random: jax.Array,
                   num_candidates: int = NUM_CANDIDATES) -> jax.Array:
    """Temperature, then top-k, top-p and min-p: [R, V] unnormalised probabilities (1 at each row's
    maximum, 0 where filtered out). `x` is the biased / penalised logits of `process_logits`."""
    def temperature(x):
        scaled = x / jnp.where(is_random, md.temperature, 1.0)[:, None]  # [R, V]
        return scaled, jnp.exp(scaled - scaled.max(-1, keepdims=True))  # probs unnormalised, 1 at the max

    with jax.named_scope("top_k_top_p"):
        # NOTE: the branch recomputes `temperature(x)`: taking its results as operands would make XLA
        # materialise two [R, V] arrays that otherwise fuse into the draw (~7 ms at R=64 on CPU).
        needs_filter = is_random & ((md.top_k > 0) | (md.top_p < 1))
        threshold = lax.cond(jnp.any(needs_filter),
                             lambda x: _top_k_top_p_threshold(*temperature(x), md, num_candidates),
                             lambda x: jnp.full(x.shape[:1], -jnp.inf), x)  # [R]
    scaled, probs = temperature(x)
    # NOTE: min-p compares with the most likely token, which top-k and top-p always keep, so it needs no
    # renormalisation: keep p_i >= min_p * p_max (as vLLM).
    keep = (scaled >= threshold[:, None]) & (probs >= md.min_p[:, None])
    return jnp.where(keep, probs, 0.0)


def _top_k_top_p_threshold(scaled: jax.Array, probs: jax.Array, md: SamplingMetadata,
                           num_candidates: int = NUM_CANDIDATES) -> jax.Array:
    """Per row, the smallest scaled logit that top-k then top-p keep (-inf where neither is on).

    Ties at a threshold are all kept. Top-p keeps the most likely tokens while the mass strictly above them
    is below top_p of the top-k-renormalised mass (vLLM's rule).
    """
    num_rows, vocab = scaled.shape
    num_cand = min(num_candidates, vocab)
    cand = _top_k(scaled, num_cand)[0]  # [R, C], descending
    k, top_p = md.top_k, md.top_p
    k_on, p_on = k > 0, top_p < 1
    thr_k = jnp.where(k_on, jnp.take_along_axis(cand, jnp.clip(k - 1, 0, num_cand - 1)[:, None], 1)[:, 0], -jnp.inf)
    # Exact when the k-th value and all its ties lie among the candidates.
    k_exact = ~k_on | (num_cand == vocab) | ((k <= num_cand) & (cand[:, -1] < thr_k))
    cand_p = jnp.exp(cand - cand[:, :1])  # [R, C], same scale as `probs`
    in_k = cand >= thr_k[:, None]
    total = probs.sum(-1)  # [R]
    mass_k = jnp.where(k_on, jnp.sum(jnp.where(in_k, cand_p, 0.0), -1), total)
    cum = jnp.cumsum(jnp.where(in_k, cand_p, 0.0), axis=-1)  # [R, C]
    reached = cum >= (top_p * mass_k)[:, None]
    thr_p = jnp.where(p_on, jnp.take_along_axis(cand, jnp.argmax(reached, -1)[:, None], 1)[:, 0], -jnp.inf)
    p_exact = ~p_on | (k_exact & reached[:, -1])
    fast = jnp.maximum(thr_k, thr_p)
    # NOTE: the fallback recomputes only rows the candidates could not settle, so a row's threshold never
    # depends on which other rows share its batch.
    return lax.cond(jnp.all(k_exact & p_exact), lambda: fast,
                    lambda: _bisect_threshold(scaled, probs, md, thr_k, k_exact, p_exact, fast))


def _bisect_threshold(scaled, probs, md, thr_k, k_exact, p_exact, fast):
    """Exact top-k / top-p thresholds over the whole vocabulary by bisection on order-preserving float keys."""
    keys = _sortable_key(scaled)  # [R, V] u32

    def largest_key_where(pred):
        # Largest key t with pred(t) (pred is monotone: true up to t*, false above).
        def body(_, lo_hi):
            lo, hi = lo_hi
            mid = lo + (hi - lo) // 2 + (hi - lo) % 2
            ok = pred(mid) | (mid == lo)  # mid == lo only once converged: keep it
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
        lo = jnp.zeros(scaled.shape[:1], jnp.uint32)
        hi = jnp.full(scaled.shape[:1], jnp.uint32(0xFFFFFFFF))
        return lax.fori_loop(0, 32, body, (lo, hi))[0]

    def bisect_k():
        key_k = largest_key_where(lambda t: jnp.sum(keys >= t[:, None], -1) >= md.top_k)
        return jnp.where(k_exact, thr_k, _from_sortable_key(key_k))

    thr_k = lax.cond(jnp.all(k_exact), lambda: thr_k, bisect_k)

    def bisect_p():
        in_k = jnp.where(scaled >= thr_k[:, None], probs, 0.0)  # [R, V]
        target = md.top_p * in_k.sum(-1)
        key_p = largest_key_where(lambda t: jnp.sum(jnp.where(keys >= t[:, None], in_k, 0.0), -1) >= target)
        return jnp.where(md.top_p < 1, _from_sortable_key(key_p), -jnp.inf)

    thr_p = lax.cond(jnp.all(p_exact), lambda: jnp.full_like(thr_k, -jnp.inf), bisect_p)
    return jnp.where(k_exact & p_exact, fast, jnp.maximum(thr_k, thr_p))


def _sortable_key(x: jax.Array) -> jax.Array:
    """f32 → u32 whose unsigned order is the float order (negatives: flip all bits; others: set the sign)."""
    bits = lax.bitcast_convert_type(x, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))


def _from_sortable_key(key: jax.Array) -> jax.Array:
    bits = jnp.where(key >> 31 == 1, key & jnp.uint32(0x7FFFFFFF), ~key)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _inverse_cdf(probs: jax.Array, u: jax.Array) -> jax.Array:
    """Draws index i with probability probs[i] / sum(probs) from u ~ U[0, 1), per row; zero-mass ids never.

    Two levels (blocks of BLOCK tokens, then a token in the chosen block) keep it to one pass over
    [R, V] plus small cumulative sums; each level picks the first entry whose cumulative mass exceeds u.
    """
    num_rows, vocab = probs.shape
    num_blocks = -(-vocab // BLOCK)
    probs = jnp.pad(probs, ((0, 0), (0, num_blocks * BLOCK - vocab)))
    blocks = probs.reshape(num_rows, num_blocks, BLOCK)  # [R, NB, BLOCK]
    block_mass = blocks.sum(-1)  # [R, NB]
    cum_blocks = jnp.cumsum(block_mass, axis=-1)
    target = u * cum_blocks[:, -1]  # [R]
    # Clamp to the last entry with mass: rounding can put `target` at or past the total.
    b = jnp.minimum(jnp.sum(cum_blocks <= target[:, None], -1), _last_positive(block_mass))
    before = jnp.where(b > 0, jnp.take_along_axis(cum_blocks, jnp.maximum(b - 1, 0)[:, None], 1)[:, 0], 0.0)
    block = jnp.take_along_axis(blocks, b[:, None, None], 1)[:, 0]  # [R, BLOCK]
    cum = jnp.cumsum(block, axis=-1)
    j = jnp.minimum(jnp.sum(cum <= (target - before)[:, None], -1), _last_positive(block))
    return (b * BLOCK + j).astype(jnp.int32)


def _last_positive(x: jax.Array) -> jax.Array:
    n = x.shape[-1]
    return n - 1 - jnp.argmax(x[:, ::-1] > 0, axis=-1)
