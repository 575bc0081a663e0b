"""How close a reply is to the reference reply (eval).

With the optional extra (``pip install '.[embed]'`` in npcchat's clone) and a local
sentence-transformers model (``--embed-model PATH``), the cosine of sentence embeddings
(npcchat.mind.embed, offline); otherwise a lexical measure, bag-of-words token F1. Reports
name the method used.
"""

from __future__ import annotations

from pathlib import Path

from npcchat.errors import ConfigError
from npcchat.eval import metrics


class Similarity:
    name = "lexical token F1"

    def score(self, pred: str, ref: str) -> float:
        return metrics.token_f1(pred, ref)


class SentenceSimilarity(Similarity):
    def __init__(self, model_path: Path) -> None:
        from npcchat.mind.embed import SentenceEmbedder

        self._embedder = SentenceEmbedder(str(model_path))
        self.name = name_of(model_path)

    def score(self, pred: str, ref: str) -> float:
        a, b = self._embedder.embed([pred, ref])
        return float(a @ b)


def choose_similarity(model_path: Path | None) -> Similarity:
    """Sentence embeddings when a local model is given (and the extra installed)."""
    if model_path is None:
        return Similarity()
    if not model_path.exists():
        raise ConfigError(f"--embed-model {model_path}: no such directory")
    return SentenceSimilarity(model_path)


def name_of(model_path: Path | None) -> str:
    """The method a report names, without loading the model (a Ray driver never scores)."""
    if model_path is None:
        return Similarity.name
    return f"sentence-transformers:{model_path.name} cosine"
