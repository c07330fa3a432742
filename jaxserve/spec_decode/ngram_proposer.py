"""N-gram (prompt lookup) proposals: continue the longest recent n-gram match (plain Python + numpy, no JAX).

For a sequence t_0 .. t_{m-1} (prompt + output), take its last n tokens for n from `max_n` down to
`min_n`; at the most recent earlier occurrence of that n-gram, propose the (up to) k tokens that followed
it. The first n that matches wins, so longer, more specific contexts are preferred. This is vLLM's
`ngram` proposer (prompt lookup decoding, Saxena 2023): free to compute, strong when the output copies
from the context (extraction, summarisation, code edits), silent otherwise. Proposals are deterministic,
so the rejection sampler treats them as a one-hot draft distribution.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, num_tokens: int, min_n: int = 1, max_n: int = 4, max_context: int = 4096):
        if not 1 <= min_n <= max_n or num_tokens < 1:
            raise ValueError(f"need 1 <= min_n ({min_n}) <= max_n ({max_n}) and num_tokens >= 1")
        self.k = num_tokens
        self.min_n = min_n
        self.max_n = max_n
        self.max_context = max_context  # only the last this many tokens are searched

    def propose(self, token_ids: Sequence[int], k: int | None = None) -> list[int]:
        """Up to k (default: num_tokens) proposed continuations of `token_ids`; [] when nothing matches."""
        k = self.k if k is None else k
        tokens = np.asarray(token_ids[-self.max_context:], np.int64)
        m = len(tokens)
        for n in range(min(self.max_n, m - 1), self.min_n - 1, -1):
            # Windows that start at 0 .. m - n - 1: every earlier occurrence, never the suffix itself.
            windows = sliding_window_view(tokens[:-1], n)  # [m - n, n]
            hits = np.flatnonzero((windows == tokens[m - n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return tokens[start:start + k].tolist()
        return []
