"""Prompt logprobs and scoring through the engine on the real SmolLM2-135M (float32 on CPU).

Two references, neither of them the paged serving step:
  * the transformers golden file (tests/data/golden_smollm2.json): teacher-forced top-5 log-probs at the 8
    positions after each prompt, so prompt logprobs of prompt + greedy continuation must reproduce them;
  * `jaxserve.model.scoring.Scorer`: our float32 dense scoring path (one packed step of all logits, no
    scheduler, no chunking, no cache), for every prompt position (transformers + torch cannot be installed
    here to extend the golden file to the prompt positions).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxserve import LLM, SamplingParams

GOLDEN = json.loads((Path(__file__).parent / "data" / "golden_smollm2.json").read_text())
PROMPTS = GOLDEN["prompts"]
ATOL = 1e-3
# 4 rows, 32 tokens a step: prompts above 32 tokens are chunked (the 327-token one in 11 chunks).
ENGINE = dict(max_num_seqs=4, max_num_batched_tokens=32, kv_cache_memory=64 * 2**20)
TOP = GOLDEN["top_logprobs"]


@pytest.fixture(scope="module")
def llm():
    return LLM(**ENGINE)


def standard_layout(weights):
    """The engine's weights with layer stacks in the standard layout (the native CPU matmul stores them in
    tiles), for the XLA dots of the dense scorer."""
    from pallas_kernels.cpu_qmatmul import ColumnTiles, untile_columns

    tiled = lambda w: isinstance(w, ColumnTiles)  # noqa: E731
    return jax.tree.map(lambda w: untile_columns(w) if tiled(w) else w, weights, is_leaf=tiled)


@pytest.fixture(scope="module")
def reference(llm):
    """prompt + greedy continuation of every golden prompt -> Scorer's log-probs of tokens 1.. (float32)."""
    from jaxserve.model.scoring import Scorer

    runner = llm.engine.runner
    seqs = [p["prompt_ids"] + p["greedy_ids"] for p in PROMPTS]
    scored = Scorer(runner.model_config, num_tokens=512, num_rows=4).score(standard_layout(runner.weights), seqs)
    return [s.logprobs for s in scored]


def assert_idle(llm: LLM) -> None:
    pool = llm.engine.kv_cache.pool
    assert not llm.engine.has_unfinished()
    assert pool.num_used_pages == 0
    pool.check_invariants()


def check_against_golden(entries, prompt) -> float:
    """The entries of the 8 golden positions after the prompt hold transformers' top-5; returns the worst error."""
    n, worst = len(prompt["prompt_ids"]), 0.0
    for j, want in enumerate(prompt["top_logprobs"]):
        entry = entries[n + j]
        assert entry.token_id == prompt["greedy_ids"][j]
        top = dict(entry.top)
        for token_id, logprob in want:
            assert token_id in top, (prompt["name"], j, token_id)
            worst = max(worst, abs(top[token_id] - logprob))
        worst = max(worst, abs(entry.logprob - want[0][1]))  # the greedy token is the golden top-1
    assert worst <= ATOL, (prompt["name"], worst)
    return worst


@pytest.mark.slow
def test_prompt_logprobs_match_transformers_and_dense_reference_chunked(llm, reference):
    """All golden prompts + continuations (37..359 tokens: chunked, batched together, several chunks per step)."""
    compiled = llm.engine.runner.num_compiled()
    seqs = [p["prompt_ids"] + p["greedy_ids"] for p in PROMPTS]
    outs = llm.generate(seqs, SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=TOP), use_tqdm=False)
    for out, prompt, ref in zip(outs, PROMPTS, reference):
        entries = out.prompt_logprobs
        assert len(entries) == len(out.prompt_token_ids) and entries[0] is None
        assert [e.token_id for e in entries[1:]] == out.prompt_token_ids[1:]
        got = np.array([e.logprob for e in entries[1:]])
        assert np.abs(got - ref).max() <= ATOL, prompt["name"]
        # each top list is sorted and holds the most likely token, which is at least as likely as the target
        for e in entries[1:]:
            assert len(e.top) == TOP and e.top[0][1] >= e.logprob - 1e-6
            assert all(a[1] >= b[1] for a, b in zip(e.top, e.top[1:]))
        check_against_golden(entries, prompt)
    assert llm.engine.runner.num_compiled() == compiled  # nothing compiled after warm-up
    assert_idle(llm)


@pytest.mark.slow
def test_single_chunk_prompts_match_the_reference(llm, reference):
    """Prompts that fit one 32-token step, each alone (one chunk, no chunked prefill)."""
    short = [(p, ref) for p, ref in zip(PROMPTS, reference) if len(p["prompt_ids"]) <= 32]
    assert len(short) >= 3
    for prompt, ref in short:
        out = llm.generate([prompt["prompt_ids"]], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2),
                           use_tqdm=False)[0]
        n = len(prompt["prompt_ids"])
        got = np.array([e.logprob for e in out.prompt_logprobs[1:]])
        assert got.shape == (n - 1,) and np.abs(got - ref[:n - 1]).max() <= ATOL, prompt["name"]
        assert all(len(e.top) == 2 for e in out.prompt_logprobs[1:])
        # the sampled token's logprob is the next position's: the same logits as the reference's last one
    assert_idle(llm)


@pytest.mark.slow
def test_prefix_cache_hit_is_bypassed_and_pages_stay_cached(llm, reference):
    """A plain request caches the prompt's pages; a prompt_logprobs request for the same prompt computes the
    whole prompt anyway (no cache hit, complete and correct logprobs); a plain request after it still hits."""
    prompt, ref = PROMPTS[5], reference[5]  # 327 tokens: 20 full pages of 16
    ids = prompt["prompt_ids"]
    first = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)[0]
    hits = llm.engine.scheduler.stats().prefix_cache_hits
    scored = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0), use_tqdm=False)[0]
    assert scored.num_cached_tokens == 0 and llm.engine.scheduler.stats().prefix_cache_hits == hits
    got = np.array([e.logprob for e in scored.prompt_logprobs[1:]])
    assert np.abs(got - ref[:len(ids) - 1]).max() <= ATOL
    assert scored.outputs[0].token_ids == first.outputs[0].token_ids == prompt["greedy_ids"][:1]
    again = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)[0]
    assert again.num_cached_tokens >= 16 * (len(ids) // 16 - 1)
    assert_idle(llm)


@pytest.mark.slow
def test_scoring_prompt_plus_greedy_continuation_returns_the_generated_logprobs(llm):
    """Generate G greedily with logprobs, then score P + G: G's prompt logprobs are the logprobs generating G
    returned (decode steps vs prefill chunks of the same model), top lists included."""
    prompts = [PROMPTS[i] for i in (0, 3, 7)]
    gen = llm.generate([p["prompt_ids"] for p in prompts],
                       SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3), use_tqdm=False)
    scored = llm.score([p["prompt_ids"] + g.outputs[0].token_ids for p, g in zip(prompts, gen)], use_tqdm=False)
    for p, g, s in zip(prompts, gen, scored):
        n = len(p["prompt_ids"])
        want = np.array([e.logprob for e in g.outputs[0].logprobs])
        got = np.array(s.token_logprobs[n - 1:])
        assert np.abs(got - want).max() <= 1e-4, p["name"]
        assert s.num_scored == n + 12 - 1
        assert abs(s.sum_logprob - sum(s.token_logprobs)) < 1e-9 and s.mean_logprob == s.sum_logprob / s.num_scored
    entries = llm.generate([prompts[0]["prompt_ids"] + gen[0].outputs[0].token_ids],
                           SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=3),
                           use_tqdm=False)[0].prompt_logprobs
    n = len(prompts[0]["prompt_ids"])
    for j, e in enumerate(gen[0].outputs[0].logprobs):
        assert [t for t, _ in entries[n + j].top] == [t for t, _ in e.top]
        assert np.allclose([v for _, v in entries[n + j].top], [v for _, v in e.top], atol=1e-4)
    assert_idle(llm)


def test_score_with_continuations_splits_like_lm_eval(llm):
    """Context + continuation: only the continuation's tokens count, trailing context spaces move over."""
    ctx, cont = "The capital of France is ", "Paris"
    s = llm.score([ctx], [cont], use_tqdm=False)[0]
    whole = llm.tokenizer.encode("The capital of France is Paris", add_special_tokens=False)
    assert s.prompt_token_ids == whole
    assert s.start == len(llm.tokenizer.encode("The capital of France is", add_special_tokens=False))
    full = llm.score([whole], use_tqdm=False)[0]
    assert s.token_logprobs == full.token_logprobs[s.start - 1:]
    assert s.sum_logprob < 0


def test_prompt_logprobs_bounds_are_checked(llm):
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=21)


def test_perplexity_script_matches_the_dense_scorer(llm):
    """scripts/perplexity.py (engine path, windows of 100 tokens) vs Scorer.perplexity (same windows)."""
    import importlib.util

    from jaxserve.model.scoring import Scorer

    spec = importlib.util.spec_from_file_location("perplexity", Path(__file__).parent.parent / "scripts/perplexity.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    text = (Path(__file__).parent / "data" / "perplexity_text.txt").read_text()[:1500]
    ids = llm.tokenizer.encode(text, add_special_tokens=False)[:290]  # windows of 100, 100 and 90
    got = script.perplexity(llm, ids, 100)
    runner = llm.engine.runner
    want = Scorer(runner.model_config, num_tokens=100, num_rows=4).perplexity(standard_layout(runner.weights), ids)
    assert got["windows"] == 3 and got["predicted_tokens"] == len(ids) - got["windows"]
    assert abs(got["perplexity"] - want) / want < 1e-4
    assert 1 < got["perplexity"] < 1000
