"""Load trained head weights from a directory: ``delta_head``, ``flag_head`` and
``threshold_head`` (or ``flag_threshold_head``) as ``.pt`` or ``.safetensors`` state dicts
with ``weight`` and ``bias``, plus ``flags.json`` = ``{"ALL_FLAGS": [names in head order]}``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from npcchat.errors import ConvertError

from . import pt_reader
from .onnx_builder import HeadWeights

NAMES = {
    "delta": ("delta_head",),
    "flag": ("flag_head",),
    "threshold": ("threshold_head", "flag_threshold_head"),
}
SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


def _find(root: Path, stems: tuple[str, ...]) -> Path:
    for stem in stems:
        for suffix in SUFFIXES:
            p = root / f"{stem}{suffix}"
            if p.is_file():
                return p
    wanted = " or ".join(f"{s}.pt/.safetensors" for s in stems)
    raise ConvertError(f"{root}: no {wanted}")


def _read_state_dict(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".safetensors":
        from npcchat.files.safetensors import SafeFile, SafetensorsError

        try:
            f = SafeFile(path)
            return {k: f.get(k) for k in f.names()}
        except SafetensorsError as e:
            raise ConvertError(str(e)) from None
    # The bounded reader is the only way a .pt is read, torch installed or not: torch.load
    # of a legacy (non-zip) pickle fails with tracebacks, and a deep one crashes the process.
    try:
        return pt_reader.load(path)
    except pt_reader.PtError as e:
        hint = None
        if "not a zip-format" in str(e):
            hint = (
                "re-save it with torch >= 1.6 (torch.save(model.state_dict(), path)) "
                "or as .safetensors"
            )
        raise ConvertError(str(e), hint=hint) from None


def _weight_bias(path: Path) -> tuple[np.ndarray, np.ndarray]:
    sd = _read_state_dict(path)
    weights = [k for k in sd if k == "weight" or k.endswith(".weight")]
    biases = [k for k in sd if k == "bias" or k.endswith(".bias")]
    if len(weights) != 1 or len(biases) != 1:
        raise ConvertError(
            f"{path}: expected one Linear layer (weight and bias), found keys {sorted(sd)}"
        )
    return sd[weights[0]].astype(np.float32), sd[biases[0]].astype(np.float32)


def read_flags(root: Path) -> list[str]:
    path = root / "flags.json"
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"{path}: file not found (the flag names in head order)") from None
    except ValueError as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    flags = data.get("ALL_FLAGS") if isinstance(data, dict) else data
    if not isinstance(flags, list) or not flags or not all(isinstance(f, str) and f for f in flags):
        raise ConvertError(f"{path}: key 'ALL_FLAGS': expected a list of flag names")
    if len(set(flags)) != len(flags):
        raise ConvertError(f"{path}: key 'ALL_FLAGS': flag names repeat")
    return flags


def load(root: Path, hidden: int | None = None) -> tuple[HeadWeights, list[str], dict[str, str]]:
    """Head weights, flag names and the sha256 of every source file."""
    if not root.is_dir():
        raise ConvertError(f"{root}: heads directory not found")
    paths = {k: _find(root, stems) for k, stems in NAMES.items()}
    (dw, db), (fw, fb), (tw, tb) = (_weight_bias(paths[k]) for k in ("delta", "flag", "threshold"))
    flags = read_flags(root)
    weights = HeadWeights(dw, db, fw, fb, tw, tb)
    if dw.ndim != 2 or dw.shape[0] != 2:
        raise ConvertError(f"{paths['delta']}: weight shape {dw.shape}, expected (2, hidden)")
    if fw.shape[0] != len(flags):
        raise ConvertError(
            f"{paths['flag']}: {fw.shape[0]} outputs but flags.json names {len(flags)} flags"
        )
    if hidden is not None and dw.shape[1] != hidden:
        raise ConvertError(
            f"{paths['delta']}: heads read {dw.shape[1]}-wide states, "
            f"the model's hidden size is {hidden}"
        )
    try:
        weights.check()
    except ValueError as e:
        raise ConvertError(f"{root}: {e}") from None
    sources = {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in [*paths.values(), root / "flags.json"]
    }
    return weights, flags, sources
