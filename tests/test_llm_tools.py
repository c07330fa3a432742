"""`LLM.chat(messages, tools=...)`: the tools reach the prompt in the default format, forced calls are
constrained so their arguments validate, and the calls come back parsed in `CompletionOutput.tool_calls`.

On the tiny random checkpoint (SmolLM2's tokenizer): the model knows nothing, so whatever it writes under
"required" or a named function is a valid call only because of the constraint.
"""

from __future__ import annotations

import json

import jsonschema
import pytest

from jaxserve import LLM, SamplingParams

# NOTE: short tools: the tiny model's context is 256 tokens and the default format describes them in the prompt
WEATHER = {"type": "function", "function": {
    "name": "weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}},
                                      "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "time", "parameters": {"type": "object", "properties": {"tz": {"enum": ["UTC", "CET"]}},
                                   "required": ["tz"]}}}
ASK = [{"role": "user", "content": "Weather in Paris?"}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, TIME)}


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), max_num_seqs=2, max_num_batched_tokens=64, kv_cache_memory=16 * 2**20,
               max_model_len=256, warmup=False)


def test_llm_chat_with_tools(llm):
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=40)
    for choice, names in (("required", {"weather", "time"}), ({"type": "function", "function": {"name": "time"}},
                                                                {"time"}), ("weather", {"weather"})):
        out = llm.chat(ASK, params, tools=[WEATHER, TIME], tool_choice=choice, parallel_tool_calls=False,
                       use_tqdm=False)[0].outputs[0]
        assert out.finish_reason == "stop" and len(out.tool_calls) == 1, out.text
        call = out.tool_calls[0]
        assert call.name in names and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])

    prompt = llm.render_chat(ASK, tools=[WEATHER])
    assert "<tools>" in prompt and '"name": "weather"' in prompt and prompt.index("<tools>") < prompt.index(
        "Weather in Paris")
    auto = llm.chat(ASK, SamplingParams(temperature=0, max_tokens=8), tools=[WEATHER], use_tqdm=False)[0]
    assert auto.outputs[0].tool_calls == []  # free text (the random model writes no tagged call): parsed, none found
    plain = llm.chat(ASK, SamplingParams(temperature=0, max_tokens=8), tools=[WEATHER], tool_choice="none",
                     use_tqdm=False)[0]
    assert plain.outputs[0].tool_calls is None
    assert len(plain.prompt_token_ids) < len(auto.prompt_token_ids)  # "none": the model is not shown the tools
    with pytest.raises(ValueError, match="tool_choice"):
        llm.chat(ASK, params, tools=[WEATHER], tool_choice="nope", use_tqdm=False)
