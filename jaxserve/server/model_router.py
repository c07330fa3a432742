"""Several models in one server: their specs, the memory split, routing by `model`, and per-model metrics.

A server's first model is the positional MODEL (named by --served-model-name); `--add-model NAME=PATH[,k=v]`
adds more, each with its own engine (scheduler, KV pool, step thread), and `--cascade NAME=SMALL,LARGE[,...]`
serves a virtual model over two of them (jaxserve/cascade.py). Requests route by their `model` field;
anything else gets a 404 listing the served names.

Memory is split explicitly by each model's `memory_share` (models without one share the rest equally):
with --kv-cache-memory each KV pool gets its share of those bytes; otherwise the engines are built one after
another with a cumulative --gpu-memory-utilization (the runner sizes a pool as `utilization * total - in
use`, and what is in use then includes the models built before), so model i's weights and KV pool hold
its share of the device.

Metrics: every model (a cascade too) has its own `ServerMetrics`, labelled with its name; `/metrics`
merges them, one family per name. Pure Python: no JAX.
"""

from __future__ import annotations

import dataclasses
import typing
from typing import TYPE_CHECKING, Any

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from jaxserve.config import ACCELERATOR_MEMORY_UTILIZATION, EngineConfig
from jaxserve.server import errors
from jaxserve.server.metrics import NS, EngineCollector, ServerMetrics, cost_gauges, snapshot_of

if TYPE_CHECKING:
    from jaxserve.cascade import CascadeEngine
    from jaxserve.engine_client import EngineClient
    from jaxserve.server.app import ServerState


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One `--add-model NAME=PATH[,key=value...]`: keys are EngineConfig fields (quantization, max_model_len,
    ...) and `memory_share`."""

    name: str
    model: str
    memory_share: float | None = None
    options: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        name, _, rest = text.partition("=")
        path, *pairs = rest.split(",")
        if not name or not path:
            raise ValueError(f"--add-model: expected NAME=PATH[,key=value...], got {text!r}")
        share, options = None, []
        hints = typing.get_type_hints(EngineConfig)
        for pair in pairs:
            key, eq, value = pair.partition("=")
            key = key.strip().replace("-", "_")
            if key == "memory_share":
                share = float(value)
            elif eq and key in hints and key != "model":
                options.append((key, _convert(value, hints[key])))
            else:
                raise ValueError(f"--add-model {name}: unknown option {pair!r} (memory_share or an engine flag's "
                                 f"name, e.g. quantization=int8)")
        return cls(name, path, share, tuple(options))


@dataclasses.dataclass(frozen=True)
class CascadeSpec:
    """One `--cascade NAME=SMALL,LARGE[,threshold=T][,signal=mean_logprob|min_logprob]`."""

    name: str
    small: str
    large: str
    threshold: float = -0.5
    signal: str = "mean_logprob"

    @classmethod
    def parse(cls, text: str) -> CascadeSpec:
        name, _, rest = text.partition("=")
        parts = [p.strip() for p in rest.split(",")]
        if not name or len(parts) < 2 or "=" in parts[0] or "=" in parts[1]:
            raise ValueError(f"--cascade: expected NAME=SMALL,LARGE[,threshold=T][,signal=S], got {text!r}")
        kw: dict[str, Any] = {}
        for pair in parts[2:]:
            key, _, value = pair.partition("=")
            if key == "threshold":
                kw["threshold"] = float(value)
            elif key == "signal":
                kw["signal"] = value
            else:
                raise ValueError(f"--cascade {name}: unknown option {pair!r} (threshold, signal)")
        return cls(name, parts[0], parts[1], **kw)


def _convert(value: str, annotation) -> Any:
    kinds = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    kind = kinds[0]
    if kind is bool:
        return value.lower() in ("1", "true", "yes", "on")
    return kind(value)


def plan_engines(primary_name: str, primary: EngineConfig, specs: list[ModelSpec], primary_share: float | None = None,
                 ) -> list[tuple[str, EngineConfig]]:
    """(name, engine config) of every model, in build order, with the memory split applied."""
    names = [primary_name] + [s.name for s in specs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"model names must be unique; repeated: {dupes}")
    if not specs:
        return [(primary_name, primary)]
    shares = [primary_share] + [s.memory_share for s in specs]
    given = sum(s for s in shares if s is not None)
    free = [i for i, s in enumerate(shares) if s is None]
    if any(s is not None and not 0 < s < 1 for s in shares) or given > 1 + 1e-9 or (free and given >= 1):
        raise ValueError(f"memory shares must be in (0, 1) and sum to at most 1 (got {shares}; unset ones split "
                         "what is left)")
    shares = [s if s is not None else (1 - given) / len(free) for s in shares]
    cfgs = [primary] + [dataclasses.replace(primary, model=s.model, **dict(s.options)) for s in specs]
    out, cumulative = [], 0.0
    for name, cfg, share in zip(names, cfgs, shares):
        cumulative += share
        if primary.kv_cache_memory:
            cfg = dataclasses.replace(cfg, kv_cache_memory=int(primary.kv_cache_memory * share))
        elif not cfg.num_pages:
            util = primary.gpu_memory_utilization or ACCELERATOR_MEMORY_UTILIZATION
            cfg = dataclasses.replace(cfg, gpu_memory_utilization=min(1.0, util * cumulative))
        out.append((name, cfg))
    return out


def check_cascades(cascades: list[CascadeSpec], model_names: list[str]) -> None:
    for c in cascades:
        for member in (c.small, c.large):
            if member not in model_names:
                raise ValueError(f"--cascade {c.name}: {member!r} is not a served model ({', '.join(model_names)})")
        if c.name in model_names:
            raise ValueError(f"--cascade {c.name}: the name is already a model's")


class ModelScope:
    """One served model as a request sees the server: its engine, metrics and name; everything else (admission,
    rate limits, guardrails, the in-flight set) is the server's, reached through the parent state."""

    def __init__(self, parent: ServerState, name: str, engine: EngineClient, metrics: ServerMetrics):
        self.parent, self.name, self.engine, self.metrics = parent, name, engine, metrics
        self.config = dataclasses.replace(parent.config, served_model_name=name, model_aliases=())

    def require_engine(self) -> EngineClient:
        self.parent.require_engine()
        return self.engine

    def __getattr__(self, attr: str):
        return getattr(self.parent, attr)


class ModelRouter:
    """The served models by name (the first is the server's primary model, whose metrics are the state's)."""

    def __init__(self, state: ServerState, engines: dict[str, EngineClient]):
        self.state = state
        cfg = state.config
        self.scopes: dict[str, ModelScope] = {}
        for i, (name, engine) in enumerate(engines.items()):
            if i == 0:
                metrics = state.metrics
            else:
                metrics = ServerMetrics(cfg.max_model_len_hint, model_name=name, prefix=cfg.metrics_prefix)
                if hasattr(engine, "policy"):  # a cascade: its own counters, its members' engine gauges
                    metrics.add_collector(CascadeCollector(engine, cfg.accelerator_price_per_hour,
                                                           cfg.accelerator_utilization))
                else:
                    metrics.add_collector(EngineCollector(lambda e=engine: e, lambda m=metrics, e=engine: cost_gauges(
                        m, e, cfg.accelerator_price_per_hour, cfg.accelerator_utilization,
                        _uptime(state))))
            self.scopes[name] = ModelScope(state, name, engine, metrics)
        for alias in cfg.model_aliases:  # --served-model-name A B: B is the primary model too
            self.scopes.setdefault(alias, self.scopes[cfg.served_model_name])

    @property
    def names(self) -> list[str]:
        return list(self.scopes)

    def scope(self, name: str | None) -> ModelScope:
        if name is None:
            return self.scopes[self.state.config.served_model_name]
        if name not in self.scopes:
            raise errors.model_not_found(name, self.names)
        return self.scopes[name]

    def engines(self) -> list[EngineClient]:
        """The real engines (no cascade), each once."""
        seen = {id(s.engine): s.engine for s in self.scopes.values() if not hasattr(s.engine, "policy")}
        return list(seen.values())

    def exposition(self) -> bytes:
        metrics = {id(s.metrics): s.metrics for s in self.scopes.values()}
        return generate_latest(_Merged([m._exposed for m in metrics.values()]))


def _uptime(state: ServerState) -> float:
    import time

    return time.time() - state.started_at


class _Merged:
    """Several `_Exposed` registries as one: a family's samples from every model under one HELP / TYPE."""

    def __init__(self, sources: list):
        self.sources = sources

    def collect(self):
        families: dict[str, Metric] = {}
        for source in self.sources:
            for family in source.collect():
                merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                                 family.unit))
                merged.samples += family.samples
        yield from families.values()


class CascadeCollector:
    """A cascade's counters at scrape time: who answered, escalations, and the cost saved against sending
    everything to the large model.

    Cost per token of a model = its engine's busy seconds / tokens it computed (the cost gauges' arithmetic,
    the price cancelling out of the fraction). Sending everything to the large model would have cost
    `c_large * (kept + escalated tokens)` (the large model's answers taken as long as the small one's);
    the cascade cost `c_small * every small token + c_large * escalated tokens`.
    """

    def __init__(self, cascade: CascadeEngine, price_per_hour: float, utilization: float):
        self.cascade, self.price, self.utilization = cascade, price_per_hour, utilization

    def describe(self):
        return []

    def collect(self):
        c, s = self.cascade, self.cascade.stats
        answered = CounterMetricFamily(NS + "cascade_requests", "Cascade requests by the model that answered.",
                                       labels=["answered_by"])
        answered.add_metric([c.small_name], s.answered_small)
        answered.add_metric([c.large_name], s.answered_large)
        yield answered
        esc = CounterMetricFamily(NS + "cascade_escalations", "Requests the small model was unsure of, sent on to "
                                  "the large one.")
        esc.add_metric([], s.answered_large)
        yield esc
        decided = s.answered_small + s.answered_large
        if decided:
            share = GaugeMetricFamily(NS + "cascade_small_share", "Share of cascade requests the small model "
                                      "answered.")
            share.add_metric([], s.answered_small / decided)
            yield share
        threshold = GaugeMetricFamily(NS + "cascade_threshold", "The confidence threshold below which requests "
                                      "escalate.")
        threshold.add_metric([], c.policy.threshold)
        yield threshold
        saved = cost_saved(c, self.price, self.utilization)
        for key, doc in (("fraction", "Share of the all-large cost the cascade saved (negative: it cost more)."),
                         ("dollars", "Dollars the cascade saved against sending every request to the large model.")):
            if key in saved:
                g = GaugeMetricFamily(NS + f"cascade_cost_saved_{key}", doc)
                g.add_metric([], saved[key])
                yield g


def cost_saved(cascade: CascadeEngine, price_per_hour: float, utilization: float) -> dict[str, float]:
    """{"fraction": ..., "dollars": ... (with a price)} once both engines have run steps; {} before."""
    small, large = snapshot_of(cascade.small), snapshot_of(cascade.large)
    if small is None or large is None or not small.num_step_tokens or not large.num_step_tokens:
        return {}
    per_token_small = small.step_seconds / small.num_step_tokens  # busy seconds per token
    per_token_large = large.step_seconds / large.num_step_tokens
    s = cascade.stats
    all_large = per_token_large * (s.kept_tokens + s.large_tokens)
    saved = per_token_large * s.kept_tokens - per_token_small * s.small_tokens
    out = {"fraction": saved / all_large} if all_large > 0 else {}
    if price_per_hour > 0:
        out["dollars"] = saved * price_per_hour / 3600 / utilization
    return out


# ---------------------------------------------------------------------------- who answered (cascades)

ANSWERED_BY_HEADER = "X-Jaxserve-Answered-By"


def _answerers(streams) -> list[str]:
    return [s.answered_by for s in streams if getattr(s, "answered_by", None) is not None]


def answered_by_field(streams) -> dict[str, Any]:
    """{"answered_by": name} for a cascade's response (a list, one per prompt, when its prompts differ)."""
    names = _answerers(streams)
    if not names:
        return {}
    return {"answered_by": names[0] if len(set(names)) == 1 else names}


def answered_by_header(streams) -> dict[str, str]:
    names = _answerers(streams)
    return {ANSWERED_BY_HEADER: ",".join(dict.fromkeys(names))} if names else {}


async def wait_decided(streams, timeout: float) -> None:
    """Until every cascade stream among `streams` knows who answers (so a stream's headers can say it).

    Raises the server's timeout error after `timeout` seconds (0: none)."""
    import asyncio

    loop = asyncio.get_running_loop()
    waits = []
    for stream in streams:
        decided = getattr(stream, "decided", None)
        if decided is None or decided.is_set():
            continue
        fut = loop.create_future()

        def ring(_, fut=fut):  # the engine thread that decided
            loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(None))

        stream.on_decided = ring
        if decided.is_set():  # decided before the callback was set
            ring(None)
        waits.append(fut)
    if not waits:
        return
    try:
        await asyncio.wait_for(asyncio.gather(*waits), timeout or None)
    except TimeoutError:
        raise errors.timeout(timeout) from None
