"""Which request fields each generation endpoint accepts; any other field is a 400 naming it (no JAX).

NOTE: nothing is silently ignored. A client that asks for something we do not do (audio, reasoning
effort, web search, stored completions...) learns it from the 400 instead of getting an answer that
quietly lacks it. OpenAI fields that change nothing at the values we accept are checked for those
values (`store: false`, `modalities: ["text"]`, `service_tier: "auto"`); identifiers that only label the
request (`user`, `safety_identifier`, `prompt_cache_key`) are type-checked. The parsers read the rest.
"""

from __future__ import annotations

from typing import Any

from jaxserve.server import structured, tools
from jaxserve.server.errors import bad_request

# Read by protocol._common / _sampling_params (both endpoints).
COMMON = ("model", "stream", "stream_options", "user", "priority", "n", "best_of", "temperature", "top_p", "top_k",
          "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias", "seed", "stop",
          "stop_token_ids", "ignore_eos", "min_tokens", "max_tokens", "allowed_token_ids",
          "skip_special_tokens", "include_stop_str_in_output", "bad_words", "truncate_prompt_tokens",  # vLLM's
          *structured.FIELDS)
COMPLETION = (*COMMON, "prompt", "suffix", "logprobs", "echo")
CHAT = (*COMMON, "messages", "max_completion_tokens", "logprobs", "top_logprobs", *tools.FIELDS,
        "store", "metadata", "modalities", "service_tier", "safety_identifier", "prompt_cache_key")

_HINTS = {
    "functions": "deprecated by OpenAI and not served; use 'tools'",
    "function_call": "deprecated by OpenAI and not served; use 'tool_choice'",
}


def check_fields(body: dict, kind: str) -> None:
    """400 for the first field `kind` ("chat" | "completion") does not accept, or a no-op field at a value
    that would ask for something."""
    known = CHAT if kind == "chat" else COMPLETION
    for name in body:
        if name not in known:
            hint = _HINTS.get(name, "it is not supported by this server")
            raise bad_request(f"Unrecognized request field '{name}': {hint}.", param=name)
    if kind != "chat":
        return
    _only(body, "store", (False,), "stored completions are not supported")
    _only(body, "modalities", (["text"],), "only text output is served")
    _only(body, "service_tier", ("auto", "default"), "there is one service tier")
    metadata = body.get("metadata")
    if metadata not in (None, {}):
        raise bad_request("'metadata' is only kept for stored completions, which are not supported",
                          param="metadata")
    for name in ("safety_identifier", "prompt_cache_key"):
        if body.get(name) is not None and not isinstance(body[name], str):
            raise bad_request(f"'{name}' must be a string", param=name)


def _only(body: dict, name: str, allowed: tuple[Any, ...], why: str) -> None:
    value = body.get(name)
    if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
        raise bad_request(f"'{name}' may only be {' or '.join(repr(a) for a in allowed)} here: {why}", param=name)
