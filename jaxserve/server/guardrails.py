"""Guardrails: a pluggable chain of input checks and output scanners, each stage usable alone.

Input stages look at a request before it reaches the engine and return a `Finding` to block it (the
server answers 400 `content_policy_violation`). They see all of it: every message of every role (or every
prompt), the whole text, matched after `normalize.for_matching` (NFKC, confusables such as a Cyrillic "о"
mapped to ASCII, soft hyphens and zero-width characters dropped, case folded) and, where words matter,
`normalize.fold_punctuation` ("pipe-bomb" is "pipe bomb"):
  * `LengthLimit`: too many characters of prompt text.
  * `PromptInjectionScreen`: a scored pattern set. Each pattern has a weight; the score is
    1 - prod(1 - w) over the patterns that match, and the request is blocked at `threshold`. Cheap by
    construction: a pattern's regex runs only where its trigger words occur.
  * `ContentPolicy`: a blocklist of words or phrases, matched case-insensitively on word boundaries.

Output stages scan generated text and return every `Finding` with its span:
  * `PIIDetector`: US social security numbers, credit-card numbers (Luhn-checked), e-mail addresses,
    North-American phone numbers.
  * `ContentPolicy` again, on the output.

`OutputMonitor` applies the output stages to one choice while it streams. NOTE: text is held back until
it has been scanned (every `check_every_tokens` tokens and at the end), and after a scan each stage
holds back the tail that could still grow into one of its hits (`hold_from`: a trailing run of the
characters an e-mail, phone, SSN or card number is made of; the start of a blocked phrase), at most
`holdback_chars` of it. So a hit is never half sent unless it is longer than that, and ordinary prose
streams about one word behind the model. On a hit the choice either stops (`finish_reason: content_filter`,
the text before the hit is kept) or, with the "redact" action, the hit is replaced by `[REDACTED]` and
generation goes on.

When generation is cut off (max_tokens, a stop string, an abort) the held-back tail may be the front of a
hit the model never finished (" john.doe" of an e-mail): the last scan includes the stop string that was
matched (not sent), and a tail that a stage's `partial_from` calls the start of a hit is treated as a hit
too (dropped, or redacted). A choice the model ended itself (EOS, a stop token) is complete as it is.

No JAX and no engine here; `GuardrailChain.from_config` builds the default chain.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from typing import Iterable, Protocol, Sequence

from jaxserve.server.normalize import fold_punctuation, for_matching

REDACTED = "[REDACTED]"

# A short, high-precision default: phrases with no benign reading. Operators extend it with
# --guardrail-blocklist / --guardrail-blocklist-file; an empty list switches the stage's effect off.
DEFAULT_BLOCKLIST = (
    "build a pipe bomb",
    "make a pipe bomb",
    "synthesize sarin",
    "synthesize nerve agent",
    "child sexual abuse material",
)


@dataclasses.dataclass(frozen=True)
class GuardrailConfig:
    """Which stages run and how, once `enabled`. The server runs none by default (`ServingConfig` passes
    `enabled=False`); `--guardrails` turns every stage on, each stage's own flag turns it on alone."""

    enabled: bool = True  # master switch
    input_length: bool = True
    max_input_chars: int = 65536
    injection: bool = True
    injection_threshold: float = 0.8
    content_policy: bool = True
    blocklist: tuple[str, ...] = DEFAULT_BLOCKLIST
    pii: bool = True
    check_every_tokens: int = 1  # 0: scan the output only when the choice ends (a scan takes microseconds)
    holdback_chars: int = 64  # the most characters held back while they could still grow into a hit
    action: str = "stop"  # "stop": finish with content_filter; "redact": replace the hit and go on

    def __post_init__(self):
        if self.action not in ("stop", "redact"):
            raise ValueError(f"guardrail action must be 'stop' or 'redact', got {self.action!r}")
        if not 0 < self.injection_threshold <= 1:
            raise ValueError(f"injection_threshold must be in (0, 1], got {self.injection_threshold}")
        if self.max_input_chars < 1 or self.check_every_tokens < 0 or self.holdback_chars < 0:
            raise ValueError("max_input_chars must be positive; check_every_tokens and holdback_chars >= 0")


@dataclasses.dataclass(frozen=True)
class Finding:
    stage: str  # "input_length" | "prompt_injection" | "content_policy" | "pii"
    kind: str  # what matched: "ssn", "credit_card", "email", "phone", a blocklist term, pattern names
    start: int = 0
    end: int = 0
    score: float = 1.0

    def describe(self) -> str:
        return f"{self.stage} ({self.kind})"


class InputStage(Protocol):
    name: str

    def check(self, text: str) -> Finding | None: ...


class OutputStage(Protocol):
    name: str

    def scan(self, text: str) -> list[Finding]: ...

    def hold_from(self, text: str) -> int:
        """Where the tail of `text` that could still grow into a hit starts (len(text): nothing to hold)."""
        ...

    def partial_from(self, text: str) -> int:
        """Where a tail that already looks like the start of a hit begins (len(text): none). Stricter than
        `hold_from`: what a cut-off generation must not release."""
        ...


# ---------------------------------------------------------------------------- input stages

class LengthLimit:
    name = "input_length"

    def __init__(self, max_chars: int):
        self.max_chars = max_chars

    def check(self, text: str) -> Finding | None:
        if len(text) > self.max_chars:
            return Finding(self.name, f"{len(text)} characters over the limit of {self.max_chars}")
        return None


# "Never reveal your system prompt" is a system prompt, not an attack (every message is screened): a match of
# these patterns right after a negation does not count. (Checked after a match: a lookbehind in the pattern
# would run at every position.) The text is matched with single spaces (see `PromptInjectionScreen.score`).
NEGATABLE = frozenset({"ignore_previous", "reveal_system_prompt"})
_NEGATION = re.compile(r"(?:never|not|n't|n\u2019t|n t) $")  # "not" also ends "cannot"; "n t" is a folded "n't"

# (name, weight, trigger words, pattern). Weights: one unambiguous instruction override blocks alone at the
# default threshold 0.8; weaker signals (role-play, "jailbreak", special-token spoofing) need company.
# NOTE: a pattern's regex runs only when one of its trigger words occurs in the lower-cased text (a plain
# substring test in C), which keeps the screen in the tens of microseconds on ordinary prompts.
INJECTION_PATTERNS = (
    ("ignore_previous", 0.9, ("ignore", "disregard", "forget", "override"),
     r"\b(?:ignore|disregard|forget|override)\s+(?:all\s+|any\s+|the\s+|your\s+)*(?:previous|prior|above|earlier|"
     r"preceding|original|system)\s+(?:instructions|prompts?|rules|directions|guidelines|context)"),
    ("reveal_system_prompt", 0.8, ("prompt", "instructions", "message"),
     r"\b(?:reveal|show|print|repeat|output|leak|tell\s+me)\s+(?:me\s+)?(?:your|the)\s+(?:system|initial|hidden|"
     r"original|secret)\s+(?:prompt|instructions|message)"),
    ("do_anything_now", 0.7, ("anything", "dan"), r"\bdo\s+anything\s+now\b|\byou\s+are\s+(?:now\s+)?dan\b"),
    ("developer_mode", 0.6, ("developer",),
     r"\b(?:enable|activate|enter)\s+developer\s+mode\b|\bdeveloper\s+mode\s+(?:enabled|on)\b"),
    ("no_restrictions_roleplay", 0.7, ("pretend", "act", "behave", "imagine"),
     r"\b(?:pretend|act|behave|imagine)\b.{0,40}\byou\s+(?:have|are)\s+(?:no|not\s+bound\s+by|free\s+(?:of|from))\s+"
     r"(?:restrictions|rules|guidelines|filters|limitations)"),
    ("bypass_safety", 0.7, ("bypass", "override", "disable", "circumvent", "ignore"),
     r"\b(?:bypass|override|disable|circumvent|ignore)\s+(?:your|all|any|the)\s+(?:safety\s+|content\s+|security\s+)?"
     r"(?:filters|guidelines|restrictions|guardrails|policies|safeguards)"),
    ("jailbreak", 0.4, ("jailbr",), r"\bjailbr(?:eak|oken)\b"),
    ("role_spoof", 0.3, ("system", "assistant"), r"(?:^|\n)\s*(?:system|assistant)\s*:"),
    ("special_tokens", 0.5, ("<|", "[inst]", "[/inst]", "<<sys>>"),
     r"<\|(?:im_start|im_end|system|endoftext)\|>|\[/?inst\]|<<sys>>"),
    ("from_now_on", 0.3, ("from now on",), r"\bfrom\s+now\s+on,?\s+you\s+(?:will|must|are|shall)\b"),
    ("unfiltered", 0.3, ("without",), r"\bwithout\s+(?:any\s+)?(?:restrictions|censorship|filters|limitations)\b"),
)


class PromptInjectionScreen:
    name = "prompt_injection"

    def __init__(self, threshold: float = 0.8,
                 patterns: Sequence[tuple[str, float, tuple[str, ...], str]] = INJECTION_PATTERNS):
        """`patterns` are matched against the lower-cased text, so they are written in lower case."""
        self.threshold = threshold
        self.patterns = [(name, weight, triggers, re.compile(p)) for name, weight, triggers, p in patterns]

    def score(self, text: str) -> tuple[float, list[str]]:
        """Over all of `text`, normalised (punctuation kept: "<|im_start|>") and with punctuation folded
        ("ignore-all-previous-instructions"); a pattern counts once if it matches either."""
        text = for_matching(text)
        if "  " in text or "\t" in text:
            text = _HORIZONTAL_SPACE.sub(" ", text)
        folded = fold_punctuation(text) if _FOLDABLE.search(text) else None  # None: one pass is enough
        keep, names = 1.0, []
        for name, weight, triggers, pattern in self.patterns:
            if any(t in text for t in triggers) and (_matches(name, pattern, text) or
                                                      (folded is not None and _matches(name, pattern, folded))):
                keep *= 1.0 - weight
                names.append(name)
        return 1.0 - keep, names

    def check(self, text: str) -> Finding | None:
        score, names = self.score(text)
        if score >= self.threshold:
            return Finding(self.name, "+".join(names), score=round(score, 3))
        return None


_HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")  # runs of spaces and tabs (newlines kept for role_spoof)
_FOLDABLE = re.compile(r"[^\w\s]|_")  # what `fold_punctuation` would change (besides whitespace)


def _matches(name: str, pattern: re.Pattern, text: str) -> bool:
    for m in pattern.finditer(text):
        if name not in NEGATABLE or not _NEGATION.search(text, max(0, m.start() - 6), m.start()):
            return True
    return False


def _phrase_pattern(terms: Iterable[str]) -> re.Pattern:
    """Any of `terms` as whole words, longest first, whitespace inside a term matching any run of it."""
    alternatives = sorted((r"\s+".join(map(re.escape, t.split())) for t in terms), key=len, reverse=True)
    return re.compile(rf"(?<!\w)(?:{'|'.join(alternatives)})(?!\w)", re.IGNORECASE)


class ContentPolicy:
    """A blocklist of words and phrases; whitespace inside a phrase matches any run of whitespace. Outputs are
    scanned as they are (spans index the text); inputs (`check`) normalised, so "pipe-bomb", a Cyrillic "о"
    or a soft hyphen does not slip past."""

    name = "content_policy"

    def __init__(self, terms: Iterable[str]):
        self.terms = tuple(t.strip() for t in terms if t.strip())
        # Lower-cased, whitespace collapsed, sorted: a prefix test is one bisection (blocklists can be long).
        self._normalized = sorted(" ".join(t.lower().split()) for t in self.terms)
        self._longest = max(map(len, self.terms), default=0)
        self.pattern = _phrase_pattern(self.terms) if self.terms else None
        # Inputs: terms are matched on folded text ("pipe-bomb" as "pipe bomb"), except the few whose meaning is
        # in their punctuation ("c++" would fold to "c"): those on the normalised text as they are.
        folded, kept = set(), set()
        for term in self.terms:
            norm = " ".join(for_matching(term).split())
            fold = fold_punctuation(norm).strip()
            if 2 * len(fold.replace(" ", "")) > len(norm.replace(" ", "")):
                folded.add(fold)
            else:
                kept.add(norm)
        self._input_patterns = [(fold_text, _phrase_pattern(terms))
                                for fold_text, terms in ((True, folded), (False, kept)) if terms]

    def scan(self, text: str) -> list[Finding]:
        if self.pattern is None:
            return []
        return [Finding(self.name, " ".join(m.group(0).lower().split()), m.start(), m.end())
                for m in self.pattern.finditer(text)]

    def check(self, text: str) -> Finding | None:
        if not self._input_patterns:
            return None
        norm = for_matching(text)
        for fold_text, pattern in self._input_patterns:
            m = pattern.search(fold_punctuation(norm) if fold_text else norm)
            if m:
                return Finding(self.name, " ".join(m.group(0).split()))
        return None

    def partial_from(self, text: str) -> int:
        """A trailing start of a blocked phrase that already has half its characters ("synthesize sa")."""
        i = self.hold_from(text)
        if i < len(text):
            tail = " ".join(text[i:].lower().split())
            term = self._normalized[bisect.bisect_left(self._normalized, tail)]
            if 2 * len(tail) >= len(term):
                return i
        return len(text)

    def hold_from(self, text: str) -> int:
        """The start of the longest trailing words that begin a blocked phrase ("... build a pi")."""
        if self.pattern is None:
            return len(text)
        for i in range(max(0, len(text) - self._longest - 1), len(text)):
            if text[i].isalnum() and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
                tail = " ".join(text[i:].lower().split()) + (" " if text[-1].isspace() else "")
                j = bisect.bisect_left(self._normalized, tail)
                if j < len(self._normalized) and self._normalized[j].startswith(tail):
                    return i
        return len(text)


# ---------------------------------------------------------------------------- output stages

def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


class PIIDetector:
    name = "pii"

    # NOTE: formats are required where bare digits would be ambiguous: an SSN needs its dashes (or spaces),
    # a phone number its separators; the invalid SSN areas (000, 666, 9xx) and NANP rules (area and
    # exchange codes start with 2-9) cut false positives on dates, versions and order numbers.
    PATTERNS = {
        "ssn": re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d-])"),
        "credit_card": re.compile(r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d-])"),
        "email": re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])"),
        "phone": re.compile(r"(?<![\w+])(?:\+?1[ .-]?)?(?:\([2-9]\d{2}\)\s?|[2-9]\d{2}[ .-])"
                            r"[2-9]\d{2}[ .-]\d{4}(?!\d)"),
    }

    def __init__(self, kinds: Iterable[str] = ("ssn", "credit_card", "email", "phone")):
        self.kinds = tuple(kinds)

    # What the patterns above are made of: e-mail characters, and digits with their separators.
    RUN_CHARS = frozenset(".%+@()-_")

    def hold_from(self, text: str) -> int:
        """The start of the trailing run an e-mail, phone, SSN or card number could still be growing in:
        word characters and `RUN_CHARS`, and whitespace right after a digit or ")" (a number's separator)."""
        i = len(text)
        while i > 0:
            c = text[i - 1]
            if c.isalnum() or c in self.RUN_CHARS or (c.isspace() and i >= 2 and (text[i - 2].isdigit()
                                                                                  or text[i - 2] == ")")):
                i -= 1
            else:
                break
        return i

    # The start of a hit cut off at the end of the text: an e-mail's local part and "@", a dotted or
    # underscored local part with a letter ("john.doe"), a run of digits with the separators a phone, SSN or
    # card number uses (3+ digits and a separator, or 5+ digits; more than a card's 19 can no longer be one).
    PARTIAL = (re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]*$"),
               re.compile(r"(?<![\w.+-])(?=[\w%+-]*[A-Za-z])[A-Za-z0-9%+-]+(?:[._+][A-Za-z0-9%+-]+)+$"),
               re.compile(r"(?<![\w+])(?:\+?1[ .-]?)?\(?\d(?:[ .()-]{0,2}\d)*[ .()-]*$"))

    def partial_from(self, text: str) -> int:
        starts = [len(text)]
        for i, pattern in enumerate(self.PARTIAL):
            m = pattern.search(text)
            if m is None:
                continue
            if i == 2:
                digits = sum(c.isdigit() for c in m.group(0))
                separated = any(not c.isdigit() for c in m.group(0).strip())
                if not (digits >= 5 or (digits >= 3 and separated)) or digits > 19:
                    continue
            starts.append(m.start())
        return min(starts)

    def scan(self, text: str) -> list[Finding]:
        found = []
        for kind in self.kinds:
            for m in self.PATTERNS[kind].finditer(text):
                if kind == "credit_card":
                    digits = re.sub(r"\D", "", m.group(0))
                    if len(set(digits)) == 1 or not luhn_ok(digits):
                        continue
                found.append(Finding(self.name, kind, m.start(), m.end()))
        return found


# ---------------------------------------------------------------------------- the chain

class GuardrailChain:
    def __init__(self, input_stages: Sequence[InputStage] = (), output_stages: Sequence[OutputStage] = (),
                 injection: PromptInjectionScreen | None = None, *, check_every_tokens: int = 1,
                 holdback_chars: int = 64, action: str = "stop"):
        """`input_stages` and `injection` (if any) see all prompt text: every message, every role."""
        self.input_stages = list(input_stages)
        self.injection = injection
        self.output_stages = list(output_stages)
        self.check_every_tokens = check_every_tokens
        self.holdback_chars = holdback_chars
        self.action = action

    @classmethod
    def from_config(cls, cfg: GuardrailConfig) -> GuardrailChain:
        if not cfg.enabled:
            return cls()
        policy = ContentPolicy(cfg.blocklist) if cfg.content_policy else None
        inputs = [s for s in (LengthLimit(cfg.max_input_chars) if cfg.input_length else None, policy) if s]
        outputs = [s for s in (PIIDetector() if cfg.pii else None, policy) if s]
        injection = PromptInjectionScreen(cfg.injection_threshold) if cfg.injection else None
        return cls(inputs, outputs, injection, check_every_tokens=cfg.check_every_tokens,
                   holdback_chars=cfg.holdback_chars, action=cfg.action)

    def check_input(self, text: str) -> Finding | None:
        """The first finding that blocks this request, or None. `text`: all prompt text (every message)."""
        for stage in self.input_stages:
            finding = stage.check(text)
            if finding:
                return finding
        return self.injection.check(text) if self.injection is not None else None

    def monitor(self) -> OutputMonitor:
        return OutputMonitor(self)


class OutputMonitor:
    """Scans one choice's text as it grows and decides what may be sent; see the module docstring."""

    def __init__(self, chain: GuardrailChain):
        self.chain = chain
        self.active = bool(chain.output_stages)
        self.pending = ""  # received, not yet sent
        self.sent_tail = ""  # the last raw characters sent, context for hits that straddle a release
        self.tokens_since_scan = 0
        self.finding: Finding | None = None  # set when a hit ends the choice (action "stop")
        self.consumed = 0  # raw characters released (sent, or replaced by REDACTED)
        self.redacted_spans: list[tuple[int, int]] = []  # raw [start, end) of every redaction

    def feed(self, text: str, num_tokens: int, final: bool, *, cut_off: bool = False, lookahead: str = "") -> str:
        """Adds new text; returns the text that may be sent now. After a stopping hit, `finding` is set and
        everything after the hit is dropped. With `final`: `cut_off` says the model did not end the text itself
        (max_tokens, a stop string, an abort), and `lookahead` is text it generated that will not be sent (the
        stop string), scanned as context for a hit that runs into it."""
        if self.finding is not None:
            return ""
        if not self.active:
            self.consumed += len(text)
            return text
        self.pending += text
        self.tokens_since_scan += num_tokens
        every = self.chain.check_every_tokens
        if not final and (every == 0 or self.tokens_since_scan < every):
            return ""
        self.tokens_since_scan = 0
        ctx = self.sent_tail
        window = ctx + self.pending + (lookahead if final else "")
        ours = len(ctx) + len(self.pending)  # hits wholly inside the lookahead are not ours to send or drop
        found = [f for stage in self.chain.output_stages for f in stage.scan(window) if len(ctx) < f.end
                 and f.start < ours]
        if final and cut_off:  # the front of a hit the model never finished counts as one
            for stage in self.chain.output_stages:
                start = stage.partial_from(window)
                if start < ours and not any(f.start <= start < f.end for f in found):
                    found.append(Finding(stage.name, "cut off", start, len(window)))
        found.sort(key=lambda f: f.start)
        spans = [(max(0, f.start - len(ctx)), min(f.end, ours) - len(ctx), f) for f in found]
        if spans and self.chain.action == "stop":
            start, _, finding = spans[0]
            self.finding = finding
            out, self.pending = self.pending[:start], ""
            self.consumed += start
            return out
        cut = len(self.pending) if final else self._release_point(ctx)
        for start, end, _ in spans:  # never split a hit across a release: hold it whole
            if start < cut < end:
                cut = start
        raw, self.pending = self.pending[:cut], self.pending[cut:]
        out, pos = [], 0
        for start, end, _ in spans:
            if end <= cut and start >= pos:
                out += [raw[pos:start], REDACTED]
                pos = end
                self.redacted_spans.append((self.consumed + start, self.consumed + end))
        out.append(raw[pos:])
        self.consumed += cut
        self.sent_tail = (self.sent_tail + raw)[-max(self.chain.holdback_chars, 64):]
        return "".join(out)

    def _release_point(self, ctx: str) -> int:
        """How much of `pending` may go now: all but what some stage holds, and never more than
        `holdback_chars` held (a run longer than that is released from its front)."""
        window = ctx + self.pending
        hold = min(stage.hold_from(window) for stage in self.chain.output_stages) - len(ctx)
        return max(0, len(self.pending) - self.chain.holdback_chars, min(hold, len(self.pending)))
