"""The server's contract with the engine: what a front end may call, and the one stats snapshot it reads.

The HTTP server (`jaxserve.server`) and the Batch front end talk to an engine only through
`EngineClient` (vLLM calls its equivalent `EngineClient` too); `LLMEngine` implements it, and so do the
tests' fakes. Metrics read `EngineClient.stats_snapshot()` (plain numbers, no engine internals), so no layer
reads another's private fields. Pure Python: no JAX.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from jaxserve.core.outputs import RequestStream
from jaxserve.core.sampling_params import SamplingParams
from jaxserve.core.scheduler import SchedulerStats

if TYPE_CHECKING:
    from jaxserve.text.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class SpecDecodeSnapshot:
    """Speculative decoding's counters since start (the engine has it on)."""

    acceptance_rate: float
    mean_accepted_length: float
    num_drafts: int
    num_draft_tokens: int
    num_accepted_tokens: int
    num_emitted_tokens: int
    accepted_per_position: tuple[int, ...]

    @classmethod
    def from_stats(cls, stats) -> SpecDecodeSnapshot:
        """A copy of the spec decoder's live `SpecDecodeStats` counters."""
        return cls(stats.acceptance_rate, stats.mean_accepted_length, stats.num_drafts, stats.num_draft_tokens,
                   stats.num_accepted_tokens, stats.num_emitted_tokens, tuple(stats.accepted_per_position))


# Upper bounds of the tokens-per-step histogram (vLLM's iteration_tokens_total); the last bucket is +Inf.
ITERATION_TOKEN_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)


def bucket_index(value: float, bounds: Sequence[float]) -> int:
    """The first bucket whose upper bound holds `value` (len(bounds): the +Inf bucket)."""
    for i, bound in enumerate(bounds):
        if value <= bound:
            return i
    return len(bounds)


@dataclasses.dataclass(frozen=True)
class EngineStatsSnapshot:
    """The engine's counters at one moment, read on the caller's thread.

    NOTE: taken without a lock while the engine thread runs: a value may be one step old, which is fine for
    monitoring and costs the engine nothing.
    """

    scheduler: SchedulerStats
    num_steps: int  # engine steps that computed tokens
    num_step_tokens: int  # tokens those steps computed (prompt and generated)
    step_seconds: float  # wall time of those steps (the engine's busy time)
    host_fraction: float  # share of step time not spent waiting for the device
    warmup_seconds: float  # compiling at start-up
    spec_decode: SpecDecodeSnapshot | None = None
    # steps per ITERATION_TOKEN_BUCKETS bucket (not cumulative; one more entry for +Inf); () when not kept
    iteration_token_counts: tuple[int, ...] = ()
    compiles_after_warmup: int = 0  # step executables built after warm-up (each one stalled every request)


@dataclasses.dataclass(frozen=True)
class EngineHealth:
    """Whether the engine makes progress, for the liveness probe (read without a lock, like the stats)."""

    thread_alive: bool  # the step loop's thread runs (True before `start()`)
    pending: bool  # requests are queued or running
    seconds_since_progress: float  # since the step loop last finished an iteration (a step, or an idle wait)


class EngineClient(Protocol):
    """What the server calls. Every method but `start`/`shutdown` is safe from any thread."""

    tokenizer: Tokenizer
    max_model_len: int
    default_sampling: dict  # {SamplingParams field: default} from --generation-config; requests' own fields win

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raises `SamplingParamsError` / `RequestTooLongError` (ValueErrors) for a request that cannot run."""

    def add_request(self, prompt: str | Sequence[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, priority: int = 0) -> RequestStream:
        """Validates and enqueues a request; its deltas arrive on the returned stream."""

    def abort(self, request_id: str) -> None:
        """Stops a request (every choice) and frees its pages; its stream gets a final `abort` delta."""

    def start(self) -> None:
        """Runs the step loop in a background thread."""

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stops the step loop."""

    def stats_snapshot(self) -> EngineStatsSnapshot:
        """The counters `/metrics` exports."""

    def health(self) -> EngineHealth:
        """Progress and liveness (`/live`). NOTE: a dead multi-host follower hangs the leader's next collective,
        so it shows here as no progress while work is pending."""


class OfflineEngineClient(EngineClient, Protocol):
    """An engine the caller drives step by step on its own thread (the Batch front end, `LLM`)."""

    def step(self) -> bool:
        """One scheduling + model step; False when there was nothing to do."""

    def has_unfinished(self) -> bool:
        """Whether any request is queued or running."""
