"""OpenAI request parsing and validation (→ SamplingParams) and the response / chunk builders.

Requests arrive as parsed JSON objects. Every field we know is type-checked and range-checked here or by
`SamplingParams`, and a bad one raises a 400 `APIError` whose `param` names it. A field the endpoint does
not serve is a 400 naming it too (`request_fields`), never silently ignored; the vLLM extras we implement
are accepted. Output constraints are read by `structured`, tool fields by `tools`.

The builders return plain dicts in exactly OpenAI's shapes; `json.dumps` is the caller's business.
No JAX, no engine (the two prompt helpers take the tokenizer and the engine's `validate`): this module
is tested on its own.
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from typing import Any, Callable, Sequence

from jaxserve.core.outputs import TokenLogprob
from jaxserve.core.sampling_params import SamplingParams, SamplingParamsError
from jaxserve.server.errors import bad_request, context_too_long
from jaxserve.server.request_fields import check_fields
from jaxserve.server.structured import parse_structured_outputs
from jaxserve.server.tools import ToolRequest, check_message_tool_fields, parse_tools, with_tools
from jaxserve.text.chat_template import render_chat
from jaxserve.text.tool_calls import render_messages

MAX_N = 16  # choices per prompt; more is almost always a client bug, and each one holds KV pages
MAX_PROMPTS = 64  # prompts in one /v1/completions batch
MAX_JSON_DEPTH = 64  # nesting of a request body (OpenAI bodies need about 6)
MAX_STOP = 32  # stop strings per request (OpenAI allows 4); each is matched against every new piece of text
MAX_STOP_LENGTH = 256  # characters per stop string
CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MESSAGE_FIELDS = ("role", "content", "name", "tool_calls", "tool_call_id")  # `name` goes to the template
# What a client echoes back from an assistant message it received: accepted while null (they carry nothing).
MESSAGE_ECHO_FIELDS = ("refusal", "audio", "function_call", "annotations", "reasoning_content")

Prompt = str | list[int]


@dataclasses.dataclass
class GenerationRequest:
    """What both endpoints hand the serving layer: prompts (text or ids), one SamplingParams, stream options.

    `params.max_tokens` None means "up to the context": the serving layer fills it in per prompt once the
    prompt's length is known, so that rate limits reserve the real worst case.
    """

    kind: str  # "completion" | "chat"
    model: str | None
    prompts: list[Prompt]  # one per prompt; chat: filled in after rendering the messages
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    user: str | None = None
    echo: bool = False  # completions only
    # completions with echo and max_tokens 0: score the prompt without generating (the engine samples one token,
    # which is not returned)
    score_only: bool = False
    logprobs: int | None = None  # completions: top-n per token; chat: top_logprobs when logprobs is true
    # chat only, normalised to {"role", "content": str} (+ "tool_calls" on assistant, "tool_call_id" on tool turns)
    messages: list[dict[str, Any]] | None = None
    priority: int = 0
    tools: ToolRequest | None = None  # chat with tools the model may call (not tool_choice "none")
    constraint_field: str | None = None  # the request field params.structured_outputs came from

    def param(self, field: str) -> str:
        """The request field to name for an error in SamplingParams' `field`."""
        return self.constraint_field if field == "structured_outputs" and self.constraint_field else field


# ---------------------------------------------------------------------------- field readers

_MISSING = object()


def _typename(types: tuple[type, ...]) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "a boolean", list: "an array",
             dict: "an object"}
    return " or ".join(names.get(t, t.__name__) for t in types)


def _field(body: dict, name: str, types: tuple[type, ...], default: Any = None, *, nullable: bool = True) -> Any:
    """body[name] checked against `types`; JSON numbers: an int is a valid float, a bool is never a number."""
    value = body.get(name, _MISSING)
    if value is _MISSING or (value is None and nullable):
        return default
    ok = isinstance(value, types) and not (isinstance(value, bool) and bool not in types)
    if not ok and float in types and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        raise bad_request(f"'{name}' must be {_typename(types)}, got {json_type(value)}", param=name)
    return float(value) if float in types and int not in types and isinstance(value, int) else value


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(value), type(value).__name__)


def check_json(body: Any) -> None:
    """Refuses (400) a parsed body nested deeper than MAX_JSON_DEPTH or holding a lone surrogate (`"\\ud800"`
    parses to a str that no tokenizer or encoder accepts). Iterative: a deep body cannot exhaust the stack."""
    stack = [(body, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise bad_request("The body holds a string that is not valid Unicode (a lone surrogate "
                                      "escape such as \\ud800).") from None
            continue
        if isinstance(value, (dict, list)):
            if depth > MAX_JSON_DEPTH:
                raise bad_request(f"The body is nested more than {MAX_JSON_DEPTH} levels deep.")
            items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
            for key, item in items:
                if key is not None:
                    stack.append((key, depth))
                stack.append((item, depth + 1))


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise bad_request("'stop' must be a non-empty string or an array of non-empty strings", param="stop")
    if len(stop) > MAX_STOP or any(len(s) > MAX_STOP_LENGTH for s in stop):
        raise bad_request(f"'stop' may hold at most {MAX_STOP} strings of at most {MAX_STOP_LENGTH} characters",
                          param="stop")
    return tuple(stop)


def _logit_bias(body: dict) -> dict[int, float] | None:
    bias = _field(body, "logit_bias", (dict,))
    if not bias:
        return None
    if len(bias) > SamplingParams.MAX_LOGIT_BIAS:
        raise bad_request(f"'logit_bias' may hold at most {SamplingParams.MAX_LOGIT_BIAS} entries, got {len(bias)}",
                          param="logit_bias")
    out = {}
    for key, value in bias.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise bad_request(f"'logit_bias' keys must be token ids, got {key!r}", param="logit_bias") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad_request(f"'logit_bias' values must be numbers, got {json_type(value)}", param="logit_bias")
        out[token] = float(value)
    return out


def _int_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _sampling_params(body: dict, max_tokens: int | None, logprobs: int | None,
                     tool_request: ToolRequest | None = None) -> tuple[SamplingParams, str | None]:
    """The body's SamplingParams, and the request field its output constraint came from (errors name it)."""
    n = _field(body, "n", (int,), 1)
    if not 1 <= n <= MAX_N:
        raise bad_request(f"'n' must be in [1, {MAX_N}], got {n}", param="n")
    best_of = _field(body, "best_of", (int,))
    if best_of is not None and best_of != n:
        raise bad_request("'best_of' other than n is not supported", param="best_of")
    stop_token_ids = body.get("stop_token_ids") or []
    if not _int_list(stop_token_ids):
        raise bad_request("'stop_token_ids' must be an array of token ids", param="stop_token_ids")
    allowed = body.get("allowed_token_ids")
    if allowed is not None and (not _int_list(allowed) or not allowed):
        raise bad_request("'allowed_token_ids' must be a non-empty array of token ids", param="allowed_token_ids")
    constraint, constraint_field = with_tools(*parse_structured_outputs(body), tool_request)
    stop = _stop(body)
    if tool_request is not None:
        stop += tuple(s for s in tool_request.stop() if s not in stop)
    temperature = _field(body, "temperature", (float,), 1.0)
    if temperature > 2.0:  # OpenAI's range; beyond it sampling is noise
        raise bad_request(f"'temperature' must be in [0, 2], got {temperature}", param="temperature")
    try:
        return SamplingParams(
            n=n, temperature=temperature, top_p=_field(body, "top_p", (float,), 1.0),
            top_k=_field(body, "top_k", (int,), 0), min_p=_field(body, "min_p", (float,), 0.0),
            repetition_penalty=_field(body, "repetition_penalty", (float,), 1.0),
            presence_penalty=_field(body, "presence_penalty", (float,), 0.0),
            frequency_penalty=_field(body, "frequency_penalty", (float,), 0.0),
            logit_bias=_logit_bias(body), seed=_field(body, "seed", (int,)), stop=stop,
            stop_token_ids=tuple(stop_token_ids), ignore_eos=_field(body, "ignore_eos", (bool,), False),
            max_tokens=max_tokens, min_tokens=_field(body, "min_tokens", (int,), 0), logprobs=logprobs,
            structured_outputs=constraint, allowed_token_ids=allowed, **_vllm_extras(body)), constraint_field
    except SamplingParamsError as e:
        # the constraint's own field, not the engine's name for it
        param = constraint_field if e.field == "structured_outputs" and constraint_field else e.field
        raise bad_request(str(e), param=param) from None


# vLLM's extra sampling fields that its OpenAI server takes over HTTP (SamplingParams has them all).
MAX_BAD_WORDS = 128  # each bans up to two ids in the fixed-width bias table (BIAS_WIDTH 512)


def _vllm_extras(body: dict) -> dict[str, Any]:
    bad_words = _field(body, "bad_words", (list,)) or []
    if len(bad_words) > MAX_BAD_WORDS or not all(isinstance(w, str) and w.strip() and len(w) <= MAX_STOP_LENGTH
                                                  for w in bad_words):
        raise bad_request(f"'bad_words' must be at most {MAX_BAD_WORDS} non-blank strings of at most "
                          f"{MAX_STOP_LENGTH} characters", param="bad_words")
    return {"skip_special_tokens": _field(body, "skip_special_tokens", (bool,), True),
            "include_stop_str_in_output": _field(body, "include_stop_str_in_output", (bool,), False),
            "bad_words": tuple(bad_words), "truncate_prompt_tokens": _field(body, "truncate_prompt_tokens", (int,))}


def _max_tokens(body: dict, *names: str, minimum: int = 1) -> int | None:
    for name in names:
        value = _field(body, name, (int,))
        if value is not None:
            if value < minimum:
                hint = "" if minimum == 0 else " (0 only with 'echo': true, to score the prompt)"
                raise bad_request(f"'{name}' must be at least {minimum}{hint}, got {value}", param=name)
            return value
    return None


def _stream_options(body: dict, stream: bool) -> bool:
    options = _field(body, "stream_options", (dict,))
    if options is None:
        return False
    if not stream:
        raise bad_request("'stream_options' is only allowed when 'stream' is true", param="stream_options")
    for key in options:
        if key not in ("include_usage", "include_obfuscation"):
            raise bad_request(f"'stream_options.{key}' is not supported", param=f"stream_options.{key}")
    if options.get("include_obfuscation") not in (None, False):  # OpenAI pads chunks against side channels; we do not
        raise bad_request("'stream_options.include_obfuscation' may only be false: chunks are not padded",
                          param="stream_options.include_obfuscation")
    include = options.get("include_usage", False)
    if not isinstance(include, bool):
        raise bad_request("'stream_options.include_usage' must be a boolean", param="stream_options")
    return include


def _common(body: Any, kind: str) -> tuple[str | None, bool, bool, str | None, int]:
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {json_type(body)}")
    check_fields(body, kind)
    model = _field(body, "model", (str,))
    stream = _field(body, "stream", (bool,), False)
    include_usage = _stream_options(body, stream)
    user = _field(body, "user", (str,))
    priority = _field(body, "priority", (int,), 0)
    return model, stream, include_usage, user, priority


# ---------------------------------------------------------------------------- requests

def parse_completion(body: Any) -> GenerationRequest:
    """Validates a /v1/completions body."""
    model, stream, include_usage, user, priority = _common(body, "completion")
    if "prompt" not in body:
        raise bad_request("'prompt' is required", param="prompt")
    prompt = body["prompt"]
    if isinstance(prompt, str) or _int_list(prompt) and prompt:
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or _int_list(p) for p in prompt):
        prompts = list(prompt)
    else:
        raise bad_request("'prompt' must be a string, an array of strings, an array of token ids or an array of "
                          "token-id arrays", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise bad_request(f"at most {MAX_PROMPTS} prompts per request, got {len(prompts)}", param="prompt")
    if any(len(p) == 0 for p in prompts):
        raise bad_request("prompts must not be empty", param="prompt")
    if _field(body, "suffix", (str,)):
        raise bad_request("'suffix' is not supported", param="suffix")
    logprobs = _field(body, "logprobs", (int,))
    if logprobs is not None and not 0 <= logprobs <= SamplingParams.MAX_LOGPROBS:
        raise bad_request(f"'logprobs' must be in [0, {SamplingParams.MAX_LOGPROBS}], got {logprobs}",
                          param="logprobs")
    echo = _field(body, "echo", (bool,), False)
    # OpenAI's default for completions is 16 tokens; an explicit null means "up to the context".
    max_tokens = _max_tokens(body, "max_tokens", minimum=0 if echo else 1) if "max_tokens" in body else 16
    score_only = max_tokens == 0
    if echo and logprobs is not None and stream:
        raise bad_request("'echo' with 'logprobs' (prompt logprobs) is not supported with 'stream' yet",
                          param="stream")
    if score_only and stream:
        raise bad_request("'max_tokens': 0 (scoring the prompt) is not supported with 'stream'", param="max_tokens")
    params, constraint_field = _sampling_params(body, 1 if score_only else max_tokens, logprobs)
    if echo and logprobs is not None:
        # echo with logprobs returns the prompt's log-probs ahead of the completion's (lm-evaluation-harness)
        params = dataclasses.replace(params, prompt_logprobs=logprobs)
    return GenerationRequest("completion", model, prompts, params, stream=stream, include_usage=include_usage,
                             user=user, echo=echo, score_only=score_only, logprobs=logprobs, priority=priority,
                             constraint_field=constraint_field)


def _message_content(i: int, content: Any) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else json_type(part)
                raise bad_request(f"messages[{i}].content: only text parts are supported, got {kind!r}",
                                  param=f"messages[{i}].content")
            texts.append(part["text"])
        return "".join(texts)
    raise bad_request(f"messages[{i}].content must be a string or an array of text parts",
                      param=f"messages[{i}].content")


def parse_chat(body: Any) -> GenerationRequest:
    """Validates a /v1/chat/completions body."""
    model, stream, include_usage, user, priority = _common(body, "chat")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty array", param="messages")
    normalised = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in CHAT_ROLES:
            raise bad_request(f"messages[{i}].role must be one of {', '.join(CHAT_ROLES)}",
                              param=f"messages[{i}].role")
        role = "system" if message["role"] == "developer" else message["role"]
        for key, value in message.items():
            if key not in MESSAGE_FIELDS and not (key in MESSAGE_ECHO_FIELDS and value is None):
                raise bad_request(f"messages[{i}].{key} is not supported", param=f"messages[{i}].{key}")
        name = {"name": message["name"]} if isinstance(message.get("name"), str) else {}
        normalised.append({"role": role, "content": _message_content(i, message.get("content")), **name,
                           **check_message_tool_fields(i, message)})
    tool_request = parse_tools(body)
    want_logprobs = _field(body, "logprobs", (bool,), False)
    top = _field(body, "top_logprobs", (int,))
    if top is not None and not want_logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs' set to true", param="top_logprobs")
    if top is not None and not 0 <= top <= SamplingParams.MAX_LOGPROBS:
        raise bad_request(f"'top_logprobs' must be in [0, {SamplingParams.MAX_LOGPROBS}], got {top}",
                          param="top_logprobs")
    logprobs = (top or 0) if want_logprobs else None
    max_tokens = _max_tokens(body, "max_completion_tokens", "max_tokens")
    params, constraint_field = _sampling_params(body, max_tokens, logprobs, tool_request)
    return GenerationRequest("chat", model, [], params, stream=stream,
                             include_usage=include_usage, user=user, logprobs=logprobs, messages=normalised,
                             priority=priority, tools=tool_request, constraint_field=constraint_field)


def tokenize_prompts(req: GenerationRequest, tokenizer: Any) -> tuple[list[str], list[list[int]]]:
    """(texts, token ids) of the request's prompts; chat messages are rendered with the model's template. With
    `truncate_prompt_tokens` the ids are the last k (as the engine would keep), so the context check sees them.

    Shared by the server and the offline batch (`jaxserve.server.batch`); a template error is a 400.
    """
    tok = tokenizer
    if req.kind == "chat":
        try:
            messages, extra = render_messages(req.messages, req.tools and req.tools.tools, tok.chat_template)
            text = render_chat(tok.chat_template, messages, add_generation_prompt=True,
                               bos_token=tok.bos_token, eos_token=tok.eos_token, **extra)
        except ValueError as e:
            raise bad_request(str(e), param="messages") from None
        return [text], _truncated(req, [tok.encode(text)])
    texts, ids = [], []
    for prompt in req.prompts:
        if isinstance(prompt, str):
            texts.append(prompt)
            ids.append(tok.encode(prompt))
        else:
            vocab = getattr(tok, "vocab_size", None)
            if vocab is not None and not all(0 <= t < vocab for t in prompt):  # before decode: it may not cope
                raise bad_request(f"prompt token ids must be in [0, {vocab})", param="prompt")
            ids.append(list(prompt))
            texts.append(tok.decode(prompt))
    return texts, _truncated(req, ids)


def _truncated(req: GenerationRequest, ids: list[list[int]]) -> list[list[int]]:
    k = req.params.truncate_prompt_tokens
    return ids if k is None else [p[-k:] for p in ids]


def params_for_prompt(params: SamplingParams, prompt_ids: list[int], max_model_len: int,
                      validate: Callable[[list[int], SamplingParams], None] | None,
                      param: Callable[[str], str] = str) -> SamplingParams:
    """`params` with max_tokens None made explicit (up to the context), checked by the engine's `validate`:
    a bad field is a 400 naming it, prompt + max_tokens over the context a 400 `context_length_exceeded`."""
    try:
        if params.max_tokens is None:  # "up to the context": make the worst case explicit
            params = dataclasses.replace(params, max_tokens=max(1, max_model_len - len(prompt_ids)))
        if validate is not None:
            validate(prompt_ids, params)
    except SamplingParamsError as e:  # NOTE: replace() raises it too (min_tokens over what the context leaves)
        raise bad_request(str(e), param=param(e.field)) from None
    except ValueError as e:  # RequestTooLongError: prompt + max_tokens over the context
        raise context_too_long(str(e)) from None
    return params


# ---------------------------------------------------------------------------- responses

def new_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_logprobs(entries: Sequence[TokenLogprob], token_text: Callable[[int], str],
                        text_offset: int) -> dict[str, Any]:
    """The legacy completions shape: parallel arrays of tokens, their logprobs, top alternatives, offsets."""
    tokens, token_logprobs, tops, offsets = [], [], [], []
    for entry in entries:
        text = token_text(entry.token_id)
        tokens.append(text)
        token_logprobs.append(entry.logprob)
        top: dict[str, float] = {}
        for token_id, logprob in entry.top:
            top.setdefault(token_text(token_id), logprob)
        tops.append(top)
        offsets.append(text_offset)
        text_offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": tops, "text_offset": offsets}


def echo_logprobs(prompt_ids: Sequence[int], prompt_entries: Sequence[TokenLogprob | None] | None,
                  entries: Sequence[TokenLogprob], token_text: Callable[[int], str],
                  completion_offset: int) -> dict[str, Any]:
    """The legacy completions shape for echo with logprobs: the prompt's tokens first (the first one, which
    nothing predicts, has null `token_logprobs` and `top_logprobs`), then the completion's from
    `completion_offset` (the echoed prompt's length in characters)."""
    prompt_entries = prompt_entries or [None] * len(prompt_ids)
    tokens, token_logprobs, tops, offsets = [], [], [], []
    offset = 0
    for token_id, entry in zip(prompt_ids, prompt_entries):
        text = token_text(token_id)
        tokens.append(text)
        token_logprobs.append(None if entry is None else entry.logprob)
        top: dict[str, float] = {}
        for alt_id, logprob in entry.top if entry is not None else ():
            top.setdefault(token_text(alt_id), logprob)
        tops.append(None if entry is None else top)
        offsets.append(offset)
        offset += len(text)
    rest = completion_logprobs(entries, token_text, completion_offset)
    return {"tokens": tokens + rest["tokens"], "token_logprobs": token_logprobs + rest["token_logprobs"],
            "top_logprobs": tops + rest["top_logprobs"], "text_offset": offsets + rest["text_offset"]}


def chat_logprobs(entries: Sequence[TokenLogprob], token_text: Callable[[int], str]) -> dict[str, Any]:
    def item(token_id: int, logprob: float) -> dict[str, Any]:
        text = token_text(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [dict(item(e.token_id, e.logprob), top_logprobs=[item(t, lp) for t, lp in e.top])
                        for e in entries], "refusal": None}


def completion_choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str | None, logprobs: dict | None, finish_reason: str | None,
                tool_calls: list[dict] | None = None) -> dict[str, Any]:
    message = {"role": "assistant", "content": text, "refusal": None}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_delta_choice(index: int, delta: dict[str, Any], logprobs: dict | None,
                      finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def response(kind: str, request_id: str, created: int, model: str, choices: list[dict],
             usage_: dict | None) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created, "model": model, "system_fingerprint": None, "choices": choices, "usage": usage_}


def chunk(kind: str, request_id: str, created: int, model: str, choices: list[dict],
          usage_: dict | None = None, *, include_usage: bool = False) -> dict[str, Any]:
    """One SSE chunk. With include_usage every chunk carries `usage` (null but on the last one), as OpenAI's do."""
    out = {"id": request_id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
           "created": created, "model": model, "system_fingerprint": None, "choices": choices}
    if include_usage or usage_ is not None:
        out["usage"] = usage_
    return out
