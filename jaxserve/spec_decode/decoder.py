"""Speculative decoding in the engine: who proposes, how a verify step is fed, and what it is counted as.

Per engine step (all on the engine thread):
  1. `schedule()` gives every decoding request with proposals (`Request.spec_token_ids`) its last token
     plus k <= K proposals as one chunk; prefill chunks and requests without proposals are unchanged.
  2. `SpecDecoder.execute` builds, for each sampled chunk, L = K + 1 sub-row samplings (sub-row j samples
     position num_tokens + j, with the proposals before it in its history) and runs the runner's verify
     step: one target forward over every chunk, then the rejection sampler (`rejection_sampler.py`).
  3. `update_from_output` appends the emitted tokens and rolls back the rejected ones' K/V.
  4. `SpecDecoder.propose` sets the next proposals of every decoding request: n-gram lookup on the host
     (`ngram_proposer.py`) or K decode steps of the draft model (`draft_proposer.py`).

A step in which no request has proposals runs the runner's plain step instead (same tokens, less work).

Settings are server-wide (method, K, the draft model). Per request, a request whose proposals are mostly
rejected stops proposing for a while (`backoff.py`, `--speculative-min-accepted`); no request proposes while more
than `--speculative-disable-by-batch-size` run (off by default, as in vLLM); and speculation is skipped for
requests that ask for `logprobs` (a verify step reports log-probs of its first token only); such requests share
verify steps with speculating ones as rows with zero proposals, which sample exactly as without speculation.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

from jaxserve.core.request import Request
from jaxserve.spec_decode.backoff import SpeculationBackoff
from jaxserve.spec_decode.ngram_proposer import NgramProposer


@dataclasses.dataclass
class SpecDecodeStats:
    """Counters since start (the server exports them as `jaxserve:spec_decode_*`)."""

    num_spec_tokens: int  # K
    num_drafts: int = 0  # verified chunks that carried at least one proposal
    num_draft_tokens: int = 0  # proposals verified
    num_accepted_tokens: int = 0  # proposals accepted
    num_emitted_tokens: int = 0  # tokens emitted by chunks with proposals (accepted + one each)
    accepted_per_position: list[int] = dataclasses.field(default_factory=list)  # [K]: accepted at position j
    proposed_per_position: list[int] = dataclasses.field(default_factory=list)  # [K]: proposed at position j

    def __post_init__(self):
        self.accepted_per_position = self.accepted_per_position or [0] * self.num_spec_tokens
        self.proposed_per_position = self.proposed_per_position or [0] * self.num_spec_tokens

    def record(self, num_proposed: int, num_emitted: int) -> None:
        if num_proposed == 0:
            return
        accepted = num_emitted - 1
        self.num_drafts += 1
        self.num_draft_tokens += num_proposed
        self.num_accepted_tokens += accepted
        self.num_emitted_tokens += num_emitted
        for j in range(num_proposed):
            self.proposed_per_position[j] += 1
            self.accepted_per_position[j] += j < accepted

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens emitted per verified chunk with proposals (1 + mean accepted proposals)."""
        return self.num_emitted_tokens / self.num_drafts if self.num_drafts else 0.0

    @property
    def acceptance_rate_per_position(self) -> list[float]:
        return [a / p if p else 0.0 for a, p in zip(self.accepted_per_position, self.proposed_per_position)]

    def summary(self) -> dict:
        return {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens, "num_emitted_tokens": self.num_emitted_tokens,
                "acceptance_rate": self.acceptance_rate, "mean_accepted_length": self.mean_accepted_length,
                "acceptance_rate_per_position": self.acceptance_rate_per_position}


RowFn = Callable[[Request, Sequence[int]], object]  # (request, proposals before the position) -> RowSampling


class SpecDecoder:
    """Owns the proposer and the speculative counters; the engine calls `execute` and `propose` each step."""

    def __init__(self, config, runner, *, draft=None):
        self.k = config.num_speculative_tokens
        self.method = config.spec_method
        self.runner = runner
        self.stats = SpecDecodeStats(self.k)
        self.backoff = SpeculationBackoff(config.speculative_min_accepted)
        self.disable_by_batch_size = config.speculative_disable_by_batch_size
        if self.method == "ngram":
            self.proposer = NgramProposer(self.k, config.ngram_prompt_lookup_min, config.ngram_prompt_lookup_max,
                                          max_context=runner.max_model_len)
        else:
            self.proposer = draft  # a DraftProposer, built by the engine

    def wants_proposals(self, request: Request) -> bool:
        return (request.sampling_params.logprobs is None
                and request.num_computed_tokens == request.num_tokens - 1)

    def propose(self, running: Sequence[Request]) -> None:
        """Sets `spec_token_ids` of every decoding request (the next step verifies them)."""
        todo = [r for r in running if self.wants_proposals(r) and self.backoff.allows(r.request_id)]
        if 0 < self.disable_by_batch_size < len(running):
            # NOTE: a large batch is compute-bound, so every proposal costs nearly a token's work while a
            # rejected one wins nothing (vLLM's `disable_by_batch_size`): plain decode steps until it shrinks.
            todo = []
        if self.method == "ngram":
            for request in todo:
                request.spec_token_ids = self.proposer.propose(request.all_token_ids, self.k)
        else:
            self.proposer.propose(todo, running)

    def execute(self, chunks, row_fn: RowFn):
        """One verify step over the scheduled chunks; returns the runner's output (with `emitted`)."""
        if not any(c.num_spec for c in chunks):
            # NOTE: no proposals anywhere in the step (no n-gram match, all prefill): the plain step is cheaper
            # (one logit row per request, no rejection sampler) and samples the very same tokens.
            rows = [row_fn(c.request, []) if c.sample else None for c in chunks]
            out = self.runner.execute(chunks, rows)
            out.emitted = [[int(t)] for t in out.token_ids]
            return out
        L = self.k + 1
        rows = []
        for c in chunks:
            if not c.sample:
                rows.append(None)
                continue
            proposals = c.token_ids[len(c.token_ids) - c.num_spec:] if c.num_spec else []
            rows.append([row_fn(c.request, proposals[:j]) for j in range(L)])
        draft_probs = self.proposer.probs_for(chunks) if self.method == "draft" else None
        out = self.runner.execute_spec(chunks, rows, draft_probs)
        sampled = {c.request_id: c.num_spec for c in chunks if c.sample}
        for rid, emitted in zip(out.request_ids, out.emitted):
            self.stats.record(sampled[rid], len(emitted))
            self.backoff.record(rid, sampled[rid], len(emitted) - 1)
        return out

    def release(self, request_ids) -> None:
        """Forget requests that left the running set (the draft frees their pages)."""
        self.backoff.release(request_ids)
        if self.method == "draft":
            self.proposer.release(request_ids)
