"""What the engine hands back: per-step deltas for streaming, and whole results for the offline API."""

from __future__ import annotations

import dataclasses
import queue
import time
from typing import Iterator


@dataclasses.dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # the top-n alternatives (raw distribution), best first


@dataclasses.dataclass
class RequestDelta:
    """New output of one choice (`index`) of one request since its previous delta."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_text: str
    logprobs: list[TokenLogprob] | None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" | "content_filter"
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0
    time: float = 0.0  # time.monotonic() when the delta was produced
    first_scheduled_time: float | None = None  # set on the first delta (queue time = this - arrival)
    stop_reason: int | str | None = None  # the stop string or stop token id that finished it (None: EOS, length)
    # SamplingParams.prompt_logprobs: one entry per prompt token, None for the first; on the first delta only
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclasses.dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    error: str | None = None
    cumulative_logprob: float | None = None  # sum of the chosen tokens' log-probs (when logprobs were asked for)
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it (vLLM's field)
    tool_calls: list | None = None  # LLM.chat with tools: text.tool_calls.ToolCall read out of `text` (else None)


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    num_cached_tokens: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    finished_time: float | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # SamplingParams.prompt_logprobs (None first)
    answered_by: str | None = None  # a cascade's answering model ("small" / "large"); None: no cascade

    def add(self, delta: RequestDelta) -> None:
        out = self.outputs[delta.index]
        if delta.prompt_logprobs is not None and self.prompt_logprobs is None:
            self.prompt_logprobs = delta.prompt_logprobs
        out.text += delta.new_text
        out.token_ids.extend(delta.new_token_ids)
        if delta.logprobs is not None:
            out.logprobs = (out.logprobs or []) + delta.logprobs
            out.cumulative_logprob = (out.cumulative_logprob or 0.0) + sum(e.logprob for e in delta.logprobs)
        if delta.new_token_ids and self.first_token_time is None:
            self.first_token_time = delta.time
        self.num_cached_tokens = max(self.num_cached_tokens, delta.num_cached_tokens)
        if delta.finished:
            out.finish_reason, out.error, out.stop_reason = delta.finish_reason, delta.error, delta.stop_reason
            self.finished = all(o.finish_reason is not None for o in self.outputs)
            if self.finished:
                self.finished_time = delta.time


@dataclasses.dataclass
class ScoreOutput:
    """`LLM.score`: the log-probs of a prompt's tokens, each given the tokens before it (teacher-forced)."""

    prompt_token_ids: list[int]
    token_logprobs: list[float]  # of prompt_token_ids[start:], start >= 1 (nothing predicts the first token)
    start: int = 1  # index of the first scored token (the continuation's first token when one was given)

    @property
    def sum_logprob(self) -> float:
        return float(sum(self.token_logprobs))

    @property
    def mean_logprob(self) -> float:
        return self.sum_logprob / len(self.token_logprobs) if self.token_logprobs else 0.0

    @property
    def num_scored(self) -> int:
        return len(self.token_logprobs)


class RequestStream:
    """The deltas of one request (all its `n` choices), in order; iterate it from any thread."""

    def __init__(self, request_id: str, n: int, prompt_token_ids: list[int]):
        self.request_id = request_id
        self.n = n
        self.prompt_token_ids = prompt_token_ids
        self.arrival_time = time.monotonic()
        self._queue: queue.Queue[RequestDelta] = queue.Queue()
        self._open = n
        self.on_delta = None  # optional callback, called from the engine thread (the server's asyncio bridge)

    def put(self, delta: RequestDelta) -> None:
        self._queue.put(delta)
        if self.on_delta is not None:
            self.on_delta(delta)

    def get(self, timeout: float | None = None) -> RequestDelta:
        return self._queue.get(timeout=timeout)

    def ready(self) -> Iterator[RequestDelta]:
        """The deltas already produced, without waiting (for callers that drive `engine.step()` themselves)."""
        while not self._queue.empty():
            yield self._queue.get()

    def __iter__(self) -> Iterator[RequestDelta]:
        while self._open:
            delta = self._queue.get()
            if delta.finished:
                self._open -= 1
            yield delta
