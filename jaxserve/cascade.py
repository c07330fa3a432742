"""A model cascade: a small model answers, and a large one takes over when the small one is unsure.

`CascadeEngine(small, large, policy)` is an `EngineClient` (and, over offline engines, an
`OfflineEngineClient`), so the server serves it as one more model and `LLM(cascade=...)` drives it the
same way. Per request:

  1. The request goes to the small engine, asking for the sampled tokens' logprobs (the device computes
     them with the sample; `logprobs=0` adds no top-k work). The small model's deltas are *held*.
  2. When every choice has finished, the confidence signal is taken over the answer's tokens
     (`CascadePolicy.signal`: the mean or the minimum token logprob, the worst choice counting).
  3. Signal >= threshold: the held deltas are released to the caller's stream as they were.
     Otherwise the same prompt ids go to the large engine, whose deltas go straight through.

NOTE: the draft is held until the decision, so a streamed cascade answer starts only when the small
model has finished (its TTFT is the small model's whole generation). We chose that over a prompt-side
signal because the answer's own logprobs separate right from wrong answers far better than anything
known before generating, and the small model's generation is the cheap part.

Threads: the callbacks run on the engine threads that produce the deltas (the small engine's until the
decision, the large engine's after an escalation); one lock per request orders them with `abort`.
Pure Python: no JAX.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import queue
import threading
from collections.abc import Sequence

from jaxserve.core.outputs import RequestDelta, RequestStream
from jaxserve.core.sampling_params import SamplingParams
from jaxserve.engine_client import EngineClient, EngineHealth, EngineStatsSnapshot

SIGNALS = ("mean_logprob", "min_logprob")


@dataclasses.dataclass(frozen=True)
class CascadePolicy:
    """When the small model's answer stands."""

    threshold: float = -0.5  # escalate when the signal is below this (a log-probability, <= 0)
    signal: str = "mean_logprob"  # mean_logprob | min_logprob over the answer's tokens

    def __post_init__(self):
        if self.signal not in SIGNALS:
            raise ValueError(f"cascade signal must be one of {SIGNALS}, got {self.signal!r}")
        if not self.threshold <= 0 and not math.isinf(self.threshold):
            raise ValueError(f"cascade threshold is a log-probability (<= 0), got {self.threshold}")

    def score(self, logprobs: Sequence[float]) -> float:
        """The confidence of one choice: +inf for an empty answer (nothing to doubt)."""
        if not logprobs:
            return math.inf
        return min(logprobs) if self.signal == "min_logprob" else sum(logprobs) / len(logprobs)


@dataclasses.dataclass
class CascadeStats:
    """Counters since start (read without a lock, like the engine's)."""

    requests: int = 0
    answered_small: int = 0
    answered_large: int = 0  # escalated
    small_tokens: int = 0  # prompt + output tokens the small model processed for every cascade request
    kept_tokens: int = 0  # prompt + output tokens of the answers the small model kept
    large_tokens: int = 0  # prompt + output tokens the large model processed (escalations)


class CascadeStream(RequestStream):
    """The caller's stream; `answered_by` names the model once decided (None before)."""

    def __init__(self, request_id: str, n: int, prompt_token_ids: list[int]):
        super().__init__(request_id, n, prompt_token_ids)
        self.answered_by: str | None = None
        self.signal: float | None = None  # the small model's confidence
        self.decided = threading.Event()
        self.on_decided = None  # optional callback (the server's), called on the deciding thread


class _Pending:
    """One request's cascade state."""

    def __init__(self, out: CascadeStream, small: RequestStream, params: SamplingParams, priority: int):
        self.out, self.small, self.params, self.priority = out, small, params, priority
        self.held: list[RequestDelta] = []
        self.open = params.n
        self.large: RequestStream | None = None
        self.aborted = False
        self.lock = threading.Lock()


class CascadeEngine:
    """`small` answers, `large` takes over below the policy's threshold; both are started engines."""

    def __init__(self, small: EngineClient, large: EngineClient, policy: CascadePolicy = CascadePolicy(), *,
                 small_name: str = "small", large_name: str = "large"):
        if getattr(small.tokenizer, "vocab_size", None) != getattr(large.tokenizer, "vocab_size", None) or any(
                small.tokenizer.encode(t) != large.tokenizer.encode(t) for t in _PROBES):
            raise ValueError(f"the cascade's models {small_name!r} and {large_name!r} must share a tokenizer")
        self.small, self.large, self.policy = small, large, policy
        self.small_name, self.large_name = small_name, large_name
        self.tokenizer = large.tokenizer
        self.max_model_len = min(small.max_model_len, large.max_model_len)
        self.default_sampling = large.default_sampling
        self.stats = CascadeStats()
        self._pending: dict[str, _Pending] = {}
        self._ids = itertools.count()

    # ------------------------------------------------------------------ EngineClient

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.small.validate(prompt_ids, params)
        self.large.validate(prompt_ids, params)

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, priority: int = 0) -> CascadeStream:
        params = params or SamplingParams()
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self.large.validate(ids, params)  # the large model must be able to take it over
        request_id = request_id or f"cascade-{next(self._ids)}"
        small_params = params if params.logprobs is not None else dataclasses.replace(params, logprobs=0)
        small = self.small.add_request(ids, small_params, request_id=request_id, priority=priority)
        pending = _Pending(CascadeStream(request_id, params.n, ids), small, params, priority)
        self._pending[request_id] = pending
        self.stats.requests += 1
        small.on_delta = lambda _: self._on_small(pending)
        self._on_small(pending)  # deltas that came before on_delta was set
        return pending.out

    def abort(self, request_id: str) -> None:
        pending = self._pending.get(request_id)
        if pending is None:
            return
        with pending.lock:
            pending.aborted = True
            engine = self.large if pending.large is not None else self.small
        engine.abort(request_id)  # its final `abort` deltas come through the callbacks

    def start(self) -> None:
        """The member engines are started (and shut down) by their owner."""

    def shutdown(self, timeout: float = 10.0) -> None:
        """See `start`."""

    def stats_snapshot(self) -> EngineStatsSnapshot:
        """The large engine's counters (the cascade's own are `stats`)."""
        return self.large.stats_snapshot()

    def health(self) -> EngineHealth:
        a, b = self.small.health(), self.large.health()
        return EngineHealth(a.thread_alive and b.thread_alive, a.pending or b.pending,
                            max(a.seconds_since_progress if a.pending else 0.0,
                                b.seconds_since_progress if b.pending else 0.0))

    # ------------------------------------------------------------------ OfflineEngineClient

    def step(self) -> bool:
        ran_small = self.small.step()
        return self.large.step() or ran_small

    def has_unfinished(self) -> bool:
        return self.small.has_unfinished() or self.large.has_unfinished()

    # ------------------------------------------------------------------ the decision (engine threads)

    def _on_small(self, p: _Pending) -> None:
        with p.lock:
            if p.out.decided.is_set():
                return
            p.held += _drain(p.small)
            p.open = p.params.n - sum(d.finished for d in p.held)
            if p.open:
                return
            escalated = self._decide(p)
        if escalated:
            self._on_large(p)  # deltas that came before on_delta was set
        if p.out.on_decided is not None:
            p.out.on_decided(p.out)

    def _decide(self, p: _Pending) -> bool:
        """Under p.lock, once every choice of the small model has finished; True: escalated."""
        by_choice: dict[int, list[float]] = {}
        failed = False
        for d in p.held:
            by_choice.setdefault(d.index, []).extend(e.logprob for e in d.logprobs or ())
            failed = failed or d.finish_reason in ("abort", "error")
        out = p.out
        out.signal = min(self.policy.score(by_choice.get(i, [])) for i in range(p.params.n))
        self.stats.small_tokens += _tokens(p.held, len(out.prompt_token_ids))
        if failed or p.aborted or out.signal >= self.policy.threshold:
            out.answered_by = self.small_name
            self.stats.answered_small += 1
            self.stats.kept_tokens += _tokens(p.held, len(out.prompt_token_ids))
            out.decided.set()
            self._pending.pop(out.request_id, None)
            keep_logprobs = p.params.logprobs is not None
            for d in p.held:
                out.put(d if keep_logprobs else dataclasses.replace(d, logprobs=None))
            return False
        out.answered_by = self.large_name
        self.stats.answered_large += 1
        out.decided.set()
        try:
            p.large = self.large.add_request(out.prompt_token_ids, p.params, request_id=out.request_id,
                                             priority=p.priority)
        except Exception as e:  # noqa: BLE001 - validated at add_request; on an engine thread nothing may escape
            self._pending.pop(out.request_id, None)
            for i in range(p.params.n):
                out.put(RequestDelta(out.request_id, i, [], "", None, True, "error", error=str(e)))
            return False
        p.large.on_delta = lambda _: self._on_large(p)
        return True

    def _on_large(self, p: _Pending) -> None:
        with p.lock:
            for d in _drain(p.large):
                if d.finished:
                    p.open += 1
                    if p.open == p.params.n:
                        self._pending.pop(p.out.request_id, None)
                        self.stats.large_tokens += len(p.out.prompt_token_ids) + d.num_output_tokens
                    else:
                        self.stats.large_tokens += d.num_output_tokens
                p.out.put(d)


_PROBES = ("The capital of France is Paris.", "12 + 9 = 21")


def _drain(stream: RequestStream) -> list[RequestDelta]:
    out = []
    while True:
        try:
            out.append(stream.get(timeout=0))
        except queue.Empty:
            return out


def _tokens(deltas: list[RequestDelta], num_prompt: int) -> int:
    """Prompt + output tokens of a finished request's deltas (every choice's last count)."""
    last: dict[int, int] = {}
    for d in deltas:
        last[d.index] = max(last.get(d.index, 0), d.num_output_tokens)
    return num_prompt + sum(last.values())
