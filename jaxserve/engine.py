"""LLMEngine: requests in, streams of text and token deltas out.

Threads and ownership:
  * The engine thread (`start()`), or the caller itself when it drives `step()` (offline `LLM`), is
    the only one that touches the scheduler, the KV cache manager, the model runner and the per-choice
    text state.
  * Any other thread may call `add_request()` and `abort()`: they validate, then put a command on
    `self._inbox` (a `queue.Queue`) which the engine thread drains at the top of every step.
  * Each request's deltas go to its `RequestStream` (a `queue.Queue` per request) which the caller's
    thread reads; the server bridges it to asyncio.
  * With speculative decoding on, `self.spec` (a `SpecDecoder`, engine thread only) runs each step (a
    verify step when any request has proposals) and proposes the next step's tokens (see `spec_decode.py`).

Host/device overlap (docs/engine.md): `step()` dispatches step N without waiting (JAX dispatch is async),
then turns step N-1's tokens into text (`self._pending`: detokenization, stop strings, the stream puts)
while the device computes, then collects step N and updates the scheduler. Scheduling reads token ids,
never text, so this changes no token; deltas reach their streams one step later. Speculative steps stay
serial. Constrained requests' next grammar masks are computed on `self.structured`'s worker thread from the
moment step N's tokens are known until step N + 1 is built (docs/structured-output.md).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import queue
import random
import threading
import time
from typing import Sequence

import numpy as np

from jaxserve.config import EngineConfig
from jaxserve.core.kv_cache_manager import KVCacheManager
from jaxserve.core.outputs import RequestDelta, RequestStream, TokenLogprob
from jaxserve.core.request import Request, RequestStatus
from jaxserve.core.sampling_params import SamplingParams, SamplingParamsError
from jaxserve.core.scheduler import Scheduler, SchedulerConfig
from jaxserve.engine_client import (
    ITERATION_TOKEN_BUCKETS,
    EngineHealth,
    EngineStatsSnapshot,
    SpecDecodeSnapshot,
    bucket_index,
)
from jaxserve.model.sampler import BIAS_WIDTH, RowSampling
from jaxserve.model_registry import resolve_engine_model, resolve_model
from jaxserve.spec_decode.decoder import SpecDecoder
from jaxserve.text.chat_template import load_chat_template
from jaxserve.text.generation_config import sampling_defaults
from jaxserve.text.output_processor import ChoiceText
from jaxserve.text.structured_output_manager import StructuredOutputManager
from jaxserve.text.tokenizer import load_tokenizer
from jaxserve.worker import compilation_cache
from jaxserve.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class RequestTooLongError(ValueError):
    """Prompt plus max_tokens exceed the context; the message carries the numbers."""


@dataclasses.dataclass
class _Choice:
    stream: RequestStream
    index: int
    request: Request
    text: ChoiceText
    sent_first: bool = False
    # SamplingParams.prompt_logprobs: entry p for prompt token p (None for p = 0 and until computed); None once
    # sent (with the first delta) or when not asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None


class LLMEngine:
    """The one orchestrator; implements `EngineClient` (and `OfflineEngineClient`: `step()` on the caller's thread)."""

    def __init__(self, config: EngineConfig, *, warmup: bool = True, runner: ModelRunner | None = None,
                 tokenizer=None):
        """`runner` and `tokenizer` replace the ones built from `config.model` (benchmarks of the host side)."""
        self.config = config
        if runner is None or tokenizer is None:
            checkpoint_dir = resolve_engine_model(config)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(checkpoint_dir)
        if config.chat_template:
            self.tokenizer.chat_template = load_chat_template(config.chat_template)
        # Sampling defaults from --generation-config; front ends apply them to the fields a request leaves out.
        self.default_sampling = sampling_defaults(config.generation_config,
                                                  checkpoint_dir if tokenizer is None else None)
        self.runner = runner if runner is not None else ModelRunner(config, checkpoint_dir)
        self.max_model_len = self.runner.max_model_len
        self.kv_cache = KVCacheManager(self.runner.num_pages, config.block_size, config.enable_prefix_caching,
                                       self.max_model_len)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=config.max_num_seqs,
                                                   max_num_batched_tokens=config.max_num_batched_tokens,
                                                   max_model_len=self.max_model_len), self.kv_cache)
        self.eos_token_ids = frozenset(self.tokenizer.eog_ids)
        # Grammars and allowed_token_ids: per-sequence matchers and the bitmask rows of their next steps.
        self.structured = StructuredOutputManager(self.tokenizer, self.runner.vocab_size)
        self._choices: dict[str, _Choice] = {}  # sub-request id -> its choice state
        self._pending = None  # (updates, ModelRunnerOutput) of the last step, not yet turned into text
        self._inbox: queue.Queue = queue.Queue()
        self._ids = itertools.count()
        self._rng = random.Random(config.seed)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wakeup = threading.Event()
        self._progress_time = time.monotonic()  # the step loop's last finished iteration (liveness)
        self.spec = self._build_spec(config) if config.spec_tokens else None
        if warmup:
            self.structured.compiler.prepare()  # llguidance's view of the vocabulary, alongside the compiles
        self.warmup_seconds = self.runner.warmup() if warmup else 0.0
        if self.spec is not None and self.spec.method == "draft" and warmup:
            self.warmup_seconds += self.spec.proposer.warmup()
        if warmup:
            logger.info("compilation cache: %(hits)d of %(requests)d compiles so far loaded from it",
                        compilation_cache.stats())
        self._compiled_at_warmup = self.runner.num_compiled() if warmup else 0
        self.stats = EngineStats()

    def _build_spec(self, config: EngineConfig) -> SpecDecoder:
        draft = None
        if config.spec_method == "draft":
            from jaxserve.spec_decode.draft_proposer import DraftProposer  # NOTE: loads a second model; only when asked

            draft = DraftProposer(config, resolve_model(config.speculative_model), self.runner, self._row_sampling)
            if draft.vocab_size != self.runner.vocab_size:
                raise ValueError(f"the draft's vocabulary ({draft.vocab_size}) differs from the model's "
                                 f"({self.runner.vocab_size}); a draft must share the tokenizer")
        return SpecDecoder(config, self.runner, draft=draft)

    # ------------------------------------------------------------------ any thread

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, priority: int = 0) -> RequestStream:
        """Validates and enqueues a request; raises ValueError (RequestTooLongError, SamplingParamsError)."""
        params = params or SamplingParams()
        prompt_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if params.truncate_prompt_tokens is not None:
            prompt_ids = prompt_ids[-params.truncate_prompt_tokens:]  # vLLM keeps the last k tokens
        self.validate(prompt_ids, params)
        if params.max_tokens is None:
            params = dataclasses.replace(params, max_tokens=self.max_model_len - len(prompt_ids))
        request_id = request_id or f"req-{next(self._ids)}"
        stream = RequestStream(request_id, params.n, prompt_ids)
        base_seed = params.seed if params.seed is not None else self._rng.getrandbits(31)
        for i in range(params.n):
            sub_id = request_id if params.n == 1 else f"{request_id}#{i}"
            # Siblings of a seeded request must differ from each other but stay reproducible.
            seed = (base_seed + 1_000_003 * i) % 2**31
            req = Request(sub_id, prompt_ids, params, arrival_time=stream.arrival_time, priority=priority,
                          eos_token_ids=self.eos_token_ids, seed=seed, group_id=request_id)
            choice = _Choice(stream, i, req, ChoiceText(self.tokenizer, params, prompt_ids))
            if params.prompt_logprobs is not None:
                choice.prompt_logprobs = [None] * len(prompt_ids)
            self._inbox.put(("add", choice))
        self._wakeup.set()
        return stream

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise SamplingParamsError("prompt", "the prompt is empty")
        vocab = self.runner.vocab_size
        if any(t < 0 or t >= vocab for t in prompt_ids):
            raise SamplingParamsError("prompt", f"prompt token ids must be in [0, {vocab})")
        for token in itertools.chain(params.stop_token_ids, (params.logit_bias or {})):
            if not 0 <= int(token) < vocab:
                raise SamplingParamsError("logit_bias" if token in (params.logit_bias or {}) else "stop_token_ids",
                                          f"token id {token} is outside the vocabulary [0, {vocab})")
        # NOTE: each bad word bans at most two ids a step (the word with and without a leading space).
        biased = len(set(params.logit_bias or ()) | set(params.stop_token_ids) | self.eos_token_ids)
        if biased + 2 * len(params.bad_words) > BIAS_WIDTH:
            raise SamplingParamsError("bad_words" if params.bad_words else "logit_bias",
                                      f"logit_bias, stop_token_ids, bad_words (two ids each) and the "
                                      f"{len(self.eos_token_ids)} end-of-generation ids together exceed {BIAS_WIDTH} "
                                      "tokens")
        for field in ("logprobs", "prompt_logprobs"):
            value = getattr(params, field)
            if value is not None and value > self.config.max_logprobs:
                raise SamplingParamsError(field, f"{field} {value} is more than --max-logprobs "
                                                 f"{self.config.max_logprobs}")
        # NOTE: compiles the constraint (cached) here, on the submitting thread: a bad schema is a 400 before
        # any compute, and a slow compile never holds up the engine thread.
        self.structured.validate(params)
        if params.prompt_logprobs is not None and self.spec is not None:
            # NOTE: verify steps compute logits of the sampled rows only; prompt logprobs would need them per token.
            raise SamplingParamsError("prompt_logprobs", "prompt_logprobs is not supported with speculative "
                                                         "decoding yet")
        wanted = len(prompt_ids) + (params.max_tokens or 1)
        if wanted > self.max_model_len:
            raise RequestTooLongError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{wanted} tokens ({len(prompt_ids)} in the prompt, {params.max_tokens or 1} for the completion).")
        # NOTE: refused here, before a stream starts, so "can never fit the KV cache" is the same 400 streaming
        # or not (the scheduler would otherwise fail it after the 200). The last token is never fed back.
        kv_tokens = min(len(prompt_ids) + (params.max_tokens or self.max_model_len), self.max_model_len) - 1
        if not self.kv_cache.can_ever_fit(kv_tokens):
            raise RequestTooLongError(
                f"The request needs {self.kv_cache.pages_for(kv_tokens)} KV pages ({len(prompt_ids)} prompt + "
                f"{params.max_tokens} max_tokens tokens) but the cache has only {self.kv_cache.num_usable_pages}; "
                f"lower max_tokens.")

    def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wakeup.set()

    def stats_snapshot(self) -> EngineStatsSnapshot:
        spec = SpecDecodeSnapshot.from_stats(self.spec.stats) if self.spec is not None else None
        return EngineStatsSnapshot(self.scheduler.stats(), self.stats.steps, self.stats.tokens,
                                   self.stats.step_seconds, self.stats.host_fraction, self.warmup_seconds, spec,
                                   tuple(self.stats.iteration_token_counts),
                                   self.runner.num_compiled() - self._compiled_at_warmup)

    def health(self) -> EngineHealth:
        alive = self._thread is None or self._thread.is_alive() or self._stop.is_set()
        return EngineHealth(alive, self.has_unfinished(), time.monotonic() - self._progress_time)

    def start(self) -> None:
        """Runs the step loop in a daemon thread until `shutdown()`."""
        self._thread = threading.Thread(target=self._loop, name="jaxserve-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wakeup.set()
        if self._thread is not None:
            self._thread.join(timeout)
        self.runner.close()  # multi-process: releases the followers

    # ------------------------------------------------------------------ the engine thread

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                worked = self.step()
            except Exception:  # NOTE: one bad step must not kill the server; fail the requests in it
                logger.exception("engine step failed; aborting the running requests")
                self._fail_all("internal error in the engine step")
                worked = True
            if not worked:
                self._wakeup.wait(0.05)
                self._wakeup.clear()
            self._progress_time = time.monotonic()

    def has_unfinished(self) -> bool:
        return bool(self._choices) or not self._inbox.empty()

    def step(self) -> bool:
        """One scheduling + model step. Returns False when there was nothing to do.

        NOTE(overlap): the model step is dispatched before the previous step's tokens are turned into text,
        so detokenization, stop strings and streaming of step N-1 run while the device computes step N (JAX
        dispatch is asynchronous). Scheduling needs only the token ids (`update_from_output` runs as soon as
        a step is collected), never the text, so this changes no token: a request a stop string ends during
        step N has merely been scheduled once more, and `update_from_output` drops that row.
        """
        t0 = time.perf_counter()
        self._drain_inbox()
        sched = self.scheduler.schedule()
        for req in sched.finished:
            self._finish(req.request_id, [], None)
        if self.spec is not None:
            self.spec.release([r.request_id for r in sched.finished] + list(sched.preempted_ids))
        if not sched.chunks:
            emitted = self._emit_pending()
            return bool(sched.finished) or emitted
        if self.spec is None:
            rows = [self._row_sampling(c.request) if c.sample else None for c in sched.chunks]
            in_flight = self.runner.dispatch(sched.chunks, rows, self._prompt_targets(sched.chunks))
            self._emit_pending()  # the previous step's text, while the device runs this one
            t_wait = time.perf_counter()
            out = self.runner.collect(in_flight)
            device_seconds = time.perf_counter() - t_wait
            sampled = dict(zip(out.request_ids, out.token_ids.tolist()))
        else:
            self._emit_pending()
            out = self.spec.execute(sched.chunks, self._row_sampling)
            device_seconds = out.step_seconds - out.host_seconds
            sampled = dict(zip(out.request_ids, out.emitted))
        updates = self.scheduler.update_from_output(sched, sampled)
        self._pending = (updates, out)
        if self.spec is None:
            # The next step's grammar masks, on a worker thread while this thread finishes and schedules.
            self.structured.prefetch(self.scheduler.running)
        else:
            # The proposer reads the running requests: stop strings must have ended theirs first.
            self._emit_pending()
            running = {r.request_id for r in self.scheduler.running}
            self.spec.release([c.request_id for c in sched.chunks if c.request_id not in running])
            self.spec.propose(self.scheduler.running)
            self.structured.truncate_proposals(self.scheduler.running)
        self.stats.record_step(sched.num_scheduled_tokens, time.perf_counter() - t0, device_seconds=device_seconds)
        return True

    def _emit_pending(self) -> bool:
        """Detokenizes, stop-checks and streams the last collected step's tokens; False if there were none."""
        if self._pending is None:
            return False
        updates, out = self._pending
        self._pending = None
        if out.prompt_logprobs:
            self._store_prompt_logprobs(out.prompt_logprobs)
        row_of = None
        for update in updates:
            choice = self._choices.get(update.request_id)
            if choice is None:  # aborted since
                continue
            logprobs = None
            if choice.request.sampling_params.logprobs is not None and update.new_token_ids:
                if row_of is None:
                    row_of = {rid: i for i, rid in enumerate(out.request_ids)}
                i = row_of.get(update.request_id)
                if i is not None:
                    n = choice.request.sampling_params.logprobs
                    logprobs = [TokenLogprob(int(out.token_ids[i]), float(out.logprobs[i]),
                                             [(int(t), float(lp)) for t, lp in zip(out.top_ids[i][:n],
                                                                                   out.top_logprobs[i][:n])])]
            self._emit(choice, update, logprobs)
        return True

    def _prompt_targets(self, chunks) -> list[list[int] | None] | None:
        """Per chunk, the prompt token each of its tokens' logits should score (-1: none), for requests with
        prompt_logprobs; None when no chunk of the step asks."""
        targets = None
        for i, c in enumerate(chunks):
            choice = self._choices.get(c.request_id)
            if choice is None or choice.prompt_logprobs is None:
                continue
            prompt, end = c.request.prompt_token_ids, c.start_pos + len(c.token_ids)
            if c.start_pos + 1 >= len(prompt):  # decoding, or the last prompt token: nothing of the prompt left
                continue
            targets = targets or [None] * len(chunks)
            # token at position q predicts position q + 1; positions at or past the prompt's end score nothing
            targets[i] = prompt[c.start_pos + 1:end + 1] + [-1] * max(0, end + 1 - len(prompt))
        return targets

    def _store_prompt_logprobs(self, computed: dict) -> None:
        """Files a step's prompt logprobs by prompt position (a recomputed prompt after preemption rewrites
        the same values)."""
        for rid, (start, lps, top_ids, top_lps) in computed.items():
            choice = self._choices.get(rid)
            if choice is None or choice.prompt_logprobs is None:
                continue
            req, entries = choice.request, choice.prompt_logprobs
            k = req.sampling_params.prompt_logprobs
            for j in range(len(lps)):
                p = start + j + 1
                if 0 < p < len(entries):
                    entries[p] = TokenLogprob(req.prompt_token_ids[p], float(lps[j]),
                                              [(int(t), float(v)) for t, v in zip(top_ids[j][:k], top_lps[j][:k])])

    def _drain_inbox(self) -> None:
        while True:
            try:
                command, arg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if command == "add":
                self._choices[arg.request.request_id] = arg
                self.structured.add(arg.request)
                self.scheduler.add_request(arg.request)
            else:
                for sub_id, choice in list(self._choices.items()):
                    if choice.stream.request_id == arg:
                        self.scheduler.abort_request(sub_id)
                        self._finish(sub_id, [], "abort")

    def _row_sampling(self, req: Request, proposals: Sequence[int] = ()) -> RowSampling:
        """The sampling of the token after `req`'s tokens and then `proposals` (speculative sub-rows)."""
        params = req.sampling_params
        banned = ()
        allowed = self.structured.bitmask(req, proposals)
        # NOTE: a complete grammar allows only end-of-generation tokens: it wins over min_tokens.
        if len(req.output_token_ids) + len(proposals) < params.min_tokens and not (
                allowed is not None and self.structured.grammar_done(req) and not proposals):
            banned = tuple(self.eos_token_ids | set(params.stop_token_ids))
        output = req.output_token_ids if not proposals else req.output_token_ids + list(proposals)
        if params.bad_words:
            banned = tuple(set(banned) | self._bad_word_bans(params, output))
        return RowSampling(params=params, seed=req.seed, position=req.num_tokens + len(proposals),
                           prompt_token_ids=req.prompt_token_ids, output_token_ids=output,
                           banned_ids=banned, allowed=allowed)

    def _emit(self, choice: _Choice, update, logprobs) -> None:
        text, stopped = choice.text.add_tokens(update.new_token_ids, finishing=update.finished)
        finish_reason = update.finish_reason if update.finished else None
        if not update.finished and not stopped and self.structured.is_constrained(update.request_id):
            error = self.structured.error(choice.request)
            if error is not None:  # a matcher past its step limits: the output can no longer be kept valid
                choice.request.error = f"structured output: {error}"
                self.scheduler.finish_request(update.request_id, RequestStatus.FINISHED_ERROR)
                self._send(choice, update.new_token_ids, text, logprobs, "error", error=choice.request.error)
                return
            # The grammar is complete and its end-of-generation token came (min_tokens or ignore_eos kept the
            # request going): nothing else can follow.
            stopped = self.structured.grammar_ended(choice.request)
        if stopped and not update.finished:
            self.scheduler.finish_request(update.request_id, RequestStatus.FINISHED_STOPPED)
            finish_reason = "stop"
        self._send(choice, update.new_token_ids, text, logprobs, finish_reason)

    def _finish(self, sub_id: str, token_ids: list[int], reason: str | None) -> None:
        choice = self._choices.get(sub_id)
        if choice is None:
            return
        req = choice.request
        reason = reason or req.status.finish_reason or "abort"
        self._send(choice, token_ids, choice.text.flush(), None, reason, error=req.error)

    def _send(self, choice: _Choice, token_ids, text, logprobs, finish_reason, error=None) -> None:
        req = choice.request
        delta = RequestDelta(
            request_id=choice.stream.request_id, index=choice.index, new_token_ids=list(token_ids), new_text=text,
            logprobs=logprobs, finished=finish_reason is not None, finish_reason=finish_reason, error=error,
            num_prompt_tokens=len(req.prompt_token_ids), num_output_tokens=len(req.output_token_ids),
            num_cached_tokens=req.num_cached_tokens, time=time.monotonic(),
            first_scheduled_time=None if choice.sent_first else req.first_scheduled_time,
            stop_reason=self._stop_reason(choice) if finish_reason == "stop" else None)
        choice.sent_first = True
        if choice.prompt_logprobs is not None and (token_ids or finish_reason is not None):
            delta.prompt_logprobs, choice.prompt_logprobs = choice.prompt_logprobs, None
        if delta.finished:
            del self._choices[req.request_id]
            self.structured.remove(req.request_id)
        if delta.finished or token_ids or text:
            choice.stream.put(delta)

    @staticmethod
    def _stop_reason(choice: _Choice) -> int | str | None:
        """The stop string, else the stop token id, that finished the choice (None: an end-of-generation token)."""
        if choice.text.stop_reason is not None:
            return choice.text.stop_reason
        out = choice.request.output_token_ids
        stop_ids = choice.request.sampling_params.stop_token_ids
        return out[-1] if out and out[-1] in stop_ids else None

    def _bad_word_bans(self, params: SamplingParams, output: Sequence[int]) -> set[int]:
        """vLLM's bad_words: each word (with and without a leading space) as token ids; its last token is
        banned whenever the output ends with the rest (always, for one-token words)."""
        banned = set()
        for ids in self._bad_word_ids(params.bad_words):
            if len(ids) == 1 or list(output[len(output) - len(ids) + 1:]) == ids[:-1]:
                banned.add(ids[-1])
        return banned

    @functools.lru_cache(maxsize=256)  # noqa: B019 - a few distinct word lists per engine; the engine lives long
    def _bad_word_ids(self, words: tuple[str, ...]) -> tuple[list[int], ...]:
        out = []
        for word in words:
            for variant in (word.strip(), " " + word.strip()):
                ids = self.tokenizer.encode(variant, add_special_tokens=False)
                if ids and ids not in out:
                    out.append(ids)
        return tuple(out)

    def _fail_all(self, message: str) -> None:
        self._pending = None
        if self.spec is not None:
            self.spec.release(list(self._choices))
        for sub_id, choice in list(self._choices.items()):
            self.scheduler.abort_request(sub_id)
            choice.request.error = message
            self._finish(sub_id, [], "error")


@dataclasses.dataclass
class EngineStats:
    """Engine-wide counters (the server exports them as Prometheus metrics)."""

    steps: int = 0
    tokens: int = 0
    step_seconds: float = 0.0  # wall time of whole engine steps
    host_seconds: float = 0.0  # the part of it not spent waiting for the device: scheduling, packing, outputs
    recent_tokens_per_step: list[int] = dataclasses.field(default_factory=list)
    # steps per ITERATION_TOKEN_BUCKETS bucket, the last one +Inf (/metrics: iteration_tokens_total)
    iteration_token_counts: list[int] = dataclasses.field(
        default_factory=lambda: [0] * (len(ITERATION_TOKEN_BUCKETS) + 1))

    def record_step(self, num_tokens: int, step_seconds: float, *, device_seconds: float) -> None:
        self.iteration_token_counts[bucket_index(num_tokens, ITERATION_TOKEN_BUCKETS)] += 1
        self.steps += 1
        self.tokens += num_tokens
        self.step_seconds += step_seconds
        self.host_seconds += step_seconds - device_seconds
        self.recent_tokens_per_step = (self.recent_tokens_per_step + [num_tokens])[-256:]

    @property
    def host_fraction(self) -> float:
        return self.host_seconds / self.step_seconds if self.step_seconds else 0.0

    @property
    def mean_tokens_per_step(self) -> float:
        return float(np.mean(self.recent_tokens_per_step)) if self.recent_tokens_per_step else 0.0
