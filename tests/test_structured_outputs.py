"""Structured outputs through `LLM.generate` on the tiny random model: a random model is the hard case, since
nothing but the mask keeps its output valid. Each composition the engine offers (n > 1, seeds, stop strings,
logprobs, min_tokens, ignore_eos, chunked prefill, prefix caching, preemption, speculative decoding) is run
with constrained rows, and every output must be a valid one (or, cut by max_tokens, a valid prefix)."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.core.sampling_params import SamplingParamsError
from jaxserve.core.structured_outputs import StructuredOutputsParams as SO

ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128, num_pages=40, block_size=16,
              warmup=False)
SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99},
                                           "tag": {"enum": ["a", "bc"]}},
          "required": ["ok", "n", "tag"], "additionalProperties": False}
CHOICES = ("yes", "no", "maybe so")
PROMPTS = ["Answer:", "The result is", "x" * 5]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint), **ENGINE)
    # NOTE: masks computed ahead on the worker thread here (the default on machines with cores to spare); the
    # other engines of this module compute them on the spot (this 2-core machine's default), so both run.
    llm.engine.structured.prefetch_enabled = True
    return llm


def valid_prefix(llm, so: SO, token_ids) -> bool:
    """The tokens are all accepted by the constraint's grammar (an output cut short by max_tokens)."""
    matcher = llm.engine.structured.compiler.matcher(so)
    return matcher.valid_prefix(list(token_ids)) == len(token_ids)


def check(llm, so: SO, completion, *, full: bool | None = None) -> None:
    """A finished ("stop") completion is valid as a whole; a cut one ("length") is a valid prefix."""
    assert valid_prefix(llm, so, completion.token_ids), (completion.text, completion.token_ids)
    if full is False or completion.finish_reason != "stop":
        return
    text = completion.text
    if so.choice is not None:
        assert text in so.choice
    elif so.regex is not None:
        assert re.fullmatch(so.regex, text), text
    elif so.json is not None:
        jsonschema.validate(json.loads(text), so.json)
    elif so.json_object:
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("so", [SO(choice=CHOICES), SO(regex=r"[0-9]{2}-[a-c]{1,3}"), SO(json=SCHEMA),
                                SO(grammar='start: "(" item ("," item)* ")"\nitem: /[a-z]/ | start')],
                         ids=["choice", "regex", "json", "lark"])
def test_constrained_outputs_of_a_random_model_are_valid(llm, so):
    params = [SamplingParams(max_tokens=40, temperature=0.0, structured_outputs=so),
              SamplingParams(max_tokens=40, temperature=1.0, n=3, seed=5, structured_outputs=so),
              SamplingParams(max_tokens=8, temperature=0.0)]  # a free row in the same batch
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    for out in outs[:2]:
        for completion in out.outputs:
            check(llm, so, completion)
    if so.choice is not None:  # short: every one finishes
        assert all(c.finish_reason == "stop" for o in outs[:2] for c in o.outputs)
    assert llm.engine.kv_cache.pool.num_used_pages == 0
    assert llm.engine.structured.stats.prefetched_rows > 0


def test_json_object_is_a_json_object(llm):
    so = SO(json_object=True)
    out = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=60, temperature=0.0, structured_outputs=so),
                       use_tqdm=False)[0].outputs[0]
    check(llm, so, out)
    assert out.text.startswith("{")


def test_seeded_constrained_sampling_is_reproducible(llm):
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=11, n=2, structured_outputs=SO(json=SCHEMA))
    a = llm.generate(PROMPTS[:1], params, use_tqdm=False)[0]
    b = llm.generate(PROMPTS[:1] * 2, [params, SamplingParams(max_tokens=3)], use_tqdm=False)[0]
    assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]


def test_allowed_token_ids_restrict_every_token(llm):
    allowed = (11, 200, 3000, 49151)
    out = llm.generate(PROMPTS, [SamplingParams(max_tokens=12, temperature=1.0, seed=s, allowed_token_ids=allowed)
                                 for s in range(3)], use_tqdm=False)
    tokens = {t for o in out for t in o.outputs[0].token_ids}
    assert tokens <= set(allowed) and len(tokens) > 1


def test_logprobs_report_the_raw_distribution(llm):
    """Log-probs (and their top alternatives) are the model's own, before the grammar's mask."""
    free = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=1, temperature=0.0, logprobs=5),
                        use_tqdm=False)[0].outputs[0]
    so = SO(choice=CHOICES)
    out = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=10, temperature=0.0, logprobs=5,
                                                   structured_outputs=so), use_tqdm=False)[0].outputs[0]
    first, free_first = out.logprobs[0], free.logprobs[0]
    assert [t for t, _ in first.top] == [t for t, _ in free_first.top]  # the same raw top-5
    assert out.token_ids[0] != free.token_ids[0]  # the random model's favourite is no choice's start
    assert first.logprob < free_first.logprob  # the chosen token's raw log-prob, not renormalised over the mask


def test_stop_strings_min_tokens_and_ignore_eos_compose(llm):
    so = SO(choice=CHOICES)
    # min_tokens past the grammar's end: the complete grammar wins (its end-of-generation token is allowed).
    # ignore_eos: the request still ends once the grammar is complete and its end token came.
    outs = llm.generate(PROMPTS[:2] * 2, [
        SamplingParams(max_tokens=20, temperature=0.0, min_tokens=10, structured_outputs=so),
        SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, structured_outputs=so),
        SamplingParams(max_tokens=20, temperature=0.0, stop=["a"], structured_outputs=SO(choice=("banana",))),
        SamplingParams(max_tokens=20, temperature=0.0, structured_outputs=so)], use_tqdm=False)
    for out in (outs[0], outs[1], outs[3]):
        assert out.outputs[0].finish_reason == "stop" and out.outputs[0].text in CHOICES
    assert outs[2].outputs[0].text == "b" and outs[2].outputs[0].finish_reason == "stop"


def test_bad_constraints_fail_before_any_compute(llm):
    steps = llm.engine.stats.steps
    with pytest.raises(SamplingParamsError, match="structured_outputs.json is invalid"):
        llm.generate(PROMPTS, SamplingParams(structured_outputs=SO(json={"type": "nope"})), use_tqdm=False)
    with pytest.raises(SamplingParamsError, match="allowed_token_ids"):
        llm.generate(PROMPTS, SamplingParams(allowed_token_ids=(10**6,)), use_tqdm=False)
    assert llm.engine.stats.steps == steps and not llm.engine.has_unfinished()
    # A bad constraint on the second prompt: the first one, already submitted, is withdrawn.
    with pytest.raises(SamplingParamsError, match="structured_outputs.regex is invalid"):
        llm.generate(PROMPTS[:2], [SamplingParams(max_tokens=4), SamplingParams(structured_outputs=SO(regex="("))],
                     use_tqdm=False)
    llm.engine.step()  # drains the withdrawal
    assert not llm.engine.has_unfinished() and llm.engine.stats.steps == steps  # no model step ran


def greedy_outputs(llm, prompts, so, max_tokens=30):
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, structured_outputs=so)
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


def test_chunked_prefill_prefix_caching_and_preemption_keep_the_same_constrained_tokens(llm, tiny_checkpoint):
    so = SO(json=SCHEMA)
    long_prompts = [f"{i} " + "lorem ipsum " * 10 for i in range(4)]  # > 32 tokens: chunked prefill
    first = greedy_outputs(llm, long_prompts, so)
    hits = llm.engine.kv_cache.prefix_hits
    again = greedy_outputs(llm, long_prompts, so)  # the prompts' pages now come from the prefix cache
    assert llm.engine.kv_cache.prefix_hits > hits
    assert [c.token_ids for c in again] == [c.token_ids for c in first]
    tiny = LLM(str(tiny_checkpoint), **{**ENGINE, "num_pages": 12})  # 4 requests need ~16 pages: preemption
    tiny.engine.structured.prefetch_enabled = False
    squeezed = greedy_outputs(tiny, long_prompts, so)
    assert tiny.engine.scheduler.stats().num_preemptions > 0
    assert [c.token_ids for c in squeezed] == [c.token_ids for c in first]
    for c in first:
        check(llm, so, c)


def test_speculative_proposals_are_checked_against_the_grammar(llm, tiny_checkpoint):
    """n-gram proposals on a repetitive grammar: accepted ones never break it, and the tokens are greedy's."""
    so = SO(regex=r"(ab ){8}c")
    spec = LLM(str(tiny_checkpoint), speculative_method="ngram", num_speculative_tokens=3, **ENGINE)
    prompts = ["ab ab ab ab ab", "ab ab ab cd", "x"]
    plain = greedy_outputs(llm, prompts, so, max_tokens=24)
    got = greedy_outputs(spec, prompts, so, max_tokens=24)
    assert [c.token_ids for c in got] == [c.token_ids for c in plain]
    assert spec.engine.spec.stats.num_accepted_tokens > 0
    for c in got:
        check(spec, so, c)
    # Proposals the grammar rejects are cut before the verify step.
    req_so = SO(choice=("ab ab ab",))
    outs = spec.generate(PROMPTS[:1], SamplingParams(max_tokens=10, temperature=0.0, structured_outputs=req_so),
                         use_tqdm=False)
    assert outs[0].outputs[0].text == "ab ab ab"


def test_a_draft_model_proposes_under_the_grammar_too(llm, tiny_checkpoint):
    """The draft's own sampling gets the same masks: its proposals are valid, the target accepts them, and the
    output is valid for greedy and sampled rows (the draft here is the target itself)."""
    spec = LLM(str(tiny_checkpoint), speculative_model=str(tiny_checkpoint), num_speculative_tokens=2, **ENGINE)
    so = SO(json=SCHEMA)
    plain = greedy_outputs(llm, PROMPTS[:2], so, max_tokens=20)
    assert [c.token_ids for c in greedy_outputs(spec, PROMPTS[:2], so, max_tokens=20)] == [
        c.token_ids for c in plain]
    sampled = spec.generate(PROMPTS[:2], SamplingParams(max_tokens=20, temperature=1.0, seed=2, structured_outputs=so),
                            use_tqdm=False)
    for out in sampled:
        check(spec, so, out.outputs[0])
    stats = spec.engine.spec.stats
    assert stats.num_draft_tokens > 0 and stats.num_accepted_tokens == stats.num_draft_tokens


# ---------------------------------------------------------------------------- the real model

REAL_SCHEMAS = [
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                      "age": {"type": "integer", "minimum": 0, "maximum": 150}},
     "required": ["name", "age"], "additionalProperties": False},
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                      "sunny": {"type": "boolean"},
                                      "temps": {"type": "array", "items": {"type": "number"}, "maxItems": 3}},
     "required": ["city", "sunny", "temps"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "shade": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 8}]}},
     "required": ["color", "shade"], "additionalProperties": False},
]


@pytest.mark.slow
def test_the_real_model_writes_output_that_validates():
    """SmolLM2-135M: JSON that parses and validates against its schema (greedy and sampled), a regex, a choice."""
    from jaxserve.text.chat_template import render_chat

    llm = LLM("SmolLM2-135M-Instruct", max_num_seqs=8, max_num_batched_tokens=256, max_model_len=512,
              num_pages=64, block_size=16, warmup=False)

    def chat(text):
        return render_chat(llm.get_tokenizer().chat_template, [{"role": "user", "content": text}])

    cases = [(chat(f"Reply in JSON: {q}"), SO(json=schema)) for q, schema in zip(
        ["a person called Ann, 31", "the weather in Paris", "your favourite colour"], REAL_SCHEMAS)]
    cases += [(chat("What is the date of the moon landing? Use YYYY-MM-DD."), SO(regex=r"\d{4}-\d{2}-\d{2}")),
              (chat("Is the sky blue? Answer yes or no."), SO(choice=("yes", "no")))]
    params = [SamplingParams(max_tokens=64, temperature=t, seed=3, structured_outputs=so)
              for t in (0.0, 0.7) for _, so in cases]
    outs = llm.generate([p for p, _ in cases] * 2, params, use_tqdm=False)
    for out, p in zip(outs, params):
        completion = out.outputs[0]
        assert completion.finish_reason == "stop", (completion.text, p)
        check(llm, p.structured_outputs, completion)
