"""Prometheus metrics in the `jaxserve:` namespace, named after vLLM's `vllm:` ones.

Exposition (`ServerMetrics.exposition`) puts every series under `--metrics-prefix` (`jaxserve:` or `vllm:`,
so vLLM's Grafana dashboards, alert rules and KEDA / HPA autoscalers match unchanged) and labels every
series with `model_name`, as vLLM does.

Two kinds of source:
  * Per-request observations (latencies, lengths, finish reasons, errors) are recorded by the serving
    layer on the event loop as requests progress, into histograms and counters.
  * Engine state (running / waiting requests, KV pages, prefix-cache hits, preemptions, steps) is read at
    scrape time by `EngineCollector`, from one `EngineClient.stats_snapshot()` (see jaxserve/engine_client.py):
    the server never reads the engine's internals.

Each app gets its own `CollectorRegistry`, so tests can build many apps in one process.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

from jaxserve.engine_client import ITERATION_TOKEN_BUCKETS

if TYPE_CHECKING:
    from jaxserve.engine_client import EngineClient, EngineStatsSnapshot

logger = logging.getLogger(__name__)

NS = "jaxserve:"
FINISH_REASONS = ("stop", "length", "content_filter", "abort", "error")
ERROR_TYPES = ("bad_request", "unauthorized", "not_found", "too_large", "rate_limited", "unavailable",
               "content_policy", "timeout", "oom", "client_disconnect", "internal")
GUARDRAIL_STAGES = ("input_length", "prompt_injection", "content_policy", "pii")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0)
REQUEST_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                   240.0, 480.0, 960.0)


def token_buckets(max_len: int) -> tuple[float, ...]:
    """1, 2, 5, 10, 20, 50, ... up to max_len (vLLM's build_1_2_5_buckets)."""
    out, exp = [], 0
    while True:
        for m in (1, 2, 5):
            value = m * 10**exp
            if value > max_len:
                return tuple(out)
            out.append(float(value))
        exp += 1


PREFIXES = ("jaxserve", "vllm")
N_BUCKETS = (1, 2, 4, 8, 16)


class _Exposed:
    """The registry as scraped: names under `prefix:` and a `model_name` label on every sample."""

    def __init__(self, registry: CollectorRegistry, prefix: str, model_name: str):
        self.registry, self.prefix, self.model_name = registry, prefix + ":", model_name

    def collect(self):
        for family in self.registry.collect():
            out = Metric(self.prefix + family.name.removeprefix(NS), family.documentation, family.type, family.unit)
            for sample in family.samples:
                out.add_sample(self.prefix + sample.name.removeprefix(NS),
                               {"model_name": self.model_name, **sample.labels}, sample.value, sample.timestamp,
                               sample.exemplar)
            yield out


class ServerMetrics:
    def __init__(self, max_model_len: int = 8192, *, model_name: str = "", prefix: str = "jaxserve"):
        if prefix not in PREFIXES:
            raise ValueError(f"metrics prefix must be one of {PREFIXES}, got {prefix!r}")
        self.registry = CollectorRegistry()
        self._exposed = _Exposed(self.registry, prefix, model_name)
        r = self.registry
        tokens = token_buckets(max_model_len)
        self.ttft = Histogram(NS + "time_to_first_token_seconds", "Time to first token.", buckets=TTFT_BUCKETS,
                              registry=r)
        self.itl = Histogram(NS + "inter_token_latency_seconds", "Time between two streamed tokens of a choice.",
                             buckets=ITL_BUCKETS, registry=r)
        self.tpot = Histogram(NS + "time_per_output_token_seconds", "Per request: (e2e - ttft) / (tokens - 1).",
                              buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(NS + "e2e_request_latency_seconds", "Arrival to last token.", buckets=REQUEST_BUCKETS,
                             registry=r)
        self.queue_time = Histogram(NS + "request_queue_time_seconds", "Arrival to first scheduled.",
                                    buckets=REQUEST_BUCKETS, registry=r)
        self.prompt_len = Histogram(NS + "request_prompt_tokens", "Prompt tokens per request.", buckets=tokens,
                                    registry=r)
        self.gen_len = Histogram(NS + "request_generation_tokens", "Generated tokens per request.", buckets=tokens,
                                 registry=r)
        self.prefill_time = Histogram(NS + "request_prefill_time_seconds", "First scheduled to first token.",
                                      buckets=REQUEST_BUCKETS, registry=r)
        self.decode_time = Histogram(NS + "request_decode_time_seconds", "First token to last token.",
                                     buckets=REQUEST_BUCKETS, registry=r)
        self.inference_time = Histogram(NS + "request_inference_time_seconds", "First scheduled to last token.",
                                        buckets=REQUEST_BUCKETS, registry=r)
        self.params_n = Histogram(NS + "request_params_n", "The `n` of each admitted request.", buckets=N_BUCKETS,
                                  registry=r)
        self.params_max_tokens = Histogram(NS + "request_params_max_tokens", "The max_tokens of each admitted prompt "
                                           "(filled up to the context when the request left it out).",
                                           buckets=tokens, registry=r)
        self.max_num_generation_tokens = Histogram(
            NS + "request_max_num_generation_tokens", "The most tokens a request may generate (max_tokens x n).",
            buckets=tokens, registry=r)
        self.prompt_tokens = Counter(NS + "prompt_tokens", "Prompt tokens of admitted requests, counted when they "
                                     "are submitted to the engine.", registry=r)
        self.generation_tokens = Counter(NS + "generation_tokens", "Generated tokens.", registry=r)
        self.request_success = Counter(NS + "request_success", "Finished requests by finish reason.",
                                       ["finished_reason"], registry=r)
        self.errors = Counter(NS + "request_errors", "Failed requests by error type.", ["type"], registry=r)
        self.guardrail_hits = Counter(NS + "guardrail_hits", "Guardrail findings by stage and direction.",
                                      ["stage", "direction"], registry=r)
        self.rate_limited = Counter(NS + "rate_limit_rejections", "Requests refused by a rate limit, by bucket.",
                                    ["kind"], registry=r)
        # Pre-create the label values so rate() works from the first scrape and dashboards show zeros.
        for reason in FINISH_REASONS:
            self.request_success.labels(reason)
        for kind in ERROR_TYPES:
            self.errors.labels(kind)
        for stage in GUARDRAIL_STAGES:
            for direction in ("input", "output"):
                self.guardrail_hits.labels(stage, direction)
        for kind in ("requests", "tokens"):
            self.rate_limited.labels(kind)

    def add_collector(self, collector: Any) -> None:
        self.registry.register(collector)

    def error(self, kind: str) -> None:
        self.errors.labels(kind).inc()

    def finished(self, reason: str, prompt_tokens: int, generation_tokens: int, e2e: float,
                 ttft: float | None, queue_time: float | None) -> None:
        self.request_success.labels(reason).inc()
        self.prompt_tokens.inc(prompt_tokens)
        self.prompt_len.observe(prompt_tokens)
        self.gen_len.observe(generation_tokens)
        self.e2e.observe(e2e)
        if queue_time is not None:
            self.queue_time.observe(max(0.0, queue_time))
        if ttft is not None and generation_tokens > 1:
            self.tpot.observe(max(0.0, e2e - ttft) / (generation_tokens - 1))

    def admitted(self, n: int, max_tokens: list[int]) -> None:
        """One admitted request: its `n` and each prompt's max_tokens."""
        self.params_n.observe(n)
        for m in max_tokens:
            self.params_max_tokens.observe(m)
            self.max_num_generation_tokens.observe(m * n)

    def choice_timings(self, scheduled: float | None, first_token: float | None, last_token: float | None) -> None:
        """Prefill, decode and inference time of one finished choice (monotonic seconds; None: never reached)."""
        if scheduled is not None and first_token is not None:
            self.prefill_time.observe(max(0.0, first_token - scheduled))
        if first_token is not None and last_token is not None:
            self.decode_time.observe(max(0.0, last_token - first_token))
        if scheduled is not None and last_token is not None:
            self.inference_time.observe(max(0.0, last_token - scheduled))

    def exposition(self) -> bytes:
        return generate_latest(self._exposed)


# Engine gauges and counters: metric suffix -> (help, the snapshot field it reads).
ENGINE_GAUGES = {
    "num_requests_running": ("Requests being computed by the engine.", lambda s: s.scheduler.num_running),
    "num_requests_waiting": ("Requests waiting for the engine (queued or preempted).",
                             lambda s: s.scheduler.num_waiting),
    "kv_cache_usage_perc": ("Fraction of KV pages held by requests (0..1).", lambda s: s.scheduler.kv_usage),
    "gpu_cache_usage_perc": ("kv_cache_usage_perc under vLLM v0's name (its Grafana dashboard reads this one).",
                             lambda s: s.scheduler.kv_usage),
    "kv_cache_used_pages": ("KV pages held by requests.", lambda s: s.scheduler.kv_used_pages),
    "kv_cache_total_pages": ("Usable KV pages (the null page excluded).", lambda s: s.scheduler.kv_total_pages),
    "prefix_cache_hit_rate": ("Prefix-cache hits / queries, in tokens, since start.",
                              lambda s: s.scheduler.prefix_cache_hit_rate),
    "kv_cache_waste_tokens": ("Allocated but unfilled KV token slots (at most a page per sequence).",
                              lambda s: s.scheduler.kv_waste_tokens),
    "engine_host_fraction": ("Share of engine step time not spent waiting for the device, since start.",
                             lambda s: s.host_fraction),
    "engine_warmup_seconds": ("Seconds the engine spent compiling at start-up.", lambda s: s.warmup_seconds),
    "engine_compiles_after_warmup": ("Step executables compiled after warm-up (should stay 0: each one stalls every "
                                     "request while it compiles).", lambda s: s.compiles_after_warmup),
    # Speculative decoding (only when the engine has it on).
    "spec_decode_acceptance_rate": ("Accepted / proposed speculative tokens since start.",
                                    lambda s: s.spec_decode and s.spec_decode.acceptance_rate),
    "spec_decode_mean_accepted_length": ("Tokens emitted per verified proposal chunk (1 + accepted).",
                                         lambda s: s.spec_decode and s.spec_decode.mean_accepted_length),
}
ENGINE_COUNTERS = {
    "num_preemptions": ("Requests preempted (recomputed later) since start.", lambda s: s.scheduler.num_preemptions),
    "prefix_cache_queries": ("Prompt tokens looked up in the prefix cache.",
                             lambda s: s.scheduler.prefix_cache_queries),
    "prefix_cache_hits": ("Prompt tokens found in the prefix cache.", lambda s: s.scheduler.prefix_cache_hits),
    "engine_steps": ("Engine steps that computed tokens.", lambda s: s.num_steps),
    "engine_step_tokens": ("Tokens computed by engine steps (prompt and generated).", lambda s: s.num_step_tokens),
    "spec_decode_num_drafts": ("Verified chunks that carried speculative proposals.",
                               lambda s: s.spec_decode and s.spec_decode.num_drafts),
    "spec_decode_num_draft_tokens": ("Speculative tokens proposed and verified.",
                                     lambda s: s.spec_decode and s.spec_decode.num_draft_tokens),
    "spec_decode_num_accepted_tokens": ("Speculative tokens accepted.",
                                        lambda s: s.spec_decode and s.spec_decode.num_accepted_tokens),
    "spec_decode_num_emitted_tokens": ("Tokens emitted by chunks with proposals (accepted + one each).",
                                       lambda s: s.spec_decode and s.spec_decode.num_emitted_tokens),
}


def snapshot_of(engine: EngineClient | None) -> EngineStatsSnapshot | None:
    """The engine's stats, or None while it is being built (or if a read races a resize on the engine thread)."""
    if engine is None:
        return None
    try:
        return engine.stats_snapshot()
    except RuntimeError:  # NOTE: a dict resized mid-read by the engine thread; the next scrape gets it
        return None


class EngineCollector:
    """Engine and server gauges read at scrape time, from one `EngineClient.stats_snapshot()`.

    Args:
      get_engine: returns the engine, or None while it is being built.
      server_values: returns {metric suffix: value} for server-side gauges (in flight, draining, ...).
    """

    def __init__(self, get_engine: Callable[[], EngineClient | None],
                 server_values: Callable[[], dict[str, float]]):
        self.get_engine = get_engine
        self.server_values = server_values

    def describe(self):
        return []  # NOTE: no describe() round: collect() reads the engine, which may not exist yet

    def collect(self):
        snap = snapshot_of(self.get_engine())
        for metric_family, table in ((GaugeMetricFamily, ENGINE_GAUGES), (CounterMetricFamily, ENGINE_COUNTERS)):
            for name, (doc, read) in table.items():
                value = read(snap) if snap is not None else None
                if value is not None:
                    family = metric_family(NS + name, doc)
                    family.add_metric([], float(value))
                    yield family
        if snap is not None and snap.spec_decode is not None and snap.spec_decode.accepted_per_position:
            family = CounterMetricFamily(NS + "spec_decode_num_accepted_tokens_per_pos",
                                         "Speculative tokens accepted at each proposal position.", labels=["position"])
            for position, value in enumerate(snap.spec_decode.accepted_per_position):
                family.add_metric([str(position)], float(value))
            yield family
        if snap is not None and snap.iteration_token_counts:
            yield _histogram(NS + "iteration_tokens_total", "Tokens computed per engine step (prompt and generated).",
                             ITERATION_TOKEN_BUCKETS, snap.iteration_token_counts, snap.num_step_tokens)
        for name, value in self.server_values().items():
            family = GaugeMetricFamily(NS + name, name.replace("_", " ") + ".")
            family.add_metric([], float(value))
            yield family


def _histogram(name: str, doc: str, bounds, counts, total: float) -> HistogramMetricFamily:
    """A histogram family from per-bucket counts (the last count is the +Inf bucket)."""
    cumulative, running = [], 0
    for bound, count in zip([*map(str, map(float, bounds)), "+Inf"], counts):
        running += count
        cumulative.append((bound, running))
    return HistogramMetricFamily(name, doc, buckets=cumulative, sum_value=float(total))


def _counter_total(counter: Counter) -> float:
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


def cost_gauges(metrics: ServerMetrics, engine: EngineClient | None, price_per_hour: float, utilization: float,
                uptime: float) -> dict[str, float]:
    """The serving arithmetic of `jaxserve.server.cost` on this server's own throughput, as gauges.

    Throughput is prompt and generated tokens over the seconds the engine spent in steps (its busy time),
    so the figures are what a token costs at the load seen so far; every token weighs the same
    (input_weight 1). Nothing when no price is set; no cost figures before the first token.
    """
    if price_per_hour <= 0:
        return {}
    from jaxserve.server.cost import Accelerator, unit_costs

    out = {"accelerator_price_per_hour": price_per_hour, "accelerator_utilization": utilization}
    snap = snapshot_of(engine)
    busy = snap.step_seconds if snap is not None else 0.0
    if uptime > 0:
        out["accelerator_busy_fraction"] = min(1.0, busy / uptime)
    generated = _counter_total(metrics.generation_tokens)
    if busy > 0 and generated > 0:
        acc = Accelerator(price_per_hour, utilization, _counter_total(metrics.prompt_tokens) / busy, generated / busy)
        unit = unit_costs(acc, input_weight=1.0)
        out["cost_per_million_input_tokens"] = unit["cost_per_million_input_tokens"]
        out["cost_per_million_output_tokens"] = unit["cost_per_million_output_tokens"]
    return out
