"""Text similarity for retrieval and memory: deterministic, offline.

* ``LexicalEmbedder`` (built in, no torch): hashed bag of word unigrams and bigrams with
  sublinear term frequency, L2-normalized; cosine of two texts = shared-word overlap.
* ``SentenceEmbedder``: sentence-transformers from a local path or the local HF cache, when
  the optional extra is installed (``pip install '.[embed]'`` in npcchat's clone); offline
  mode is forced, so nothing is ever downloaded unless the user sets ``allow_download``.

Embeddings of static texts (lore, descriptions) are cached on disk under
``$NPCCHAT_HOME/cache/embeddings``, keyed by the embedder's name and the text's sha256.
Ties in ranking break on the item's position, so every ranking is reproducible.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import re
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from npcchat.config import home
from npcchat.errors import ConfigError
from npcchat.text import terms

_STOP = frozenset(
    """
    a an the and or of to in on at is are was were i you he she it we they me my your this
    that do does did be been have has had for with about what who where when how
    """.split()  # noqa: SIM905 (a word list reads better as text)
)


class Embedder(Protocol):
    name: str

    def embed(self, texts: Sequence[str]) -> np.ndarray: ...


class LexicalEmbedder:
    """Hashed unigrams + bigrams (stop words dropped), sublinear tf, unit length."""

    name = "lexical"
    dim = 4096

    def _vec(self, text: str) -> np.ndarray:
        words = [w for w in terms(text) if w not in _STOP]
        v = np.zeros(self.dim, dtype=np.float32)
        grams = words + [f"{a} {b}" for a, b in itertools.pairwise(words)]
        for g in grams:
            v[zlib.crc32(g.encode()) % self.dim] += 1.0
        v = np.log1p(v)
        n = float(np.linalg.norm(v))
        return v / n if n else v

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return (
            np.stack([self._vec(t) for t in texts])
            if texts
            else np.zeros((0, self.dim), np.float32)
        )


class SentenceEmbedder:
    def __init__(self, model: str, allow_download: bool = False) -> None:
        if not allow_download:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ConfigError(
                f"embed model {model}: sentence-transformers is not installed",
                hint="from npcchat's clone: pip install '.[embed]', "
                "or leave embed_model empty for the lexical ranking",
            ) from None
        try:
            self._m: Any = SentenceTransformer(
                model, local_files_only=not allow_download, device="cpu"
            )
        except Exception as e:
            raise ConfigError(
                f"embed model {model}: cannot load it from local files ({e})"
            ) from None
        self.name = f"sentence-transformers:{Path(model).name}"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 1), np.float32)
        return np.asarray(self._m.encode(list(texts), normalize_embeddings=True), dtype=np.float32)


class CachedEmbedder:
    """Disk cache for static texts: one .npy per (embedder, text sha256)."""

    def __init__(self, inner: Embedder, root: Path | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.root = (root or home() / "cache" / "embeddings") / re.sub(r"[^\w.-]", "_", inner.name)
        self.hits = 0

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        keys = [hashlib.sha256(t.encode("utf-8")).hexdigest() for t in texts]
        out: list[np.ndarray | None] = []
        missing = []
        for i, k in enumerate(keys):
            try:
                out.append(np.load(self.root / f"{k}.npy"))
                self.hits += 1
            except (OSError, ValueError):
                out.append(None)
                missing.append(i)
        if missing:
            fresh = self.inner.embed([texts[i] for i in missing])
            with contextlib.suppress(OSError):
                self.root.mkdir(parents=True, exist_ok=True)
            for j, i in enumerate(missing):
                out[i] = fresh[j]
                try:
                    tmp = self.root / f".{keys[i]}.{os.getpid()}.npy"
                    np.save(tmp, fresh[j])
                    os.replace(tmp, self.root / f"{keys[i]}.npy")
                except OSError:
                    pass  # a cache that cannot be written only costs time
        if not out:
            return self.inner.embed([])
        return np.stack([x for x in out if x is not None])


def rank(query: np.ndarray, items: np.ndarray) -> list[int]:
    """Item indices, most similar first; ties keep the original order (deterministic)."""
    if len(items) == 0:
        return []
    scores = items @ query
    return sorted(range(len(items)), key=lambda i: (-round(float(scores[i]), 6), i))


def choose_embedder(model: str | None, allow_download: bool = False) -> Embedder:
    """The configured embedder: sentence-transformers when a model is named, else lexical."""
    if not model:
        return LexicalEmbedder()
    return SentenceEmbedder(model, allow_download)
