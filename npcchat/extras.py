"""Optional extras: what a command needs beyond the runtime install, and the exact
``pip install`` line that brings it.

``pip install npcchat`` is what a game that only runs NPCs needs. Converting and fitting
(``npcchat convert``, ``npcchat heads fit``) write GGUF files and ONNX graphs and need the
``convert`` extra; sentence-embedding ranking needs ``embed``; running on a Ray cluster
(``--ray``) needs ``ray``; ``npcchat train`` needs ``train`` (torch, transformers, peft, and
convert's writers for ``--bundle``).
"""

from __future__ import annotations

import importlib.util

from npcchat.errors import ConfigError

EXTRAS = {
    "convert": ("gguf", "onnx"),
    "embed": ("sentence_transformers",),
    "serve": ("fastapi", "uvicorn", "prometheus_client", "httpx"),
    "ray": ("ray",),
    "train": ("torch", "transformers", "peft", "tokenizers", "safetensors", "gguf", "onnx"),
}


HINTS = {
    # torch first from the CPU index: plain `pip install torch` pulls GBs of CUDA wheels
    "train": "from npcchat's clone: pip install torch==2.13.0 && pip install '.[train]' "
    "(on a CUDA machine: the CUDA build of torch first)",
}


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here."""
    return [m for m in EXTRAS[extra] if importlib.util.find_spec(m) is None]


def require(extra: str, what: str) -> None:
    """Raise a one-line error with the install line when ``extra`` is not installed."""
    gone = missing(extra)
    if gone:
        raise ConfigError(
            f"{what} needs the '{extra}' extra ({', '.join(gone)} not installed)",
            hint=HINTS.get(extra, f"from npcchat's clone: pip install '.[{extra}]'"),
        )
