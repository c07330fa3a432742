"""Teacher-forced scoring: next-token log-probs and greedy predictions for many sequences, packed into steps.

Used to measure quality (perplexity on a fixed text, greedy agreement on golden prompts) of dense and
quantized weights alike. Sequences are packed into steps of a fixed shape (T tokens, R rows), so one
compiled program serves every step of a given weights pytree.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.model import llama
from jaxserve.model.attention import paged_attention_xla
from jaxserve.model.step_inputs import SeqChunk, build_step_inputs


@dataclasses.dataclass
class Scored:
    logprobs: np.ndarray  # [n - 1] float32: log p(token t + 1 | tokens <= t)
    predictions: np.ndarray  # [n - 1] int32: the argmax at positions 0 .. n - 2


class Scorer:
    """Scores sequences of at most `num_tokens` tokens each, packed greedily into steps of (T, R)."""

    def __init__(self, cfg: ModelConfig, *, num_tokens: int = 512, num_rows: int = 8, page_size: int = 16):
        self.cfg, self.T, self.R, self.page = cfg, num_tokens, num_rows, page_size
        self.pages_per_row = -(-num_tokens // page_size)
        self._fn = jax.jit(self._step)

    def _step(self, weights, step, targets):
        kv = jnp.zeros(llama.kv_cache_shape(self.cfg, self.R * self.pages_per_row + 1, self.page),
                       weights.final_norm.dtype)
        logits, _ = llama.forward(weights, kv, step, self.cfg, paged_attention_xla)  # [T, V]
        logp = jax.nn.log_softmax(logits, axis=-1)
        return jnp.take_along_axis(logp, targets[:, None], axis=-1)[:, 0], jnp.argmax(logits, axis=-1)

    def score(self, weights, sequences: list[list[int]]) -> list[Scored]:
        """Next-token log-probs and greedy predictions of every sequence (each scored from its own start)."""
        if any(len(s) > self.T or len(s) < 2 for s in sequences):
            raise ValueError(f"every sequence must have 2..{self.T} tokens")
        out: list[Scored | None] = [None] * len(sequences)
        batch: list[int] = []
        for i in sorted(range(len(sequences)), key=lambda i: -len(sequences[i])) + [None]:
            if i is not None and len(batch) < self.R and sum(len(sequences[j]) for j in batch) + len(
                    sequences[i]) <= self.T:
                batch.append(i)
                continue
            self._run(weights, sequences, batch, out)
            batch = [] if i is None else [i]
        return out

    def _run(self, weights, sequences, batch, out) -> None:
        if not batch:
            return
        chunks, targets, t = [], np.zeros(self.T, np.int32), 0
        for r, i in enumerate(batch):
            ids = sequences[i]
            first = 1 + r * self.pages_per_row
            chunks.append(SeqChunk(list(ids), 0, list(range(first, first + self.pages_per_row))))
            targets[t:t + len(ids) - 1] = ids[1:]
            t += len(ids)
        step = build_step_inputs(chunks, num_tokens=self.T, num_rows=self.R, page_size=self.page,
                                 max_pages_per_seq=self.pages_per_row, all_logits=True)
        logp, pred = jax.device_get(self._fn(weights, jax.tree.map(jnp.asarray, step), jnp.asarray(targets)))
        t = 0
        for i in batch:
            n = len(sequences[i])
            out[i] = Scored(logp[t:t + n - 1], pred[t:t + n - 1].astype(np.int32))
            t += n

    def perplexity(self, weights, token_ids: list[int]) -> float:
        """exp(mean negative log-likelihood) over `token_ids`, cut into windows of T tokens scored separately."""
        windows = [token_ids[s:s + self.T] for s in range(0, len(token_ids), self.T)]
        windows = [w for w in windows if len(w) >= 2]
        scored = self.score(weights, windows)
        nll = -np.concatenate([s.logprobs for s in scored]).astype(np.float64)
        return float(math.exp(nll.mean()))


def greedy_agreement(scored: Scored, prompt_len: int, golden: list[int]) -> float:
    """Fraction of golden greedy tokens the weights also predict, teacher-forced on the golden continuation
    (`scored` is of prompt + golden)."""
    pred = scored.predictions[prompt_len - 1:prompt_len - 1 + len(golden)]
    return float(np.mean(pred == np.asarray(golden)))
