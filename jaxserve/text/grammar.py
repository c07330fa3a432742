"""Grammars for constrained decoding, on llguidance (plain Python + the llguidance wheel, no JAX).

`GrammarCompiler` turns a request's `StructuredOutputsParams` into a compiled llguidance matcher (validated,
cached by the constraint, under a time and size limit) and hands each sequence its own `GrammarMatcher`, which
advances on the sequence's tokens and fills the allowed-token bitmask of its next step: bit t of word t // 32
(little-endian within the int32) set = token t allowed, over the *model's* vocabulary (ids the tokenizer lacks
are never allowed). Why llguidance and not xgrammar / outlines-core: docs/structured-output.md.

Errors in a constraint raise `SamplingParamsError("structured_outputs", ...)` from `compile`, which the engine
calls at submission (so the server answers 400 before any compute).
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import threading
import time
from typing import Sequence

import llguidance
import numpy as np

from jaxserve.core.sampling_params import SamplingParamsError
from jaxserve.core.structured_outputs import StructuredOutputsParams

# NOTE: JSON without free whitespace between tokens (json.dumps' separators): a model cannot pad its output
# with endless blanks, and the output reads like json.dumps. Whitespace inside strings is unaffected.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
# Parser limits (llguidance's; each bounds the work of compiling or of one step's mask). Lower than
# llguidance's defaults for the grammar size so that a pathological schema is refused up front.
PARSER_LIMITS = dict(max_grammar_size=200_000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
                     step_max_items=50_000, max_lexer_states=250_000)
# Longest a constraint may take to compile (seconds); a slower one is refused rather than stalling its request.
MAX_COMPILE_SECONDS = 10.0
# Largest constraint text accepted (characters of the schema / regex / grammar / choices).
MAX_CONSTRAINT_CHARS = 256 * 1024


def bitmask_width(vocab_size: int) -> int:
    """W: int32 words per bitmask row, ceil(V / 32)."""
    return -(-vocab_size // 32)


def ids_to_bitmask(ids: Sequence[int], vocab_size: int) -> np.ndarray:
    """[W] int32 with the bits of `ids` set."""
    bits = np.zeros(bitmask_width(vocab_size) * 32, np.uint8)
    bits[np.asarray(ids, np.int64)] = 1
    return np.packbits(bits, bitorder="little").view(np.int32)


def bitmask_to_ids(mask: np.ndarray, vocab_size: int) -> np.ndarray:
    """The token ids a [W] bitmask allows."""
    bits = np.unpackbits(np.ascontiguousarray(mask, np.int32).view(np.uint8), bitorder="little")[:vocab_size]
    return np.flatnonzero(bits)


def llg_tokenizer(tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of our tokenizer (jaxserve.text.tokenizer.Tokenizer), over the model's `vocab_size`.

    A Hugging Face `tokenizers` backend (also what a GGUF vocabulary is rebuilt as) is handed over as its JSON;
    a SentencePiece one as the byte string of every piece.
    """
    backend = tokenizer._backend
    eos = list(tokenizer.eog_ids) or [0]
    if hasattr(backend, "tok"):
        return llguidance.LLTokenizer(backend.tok.to_str(), n_vocab=vocab_size, eos_token=eos)
    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_PieceTokenizer(tokenizer, eos[0])),
                                  n_vocab=vocab_size, eos_token=eos)


class _PieceTokenizer:
    """The attributes llguidance.TokenizerWrapper reads, for a SentencePiece vocabulary.

    NOTE: `__call__` tokenizes by greedy longest match over the pieces' bytes, not with SentencePiece: its
    dummy "▁" prefix makes llguidance shift every token's text by that space (measured: the masks of regex
    "fox" then allowed "▁fox"). llguidance needs a valid tokenization here, not the canonical one.
    """

    def __init__(self, tokenizer, eos_id: int):
        self.eos_token_id, self.bos_token_id = eos_id, tokenizer.bos_id
        self.special_token_ids = [i for i in (tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id) if i is not None]
        self.tokens = [_piece_bytes(tokenizer.id_to_piece(i)) for i in range(tokenizer.vocab_size)]
        special = set(self.special_token_ids)
        self._ids = {b: i for i, b in reversed(list(enumerate(self.tokens))) if b and i not in special}
        self._longest = max(map(len, self._ids))

    def __call__(self, text: str | bytes) -> list[int]:
        data = text.encode() if isinstance(text, str) else text
        out, i = [], 0
        while i < len(data):
            for n in range(min(self._longest, len(data) - i), 0, -1):
                token = self._ids.get(data[i:i + n])
                if token is not None:
                    out.append(token)
                    i += n
                    break
            else:
                i += 1  # a byte no piece spells (a vocabulary without byte fallback): skipped
        return out


def _piece_bytes(piece: str) -> bytes:
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # byte fallback
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode()


def grammar_text(so: StructuredOutputsParams) -> str:
    """The llguidance grammar of a constraint (not yet validated). Raises SamplingParamsError on malformed input."""
    kind = so.kinds()[0]
    size = len(so.json if isinstance(so.json, str) else json.dumps(so.json) if so.json is not None else "") + sum(
        len(x) for x in (so.regex or "", so.grammar or "", *(so.choice or ())))
    if size > MAX_CONSTRAINT_CHARS:
        raise SamplingParamsError("structured_outputs", f"structured_outputs.{kind} is {size} characters; the limit "
                                                        f"is {MAX_CONSTRAINT_CHARS}")
    try:
        if so.json is not None:
            schema = json.loads(so.json) if isinstance(so.json, str) else so.json
            if not isinstance(schema, (dict, bool)):
                raise ValueError(f"a JSON schema is an object or a boolean, not {type(schema).__name__}")
            return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        if so.json_object:
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if so.regex is not None:
            return llguidance.LLMatcher.grammar_from_regex(so.regex)
        if so.choice is not None:
            if not so.choice or not all(isinstance(c, str) and c for c in so.choice):
                raise ValueError("choice must be a non-empty list of non-empty strings")
            # NOTE: Lark string literals take JSON's escapes, so json.dumps quotes any choice safely.
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in so.choice))
        return llguidance.LLMatcher.grammar_from_lark(so.grammar)
    except (ValueError, TypeError) as e:
        raise SamplingParamsError("structured_outputs", f"structured_outputs.{kind} is invalid: {e}") from e


def constraint_key(so: StructuredOutputsParams) -> str:
    """A canonical text of the constraint (cache key): schemas compare by content, not by key order."""
    def canon(value):
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                return value
        return value
    return json.dumps({"kind": so.kinds(), "json": canon(so.json) if so.json is not None else None,
                       "json_object": so.json_object, "regex": so.regex, "choice": so.choice, "grammar": so.grammar},
                      sort_keys=True, default=str)


class GrammarCompiler:
    """Compiles constraints once (an LRU cache keyed by the constraint) and makes per-sequence matchers.

    Thread-safe: the server's request threads call `compile` at submission; the engine thread calls `matcher`.
    """

    def __init__(self, tokenizer, vocab_size: int, *, cache_size: int = 256,
                 max_compile_seconds: float = MAX_COMPILE_SECONDS):
        self.vocab_size = vocab_size
        self.width = bitmask_width(vocab_size)
        self.max_compile_seconds = max_compile_seconds
        self._tokenizer = tokenizer
        self._llg_tokenizer: llguidance.LLTokenizer | None = None
        self._cache: collections.OrderedDict[str, llguidance.LLMatcher] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        # NOTE: compiles run here so that one too slow to wait for can be given up on (the thread finishes it in
        # the background and its result is dropped); llguidance releases the GIL while it compiles.
        self._pool = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="jaxserve-grammar")
        self._limits = llguidance.LLParserLimits(**PARSER_LIMITS)

    def prepare(self) -> None:
        """Builds llguidance's tokenizer in the background now, so the first constrained request does not wait."""
        self._pool.submit(lambda: self.llg_tokenizer)

    @property
    def llg_tokenizer(self) -> llguidance.LLTokenizer:
        with self._lock:
            if self._llg_tokenizer is None:  # ~0.2 s for a 49k vocabulary: built on first use only
                self._llg_tokenizer = llg_tokenizer(self._tokenizer, self.vocab_size)
            return self._llg_tokenizer

    def compile(self, so: StructuredOutputsParams) -> llguidance.LLMatcher:
        """The compiled (initial-state) matcher of a constraint; raises SamplingParamsError naming what is wrong."""
        key = constraint_key(so)
        with self._lock:
            if key in self._cache:
                self._cache.move_to_end(key)
                return self._cache[key]
        grammar = grammar_text(so)
        tokenizer = self.llg_tokenizer
        t0 = time.perf_counter()
        future = self._pool.submit(self._build, grammar, tokenizer)
        try:
            matcher = future.result(timeout=self.max_compile_seconds)
        except concurrent.futures.TimeoutError:
            matcher = None
        # NOTE: a compile that finished just past the limit is refused too, so the limit means one thing.
        if matcher is None or time.perf_counter() - t0 > self.max_compile_seconds:
            raise SamplingParamsError("structured_outputs", f"structured_outputs.{so.kinds()[0]} took longer than "
                                      f"{self.max_compile_seconds:g} s to compile; simplify it")
        if matcher.is_error():
            raise SamplingParamsError("structured_outputs",
                                      f"structured_outputs.{so.kinds()[0]} is invalid: {_first_line(matcher)}")
        with self._lock:
            self._cache[key] = matcher
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher

    def _build(self, grammar: str, tokenizer) -> llguidance.LLMatcher:
        return llguidance.LLMatcher(tokenizer, grammar, log_level=0, limits=self._limits)

    def matcher(self, so: StructuredOutputsParams) -> "GrammarMatcher":
        """A fresh matcher (at the start of the output) for one sequence."""
        return GrammarMatcher(self.compile(so).deep_copy(), self.width, self._tokenizer.eog_ids)


def _first_line(matcher: llguidance.LLMatcher) -> str:
    # NOTE: llguidance's verbose errors append the parser state and the grammar; the first lines say what is wrong.
    return matcher.get_error().split("\n<state>")[0].strip()


class GrammarMatcher:
    """One sequence's position in its grammar; `num_consumed` output tokens are behind it.

    NOTE: an end-of-generation token that comes once the grammar accepts is never fed to llguidance (which
    errs on a second one): it sets `ended`, and from then on only end-of-generation tokens are allowed. Such
    tokens only follow one another when min_tokens or ignore_eos keep a finished request going.
    """

    def __init__(self, matcher: llguidance.LLMatcher, width: int, eos_ids: Sequence[int]):
        self._m = matcher
        self.width = width
        self.num_consumed = 0
        self.ended = False
        self._eos = frozenset(int(t) for t in eos_ids)

    @property
    def llg(self) -> llguidance.LLMatcher:
        return self._m

    def sync(self, output_token_ids: Sequence[int]) -> bool:
        """Consumes the output tokens it has not seen yet; False if one breaks the grammar (then `error`)."""
        new = [int(t) for t in output_token_ids[self.num_consumed:]]
        self.num_consumed = len(output_token_ids)
        if self.ended or self._m.is_error() or not new:
            return not self._m.is_error()
        if self._eos.isdisjoint(new):
            self._m.consume_tokens(new)
            return not self._m.is_error()
        for t in new:
            if self.ended:
                break
            if t in self._eos and self._m.is_accepting():
                self.ended = True
            elif not self._m.consume_token(t):
                break
        return not self._m.is_error()

    def fill(self, out: np.ndarray) -> None:
        """Writes the next token's allowed bitmask into `out` ([W] int32, C-contiguous)."""
        if self.ended:
            out[:] = 0
            for t in self._eos:
                out[t // 32] |= np.int32(np.uint32(1 << (t % 32)).view(np.int32))
            return
        self._m.unsafe_compute_mask_ptr(out.ctypes.data, out.nbytes)

    def fill_after(self, proposals: Sequence[int], out: np.ndarray) -> bool:
        """The bitmask after `proposals` (speculative tokens), leaving the state as it was. False (and `out` all
        ones: the position is never reached) if a proposal breaks the grammar."""
        proposals = [int(t) for t in proposals]
        n = self._m.try_consume_tokens(proposals) if proposals else 0
        if n == len(proposals):
            self.fill(out)
        else:
            out[:] = -1
        if n:
            self._m.rollback(n)
        return n == len(proposals)

    def fill_each(self, proposals: Sequence[int], out: np.ndarray) -> None:
        """out[j] ([k + 1, W]): the bitmask after the first j proposals, j = 0..k, leaving the state as it was;
        rows past a proposal that breaks the grammar are all ones (never reached)."""
        self.fill(out[0])
        consumed = 0
        for j, t in enumerate(proposals):
            if self.ended or self._m.is_error() or not self._m.try_consume_tokens([int(t)]):
                out[j + 1:] = -1
                break
            consumed += 1
            self.fill(out[j + 1])
        if consumed:
            self._m.rollback(consumed)

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` (after the consumed ones) the grammar accepts in a row."""
        return self._m.validate_tokens([int(t) for t in tokens]) if tokens else 0

    @property
    def is_stopped(self) -> bool:
        """The grammar is complete and allows nothing more (only end-of-generation tokens)."""
        return self.ended or self._m.is_stopped()

    @property
    def error(self) -> str | None:
        return _first_line(self._m) if self._m.is_error() else None
