"""Text as npcchat compares and tokenizes it, in any language, Korean first.

* :func:`nfc`: llama.cpp does not normalize Unicode, and the tokenizer was trained on NFC
  text, so everything a prompt renders is NFC (decomposed Hangul typed by a player would
  otherwise tokenize differently from training).
* :func:`for_matching`: what a forbidden trigger is compared on: NFKC (full-width letters
  are letters), case-folded, every default-ignorable character (zero-width, direction
  marks, variation selectors, Hangul fillers) removed first, punctuation turned into spaces.
* :func:`terms`: words for lexical ranking, memory recall and reply similarity. Korean
  attaches particles and endings to words (바보야, 바보같은, 공장에서), so a Hangul word also
  yields its character bigrams: 바보 and 바보야 share 바보.
* :func:`phrase_pattern`: a trigger phrase as a regex on matched text: Latin words whole,
  a Hangul phrase from a word start with any ending after it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

# Unicode's Default_Ignorable_Code_Point (DerivedCoreProperties.txt, Unicode 15.1 and 16):
# characters that render as nothing, so a player can slip them into a word unseen. The
# Hangul fillers (U+115F, U+1160, U+3164, U+FFA0) are among them: they look like a blank
# but are letters to ``\w``. Python's unicodedata has no such property, hence the table.
IGNORABLE_RANGES: tuple[tuple[int, int], ...] = (
    (0x00AD, 0x00AD),
    (0x034F, 0x034F),
    (0x061C, 0x061C),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180F),
    (0x200B, 0x200F),
    (0x202A, 0x202E),
    (0x2060, 0x206F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFEFF, 0xFEFF),
    (0xFFA0, 0xFFA0),
    (0xFFF0, 0xFFF8),
    (0x1BCA0, 0x1BCA3),
    (0x1D173, 0x1D17A),
    (0xE0000, 0xE0FFF),
)
_IGNORABLE = re.compile("[" + "".join(f"\\U{a:08x}-\\U{b:08x}" for a, b in IGNORABLE_RANGES) + "]")
_WORD = re.compile(r"\w+")
_HANGUL = re.compile(r"[\uac00-\ud7a3]")


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def strip_ignorable(text: str) -> str:
    """``text`` without default-ignorable code points (zero-width characters, joiners,
    direction marks, variation selectors, tags, Hangul fillers)."""
    return _IGNORABLE.sub("", text)


def for_matching(text: str) -> str:
    """No invisible characters, NFKC, case-folded, words joined by single spaces.

    The invisible characters go first: one between the letters of a decomposed syllable
    (``ᄇ\u200bᅡ``) would otherwise stop NFKC from composing it, and again after NFKC,
    which maps some visible compatibility characters onto ignorable ones."""
    folded = unicodedata.normalize("NFKC", strip_ignorable(text))
    return " ".join(_WORD.findall(strip_ignorable(folded).casefold()))


def terms(text: str) -> list[str]:
    """Lower-cased words; a word with Hangul in it also gives its character bigrams."""
    out: list[str] = []
    for word in _WORD.findall(unicodedata.normalize("NFKC", text).casefold()):
        out.append(word)
        if len(word) > 2 and _HANGUL.search(word):
            out += [word[i : i + 2] for i in range(len(word) - 1)]
    return out


def phrase_pattern(phrase: str) -> re.Pattern[str] | None:
    """The regex a trigger phrase matches with on :func:`for_matching` text (None: the
    phrase has no letters or digits, so it could never match)."""
    norm = for_matching(phrase)
    if not norm:
        return None
    tail = r"" if _HANGUL.search(norm[-1]) else r"(?!\w)"  # Hangul: endings may follow
    return re.compile(rf"(?<!\w){re.escape(norm)}{tail}")


def by_id(spec: str, ids: Iterable[str]) -> list[str]:
    """The ids ``spec`` names: itself when it is one, else every id it is a prefix of
    (``mother`` -> ``mother_guard``). One rule for NPC ids in every command and in serve;
    the caller decides what none or several mean."""
    known = list(ids)
    if spec in known:
        return [spec]
    return [i for i in known if spec and i.startswith(spec)]
