"""Evaluation metrics: pure functions on plain lists, hand-checkable (tests do).

Conventions: a flag is predicted to fire when ``prob >= threshold``; a delta's sign is
-1, 0 or +1 with ``|delta| < SIGN_DEADBAND`` counting as 0 (no change); precision/recall/F1
are 0 when undefined (no predicted or no actual positives), and F1 is 1 when a flag has
neither predictions nor positives.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from npcchat.text import terms

SIGN_DEADBAND = 0.02
CAL_BINS = 10
TAG_TEXTS = (
    "<SYS>",
    "</SYS>",
    "<CTX>",
    "</CTX>",
    "<PLAYER>",
    "<NPC>",
    "<STATE>",
    "<RAG>",
    "</RAG>",
    "<PLAYER_STATE>",
    "</PLAYER_STATE>",
    "<|im_end|>",
    "<|endoftext|>",
    "<|im_start|>",
)


def mae(pred: Sequence[float], true: Sequence[float]) -> float | None:
    if not pred:
        return None
    return float(np.mean(np.abs(np.asarray(pred) - np.asarray(true))))


def sign(x: float) -> int:
    return 0 if abs(x) < SIGN_DEADBAND else (1 if x > 0 else -1)


def sign_agreement(pred: Sequence[float], true: Sequence[float]) -> float | None:
    if not pred:
        return None
    return float(np.mean([sign(p) == sign(t) for p, t in zip(pred, true, strict=True)]))


@dataclass(frozen=True)
class PRF:
    precision: float
    recall: float
    f1: float
    tp: int
    fp: int
    fn: int
    tn: int


def prf(pred: Sequence[bool], true: Sequence[bool]) -> PRF:
    tp = sum(p and t for p, t in zip(pred, true, strict=True))
    fp = sum(p and not t for p, t in zip(pred, true, strict=True))
    fn = sum(t and not p for p, t in zip(pred, true, strict=True))
    tn = len(pred) - tp - fp - fn
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)  # 1.0: nothing to find or claim
    return PRF(precision, recall, f1, tp, fp, fn, tn)


def best_threshold(probs: Sequence[float], true: Sequence[bool]) -> tuple[float, float]:
    """The single threshold (fire when prob >= t) with the highest F1, and that F1.

    Candidates are the observed probabilities (every distinct decision boundary) plus
    one above the maximum (fire never); ties go to the higher threshold."""
    cands = sorted({*probs, 1.0 + 1e-9})
    best = (cands[-1], prf([False] * len(probs), true).f1)
    for t in cands:
        f1 = prf([p >= t for p in probs], true).f1
        if f1 > best[1] or (f1 == best[1] and t > best[0]):
            best = (t, f1)
    return float(best[0]), float(best[1])


def brier(probs: Sequence[float], true: Sequence[bool]) -> float | None:
    if not probs:
        return None
    return float(np.mean((np.asarray(probs) - np.asarray(true, dtype=float)) ** 2))


def calibration(
    probs: Sequence[float], true: Sequence[bool], bins: int = CAL_BINS
) -> list[dict[str, float]]:
    """Equal-width probability bins: count, mean predicted probability, observed rate.
    Bin i holds ``i/bins <= p < (i+1)/bins`` (the last bin includes 1.0); empty bins are
    left out."""
    out = []
    p = np.asarray(probs, dtype=float)
    y = np.asarray(true, dtype=float)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    for i in range(bins):
        m = idx == i
        if m.any():
            out.append(
                {
                    "bin": i,
                    "lo": i / bins,
                    "hi": (i + 1) / bins,
                    "count": int(m.sum()),
                    "mean_prob": float(p[m].mean()),
                    "observed": float(y[m].mean()),
                }
            )
    return out


def percentile(values: Sequence[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default)."""
    return float(np.percentile(values, q)) if values else None


def words(text: str) -> list[str]:
    """Lower-cased words, and the character bigrams of Hangul words (see npcchat.text)."""
    return terms(text)


def token_f1(pred: str, ref: str) -> float:
    """SQuAD-style bag-of-words F1 between two replies (lower-cased word tokens)."""
    p, r = words(pred), words(ref)
    if not p and not r:
        return 1.0
    common = sum((Counter(p) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(r)
    return 2 * precision * recall / (precision + recall)


def leaked_tags(text: str) -> list[str]:
    """Scaffold or control tags that appear in a reply's text."""
    return [t for t in TAG_TEXTS if t in text]


def exact_match(pred: str, ref: str) -> bool:
    return " ".join(pred.split()) == " ".join(ref.split())
