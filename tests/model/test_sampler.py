"""Sampler tests: each step against a numpy implementation of its definition, and the draws against the
distribution those definitions give (chi-square on a small vocabulary).

Statistical tests use fixed seeds, so they are deterministic; the bound is the chi-square quantile at
significance ALPHA = 1e-4 (a correct sampler fails a given seed set with probability 1e-4).
"""

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.core.sampling_params import SamplingParams
from jaxserve.model import sampler
from jaxserve.model.sampler import (
    RowSampling,
    SamplingMetadata,
    apply_logit_bias,
    apply_penalties,
    build_sampling_metadata,
    sample,
)

ALPHA_Z = 3.719  # standard normal quantile for ALPHA = 1e-4 (one-sided)

sample_jit = jax.jit(sample, static_argnames="num_logprobs")


def row(seed=0, position=0, prompt=(), output=(), banned=(), **params):
    return RowSampling(SamplingParams(**params), seed=seed, position=position, prompt_token_ids=list(prompt),
                       output_token_ids=list(output), banned_ids=tuple(banned))


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_penalties(logits, prompt, output, rep, presence, frequency):
    x = logits.copy()
    for t in set(prompt) | set(output):
        x[t] = x[t] / rep if x[t] > 0 else x[t] * rep
    for t, c in collections.Counter(output).items():
        x[t] -= frequency * c + presence
    return x


def np_filtered_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, banned=()):
    """The distribution ban → temperature → top-k → top-p → min-p defines (vLLM), by sorting.

    Assumes distinct logits (no ties at a threshold).
    """
    z = logits / temperature
    z[list(banned)] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    order = np.argsort(-z, kind="stable")
    keep = np.ones_like(p, bool)
    if top_k:
        keep[order[top_k:]] = False
    if top_p < 1:
        q = np.where(keep, p, 0) / p[keep].sum()
        above = np.cumsum(q[order]) - q[order]  # mass strictly more likely than each token
        keep[order[above >= top_p]] = False
    keep &= p >= min_p * p.max()
    out = np.where(keep, p, 0)
    return out / out.sum()


def chi2_bound(df):
    # Wilson–Hilferty approximation of the chi-square quantile at 1 - ALPHA.
    return df * (1 - 2 / (9 * df) + ALPHA_Z * np.sqrt(2 / (9 * df))) ** 3


def assert_matches(tokens, expected_p, vocab):
    counts = np.bincount(tokens, minlength=vocab)
    assert counts[expected_p == 0].sum() == 0, f"filtered tokens sampled: {np.nonzero(counts * (expected_p == 0))}"
    support = expected_p > 0
    expected = len(tokens) * expected_p[support]
    chi2 = ((counts[support] - expected) ** 2 / expected).sum()
    df = max(support.sum() - 1, 1)
    assert chi2 < chi2_bound(df), f"chi2 {chi2:.1f} over df {df}: counts {counts} vs expected {expected.round(1)}"


# --- the host builder -----------------------------------------------------------------------------------

def test_builder_pads_with_neutral_greedy_rows_and_one_fixed_bias_width():
    rows = [row(seed=2**32 + 5, position=7, temperature=0.8, top_k=50, top_p=0.9, min_p=0.1,
                logit_bias={i: 1.0 for i in range(9)}, banned=[3]),
            row(temperature=0.0, top_k=5, top_p=0.5, repetition_penalty=1.2, prompt=[1, 2], output=[3]),
            None]
    md = build_sampling_metadata(rows, 4, vocab_size=100, history_len=6)
    np.testing.assert_allclose(md.temperature, [0.8, 0, 0, 0])
    np.testing.assert_array_equal(md.top_k, [50, 0, 0, 0])  # greedy rows keep neutral filters
    np.testing.assert_allclose(md.top_p, [0.9, 1, 1, 1])
    assert md.seeds.dtype == np.uint32 and md.seeds[0] == 5 and md.positions[0] == 7
    assert md.bias_ids.shape == (4, sampler.BIAS_WIDTH)  # one width whatever the rows hold
    bias = dict(zip(md.bias_ids[0].tolist(), md.bias_values[0].tolist()))
    assert bias[3] == -np.inf and bias[8] == 1.0
    np.testing.assert_array_equal(md.bias_values[1:], 0)
    np.testing.assert_array_equal(md.history[0], -1)  # no penalty: no history sent
    np.testing.assert_array_equal(md.history[1], [1, 2, 3, -1, -1, -1])
    assert md.prompt_lens[1] == 2
    assert build_sampling_metadata([None], 2, 100, 4).bias_ids.shape == (2, sampler.BIAS_WIDTH)


def test_builder_rejects_bad_ids_and_long_history():
    with pytest.raises(ValueError, match="outside"):
        build_sampling_metadata([row(logit_bias={100: 1.0})], 1, 100, 4)
    with pytest.raises(ValueError, match="history_len"):
        build_sampling_metadata([row(presence_penalty=0.5, prompt=[1, 2, 3], output=[4, 5])], 1, 100, 4)
    with pytest.raises(ValueError, match="do not fit"):
        build_sampling_metadata([None, None], 1, 100, 4)


# --- deterministic steps against numpy ------------------------------------------------------------------

# Most tests share one batch shape so that the file compiles `sample` only a few times.
R, V, S, N_LOGPROBS = 8, 1000, 32, 5


def run(logits, rows):
    md = build_sampling_metadata(rows + [None] * (R - len(rows)), R, V, S)
    return jax.device_get(sample_jit(jnp.asarray(logits, jnp.float32), md, num_logprobs=N_LOGPROBS))


def test_greedy_equals_argmax_and_logprobs_match_log_softmax():
    logits = np.random.default_rng(0).normal(size=(R, V)).astype(np.float32) * 3
    out = run(logits, [row(temperature=0.0)] * 5)  # and 3 padding rows, greedy too
    np.testing.assert_array_equal(out.token_ids, logits.argmax(-1))
    ref = np_log_softmax(logits.astype(np.float64))
    np.testing.assert_allclose(out.logprobs, ref[np.arange(R), out.token_ids], atol=1e-5)
    np.testing.assert_array_equal(out.top_ids, np.argsort(-logits, -1)[:, :N_LOGPROBS])  # best first
    np.testing.assert_allclose(out.top_logprobs, np.take_along_axis(ref, out.top_ids, -1), atol=1e-5)
    assert (np.diff(out.top_logprobs, axis=-1) <= 0).all()


def test_logprobs_are_under_the_raw_distribution_for_processed_rows():
    logits = np.random.default_rng(1).normal(size=(R, V)).astype(np.float32)
    rows = [row(temperature=0.5, top_k=3, seed=s, logit_bias={7: 5.0}, repetition_penalty=1.5, prompt=[1, 2])
            for s in range(R)]
    out = run(logits, rows)
    ref = np_log_softmax(logits.astype(np.float64))
    np.testing.assert_allclose(out.logprobs, ref[np.arange(R), out.token_ids], atol=1e-5)
    np.testing.assert_array_equal(out.top_ids, np.argsort(-logits, -1)[:, :N_LOGPROBS])


@pytest.mark.parametrize("k", [1, 5, 20])
def test_blocked_top_k_and_argmax_match_numpy(k):
    rng = np.random.default_rng(7)
    vocab = 50 * sampler.BLOCK + 17  # enough blocks for the blocked path, and a ragged last one
    x = rng.normal(size=(3, vocab)).astype(np.float32)
    x[1] = np.round(x[1])  # many ties
    x[2, -3:] = 9.0  # the best in the ragged block
    vals, ids = jax.jit(sampler._top_k, static_argnums=1)(jnp.asarray(x), k)
    np.testing.assert_array_equal(vals, -np.sort(-x, -1)[:, :k])
    np.testing.assert_array_equal(np.take_along_axis(x, np.asarray(ids), -1), vals)
    assert all(len(set(r)) == k for r in np.asarray(ids).tolist())
    np.testing.assert_array_equal(jax.jit(sampler._argmax)(jnp.asarray(x)), x.argmax(-1))  # first of ties


def test_logit_bias_matches_numpy():
    logits = np.random.default_rng(2).normal(size=(3, 50)).astype(np.float32)
    biases = [{1: 2.5, 7: -3.0, 0: 1.0}, {}, {49: 100.0}]
    rows = [row(logit_bias=b, banned=[5] if i == 1 else []) for i, b in enumerate(biases)]
    got = np.asarray(apply_logit_bias(jnp.asarray(logits), build_sampling_metadata(rows, 3, 50, 4)))
    want = logits.copy()
    for r, b in enumerate(biases):
        for t, v in b.items():
            want[r, t] += v
    want[1, 5] = -np.inf
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("rep,presence,frequency", [(1.7, 0.0, 0.0), (1.0, 0.8, 0.0), (1.0, 0.0, -0.6),
                                                    (0.6, -1.2, 1.5)])
def test_penalties_match_numpy(rep, presence, frequency):
    rng = np.random.default_rng(3)
    vocab = 40  # small, so that prompt and output tokens collide and repeat
    logits = np.zeros((R, V), np.float32)
    logits[:, :vocab] = rng.normal(size=(R, vocab)) * 2
    logits[:, vocab:] = -50
    histories = [(rng.integers(0, vocab, 10).tolist(), rng.integers(0, vocab, 15).tolist()) for _ in range(R - 1)]
    histories.append(([], []))
    rows = [row(temperature=0.0, prompt=p, output=o, repetition_penalty=rep, presence_penalty=presence,
                frequency_penalty=frequency) for p, o in histories]
    got = np.asarray(apply_penalties(jnp.asarray(logits), build_sampling_metadata(rows, R, V, S)))
    want = np.stack([np_penalties(logits[r], *histories[r], rep, presence, frequency) for r in range(R)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Through `sample`: a greedy row takes the argmax of the penalised logits.
    np.testing.assert_array_equal(run(logits, rows).token_ids, want.argmax(-1))


def test_penalty_free_rows_are_untouched_in_a_penalised_batch():
    logits = np.random.default_rng(4).normal(size=(2, 30)).astype(np.float32)
    rows = [row(repetition_penalty=2.0, prompt=[1, 2, 3]), row(prompt=[1, 2, 3])]
    got = np.asarray(apply_penalties(jnp.asarray(logits), build_sampling_metadata(rows, 2, 30, 8)))
    np.testing.assert_array_equal(got[1], logits[1])


def test_banned_ids_are_never_sampled():
    # Random rows with a banned favourite are covered by the statistical test; here, greedy and near-greedy rows.
    logits = np.random.default_rng(5).normal(size=(R, V)).astype(np.float32)
    best = logits.argmax(-1)
    rows = [row(temperature=0.0, banned=[best[0]]), row(seed=3, temperature=0.01, banned=[best[1]]),
            row(temperature=0.0, logit_bias={int(best[2]): -100.0})]
    out = run(logits, rows)
    assert (out.token_ids[:3] != best[:3]).all()
    np.testing.assert_array_equal(out.token_ids[:2], np.argsort(-logits[:2], -1)[:, 1])


# --- the filters' thresholds, fast path and bisection fallback against numpy -----------------------------

@pytest.mark.parametrize("num_candidates", [sampler.NUM_CANDIDATES, 8])
def test_top_k_top_p_keep_sets_match_numpy(num_candidates):
    # With 8 candidates most rows take the bisection over the whole vocabulary; with 128, the top_k=300 rows.
    rng = np.random.default_rng(5)
    vocab = 500
    cases = [(0, 0.9), (5, 1.0), (40, 1.0), (300, 1.0), (0, 0.5), (20, 0.8), (300, 0.95), (0, 0.999), (1, 0.3),
             (0, 1.0)]
    logits = (rng.normal(size=(len(cases), vocab)) * rng.uniform(0.3, 3, size=(len(cases), 1))).astype(np.float32)
    rows = [row(temperature=1.0, top_k=k, top_p=p) for k, p in cases]
    md = build_sampling_metadata(rows, len(cases), vocab, 4)
    scaled = jnp.asarray(logits)
    probs = jnp.exp(scaled - scaled.max(-1, keepdims=True))
    thr = np.asarray(jax.jit(sampler._top_k_top_p_threshold, static_argnums=3)(scaled, probs, md, num_candidates))
    for r, (k, p) in enumerate(cases):
        want = np_filtered_probs(logits[r].astype(np.float64), top_k=k, top_p=p) > 0
        np.testing.assert_array_equal(logits[r] >= thr[r], want, err_msg=f"top_k={k} top_p={p}")


# --- statistics: the draws follow the filtered distribution ----------------------------------------------

STAT_LOGITS = np.array([2.0, 1.6, 1.3, 1.1, 0.7, 0.5, 0.2, 0.0, -0.4, -0.9, -1.5, -2.2], np.float32)
STAT_CASES = [dict(temperature=1.0), dict(temperature=0.6), dict(temperature=1.7), dict(temperature=1.0, top_k=4),
              dict(temperature=1.0, top_p=0.6), dict(temperature=0.8, min_p=0.2),
              dict(temperature=1.3, top_k=6, top_p=0.8, min_p=0.15), dict(temperature=2.0, banned=(0, 1)),
              dict(temperature=0.9, top_p=0.7, banned=(0,))]
STAT_DRAWS = 4000


def _split_banned(cases):
    return [({k: v for k, v in c.items() if k != "banned"}, c.get("banned", ())) for c in cases]


@pytest.mark.parametrize("num_candidates", [sampler.NUM_CANDIDATES, 3])
def test_draws_match_the_filtered_distribution(num_candidates):
    # All cases in one batch (mixed parameters, one compile); each case's rows differ by seed or position.
    # With 3 candidates, the top-k and top-p rows take the bisection.
    vocab = len(STAT_LOGITS)
    rows = []
    for c, (params, banned) in enumerate(_split_banned(STAT_CASES)):
        half = STAT_DRAWS // 2
        rows += [row(seed=1000 * c + i, position=3, banned=banned, **params) for i in range(half)]  # over seeds
        rows += [row(seed=77 + c, position=i, banned=banned, **params) for i in range(STAT_DRAWS - half)]
    md = build_sampling_metadata(rows, len(rows), vocab, 1)
    out = jax.jit(sample, static_argnames=("num_logprobs", "num_candidates"))(
        jnp.asarray(np.tile(STAT_LOGITS, (len(rows), 1))), md, num_logprobs=0, num_candidates=num_candidates)
    tokens = np.asarray(out.token_ids).reshape(len(STAT_CASES), STAT_DRAWS)
    for params, toks in zip(STAT_CASES, tokens):
        expected = np_filtered_probs(STAT_LOGITS.astype(np.float64), **params)
        assert_matches(toks, expected, vocab)


def test_two_level_draw_matches_sparse_distribution_across_blocks():
    # Mass spread over several CDF blocks with empty blocks between them and a ragged last block.
    vocab, n = 3 * sampler.BLOCK + 37, 20000
    p = np.zeros(vocab, np.float32)
    support = [0, 5, 127, 128, 300, vocab - 1]
    p[support] = [0.05, 0.3, 0.1, 0.15, 0.25, 0.15]
    u = jax.random.uniform(jax.random.key(0), (n,))
    tokens = np.asarray(jax.jit(sampler._inverse_cdf)(jnp.tile(jnp.asarray(p * 7.0), (n, 1)), u))
    assert_matches(tokens, p / p.sum(), vocab)
    # u at the very top of [0, 1) and exactly 0 stay on tokens with mass.
    edge = np.asarray(sampler._inverse_cdf(jnp.tile(jnp.asarray(p), (2, 1)), jnp.array([1 - 2**-24, 0.0])))
    assert edge.tolist() == [vocab - 1, 0]


# --- seeded reproducibility ------------------------------------------------------------------------------

def test_a_seeded_row_gives_the_same_token_whatever_shares_its_batch():
    rng = np.random.default_rng(6)
    target = rng.normal(size=V).astype(np.float32)
    params = dict(temperature=0.9, top_p=0.95, top_k=200, repetition_penalty=1.1)
    others = [row(temperature=0.0), None, row(seed=9, temperature=1.5, top_p=0.5), row(seed=1, temperature=0.3),
              row(seed=2, temperature=1.0, top_k=3, frequency_penalty=1.0, output=[1, 1]), None, None, None] * 2

    def token(num_rows, index, seed, position):
        logits = rng.normal(size=(num_rows, V)).astype(np.float32) * 2
        logits[index] = target
        rows = others[:num_rows]
        rows[index] = row(seed=seed, position=position, prompt=[3, 4, 5], **params)
        md = build_sampling_metadata(rows, num_rows, V, S)
        return int(sample_jit(jnp.asarray(logits), md, num_logprobs=N_LOGPROBS).token_ids[index])

    for seed in (0, 17, 2**31 + 3):
        tokens = {token(n, i, seed, 11) for n, i in [(R, 0), (R, 5), (R, 7), (2 * R, 12)]}
        assert len(tokens) == 1, f"seed {seed}: {tokens}"
    assert len({token(R, 1, s, 11) for s in range(12)}) > 3  # different seeds differ
    assert len({token(R, 1, 5, p) for p in range(12)}) > 3  # and so do positions


def test_row_chunks_give_the_same_outputs_as_one_batch():
    logits = np.random.default_rng(8).normal(size=(R, V)).astype(np.float32)
    rows = [row(temperature=0.0), row(seed=1, temperature=0.8, top_p=0.9), None, row(seed=2, temperature=1.2),
            row(seed=3, temperature=0.7, top_k=4, presence_penalty=0.5, output=[1, 2]), row(temperature=0.0,
            logit_bias={5: 30.0}), row(seed=4, temperature=1.0, min_p=0.1), row(seed=5, temperature=1.0, top_k=300)]
    md = build_sampling_metadata(rows, R, V, S)
    whole = run(logits, rows)
    chunked = jax.jit(sample, static_argnames=("num_logprobs", "rows_per_chunk"))(
        jnp.asarray(logits), md, num_logprobs=N_LOGPROBS, rows_per_chunk=2)
    np.testing.assert_array_equal(whole.token_ids, chunked.token_ids)
    np.testing.assert_array_equal(whole.top_ids, chunked.top_ids)
    np.testing.assert_allclose(whole.logprobs, chunked.logprobs, rtol=1e-6)  # reductions may differ in the last bit
    np.testing.assert_allclose(whole.top_logprobs, chunked.top_logprobs, rtol=1e-6)
    assert whole.token_ids[5] == 5


def test_mixed_parameters_compile_once():
    logits = np.zeros((R, V), np.float32)
    run(logits, [])
    compiled = sample_jit._cache_size()
    for rows in ([row(temperature=0.7, top_k=3, seed=1), row(repetition_penalty=1.3, prompt=[1])],
                 [row(temperature=1.0, top_p=0.2, min_p=0.3, logit_bias={2: 1.0}, banned=[3])] * R,
                 [row(temperature=1.0, top_k=500, top_p=0.9, presence_penalty=1.0, output=[5])]):
        run(logits, rows)
    assert sample_jit._cache_size() == compiled


def test_metadata_is_a_pytree():
    md = build_sampling_metadata([row(temperature=0.5)], 2, 10, 4)
    leaves, tree = jax.tree.flatten(md)
    assert len(leaves) == len(SamplingMetadata.__dataclass_fields__)
    assert isinstance(jax.tree.unflatten(tree, leaves), SamplingMetadata)


# --- the token bitmask (structured outputs, allowed_token_ids) ------------------------------------------

def bitmask(ids, vocab=V):
    bits = np.zeros(-(-vocab // 32) * 32, np.uint8)
    bits[list(ids)] = 1
    return np.packbits(bits, bitorder="little").view(np.int32)


def test_bitmask_rows_sample_only_allowed_tokens_and_free_rows_are_untouched():
    rng = np.random.default_rng(9)
    logits = rng.normal(size=(R, V)).astype(np.float32) * 3
    allowed = [sorted(rng.choice(V, size=k, replace=False).tolist()) for k in (1, 3, 40, 7)]
    allowed[3] = [0, 31, 32, V - 1]  # word edges and the sign bit
    free = [row(temperature=0.0), row(seed=7, temperature=1.0, top_p=0.9)]
    rows = [dataclasses.replace(row(temperature=0.0), allowed=bitmask(allowed[0])),
            dataclasses.replace(row(temperature=0.0), allowed=bitmask(allowed[3])),
            dataclasses.replace(row(seed=1, temperature=1.5, top_k=2), allowed=bitmask(allowed[1])),
            dataclasses.replace(row(seed=2, temperature=2.0, min_p=0.0), allowed=bitmask(allowed[2]))] + free
    out = run(logits, rows)
    assert out.token_ids[0] == allowed[0][0]
    assert out.token_ids[1] == max(allowed[3], key=lambda t: logits[1, t])  # greedy over the allowed set
    assert out.token_ids[2] in allowed[1] and out.token_ids[3] in allowed[2]
    plain = run(logits, [None] * 4 + free)  # free rows sample the same with or without masked rows beside them
    np.testing.assert_array_equal(out.token_ids[4:6], plain.token_ids[4:6])
    # Log-probs stay under the raw distribution (before the mask): the top alternatives ignore it.
    np.testing.assert_array_equal(out.top_ids[:4], np.argsort(-logits[:4], -1)[:, :N_LOGPROBS])
    ref = np_log_softmax(logits.astype(np.float64))
    np.testing.assert_allclose(out.logprobs, ref[np.arange(R), out.token_ids], atol=1e-5)


def test_random_bitmask_rows_follow_the_masked_distribution():
    one = np.random.default_rng(10).normal(size=V).astype(np.float32)
    logits = np.tile(one, (R, 1))
    allowed = [3, 64, 65, 500, 999]
    rows = [dataclasses.replace(row(seed=s, position=p, temperature=1.0), allowed=bitmask(allowed))
            for s in range(4) for p in range(50)]
    tokens = [t for i in range(0, len(rows), R) for t in run(logits, rows[i:i + R]).token_ids.tolist()]
    expected = np.zeros(V)
    expected[allowed] = np.exp(one[allowed] - one[allowed].max())
    assert_matches(np.array(tokens), expected / expected.sum(), V)


def test_bitmask_rows_compile_nothing_new():
    logits = np.zeros((R, V), np.float32)
    run(logits, [])
    compiled = sample_jit._cache_size()
    run(logits, [dataclasses.replace(row(temperature=0.7, seed=1), allowed=bitmask([1, 2])), row()])
    assert sample_jit._cache_size() == compiled
