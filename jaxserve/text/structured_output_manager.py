"""StructuredOutputManager: each constrained sequence's matcher, and the bitmask rows of its next steps.

Engine thread only (except `validate`, which any submitting thread may call). A sequence is constrained by
`SamplingParams.structured_outputs` (a grammar: a `GrammarMatcher` that follows its output tokens) and/or
`allowed_token_ids` (a fixed bitmask); both given, a token must pass both. Free sequences have no entry, and
their rows get no mask (the runner fills all ones).

Matchers follow `Request.output_token_ids` lazily: before a mask is computed they consume the tokens they have
not seen. So preemption (which recomputes the KV of the same tokens) and speculative steps (several tokens at
once) need nothing special, and a speculative position's mask is the matcher advanced through the proposals
before it, then rolled back.

Off the critical path: once a step's tokens are known (`update_from_output`), `prefetch` advances every
decoding constrained request's matcher and starts computing all their next masks at once on a worker thread
(llguidance's executor fills the rows in parallel and releases the GIL), while the engine thread finishes the
step and schedules the next one. `bitmask` then finds the row ready (or waits for it); a row nobody prefetched,
or one whose request has moved on since, is computed on the spot. Every other method waits for the worker
first, so a matcher is never touched by two threads at once.

NOTE: the hand-off only pays with a core to spare: on 2 cores shared with other work, waking the worker
cost more than the rows themselves (16 rows: 0.26 ms of work, 1.8 ms waiting; docs/structured-output.md),
so by default the worker is used only where the machine has at least `PREFETCH_MIN_CPUS` CPUs; otherwise
every row is computed on the spot, on the engine thread.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import time
from typing import Sequence

import llguidance
import numpy as np

from jaxserve.core.request import Request
from jaxserve.core.sampling_params import SamplingParams, SamplingParamsError
from jaxserve.text.grammar import GrammarCompiler, GrammarMatcher, ids_to_bitmask

# Rows a prefetch must hold before it goes to llguidance's parallel executor (fewer: one after another).
PARALLEL_MIN_ROWS = 4
# CPUs a machine needs before masks are computed ahead on a worker thread by default.
PREFETCH_MIN_CPUS = 4


@dataclasses.dataclass
class StructuredOutputStats:
    mask_rows: int = 0  # bitmask rows handed to steps
    prefetched_rows: int = 0  # of which computed ahead, on the worker thread
    # Engine-thread time the masks cost: advancing matchers, computing rows on the spot, waiting for the worker.
    mask_seconds: float = 0.0
    wait_seconds: float = 0.0  # of which waiting for the worker thread to finish its rows
    prefetch_seconds: float = 0.0  # worker-thread time computing rows ahead (overlapped with the engine thread)
    compile_seconds: float = 0.0  # host time compiling constraints at submission (cache misses)


@dataclasses.dataclass
class _Entry:
    matcher: GrammarMatcher | None
    allowed: np.ndarray | None  # [W] int32, allowed_token_ids
    request: Request


class StructuredOutputManager:
    def __init__(self, tokenizer, vocab_size: int, *, mask_threads: int | None = None,
                 prefetch: bool | None = None):
        """`prefetch`: compute the next masks ahead on a worker thread (None: where the machine has
        PREFETCH_MIN_CPUS CPUs); `mask_threads`: llguidance's threads for filling many rows at once."""
        self.compiler = GrammarCompiler(tokenizer, vocab_size)
        self.vocab_size = vocab_size
        self.width = self.compiler.width
        self.stats = StructuredOutputStats()
        self._entries: dict[str, _Entry] = {}
        self._eos_row = ids_to_bitmask(tokenizer.eog_ids, vocab_size)  # [W]
        # NOTE: llguidance's parallel executor pays a thread hand-off per call; on a 2-core machine shared with
        # other work that costs more than filling 16 rows one after another (2.4 ms against 0.4 ms a step,
        # measured), so it is used only with cores to spare.
        self._mask_threads = mask_threads or min(8, (os.cpu_count() or 1) - 1)
        self.prefetch_enabled = (os.cpu_count() or 1) >= PREFETCH_MIN_CPUS if prefetch is None else prefetch
        self._executor: llguidance.LLExecutor | None = None  # llguidance's thread pool, made on first use
        self._worker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="jaxserve-masks")
        self._pending: concurrent.futures.Future | None = None
        # request id -> (tokens its matcher had consumed, the [W] row), from the last prefetch
        self._ready: dict[str, tuple[int, np.ndarray]] = {}
        # request id -> ((output length, proposals), [k + 1, W] rows) of its last verify step
        self._verify_rows: dict[str, tuple[tuple, np.ndarray]] = {}

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
        self._wait()
        self._entries.pop(request_id, None)
        self._ready.pop(request_id, None)
        self._verify_rows.pop(request_id, None)

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
        self._wait()
        self.stats.mask_rows += 1
        ready = self._ready.pop(request.request_id, None)
        if ready is not None and not proposals and ready[0] == len(request.output_token_ids):
            self.stats.prefetched_rows += 1
            self.stats.mask_seconds += time.perf_counter() - t0
            return ready[1]
        matcher = entry.matcher
        matcher.sync(request.output_token_ids)
        spec = request.spec_token_ids
        if spec and list(proposals) == spec[:len(proposals)]:
            # A verify step asks for the rows after 0, 1, ..., k of the request's proposals: all in one pass.
            key = (len(request.output_token_ids), tuple(spec))
            cached = self._verify_rows.get(request.request_id)
            if cached is None or cached[0] != key:
                rows = np.empty((len(spec) + 1, self.width), np.int32)  # [k + 1, W]
                matcher.fill_each(spec, rows)
                for row in rows:
                    self._combine(entry, row)
                cached = self._verify_rows[request.request_id] = (key, rows)
            self.stats.mask_seconds += time.perf_counter() - t0
            return cached[1][len(proposals)]
        out = np.empty(self.width, np.int32)
        if proposals:
            matcher.fill_after(proposals, out)
        else:
            matcher.fill(out)
        self._combine(entry, out)
        self.stats.mask_seconds += time.perf_counter() - t0
        return out

    def _combine(self, entry: _Entry, row: np.ndarray) -> None:
        """ANDs allowed_token_ids into a grammar row. NOTE: where the two leave no token in common, the row
        allows only end-of-generation tokens, so the request ends there rather than sample an arbitrary id."""
        if entry.allowed is not None:
            row &= entry.allowed
            if not row.any():
                row[:] = self._eos_row

    def prefetch(self, requests: Sequence[Request]) -> None:
        """Starts computing the next masks of the constrained requests among `requests` that decode next (their
        next step samples after their last token), on the worker thread; returns at once."""
        if not self.prefetch_enabled:
            return
        t0 = time.perf_counter()
        self._wait()
        todo = []
        for request in requests:
            entry = self._entries.get(request.request_id)
            if entry is None or entry.matcher is None or request.num_computed_tokens != request.num_tokens - 1:
                continue
            # NOTE: matchers advance here, on the engine thread, while the request's tokens cannot change.
            if entry.matcher.sync(request.output_token_ids):
                todo.append((request.request_id, entry))
        if todo:
            self._pending = self._worker.submit(self._fill_rows, todo)
        self.stats.mask_seconds += time.perf_counter() - t0

    def _fill_rows(self, todo: list[tuple[str, _Entry]]) -> None:
        t0 = time.perf_counter()
        rows = np.empty((len(todo), self.width), np.int32)  # [n, W]
        par = [(e.matcher.llg, i) for i, (_, e) in enumerate(todo) if not e.matcher.ended]
        parallel = self._mask_threads > 1 and len(par) >= PARALLEL_MIN_ROWS
        if parallel:
            if self._executor is None:
                self._executor = llguidance.LLExecutor(self._mask_threads)
            # NOTE: one call fills every row, in parallel on llguidance's threads, without the GIL.
            self._executor.unsafe_compute_mask_ptr(par, rows.ctypes.data, self.width * 4, len(todo))
        for i, (rid, entry) in enumerate(todo):
            if entry.matcher.ended or not parallel:
                entry.matcher.fill(rows[i])  # releases the GIL too
            self._combine(entry, rows[i])
            self._ready[rid] = (entry.matcher.num_consumed, rows[i])
        self.stats.prefetch_seconds += time.perf_counter() - t0

    def _wait(self) -> None:
        if self._pending is not None:
            t0 = time.perf_counter()
            pending, self._pending = self._pending, None
            pending.result()  # re-raises what the worker raised
            self.stats.wait_seconds += time.perf_counter() - t0

    def _synced_matcher(self, request: Request):
        """The request's matcher, caught up with its output tokens; None for a free request."""
        entry = self._entries.get(request.request_id)
        if entry is None or entry.matcher is None:
            return None
        self._wait()
        entry.matcher.sync(request.output_token_ids)
        return entry.matcher

    def grammar_done(self, request: Request) -> bool:
        """The grammar is complete and allows nothing but an end-of-generation token."""
        matcher = self._synced_matcher(request)
        return matcher is not None and matcher.is_stopped

    def grammar_ended(self, request: Request) -> bool:
        """An end-of-generation token came after the grammar was complete."""
        matcher = self._synced_matcher(request)
        return matcher is not None and matcher.ended

    def error(self, request: Request) -> str | None:
        """Why the request's output broke its grammar (a matcher past its step limits), else None."""
        matcher = self._synced_matcher(request)
        return None if matcher is None else matcher.error

    def truncate_proposals(self, requests: Sequence[Request]) -> None:
        """Cuts each constrained request's speculative proposals at the first token its grammar rejects."""
        self._wait()
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
