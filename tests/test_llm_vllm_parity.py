"""The offline `LLM` takes vLLM's calls: prompt dicts, get_tokenizer, chat templates, and SamplingParams'
skip_special_tokens, include_stop_str_in_output, bad_words, truncate_prompt_tokens; outputs carry
cumulative_logprob and stop_reason.

On the tiny random checkpoint (SmolLM2's tokenizer), with greedy decoding, so every expectation follows from
a plain greedy run; bad_words and logit_bias must compile nothing after warm-up.
"""

from __future__ import annotations

import math

import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.core.sampling_params import SamplingParamsError

GREEDY = dict(temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), max_num_seqs=2, max_num_batched_tokens=16, kv_cache_memory=8 * 2**20,
               max_model_len=64)


def run(llm, prompt, **params):
    return llm.generate(prompt, SamplingParams(**{**GREEDY, **params}), use_tqdm=False)[0]


def test_prompt_forms_tokenizer_and_truncation(llm):
    tok = llm.get_tokenizer()
    assert tok is llm.tokenizer
    ids = tok.encode("The quick brown fox")
    plain = run(llm, ids, max_tokens=6)
    assert run(llm, {"prompt_token_ids": ids}, max_tokens=6).outputs[0].token_ids == plain.outputs[0].token_ids
    assert run(llm, {"prompt": "The quick brown fox"}, max_tokens=6).outputs[0].token_ids == \
        run(llm, "The quick brown fox", max_tokens=6).outputs[0].token_ids
    cut = run(llm, ids, max_tokens=6, truncate_prompt_tokens=2)
    assert cut.prompt_token_ids == ids[-2:]
    assert cut.outputs[0].token_ids == run(llm, ids[-2:], max_tokens=6).outputs[0].token_ids
    with pytest.raises(ValueError, match="prompt_token_ids"):
        llm.generate({"tokens": ids}, use_tqdm=False)
    # vLLM's allowed_token_ids: only those ids are sampled (a token bitmask; docs/structured-output.md)
    only = run(llm, ids, max_tokens=4, allowed_token_ids=[ids[1], ids[2]], temperature=1.0, seed=0)
    assert set(only.outputs[0].token_ids) <= {ids[1], ids[2]}
    with pytest.raises(SamplingParamsError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=())


def test_stop_strings_stop_reason_and_cumulative_logprob(llm):
    base = run(llm, "Hello there", max_tokens=12, logprobs=0).outputs[0]
    assert base.stop_reason is None and base.finish_reason == "length"
    assert math.isclose(base.cumulative_logprob, sum(e.logprob for e in base.logprobs), rel_tol=1e-6)
    assert run(llm, "Hello there", max_tokens=12).outputs[0].cumulative_logprob is None
    text = base.text
    assert len(text) > 6
    stop = text[3:6]
    at = text.find(stop)
    cut = run(llm, "Hello there", max_tokens=12, stop=[stop]).outputs[0]
    assert (cut.text, cut.finish_reason, cut.stop_reason) == (text[:at], "stop", stop)
    kept = run(llm, "Hello there", max_tokens=12, stop=[stop], include_stop_str_in_output=True).outputs[0]
    assert kept.text == text[:at + len(stop)] and kept.stop_reason == stop
    token = base.token_ids[2]
    by_id = run(llm, "Hello there", max_tokens=12, stop_token_ids=[token]).outputs[0]
    assert by_id.finish_reason == "stop" and by_id.stop_reason == token


def test_special_tokens_and_bad_words_compile_nothing(llm):
    compiled = llm.engine.runner.num_compiled()
    tok = llm.get_tokenizer()
    eos = sorted(tok.eog_ids)[0]
    special = tok.decode([eos], skip_special_tokens=False)
    forced = dict(max_tokens=3, logit_bias={eos: 100.0})
    assert special and special in run(llm, "Hi", skip_special_tokens=False, **forced).outputs[0].text
    assert special not in run(llm, "Hi", **forced).outputs[0].text
    base = run(llm, "Once upon", max_tokens=4).outputs[0]
    word = tok.decode([base.token_ids[0]])
    banned = run(llm, "Once upon", max_tokens=4, bad_words=[word]).outputs[0]
    assert banned.token_ids[0] != base.token_ids[0]
    assert all(t not in tok.encode(word.strip(), add_special_tokens=False)[-1:] for t in banned.token_ids[:1])
    assert llm.engine.runner.num_compiled() == compiled == len(llm.engine.runner.buckets.shapes())


def test_chat_takes_a_template_and_add_generation_prompt(llm):
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    messages = [{"role": "user", "content": "hi"}]
    without = llm.chat(messages, SamplingParams(max_tokens=2, **GREEDY), chat_template=template,
                       add_generation_prompt=False, use_tqdm=False)[0]
    with_prompt = llm.chat(messages, SamplingParams(max_tokens=2, **GREEDY), chat_template=template,
                           use_tqdm=False)[0]
    assert (without.prompt, with_prompt.prompt) == ("[hi]", "[hi]>")
