"""Draft-model proposals: a small model with its own paged KV cache runs K decode steps per engine step.

Per engine step, for every decoding request (the `SpecDecoder` picks them):
  1. Roll back: the draft's K/V of its own rejected proposals is dropped (`KVCacheManager.trim`).
  2. Catch up: one chunk per request with the tokens the draft has not computed yet (the whole prompt after
     admission, else the accepted proposals and the target's last token), sampling d_0.
  3. K - 1 decode steps, each feeding d_{j-1} and sampling d_j.
Each sampled d_j comes with q_j, the draft's distribution after the request's own sampling parameters
(the same `sampler` code as the target's), kept on the device as [R, K, V] for the verify step. Draft
draws use the request's seed with `DRAFT_SEED_XOR`, independent of the target's acceptance and draws.

The draft's pages live in their own `KVCacheManager` (no prefix caching) over a pool as large as the
target's plus K tokens a sequence; a request the draft cannot fit (pool full, or its catch-up larger than
the step budget) just gets no proposals this step.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import EngineConfig, ModelConfig
from jaxserve.core.kv_cache_manager import KVCacheManager
from jaxserve.model import attention_backends, llama
from jaxserve.model.checkpoint import load_checkpoint
from jaxserve.model.sampler import GREEDY_TEMPERATURE, build_sampling_metadata, filtered_probs, process_logits, sample
from jaxserve.model.step_inputs import SeqChunk, StepBuckets, build_step_inputs

logger = logging.getLogger(__name__)

DRAFT_SEED_XOR = 0x2545F491


@dataclasses.dataclass
class _DraftSeq:
    """The draft's view of one request, duck-typing `Request` for its KVCacheManager."""

    request_id: str
    num_computed_tokens: int = 0  # tokens whose draft K/V is in the draft cache
    base: int = 0  # request.num_tokens when the last proposals were made
    proposals: list[int] = dataclasses.field(default_factory=list)
    num_tokens: int = 0  # for the manager's lookup statistics only


class DraftProposer:
    def __init__(self, config: EngineConfig, checkpoint_dir: str, target_runner, row_fn):
        self.k = config.num_speculative_tokens
        self.row_fn = row_fn
        self.page_size = config.block_size
        self.max_model_len = target_runner.max_model_len
        self.max_pages_per_seq = target_runner.max_pages_per_seq
        self.budget = config.max_num_batched_tokens
        self.max_rows = config.max_num_seqs
        t0 = time.perf_counter()
        self.model_config, self.weights = load_checkpoint(checkpoint_dir, target_runner.dtype)
        logger.info("loaded draft %s (%d layers) in %.1fs", checkpoint_dir, self.model_config.num_layers,
                    time.perf_counter() - t0)
        num_pages = target_runner.num_pages + config.max_num_seqs * (-(-self.k // self.page_size) + 1)
        self.kv_pages = jnp.zeros(llama.kv_cache_shape(self.model_config, num_pages, self.page_size),
                                  target_runner.dtype)
        self.kv = KVCacheManager(num_pages, self.page_size, enable_prefix_caching=False,
                                 max_model_len=self.max_model_len)
        self.buckets = StepBuckets(config.max_num_seqs, config.max_num_batched_tokens, self.k + 1)
        _, attention = attention_backends.select_attention(
            config.attention_backend,
            shape=attention_backends.ProbeShape.for_model(self.model_config, self.page_size, target_runner.dtype))
        self._step = jax.jit(functools.partial(_draft_step, cfg=self.model_config, attention=attention),
                             donate_argnums=(1,))
        self._seqs: dict[str, _DraftSeq] = {}
        self._probs = None  # [R, K, V] q of the last proposals, on the device
        self._row_of: dict[str, int] = {}

    @property
    def vocab_size(self) -> int:
        return self.model_config.vocab_size

    def warmup(self) -> float:
        t0 = time.perf_counter()
        for num_tokens, num_rows in self.buckets.shapes():
            self._run([], [], num_tokens, num_rows)
        return time.perf_counter() - t0

    def release(self, request_ids) -> None:
        for rid in request_ids:
            seq = self._seqs.pop(rid, None)
            if seq is not None:
                self.kv.free(seq)

    def probs_for(self, chunks) -> jax.Array | None:
        """[len(chunks), K, V] q of each chunk's proposals (rows without proposals: any row)."""
        if self._probs is None or not chunks:
            return None
        idx = np.array([self._row_of.get(c.request_id, 0) for c in chunks], np.int32)
        return jnp.take(self._probs, jnp.asarray(idx), axis=0)

    def propose(self, todo, running) -> None:
        """Sets `spec_token_ids` of each request in `todo` (decoding requests) from K draft steps."""
        self._probs, self._row_of = None, {}
        # NOTE: only this round's proposals may be verified: their q is what the verify step gets.
        for request in running:
            request.spec_token_ids = []
        active, partial, budget = [], [], self.budget
        for request in todo:
            if len(active) + len(partial) >= self.max_rows or budget <= 0:
                break
            seq = self._seqs.setdefault(request.request_id, _DraftSeq(request.request_id))
            # 1. Roll back to the proposals the target accepted.
            if seq.proposals:
                real = request.token_slice(seq.base, seq.base + len(seq.proposals) - 1)
                m = 0
                while m < len(real) and real[m] == seq.proposals[m]:
                    m += 1
                seq.num_computed_tokens = min(seq.num_computed_tokens, seq.base + m)
                seq.proposals = []
                self.kv.trim(seq)
            seq.num_tokens = request.num_tokens
            missing = request.num_tokens - seq.num_computed_tokens
            if request.num_tokens + self.k - 1 > self.max_model_len:
                continue
            if missing <= budget:
                if self.kv.allocate_slots(seq, missing + self.k - 1) is None:
                    continue
                active.append((request, seq, missing))
                budget -= missing
            elif self.kv.allocate_slots(seq, budget) is not None:
                partial.append((request, seq, budget))  # 2'. catch up part of the way, no proposals yet
                budget = 0
        if not active and not partial:
            return
        # 2. Catch-up chunks, sampling d_0 for the active ones.
        chunks = []
        for request, seq, n in active + partial:
            start = seq.num_computed_tokens
            table = self.kv.get_page_table(seq.request_id)
            chunks.append(SeqChunk(request.token_slice(start, start + n), start, table))
            seq.num_computed_tokens += n
        rows = [self._row(request, []) for request, _, _ in active]
        tokens, probs = self._run(chunks, rows)
        drafts = [[int(tokens[i])] for i in range(len(active))]
        all_probs = [probs[:len(active)]]
        # 3. K - 1 decode steps.
        for _ in range(1, self.k):
            chunks = [SeqChunk([d[-1]], seq.num_computed_tokens, self.kv.get_page_table(seq.request_id))
                      for (_, seq, _), d in zip(active, drafts)]
            for _, seq, _ in active:
                seq.num_computed_tokens += 1
            rows = [self._row(request, d) for (request, _, _), d in zip(active, drafts)]
            tokens, probs = self._run(chunks, rows)
            for i, d in enumerate(drafts):
                d.append(int(tokens[i]))
            all_probs.append(probs[:len(active)])
        if not active:
            return
        self._probs = jnp.stack(all_probs, axis=1)  # [A, K, V]
        for i, ((request, seq, _), d) in enumerate(zip(active, drafts)):
            seq.base, seq.proposals = request.num_tokens, d
            request.spec_token_ids = d
            self._row_of[request.request_id] = i

    def _row(self, request, proposals):
        row = self.row_fn(request, proposals)
        return dataclasses.replace(row, seed=(row.seed ^ DRAFT_SEED_XOR) % 2**31)

    def _run(self, chunks, rows, num_tokens: int | None = None, num_rows: int | None = None):
        if num_tokens is None:
            num_tokens, num_rows = self.buckets.choose(sum(len(c.token_ids) for c in chunks), len(chunks))
        step = build_step_inputs(chunks, num_tokens=num_tokens, num_rows=num_rows, page_size=self.page_size,
                                 max_pages_per_seq=self.max_pages_per_seq)
        md = build_sampling_metadata(list(rows) + [None] * (num_rows - len(rows)), num_rows, self.vocab_size,
                                     self.max_model_len)
        tokens, probs, self.kv_pages = self._step(self.weights, self.kv_pages, step, md)
        return np.asarray(tokens), probs


def _draft_step(weights: llama.LlamaWeights, kv_pages: jax.Array, step, md, *, cfg: ModelConfig, attention):
    logits, kv_pages = llama.forward(weights, kv_pages, step, cfg, attention)  # [R, V]
    tokens = sample(logits, md, num_logprobs=0).token_ids  # drawn from q below (the same filtering and draw)
    is_random = md.temperature > GREEDY_TEMPERATURE
    q = filtered_probs(process_logits(logits, md), md, is_random)
    return tokens, q / q.sum(-1, keepdims=True), kv_pages
