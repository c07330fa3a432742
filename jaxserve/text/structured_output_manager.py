"""StructuredOutputManager: each constrained sequence's matcher, and the bitmask rows of its next steps.

Engine thread only (except `validate`, which any submitting thread may call). A sequence is constrained by
`SamplingParams.structured_outputs` (a grammar: a `GrammarMatcher` that follows its output tokens) and/or
`allowed_token_ids` (a fixed bitmask); both given, a token must pass both. Free sequences have no entry, and
their rows get no mask (the runner fills all ones).

Matchers follow `Request.output_token_ids` lazily: before a mask is computed they consume the tokens they have
not seen. So preemption (which recomputes the KV of the same tokens) and speculative steps (several tokens at
once) need nothing special, and a speculative position's mask is the matcher advanced through the proposals
before it, then rolled back.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import numpy as np

from jaxserve.core.request import Request
from jaxserve.core.sampling_params import SamplingParams, SamplingParamsError
from jaxserve.text.grammar import GrammarCompiler, GrammarMatcher, ids_to_bitmask


@dataclasses.dataclass
class StructuredOutputStats:
    mask_rows: int = 0  # bitmask rows computed
    mask_seconds: float = 0.0  # host time spent computing them (advancing matchers included)
    compile_seconds: float = 0.0  # host time compiling constraints at submission (cache misses)


@dataclasses.dataclass
class _Entry:
    matcher: GrammarMatcher | None
    allowed: np.ndarray | None  # [W] int32, allowed_token_ids
    request: Request


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int):
        self.compiler = GrammarCompiler(tokenizer, vocab_size)
        self.vocab_size = vocab_size
        self.width = self.compiler.width
        self.stats = StructuredOutputStats()
        self._entries: dict[str, _Entry] = {}

    # ------------------------------------------------------------------ any thread

    def validate(self, params: SamplingParams) -> None:
        """Compiles the request's constraint (cached) and checks allowed_token_ids; raises SamplingParamsError."""
        if params.allowed_token_ids is not None:
            bad = [t for t in params.allowed_token_ids if not 0 <= int(t) < self.vocab_size]
            if bad:
                raise SamplingParamsError("allowed_token_ids", f"allowed_token_ids {bad[:5]} are outside the "
                                                               f"vocabulary [0, {self.vocab_size})")
        if params.structured_outputs is not None:
            t0 = time.perf_counter()
            self.compiler.compile(params.structured_outputs)
            self.stats.compile_seconds += time.perf_counter() - t0

    # ------------------------------------------------------------------ the engine thread

    def add(self, request: Request) -> None:
        params = request.sampling_params
        if params.structured_outputs is None and params.allowed_token_ids is None:
            return
        matcher = self.compiler.matcher(params.structured_outputs) if params.structured_outputs else None
        allowed = None
        if params.allowed_token_ids is not None:
            allowed = ids_to_bitmask(params.allowed_token_ids, self.vocab_size)
        self._entries[request.request_id] = _Entry(matcher, allowed, request)

    def remove(self, request_id: str) -> None:
        self._entries.pop(request_id, None)

    def is_constrained(self, request_id: str) -> bool:
        return request_id in self._entries

    def bitmask(self, request: Request, proposals: Sequence[int] = ()) -> np.ndarray | None:
        """[W] int32: the tokens allowed after the request's output and then `proposals`; None if unconstrained."""
        entry = self._entries.get(request.request_id)
        if entry is None:
            return None
        if entry.matcher is None:
            return entry.allowed
        t0 = time.perf_counter()
        out = np.empty(self.width, np.int32)
        matcher = entry.matcher
        matcher.sync(request.output_token_ids)
        if proposals:
            matcher.fill_after(proposals, out)
        else:
            matcher.fill(out)
        if entry.allowed is not None:
            out &= entry.allowed
        self.stats.mask_rows += 1
        self.stats.mask_seconds += time.perf_counter() - t0
        return out

    def grammar_done(self, request: Request) -> bool:
        """The grammar is complete and allows nothing but an end-of-generation token."""
        entry = self._entries.get(request.request_id)
        if entry is None or entry.matcher is None:
            return False
        entry.matcher.sync(request.output_token_ids)
        return entry.matcher.is_stopped

    def grammar_ended(self, request: Request) -> bool:
        """An end-of-generation token came after the grammar was complete."""
        entry = self._entries.get(request.request_id)
        if entry is None or entry.matcher is None:
            return False
        entry.matcher.sync(request.output_token_ids)
        return entry.matcher.ended

    def error(self, request: Request) -> str | None:
        """Why the request's output broke its grammar (a matcher past its step limits), else None."""
        entry = self._entries.get(request.request_id)
        if entry is None or entry.matcher is None:
            return None
        entry.matcher.sync(request.output_token_ids)
        return entry.matcher.error

    def truncate_proposals(self, requests: Sequence[Request]) -> None:
        """Cuts each constrained request's speculative proposals at the first token its grammar rejects."""
        for request in requests:
            entry = self._entries.get(request.request_id)
            if entry is None or not request.spec_token_ids:
                continue
            keep = len(request.spec_token_ids)
            if entry.matcher is not None:
                entry.matcher.sync(request.output_token_ids)
                keep = entry.matcher.valid_prefix(request.spec_token_ids)
            if entry.allowed is not None:
                ok = [bool(entry.allowed[t // 32] >> (t % 32) & 1) for t in request.spec_token_ids[:keep]]
                keep = ok.index(False) if False in ok else keep
            request.spec_token_ids = request.spec_token_ids[:keep]
