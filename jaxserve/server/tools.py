"""The chat request's tool fields (`tools`, `tool_choice`, `parallel_tool_calls`) read into a `ToolRequest`,
and the message / chunk shapes of the calls that come back (no JAX).

What each tool_choice does (the prompt format and the parser are `jaxserve.text.tool_calls`):

  * "none": the model does not see the tools and nothing is parsed;
  * "auto" (the default with tools): the tools are described to the model and `<tool_call>` blocks in its
    free output become tool calls; `parallel_tool_calls: false` stops the output after the first call;
  * "required" or {"type": "function", "function": {"name": ...}}: the output is constrained
    (structured_outputs json) to a call of one of the tools (of the named one), so its arguments always
    validate against the function's `parameters`; "required" with parallel calls allowed: an array of
    one or more calls.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxserve.core.structured_outputs import StructuredOutputsParams
from jaxserve.server.errors import bad_request
from jaxserve.server.structured import NAME_PATTERN, check_schema
from jaxserve.text.tool_calls import CLOSE, ToolCall, ToolCallParser, call_schema

FIELDS = ("tools", "tool_choice", "parallel_tool_calls")
MAX_TOOLS = 128  # OpenAI's limit


@dataclasses.dataclass(frozen=True)
class ToolRequest:
    tools: tuple[dict[str, Any], ...]  # OpenAI's {"type": "function", "function": {...}} entries, checked
    choice: str  # "auto" | "required" | "named" ("none" never makes a ToolRequest)
    parallel: bool = True
    named: str | None = None  # the function tool_choice names

    @property
    def names(self) -> list[str]:
        return [t["function"]["name"] for t in self.tools]

    def constraint(self) -> StructuredOutputsParams | None:
        if self.choice == "auto":
            return None
        tools = [t for t in self.tools if self.choice != "named" or t["function"]["name"] == self.named]
        return StructuredOutputsParams(json=call_schema(tools, parallel=self.parallel and self.choice == "required"))

    def stop(self) -> tuple[str, ...]:
        """With parallel calls off, free output ends after the first call (the parser reads the open block)."""
        return (CLOSE,) if self.choice == "auto" and not self.parallel else ()

    def parser(self) -> ToolCallParser:
        return ToolCallParser(self.names, constrained=self.choice != "auto")


def parse_tools(body: dict) -> ToolRequest | None:
    """The body's tool fields; None when the model gets no tools (none given, or tool_choice "none")."""
    tools = body.get("tools")
    if tools is not None and (not isinstance(tools, list) or len(tools) > MAX_TOOLS):
        raise bad_request(f"'tools' must be an array of at most {MAX_TOOLS} tools", param="tools")
    tools = [_tool(i, t) for i, t in enumerate(tools or [])]
    names = [t["function"]["name"] for t in tools]
    if len(set(names)) != len(names):
        raise bad_request("'tools' names a function twice", param="tools")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise bad_request("'parallel_tool_calls' must be a boolean", param="parallel_tool_calls")
    choice, named = _choice(body.get("tool_choice"), names)
    if not tools or choice == "none":
        return None
    return ToolRequest(tuple(tools), choice, parallel is not False, named)


def with_tools(constraint: StructuredOutputsParams | None, field: str | None, request: ToolRequest | None,
               ) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's output constraint once its tools are counted: a forced call brings its own (and refuses
    another); under "auto" a constraint would rule the calls out, so it is refused too."""
    if request is None:
        return constraint, field
    if request.constraint() is not None:
        if constraint is not None:
            raise bad_request(f"'{field}' cannot be combined with a 'tool_choice' that forces a call (the call is "
                              "constrained to the tool's schema)", param=field)
        return request.constraint(), "tool_choice"
    if constraint is not None:
        raise bad_request(f"'{field}' cannot be combined with 'tools' under tool_choice \"auto\" (the constraint "
                          "would rule the calls out); use tool_choice \"none\" or \"required\"", param=field)
    return None, None


def _tool(i: int, tool: Any) -> dict[str, Any]:
    param = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function":
        raise bad_request(f"'{param}.type' must be \"function\" (the only tool type served)", param=f"{param}.type")
    if set(tool) - {"type", "function"}:
        raise bad_request(f"'{param}' has unknown fields: {sorted(set(tool) - {'type', 'function'})}", param=param)
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise bad_request(f"'{param}.function' must be an object", param=f"{param}.function")
    unknown = set(fn) - {"name", "description", "parameters", "strict"}
    if unknown:
        raise bad_request(f"'{param}.function' has unknown fields: {sorted(unknown)}", param=f"{param}.function")
    if not isinstance(fn.get("name"), str) or not NAME_PATTERN.match(fn["name"]):
        raise bad_request(f"'{param}.function.name' must be 1 to 64 letters, digits, '_' or '-'",
                          param=f"{param}.function.name")
    if fn.get("description") is not None and not isinstance(fn["description"], str):
        raise bad_request(f"'{param}.function.description' must be a string", param=f"{param}.function.description")
    if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
        raise bad_request(f"'{param}.function.strict' must be a boolean", param=f"{param}.function.strict")
    out = {k: v for k, v in fn.items() if v is not None and k != "strict"}
    if "parameters" in out:
        out["parameters"] = check_schema(out["parameters"], f"{param}.function.parameters")
    return {"type": "function", "function": out}


def _choice(value: Any, names: list[str]) -> tuple[str, str | None]:
    if value is None:
        return "auto", None
    if value in ("none", "auto"):
        return value, None
    if value == "required":
        if not names:
            raise bad_request("'tool_choice' \"required\" needs 'tools'", param="tool_choice")
        return "required", None
    if isinstance(value, dict) and value.get("type") == "function" and isinstance(value.get("function"), dict):
        name = value["function"].get("name")
        if name not in names:
            raise bad_request(f"'tool_choice' names function {name!r}, which is not in 'tools'", param="tool_choice")
        return "named", name
    raise bad_request("'tool_choice' must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", "
                      "\"function\": {\"name\": ...}}", param="tool_choice")


def check_message_tool_fields(i: int, message: dict) -> dict[str, Any]:
    """The tool fields of messages[i] (assistant `tool_calls`, tool `tool_call_id`), checked and copied."""
    out: dict[str, Any] = {}
    calls = message.get("tool_calls")
    if calls is not None:
        param = f"messages[{i}].tool_calls"
        if message["role"] != "assistant" or not isinstance(calls, list):
            raise bad_request(f"'{param}' must be an array, on an assistant message", param=param)
        out["tool_calls"] = []
        for call in calls:
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                    or not isinstance(fn.get("arguments"), str):
                raise bad_request(f"'{param}' entries must be {{\"id\", \"type\": \"function\", \"function\": "
                                  "{\"name\", \"arguments\": JSON text}}", param=param)
            out["tool_calls"].append({"id": call.get("id"), "type": "function",
                                      "function": {"name": fn["name"], "arguments": fn["arguments"]}})
    if message["role"] == "tool":
        if not isinstance(message.get("tool_call_id"), str):
            raise bad_request(f"'messages[{i}].tool_call_id' must be a string on a tool message",
                              param=f"messages[{i}].tool_call_id")
        out["tool_call_id"] = message["tool_call_id"]
    return out


def tool_call_deltas(first_index: int, calls: list[ToolCall]) -> list[dict[str, Any]]:
    """OpenAI's streamed shape: per call, its id, type and name with empty arguments, then the arguments."""
    out = []
    for k, call in enumerate(calls, first_index):
        out.append({"tool_calls": [{"index": k, "id": call.id, "type": "function",
                                    "function": {"name": call.name, "arguments": ""}}]})
        out.append({"tool_calls": [{"index": k, "function": {"arguments": call.arguments}}]})
    return out


def finish_reason(calls: list[ToolCall], engine_reason: str | None) -> str | None:
    """"tool_calls" when the output ended on its own with calls in it (a cut-off one keeps "length")."""
    return "tool_calls" if calls and engine_reason == "stop" else engine_reason


def parse_message(request: ToolRequest | None, text: str, engine_reason: str | None,
                  ) -> tuple[str | None, list[dict[str, Any]] | None, str | None]:
    """A whole output as OpenAI's message: (content, tool_calls, finish_reason). Content is null when the
    output was only calls; tool_calls null when there were none."""
    if request is None:
        return text, None, engine_reason
    parser = request.parser()
    content, calls = parser.feed(text)
    rest, late = parser.finish()
    content, calls = content + rest, calls + late
    return (content or (None if calls else "")), [c.to_openai() for c in calls] or None, \
        finish_reason(calls, engine_reason)
