"""Text as the input guardrails match it: one spelling for the many ways Unicode can write the same word.

An attacker writes "pipe bomb" as "pipe-bomb", "pіpe bomb" (Cyrillic і), "pipe\u00adbomb" (soft hyphen) or with
zero-width characters between the letters; a blocklist or a regex over the raw text misses them all.
`for_matching` undoes those tricks and `fold_punctuation` makes punctuation between words a space. Both are
only for matching: the text the model sees is never changed.

The confusables table is Unicode's (TR39 confusables.txt) as the `confusable-homoglyphs` package ships it:
every non-ASCII character that looks like one ASCII letter or digit maps to it.
"""

from __future__ import annotations

import functools
import re
import unicodedata


@functools.cache
def _confusables() -> dict[int, str]:
    """ord(character) -> the ASCII letter or digit it looks like (lower case), built once on first use."""
    from confusable_homoglyphs.confusables import confusables_data  # a 9,600-entry JSON: load it only if used

    table = {}
    for char, glyphs in confusables_data.items():
        if len(char) != 1 or char.isascii():
            continue
        ascii_alnum = [g["c"] for g in glyphs if len(g["c"]) == 1 and g["c"].isascii() and g["c"].isalnum()]
        if ascii_alnum:
            table[ord(char)] = ascii_alnum[0].lower()
    return table


def for_matching(text: str) -> str:
    """NFKC (full-width, ligatures, compatibility forms), marks and invisible format characters (soft
    hyphen, zero-width space / joiners, bidi controls) dropped, confusables mapped to ASCII, case folded.
    NOTE: the result can be shorter or longer than `text`, so spans found in it do not index `text`."""
    if text.isascii():  # the common case, and nothing above applies to it
        return text.lower()
    text = unicodedata.normalize("NFKD", unicodedata.normalize("NFKC", text))
    text = "".join(c for c in text if unicodedata.category(c) not in ("Mn", "Me", "Cf"))
    return unicodedata.normalize("NFC", text).translate(_confusables()).casefold()


# Punctuation, symbols and underscores: what sits between the words of "pipe-bomb", "pipe_bomb", "pipe.bomb".
_PUNCTUATION = re.compile(r"[\W_]+")


def fold_punctuation(text: str) -> str:
    """Every run of non-word characters (punctuation, symbols, whitespace) becomes one space."""
    return _PUNCTUATION.sub(" ", text)
