"""Grammars on llguidance (no JAX): compile errors name what is wrong, matchers follow tokens and fill bitmasks,
speculative proposals roll back, and the manager combines a grammar with allowed_token_ids."""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxserve.core.request import Request
from jaxserve.core.sampling_params import SamplingParams, SamplingParamsError
from jaxserve.core.structured_outputs import StructuredOutputsParams as SO
from jaxserve.text.grammar import GrammarCompiler, bitmask_to_ids, ids_to_bitmask
from jaxserve.text.structured_output_manager import StructuredOutputManager

VOCAB = 49152 + 40  # the model's vocabulary may be wider than the tokenizer's: the extra ids are never allowed
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer():
    from jaxserve.model_registry import resolve_model
    from jaxserve.text.tokenizer import load_tokenizer

    return load_tokenizer(resolve_model("SmolLM2-135M-Instruct"))


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, VOCAB)


def allowed(matcher, width) -> set[int]:
    out = np.empty(width, np.int32)
    matcher.fill(out)
    return set(bitmask_to_ids(out, VOCAB).tolist())


def test_bitmask_helpers_round_trip():
    ids = [0, 31, 32, 33, 1000, VOCAB - 1]
    mask = ids_to_bitmask(ids, VOCAB)
    assert mask.shape == (-(-VOCAB // 32),) and mask.dtype == np.int32
    assert bitmask_to_ids(mask, VOCAB).tolist() == ids
    assert mask[0] == np.int32(-2**31 + 1)  # bits 0 and 31: the sign bit is a token too


@pytest.mark.parametrize("so, words", [
    (SO(json={"type": "objekt"}), ["json", "objekt"]),
    (SO(json='{"type": "object", '), ["json", "invalid"]),
    (SO(json='[1, 2]'), ["json", "object or a boolean"]),
    (SO(json={"type": "string", "pattern": "(("}), ["json", "unclosed group"]),
    (SO(regex="a(b"), ["regex", "unclosed group"]),
    (SO(grammar="start: foo"), ["grammar", "foo"]),
    (SO(grammar="start: ("), ["grammar"]),
    (SO(choice=()), ["choice", "non-empty"]),
    (SO(choice=("a", "")), ["choice", "non-empty"]),
])
def test_bad_constraints_are_refused_naming_what_is_wrong(compiler, so, words):
    with pytest.raises(SamplingParamsError) as e:
        compiler.compile(so)
    assert e.value.field == "structured_outputs"
    for word in words:
        assert word in str(e.value)


def test_a_compile_over_the_time_limit_is_refused(tokenizer):
    slow = GrammarCompiler(tokenizer, VOCAB, max_compile_seconds=1e-9)
    with pytest.raises(SamplingParamsError, match="longer than .* to compile"):
        slow.compile(SO(json=SCHEMA))


def test_compiles_are_cached_by_content(compiler):
    a = compiler.compile(SO(json=SCHEMA))
    assert compiler.compile(SO(json=json.dumps(SCHEMA, indent=2))) is a  # same schema, other text
    assert compiler.compile(SO(json={**SCHEMA, "required": ["name"]})) is not a


def test_matcher_follows_tokens_to_a_complete_json(compiler, tokenizer):
    m = compiler.matcher(SO(json=SCHEMA))
    first = allowed(m, compiler.width)
    assert first and all(tokenizer.decode([t]).startswith("{") for t in first)
    text = '{"name": "Bo", "age": 7}'
    ids = tokenizer.encode(text, add_special_tokens=False)
    for i in range(1, len(ids) + 1):
        assert m.sync(ids[:i])  # one token at a time, as decode steps give them
    assert m.is_stopped and allowed(m, compiler.width) == set(tokenizer.eog_ids)
    # A fresh matcher: the compiled one is never advanced.
    assert allowed(compiler.matcher(SO(json=SCHEMA)), compiler.width) == first


def test_a_token_against_the_grammar_is_an_error(compiler, tokenizer):
    m = compiler.matcher(SO(regex="[0-9]+"))
    assert not m.sync(tokenizer.encode("x", add_special_tokens=False))
    assert m.error


def test_proposals_are_checked_and_rolled_back(compiler, tokenizer):
    m = compiler.matcher(SO(choice=("yes please", "no")))
    ids = tokenizer.encode("yes please", add_special_tokens=False)
    assert len(ids) >= 2
    before = allowed(m, compiler.width)
    out = np.empty(compiler.width, np.int32)
    assert m.fill_after(ids[:1], out)
    assert set(bitmask_to_ids(out, VOCAB).tolist()) and set(bitmask_to_ids(out, VOCAB).tolist()) != before
    assert allowed(m, compiler.width) == before  # rolled back
    bad = tokenizer.encode("maybe", add_special_tokens=False)
    assert not m.fill_after(bad, out) and (out == -1).all()  # never reached: anything goes
    assert m.valid_prefix(ids + bad) == len(ids)
    assert allowed(m, compiler.width) == before


def test_verify_rows_in_one_pass_equal_rows_one_by_one(tokenizer):
    """A verify step's rows (after 0..k proposals) come from one pass over the proposals, as one by one would."""
    manager = StructuredOutputManager(tokenizer, VOCAB)
    so = SO(json=SCHEMA)
    req = Request("v", [1], SamplingParams(structured_outputs=so))
    manager.add(req)
    req.output_token_ids = tokenizer.encode('{"name": "', add_special_tokens=False)
    req.spec_token_ids = tokenizer.encode('Al", "age', add_special_tokens=False) + tokenizer.encode(
        "}", add_special_tokens=False)  # the last one breaks the grammar
    rows = [manager.bitmask(req, req.spec_token_ids[:j]).copy() for j in range(len(req.spec_token_ids) + 1)]
    reference = manager.compiler.matcher(so)
    reference.sync(req.output_token_ids)
    out = np.empty(manager.width, np.int32)
    for j, row in enumerate(rows):
        reference.fill_after(req.spec_token_ids[:j], out)
        np.testing.assert_array_equal(row, out)
    assert (rows[-1] == -1).all() and not (rows[-2] == -1).all()
    assert set(bitmask_to_ids(manager.bitmask(req), VOCAB).tolist()) == set(bitmask_to_ids(rows[0], VOCAB).tolist())


def test_choice_allows_exactly_the_choices(compiler, tokenizer):
    m = compiler.matcher(SO(choice=('say "hi"', "no")))
    ids = tokenizer.encode('say "hi"', add_special_tokens=False)
    assert m.valid_prefix(ids) == len(ids)
    assert m.valid_prefix(tokenizer.encode("nope", add_special_tokens=False)) < 2


def test_manager_combines_a_grammar_with_allowed_token_ids(tokenizer):
    manager = StructuredOutputManager(tokenizer, VOCAB)
    digits = [tokenizer.encode(str(d), add_special_tokens=False)[0] for d in range(10)]
    params = SamplingParams(structured_outputs=SO(regex="[0-9]{2}"), allowed_token_ids=digits[:3])
    manager.validate(params)
    req = Request("r", [1, 2], params)
    manager.add(req)
    assert set(bitmask_to_ids(manager.bitmask(req), VOCAB).tolist()) == set(digits[:3])
    free = Request("f", [1], SamplingParams())
    manager.add(free)
    assert manager.bitmask(free) is None and not manager.is_constrained("f")
    req.output_token_ids = digits[:1]
    req.spec_token_ids = [digits[2], digits[5]]  # the second breaks allowed_token_ids
    manager.truncate_proposals([req])
    assert req.spec_token_ids == [digits[2]]
    req.output_token_ids = digits[:2]
    assert manager.grammar_done(req)
    # Nothing in common: only end-of-generation tokens, so the request ends instead of sampling anything.
    clash = Request("c", [1], SamplingParams(structured_outputs=SO(regex="[0-9]"), allowed_token_ids=(100,)))
    manager.add(clash)
    assert set(bitmask_to_ids(manager.bitmask(clash), VOCAB).tolist()) == set(tokenizer.eog_ids)
    with pytest.raises(SamplingParamsError, match="allowed_token_ids"):
        manager.validate(SamplingParams(allowed_token_ids=(VOCAB,)))
    with pytest.raises(SamplingParamsError, match="allowed_token_ids"):
        SamplingParams(allowed_token_ids=())


@pytest.mark.parametrize("threads", [1, 2])
def test_prefetched_masks_equal_masks_computed_on_the_spot(tokenizer, threads):
    """Sequential (1 thread) or llguidance's parallel executor: the same rows; a request that moved on since
    its prefetch gets a fresh row."""
    manager = StructuredOutputManager(tokenizer, VOCAB, mask_threads=threads, prefetch=True)
    sos = [SO(json=SCHEMA), SO(regex="[0-9]{2}"), SO(choice=("yes", "no")), SO(json_object=True), SO(json=SCHEMA)]
    texts = ['{"name": "A', "4", "", "{", '{"name": "B", "age": 1']
    reqs = []
    for i, (so, text) in enumerate(zip(sos, texts)):
        req = Request(f"r{i}", [1, 2], SamplingParams(structured_outputs=so, allowed_token_ids=None))
        req.output_token_ids = tokenizer.encode(text, add_special_tokens=False)
        req.num_computed_tokens = req.num_tokens - 1  # decoding: its next step samples
        manager.add(req)
        reqs.append(req)
    manager.prefetch(reqs)
    got = [manager.bitmask(r) for r in reqs]
    assert manager.stats.prefetched_rows == len(reqs)
    for req, so, row in zip(reqs, sos, got):
        fresh = manager.compiler.matcher(so)
        assert fresh.sync(req.output_token_ids)
        assert set(bitmask_to_ids(row, VOCAB).tolist()) == allowed(fresh, manager.width)
    manager.prefetch(reqs)
    reqs[1].output_token_ids = reqs[1].output_token_ids + tokenizer.encode("2", add_special_tokens=False)
    assert set(bitmask_to_ids(manager.bitmask(reqs[1]), VOCAB).tolist()) == set(tokenizer.eog_ids)
    assert manager.stats.prefetched_rows == len(reqs)  # that one was not the prefetched row
