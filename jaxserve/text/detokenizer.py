"""Incremental detokenization: token ids in, text deltas out, never half a character (no JAX).

Decoding one token at a time is wrong twice over: a byte-level token can end in the middle of a UTF-8
character, and SentencePiece-style decoders change a token's text by what precedes it (the leading space).
So, like vLLM and TGI, we decode a short window of already-emitted tokens (`prefix_offset:read_offset`)
and the same window plus the new tokens, and emit the difference, unless the new text ends in U+FFFD,
which means the last character is still incomplete and the next token will finish it.
"""

from __future__ import annotations

from typing import Iterable

_REPLACEMENT = "\ufffd"
# Prompt tokens kept as left context: enough for any decoder's dependence on the previous token.
_PROMPT_CONTEXT = 5


class IncrementalDetokenizer:
    """The text of one generated sequence, as deltas.

    `add()` returns only complete characters; `flush()` returns whatever was held back (call it when the
    sequence ends: text that truly ends in U+FFFD is otherwise released only by the next token). The
    deltas concatenate to `tokenizer.decode(generated_ids)` for byte-level vocabularies; after a prompt a
    SentencePiece token's leading space is kept (it is a real space there), as vLLM does.
    """

    def __init__(self, tokenizer, prompt_token_ids: Iterable[int] = (), skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_token_ids)[-_PROMPT_CONTEXT:]
        self._prefix_offset = 0  # NOTE: _ids[prefix:read] was emitted already and is the left context
        self._read_offset = len(self._ids)
        self._num_prompt = len(self._ids)
        self.text = ""  # everything emitted so far (stop-string search runs over this)

    @property
    def token_ids(self) -> list[int]:
        """The generated ids so far."""
        return self._ids[self._num_prompt:]

    def add(self, token_ids: int | Iterable[int]) -> str:
        """Appends one id or several; returns the newly complete text (maybe "")."""
        self._ids.extend([int(token_ids)] if isinstance(token_ids, int) else (int(t) for t in token_ids))
        return self._emit(final=False)

    def flush(self) -> str:
        """Everything not emitted yet, even an incomplete character (as U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset:self._read_offset], self.skip_special_tokens)
        new_text = decode(self._ids[self._prefix_offset:], self.skip_special_tokens)
        if len(new_text) <= len(prefix_text) or (new_text.endswith(_REPLACEMENT) and not final):
            return ""
        delta = new_text[len(prefix_text):]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self.text += delta
        return delta
