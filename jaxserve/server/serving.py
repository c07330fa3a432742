"""Serving one generation request, from parsed body to the last byte (all on the event loop).

  1. Prepare: prompts → token ids (chat: rendered with the model's template), input guardrails (400),
     max_tokens filled up to the context, the engine's own validation (400 naming the field).
  2. Admit: draining or a full waiting queue (503), the caller's rate limit (429).
  3. Run: one engine request per prompt (each with `n` choices), at most `--max-seqs-in-engine-per-request`
     sequences in the engine at once: later prompts go in as earlier ones finish, so a request's fan-out
     queues behind other requests instead of ahead of them. A `DeltaBridge` brings their deltas to
     this coroutine, each choice's `OutputMonitor` decides what may be sent, and the released text is
     streamed as SSE chunks or collected into one JSON response. Chat with tools: a `ToolCallParser` per
     choice splits the released text into content and tool calls (`tools.py`, `text/tool_calls.py`).
  4. Finally, whatever happened (finished, client gone, timeout, error, shutdown): every engine request
     not yet finished is aborted, so its KV pages go back to the pool at the next step; the rate-limit
     reservation is settled with the real token count; metrics are recorded.

A client disconnect reaches us as a `CancelledError` (the runner cancels handlers on disconnect) or as a
failed write; a non-streaming request also checks its transport whenever it wakes up.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from jaxserve.core.outputs import RequestDelta, TokenLogprob
from jaxserve.core.sampling_params import SamplingParamsError
from jaxserve.server import errors, protocol, tools
from jaxserve.server.errors import APIError
from jaxserve.server.guardrails import Finding, OutputMonitor
from jaxserve.server.limits import Reservation
from jaxserve.server.middleware import CLIENT_REQUEST_ID, USAGE
from jaxserve.server.model_router import answered_by_field, answered_by_header, wait_decided
from jaxserve.server.protocol import GenerationRequest
from jaxserve.server.streaming import DeltaBridge, SSEWriter
from jaxserve.text.tool_calls import ToolCallParser

if TYPE_CHECKING:
    from jaxserve.server.app import ServerState

logger = logging.getLogger(__name__)


# Seconds between disconnect checks of a non-streaming request that gets no tokens.
DISCONNECT_CHECK_INTERVAL = 0.5


class ClientGone(Exception):
    pass


@dataclasses.dataclass
class Choice:
    index: int  # OpenAI's choice index: prompt_index * n + the engine's choice index
    monitor: OutputMonitor
    prompt: int = 0  # the prompt's index in the request
    prompt_logprobs: list[TokenLogprob | None] | None = None  # echo with logprobs: from the engine's first delta
    prefix: str = ""  # the echoed prompt (completions with echo)
    text: str = ""  # sent so far, after the prefix
    raw_len: int = 0  # characters received from the engine
    # (raw start, raw end, entry): the characters of the choice's raw text this token produced
    pending_logprobs: list[tuple[int, int, TokenLogprob]] = dataclasses.field(default_factory=list)
    logprobs: list[TokenLogprob] = dataclasses.field(default_factory=list)  # sent
    num_tokens: int = 0
    finish_reason: str | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    queue_time: float | None = None
    parser: ToolCallParser | None = None  # chat with tools, streaming: reads tool calls out of the text
    num_calls_sent: int = 0

    def release_logprobs(self, final: bool) -> list[TokenLogprob]:
        """The entries whose text has been released (NOTE: held-back text must not leak through logprobs)."""
        consumed = self.monitor.consumed
        out, keep = [], []
        for start, end, entry in self.pending_logprobs:
            if end > consumed:
                if not final:
                    keep.append((start, end, entry))
            elif not any(s < end and e > start for s, e in self.monitor.redacted_spans):
                out.append(entry)
        self.pending_logprobs = keep
        self.logprobs += out
        return out


class Generation:
    """One admitted HTTP generation request and its engine requests."""

    def __init__(self, state: ServerState, req: GenerationRequest, request_id: str, http: web.Request):
        self.state = state
        self.req = req
        self.id = request_id
        self.http = http
        self.created = protocol.now()
        self.t0 = time.monotonic()
        self.prompt_ids: list[list[int]] = []
        self.prompt_texts: list[str] = []
        self.params = []
        self.engine_ids: list[str] = []
        self.streams = []
        self.choices: dict[tuple[int, int], Choice] = {}
        self.engine_done: set[str] = set()  # engine requests that sent their last delta (every choice)
        self._open_choices: dict[str, int] = {}
        self.reservation: Reservation | None = None
        self.started = False  # the first token arrived (no longer counts as waiting)
        self.abort_reason: str | None = None
        self.failure: APIError | None = None  # the engine failed a choice: report it once its text is out
        self.cached_tokens = 0
        self._aborted: set[str] = set()
        self._num_submitted = 0  # prompts handed to the engine so far (in prompt order)

    # ------------------------------------------------------------------ 1. prepare

    def prepare(self) -> None:
        engine, req = self.state.engine, self.req
        if req.params.truncate_prompt_tokens is None:  # a prompt to be truncated may be as long as it likes
            _refuse_surely_too_long(req, engine)
        self.prompt_texts, self.prompt_ids = protocol.tokenize_prompts(req, engine.tokenizer)
        # Every message of every role, whole (a system or earlier message can carry an injection too)
        texts = [m["content"] for m in req.messages] if req.kind == "chat" else self.prompt_texts
        finding = self.state.guardrails.check_input("\n".join(texts))
        if finding is not None:
            self.state.metrics.guardrail_hits.labels(finding.stage, "input").inc()
            raise errors.content_policy(f"The request was blocked by the {finding.describe()} guardrail.",
                                        param="messages" if req.kind == "chat" else "prompt")
        self.params = [protocol.params_for_prompt(req.params, ids, engine.max_model_len, engine.validate, req.param)
                       for ids in self.prompt_ids]

    @property
    def num_seqs(self) -> int:
        return len(self.req.prompts or [None]) * self.req.params.n

    @property
    def num_waiting_seqs(self) -> int:
        """Sequences without a first token that have not finished (unsubmitted prompts included)."""
        n = self.req.params.n
        unsubmitted = (len(self.prompt_ids) - self._num_submitted) * n
        return unsubmitted + sum(1 for c in self.choices.values() if c.first_token_time is None and c.finish_reason
                                 is None)

    @property
    def reserved_tokens(self) -> int:
        return sum(len(ids) + p.max_tokens * p.n for ids, p in zip(self.prompt_ids, self.params))

    # ------------------------------------------------------------------ 3. run

    def submit(self) -> list:
        """Hands the engine the next prompts while the request's sequences in it stay within
        `max_seqs_in_engine_per_request` (the first prompt always goes); returns the new streams."""
        engine, n = self.state.engine, self.req.params.n
        if not self.choices:  # every choice exists from the start, so `finished` waits for unsubmitted prompts
            for p in range(len(self.prompt_ids)):
                prefix = self.prompt_texts[p] if self.req.echo else ""
                for i in range(n):
                    self.choices[(p, i)] = Choice(p * n + i, self.state.guardrails.monitor(), p, prefix=prefix)
        window = self.state.config.max_seqs_in_engine_per_request
        new = []
        while self._num_submitted < len(self.prompt_ids) and self.abort_reason is None:
            in_engine = sum(self._open_choices[e] for e in self.engine_ids if e not in self.engine_done)
            if in_engine and in_engine + n > window:
                break
            p = self._num_submitted
            ids, params = self.prompt_ids[p], self.params[p]
            engine_id = self.id if len(self.prompt_ids) == 1 else f"{self.id}-{p}"
            try:
                stream = engine.add_request(ids, params, request_id=engine_id, priority=self.req.priority)
            except SamplingParamsError as e:
                raise errors.bad_request(str(e), param=self.req.param(e.field)) from None
            except ValueError as e:
                raise errors.context_too_long(str(e)) from None
            self._num_submitted += 1
            self.engine_ids.append(engine_id)
            self.streams.append(stream)
            self._open_choices[engine_id] = n
            new.append(stream)
        return new

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.choices.values())

    def abort(self, reason: str) -> None:
        """Aborts every engine request still running (thread-safe on the engine side)."""
        self.abort_reason = self.abort_reason or reason
        for engine_id in self.engine_ids:
            if engine_id not in self.engine_done and engine_id not in self._aborted:
                self._aborted.add(engine_id)
                self.state.engine.abort(engine_id)

    def apply(self, delta: RequestDelta) -> list[tuple[Choice, str, list[TokenLogprob], str | None]]:
        """Feeds one delta through its choice; returns (choice, text, logprobs, finish_reason) updates to send.

        A choice the engine failed or aborted sets `failure`, which the caller raises after sending the updates.
        """
        p = self.engine_ids.index(delta.request_id)
        if delta.finished:
            self._open_choices[delta.request_id] -= 1
            if self._open_choices[delta.request_id] == 0:
                self.engine_done.add(delta.request_id)
            self.cached_tokens += delta.num_cached_tokens if delta.index == 0 else 0
        choice = self.choices[(p, delta.index)]
        if choice.finish_reason is not None:  # stopped by a guardrail; the engine request may run on (n > 1)
            return []
        if delta.prompt_logprobs is not None:
            choice.prompt_logprobs = delta.prompt_logprobs
        metrics = self.state.metrics
        if delta.first_scheduled_time is not None and choice.queue_time is None:
            choice.queue_time = delta.first_scheduled_time - self.t0
        if delta.new_token_ids:
            if choice.first_token_time is None:
                choice.first_token_time = delta.time
                if not self.started:
                    self.started = True
                    metrics.ttft.observe(max(0.0, delta.time - self.t0))
            else:
                metrics.itl.observe(max(0.0, delta.time - choice.last_token_time))
            choice.last_token_time = delta.time
            metrics.generation_tokens.inc(len(delta.new_token_ids))
        choice.num_tokens = max(choice.num_tokens, delta.num_output_tokens)
        start = choice.raw_len
        choice.raw_len += len(delta.new_text)
        for entry in delta.logprobs or ():
            choice.pending_logprobs.append((start, choice.raw_len, entry))

        if delta.finished and delta.finish_reason in ("error", "abort"):
            if delta.finish_reason == "error":
                self.failure = errors.engine_error(delta.error)
            elif self.abort_reason == "shutdown":
                self.failure = errors.unavailable("The server is shutting down; the request was cancelled.",
                                                  "shutting_down")
            else:
                self.failure = errors.internal("The engine aborted the request.")
            # What was generated before the failure is final: scan it and let the client keep it.
            text = choice.monitor.feed(delta.new_text, len(delta.new_token_ids), final=True, cut_off=True)
            logprobs = choice.release_logprobs(final=True)
            return [(choice, text, logprobs, None)] if text or logprobs else []
        # NOTE: only EOS or a stop token ends the text where the model meant to; a stop string is scanned with it
        stop_str = delta.stop_reason if isinstance(delta.stop_reason, str) else ""
        text = choice.monitor.feed(delta.new_text, len(delta.new_token_ids), final=delta.finished,
                                   cut_off=delta.finish_reason != "stop" or bool(stop_str), lookahead=stop_str)
        finish = delta.finish_reason if delta.finished else None
        if choice.monitor.finding is not None:
            finish = "content_filter"
            self._guardrail_hit(choice.monitor.finding)
            if len(self.choices) == 1:
                self.abort("content_filter")
        if finish is not None:
            choice.finish_reason = finish
            self._choice_finished(choice)
        logprobs = choice.release_logprobs(final=finish is not None)
        if text or logprobs or finish:
            return [(choice, text, logprobs, finish)]
        return []

    def _guardrail_hit(self, finding: Finding) -> None:
        self.state.metrics.guardrail_hits.labels(finding.stage, "output").inc()
        logger.info("request %s: output stopped by the %s guardrail", self.id, finding.describe())

    def _choice_finished(self, choice: Choice) -> None:
        m = self.state.metrics
        m.request_success.labels(choice.finish_reason).inc()
        m.gen_len.observe(choice.num_tokens)
        e2e = time.monotonic() - self.t0
        m.e2e.observe(e2e)
        if choice.queue_time is not None:
            m.queue_time.observe(max(0.0, choice.queue_time))
        scheduled = self.t0 + choice.queue_time if choice.queue_time is not None else None
        m.choice_timings(scheduled, choice.first_token_time, choice.last_token_time)
        if choice.first_token_time is not None and choice.num_tokens > 1:
            m.tpot.observe(max(0.0, choice.last_token_time - choice.first_token_time) / (choice.num_tokens - 1))

    # ------------------------------------------------------------------ 4. the end

    def usage(self) -> dict[str, Any]:
        # NOTE: scoring (echo, max_tokens 0) samples one token it does not return, nor count
        completion = 0 if self.req.score_only else sum(c.num_tokens for c in self.choices.values())
        return protocol.usage(sum(len(ids) for ids in self.prompt_ids), completion, self.cached_tokens)

    def used_tokens(self) -> int:
        return sum(len(ids) for ids in self.prompt_ids) + sum(c.num_tokens for c in self.choices.values())

    def logprobs_json(self, choice: Choice, entries: list[TokenLogprob], text_offset: int) -> dict | None:
        if self.req.logprobs is None:
            return None
        tok = self.state.engine.tokenizer

        def token_text(token_id: int) -> str:
            return tok.decode([token_id], skip_special_tokens=False)

        if self.req.kind == "chat":
            return protocol.chat_logprobs(entries, token_text)
        if self.req.params.prompt_logprobs is not None:  # echo: the prompt's logprobs come first
            return protocol.echo_logprobs(self.prompt_ids[choice.prompt], choice.prompt_logprobs,
                                          [] if self.req.score_only else entries, token_text, text_offset)
        return protocol.completion_logprobs(entries, token_text, text_offset)


async def serve_generation(state: ServerState, http: web.Request, req: GenerationRequest) -> web.StreamResponse:
    """Runs one /v1/completions or /v1/chat/completions request; raises APIError before the stream starts."""
    state = state.for_model(req.model)  # the model's engine, metrics and name (several models: model_router.py)
    state.check_priority(http, req.priority)
    gen = Generation(state, req, _generation_id(state, http, req.kind), http)
    limit = min(state.config.max_seqs_per_request, state.config.max_waiting)  # more could never be admitted
    if gen.num_seqs > limit:
        raise errors.bad_request(f"This request asks for {gen.num_seqs} sequences (prompts x n), more than the "
                                 f"server's limit of {limit} per request; split it.", param="n")
    await asyncio.to_thread(gen.prepare)  # NOTE: tokenizing a 1 MB prompt takes ~1 s: not on the event loop
    state.admit(gen)  # 503 / 429; from here on `finally` must give back what admission took
    try:
        gen.submit()
        state.metrics.prompt_tokens.inc(sum(len(ids) for ids in gen.prompt_ids))
        state.metrics.admitted(req.params.n, [p.max_tokens for p in gen.params])
        for ids in gen.prompt_ids:
            state.metrics.prompt_len.observe(len(ids))
        if req.stream:
            await wait_decided(gen.streams, state.config.request_timeout)  # a cascade's answerer goes in the header
            return await _stream(state, gen)
        return await _collect(state, gen)
    except asyncio.CancelledError:
        state.metrics.error("client_disconnect")
        gen.abort("client_disconnect")
        raise
    except (ClientGone, ConnectionResetError):
        state.metrics.error("client_disconnect")
        gen.abort("client_disconnect")
        return web.Response(status=499)  # nobody reads it; aiohttp needs a response object
    finally:
        gen.abort("finished")  # no-op for engine requests that finished
        state.release(gen)
        http[USAGE] = gen.usage()  # for the access log


# Normalisers can shrink text before it is tokenized (whitespace folded, up to 3 code points composed into
# one): only non-space characters count, with this margin.
COMPOSE_MARGIN = 3


def _refuse_surely_too_long(req: GenerationRequest, engine: Any) -> None:
    """400 before tokenizing a prompt that cannot fit the context whatever its tokens: a token covers at most
    `max_token_chars` characters, so C characters are at least C / max_token_chars tokens. Tokenizing a 1 MB
    prompt costs ~1 s of CPU that the check saves."""
    longest = getattr(engine.tokenizer, "max_token_chars", None)
    if not longest:
        return
    texts = [m["content"] for m in req.messages] if req.kind == "chat" else \
        [p for p in req.prompts if isinstance(p, str)]
    for text in texts:
        chars = len(text) - sum(text.count(c) for c in " \n\t\r")
        if chars > engine.max_model_len * longest * COMPOSE_MARGIN:
            raise errors.context_too_long(
                f"This model's maximum context length is {engine.max_model_len} tokens; a prompt of {len(text)} "
                f"characters cannot fit in it (a token covers at most {longest}). Shorten the prompt.")


def _generation_id(state: ServerState, http: web.Request, kind: str) -> str:
    """`cmpl-<X-Request-Id>` when the client sent one (vLLM's rule), else a fresh id. NOTE: the id is also the
    engine's request id, so a client id already in flight gets a suffix rather than colliding."""
    client_id = http.get(CLIENT_REQUEST_ID)
    if not client_id:
        return protocol.new_id(kind)
    gen_id = f"{protocol.new_id(kind).split('-')[0]}-{client_id}"
    if any(g.id == gen_id for g in state.inflight):
        gen_id = f"{gen_id}-{protocol.new_id(kind).split('-')[-1][:8]}"
    return gen_id


def _id_header(gen: Generation) -> dict[str, str]:
    return {"X-Request-Id": gen.http.get(CLIENT_REQUEST_ID) or gen.id, **answered_by_header(gen.streams)}


async def _next(state: ServerState, gen: Generation, bridge: DeltaBridge, last_write: float) -> list[RequestDelta]:
    """The next deltas, or [] when a keep-alive is due. Raises on timeout and (non-streaming) on disconnect."""
    cfg = state.config
    while True:
        # NOTE: a non-streaming request writes nothing until the end, so a write cannot tell it the client left:
        # it looks at the transport on every wake-up, and wakes at least every DISCONNECT_CHECK_INTERVAL.
        if not gen.req.stream and (gen.http.transport is None or gen.http.transport.is_closing()):
            raise ClientGone()
        now = time.monotonic()
        wait = max(0.0, cfg.keepalive_interval - (now - last_write))
        if not gen.req.stream:
            wait = min(wait, DISCONNECT_CHECK_INTERVAL)
        if cfg.request_timeout:
            remaining = gen.t0 + cfg.request_timeout - now
            if remaining <= 0:
                raise errors.timeout(cfg.request_timeout)
            wait = min(wait, remaining)
        deltas = await bridge.next(max(wait, 0.001))
        if deltas:
            return deltas
        if time.monotonic() - last_write >= cfg.keepalive_interval:
            return []


async def _collect(state: ServerState, gen: Generation) -> web.Response:
    bridge = DeltaBridge(gen.streams, asyncio.get_running_loop())
    last_wake = time.monotonic()
    try:
        while not gen.finished:
            for delta in await _next(state, gen, bridge, last_wake):
                for choice, text, _, _ in gen.apply(delta):
                    choice.text += text
                if gen.failure is not None:
                    raise gen.failure
            bridge.add(gen.submit())
            last_wake = time.monotonic()
    except APIError as e:
        gen.abort(e.metric_type)
        raise
    choices = []
    for choice in sorted(gen.choices.values(), key=lambda c: c.index):
        logprobs = gen.logprobs_json(choice, choice.logprobs, len(choice.prefix))
        text, finish = choice.prefix + choice.text, choice.finish_reason
        if gen.req.score_only:  # the one token sampled is not part of the answer: "length" as max_tokens 0 asked
            text, finish = choice.prefix, "length" if finish == "stop" else finish
        if gen.req.kind == "chat":
            content, calls, finish = tools.parse_message(gen.req.tools, text, finish)
            choices.append(protocol.chat_choice(choice.index, content, logprobs, finish, calls))
        else:
            choices.append(protocol.completion_choice(choice.index, text, logprobs, finish))
    body = protocol.response(gen.req.kind, gen.id, gen.created, state.config.served_model_name, choices, gen.usage())
    body.update(answered_by_field(gen.streams))
    return web.json_response(body, headers=_id_header(gen))


async def _stream(state: ServerState, gen: Generation) -> web.StreamResponse:
    kind, model, include_usage = gen.req.kind, state.config.served_model_name, gen.req.include_usage
    sse = SSEWriter(gen.http, _id_header(gen))

    def chunk(choices: list[dict], usage: dict | None = None) -> dict:
        return {**protocol.chunk(kind, gen.id, gen.created, model, choices, usage, include_usage=include_usage),
                **answered_by_field(gen.streams)}

    bridge = DeltaBridge(gen.streams, asyncio.get_running_loop())
    for choice in gen.choices.values():
        choice.parser = gen.req.tools.parser() if gen.req.tools is not None else None
    await sse.start()
    last_write = time.monotonic()
    for choice in sorted(gen.choices.values(), key=lambda c: c.index):  # the opening chunk of every choice
        if kind == "chat":
            await sse.send(chunk([protocol.chat_delta_choice(choice.index, {"role": "assistant", "content": ""},
                                                             None, None)]))
        elif choice.prefix:
            await sse.send(chunk([protocol.completion_choice(choice.index, choice.prefix, None, None)]))
    try:
        while not gen.finished:
            deltas = await _next(state, gen, bridge, last_write)
            if not deltas:
                await sse.keepalive()
                last_write = time.monotonic()
                continue
            for delta in deltas:
                for choice, text, entries, finish in gen.apply(delta):
                    logprobs = gen.logprobs_json(choice, entries, len(choice.prefix) + len(choice.text))
                    choice.text += text
                    if kind == "chat":
                        outs = _chat_deltas(choice, text, logprobs, finish)
                    else:
                        outs = [protocol.completion_choice(choice.index, text, logprobs, finish)]
                    for out in outs:
                        await sse.send(chunk([out]))
                        last_write = time.monotonic()
                if gen.failure is not None:
                    raise gen.failure
            bridge.add(gen.submit())
    except APIError as e:
        # NOTE: the stream has started, so the status is already 200: the error travels as an event, and
        # the client keeps the chunks it already has.
        gen.abort(e.metric_type)
        state.metrics.error(e.metric_type)
        logger.warning("request %s failed mid-stream: %s", gen.id, e.message)
        await sse.error(e)
        await sse.done()
        return sse.response
    if include_usage:
        await sse.send(chunk([], gen.usage()))
    await sse.done()
    return sse.response


def _chat_deltas(choice: Choice, text: str, logprobs: dict | None, finish: str | None) -> list[dict]:
    """The chunk choices for one update of a streamed chat choice: content, then tool-call deltas (OpenAI's
    shape: id, type and name first, then the arguments), then the finish_reason on a chunk of its own."""
    if choice.parser is None:
        body = {"content": text} if text or not finish else {}
        return [protocol.chat_delta_choice(choice.index, body, logprobs, finish)]
    content, calls = choice.parser.feed(text)
    if finish is not None:
        rest, late = choice.parser.finish()
        content, calls = content + rest, calls + late
    out = []
    if content or logprobs:
        out.append(protocol.chat_delta_choice(choice.index, {"content": content} if content else {}, logprobs, None))
    for delta in tools.tool_call_deltas(choice.num_calls_sent, calls):
        out.append(protocol.chat_delta_choice(choice.index, delta, None, None))
    choice.num_calls_sent += len(calls)
    if finish is not None:
        out.append(protocol.chat_delta_choice(choice.index, {}, None,
                                              tools.finish_reason(choice.parser.calls, finish)))
    return out
