"""Tool calling in text: how tools reach the prompt, and how calls are read back out of the output (no JAX).

The default format (used when the model's chat template has no tool format of its own, as SmolLM2's has
none) is Hermes / Qwen's, which many templates that do have one also use:

  * the tools are described in the system turn, as JSON inside <tools></tools>;
  * the model calls one by writing `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
  * an assistant turn's earlier calls are rendered the same way, and a tool's result comes back as a user
    turn `<tool_response>...</tool_response>`.

A template that mentions `tools` gets the request's tools and the messages' `tool_calls` itself (the
transformers convention: `arguments` as a dict); its calls are still read back from the same tags.

Under tool_choice "required" or a named function, the output is constrained to bare JSON instead (a call
object, or with parallel calls an array of them; `call_schema`), and `ToolCallParser(constrained=True)`
reads that.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any, Mapping, Sequence

OPEN, CLOSE = "<tool_call>", "</tool_call>"

DEFAULT_TOOLS_PROMPT = (
    "You may call one or more functions to help with the user's request. The functions are described in JSON "
    "inside <tools></tools>:\n<tools>\n{tools}\n</tools>\n"
    "To call a function, reply with one JSON object per call inside <tool_call></tool_call> tags, like this:\n"
    '<tool_call>\n{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n</tool_call>'
)


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object (OpenAI sends arguments as a string)
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def template_has_tools(template: str | None) -> bool:
    """Whether a chat template renders tools itself (it reads the `tools` variable)."""
    return template is not None and "tools" in template


def call_schema(tools: Sequence[Mapping[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON schema of the constrained output: a call of one of `tools` (its arguments valid against the
    function's parameters), or with `parallel` an array of one or more calls."""
    variants = [{"type": "object", "properties": {
        "name": {"const": t["function"]["name"]},
        "arguments": closed(t["function"].get("parameters") or {"type": "object"})},
        "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    one = variants[0] if len(variants) == 1 else {"anyOf": variants}
    return {"type": "array", "items": one, "minItems": 1} if parallel else one


def closed(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object that lists `properties` and says nothing
    about others. NOTE: every output this allows, the original allows too; without it a small model can add
    made-up keys until max_tokens (OpenAI's strict mode asks the same of every schema)."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: (closed(v) if k in ("items", "anyOf", "oneOf", "allOf", "not", "prefixItems") else v)
           for k, v in schema.items()}
    for key in ("properties", "$defs", "definitions"):
        if isinstance(schema.get(key), dict):
            out[key] = {name: closed(v) for name, v in schema[key].items()}
    if "properties" in schema and "additionalProperties" not in schema and "patternProperties" not in schema:
        out["additionalProperties"] = False
    return out


def render_messages(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None,
                    template: str | None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(messages, extra template variables) for `render_chat`.

    `messages` are OpenAI's (assistant turns may hold `tool_calls` with `arguments` as JSON text; tool turns
    `tool_call_id`); `tools` the request's tool list, None when the model should not see any.
    """
    if template_has_tools(template):
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"],
                                                      "arguments": _loads_object(c["function"]["arguments"])}}
                                   for c in m["tool_calls"]]
            out.append(m)
        return out, {"tools": list(tools)} if tools else {}
    out = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"})
        elif m.get("tool_calls"):
            calls = "\n".join(format_call(c["function"]["name"], c["function"]["arguments"])
                              for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (m["content"] + "\n" if m["content"] else "") + calls})
        else:
            out.append(dict(m))
    if tools:
        described = DEFAULT_TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + described}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out, {}


def format_call(name: str, arguments: str | Mapping[str, Any]) -> str:
    args = _loads_object(arguments) if isinstance(arguments, str) else dict(arguments)
    return f"{OPEN}\n{json.dumps({'name': name, 'arguments': args}, ensure_ascii=False)}\n{CLOSE}"


def _loads_object(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # not JSON: the template shows it as it came


class ToolCallParser:
    """Splits generated text into content and tool calls, incrementally.

    `feed(text)` and `finish()` return (content released now, calls completed now); the concatenation of
    what they return is the same however the text is split, so streamed deltas assemble to the
    non-streamed message. Tagged mode holds back text that could be the start of `<tool_call>`, drops the
    whitespace around calls, and leaves a block that is not a valid call of a known tool in the content.
    Constrained mode (`constrained=True`) holds everything and reads the JSON call(s) at the end.
    """

    def __init__(self, tool_names: Sequence[str], *, constrained: bool = False):
        self.names = set(tool_names)
        self.constrained = constrained
        self.calls: list[ToolCall] = []
        self._buf = ""
        self._inside = False
        self._held_ws = ""  # whitespace not yet released: dropped if a call follows
        self._ws_before = ""  # the held whitespace in front of the open block
        self._after_call = False  # drop the whitespace that follows a call

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buf += text
        if self.constrained:
            return "", []
        content, calls = [], []
        while True:
            if not self._inside:
                i = self._buf.find(OPEN)
                if i < 0:
                    keep = _partial_suffix(self._buf, OPEN)
                    content.append(self._content(self._buf[:len(self._buf) - keep]))
                    self._buf = self._buf[len(self._buf) - keep:]
                    break
                content.append(self._content(self._buf[:i]))
                self._ws_before, self._held_ws = self._held_ws, ""  # dropped if the block is a call
                self._buf, self._inside = self._buf[i + len(OPEN):], True
            else:
                j = self._buf.find(CLOSE)
                if j < 0:
                    break
                body, self._buf, self._inside = self._buf[:j], self._buf[j + len(CLOSE):], False
                content.append(self._block(body, CLOSE, calls))
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        """The rest: an unterminated block is still a call if it parses (the model stopped on the close tag)."""
        if self.constrained:
            return self._constrained()
        content, calls = self.feed("")
        rest = self._buf
        self._buf = ""
        if self._inside:
            self._inside = False
            content += self._block(rest, "", calls)
        else:
            content += self._content(rest)
        if not self.calls:
            content += self._held_ws
        self._held_ws = ""
        return content, calls

    def _content(self, text: str) -> str:
        if self._after_call:
            text = text.lstrip()
            if not text:
                return ""
            self._after_call = False
        text = self._held_ws + text
        stripped = text.rstrip()
        self._held_ws = text[len(stripped):]
        return stripped

    def _block(self, body: str, close: str, calls: list[ToolCall]) -> str:
        call = self._parse(body)
        if call is None:  # not a call: the text stays in the content, tags and all
            self._after_call = False
            self._held_ws = self._ws_before
            return self._content(OPEN + body + close)
        self.calls.append(call)
        calls.append(call)
        self._after_call = True
        return ""

    def _parse(self, body: str) -> ToolCall | None:
        try:
            obj = json.loads(body)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in self.names:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))

    def _constrained(self) -> tuple[str, list[ToolCall]]:
        text, self._buf = self._buf, ""
        try:
            obj = json.loads(text)
        except json.JSONDecodeError:
            return text, []  # cut short (max_tokens): the partial JSON is the content
        calls = [self._parse(json.dumps(o)) for o in (obj if isinstance(obj, list) else [obj])]
        if not calls or any(c is None for c in calls):
            return text, []
        self.calls += calls
        return "", calls


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for k in range(min(len(text), len(tag) - 1), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0
