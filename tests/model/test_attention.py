"""The XLA paged attention against the dense float32 reference, on fresh random ragged steps."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.model.attention import paged_attention_xla
from jaxserve.model.step_inputs import SeqChunk, build_step_inputs
from pallas_kernels.kv_cache import write_kv
from pallas_kernels.reference import ragged_paged_attention_reference

PAGE = 4


def random_step(rng, *, kv_heads, group, head_dim, chunks_spec, num_tokens, num_rows, num_pages=64,
                logits_per_row=1):
    """chunks_spec: (start_pos, num_new_tokens) per sequence. Pages are a random permutation; every page a
    sequence does not own is NaN, so any read outside its own pages poisons its output."""
    order = rng.permutation(np.arange(1, num_pages))
    chunks, owned, used = [], set(), 0
    for start, n in chunks_spec:
        need = -(-(start + n) // PAGE)
        table = [int(p) for p in order[used:used + need]]
        used += need
        owned.update(table)
        chunks.append(SeqChunk([0] * n, start, table))
    step = build_step_inputs(chunks, num_tokens=num_tokens, num_rows=num_rows, page_size=PAGE,
                             max_pages_per_seq=32, kv_block_pages=2, logits_per_row=logits_per_row)
    kv = rng.standard_normal((1, num_pages, PAGE, 2 * kv_heads, head_dim)).astype(np.float32)
    for p in range(num_pages):
        if p not in owned:
            kv[0, p] = np.nan
    q = rng.standard_normal((num_tokens, kv_heads * group, head_dim)).astype(np.float32)
    return jnp.asarray(q), jnp.asarray(kv), jax.tree.map(jnp.asarray, step)


CASES = {
    # name: (kv_heads, group, head_dim, [(start_pos, new_tokens), ...], T, R[, L: tokens per verify row])
    "decode_ragged": (2, 4, 16, [(0, 1), (PAGE - 1, 1), (PAGE, 1), (PAGE + 1, 1), (37, 1)], 8, 8),
    "prefill_one": (1, 3, 8, [(0, 23)], 32, 4),
    "chunked_prefill_mix": (2, 1, 8, [(9, 1), (16, 17), (3, 1), (0, 5)], 32, 4),
    "gqa8_long": (1, 8, 16, [(70, 1), (0, 40), (51, 9)], 64, 4),
    # a verify-shaped step (rows of 1 + K = 5 tokens, query blocks of 8), one row short of its proposals
    "verify_rows": (2, 3, 8, [(30, 5), (3, 5), (0, 5), (12, 3)], 20, 4, 5),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_xla_matches_reference(name):
    kv_heads, group, head_dim, spec, T, R, *L = CASES[name]
    rng = np.random.default_rng()
    q, kv, step = random_step(rng, kv_heads=kv_heads, group=group, head_dim=head_dim, chunks_spec=spec,
                              num_tokens=T, num_rows=R, logits_per_row=L[0] if L else 1)
    layer = jnp.int32(0)
    ref = ragged_paged_attention_reference(q, kv, layer, step, scale=0.3)
    out = jax.jit(paged_attention_xla, static_argnames="scale")(q, kv, layer, step, scale=0.3)
    valid = int(step.query_starts[-1])
    assert np.isfinite(np.asarray(out[:valid])).all(), "a read outside the sequence's own pages leaked NaN"
    np.testing.assert_allclose(np.asarray(out[:valid]), np.asarray(ref[:valid]), rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(np.asarray(out[valid:]), 0.0)


def test_write_kv_interleaves_k_and_v_per_head():
    kv = jnp.zeros((2, 5, PAGE, 4, 3))
    k = jnp.arange(2 * 2 * 3, dtype=jnp.float32).reshape(2, 2, 3) + 1
    v = -k
    slots = jnp.array([2 * PAGE + 1, 4 * PAGE + 3])  # page 2 offset 1, page 4 offset 3
    out = np.asarray(write_kv(kv, jnp.int32(1), k, v, slots))
    np.testing.assert_array_equal(out[1, 2, 1, 0::2], k[0])
    np.testing.assert_array_equal(out[1, 2, 1, 1::2], v[0])
    np.testing.assert_array_equal(out[1, 4, 3, 0::2], k[1])
    assert np.count_nonzero(out[0]) == 0 and np.count_nonzero(out) == 2 * k.size
