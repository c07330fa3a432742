"""Scheduler: decides how many tokens each request computes this step (plain Python, no JAX).

Continuous batching with chunked prefill, prefix caching and recompute preemption, in the style of
vLLM v1: there is no prefill or decode phase, only requests whose `num_computed_tokens` catch up with
their `num_tokens` a budgeted number of tokens at a time.

Thread-safety: none. The engine calls every method from its one engine thread (other threads hand it
commands through a queue), so the scheduler, the KV cache manager and the requests' counters are
owned by that thread.
"""

from __future__ import annotations

import bisect
import dataclasses
import time

import numpy as np

from jaxserve.core.kv_cache_manager import KVCacheManager
from jaxserve.core.request import Request, RequestStatus


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 16  # running requests at most (rows of a step)
    max_num_batched_tokens: int = 512  # tokens computed per step at most
    max_model_len: int = 2048  # prompt + output tokens of one request at most
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0  # >0: cap on the tokens one request gets in a step

    def __post_init__(self):
        if min(self.max_num_seqs, self.max_num_batched_tokens, self.max_model_len) < 1:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_model_len must be positive")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be at least "
                             f"max_num_seqs={self.max_num_seqs} (each running request needs a token a step)")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(f"without chunked prefill max_num_batched_tokens={self.max_num_batched_tokens} must "
                             f"be at least max_model_len={self.max_model_len}, or long prompts never run")
        if self.long_prefill_token_threshold < 0:
            raise ValueError("long_prefill_token_threshold must be >= 0")


@dataclasses.dataclass
class ScheduledChunk:
    """One request's share of a step; duck-types `step_inputs.SeqChunk`."""

    request_id: str
    token_ids: list[int]  # the tokens computed this step: a prompt chunk, or the last sampled token
    start_pos: int  # == the request's num_computed_tokens before the step
    page_table: list[int]  # covers start_pos + len(token_ids) tokens
    sample: bool  # the chunk reaches the end of the known tokens: sample a new one from its last logits
    request: Request
    num_spec: int = 0  # token_ids ends with this many proposals (request.spec_token_ids) to verify


@dataclasses.dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk]
    num_scheduled_tokens: int
    preempted_ids: list[str]
    finished: list[Request]  # finished outside a step (abort, finish_request, can never fit): final outputs due


@dataclasses.dataclass
class RequestUpdate:
    request_id: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None
    status: RequestStatus


@dataclasses.dataclass
class SchedulerStats:
    num_running: int
    num_waiting: int
    num_preemptions: int  # since start
    num_steps: int  # steps that computed at least one token
    num_scheduled_tokens: int  # since start
    last_step_tokens: int
    prefix_cache_queries: int  # tokens
    prefix_cache_hits: int  # tokens
    prefix_cache_hit_rate: float
    kv_usage: float
    kv_used_pages: int
    kv_total_pages: int  # usable pages (the null page excluded)
    kv_waste_tokens: int

    @property
    def mean_tokens_per_step(self) -> float:
        return self.num_scheduled_tokens / self.num_steps if self.num_steps else 0.0


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache_manager: KVCacheManager):
        self.config = config
        self.kv = kv_cache_manager
        self.requests: dict[str, Request] = {}  # every unfinished request
        self.running: list[Request] = []  # in admission order: the last one is preempted first
        self.waiting: list[Request] = []  # sorted by _queue_key
        self._finished_outside: list[Request] = []  # reported by the next schedule()
        self._groups: dict[str, int] = {}  # group_id -> unfinished members
        self._groups_prompt_done: set[str] = set()  # groups whose shared prompt has been computed once
        self._arrivals = 0
        self._order: dict[str, int] = {}  # request_id -> add order (ties of priority and arrival)
        self.num_preemptions = 0
        self.num_steps = 0
        self.num_scheduled_tokens = 0
        self.last_step_tokens = 0

    # ------------------------------------------------------------------ requests in and out

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in the scheduler")
        self.requests[request.request_id] = request
        self._order[request.request_id] = self._arrivals
        self._arrivals += 1
        if request.group_id is not None:
            self._groups[request.group_id] = self._groups.get(request.group_id, 0) + 1
        error = self._never_fits(request)
        if error:
            request.error = error
            self._finish(request, RequestStatus.FINISHED_ERROR)
            self._finished_outside.append(request)
            return
        request.status = RequestStatus.WAITING
        bisect.insort(self.waiting, request, key=self._queue_key)

    def abort_request(self, request_id: str) -> bool:
        """Aborts an unfinished request; False if unknown or already finished."""
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request_id: str, status: RequestStatus) -> bool:
        """Finishes a waiting or running request outside a step (abort, a stop string seen by the engine)."""
        if not status.is_finished():
            raise ValueError(f"{status!r} is not a finished status")
        request = self.requests.get(request_id)
        if request is None:
            return False
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        self._finish(request, status)
        self._finished_outside.append(request)
        return True

    def has_unfinished(self) -> bool:
        """Requests left to run, or finished ones whose final output the next schedule() reports."""
        return bool(self.running or self.waiting or self._finished_outside)

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self.running), num_waiting=len(self.waiting), num_preemptions=self.num_preemptions,
            num_steps=self.num_steps, num_scheduled_tokens=self.num_scheduled_tokens,
            last_step_tokens=self.last_step_tokens, prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits, prefix_cache_hit_rate=self.kv.prefix_hit_rate,
            kv_usage=self.kv.usage, kv_used_pages=self.kv.pool.num_used_pages,
            kv_total_pages=self.kv.num_usable_pages, kv_waste_tokens=self.kv.kv_waste_tokens())

    # ------------------------------------------------------------------ one step

    def schedule(self) -> SchedulerOutput:
        # NOTE(invariant): every request has `num_computed_tokens` (K/V in the cache) catching up with
        # `num_tokens` (prompt + output). A step gives each request a token count, under the budget of
        # `max_num_batched_tokens` in all and `max_num_seqs` requests. Prefill, chunked prefill, prefix hits
        # and decode are the same arithmetic: a decode is a request one token behind; a prefix hit starts a
        # request with `num_computed_tokens` > 0; a long prompt is several steps of chunks.
        #   1. Running requests first, in admission order. Each keeps one token of the budget for every
        #      running request after it, so a long prompt's chunk never starves the decodes behind it.
        #      If the pool runs dry, the most recently admitted running request is preempted (pages freed,
        #      recomputed later from its prompt + output) until the allocation fits.
        #   2. Then waiting requests by (priority, preempted first, arrival), while seats and budget last.
        #      The queue head blocks the ones behind it (FCFS); siblings waiting on their group's shared
        #      prompt are skipped instead. No admission in a step that preempted: it would thrash.
        # Speculative decoding is the same arithmetic too: a decoding request with proposals computes its
        # last token plus k proposals (k capped by the budget, max_tokens and max_model_len), and
        # `update_from_output` rolls `num_computed_tokens` (and the pages past it) back to what was accepted.
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []

        i = 0
        while i < len(self.running):
            request = self.running[i]
            reserve = len(self.running) - i - 1
            num_new = self._num_new_tokens(request, budget - reserve)
            if num_new == 0:
                i += 1
                continue
            num_spec = self._num_spec_tokens(request, num_new, budget - reserve)
            num_new += num_spec
            while self.kv.allocate_slots(request, num_new) is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                chunks.append(self._chunk(request, num_new, num_spec))
                budget -= num_new
                i += 1

        if not preempted:
            j = 0
            while j < len(self.waiting) and len(self.running) < self.config.max_num_seqs and budget > 0:
                request = self.waiting[j]
                if self._waits_for_sibling(request):
                    j += 1
                    continue
                hit_pages, hit_tokens = self._prefix_hit(request)
                num_new = self._num_new_tokens(request, budget, num_computed=hit_tokens)
                if num_new == 0 or self.kv.allocate_slots(request, num_new, hit_pages) is None:
                    break
                del self.waiting[j]
                now = time.monotonic()
                if request.first_scheduled_time is None:
                    request.first_scheduled_time = now
                    request.num_cached_tokens = hit_tokens
                request.num_computed_tokens = hit_tokens
                request.status = RequestStatus.RUNNING
                self.running.append(request)
                chunks.append(self._chunk(request, num_new))
                budget -= num_new

        num_tokens = self.config.max_num_batched_tokens - budget
        if chunks:
            self.num_steps += 1
            self.num_scheduled_tokens += num_tokens
        self.last_step_tokens = num_tokens
        finished, self._finished_outside = self._finished_outside, []
        return SchedulerOutput(chunks, num_tokens, preempted, finished)

    def update_from_output(self, sched_out: SchedulerOutput, sampled: dict[str, int]) -> list[RequestUpdate]:
        """Applies a step's results: advance counters, append sampled tokens, cache full pages, finish.

        Args:
          sched_out: what `schedule()` returned for this step.
          sampled: request_id -> sampled token for every chunk with `sample=True`; for a chunk with proposals,
            the list of emitted tokens (the accepted proposals, then one more).
        """
        updates = []
        now = time.monotonic()
        for chunk in sched_out.chunks:
            request = chunk.request
            if request.is_finished():  # finished by the engine between schedule() and now
                continue
            request.num_computed_tokens += len(chunk.token_ids)
            emitted = sampled.get(request.request_id) if chunk.sample else None
            emitted = [emitted] if isinstance(emitted, (int, np.integer)) else emitted
            if chunk.num_spec:
                # NOTE: roll back the K/V of rejected proposals before caching full pages: only the last known
                # token and the accepted proposals are computed, the pages past them go back to the pool.
                num_accepted = len(emitted) - 1
                if not 0 <= num_accepted <= chunk.num_spec or emitted[:num_accepted] != chunk.token_ids[
                        len(chunk.token_ids) - chunk.num_spec:][:num_accepted]:
                    raise ValueError(f"request {request.request_id!r}: emitted {emitted} do not start with "
                                     f"accepted proposals of {chunk.token_ids[-chunk.num_spec:]}")
                request.num_computed_tokens -= chunk.num_spec - num_accepted
                self.kv.trim(request)
            request.spec_token_ids = []
            self.kv.cache_full_pages(request)
            if request.group_id is not None and request.num_computed_tokens >= request.num_prompt_tokens:
                self._groups_prompt_done.add(request.group_id)
            new_token_ids: list[int] = []
            status = None
            if chunk.sample:
                if not emitted:
                    raise ValueError(f"no sampled token for request {request.request_id!r}, whose chunk samples")
                for token in emitted:
                    token = int(token)
                    request.output_token_ids.append(token)
                    new_token_ids.append(token)
                    status = self._stop_status(request, token)
                    if status is not None:
                        break
                if request.first_token_time is None:
                    request.first_token_time = now
                request.last_token_time = now
            if status is not None:
                self.running.remove(request)
                self._finish(request, status)
            updates.append(RequestUpdate(request.request_id, new_token_ids, status is not None,
                                         request.status.finish_reason, request.status))
        return updates

    # ------------------------------------------------------------------ helpers

    def _num_new_tokens(self, request: Request, budget: int, num_computed: int | None = None) -> int:
        """Tokens the request computes this step under `budget`: all it lacks, or a chunk of it."""
        computed = request.num_computed_tokens if num_computed is None else num_computed
        remaining = request.num_tokens - computed
        cap = budget
        if self.config.long_prefill_token_threshold:
            cap = min(cap, self.config.long_prefill_token_threshold)
        if remaining > cap and not self.config.enable_chunked_prefill:
            return 0
        return max(0, min(remaining, cap))

    def _num_spec_tokens(self, request: Request, num_new: int, budget: int) -> int:
        """Proposals to verify along with a decoding request's last token, under `budget` for both."""
        if not request.spec_token_ids or request.num_computed_tokens + num_new != request.num_tokens or num_new != 1:
            return 0
        # A step emits at most k + 1 tokens: no point verifying past max_tokens or max_model_len.
        left = self.config.max_model_len - request.num_tokens
        if request.max_tokens is not None:
            left = min(left, request.max_tokens - request.num_output_tokens - 1)
        return max(0, min(len(request.spec_token_ids), budget - num_new, left))

    def _chunk(self, request: Request, num_new: int, num_spec: int = 0) -> ScheduledChunk:
        start = request.num_computed_tokens
        end = start + num_new - num_spec
        tokens = request.token_slice(start, end) + request.spec_token_ids[:num_spec]
        return ScheduledChunk(request.request_id, tokens, start, self.kv.get_page_table(request.request_id),
                              sample=end == request.num_tokens, request=request, num_spec=num_spec)

    def _preempt(self, request: Request) -> None:
        # NOTE: recompute preemption. The pages go back to the pool (full ones stay findable by hash, so a
        # readmission often hits its own prefix); the output so far is kept and recomputed as prompt.
        self.kv.free(request)
        request.spec_token_ids = []
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        bisect.insort(self.waiting, request, key=self._queue_key)

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.kv.free(request)
        request.status = status
        request.finished_time = time.monotonic()
        del self.requests[request.request_id]
        del self._order[request.request_id]
        gid = request.group_id
        if gid is not None:
            self._groups[gid] -= 1
            if self._groups[gid] == 0:
                del self._groups[gid]
                self._groups_prompt_done.discard(gid)

    def _queue_key(self, request: Request) -> tuple:
        # Preempted requests go to the front of their priority class: they were already being served.
        return (request.priority, request.status != RequestStatus.PREEMPTED, request.arrival_time,
                self._order[request.request_id])

    def _prefix_hit(self, request: Request) -> tuple[list[int], int]:
        # NOTE: a request that asks for prompt logprobs computes its whole prompt: the logits of the tokens a
        # cache hit would skip are what it asked for. Its full pages are still cached for others.
        if request.sampling_params.prompt_logprobs is not None:
            return [], 0
        return self.kv.get_computed_pages(request)

    def _waits_for_sibling(self, request: Request) -> bool:
        """A sibling waits while another member of its group computes the shared prompt, so that it then
        hits that prompt's cached pages instead of computing them again."""
        gid = request.group_id
        if (gid is None or not self.kv.enable_prefix_caching or gid in self._groups_prompt_done
                or request.sampling_params.prompt_logprobs is not None):
            return False
        return any(r.group_id == gid for r in self.running)

    def _never_fits(self, request: Request) -> str | None:
        prompt, max_len = request.num_prompt_tokens, self.config.max_model_len
        if prompt >= max_len:
            return (f"the prompt has {prompt} tokens but max_model_len is {max_len}: "
                    f"no room for a single output token")
        max_tokens = request.max_tokens if request.max_tokens is not None else max_len
        # The last sampled token is never fed back, so the K/V holds at most this many tokens.
        kv_tokens = min(prompt + max_tokens, max_len) - 1
        if not self.kv.can_ever_fit(kv_tokens):
            return (f"the request needs {self.kv.pages_for(kv_tokens)} KV pages ({prompt} prompt + "
                    f"{max_tokens} max_tokens tokens, {self.kv.page_size} tokens a page) but the cache has only "
                    f"{self.kv.num_usable_pages}; lower max_tokens or give the KV cache more memory")
        return None

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        params = request.sampling_params
        # NOTE: as in vLLM, the stop token itself counts toward min_tokens (the sampler bans stop tokens
        # while fewer than min_tokens have been generated; this check guards against a stray one).
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
            if token in params.stop_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if request.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
