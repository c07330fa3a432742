"""The OpenAPI 3.1 description of the server's routes, served at `/openapi.json`.

Written by hand, next to the parser it describes (`protocol.py`); a test checks that every route of the
app appears here and every path here is a route.
"""

from __future__ import annotations

from typing import Any


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


_NUM = {"type": "number"}
_INT = {"type": "integer"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}

_SAMPLING = {
    "model": _STR, "n": {**_INT, "minimum": 1, "maximum": 16, "default": 1},
    "temperature": {**_NUM, "minimum": 0, "maximum": 2, "default": 1},
    "top_p": {**_NUM, "exclusiveMinimum": 0, "maximum": 1, "default": 1},
    "top_k": {**_INT, "description": "0 or -1: off (extra field)"},
    "min_p": {**_NUM, "minimum": 0, "maximum": 1, "description": "extra field"},
    "repetition_penalty": {**_NUM, "exclusiveMinimum": 0, "description": "extra field"},
    "presence_penalty": {**_NUM, "minimum": -2, "maximum": 2},
    "frequency_penalty": {**_NUM, "minimum": -2, "maximum": 2},
    "logit_bias": {"type": "object", "maxProperties": 300,
                   "additionalProperties": {**_NUM, "minimum": -100, "maximum": 100}},
    "seed": _INT,
    "stop": {"oneOf": [{**_STR, "minLength": 1, "maxLength": 256},
                       {"type": "array", "maxItems": 32, "items": {**_STR, "minLength": 1, "maxLength": 256}}]},
    "stop_token_ids": {"type": "array", "maxItems": 128, "items": _INT, "description": "extra field"},
    "ignore_eos": {**_BOOL, "description": "extra field"},
    "min_tokens": {**_INT, "minimum": 0, "description": "extra field"},
    "max_tokens": {**_INT, "minimum": 1},
    "user": {**_STR, "description": "accepted and ignored (never a rate-limit key: the client picks it)"},
    "stream": _BOOL,
    "stream_options": {"type": "object", "properties": {"include_usage": _BOOL},
                       "description": "only with `stream: true` (else 400)"},
    "priority": {**_INT, "description": "lower runs first (extra field); other than 0 only where the operator "
                                        "allows it (--allow-priority, --priority-key), else 400"},
}

_USAGE = {"type": "object", "properties": {
    "prompt_tokens": _INT, "completion_tokens": _INT, "total_tokens": _INT,
    "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": _INT}}}}
_FINISH = {"type": ["string", "null"], "enum": ["stop", "length", "content_filter", None]}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "object", "properties": {
        "message": _STR, "type": _STR, "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}},
    "CompletionRequest": {"type": "object", "required": ["prompt"], "properties": {
        **_SAMPLING,
        "prompt": {"oneOf": [_STR, {"type": "array", "items": _STR}, {"type": "array", "items": _INT},
                             {"type": "array", "items": {"type": "array", "items": _INT}}]},
        "logprobs": {**_INT, "minimum": 0, "maximum": 20}, "echo": _BOOL}},
    "ChatCompletionRequest": {"type": "object", "required": ["messages"], "properties": {
        **_SAMPLING,
        "messages": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["role"], "properties": {
            "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
            "content": {"oneOf": [_STR, {"type": "null"}, {"type": "array", "items": {"type": "object", "properties": {
                "type": {"const": "text"}, "text": _STR}}}]}}}},
        "max_completion_tokens": {**_INT, "minimum": 1},
        "logprobs": _BOOL, "top_logprobs": {**_INT, "minimum": 0, "maximum": 20}}},
    "Completion": {"type": "object", "properties": {
        "id": _STR, "object": {"const": "text_completion"}, "created": _INT, "model": _STR, "usage": _USAGE,
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "index": _INT, "text": _STR, "logprobs": {"type": ["object", "null"]}, "finish_reason": _FINISH}}}}},
    "ChatCompletion": {"type": "object", "properties": {
        "id": _STR, "object": {"const": "chat.completion"}, "created": _INT, "model": _STR, "usage": _USAGE,
        "choices": {"type": "array", "items": {"type": "object", "properties": {
            "index": _INT, "finish_reason": _FINISH, "logprobs": {"type": ["object", "null"]},
            "message": {"type": "object", "properties": {"role": {"const": "assistant"}, "content": _STR}}}}}}},
    "Model": {"type": "object", "properties": {"id": _STR, "object": {"const": "model"}, "created": _INT,
                                               "owned_by": _STR, "root": _STR, "max_model_len": _INT}},
    "ModelList": {"type": "object", "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": {
        "$ref": "#/components/schemas/Model"}}}},
    "TokenizeRequest": {"type": "object", "properties": {
        "model": _STR, "prompt": _STR, "messages": {"type": "array"}, "add_special_tokens": _BOOL,
        "add_generation_prompt": _BOOL}},
    "TokenizeResponse": {"type": "object", "properties": {
        "tokens": {"type": "array", "items": _INT}, "count": _INT, "max_model_len": _INT}},
    "DetokenizeRequest": {"type": "object", "required": ["tokens"], "properties": {
        "model": _STR, "tokens": {"type": "array", "items": _INT}}},
    "DetokenizeResponse": {"type": "object", "properties": {"prompt": _STR}},
}

_ERRORS = {str(code): {"description": text, **_json(_ref("Error"))} for code, text in (
    (400, "Malformed JSON, a bad field (named in `param`), prompt + max_tokens over the context, or a guardrail "
          "block (`code: content_policy_violation`)"),
    (401, "Missing or wrong API key"), (404, "Unknown model"), (413, "Request body over the size limit"),
    (429, "Rate limited; see the Retry-After header"), (503, "Loading, queue full or shutting down"),
    (504, "Request timeout"))}

_STREAM = {"text/event-stream": {"schema": {"type": "string", "description":
           "`data: {chunk}` events, `: keep-alive` comments, an error event on a failure after the start, "
           "then `data: [DONE]`"}}}


def _generation(summary: str, request: str, response: str) -> dict[str, Any]:
    return {"post": {"summary": summary, "requestBody": {"required": True, **_json(_ref(request))},
                     "security": [{"bearer": []}, {}],
                     "responses": {"200": {"description": "The completion, or an SSE stream when `stream` is true",
                                           "content": {**_json(_ref(response))["content"], **_STREAM}},
                                   **_ERRORS}}}


def _get(summary: str, schema: dict, content_type: str = "application/json", extra: dict | None = None) -> dict:
    return {"get": {"summary": summary, "responses": {
        "200": {"description": "OK", "content": {content_type: {"schema": schema}}}, **(extra or {})}}}


def openapi_spec(version: str) -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {"title": "jaxserve", "version": version,
                 "description": "OpenAI-compatible LLM inference server on JAX/XLA."},
        "components": {"schemas": SCHEMAS, "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/v1/completions": _generation("Text completion", "CompletionRequest", "Completion"),
            "/v1/chat/completions": _generation("Chat completion", "ChatCompletionRequest", "ChatCompletion"),
            "/v1/models": _get("The served model", _ref("ModelList")),
            "/v1/models/{model}": {"get": {
                "summary": "One model's card (the served name or an alias)",
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": _STR}],
                "responses": {"200": {"description": "OK", **_json(_ref("Model"))}, **_ERRORS}}},
            "/tokenize": {"post": {"summary": "Token ids of a prompt or of rendered chat messages",
                                   "requestBody": {"required": True, **_json(_ref("TokenizeRequest"))},
                                   "responses": {"200": {"description": "OK", **_json(_ref("TokenizeResponse"))},
                                                 **_ERRORS}}},
            "/detokenize": {"post": {"summary": "Text of token ids",
                                     "requestBody": {"required": True, **_json(_ref("DetokenizeRequest"))},
                                     "responses": {"200": {"description": "OK", **_json(_ref("DetokenizeResponse"))},
                                                   **_ERRORS}}},
            "/tokenizer_info": _get("The tokenizer's special tokens, chat template and context length (vLLM's)",
                                    {"type": "object"}),
            "/health": _get("200 once the engine is warm, 503 while loading or draining",
                            {"type": "object", "properties": {"status": {"enum": ["ok", "loading", "draining",
                                                                                   "failed"]}}},
                            extra={"503": {"description": "Not ready"}}),
            "/ready": _get("Readiness: 200 when warm, not draining and the waiting queue has room",
                           {"type": "object", "properties": {"status": _STR}},
                           extra={"503": {"description": "Loading, draining, failed or queue full"}}),
            "/live": _get("Liveness: 503 when the engine failed, its thread is gone, or work is pending and no step "
                          "finished for --liveness-stall-timeout seconds", {"type": "object", "properties": {
                              "status": _STR}}, extra={"503": {"description": "Restart me"}}),
            "/metrics": _get("Prometheus metrics (`jaxserve:`, or `vllm:` with --metrics-prefix vllm)", _STR,
                             "text/plain"),
            "/version": _get("Server version", {"type": "object", "properties": {"version": _STR}}),
            "/openapi.json": _get("This document", {"type": "object"}),
            "/docs": _get("This document as a page (self-contained: no CDN)", _STR, "text/html"),
        },
    }
