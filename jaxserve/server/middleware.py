"""Per-request HTTP plumbing around the handlers: request ids, the access log and CORS.

  * `X-Request-Id`: a client's id (printable, at most 128 characters) is kept for the request: it names the
    completion (`cmpl-<id>`), comes back in the response header and appears in the access log. Without one
    the server makes one up. Every response carries the header.
  * Access log: one INFO line per request on the `jaxserve.access` logger, written when the handler is done:
    method, path (no query string), status, prompt / completion tokens, latency and request id. Never any
    prompt or output text.
  * CORS (`--allowed-origins` and friends, vLLM's flags): preflight `OPTIONS` requests are answered here,
    before authentication, and every response to an allowed origin gets `Access-Control-Allow-Origin`.
    Headers are added in `on_response_prepare`, so streamed (SSE) responses get them too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
import uuid

from aiohttp import web

access_logger = logging.getLogger("jaxserve.access")

CLIENT_REQUEST_ID = web.RequestKey("client_request_id", str)  # the client's X-Request-Id, when valid
REQUEST_ID = web.RequestKey("request_id", str)  # the client's, else one made up
USAGE = web.RequestKey("usage", dict)  # a generation's usage object, for the access log

_VALID_ID = re.compile(r"^[\x21-\x7e]{1,128}$")  # printable ASCII, no spaces


@dataclasses.dataclass(frozen=True)
class CorsConfig:
    """vLLM's CORS flags. No origins: no CORS headers at all (browsers then refuse cross-origin calls)."""

    allowed_origins: tuple[str, ...] = ()
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False

    def allows(self, origin: str) -> bool:
        return "*" in self.allowed_origins or origin in self.allowed_origins


def request_id_middleware(access_log: bool):
    @web.middleware
    async def middleware(request: web.Request, handler):
        client_id = request.headers.get("X-Request-Id", "")
        if client_id and _VALID_ID.match(client_id):
            request[CLIENT_REQUEST_ID] = client_id
        request[REQUEST_ID] = request.get(CLIENT_REQUEST_ID) or uuid.uuid4().hex
        t0 = time.monotonic()
        status = 500
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as e:
            status = e.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away
            raise
        finally:
            if access_log:
                usage = request.get(USAGE) or {}
                access_logger.info('%s %s %d prompt_tokens=%s completion_tokens=%s latency=%.3fs request_id=%s',
                                   request.method, request.path, status, usage.get("prompt_tokens", "-"),
                                   usage.get("completion_tokens", "-"), time.monotonic() - t0, request[REQUEST_ID])
    return middleware


def cors_middleware(cors: CorsConfig):
    @web.middleware
    async def middleware(request: web.Request, handler):
        origin = request.headers.get("Origin")
        if (request.method == "OPTIONS" and origin and cors.allowed_origins
                and "Access-Control-Request-Method" in request.headers):
            if not cors.allows(origin):
                return web.Response(status=400, text="Disallowed CORS origin")
            wanted = request.headers.get("Access-Control-Request-Headers", "")
            headers = {
                "Access-Control-Allow-Methods": ", ".join(cors.allowed_methods) if "*" not in cors.allowed_methods
                else "DELETE, GET, HEAD, OPTIONS, PATCH, POST, PUT",
                "Access-Control-Allow-Headers": wanted if "*" in cors.allowed_headers and wanted
                else ", ".join(cors.allowed_headers),
                "Access-Control-Max-Age": "600",
            }
            return web.Response(status=200, text="OK", headers=headers)
        return await handler(request)
    return middleware


def on_response_prepare(cors: CorsConfig):
    """Adds X-Request-Id and the CORS response headers just before the headers go out (streams included)."""
    async def prepare(request: web.Request, response: web.StreamResponse) -> None:
        if "X-Request-Id" not in response.headers and REQUEST_ID in request:
            response.headers["X-Request-Id"] = request[REQUEST_ID]
        origin = request.headers.get("Origin")
        if origin and cors.allowed_origins and cors.allows(origin):
            wildcard = "*" in cors.allowed_origins and not cors.allow_credentials
            response.headers["Access-Control-Allow-Origin"] = "*" if wildcard else origin
            if not wildcard:
                response.headers.add("Vary", "Origin")
            if cors.allow_credentials:
                response.headers["Access-Control-Allow-Credentials"] = "true"
            response.headers["Access-Control-Expose-Headers"] = "X-Request-Id"
    return prepare
