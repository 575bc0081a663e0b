"""How close a reply is to the reference reply.

With the optional extra (``pip install npcchat[embed]``) and a local sentence-transformers
model (``--embed-model PATH`` or ``[eval] embed_model`` in the config), the cosine of
sentence embeddings; never a download (offline mode is forced before the import).
Otherwise a lexical measure: bag-of-words token F1. Reports name the method used.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from npcchat import metrics
from npcchat.errors import ConfigError


class Similarity:
    name = "lexical token F1"

    def score(self, pred: str, ref: str) -> float:
        return metrics.token_f1(pred, ref)


class SentenceEmbedding(Similarity):
    def __init__(self, model_path: Path) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local model only, never a download
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        try:
            self._model: Any = SentenceTransformer(str(model_path), local_files_only=True)
        except Exception as e:
            raise ConfigError(
                f"{model_path}: cannot load a local sentence-transformers model ({e})"
            ) from None
        self.name = f"sentence-transformers cosine ({model_path.name})"

    def score(self, pred: str, ref: str) -> float:
        a, b = self._model.encode([pred, ref], normalize_embeddings=True)
        return float(a @ b)


def available() -> bool:
    return importlib.util.find_spec("sentence_transformers") is not None


def choose(model_path: Path | None) -> Similarity:
    """Sentence embeddings when a local model is given and the extra is installed."""
    if model_path is None:
        return Similarity()
    if not model_path.exists():
        raise ConfigError(f"--embed-model {model_path}: no such directory")
    if not available():
        raise ConfigError(
            f"--embed-model {model_path}: sentence-transformers is not installed",
            hint="pip install 'npcchat[embed]', or drop --embed-model for the lexical measure",
        )
    return SentenceEmbedding(model_path)
