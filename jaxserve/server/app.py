"""The aiohttp application: routes, middlewares and the server's state.

Tasks, threads and who owns what:
  * The event loop (the main thread) runs every HTTP handler, one aiohttp task per request. Only it touches
    `ServerState`: the in-flight set, the rate-limit buckets, the draining flag and the metric objects, so
    none of them has a lock.
  * The engine thread (`engine.start()`) runs the model steps and owns the scheduler, the KV cache and the
    requests. Handlers reach it only through `engine.add_request` / `engine.abort`, which are thread-safe
    (they queue commands on the engine's inbox), and get results back through each request's
    `RequestStream`: the engine puts deltas on the stream's own queue and rings the handler's
    `asyncio.Event` with `loop.call_soon_threadsafe` (`streaming.DeltaBridge`). One event per HTTP request.
  * The builder thread (started by `__main__`) constructs and warms up the engine, then hands it to the
    loop with `call_soon_threadsafe(state.set_engine, engine)`. Until then `/health` answers 503. With
    several models (`--add-model`, `--cascade`) it builds every engine, one after another, and hands them
    over together (`state.set_models`): `/health` turns 200 only when all are warm. Each engine has its own
    step thread; a cascade (jaxserve/cascade.py) runs on its members' threads.
  * `/metrics` reads the engine's counters at scrape time without a lock, through
    `EngineClient.stats_snapshot()` (see `metrics.EngineCollector`). The server knows the engine only as an
    `EngineClient` (jaxserve/engine_client.py).

Shutdown (`__main__`): `begin_drain()` makes new requests and `/health` answer 503, `wait_drained()` lets
the in-flight ones finish within the grace period, `abort_all()` cancels the rest.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
from typing import Any, Callable

from aiohttp import web

import jaxserve
from jaxserve.engine_client import EngineClient
from jaxserve.server import errors, protocol
from jaxserve.server.connections import connection_middleware
from jaxserve.server.docs_page import DOCS_HTML
from jaxserve.server.errors import APIError
from jaxserve.server.guardrails import GuardrailChain, GuardrailConfig
from jaxserve.server.limits import Limits, RateLimiter
from jaxserve.server.metrics import PREFIXES, EngineCollector, ServerMetrics, cost_gauges
from jaxserve.server.middleware import CorsConfig, cors_middleware, on_response_prepare, request_id_middleware
from jaxserve.server.model_router import ModelRouter, ModelScope
from jaxserve.server.openapi import openapi_spec
from jaxserve.server.serving import Generation, serve_generation
from jaxserve.text.chat_template import render_chat
from jaxserve.text.tool_calls import render_messages

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServingConfig:
    """The HTTP layer's options (the engine's are `EngineConfig`). Field names match the flags."""

    served_model_name: str = "SmolLM2-135M-Instruct"
    model: str = "SmolLM2-135M-Instruct"  # what --model said (shown as the model's `root`)
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    max_waiting: int = 256  # admitted sequences (prompts x n) without a first token yet; more → 503
    max_seqs_per_request: int = 128  # prompts x n of one request; more → 400
    max_seqs_in_engine_per_request: int = 16  # a request's sequences in the engine at once (its later prompts wait)
    allow_priority: bool = False  # honour `priority` from every caller; else only from `priority_keys`
    priority_keys: tuple[str, ...] = ()  # API keys whose `priority` is honoured (others get 400)
    liveness_stall_timeout: float = 300.0  # /live fails when work is pending and no step finished for this long
    header_timeout: float = 10.0  # seconds from connect (or the last response) to a complete request head
    body_timeout: float = 30.0  # seconds to read a request body
    keepalive_timeout: float = 75.0  # seconds an idle keep-alive connection stays open
    max_connections: int = 1024  # open connections at most; more are closed at once
    request_timeout: float = 600.0  # seconds; 0: none
    keepalive_interval: float = 5.0  # seconds of SSE silence before a `: keep-alive` comment
    max_request_bytes: int = 1 << 20
    shutdown_grace_period: float = 30.0
    rate_limits: Limits = Limits()
    rate_limit_overrides: tuple[tuple[str, Limits], ...] = ()
    guardrails: GuardrailConfig = GuardrailConfig(enabled=False)  # off unless asked (--guardrails, a stage's flag)
    max_model_len_hint: int = 8192  # for the token-length histogram buckets, before the engine exists
    accelerator_price_per_hour: float = 0.0  # > 0: cost gauges in /metrics (jaxserve/server/cost.py)
    accelerator_utilization: float = 1.0  # the average busy fraction the cost gauges assume
    model_aliases: tuple[str, ...] = ()  # more names clients may send (--served-model-name A B ...)
    metrics_prefix: str = "jaxserve"  # the /metrics namespace: jaxserve or vllm (vLLM's dashboards read vllm:)
    access_log: bool = True  # one line per request on the jaxserve.access logger
    cors: CorsConfig = CorsConfig()

    def __post_init__(self):
        if self.max_waiting < 1 or self.max_request_bytes < 1:
            raise ValueError("max_waiting and max_request_bytes must be positive")
        if self.max_seqs_per_request < 1 or self.max_seqs_in_engine_per_request < 1:
            raise ValueError("max_seqs_per_request and max_seqs_in_engine_per_request must be positive")
        if self.request_timeout < 0 or self.keepalive_interval <= 0 or self.shutdown_grace_period < 0:
            raise ValueError("request_timeout and shutdown_grace_period must be >= 0, keepalive_interval > 0")
        if min(self.header_timeout, self.body_timeout, self.keepalive_timeout) < 0 or self.max_connections < 1:
            raise ValueError("header, body and keep-alive timeouts must be >= 0 (0: none), max_connections positive")
        if self.accelerator_price_per_hour < 0 or not 0 < self.accelerator_utilization <= 1:
            raise ValueError("accelerator_price_per_hour must be >= 0 and accelerator_utilization in (0, 1]")
        if self.metrics_prefix not in PREFIXES:
            raise ValueError(f"metrics_prefix must be one of {PREFIXES}, got {self.metrics_prefix!r}")

    @property
    def model_names(self) -> tuple[str, ...]:
        return (self.served_model_name, *self.model_aliases)


class ServerState:
    def __init__(self, config: ServingConfig):
        self.config = config
        self.engine: EngineClient | None = None  # the primary model's
        self.router: ModelRouter | None = None  # several models: every served name's engine and metrics
        self.engine_error: str | None = None
        self.draining = False
        self.started_at = time.time()
        self.metrics = ServerMetrics(config.max_model_len_hint, model_name=config.served_model_name,
                                     prefix=config.metrics_prefix)
        self.limiter = RateLimiter(config.rate_limits, dict(config.rate_limit_overrides),
                                   on_reject=lambda kind: self.metrics.rate_limited.labels(kind).inc())
        self.guardrails = GuardrailChain.from_config(config.guardrails)
        self.connection_gauges: Callable[[], dict[str, float]] | None = None  # set by __main__'s ConnectionGuard
        self.inflight: set[Generation] = set()
        self._drained = asyncio.Event()
        self.metrics.add_collector(EngineCollector(lambda: self.engine, self._server_gauges))

    # ------------------------------------------------------------------ lifecycle

    def set_engine(self, engine: EngineClient) -> None:
        self.engine = engine

    def set_models(self, engines: dict[str, EngineClient]) -> None:
        """Several models, the primary (--served-model-name) first; ready once this is called."""
        self.router = ModelRouter(self, engines)
        self.engine = engines[self.config.served_model_name]

    @property
    def model_names(self) -> list[str]:
        return self.router.names if self.router is not None else list(self.config.model_names)

    def for_model(self, name: str | None) -> ServerState | ModelScope:
        """The state a request for `name` runs against: its model's engine, metrics and name (404: not served)."""
        self.require_engine()
        if self.router is not None:
            return self.router.scope(name)
        if name is not None and name not in self.config.model_names:
            raise errors.model_not_found(name, self.model_names)
        return self

    def set_engine_failed(self, message: str) -> None:
        self.engine_error = message

    @property
    def ready(self) -> bool:
        return self.engine is not None and not self.draining

    def begin_drain(self) -> None:
        self.draining = True
        if not self.inflight:
            self._drained.set()

    async def wait_drained(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._drained.wait(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    def abort_all(self, reason: str) -> None:
        for gen in list(self.inflight):
            gen.abort(reason)

    # ------------------------------------------------------------------ admission

    def require_engine(self) -> EngineClient:
        if self.draining:
            raise errors.unavailable("The server is shutting down.", "shutting_down")
        if self.engine is None:
            message = "The model is still loading." if self.engine_error is None else "The engine failed to start."
            raise errors.unavailable(message, "model_loading")
        return self.engine

    @property
    def num_queued(self) -> int:
        return sum(1 for g in self.inflight if not g.started)

    @property
    def num_waiting_seqs(self) -> int:
        """Admitted sequences without a first token yet (what --max-waiting bounds)."""
        return sum(g.num_waiting_seqs for g in self.inflight)

    def admit(self, gen: Generation) -> None:
        self.require_engine()
        waiting = self.num_waiting_seqs
        if waiting + gen.num_seqs > self.config.max_waiting:
            raise errors.unavailable(f"The server is busy: {waiting} sequences are waiting and this request adds "
                                     f"{gen.num_seqs} (--max-waiting {self.config.max_waiting}).", "queue_full")
        gen.reservation = self.limiter.admit(self.rate_key(gen.http, gen.req.user), gen.reserved_tokens)
        self.inflight.add(gen)

    def release(self, gen: Generation) -> None:
        if gen.reservation is not None:
            self.limiter.settle(gen.reservation, gen.used_tokens())
        self.inflight.discard(gen)
        if self.draining and not self.inflight:
            self._drained.set()

    def check_priority(self, http: web.Request, priority: int) -> None:
        """A non-zero `priority` jumps the queue: only the operator may allow it (to all or to some keys)."""
        if priority == 0 or self.config.allow_priority:
            return
        token = bearer_token(http) or ""
        if not any(hmac.compare_digest(token.encode(), key.encode()) for key in self.config.priority_keys):
            raise errors.bad_request("'priority' is not allowed for this caller (the server honours it only with "
                                     "--allow-priority or for --priority-key keys); omit it or send 0",
                                     param="priority")

    def rate_key(self, http: web.Request, user: str | None) -> str:
        if self.config.api_keys:
            return bearer_token(http) or ""
        # NOTE: never the body's `user`: a client picks it freely, so a new name per request would be a new bucket.
        return f"ip:{http.remote}"

    def _server_gauges(self) -> dict[str, float]:
        return {"server_requests_in_flight": len(self.inflight), "server_requests_queued": self.num_queued,
                "server_draining": float(self.draining), "engine_ready": float(self.engine is not None),
                "rate_limit_keys": self.limiter.num_keys,
                **(self.connection_gauges() if self.connection_gauges else {}),
                **cost_gauges(self.metrics, self.engine, self.config.accelerator_price_per_hour,
                              self.config.accelerator_utilization, time.time() - self.started_at)}


STATE = web.AppKey("state", ServerState)


def bearer_token(http: web.Request) -> str | None:
    header = http.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _protected(path: str) -> bool:
    return path.startswith("/v1/") or path in ("/tokenize", "/detokenize")


@web.middleware
async def error_middleware(request: web.Request, handler):
    state = request.app[STATE]
    try:
        if _protected(request.path) and state.config.api_keys:
            token = bearer_token(request) or ""
            if not any(hmac.compare_digest(token.encode(), key.encode()) for key in state.config.api_keys):
                raise errors.unauthorized()
        return await handler(request)
    except APIError as e:
        err = e
    except web.HTTPRequestEntityTooLarge:
        err = errors.body_too_large(request.content_length, state.config.max_request_bytes)
    except web.HTTPNotFound:
        err = errors.route_not_found(request.path)
    except web.HTTPMethodNotAllowed as e:
        allowed = ", ".join(sorted(e.allowed_methods))
        err = APIError(405, f"Method {request.method} not allowed on {request.path}; use {allowed}.",
                       code="method_not_allowed", headers={"Allow": allowed})
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        err = errors.internal()
    state.metrics.error(err.metric_type)
    return err.to_response()


async def read_json(request: web.Request) -> Any:
    limit = request.app[STATE].config.max_request_bytes
    if request.content_length is not None and request.content_length > limit:
        raise errors.body_too_large(request.content_length, limit)
    try:
        async with asyncio.timeout(request.app[STATE].config.body_timeout or None):
            raw = await request.read()  # aiohttp raises HTTPRequestEntityTooLarge past client_max_size (chunked)
    except TimeoutError:
        raise errors.body_timeout(request.app[STATE].config.body_timeout) from None
    try:
        body = json.loads(raw)
    except RecursionError:
        raise errors.bad_request(f"The body is nested more than {protocol.MAX_JSON_DEPTH} levels deep.") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, an integer of more than 4300 digits
        raise errors.bad_request(f"The body is not valid JSON: {e}") from None
    protocol.check_json(body)
    return body


# ---------------------------------------------------------------------------- handlers

def with_generation_defaults(state: ServerState, body: Any, req: protocol.GenerationRequest,
                             ) -> protocol.GenerationRequest:
    """--generation-config: the model's sampling defaults for the fields the body left out."""
    engine = state.router.scope(req.model).engine if state.router is not None and req.model in state.router.scopes \
        else state.engine
    defaults = getattr(engine, "default_sampling", None) or {}
    if not defaults or not isinstance(body, dict):
        return req
    names = {"max_tokens": ("max_tokens", "max_completion_tokens")}
    missing = {f: v for f, v in defaults.items() if not any(n in body for n in names.get(f, (f,)))}
    if not missing:
        return req
    try:
        req.params = dataclasses.replace(req.params, **missing)
    except ValueError as e:  # a default the request's own fields contradict (min_tokens > max_tokens ...)
        raise errors.bad_request(f"the model's generation config default conflicts with the request: {e}") from None
    return req


async def completions(request: web.Request) -> web.StreamResponse:
    state, body = request.app[STATE], await read_json(request)
    return await serve_generation(state, request, with_generation_defaults(state, body,
                                                                           protocol.parse_completion(body)))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    state, body = request.app[STATE], await read_json(request)
    return await serve_generation(state, request, with_generation_defaults(state, body, protocol.parse_chat(body)))


def model_cards(state: ServerState) -> list[dict[str, Any]]:
    def card(name: str, engine: EngineClient | None, root: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": int(state.started_at), "owned_by": "jaxserve",
                "root": root, "parent": None, "max_model_len": engine.max_model_len if engine is not None else None}

    if state.router is not None:
        return [card(name, scope.engine, getattr(scope.engine, "model_root", state.config.model))
                for name, scope in state.router.scopes.items()]
    return [card(name, state.engine, state.config.model) for name in state.config.model_names]


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": model_cards(request.app[STATE])})


async def model(request: web.Request) -> web.Response:
    """`client.models.retrieve(id)`."""
    state = request.app[STATE]
    wanted = request.match_info["model"]
    for card in model_cards(state):
        if card["id"] == wanted:
            return web.json_response(card)
    raise errors.model_not_found(wanted, state.model_names)


async def tokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json(request)
    engine = _engine_for(state, body, state.engine or state.require_engine())
    flags = {}
    for name in ("add_special_tokens", "add_generation_prompt"):
        flags[name] = body.get(name, True)
        if not isinstance(flags[name], bool):
            raise errors.bad_request(f"'{name}' must be a boolean", param=name)
    tok = engine.tokenizer
    if "messages" in body:
        chat = protocol.parse_chat({"messages": body["messages"], "tools": body.get("tools")})
        try:
            messages, extra = render_messages(chat.messages, chat.tools and chat.tools.tools, tok.chat_template)
            text = render_chat(tok.chat_template, messages, add_generation_prompt=flags["add_generation_prompt"],
                               bos_token=tok.bos_token, eos_token=tok.eos_token, **extra)
        except ValueError as e:
            raise errors.bad_request(str(e), param="messages") from None
    elif isinstance(body.get("prompt"), str):
        text = body["prompt"]
    else:
        raise errors.bad_request("send 'prompt' (a string) or 'messages'", param="prompt")
    # NOTE: rate-limited like generation (one request, no tokens), and tokenized off the event loop.
    state.limiter.settle(state.limiter.admit(state.rate_key(request, None), 0), 0)
    ids = await asyncio.to_thread(tok.encode, text, add_special_tokens=flags["add_special_tokens"])
    return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": engine.max_model_len})


def _engine_for(state: ServerState, body: Any, default_engine):
    """/tokenize and /detokenize: the body is a JSON object whose `model`, if any, is a served name (400 / 404);
    returns the engine that serves that name (the default one when there is a single model)."""
    if not isinstance(body, dict):
        raise errors.bad_request("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise errors.bad_request("'model' must be a string", param="model")
    if state.router is not None:
        return state.router.scope(model).engine
    if model is not None and model not in state.config.model_names:
        raise errors.model_not_found(model, state.model_names)
    return default_engine


async def tokenizer_info(request: web.Request) -> web.Response:
    """vLLM's /tokenizer_info: what a client needs to tokenize like the server (lm-evaluation-harness's
    `tokenizer_backend=remote` reads it, then sends /tokenize)."""
    state = request.app[STATE]
    engine = state.engine or state.require_engine()
    tok = engine.tokenizer
    return web.json_response({"tokenizer_class": type(tok).__name__, "bos_token": tok.bos_token,
                              "eos_token": tok.eos_token, "pad_token": None, "chat_template": tok.chat_template,
                              "model_max_length": engine.max_model_len})


async def detokenize(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = await read_json(request)
    engine = _engine_for(state, body, state.engine or state.require_engine())
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise errors.bad_request("'tokens' must be an array of token ids", param="tokens")
    vocab = getattr(engine.tokenizer, "vocab_size", None)
    if vocab is not None and any(not 0 <= t < vocab for t in tokens):
        raise errors.bad_request(f"token ids must be in [0, {vocab})", param="tokens")
    return web.json_response({"prompt": engine.tokenizer.decode(tokens)})


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.ready:
        return web.json_response({"status": "ok"})
    status = "draining" if state.draining else "failed" if state.engine_error else "loading"
    return web.json_response({"status": status}, status=503)


async def ready(request: web.Request) -> web.Response:
    """Readiness: warm, not draining and room in the waiting queue (the load balancer's probe)."""
    state = request.app[STATE]
    if not state.ready:
        status = "draining" if state.draining else "failed" if state.engine_error else "loading"
        return web.json_response({"status": status}, status=503)
    if state.num_waiting_seqs >= state.config.max_waiting:
        return web.json_response({"status": "queue_full", "waiting": state.num_waiting_seqs}, status=503)
    return web.json_response({"status": "ready"})


async def live(request: web.Request) -> web.Response:
    """Liveness: fails only when a restart would help: the engine failed to start, its thread is gone, or work is
    pending and no step finished for --liveness-stall-timeout seconds (a hung device or a dead follower)."""
    state = request.app[STATE]
    if state.engine_error is not None:
        return web.json_response({"status": "failed", "reason": state.engine_error}, status=503)
    if state.engine is None:  # still loading: the startup probe's business
        return web.json_response({"status": "loading"})
    engines = state.router.engines() if state.router is not None else [state.engine]
    checks = [engine.health() for engine in engines]  # several models: the worst engine speaks for the server
    health = min(checks, key=lambda h: (h.thread_alive, not h.pending, -h.seconds_since_progress))
    if not health.thread_alive:
        return web.json_response({"status": "dead", "reason": "the engine thread is gone"}, status=503)
    stall = state.config.liveness_stall_timeout
    if health.pending and stall and health.seconds_since_progress > stall:
        return web.json_response({"status": "stalled", "reason": f"work is pending and no engine step finished for "
                                  f"{health.seconds_since_progress:.0f} s (limit {stall:g} s)"}, status=503)
    return web.json_response({"status": "ok", "pending": health.pending,
                              "seconds_since_progress": round(health.seconds_since_progress, 3)})


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": jaxserve.__version__})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = state.router.exposition() if state.router is not None else state.metrics.exposition()
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(openapi_spec(jaxserve.__version__))


async def docs(request: web.Request) -> web.Response:
    return web.Response(text=DOCS_HTML, content_type="text/html")


ROUTES = [
    ("POST", "/v1/completions", completions),
    ("POST", "/v1/chat/completions", chat_completions),
    ("GET", "/v1/models", models),
    ("GET", "/v1/models/{model}", model),
    ("POST", "/tokenize", tokenize),
    ("POST", "/detokenize", detokenize),
    ("GET", "/tokenizer_info", tokenizer_info),
    ("GET", "/health", health),
    ("GET", "/ready", ready),
    ("GET", "/live", live),
    ("GET", "/metrics", metrics),
    ("GET", "/version", version),
    ("GET", "/openapi.json", openapi),
    ("GET", "/docs", docs),
]


def create_app(config: ServingConfig, engine: EngineClient | None = None) -> web.Application:
    """The application. `engine` (already started) may be given now or later through `app[STATE].set_engine`."""
    app = web.Application(middlewares=[connection_middleware, request_id_middleware(config.access_log),
                                       cors_middleware(config.cors), error_middleware],
                          client_max_size=config.max_request_bytes)
    app.on_response_prepare.append(on_response_prepare(config.cors))
    state = ServerState(config)
    app[STATE] = state
    if engine is not None:
        state.set_engine(engine)
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    return app
