"""Serving arithmetic: what a token costs on a rented accelerator, per month for a traffic profile, and when
self-hosting breaks even against an API price list. Plain Python (the server's /metrics gauges use it).

The model. An accelerator costs `price_per_hour` whether busy or not; on average it is busy a fraction
`utilization` of the time, and while busy it processes input (prompt) tokens at `r_in` and output tokens
at `r_out` per second (a benchmark's measured throughputs at full load, for some traffic mix).
Input and output tokens are done together in the same steps, so the cost of a busy second is split
between them by weight: an input token costs `input_weight` times an output token
(0: charge everything to output; 1: every token alike; by default the API list's own ratio, so that the
comparison is like for like). With `work = input_weight * r_in + r_out` per busy second:

    cost per output token = price_per_hour / 3600 / utilization / work
    cost per input token  = input_weight * cost per output token

A traffic profile (requests/day, input and output tokens per request) needs
`ceil(demand / (utilization * capacity))` accelerators, each billed every hour of the month
(`HOURS_PER_MONTH`). Break-even: the requests/day at which one accelerator's month costs what the API
charges for the same traffic; above it (up to that accelerator's capacity) self-hosting is cheaper.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

HOURS_PER_MONTH = 365 * 24 / 12  # 730
DAYS_PER_MONTH = 365 / 12  # 30.42
MILLION = 1e6


@dataclasses.dataclass(frozen=True)
class Accelerator:
    price_per_hour: float  # $ per hour, billed whether busy or not
    utilization: float = 1.0  # average busy fraction (0, 1]
    input_tokens_per_s: float = 0.0  # measured throughput while busy
    output_tokens_per_s: float = 0.0

    def __post_init__(self):
        if self.price_per_hour < 0:
            raise ValueError(f"price_per_hour must be >= 0, got {self.price_per_hour}")
        if not 0 < self.utilization <= 1:
            raise ValueError(f"utilization must be in (0, 1], got {self.utilization}")
        if self.input_tokens_per_s < 0 or self.output_tokens_per_s <= 0:
            raise ValueError("output_tokens_per_s must be positive and input_tokens_per_s >= 0 "
                             f"(got {self.output_tokens_per_s}, {self.input_tokens_per_s})")


@dataclasses.dataclass(frozen=True)
class Traffic:
    requests_per_day: float
    input_tokens: float  # per request
    output_tokens: float

    def __post_init__(self):
        if self.requests_per_day < 0 or self.input_tokens < 0 or self.output_tokens <= 0:
            raise ValueError("requests_per_day and input_tokens must be >= 0, output_tokens positive")


@dataclasses.dataclass(frozen=True)
class ApiPrice:
    name: str
    input_per_million: float  # $ per 1M input tokens
    output_per_million: float

    @classmethod
    def parse(cls, text: str) -> ApiPrice:
        """`NAME=IN,OUT` in $ per 1M tokens, e.g. `gpt-4o-mini=0.15,0.60`."""
        name, _, prices = text.partition("=")
        try:
            inp, out = (float(v) for v in prices.split(","))
        except ValueError:
            raise ValueError(f"expected NAME=IN,OUT ($ per 1M tokens), got {text!r}") from None
        if not name or inp < 0 or out < 0:
            raise ValueError(f"expected NAME=IN,OUT with non-negative prices, got {text!r}")
        return cls(name, inp, out)

    def per_request(self, traffic: Traffic) -> float:
        return (traffic.input_tokens * self.input_per_million
                + traffic.output_tokens * self.output_per_million) / MILLION


def work_per_second(acc: Accelerator, input_weight: float) -> float:
    """Output-token equivalents processed per busy second."""
    return input_weight * acc.input_tokens_per_s + acc.output_tokens_per_s


def unit_costs(acc: Accelerator, input_weight: float = 1.0) -> dict[str, float]:
    """$ per 1M input and output tokens, and the effective $ per busy hour."""
    if input_weight < 0:
        raise ValueError(f"input_weight must be >= 0, got {input_weight}")
    per_busy_second = acc.price_per_hour / 3600 / acc.utilization
    per_output = per_busy_second / work_per_second(acc, input_weight)
    return {"cost_per_busy_hour": per_busy_second * 3600, "cost_per_million_output_tokens": per_output * MILLION,
            "cost_per_million_input_tokens": input_weight * per_output * MILLION}


def capacity_requests_per_day(acc: Accelerator, traffic: Traffic, input_weight: float) -> float:
    """Requests of this profile one accelerator serves per day at its utilization."""
    work = input_weight * traffic.input_tokens + traffic.output_tokens
    return work_per_second(acc, input_weight) / work * 86400 * acc.utilization


def monthly(acc: Accelerator, traffic: Traffic, input_weight: float = 1.0) -> dict[str, float]:
    capacity = capacity_requests_per_day(acc, traffic, input_weight)
    n = max(1, math.ceil(traffic.requests_per_day / capacity)) if traffic.requests_per_day else 0
    cost = n * acc.price_per_hour * HOURS_PER_MONTH
    requests = traffic.requests_per_day * DAYS_PER_MONTH
    return {"accelerators": n, "capacity_requests_per_day": capacity, "cost_per_month": cost,
            "requests_per_month": requests, "cost_per_request": cost / requests if requests else math.nan,
            "busy_fraction": traffic.requests_per_day / capacity * acc.utilization / n if n else 0.0}


def versus_api(acc: Accelerator, traffic: Traffic, api: ApiPrice, input_weight: float) -> dict[str, float | None]:
    """The API's month for the traffic, and the break-even volume (None: the API is cheaper even at capacity)."""
    per_request = api.per_request(traffic)
    ours = monthly(acc, traffic, input_weight)
    api_month = per_request * ours["requests_per_month"]
    fixed = acc.price_per_hour * HOURS_PER_MONTH  # one accelerator's month
    break_even = fixed / (per_request * DAYS_PER_MONTH) if per_request > 0 else math.inf
    capacity = ours["capacity_requests_per_day"]
    return {"api": api.name, "api_cost_per_month": api_month, "api_cost_per_request": per_request,
            "self_hosted_cost_per_month": ours["cost_per_month"],
            "savings_per_month": api_month - ours["cost_per_month"],
            "break_even_requests_per_day": break_even if break_even <= capacity else None,
            "break_even_tokens_per_day": (break_even * (traffic.input_tokens + traffic.output_tokens)
                                          if break_even <= capacity else None)}


def default_input_weight(apis: Sequence[ApiPrice]) -> float:
    """The API list's input/output price ratio (the first entry's), else 1."""
    for api in apis:
        if api.output_per_million > 0:
            return api.input_per_million / api.output_per_million
    return 1.0


def analyse(acc: Accelerator, traffic: Traffic, apis: Sequence[ApiPrice] = (),
            input_weight: float | None = None) -> dict:
    """Everything `scripts/cost.py` prints, as one JSON-able dict."""
    weight = default_input_weight(apis) if input_weight is None else input_weight
    return {"accelerator": dataclasses.asdict(acc), "traffic": dataclasses.asdict(traffic), "input_weight": weight,
            "unit": unit_costs(acc, weight), "monthly": monthly(acc, traffic, weight),
            "apis": [versus_api(acc, traffic, api, weight) for api in apis]}


def format_report(r: dict) -> str:
    a, t, u, m = r["accelerator"], r["traffic"], r["unit"], r["monthly"]
    lines = [f"accelerator ${a['price_per_hour']:.2f}/h at {100 * a['utilization']:.0f}% utilization, measured "
             f"{a['input_tokens_per_s']:.1f} input + {a['output_tokens_per_s']:.1f} output tok/s while busy",
             f"an input token costs {r['input_weight']:.3g}x an output token",
             f"{'$ per 1M input tokens':<34}{u['cost_per_million_input_tokens']:>14.4f}",
             f"{'$ per 1M output tokens':<34}{u['cost_per_million_output_tokens']:>14.4f}",
             "",
             f"traffic: {t['requests_per_day']:,.0f} requests/day x ({t['input_tokens']:.0f} in + "
             f"{t['output_tokens']:.0f} out) tokens",
             f"{'capacity per accelerator (req/day)':<34}{m['capacity_requests_per_day']:>14,.0f}",
             f"{'accelerators needed':<34}{m['accelerators']:>14}",
             f"{'self-hosted $ per month':<34}{m['cost_per_month']:>14,.2f}",
             f"{'self-hosted $ per 1k requests':<34}{1000 * m['cost_per_request']:>14.4f}"]
    for v in r["apis"]:
        be = v["break_even_requests_per_day"]
        lines += ["", f"vs {v['api']}: ${v['api_cost_per_month']:,.2f}/month "
                  f"(${1000 * v['api_cost_per_request']:.4f} per 1k requests); self-hosting "
                  + (f"saves ${v['savings_per_month']:,.2f}/month" if v["savings_per_month"] >= 0
                     else f"costs ${-v['savings_per_month']:,.2f}/month more"),
                  "  break-even: " + (f"{be:,.0f} requests/day ({v['break_even_tokens_per_day']:,.0f} tokens/day)"
                                      if be is not None else "never: the API is cheaper even at full capacity")]
    return "\n".join(lines)
