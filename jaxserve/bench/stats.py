"""Per-request timings of a streamed generation and their summaries (vLLM `bench serve` definitions).

For one request, with t0 the moment it was sent and t_1 .. t_k the arrival times of its k content chunks:
  * TTFT = t_1 - t0 (time to first token).
  * E2E = t_end - t0 (to the end of the response).
  * TPOT = (E2E - TTFT) / (output_tokens - 1): the mean time per output token after the first; undefined
    (left out) for one-token outputs.
  * ITL = [t_2 - t_1, ..., t_k - t_(k-1)]: the gaps between consecutive chunks. A chunk may carry several
    tokens (a server that batches its stream), so ITL is per chunk and TPOT per token, as in vLLM.
Summaries pool ITLs over all requests; TTFT, TPOT and E2E have one value per successful request.
Percentiles are numpy's linear interpolation (vLLM's too). No JAX, no network.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

PERCENTILES = (50, 95, 99)


@dataclasses.dataclass
class RequestResult:
    """What the client measured for one request. Times are seconds on one monotonic clock."""

    prompt_tokens: int  # as the server reported (usage) when it did, else the dataset's count
    start: float  # sent
    chunk_times: list[float] = dataclasses.field(default_factory=list)  # each content-bearing chunk
    end: float = 0.0
    output_tokens: int = 0
    success: bool = False
    error: str | None = None
    text: str = ""

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] - self.start if self.chunk_times else None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


def summarize(values: Sequence[float], percentiles: Sequence[int] = PERCENTILES) -> dict[str, float | None]:
    """{mean, median, std, p<q>...}; every value None when there are none."""
    keys = ["mean", "median", "std", *(f"p{q}" for q in percentiles)]
    if len(values) == 0:
        return dict.fromkeys(keys)
    a = np.asarray(values, dtype=np.float64)
    out = {"mean": float(a.mean()), "median": float(np.median(a)), "std": float(a.std())}
    out.update({f"p{q}": float(np.percentile(a, q)) for q in percentiles})
    return out


def aggregate(results: Sequence[RequestResult], duration: float) -> dict:
    """The run's report: counts, throughputs over `duration` seconds, latency summaries in milliseconds."""
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    ms = 1e3

    def summary(values):
        return {k: None if v is None else v * ms for k, v in summarize(values).items()}

    return {
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "error_samples": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration if duration > 0 else 0.0,
        "input_throughput": input_tokens / duration if duration > 0 else 0.0,
        "output_throughput": output_tokens / duration if duration > 0 else 0.0,
        "total_token_throughput": (input_tokens + output_tokens) / duration if duration > 0 else 0.0,
        "ttft_ms": summary([r.ttft for r in ok if r.ttft is not None]),
        "tpot_ms": summary([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": summary([x for r in ok for x in r.itls]),
        "e2e_ms": summary([r.e2e for r in ok]),
    }
