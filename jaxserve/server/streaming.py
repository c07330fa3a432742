"""From engine thread to HTTP client: the delta bridge and the SSE writer.

`DeltaBridge` carries the deltas of one HTTP request's engine streams onto the event loop. NOTE: the
engine's `on_delta` callback is used only as a doorbell (`Doorbells.ring(event)`); the deltas themselves are
read from each `RequestStream`'s own thread-safe queue. That way a delta the engine emits before we attach the
callback is not lost, and order is the engine's order. The doorbells of one loop share one wake-up: an engine
step that rings 64 streams writes to the loop's self-pipe once, not 64 times (16 us a write here: 1 ms of the
engine thread's time per step; docs/performance.md, "Host overhead").

`SSEWriter` writes OpenAI's server-sent events: `data: {json}` per chunk, a `: keep-alive` comment line
when nothing else was written for a while (so proxies keep long streams open), an in-stream error event
(`data: {"error": {...}}`, which the openai client raises as an APIError) for failures after the stream
has started, and the final `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import weakref
from typing import Any, Sequence

from aiohttp import web

from jaxserve.core.outputs import RequestDelta
from jaxserve.server.errors import APIError


class Doorbells:
    """Sets asyncio events of one loop from other threads, with one loop wake-up per burst of rings."""

    _of_loop: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._lock = threading.Lock()
        self._pending: list[asyncio.Event] = []

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> Doorbells:
        bells = cls._of_loop.get(loop)
        if bells is None:
            bells = cls._of_loop[loop] = cls(loop)
        return bells

    def ring(self, event: asyncio.Event) -> None:  # any thread
        with self._lock:
            self._pending.append(event)
            if len(self._pending) > 1:
                return  # a flush is already scheduled and will see this one
        try:
            self._loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the loop is closed: the server is gone, nobody is listening
            pass

    def _flush(self) -> None:  # the loop's thread
        with self._lock:
            pending, self._pending = self._pending, []
        for event in pending:
            event.set()


class DeltaBridge:
    def __init__(self, streams: Sequence[Any], loop: asyncio.AbstractEventLoop):
        self.streams = list(streams)
        self._loop = loop
        self._bells = Doorbells.of(loop)
        self._event = asyncio.Event()
        for stream in self.streams:
            stream.on_delta = self._ring
        self._event.set()  # deltas may have arrived before on_delta was set

    def add(self, streams: Sequence[Any]) -> None:
        """Listens to more streams (a request's later prompts, submitted as earlier ones finish)."""
        for stream in streams:
            self.streams.append(stream)
            stream.on_delta = self._ring
        if streams:
            self._event.set()

    def _ring(self, delta: RequestDelta) -> None:  # engine thread
        self._bells.ring(self._event)

    def _drain(self) -> list[RequestDelta]:
        out = []
        for stream in self.streams:
            while True:
                try:
                    out.append(stream.get(timeout=0))
                except queue.Empty:
                    break
        return out

    async def next(self, timeout: float) -> list[RequestDelta]:
        """The deltas available now, waiting up to `timeout` seconds for some; [] when none came."""
        self._event.clear()
        deltas = self._drain()
        if deltas:
            return deltas
        # NOTE: not asyncio.wait_for: on Python 3.11 a cancellation (the client left) that arrives as the event
        # fires is lost there. A timer that rings the same event leaves cancellation alone. The engine puts a
        # delta on its stream before it rings, so clearing before the drain below loses no delta.
        timer = self._loop.call_later(timeout, self._event.set)
        try:
            await self._event.wait()
        finally:
            timer.cancel()
        self._event.clear()
        return self._drain()  # [] when the timer rang


class SSEWriter:
    HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "Connection": "keep-alive",
               "X-Accel-Buffering": "no"}  # nginx: do not buffer the stream

    def __init__(self, request: web.Request, extra_headers: dict[str, str] | None = None):
        self.request = request
        self.response = web.StreamResponse(status=200, headers={**self.HEADERS, **(extra_headers or {})})
        self.started = False
        self.closed = False

    async def start(self) -> None:
        await self.response.prepare(self.request)
        self.started = True

    async def send(self, obj: dict[str, Any]) -> None:
        await self._write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")

    async def keepalive(self) -> None:
        await self._write(b": keep-alive\n\n")

    async def error(self, err: APIError) -> None:
        await self.send(err.to_dict())

    async def done(self) -> None:
        if self.closed:
            return
        await self._write(b"data: [DONE]\n\n")
        await self.response.write_eof()
        self.closed = True

    async def _write(self, data: bytes) -> None:
        if not self.started:
            await self.start()
        await self.response.write(data)
