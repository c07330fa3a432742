"""No valid request compiles a step after warm-up (issue 20, item 4): whatever its sampling parameters hold
(the largest logit_bias OpenAI allows, min_tokens with every stop_token_id allowed, logprobs, prompt logprobs,
bad_words, stop strings, truncation, penalties, n, a grammar or allowed_token_ids: constrained rows beside free
ones), every step it takes runs one of the executables warm-up compiled. On the tiny random model: a few seconds."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxserve import LLM, SamplingParams
from jaxserve.core.sampling_params import SamplingParamsError
from jaxserve.core.structured_outputs import StructuredOutputsParams as SO

VOCAB = 256  # ids below this are valid in the tiny model (its vocabulary is SmolLM2's, 49,152)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint), max_num_seqs=4, max_num_batched_tokens=32, max_model_len=128, num_pages=40,
               block_size=16)


def _ids(n: int) -> st.SearchStrategy:
    return st.lists(st.integers(0, VOCAB - 1), max_size=n, unique=True)


PARAMS = st.builds(
    SamplingParams,
    n=st.integers(1, 3), temperature=st.sampled_from([0.0, 0.7, 1.5]), top_k=st.sampled_from([0, 1, 40]),
    top_p=st.sampled_from([1.0, 0.9, 0.1]), min_p=st.sampled_from([0.0, 0.2]),
    repetition_penalty=st.sampled_from([1.0, 1.3]), presence_penalty=st.sampled_from([0.0, -1.0, 2.0]),
    frequency_penalty=st.sampled_from([0.0, 1.0]),
    # NOTE: bad_words share the bias table's fixed width (the full table is the test above)
    logit_bias=st.one_of(st.none(), _ids(SamplingParams.MAX_LOGIT_BIAS - 20).map(lambda ids: {t: 5.0 for t in ids})),
    bad_words=st.lists(st.sampled_from(["hello", " world", "foo bar", "the"]), max_size=2).map(tuple),
    stop=st.lists(st.sampled_from(["\n", "the", "zz", "."]), max_size=2).map(tuple),
    include_stop_str_in_output=st.booleans(), skip_special_tokens=st.booleans(),
    truncate_prompt_tokens=st.one_of(st.none(), st.integers(1, 40)),
    prompt_logprobs=st.one_of(st.none(), st.integers(0, 3)),
    seed=st.one_of(st.none(), st.integers(0, 2**40)),
    stop_token_ids=_ids(SamplingParams.MAX_STOP_TOKEN_IDS).map(tuple),
    ignore_eos=st.booleans(), max_tokens=st.integers(2, 4), min_tokens=st.integers(0, 2),
    logprobs=st.one_of(st.none(), st.integers(0, SamplingParams.MAX_LOGPROBS)))
# Constrained rows: a grammar (the [R, ceil(V/32)] token bitmask input) or allowed_token_ids, or neither.
CONSTRAINTS = st.sampled_from([{}, {"structured_outputs": SO(choice=("yes", "no"))},
                               {"structured_outputs": SO(json={"type": "object"})},
                               {"structured_outputs": SO(regex="[a-z]{1,4}")}, {"allowed_token_ids": (5, 9, 200)}])
PARAMS = st.tuples(PARAMS, CONSTRAINTS).map(lambda pc: dataclasses.replace(pc[0], **pc[1]))


def test_the_largest_bias_and_stop_tables_run_on_warm_up_executables(llm):
    compiled = llm.engine.runner.num_compiled()
    full = SamplingParams(max_tokens=3, min_tokens=3, temperature=0.8, seed=1,
                          logit_bias={t: -1.0 for t in range(SamplingParams.MAX_LOGIT_BIAS)},
                          stop_token_ids=tuple(range(100, 100 + SamplingParams.MAX_STOP_TOKEN_IDS)))
    out = llm.generate([[1, 2, 3], [4, 5]], [full, SamplingParams(max_tokens=3)], use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in out] == [3, 3]
    assert not set(out[0].outputs[0].token_ids) & set(full.stop_token_ids)  # banned before min_tokens
    assert llm.engine.runner.num_compiled() == compiled
    with pytest.raises(SamplingParamsError, match="logit_bias"):
        SamplingParams(logit_bias={t: 1.0 for t in range(SamplingParams.MAX_LOGIT_BIAS + 1)})


@settings(max_examples=12, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(params=st.lists(PARAMS, min_size=1, max_size=3), prompt_len=st.integers(1, 40))
def test_no_valid_request_compiles_after_warm_up(llm, params, prompt_len):
    compiled = llm.engine.runner.num_compiled()
    prompts = [[(7 * i + j) % VOCAB for j in range(prompt_len + i)] for i in range(len(params))]
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert all(1 <= len(c.token_ids) <= p.max_tokens for o, p in zip(outs, params) for c in o.outputs)
    assert llm.engine.runner.num_compiled() == compiled
    assert llm.engine.kv_cache.pool.num_used_pages == 0  # every page back (cached pages count as free)


def test_constrained_rows_beside_free_ones_run_on_warm_up_executables(llm):
    compiled = llm.engine.runner.num_compiled()
    so = SO(json={"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})
    params = [SamplingParams(max_tokens=6, temperature=0.8, seed=1, n=2, structured_outputs=so),
              SamplingParams(max_tokens=6), SamplingParams(max_tokens=6, allowed_token_ids=(3, 4)),
              SamplingParams(max_tokens=6, temperature=0.0, structured_outputs=SO(choice=("a", "b")))]
    out = llm.generate([[1, 2, 3], [4, 5], [6], list(range(40))], params, use_tqdm=False)
    assert set(out[2].outputs[0].token_ids) <= {3, 4}
    assert llm.engine.runner.num_compiled() == compiled


def test_a_request_that_can_never_fit_the_kv_cache_is_refused_before_it_starts(tiny_checkpoint):
    from jaxserve.engine import RequestTooLongError

    small = LLM(str(tiny_checkpoint), max_num_seqs=2, max_num_batched_tokens=16, max_model_len=128, num_pages=4,
                block_size=16, warmup=False)  # 3 usable pages: 48 tokens
    small.engine.validate(list(range(10)), SamplingParams(max_tokens=30))
    with pytest.raises(RequestTooLongError, match="KV pages"):  # the server answers 400, streaming or not
        small.engine.validate(list(range(10)), SamplingParams(max_tokens=60))
