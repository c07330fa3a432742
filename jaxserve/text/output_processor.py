"""Turns sampled token ids into text deltas: incremental detokenization and stop strings (no JAX).

A stop string must never reach the client, even in part: text that could still grow into a stop
string is held back until the next token decides it, and flushed when the request ends otherwise.
"""

from __future__ import annotations

from jaxserve.core.sampling_params import SamplingParams
from jaxserve.text.detokenizer import IncrementalDetokenizer


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class ChoiceText:
    """The text of one choice of one request, as it grows token by token."""

    def __init__(self, tokenizer, params: SamplingParams, prompt_token_ids: list[int]):
        self.params = params
        self.detokenizer = IncrementalDetokenizer(tokenizer, prompt_token_ids=prompt_token_ids,
                                                  skip_special_tokens=params.skip_special_tokens)
        self.text = ""
        self.stop_reason: str | None = None  # the stop string that ended the text
        self.emitted = 0  # characters of `text` already sent

    def add_tokens(self, token_ids: list[int], finishing: bool) -> tuple[str, bool]:
        """Appends tokens; returns (text delta to send, whether a stop string ended the choice)."""
        for token_id in token_ids:
            self.text += self.detokenizer.add(token_id)
        stops = self.params.stop
        if stops:
            search_from = max(0, self.emitted - max(len(s) for s in stops) + 1)
            hits = [(i, s) for i, s in ((self.text.find(s, search_from), s) for s in stops) if i >= 0]
            if hits:
                at, self.stop_reason = min(hits)
                self.text = self.text[:at + (len(self.stop_reason) if self.params.include_stop_str_in_output else 0)]
                return self._emit(len(self.text)), True
        end = len(self.text) if finishing or not stops else len(self.text) - _held_back(self.text, stops)
        return self._emit(end), False

    def flush(self) -> str:
        """Everything still held back (the choice ended without a stop string)."""
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        delta = self.text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return delta
