"""Output constraints and tool calling on the server side, without a model: field parsing (every field of the
official client's request types is handled or refused), schema checks, the tool-call parser, the default tool
prompt format, and tool calls through the real app on the fake engine."""

from __future__ import annotations

import json
import time

import openai.types.chat.completion_create_params as chat_params
import openai.types.completion_create_params as completion_params
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve.core.structured_outputs import StructuredOutputsParams
from jaxserve.server import protocol
from jaxserve.server.errors import APIError
from jaxserve.server.structured import parse_structured_outputs
from jaxserve.server.tools import parse_tools
from jaxserve.text.chat_template import render_chat
from jaxserve.text.tool_calls import ToolCallParser, call_schema, closed, render_messages

from conftest import FAKE_TEMPLATE, FakeEngine, async_test, error_of, read_sse, serving

MESSAGES = [{"role": "user", "content": "hi"}]
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def bad(fn, body) -> APIError:
    with pytest.raises(APIError) as info:
        fn(body)
    assert info.value.status == 400
    return info.value


def fields(module) -> set[str]:
    names = set()
    for cls in (module.CompletionCreateParamsNonStreaming, module.CompletionCreateParamsStreaming):
        for klass in cls.__mro__:
            names |= set(getattr(klass, "__annotations__", {}))
    return names


# ---------------------------------------------------------------------------- every field of the official client

# field -> (value, what it changes in the parsed request); sent on top of a minimal valid body.
CHAT_HANDLED = {
    "messages": (MESSAGES, lambda r: r.messages == [{"role": "user", "content": "hi"}]),
    "model": ("m", lambda r: r.model == "m"),
    "stream": (True, lambda r: r.stream),
    "frequency_penalty": (0.5, lambda r: r.params.frequency_penalty == 0.5),
    "presence_penalty": (-0.5, lambda r: r.params.presence_penalty == -0.5),
    "logit_bias": ({"7": 3}, lambda r: r.params.logit_bias == {7: 3.0}),
    "logprobs": (True, lambda r: r.logprobs == 0),
    "max_completion_tokens": (5, lambda r: r.params.max_tokens == 5),
    "max_tokens": (6, lambda r: r.params.max_tokens == 6),
    "n": (2, lambda r: r.params.n == 2),
    "seed": (9, lambda r: r.params.seed == 9),
    "stop": ("x", lambda r: r.params.stop == ("x",)),
    "temperature": (0.5, lambda r: r.params.temperature == 0.5),
    "top_p": (0.5, lambda r: r.params.top_p == 0.5),
    "user": ("u", lambda r: r.user == "u"),
    "tools": ([WEATHER], lambda r: r.tools is not None and r.tools.names == ["get_weather"]),
    "response_format": ({"type": "json_object"}, lambda r: r.params.structured_outputs is not None
                        and r.params.structured_outputs.json_object),
}
# field -> (accepted value(s) that change nothing, refused value)
CHAT_VALIDATED = {
    "store": (False, True), "metadata": ({}, {"k": "v"}), "modalities": (["text"], ["text", "audio"]),
    "service_tier": ("auto", "flex"), "safety_identifier": ("id-1", 5), "prompt_cache_key": ("key", 5),
}
# fields that only make sense together with another one
CHAT_PAIRED = {
    "top_logprobs": ({"logprobs": True, "top_logprobs": 2}, lambda r: r.logprobs == 2),
    "stream_options": ({"stream": True, "stream_options": {"include_usage": True}}, lambda r: r.include_usage),
    "tool_choice": ({"tools": [WEATHER], "tool_choice": "none"}, lambda r: r.tools is None),
    "parallel_tool_calls": ({"tools": [WEATHER], "parallel_tool_calls": False},
                            lambda r: not r.tools.parallel and "</tool_call>" in r.params.stop),
}

COMPLETION_HANDLED = {
    "prompt": ("hi", lambda r: r.prompts == ["hi"]), "model": ("m", lambda r: r.model == "m"),
    "stream": (True, lambda r: r.stream), "best_of": (1, lambda r: r.params.n == 1),
    "echo": (True, lambda r: r.echo), "frequency_penalty": (0.5, lambda r: r.params.frequency_penalty == 0.5),
    "presence_penalty": (0.5, lambda r: r.params.presence_penalty == 0.5),
    "logit_bias": ({"7": 3}, lambda r: r.params.logit_bias == {7: 3.0}),
    "logprobs": (2, lambda r: r.logprobs == 2), "max_tokens": (3, lambda r: r.params.max_tokens == 3),
    "n": (2, lambda r: r.params.n == 2), "seed": (9, lambda r: r.params.seed == 9),
    "stop": ("x", lambda r: r.params.stop == ("x",)), "temperature": (0.5, lambda r: r.params.temperature == 0.5),
    "top_p": (0.5, lambda r: r.params.top_p == 0.5), "user": ("u", lambda r: r.user == "u"),
    "stream_options": ({"include_usage": True}, lambda r: r.include_usage),
}


def test_every_chat_field_of_the_openai_client_is_handled_or_refused():
    refused = []
    for name in sorted(fields(chat_params)):
        base = {"messages": MESSAGES}
        if name in CHAT_HANDLED:
            value, effect = CHAT_HANDLED[name]
            assert effect(protocol.parse_chat({**base, name: value})), name
            if name != "messages":  # required: no body without it
                assert not effect(protocol.parse_chat(base)), f"{name}: the check must fail without the field"
        elif name in CHAT_PAIRED:
            extra, effect = CHAT_PAIRED[name]
            assert effect(protocol.parse_chat({**base, **extra})), name
        elif name in CHAT_VALIDATED:
            ok, refused_value = CHAT_VALIDATED[name]
            protocol.parse_chat({**base, name: ok})
            assert bad(protocol.parse_chat, {**base, name: refused_value}).param == name
        else:
            err = bad(protocol.parse_chat, {**base, name: {"x": 1}})
            assert err.param == name and name in err.message
            refused.append(name)
    # the ones we know we do not serve (a new client field lands here until it is implemented or listed)
    assert {"audio", "functions", "function_call", "prediction", "reasoning_effort", "web_search_options"} <= \
        set(refused)


def test_every_completion_field_of_the_openai_client_is_handled_or_refused():
    for name in sorted(fields(completion_params)):
        base = {"prompt": "hi"} if name != "stream_options" else {"prompt": "hi", "stream": True}
        if name in COMPLETION_HANDLED:
            value, effect = COMPLETION_HANDLED[name]
            assert effect(protocol.parse_completion({**base, name: value})), name
        else:
            err = bad(protocol.parse_completion, {**base, name: "x"})
            assert err.param == name, name


def test_nested_fields_are_checked_too():
    stream = {"messages": MESSAGES, "stream": True}
    assert protocol.parse_chat({**stream, "stream_options": {"include_obfuscation": False}}).stream
    for options, param in (({"include_obfuscation": True}, "stream_options.include_obfuscation"),
                           ({"chunk_size": 3}, "stream_options.chunk_size")):
        assert bad(protocol.parse_chat, {**stream, "stream_options": options}).param == param


def test_message_fields():
    echoed = {"role": "assistant", "content": "hi", "refusal": None, "audio": None, "function_call": None,
              "annotations": None}
    req = protocol.parse_chat({"messages": [{"role": "user", "content": "x", "name": "ann"}, echoed]})
    assert req.messages == [{"role": "user", "content": "x", "name": "ann"}, {"role": "assistant", "content": "hi"}]
    for key, value in (("audio", {"id": "a"}), ("weight", 1), ("refusal", "no")):
        assert bad(protocol.parse_chat, {"messages": [{**echoed, key: value}]}).param == f"messages[0].{key}"


def test_openapi_documents_exactly_the_accepted_fields():
    from jaxserve.server import openapi, request_fields

    assert set(openapi.SCHEMAS["ChatCompletionRequest"]["properties"]) == set(request_fields.CHAT)
    assert set(openapi.SCHEMAS["CompletionRequest"]["properties"]) == set(request_fields.COMPLETION)


def test_unknown_fields_and_vllm_extras():
    assert bad(protocol.parse_chat, {"messages": MESSAGES, "chat_template_kwargs": {}}).param == "chat_template_kwargs"
    assert bad(protocol.parse_completion, {"prompt": "a", "guided_decoding_backend": "x"}).param == \
        "guided_decoding_backend"
    req = protocol.parse_completion({"prompt": "a", "top_k": 3, "min_p": 0.1, "ignore_eos": True, "priority": 0,
                                     "allowed_token_ids": [5, 9]})
    assert (req.params.top_k, req.params.ignore_eos, req.params.allowed_token_ids) == (3, True, (5, 9))
    assert bad(protocol.parse_chat, {"messages": MESSAGES, "allowed_token_ids": ["a"]}).param == "allowed_token_ids"


# ---------------------------------------------------------------------------- output constraints

SCHEMA = {"type": "object", "properties": {"a": {"$ref": "#/$defs/n"}}, "$defs": {"n": {"type": "integer"}}}


@pytest.mark.parametrize("body, expected", [
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, StructuredOutputsParams(json_object=True)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}},
     StructuredOutputsParams(json=SCHEMA)),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     StructuredOutputsParams(json_object=True)),
    ({"structured_outputs": {"json": SCHEMA}}, StructuredOutputsParams(json=SCHEMA)),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}}, StructuredOutputsParams(json=SCHEMA)),
    ({"structured_outputs": {"regex": "[0-9]+"}}, StructuredOutputsParams(regex="[0-9]+")),
    ({"structured_outputs": {"choice": ["yes", "no"]}}, StructuredOutputsParams(choice=("yes", "no"))),
    ({"structured_outputs": {"grammar": "start: \"a\""}}, StructuredOutputsParams(grammar="start: \"a\"")),
    ({"structured_outputs": {"json_object": True}}, StructuredOutputsParams(json_object=True)),
    ({"guided_json": SCHEMA}, StructuredOutputsParams(json=SCHEMA)),
    ({"guided_regex": "a|b"}, StructuredOutputsParams(regex="a|b")),
    ({"guided_choice": ["a", "b"]}, StructuredOutputsParams(choice=("a", "b"))),
    ({"guided_grammar": "start: \"a\""}, StructuredOutputsParams(grammar="start: \"a\"")),
])
def test_constraint_fields(body, expected):
    params, _ = parse_structured_outputs(body)
    assert params == expected


@pytest.mark.parametrize("body, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}},
     "response_format.json_schema.schema", "type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"minimum": "5"}}}}}}, "response_format.json_schema.schema",
     "properties/a/minimum"),
    ({"guided_json": {"$ref": "#/$defs/missing"}}, "guided_json", "#/$defs/missing"),
    ({"guided_json": {"$ref": "https://example.com/s.json"}}, "guided_json", "remote"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_json": 5}, "guided_json", "JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name", "schema": {}}}},
     "response_format.json_schema.name", "letters"),
    ({"response_format": {"type": "grammar"}}, "response_format.type", "json_schema"),
    ({"response_format": {"type": "json_object", "extra": 1}}, "response_format", "extra"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"whitespace_pattern": " "}}, "structured_outputs.whitespace_pattern", "not supported"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"guided_regex": ""}, "guided_regex", "non-empty"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "combined"),
    ({"response_format": {"type": "json_object"}, "guided_json": {}}, "guided_json", "combined"),
])
def test_bad_constraints_are_400s_naming_what_is_wrong(body, param, words):
    err = bad(parse_structured_outputs, body)
    assert err.param == param and words in err.message, err.message


# ---------------------------------------------------------------------------- tool fields

def test_tool_fields():
    req = parse_tools({"tools": [WEATHER, TIME], "tool_choice": "required"})
    assert req.choice == "required" and req.parallel
    assert req.constraint().json == call_schema(req.tools, parallel=True)
    named = parse_tools({"tools": [WEATHER, TIME], "tool_choice": {"type": "function",
                                                                 "function": {"name": "get_time"}}})
    assert named.constraint().json["properties"]["name"] == {"const": "get_time"}
    # the arguments' objects are closed (no made-up keys), which only narrows what the schema allows
    assert named.constraint().json["properties"]["arguments"] == {**TIME["function"]["parameters"],
                                                                   "additionalProperties": False}
    nested = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}},
                                               "c": {"type": "object", "additionalProperties": True}}}
    assert closed(nested)["properties"]["a"]["additionalProperties"] is False
    assert closed(nested)["properties"]["c"]["additionalProperties"] is True and nested["properties"]["a"] == {
        "type": "object", "properties": {"b": {"type": "string"}}}  # the request's schema is left alone
    assert parse_tools({"tools": [WEATHER]}).constraint() is None  # auto: free output, parsed
    assert parse_tools({"tools": [WEATHER], "tool_choice": "none"}) is None
    assert parse_tools({"tool_choice": "auto"}) is None


@pytest.mark.parametrize("body, param", [
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 3}}}]},
     "tools[0].function.parameters"),
    ({"tools": [WEATHER, WEATHER]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_tool_fields(body, param):
    assert bad(parse_tools, body).param == param


def test_tool_messages_and_constraint_conflicts():
    history = [{"role": "user", "content": "weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    req = protocol.parse_chat({"messages": history, "tools": [WEATHER]})
    assert req.messages[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert req.messages[2]["tool_call_id"] == "call_1"
    assert bad(protocol.parse_chat, {"messages": [{"role": "tool", "content": "x"}]}).param == \
        "messages[0].tool_call_id"
    assert bad(protocol.parse_chat, {"messages": [{"role": "user", "content": "x", "tool_calls": []}]}).param == \
        "messages[0].tool_calls"
    err = bad(protocol.parse_chat, {"messages": MESSAGES, "tools": [WEATHER], "guided_regex": "a"})
    assert err.param == "guided_regex" and "tool_choice" in err.message


# ---------------------------------------------------------------------------- the parser and the prompt format

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def parse_whole(text: str, names=("get_weather", "get_time"), constrained=False):
    parser = ToolCallParser(names, constrained=constrained)
    content, calls = parser.feed(text)
    rest, late = parser.finish()
    return content + rest, [(c.name, json.loads(c.arguments)) for c in calls + late]


@pytest.mark.parametrize("text, content, calls", [
    ("no tools here", "no tools here", []),
    (CALL, "", [("get_weather", {"city": "Paris"})]),
    ("Let me check.\n" + CALL + "\n" + CALL.replace("Paris", "Oslo") + "\n", "Let me check.",
     [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]),
    (CALL[:-len("</tool_call>")], "", [("get_weather", {"city": "Paris"})]),  # stopped on the close tag
    ('<tool_call>{"name": "unknown", "arguments": {}}</tool_call>',
     '<tool_call>{"name": "unknown", "arguments": {}}</tool_call>', []),
    ("<tool_call>{broken</tool_call> after", "<tool_call>{broken</tool_call> after", []),
    ("x <tool_call>{oops}</tool_call>", "x <tool_call>{oops}</tool_call>", []),  # not a call: left as it was
    ('<tool_call>{"name": "get_time", "arguments": "{}"}</tool_call>', "", [("get_time", {})]),
    ("a < b <tool", "a < b <tool", []),
])
def test_parser(text, content, calls):
    assert parse_whole(text) == (content, calls)


def test_constrained_parser():
    assert parse_whole('{"name": "get_time", "arguments": {}}', constrained=True) == ("", [("get_time", {})])
    assert parse_whole('[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": '
                       '"Rome"}}]', constrained=True) == ("", [("get_time", {}), ("get_weather", {"city": "Rome"})])
    assert parse_whole('{"name": "get_ti', constrained=True) == ('{"name": "get_ti', [])  # cut short


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["Sure. " + CALL + " " + CALL, CALL + "\n\ndone <tool", "x <tool_call>{oops}</tool_call>",
                        "  " + CALL + "\n"]), st.lists(st.integers(0, 200), max_size=8))
def test_parser_gives_the_same_result_however_the_text_is_split(text, cuts):
    parser = ToolCallParser(["get_weather"])
    content, names = "", []
    points = sorted({min(c, len(text)) for c in cuts})
    for a, b in zip([0, *points], [*points, len(text)]):
        piece, calls = parser.feed(text[a:b])
        content, names = content + piece, names + [(c.name, c.arguments) for c in calls]
    piece, calls = parser.finish()
    content, names = content + piece, names + [(c.name, c.arguments) for c in calls]
    whole = parse_whole(text, names=("get_weather",))
    assert (content, [(n, json.loads(a)) for n, a in names]) == whole


def test_default_tool_format_in_the_prompt():
    history = [{"role": "user", "content": "weather in Paris?"},
               {"role": "assistant", "content": "", "tool_calls": [
                   {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "P"}'}}]},
               {"role": "tool", "content": "sunny", "tool_call_id": "c"}]
    messages, extra = render_messages(history, [WEATHER], FAKE_TEMPLATE)  # a template without tools
    text = render_chat(FAKE_TEMPLATE, messages, **extra)
    assert text.startswith("<system>") and '"name": "get_weather"' in text and "<tools>" in text
    assert '<assistant><tool_call>\n{"name": "get_weather", "arguments": {"city": "P"}}\n</tool_call>' in text
    assert "<user><tool_response>\nsunny\n</tool_response>" in text
    own = "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{{ m.role }}:" \
          "{% for c in m.tool_calls or [] %}{{ c.function.arguments.city }}{% endfor %}{{ m.content }}|{% endfor %}"
    messages, extra = render_messages(history, [WEATHER], own)  # the template's own format gets the raw data
    assert render_chat(own, messages, **extra) == "[get_weather]user:weather in Paris?|assistant:P|tool:sunny|"


# ---------------------------------------------------------------------------- through the app (fake engine)

def scripted_engine(tools: list[dict], output: str) -> FakeEngine:
    engine = FakeEngine(max_model_len=2048, num_pages=300)  # the tools' description makes a long prompt
    messages, extra = render_messages(MESSAGES, tools, engine.tokenizer.chat_template)
    engine.scripts[render_chat(engine.tokenizer.chat_template, messages, **extra)] = output
    return engine


@async_test
async def test_tool_calls_through_the_app_streamed_and_not():
    output = "Checking. " + CALL + CALL.replace("Paris", "Oslo")
    async with serving(scripted_engine([WEATHER], output)) as c:
        body = {"messages": MESSAGES, "tools": [WEATHER], "max_tokens": 200}
        whole = await (await c.post("/v1/chat/completions", json=body)).json()
        choice = whole["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Checking."
        calls = choice["message"]["tool_calls"]
        assert [(t["type"], t["function"]["name"], json.loads(t["function"]["arguments"])) for t in calls] == \
            [("function", "get_weather", {"city": "Paris"}), ("function", "get_weather", {"city": "Oslo"})]
        assert len({t["id"] for t in calls}) == 2

        events, _ = await read_sse(await c.post("/v1/chat/completions", json={**body, "stream": True}))
        chunks = [e for e in events if e != "[DONE]"]
        content, assembled, finish = "", {}, None
        for e in chunks:
            delta = e["choices"][0]["delta"]
            content += delta.get("content") or ""
            for d in delta.get("tool_calls", []):
                slot = assembled.setdefault(d["index"], {"id": None, "name": "", "arguments": ""})
                slot["id"] = d.get("id") or slot["id"]
                slot["name"] += d.get("function", {}).get("name", "")
                slot["arguments"] += d.get("function", {}).get("arguments", "")
            finish = e["choices"][0]["finish_reason"] or finish
        assert finish == "tool_calls" and content == "Checking."
        assert [(s["name"], s["arguments"]) for s in assembled.values()] == \
            [(t["function"]["name"], t["function"]["arguments"]) for t in calls]
        assert all(s["id"].startswith("call_") for s in assembled.values())
        assert not any("<tool_call>" in (e["choices"][0]["delta"].get("content") or "") for e in chunks)


@async_test
async def test_tool_choice_none_and_no_tools_leave_text_alone():
    async with serving(scripted_engine([], CALL)) as c:
        body = {"messages": MESSAGES, "max_tokens": 200}
        whole = await (await c.post("/v1/chat/completions", json=body)).json()
        assert whole["choices"][0]["message"]["content"] == CALL and whole["choices"][0]["finish_reason"] == "stop"
        whole = await (await c.post("/v1/chat/completions", json={**body, "tools": [WEATHER],
                                                                   "tool_choice": "none"})).json()
        assert whole["choices"][0]["message"]["content"] == CALL  # the model never saw the tools: same prompt


@async_test
async def test_unknown_field_is_a_400_over_http():
    async with serving() as c:
        resp = await c.post("/v1/chat/completions", json={"messages": MESSAGES, "reasoning_effort": "high"})
        assert resp.status == 400 and error_of(await resp.json())["param"] == "reasoning_effort"
        resp = await c.post("/v1/chat/completions", json={"messages": MESSAGES, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "required": "a"}}}})
        err = error_of(await resp.json())
        assert resp.status == 400 and err["param"] == "response_format.json_schema.schema"
        assert "required" in err["message"]


def test_batch_front_end_parses_tool_calls(tmp_path):
    from jaxserve.server.batch import run_batch

    engine = scripted_engine([WEATHER], "Checking. " + CALL)
    engine.step = lambda: time.sleep(0.001) or True  # the fake steps on its own thread; the batch loop only polls
    engine.start()
    try:
        (tmp_path / "in.jsonl").write_text(json.dumps({"custom_id": "a", "url": "/v1/chat/completions", "body": {
            "messages": MESSAGES, "tools": [WEATHER], "max_tokens": 200}}) + "\n")
        run_batch(engine, tmp_path / "in.jsonl", tmp_path / "out.jsonl", model="fake", progress=False)
    finally:
        engine.shutdown()
    choice = json.loads((tmp_path / "out.jsonl").read_text())["response"]["body"]["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] == "Checking."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in
            choice["message"]["tool_calls"]] == [("get_weather", {"city": "Paris"})]


def test_vllm_tool_flags(capsys):
    from jaxserve.server.__main__ import configs_from_args, parse_args

    configs_from_args(parse_args(["m", "--enable-auto-tool-choice", "--tool-call-parser", "hermes"]))
    with pytest.raises(SystemExit):
        parse_args(["m", "--tool-call-parser", "mistral"])
    assert "--tool-call-parser" in capsys.readouterr().err
