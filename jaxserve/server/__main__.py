"""`python -m jaxserve.server`: flags → EngineConfig + ServingConfig → the app, with graceful shutdown.

The engine's flags are generated from `EngineConfig`'s fields (`max_num_seqs` → `--max-num-seqs`, a bool
`enable_x` → `--enable-x` / `--no-enable-x` / `--no-x`), so a new engine option is a flag at once.

Start-up: the HTTP server listens first and answers `/health` with 503 while a builder thread loads the
model and compiles every step shape; then the engine is handed to the app and `/health` turns 200.
With `--add-model` / `--cascade` it builds every model in turn (jaxserve/server/model_router.py), and one
model failing to load fails the start-up, naming it.
SIGTERM / SIGINT: stop admitting (503), let in-flight requests finish within `--shutdown-grace-period`,
abort the rest, exit 0. A second signal skips the grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import inspect
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import types
import typing
from pathlib import Path

from aiohttp import web

from jaxserve.config import (
    ACTIVATION_QUANTIZATIONS,
    ATTENTION_BACKENDS,
    DTYPES,
    KV_CACHE_DTYPES,
    QUANTIZATIONS,
    QUANTIZED_MATMULS,
    SPECULATIVE_METHODS,
    EngineConfig,
    speculative_fields,
)
from jaxserve.server import vllm_cli
from jaxserve.server.app import STATE, CorsConfig, ServerState, ServingConfig, create_app
from jaxserve.server.connections import ConnectionGuard, QuietExceptionHandler, raise_fd_limit
from jaxserve.server.guardrails import GuardrailConfig
from jaxserve.server.limits import Limits, parse_override
from jaxserve.server.model_router import CascadeSpec, ModelSpec, check_cascades, plan_engines

logger = logging.getLogger("jaxserve.server")

_BUILDER = "jaxserve-engine-builder"
_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(text: str) -> int:
    """`1073741824`, `512MiB`, `1G`, `2gb` → bytes."""
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in _UNITS:
        return int(float(t[:-1]) * _UNITS[t[-1]])
    return int(t)


def _flag_type(annotation) -> tuple[type, bool]:
    """(the scalar type, whether None is allowed) of a dataclass field annotation."""
    args = typing.get_args(annotation)
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        scalars = [a for a in args if a is not type(None)]
        return scalars[0], len(scalars) < len(args)
    return annotation, False


def _field_comments(cls: type) -> dict[str, str]:
    """The trailing `# comment` of each field in the class source: the flag's help text."""
    try:
        source = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    return dict(re.findall(r"^\s+(\w+):[^#\n]*#\s*(.+)$", source, re.MULTILINE))


# Engine fields whose values are a fixed set: argparse names the flag and the choices on a bad value.
_CHOICES = {"dtype": ("auto",) + DTYPES, "attention_backend": ATTENTION_BACKENDS, "quantization": QUANTIZATIONS,
            "kv_cache_dtype": KV_CACHE_DTYPES, "quantized_matmul": QUANTIZED_MATMULS,
            "speculative_method": SPECULATIVE_METHODS, "activation_quantization": ACTIVATION_QUANTIZATIONS}
_ALIASES = {"dtype": vllm_cli.DTYPE_ALIASES, "kv_cache_dtype": vllm_cli.KV_DTYPE_ALIASES}


def _with_aliases(name: str):
    aliases = _ALIASES.get(name, {})
    return lambda text: aliases.get(text, text)


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine (generated from EngineConfig)")
    hints = typing.get_type_hints(EngineConfig)
    comments = _field_comments(EngineConfig)
    for field in dataclasses.fields(EngineConfig):
        flag = "--" + field.name.replace("_", "-")
        kind, nullable = _flag_type(hints[field.name])
        default = field.default
        help_ = comments[field.name]  # every field carries a trailing comment (tests/server/test_vllm_compat.py)
        if kind is bool:
            names = [flag]
            group.add_argument(*names, dest=field.name, action=argparse.BooleanOptionalAction, default=default,
                               help=help_)
            if field.name.startswith("enable_"):
                group.add_argument("--no-" + field.name.removeprefix("enable_").replace("_", "-"), dest=field.name,
                                   action="store_false", help=argparse.SUPPRESS)
            continue
        convert = parse_bytes if field.name.endswith("_memory") else kind
        if field.name in _CHOICES:
            convert = _with_aliases(field.name)
        if nullable:
            convert = (lambda c: lambda s: None if s.lower() in ("none", "auto") and c is not str else c(s))(convert)
        group.add_argument(flag, dest=field.name, type=convert, default=default, help=help_,
                           choices=_CHOICES.get(field.name))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m jaxserve.server",
                                description="OpenAI-compatible LLM server on JAX (jaxserve). Takes vLLM's "
                                            "`vllm serve MODEL [flags]` command line.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_tag", nargs="?", default=None, metavar="MODEL",
                   help="the model, as `vllm serve MODEL` takes it (same as --model)")
    add_engine_flags(p)
    e = p.add_argument_group("engine options in vLLM's spelling")
    e.add_argument("--speculative-config", type=json.loads, default=None, metavar="JSON",
                   help='vLLM\'s form of the speculative flags, e.g. \'{"method": "ngram", "num_speculative_tokens": '
                        '4, "prompt_lookup_max": 4}\' or \'{"model": "DRAFT", "num_speculative_tokens": 4}\'')
    s = p.add_argument_group("server")
    s.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=8000, help="0 picks a free port (logged)")
    s.add_argument("--served-model-name", nargs="+", default=None,
                   help="the model id(s) clients send; the first is the one reported (default: the model's name)")
    s.add_argument("--api-key", action="append", default=[], help="repeatable; also $JAXSERVE_API_KEY")
    s.add_argument("--max-waiting", type=int, default=ServingConfig.max_waiting,
                   help="admitted sequences (prompts x n) without a first token; more get 503")
    s.add_argument("--max-seqs-per-request", type=int, default=ServingConfig.max_seqs_per_request,
                   help="prompts x n of one request; more get 400")
    s.add_argument("--max-seqs-in-engine-per-request", type=int,
                   default=ServingConfig.max_seqs_in_engine_per_request,
                   help="a request's sequences in the engine at once; its later prompts queue behind other requests")
    s.add_argument("--allow-priority", action=argparse.BooleanOptionalAction, default=False,
                   help="honour the body's `priority` from every caller (else 400 unless --priority-key)")
    s.add_argument("--priority-key", action="append", default=[], metavar="KEY",
                   help="repeatable: an API key whose `priority` is honoured")
    s.add_argument("--header-timeout", type=float, default=ServingConfig.header_timeout,
                   help="seconds from connect to a complete request head; slower connections are closed")
    s.add_argument("--body-timeout", type=float, default=ServingConfig.body_timeout,
                   help="seconds to read a request body (408 after)")
    s.add_argument("--keepalive-timeout", type=float, default=ServingConfig.keepalive_timeout,
                   help="seconds an idle keep-alive connection stays open")
    s.add_argument("--max-connections", type=int, default=ServingConfig.max_connections,
                   help="open connections at most; more are closed at once")
    s.add_argument("--liveness-stall-timeout", type=float, default=ServingConfig.liveness_stall_timeout,
                   help="seconds; /live fails when work is pending and no engine step finished for this long; 0: never")
    s.add_argument("--request-timeout", type=float, default=ServingConfig.request_timeout, help="seconds; 0: none")
    s.add_argument("--sse-keepalive-interval", type=float, default=ServingConfig.keepalive_interval,
                   help="seconds of stream silence before a `: keep-alive` comment")
    s.add_argument("--max-request-bytes", type=parse_bytes, default=ServingConfig.max_request_bytes,
                   help="the largest request body (bytes; 1MiB, 512k ...); larger ones get 413")
    s.add_argument("--shutdown-grace-period", type=float, default=ServingConfig.shutdown_grace_period,
                   help="seconds in-flight requests get to finish after SIGTERM")
    s.add_argument("--accelerator-price-per-hour", type=float, default=0.0,
                   help="$ per accelerator hour; > 0 adds cost gauges to /metrics")
    s.add_argument("--accelerator-utilization", "--accelerator-utilisation", type=float, default=1.0,
                   help="the average busy fraction the cost gauges assume")
    s.add_argument("--log-level", default="info",
                   help="jaxserve's log level; third-party loggers (absl, orbax, jax) stay at WARNING unless debug")
    s.add_argument("--uvicorn-log-level", default=None, metavar="LEVEL",
                   help="vLLM's name for the HTTP layer's log level (aiohttp here; default: --log-level)")
    s.add_argument("--access-log", action=argparse.BooleanOptionalAction, default=True,
                   help="one line per request: method, path, status, tokens, latency, request id (never text)")
    s.add_argument("--metrics-prefix", default="jaxserve", choices=("jaxserve", "vllm"),
                   help="the metric namespace: vllm exposes vLLM's names (vllm:...) so its dashboards work unchanged")
    c = p.add_argument_group("CORS (vLLM's flags)")
    c.add_argument("--allowed-origins", type=json.loads, default=[], metavar="JSON",
                   help='origins browsers may call from, as JSON: \'["*"]\' or \'["https://app.example"]\'; '
                        "[]: no CORS headers")
    c.add_argument("--allowed-methods", type=json.loads, default=["*"], metavar="JSON", help="JSON list")
    c.add_argument("--allowed-headers", type=json.loads, default=["*"], metavar="JSON", help="JSON list")
    c.add_argument("--allow-credentials", action=argparse.BooleanOptionalAction, default=False,
                   help="send Access-Control-Allow-Credentials")
    r = p.add_argument_group("rate limits (per API key, else per `user`, else per client address)")
    r.add_argument("--rate-limit-rpm", type=float, default=0.0, help="requests per minute; 0: unlimited")
    r.add_argument("--rate-limit-tpm", type=float, default=0.0,
                   help="tokens (prompt + max_tokens reserved, settled at the end) per minute; 0: unlimited")
    r.add_argument("--rate-limit-override", action="append", default=[], metavar="KEY=RPM,TPM",
                   help="repeatable: limits for one key")
    g = p.add_argument_group("guardrails (off by default: --guardrails turns every stage on; each stage alone "
                             "with its own flag)")
    d = GuardrailConfig()
    g.add_argument("--guardrails", action=argparse.BooleanOptionalAction, default=False,
                   help="every stage below (each stage's own flag overrides it)")
    g.add_argument("--guardrail-input-length", action=argparse.BooleanOptionalAction, default=None,
                   help="refuse prompts over --guardrail-max-input-chars (default: as --guardrails)")
    g.add_argument("--guardrail-max-input-chars", type=int, default=d.max_input_chars,
                   help="the input-length stage's limit")
    g.add_argument("--guardrail-injection", action=argparse.BooleanOptionalAction, default=None,
                   help="screen every message (all roles, whole, Unicode-normalised) for prompt injection "
                        "(default: as --guardrails)")
    g.add_argument("--guardrail-injection-threshold", type=float, default=d.injection_threshold,
                   help="the injection score (0..1] that blocks a request")
    g.add_argument("--guardrail-content-policy", action=argparse.BooleanOptionalAction, default=None,
                   help="block listed phrases in prompts and outputs (default: on when --guardrails or a "
                        "--guardrail-blocklist term is given)")
    g.add_argument("--guardrail-blocklist", action="append", default=[], metavar="TERM",
                   help="repeatable; added to the built-in list")
    g.add_argument("--guardrail-blocklist-file", default=None, help="one term per line; # comments")
    g.add_argument("--guardrail-pii", action=argparse.BooleanOptionalAction, default=None,
                   help="stop or redact e-mails, phone, SSN and card numbers in outputs (default: as --guardrails)")
    g.add_argument("--guardrail-check-every", type=int, default=d.check_every_tokens,
                   help="scan streamed output every N tokens (0: only at the end)")
    g.add_argument("--guardrail-holdback-chars", type=int, default=d.holdback_chars,
                   help="the most characters held back while they could still grow into a hit")
    g.add_argument("--guardrail-action", choices=("stop", "redact"), default=d.action,
                   help="on an output hit: stop the choice (content_filter) or redact the hit and go on")
    m = p.add_argument_group("several models in one server (docs/cascade.md)")
    m.add_argument("--add-model", action="append", default=[], metavar="NAME=PATH[,KEY=VALUE...]",
                   help="repeatable: one more model with its own engine and KV pool; keys: memory_share and any "
                        "engine flag's name (quantization=int4, max_model_len=512, ...); other flags as above")
    m.add_argument("--memory-share", type=float, default=None,
                   help="the first model's share of the KV memory (--kv-cache-memory) or of the device "
                        "(--gpu-memory-utilization) when several are served; default: an equal split of the rest")
    m.add_argument("--cascade", action="append", default=[], metavar="NAME=SMALL,LARGE[,threshold=T][,signal=S]",
                   help="repeatable: a virtual model NAME: SMALL answers, and a request goes on to LARGE when the "
                        "answer's confidence (signal mean_logprob or min_logprob) is below T (a logprob)")
    vllm_cli.add_vllm_flags(p)
    return p


def model_plan(args: argparse.Namespace, engine_cfg: EngineConfig, serving: ServingConfig,
               ) -> tuple[list[tuple[str, EngineConfig]], list[CascadeSpec]]:
    """Every model's (name, engine config), the first the server's own, and the cascades over them."""
    specs = [ModelSpec.parse(text) for text in args.add_model]
    if (specs or args.cascade) and engine_cfg.distributed:
        raise ValueError("--add-model and --cascade serve on one host; they do not combine with --distributed")
    plan = plan_engines(serving.served_model_name, engine_cfg, specs, args.memory_share)
    cascades = [CascadeSpec.parse(text) for text in args.cascade]
    check_cascades(cascades, [name for name, _ in plan] + list(serving.model_aliases))
    return plan, cascades


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parses our flags and vLLM's spellings of them (`--flag_name`, `-tp`, a leading `serve`)."""
    argv = vllm_cli.normalize_argv(list(sys.argv[1:] if argv is None else argv))
    if argv[:1] == ["serve"]:  # `python -m jaxserve.server serve MODEL ...`, as `vllm serve MODEL ...`
        argv = argv[1:]
    return build_parser().parse_args(argv)


def _engine_fields(args: argparse.Namespace) -> dict:
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}
    if args.model_tag is not None:
        fields["model"] = args.model_tag
    if args.speculative_config is not None:
        try:
            if not isinstance(args.speculative_config, dict):
                raise ValueError("must be a JSON object")
            fields.update(speculative_fields(args.speculative_config))
        except ValueError as e:
            raise ValueError(f"--speculative-config: {e}") from None
    return fields


def _guardrails(args: argparse.Namespace, blocklist: list[str]) -> GuardrailConfig:
    """Each stage: its own flag if given, else --guardrails. A blocklist term turns the content policy on."""
    def stage(value: bool | None, implied: bool = False) -> bool:
        return (args.guardrails or implied) if value is None else value

    stages = dict(input_length=stage(args.guardrail_input_length), injection=stage(args.guardrail_injection),
                  content_policy=stage(args.guardrail_content_policy,
                                       bool(args.guardrail_blocklist or args.guardrail_blocklist_file)),
                  pii=stage(args.guardrail_pii))
    return GuardrailConfig(
        enabled=any(stages.values()), **stages, max_input_chars=args.guardrail_max_input_chars,
        injection_threshold=args.guardrail_injection_threshold, blocklist=tuple(blocklist),
        check_every_tokens=args.guardrail_check_every, holdback_chars=args.guardrail_holdback_chars,
        action=args.guardrail_action)


def configs_from_args(args: argparse.Namespace) -> tuple[EngineConfig, ServingConfig]:
    engine_cfg = EngineConfig(**_engine_fields(args))
    blocklist = list(GuardrailConfig.blocklist) + list(args.guardrail_blocklist)
    if args.guardrail_blocklist_file:
        lines = Path(args.guardrail_blocklist_file).read_text().splitlines()
        blocklist += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    guardrails = _guardrails(args, blocklist)
    keys = list(args.api_key) + ([os.environ["JAXSERVE_API_KEY"]] if os.environ.get("JAXSERVE_API_KEY") else [])
    names = args.served_model_name or [Path(engine_cfg.model).name.removesuffix(".gguf")]
    serving = ServingConfig(
        served_model_name=names[0], model_aliases=tuple(names[1:]),
        model=engine_cfg.model, api_keys=tuple(keys), max_waiting=args.max_waiting,
        max_seqs_per_request=args.max_seqs_per_request,
        max_seqs_in_engine_per_request=args.max_seqs_in_engine_per_request, allow_priority=args.allow_priority,
        priority_keys=tuple(args.priority_key), liveness_stall_timeout=args.liveness_stall_timeout,
        header_timeout=args.header_timeout, body_timeout=args.body_timeout, keepalive_timeout=args.keepalive_timeout,
        max_connections=args.max_connections,
        request_timeout=args.request_timeout, keepalive_interval=args.sse_keepalive_interval,
        max_request_bytes=args.max_request_bytes, shutdown_grace_period=args.shutdown_grace_period,
        rate_limits=Limits(args.rate_limit_rpm, args.rate_limit_tpm),
        rate_limit_overrides=tuple(parse_override(o) for o in args.rate_limit_override), guardrails=guardrails,
        max_model_len_hint=engine_cfg.max_model_len or 8192,
        accelerator_price_per_hour=args.accelerator_price_per_hour,
        accelerator_utilization=args.accelerator_utilization, metrics_prefix=args.metrics_prefix,
        access_log=args.access_log,
        cors=CorsConfig(tuple(args.allowed_origins), tuple(args.allowed_methods), tuple(args.allowed_headers),
                        args.allow_credentials))
    return engine_cfg, serving


def _describe(engine_cfg: EngineConfig, serving: ServingConfig) -> str:
    shown = dataclasses.asdict(serving)
    shown["api_keys"] = f"{len(serving.api_keys)} key(s)"
    shown["rate_limit_overrides"] = f"{len(serving.rate_limit_overrides)} key(s)"
    shown["priority_keys"] = f"{len(serving.priority_keys)} key(s)"
    return json.dumps({"engine": dataclasses.asdict(engine_cfg), "server": shown}, default=str)


def _build_engine(engine_cfg: EngineConfig, loop: asyncio.AbstractEventLoop, state: ServerState) -> None:
    """The builder thread: load, compile, start the engine, then hand it to the event loop."""
    try:
        from jaxserve.engine import LLMEngine  # imports JAX: keep it off the event loop's start-up path

        start = time.monotonic()
        engine = LLMEngine(engine_cfg, warmup=True)
        engine.start()
        logger.info("engine ready: %s, max_model_len %d, warm-up %.1f s, %.1f s in all", engine_cfg.model,
                    engine.max_model_len, getattr(engine, "warmup_seconds", 0.0), time.monotonic() - start)
        loop.call_soon_threadsafe(state.set_engine, engine)
    except BaseException as e:  # noqa: BLE001 - any failure must reach the loop, which exits non-zero
        logger.exception("the engine failed to start")
        loop.call_soon_threadsafe(state.set_engine_failed, f"{type(e).__name__}: {e}")


def _build_models(plan: list[tuple[str, EngineConfig]], cascades: list[CascadeSpec],
                  loop: asyncio.AbstractEventLoop, state: ServerState) -> None:
    """The builder thread with several models: each engine in turn (the memory split counts on that), then the
    cascades over them; one failure fails the start-up, naming the model."""
    engines: dict = {}
    name = ""
    try:
        from jaxserve.cascade import CascadeEngine, CascadePolicy
        from jaxserve.engine import LLMEngine

        for name, cfg in plan:
            start = time.monotonic()
            engine = LLMEngine(cfg, warmup=True)
            engine.model_root = cfg.model  # shown as the model card's `root`
            engines[name] = engine
            engine.start()
            logger.info("model %r ready: %s, max_model_len %d, %.1f s", name, cfg.model, engine.max_model_len,
                        time.monotonic() - start)
        for c in cascades:
            name = c.name
            engines[c.name] = CascadeEngine(engines[c.small], engines[c.large], CascadePolicy(c.threshold, c.signal),
                                            small_name=c.small, large_name=c.large)
            engines[c.name].model_root = f"cascade:{c.small},{c.large}"
        loop.call_soon_threadsafe(state.set_models, engines)
    except BaseException as e:  # noqa: BLE001 - any failure must reach the loop, which exits non-zero
        logger.exception("model %r failed to start", name)
        for engine in engines.values():
            engine.shutdown()
        source = dict(plan).get(name)
        where = f" ({source.model})" if source is not None else ""
        loop.call_soon_threadsafe(state.set_engine_failed, f"model {name!r}{where}: {type(e).__name__}: {e}")


async def serve(engine_cfg: EngineConfig, serving: ServingConfig, host: str, port: int,
                plan: tuple[list[tuple[str, EngineConfig]], list[CascadeSpec]] | None = None) -> int:
    loop = asyncio.get_running_loop()
    app = create_app(serving)
    state = app[STATE]
    # NOTE: aiohttp's own access log is off; app.access_middleware writes ours (with tokens and request id).
    # NOTE: after a response to a request whose body is unfinished (a 408, a 413 before reading), aiohttp reads
    # and drops the rest for `lingering_time` (10 s by default) before closing: a slow body's connection gets
    # no more time than the body timeout gave it.
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           keepalive_timeout=serving.keepalive_timeout,
                           lingering_time=min(10.0, serving.body_timeout or 10.0))
    await runner.setup()
    loop.set_exception_handler(QuietExceptionHandler())
    logger.info("open-files limit %d", raise_fd_limit())
    guard = ConnectionGuard(header_timeout=serving.header_timeout, keepalive_timeout=serving.keepalive_timeout,
                            max_connections=serving.max_connections)
    guard.install(runner)
    state.connection_gauges = guard.gauges
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0]
    logger.info("jaxserve listening on http://%s:%d (health 503 until the engine is warm)", bound[0], bound[1])

    signals = asyncio.Event()
    count = 0

    def on_signal(signum: int) -> None:
        nonlocal count
        count += 1
        logger.info("received %s%s", signal.Signals(signum).name, " again: skipping the grace period" if count > 1
                    else "")
        signals.set()
        if count > 1:
            state.abort_all("shutdown")

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)

    if plan is not None and (len(plan[0]) > 1 or plan[1]):
        build = threading.Thread(target=_build_models, args=(*plan, loop, state), name=_BUILDER, daemon=True)
    else:
        build = threading.Thread(target=_build_engine, args=(engine_cfg, loop, state), name=_BUILDER, daemon=True)
    build.start()
    started = last_log = time.monotonic()
    while state.engine is None and state.engine_error is None and not signals.is_set():
        await asyncio.sleep(0.2)
        if time.monotonic() - last_log >= 10.0:
            last_log = time.monotonic()
            logger.info("warming up the engine: %.0f s so far", last_log - started)
    if state.engine_error is not None:
        logger.error("start-up failed: %s", state.engine_error)
        await runner.cleanup()
        return 1
    if state.engine is not None:
        logger.info("ready: http://%s:%d/v1 serving %r", bound[0], bound[1], serving.served_model_name)
    await signals.wait()

    state.begin_drain()
    logger.info("draining: %d request(s) in flight, grace period %.0f s", len(state.inflight),
                serving.shutdown_grace_period)
    if not await state.wait_drained(serving.shutdown_grace_period):
        logger.warning("grace period over: aborting %d request(s)", len(state.inflight))
        state.abort_all("shutdown")
        await state.wait_drained(5.0)  # their handlers write the error events and return
    await runner.cleanup()
    for engine in state.router.engines() if state.router is not None else [state.engine] if state.engine else []:
        engine.shutdown()
    logger.info("shut down cleanly")
    return 0


# Loggers of libraries that print at INFO on every start (absl: 13 lines of orbax / jax set-up).
QUIET_LOGGERS = ("absl", "orbax", "jax", "jax._src", "etils", "urllib3", "filelock")


def configure_logging(level: str, http_level: str | None = None) -> None:
    """jaxserve logs at `level`; third-party loggers stay at WARNING unless `level` is debug; aiohttp's
    loggers at `http_level` (vLLM's --uvicorn-log-level), else at `level`."""
    level = level.upper()
    logging.basicConfig(level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        force=True)
    if level != "DEBUG":
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
        try:
            from absl import logging as absl_logging  # absl comes with JAX; imported only to quiet it

            absl_logging.set_verbosity(absl_logging.WARNING)
        except ImportError:
            pass
    logging.getLogger("aiohttp").setLevel((http_level or level).upper())


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    configure_logging(args.log_level, args.uvicorn_log_level)
    try:
        engine_cfg, serving = configs_from_args(args)
        plan = model_plan(args, engine_cfg, serving)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logger.info("config: %s", _describe(engine_cfg, serving))
    if engine_cfg.distributed:
        from jaxserve.worker import distributed  # imports JAX, only for multi-host runs

        distributed.initialize(engine_cfg)
        if not distributed.is_leader():  # followers run the leader's steps; only process 0 serves HTTP
            from jaxserve.follower import run_follower

            return run_follower(engine_cfg)
    rc = asyncio.run(serve(engine_cfg, serving, args.host, args.port, plan))
    if any(t.name == _BUILDER and t.is_alive() for t in threading.enumerate()):
        # NOTE: stopped during warm-up. Interpreter shutdown under a thread that is inside an XLA compile
        # aborts the process, so leave at once: nothing is in flight and nothing needs flushing but the logs.
        logging.shutdown()
        os._exit(rc)
    return rc


if __name__ == "__main__":
    sys.exit(main())
