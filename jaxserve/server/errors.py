"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` with the right HTTP status.

Every failure the server reports goes through `APIError`, so one handler turns it into a JSON response
(or, once a stream has started, into an SSE error event) and one counter records it by `metric_type`.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from aiohttp import web


class APIError(Exception):
    """An error to report to the client.

    Args:
      status: the HTTP status.
      message: human-readable, names the offending field and numbers where there are any.
      type: OpenAI's error type ("invalid_request_error", "authentication_error", ...).
      param: the request field at fault, or None.
      code: a stable machine-readable code, or None.
      metric_type: the label of `jaxserve:request_errors_total` this error counts under.
      headers: extra response headers (Retry-After).
    """

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, metric_type: str = "bad_request", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.metric_type = metric_type
        self.headers = headers or {}

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def to_response(self) -> web.Response:
        response = web.Response(status=self.status, text=json.dumps(self.to_dict()), content_type="application/json",
                                headers=self.headers)
        if self.headers.get("Connection") == "close":
            response.force_close()  # NOTE: the header alone does not end aiohttp's keep-alive
        return response


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def context_too_long(message: str) -> APIError:
    return APIError(400, message, param="max_tokens", code="context_length_exceeded")


def content_policy(message: str, param: str = "messages") -> APIError:
    return APIError(400, message, param=param, code="content_policy_violation", metric_type="content_policy")


def unauthorized() -> APIError:
    return APIError(401, "Missing or invalid API key; send 'Authorization: Bearer <key>'.",
                    type="authentication_error", code="invalid_api_key", metric_type="unauthorized",
                    headers={"WWW-Authenticate": 'Bearer realm="jaxserve"'})


def model_not_found(model: str, served: str | Sequence[str]) -> APIError:
    names = ", ".join(f"'{n}'" for n in ([served] if isinstance(served, str) else served))
    return APIError(404, f"The model '{model}' does not exist; this server serves {names}.", param="model",
                    code="model_not_found", metric_type="not_found")


def route_not_found(path: str) -> APIError:
    return APIError(404, f"No route {path}.", code="not_found", metric_type="not_found")


def body_too_large(size: int | None, limit: int) -> APIError:
    got = f"{size} bytes" if size is not None else "a larger body"
    return APIError(413, f"Request body too large: {got}, the limit is {limit} bytes.", code="request_too_large",
                    metric_type="too_large")


def rate_limited(message: str, retry_after: float) -> APIError:
    seconds = max(1, int(retry_after + 0.999))
    return APIError(429, message, type="rate_limit_error", code="rate_limit_exceeded", metric_type="rate_limited",
                    headers={"Retry-After": str(seconds)})


def unavailable(message: str, code: str) -> APIError:
    return APIError(503, message, type="service_unavailable", code=code, metric_type="unavailable",
                    headers={"Retry-After": "5"})


def timeout(seconds: float) -> APIError:
    return APIError(504, f"The request did not finish within the server's request timeout of {seconds:g} s.",
                    type="timeout_error", code="request_timeout", metric_type="timeout")


def body_timeout(seconds: float) -> APIError:
    return APIError(408, f"The request body did not arrive within {seconds:g} s.", code="request_timeout",
                    metric_type="timeout", headers={"Connection": "close"})


def engine_error(message: str | None) -> APIError:
    """A request the engine failed: it can never fit the KV cache (oom) or a step raised (internal)."""
    message = message or "the engine failed the request"
    oom = "KV pages" in message or "no room" in message
    return APIError(500 if not oom else 400, message, type="server_error" if not oom else "invalid_request_error",
                    code="kv_cache_exhausted" if oom else "engine_error", metric_type="oom" if oom else "internal")


def internal(message: str = "Internal server error.") -> APIError:
    return APIError(500, message, type="server_error", code="internal_error", metric_type="internal")
