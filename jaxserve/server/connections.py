"""Connection-level limits that aiohttp lacks: a header read timeout, a connection cap, quiet accept errors.

aiohttp reads a request's headers for as long as the client takes to send them (its keep-alive timeout,
an hour by default, is the only clock), and it accepts connections until the process runs out of file
descriptors. A client that opens connections and trickles header bytes (slowloris) needs no API key, since
keys are checked after the headers. So:

  * `GuardedHandler` (one per connection, aiohttp's `RequestHandler` with three hooks) closes a connection
    whose request has not reached a handler within `header_timeout` seconds of the connection opening (or of
    the previous response: then `header_timeout + keepalive_timeout`), and refuses (closes at once) a
    connection beyond `max_connections`.
  * The body has its own clock: `app.read_json` reads it within `body_timeout` seconds (408 otherwise).
  * `QuietExceptionHandler` rate-limits the event loop's error log (accept errors under fd exhaustion once
    wrote 82 MB in 40 s): at most `burst` records per kind per `period` seconds, then one line saying how
    many it dropped.

All of it runs on the event loop thread; nothing here is shared with other threads.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

logger = logging.getLogger(__name__)


class ConnectionGuard:
    def __init__(self, *, header_timeout: float, keepalive_timeout: float, max_connections: int):
        self.header_timeout = header_timeout
        self.keepalive_timeout = keepalive_timeout
        self.max_connections = max_connections
        self.open = 0
        self.refused = 0  # connections over the cap, closed at once
        self.timed_out = 0  # connections closed for slow headers

    def gauges(self) -> dict[str, float]:
        """For /metrics: open connections, and those refused over the cap or closed for slow headers so far."""
        return {"server_connections_open": self.open, "server_connections_refused": self.refused,
                "server_connections_timed_out": self.timed_out}

    def install(self, runner: web.AppRunner) -> None:
        """Makes `runner`'s server build `GuardedHandler`s (call after `runner.setup()`, before the site starts)."""
        server = runner.server
        guard = self

        class _Server(type(server)):
            def __call__(self) -> RequestHandler:
                return GuardedHandler(self, guard, loop=self._loop, **self._kwargs)

        server.__class__ = _Server  # NOTE: aiohttp builds one RequestHandler per connection in Server.__call__


class GuardedHandler(RequestHandler):
    def __init__(self, manager: Any, guard: ConnectionGuard, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._deadline: asyncio.TimerHandle | None = None
        self._counted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if guard.open >= guard.max_connections:
            guard.refused += 1
            transport.abort()  # NOTE: before aiohttp sees it: no handler, no task, the descriptor freed now
            return
        super().connection_made(transport)
        guard.open += 1
        self._counted = True
        self._arm(guard.header_timeout)

    def connection_lost(self, exc: BaseException | None) -> None:
        if not self._counted:
            return
        self._counted = False
        self._guard.open -= 1
        self._disarm()
        super().connection_lost(exc)

    def request_started(self) -> None:
        self._disarm()

    def request_finished(self) -> None:
        self._arm(self._guard.header_timeout + self._guard.keepalive_timeout)

    def _arm(self, seconds: float) -> None:
        self._disarm()
        if seconds > 0 and self.transport is not None:
            self._deadline = asyncio.get_running_loop().call_later(seconds, self._too_slow)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _too_slow(self) -> None:
        self._deadline = None
        if self.transport is not None:
            self._guard.timed_out += 1
            self.transport.abort()


@web.middleware
async def connection_middleware(request: web.Request, handler):
    """Tells the connection's guard (when there is one) that a request reached a handler, and when it is done."""
    protocol = request.protocol
    started = getattr(protocol, "request_started", None)
    if started is not None:
        started()
    try:
        return await handler(request)
    finally:
        if started is not None:
            protocol.request_finished()


class QuietExceptionHandler:
    """An event-loop exception handler that logs each kind of error at most `burst` times per `period`."""

    def __init__(self, burst: int = 5, period: float = 10.0):
        self.burst, self.period = burst, period
        self._windows: dict[str, list] = {}  # kind -> [window start, logged, dropped]

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        kind = type(exc).__name__ if exc is not None else str(context.get("message", ""))[:80]
        now = time.monotonic()
        window = self._windows.setdefault(kind, [now, 0, 0])
        if now - window[0] >= self.period:
            if window[2]:
                logger.error("%d more event-loop errors of kind %s were not logged", window[2], kind)
            window[:] = [now, 0, 0]
        if window[1] >= self.burst:
            window[2] += 1
            return
        window[1] += 1
        loop.default_exception_handler(context)


def raise_fd_limit() -> int:
    """Raises the soft open-files limit to the hard one (connections need descriptors); returns the new limit."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY else soft, hard))
        return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ValueError, OSError):
        return -1
