"""Text as npcchat compares and tokenizes it, in any language, Korean first.

* :func:`nfc`: llama.cpp does not normalize Unicode, and the tokenizer was trained on NFC
  text, so everything a prompt renders is NFC (decomposed Hangul typed by a player would
  otherwise tokenize differently from training).
* :func:`for_matching`: what a forbidden trigger is compared on: NFKC (full-width letters
  are letters), case-folded, zero-width and soft-hyphen characters removed, punctuation
  turned into spaces.
* :func:`terms`: words for lexical ranking, memory recall and reply similarity. Korean
  attaches particles and endings to words (바보야, 바보같은, 공장에서), so a Hangul word also
  yields its character bigrams: 바보 and 바보야 share 바보.
* :func:`phrase_pattern`: a trigger phrase as a regex on matched text: Latin words whole,
  a Hangul phrase from a word start with any ending after it.
"""

from __future__ import annotations

import re
import unicodedata

_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad\u180e"))
_WORD = re.compile(r"\w+")
_HANGUL = re.compile(r"[\uac00-\ud7a3]")


def nfc(text: str) -> str:
    return unicodedata.normalize("NFC", text)


def for_matching(text: str) -> str:
    """NFKC, case-folded, no zero-width characters, words joined by single spaces."""
    folded = unicodedata.normalize("NFKC", text).translate(_ZERO_WIDTH).casefold()
    return " ".join(_WORD.findall(folded))


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
