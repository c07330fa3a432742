"""Speculative decoding: the n-gram proposer, the scheduler's verify chunks and rollback (fake model,
hypothesis), and greedy equality with non-speculative decoding on the real model for both methods."""

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxserve.core.kv_cache_manager import KVCacheManager
from jaxserve.core.request import Request
from jaxserve.core.sampling_params import SamplingParams
from jaxserve.core.scheduler import Scheduler, SchedulerConfig
from jaxserve.model.step_inputs import SeqChunk, StepBuckets, build_step_inputs
from jaxserve.spec_decode.decoder import SpecDecodeStats
from jaxserve.spec_decode.ngram_proposer import NgramProposer

VOCAB = 50
PS = 4


# ------------------------------------------------------------------------------------------ n-gram proposer

def test_ngram_proposes_the_continuation_of_the_longest_most_recent_match():
    p = NgramProposer(3, min_n=1, max_n=3)
    # Suffix [7, 8, 9] occurred at 0 (followed by 1, 2, 3); [8, 9] also at 6 (followed by 5); longest wins.
    assert p.propose([7, 8, 9, 1, 2, 3, 8, 9, 5, 7, 8, 9]) == [1, 2, 3]
    # Only the 1-gram [9] matches; its most recent earlier occurrence is at 4, followed by 6, 9.
    assert p.propose([1, 2, 3, 4, 9, 6, 9]) == [6, 9]
    assert p.propose([1, 2, 3, 4]) == []  # nothing repeats
    assert NgramProposer(3, min_n=2, max_n=3).propose([1, 2, 3, 4, 9, 6, 9]) == []  # 1-grams are off
    assert p.propose([5, 5, 5, 5], k=2) == [5]  # the match at 0 is followed by one token only
    assert p.propose([3]) == []


def test_verify_rows_get_their_proposals_logits_and_small_buckets():
    step = build_step_inputs([SeqChunk([1, 2, 3, 4, 5], 0, [1, 2]), SeqChunk([6, 7, 8], 10, [3, 4, 5, 6], num_spec=2)],
                             num_tokens=16, num_rows=4, page_size=4, max_pages_per_seq=8, logits_per_row=3)
    # Row 0 (a prefill chunk): its last token, repeated; row 1: its last known token, then both proposals.
    assert np.asarray(step.logits_indices).reshape(4, 3)[:2].tolist() == [[4, 4, 4], [5, 6, 7]]
    buckets = StepBuckets(8, 64, tokens_per_row=5)
    assert buckets.choose(5, 1) == (5, 1) and buckets.choose(9, 2) == (10, 2) and buckets.choose(3, 3) == (4, 4)
    assert set(StepBuckets(8, 64).shapes()) < set(buckets.shapes())  # the plain shapes are all still there
    # A verify-shaped bucket gives each row one query block of the next power of two >= L (its KV gathered
    # once for its 1 + K queries); the same rows padded into a mixed bucket keep prefill-sized blocks.
    chunks = [SeqChunk([1] * 5, 20, [1, 2, 3, 4, 5, 6, 7], num_spec=4), SeqChunk([2, 3], 9, [8, 9, 10])]
    verify = build_step_inputs(chunks, num_tokens=10, num_rows=2, page_size=4, max_pages_per_seq=8,
                               logits_per_row=5)
    assert verify.query_block == 8 and np.asarray(verify.qblock_lens)[:2].tolist() == [5, 2]
    mixed = build_step_inputs(chunks, num_tokens=32, num_rows=4, page_size=4, max_pages_per_seq=8, logits_per_row=5)
    assert mixed.query_block == 16


def test_stats_count_proposed_accepted_and_emitted_tokens():
    s = SpecDecodeStats(3)
    s.record(3, 4)  # all accepted + bonus
    s.record(3, 1)  # first rejected
    s.record(2, 2)
    s.record(0, 1)  # no proposals: not counted
    assert (s.num_drafts, s.num_draft_tokens, s.num_accepted_tokens, s.num_emitted_tokens) == (3, 8, 4, 7)
    assert s.acceptance_rate_per_position == [2 / 3, 1 / 3, 1 / 2] and s.mean_accepted_length == 7 / 3


# ---------------------------------------------------------------------------- scheduler with a fake model

def next_token(context):
    return sum(context) % VOCAB


class SpecFakeModel:
    """Writes every chunk's tokens into simulated pages through its page table, reads each verified
    position's context back through it, and accepts proposals greedily (next = sum(context) mod VOCAB)."""

    def __init__(self, num_pages):
        self.kv = np.full((num_pages, PS), -1, np.int64)

    def step(self, out):
        for c in out.chunks:
            for j, t in enumerate(c.token_ids):
                page = c.page_table[(c.start_pos + j) // PS]
                assert page != 0
                self.kv[page, (c.start_pos + j) % PS] = t
        sampled = {}
        for c in out.chunks:
            if not c.sample:
                continue
            end = c.start_pos + len(c.token_ids)
            context = [int(self.kv[c.page_table[p // PS], p % PS]) for p in range(end)]
            known = c.request.all_token_ids
            assert context[:len(known)] == known[:end], "K/V read back differs from the tokens"
            proposals = c.token_ids[len(c.token_ids) - c.num_spec:] if c.num_spec else []
            emitted, base = [], end - len(proposals)
            for j in range(len(proposals) + 1):
                t = next_token(context[:base + j])
                emitted.append(t)
                if j == len(proposals) or proposals[j] != t:
                    break
            sampled[c.request_id] = emitted
        return sampled


def reference(prompt, max_tokens):
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


def check_invariants(sched):
    kv = sched.kv
    kv.pool.check_invariants()
    for r in sched.running:
        assert len(kv.get_page_table(r.request_id)) == kv.pages_for(r.num_computed_tokens)
        assert r.num_computed_tokens == r.num_tokens - 1 or r.num_computed_tokens < r.num_prompt_tokens


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 12), st.integers(1, 12)), min_size=1, max_size=5),
       st.integers(1, 5), st.integers(0, 2**31), st.integers(14, 40))
def test_speculative_steps_give_the_plain_outputs_and_never_leak_pages(shapes, k, seed, num_pages):
    rng = np.random.default_rng(seed)
    kv = KVCacheManager(num_pages, PS, True, 64)
    sched = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=12, max_model_len=64), kv)
    model = SpecFakeModel(num_pages)
    requests = []
    for i, (plen, max_tokens) in enumerate(shapes):
        prompt = rng.integers(0, VOCAB, plen).tolist()
        requests.append(Request(f"r{i}", prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True)))
        sched.add_request(requests[-1])
    for _ in range(500):
        if not sched.has_unfinished():
            break
        # Proposals: the true continuation, corrupted at a random point (or not at all).
        for r in sched.running:
            if r.num_computed_tokens == r.num_tokens - 1:
                truth = reference(r.all_token_ids, k)
                cut = int(rng.integers(0, k + 1))
                r.spec_token_ids = truth[:cut] + [(t + 1) % VOCAB for t in truth[cut:]]
        out = sched.schedule()
        assert out.num_scheduled_tokens <= 12
        sched.update_from_output(out, model.step(out))
        check_invariants(sched)
    assert not sched.has_unfinished()
    for r in requests:
        assert r.output_token_ids == reference(r.prompt_token_ids, r.max_tokens), r.request_id
    assert kv.pool.num_used_pages == 0


# ---------------------------------------------------------------------------------------- the real model

GOLDEN = json.loads((Path(__file__).parents[1] / "data" / "golden_smollm2.json").read_text())
GOLDEN_PROMPTS = {p["name"]: p for p in GOLDEN["prompts"]}
ENGINE = dict(max_num_seqs=2, max_num_batched_tokens=128, max_model_len=256, kv_cache_memory=16 * 2**20,
              warmup=False)


def golden_check(llm, names):
    """Greedy outputs (EOS ignored) must be the transformers golden tokens, which non-speculative greedy
    decoding reproduces (tests/pallas_kernels/test_pallas_kernels.py); 24 of the 32 keep the test short."""
    prompts = [GOLDEN_PROMPTS[n]["prompt_ids"] for n in names]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    outs = llm.generate(prompts, params, use_tqdm=False)
    for name, out in zip(names, outs):
        assert out.outputs[0].token_ids == GOLDEN_PROMPTS[name]["greedy_ids"][:24], name
    assert llm.engine.kv_cache.pool.num_used_pages == 0
    llm.engine.kv_cache.pool.check_invariants()
    return llm.engine.spec.stats


@pytest.mark.slow
def test_ngram_greedy_equals_plain_greedy_on_the_real_model():
    from jaxserve import LLM

    llm = LLM(speculative_method="ngram", num_speculative_tokens=4, **ENGINE)
    stats = golden_check(llm, ["digits_text", "dickens_text"])
    assert stats.num_accepted_tokens > 0  # repetitive prompts do accept proposals
    # Sampled rows (filters and a penalty on, so proposals enter the history): seeded runs repeat exactly.
    prompt = GOLDEN_PROMPTS["dickens_text"]["prompt_ids"]
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.1, max_tokens=16,
                            ignore_eos=True, seed=7)
    before = stats.num_draft_tokens
    runs = [llm.generate([prompt, prompt], params, use_tqdm=False) for _ in range(2)]
    tokens = [[o.outputs[0].token_ids for o in run] for run in runs]
    assert tokens[0] == tokens[1] and all(len(t) == 16 for t in tokens[0])
    assert stats.num_draft_tokens > before
    assert llm.engine.kv_cache.pool.num_used_pages == 0


@pytest.mark.slow
def test_backoff_pauses_failing_proposals_and_keeps_the_outputs():
    """`LLM(speculative_min_accepted=...)`: at K (the strictest) a request pauses after proposals that are not all
    accepted, so fewer proposals are verified than with back-off off (0), and the greedy tokens stay golden."""
    from jaxserve import LLM

    drafts = {}
    for min_accepted in (0.0, 4.0):
        llm = LLM(speculative_method="ngram", num_speculative_tokens=4, speculative_min_accepted=min_accepted,
                  **ENGINE)
        drafts[min_accepted] = golden_check(llm, ["dickens_text"]).num_draft_tokens
    assert 0 < drafts[4.0] < drafts[0.0]


@pytest.mark.slow
def test_disable_by_batch_size_stops_proposals_while_the_batch_is_larger():
    """vLLM's `speculative_config={"disable_by_batch_size": N}` (also `--speculative-disable-by-batch-size`):
    with two requests running, N = 1 makes no proposal at all while N = 2 speculates; greedy tokens stay golden."""
    from jaxserve import LLM

    drafts = {}
    for n in (1, 2):
        llm = LLM(speculative_config={"method": "ngram", "num_speculative_tokens": 4, "disable_by_batch_size": n},
                  **ENGINE)
        assert llm.engine.config.speculative_disable_by_batch_size == n
        drafts[n] = golden_check(llm, ["digits_text", "dickens_text"]).num_draft_tokens
    assert drafts[1] == 0 < drafts[2]


def test_disable_by_batch_size_flag_and_bad_values():
    from jaxserve.config import EngineConfig, speculative_fields
    from jaxserve.server.__main__ import build_parser

    args = build_parser().parse_args(["--speculative-disable-by-batch-size", "4"])
    assert args.speculative_disable_by_batch_size == 4
    assert speculative_fields({"method": "ngram", "disable_by_batch_size": 3})["speculative_disable_by_batch_size"] == 3
    with pytest.raises(ValueError, match="speculative_disable_by_batch_size must be >= 0"):
        EngineConfig(speculative_disable_by_batch_size=-1)


@pytest.mark.slow
def test_ngram_greedy_with_int8_weights_equals_plain_int8_greedy():
    """Speculative decoding over int8 weights verifies with the same quantized model, so greedy output is
    exactly the plain int8 engine's (int8 need not match the float golden token for token)."""
    from jaxserve import LLM, model_registry

    model = model_registry.resolve_model(model_registry.DEFAULT_MODEL)
    prompts = [GOLDEN_PROMPTS[n]["prompt_ids"] for n in ("digits_text", "dickens_text")]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    plain = LLM(model, quantization="int8", **ENGINE).generate(prompts, params, use_tqdm=False)
    llm = LLM(model, quantization="int8", speculative_method="ngram", num_speculative_tokens=4, **ENGINE)
    spec = llm.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in spec] == [o.outputs[0].token_ids for o in plain]
    assert llm.engine.spec.stats.num_accepted_tokens > 0
    assert llm.engine.kv_cache.pool.num_used_pages == 0


@pytest.mark.slow
def test_draft_model_greedy_equals_plain_greedy_on_the_real_model(tmp_path):
    from jaxserve import LLM
    from jaxserve.model_registry import resolve_model
    from jaxserve.spec_decode.draft_init import make_truncated_draft

    # A 4-layer truncation of the target: it proposes wrong tokens often, so rollbacks get exercised.
    draft = make_truncated_draft(resolve_model("SmolLM2-135M-Instruct"), tmp_path / "draft", 4)
    llm = LLM(speculative_model=str(draft), num_speculative_tokens=2, **ENGINE)
    stats = golden_check(llm, ["dickens_text"])
    assert stats.num_draft_tokens > 0
    proposer = llm.engine.spec.proposer
    proposer.kv.pool.check_invariants()
    assert proposer.kv.pool.num_used_pages == 0 and not proposer._seqs


def test_server_metrics_export_the_speculative_counters():
    import dataclasses
    import types

    from prometheus_client import CollectorRegistry, generate_latest

    from jaxserve.engine_client import SpecDecodeSnapshot
    from jaxserve.server.metrics import EngineCollector

    from conftest import FakeEngine

    stats = SpecDecodeStats(2)
    stats.record(2, 2)
    base = FakeEngine().stats_snapshot()
    spec = SpecDecodeSnapshot.from_stats(stats)
    engine = types.SimpleNamespace(stats_snapshot=lambda: dataclasses.replace(base, spec_decode=spec))
    registry = CollectorRegistry()
    registry.register(EngineCollector(lambda: engine, dict))
    text = generate_latest(registry).decode()
    assert "jaxserve:spec_decode_num_draft_tokens_total 2.0" in text
    assert "jaxserve:spec_decode_num_accepted_tokens_total 1.0" in text
    assert 'jaxserve:spec_decode_num_accepted_tokens_per_pos_total{position="1"} 0.0' in text
    assert "jaxserve:spec_decode_acceptance_rate 0.5" in text
    no_spec = CollectorRegistry()
    no_spec.register(EngineCollector(lambda: types.SimpleNamespace(stats_snapshot=lambda: base), dict))
    assert "spec_decode" not in generate_latest(no_spec).decode()
