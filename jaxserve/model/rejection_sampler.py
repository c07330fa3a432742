"""Rejection sampling for speculative decoding: verify K proposals per row against the target in one pass.

The standard rule (Leviathan et al. 2023; Chen et al. 2023), per row and per proposal position j:

    accept proposal d_j with probability min(1, p_j(d_j) / q_j(d_j));
    at the first rejection, emit a token drawn from normalise(max(0, p_j - q_j)) and stop;
    when all k proposals are accepted, emit a bonus token drawn from p_k.

p_j and q_j are the target's and the draft's distributions *after* the row's own sampling parameters
(logit bias, penalties, temperature, top-k, top-p, min-p; `sampler.process_logits` and
`sampler.filtered_probs`, the very code the plain sampler runs), so the emitted tokens follow exactly the
distribution plain sampling would give. Deterministic proposers (n-gram lookup) have q one-hot at d_j:
accept with probability p_j(d_j), and on rejection draw from p_j with d_j removed. Greedy rows reduce to
"accept while d_j == argmax p_j, then emit the argmax", i.e. exactly the tokens of greedy decoding.

Randomness: sub-row (r, j) samples the token at position `num_tokens + j` of its sequence, and its
metadata carries that position and the row's seed. The acceptance test uses the uniform of
`fold_in(fold_in(key(seed), position), ACCEPT_STREAM)`; the emitted (recovered or bonus) token uses the
plain sampler's uniform `fold_in(key(seed), position)`. So a row with no proposals draws exactly the token
`sampler.sample` would, and no row's tokens depend on the rest of its batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

# NOTE: the plain sampler's blocked argmax and two-level inverse CDF, reused so that a row without proposals
# gets bit-identical tokens to `sampler.sample`.
from jaxserve.model.sampler import (
    GREEDY_TEMPERATURE,
    NUM_CANDIDATES,
    SamplingMetadata,
    _argmax,
    _inverse_cdf,
    draw_uniforms,
    filtered_probs,
    process_logits,
)

ACCEPT_STREAM = 0x5EC  # folded into a position's key for the acceptance uniforms


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RejectionOutput:
    token_ids: jax.Array  # [R, L] i32: accepted proposals, then the recovered or bonus token, then -1
    num_emitted: jax.Array  # [R] i32 in [1, k_r + 1]: accepted proposals + 1


def rejection_sample(target_logits: jax.Array, draft_ids: jax.Array, num_draft: jax.Array, md: SamplingMetadata,
                     draft_probs: jax.Array | None = None, *,
                     num_candidates: int = NUM_CANDIDATES) -> RejectionOutput:
    """Verifies each row's proposals and emits between 1 and k_r + 1 tokens per row.

    Args:
      target_logits: [R, L, V] raw target logits, L = K + 1: row r's logits at its last known token (which
        predict d_0) and at each of its proposals (left aligned; entries past k_r are ignored).
      draft_ids: [R, K] i32, the proposals d_0 .. d_{K-1} (entries past k_r are ignored).
      num_draft: [R] i32, k_r in [0, K].
      md: SamplingMetadata of R * L rows in row-major order: row r * L + j samples the token at position
        `num_tokens_r + j` (history = prompt + output + d_0 .. d_{j-1} where penalties apply).
      draft_probs: [R, K, V] the draft's filtered probabilities q_j (rows sum to 1), or None for
        deterministic proposals (q one-hot).
      num_candidates: static; see `sampler.sample`.
    Returns:
      RejectionOutput.
    """
    num_rows, length, vocab = target_logits.shape
    k_max = length - 1
    x = process_logits(target_logits.reshape(num_rows * length, vocab), md)  # [RL, V]
    greedy = _argmax(x).reshape(num_rows, length)  # [R, L]
    is_random = md.temperature > GREEDY_TEMPERATURE  # [RL]
    row_random = is_random.reshape(num_rows, length)[:, 0]  # [R]; sub-rows share the row's temperature
    valid = jnp.arange(k_max)[None, :] < num_draft[:, None]  # [R, K]
    rows = jnp.arange(num_rows)

    def first_rejection(accept):  # [R, K] bool -> [R] accepted proposals before the first rejection
        return jnp.sum(jnp.cumprod(accept & valid, axis=1), axis=1).astype(jnp.int32)

    def greedy_path():
        num_accepted = first_rejection(draft_ids == greedy[:, :k_max])
        return num_accepted, greedy[rows, num_accepted]

    def random_path():
        probs = filtered_probs(x, md, is_random, num_candidates).reshape(num_rows, length, vocab)  # unnormalised
        p = probs / probs.sum(-1, keepdims=True)  # [R, L, V]
        p_d = jnp.take_along_axis(p[:, :k_max], draft_ids[..., None], -1)[..., 0]  # [R, K]
        if draft_probs is None:
            q_d = jnp.ones_like(p_d)
        else:
            q_d = jnp.take_along_axis(draft_probs, draft_ids[..., None], -1)[..., 0]
        u = draw_uniforms(md, ACCEPT_STREAM).reshape(num_rows, length)[:, :k_max]  # [R, K]
        # u < p/q, written without the division (q_d = 0 cannot have been proposed; p_d = 0 never passes).
        accept = jnp.where(row_random[:, None], u * q_d < p_d, draft_ids == greedy[:, :k_max])
        num_accepted = first_rejection(accept)
        rejected = num_accepted < num_draft  # [R]
        p_a = p[rows, num_accepted]  # [R, V]
        d_a = draft_ids[rows, jnp.minimum(num_accepted, k_max - 1)] if k_max else jnp.zeros(num_rows, jnp.int32)
        if draft_probs is None:
            q_a = jax.nn.one_hot(d_a, vocab, dtype=p.dtype)
        else:
            q_a = draft_probs[rows, jnp.minimum(num_accepted, k_max - 1)]
        residual = jnp.maximum(p_a - q_a, 0.0)
        # NOTE: a bonus draw uses the unnormalised probabilities exactly as `sampler.sample` does, so a row
        # without proposals gets its token; an (impossible in exact arithmetic) empty residual falls back to p.
        fallback = probs[rows, num_accepted]
        use_residual = rejected & (residual.sum(-1) > 0)
        dist = jnp.where(use_residual[:, None], residual, fallback)
        u_draw = draw_uniforms(md).reshape(num_rows, length)[rows, num_accepted]
        drawn = _inverse_cdf(dist, u_draw)
        return num_accepted, jnp.where(row_random, drawn, greedy[rows, num_accepted])

    num_accepted, last = lax.cond(jnp.any(row_random), random_path, greedy_path)
    j = jnp.arange(length)[None, :]  # [1, L]
    padded = jnp.concatenate([draft_ids, jnp.zeros((num_rows, 1), draft_ids.dtype)], axis=1)  # [R, L]
    tokens = jnp.where(j < num_accepted[:, None], padded, jnp.where(j == num_accepted[:, None], last[:, None], -1))
    return RejectionOutput(tokens.astype(jnp.int32), num_accepted + 1)
