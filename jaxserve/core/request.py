"""Request and its lifecycle status: the host-side record of one sequence (plain Python, no JAX).

Only `scheduler.py` changes a request's status or token counters; everyone else reads them.
"""

from __future__ import annotations

import dataclasses
import enum
import time

from jaxserve.core.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    """Lifecycle of a request. The order means something: every status above PREEMPTED is final."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3  # EOS or a stop token (or, set by the engine, a stop string)
    FINISHED_LENGTH = 4  # max_tokens or max_model_len reached
    FINISHED_ABORTED = 5  # the client went away or asked to cancel
    FINISHED_ERROR = 6  # the request can never run (see `Request.error`) or the engine failed it

    def is_finished(self) -> bool:
        return self > RequestStatus.PREEMPTED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI `finish_reason` of a finished status, None while the request is alive."""
        return FINISH_REASONS.get(self)


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


@dataclasses.dataclass(eq=False)
class Request:
    """One sequence: its prompt, what it has generated, and how much of it sits in the KV cache.

    The scheduler's whole state per request is `num_computed_tokens` (tokens whose K/V are in the cache)
    catching up with `num_tokens` (prompt + output). `n > 1` completions are `n` sibling requests that
    share a `group_id` and the same prompt.
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    priority: int = 0  # lower runs first (vLLM's convention); ties are broken by arrival time
    eos_token_ids: frozenset[int] = frozenset()
    seed: int = 0
    group_id: str | None = None

    output_token_ids: list[int] = dataclasses.field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit at the first admission (tokens not computed for the prompt)
    num_preemptions: int = 0
    error: str | None = None
    # Speculative proposals for the tokens after the last one, set by the engine's proposer between steps and
    # verified by the next step (vLLM's `spec_token_ids`); never part of `output_token_ids` until accepted.
    spec_token_ids: list[int] = dataclasses.field(default_factory=list)

    # Metric timestamps (time.monotonic()); None until the event happens.
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    def __post_init__(self):
        self.prompt_token_ids = [int(t) for t in self.prompt_token_ids]
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r} has an empty prompt")
        self.eos_token_ids = frozenset(self.eos_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + output, as a new list."""
        return self.prompt_token_ids + self.output_token_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """all_token_ids[start:end] without building the whole list."""
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    @property
    def max_tokens(self) -> int | None:
        return self.sampling_params.max_tokens

    def is_finished(self) -> bool:
        return self.status.is_finished()
