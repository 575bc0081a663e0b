"""Read tensors from a PyTorch ``.pt`` state dict without torch and without running its code.

A ``.pt`` file (torch >= 1.6) is a zip: ``*/data.pkl`` is a pickle that rebuilds tensors
from storages kept as ``*/data/<key>``. Unpickling is code execution in general, so this
reader resolves only the handful of globals a plain state dict needs
(``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``
and the typed storage classes) to harmless stand-ins, and refuses every other global: a
pickle that tries to reach ``os.system`` or anything else fails before anything runs.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class PtError(ValueError):
    pass


_STORAGES: dict[str, np.dtype[Any]] = {
    "FloatStorage": np.dtype("<f4"),
    "DoubleStorage": np.dtype("<f8"),
    "HalfStorage": np.dtype("<f2"),
    "BFloat16Storage": np.dtype("<u2"),
    "LongStorage": np.dtype("<i8"),
    "IntStorage": np.dtype("<i4"),
    "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"),
    "ByteStorage": np.dtype("u1"),
    "BoolStorage": np.dtype("?"),
}


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _Storage:
    data: np.ndarray
    bf16: bool


def _rebuild_tensor(
    storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...], *_: Any
) -> np.ndarray:
    if not isinstance(storage, _Storage):
        raise PtError("tensor data is not a storage")
    flat = storage.data
    n = int(np.prod(size)) if size else 1
    if n == 0:
        return np.zeros(size, dtype=flat.dtype)
    last = offset + sum((s - 1) * st for s, st in zip(size, stride, strict=True))
    if offset < 0 or last >= flat.size:
        raise PtError("tensor view reaches outside its storage")
    item = flat.itemsize
    view = np.lib.stride_tricks.as_strided(
        flat[offset:], shape=size, strides=tuple(st * item for st in stride), writeable=False
    )
    out = np.array(view)
    if storage.bf16:
        out = (out.astype(np.uint32) << 16).view(np.float32)
    return out


def _rebuild_parameter(data: np.ndarray, *_: Any) -> np.ndarray:
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self._zip = archive
        self._prefix = prefix
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        found = _ALLOWED.get((module, name))
        if found is None:
            raise PtError(
                f"{self._path}: refusing to load: its pickle asks for {module}.{name}, "
                "which a plain state dict never needs (it could run code)"
            )
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise PtError(f"{self._path}: unexpected persistent id {pid!r}")
        _, stype, key, _location, numel = pid[:5]
        if not isinstance(stype, _StorageType):
            raise PtError(f"{self._path}: unknown storage type {stype!r}")
        dtype = _STORAGES[stype.name]
        try:
            raw = self._zip.read(f"{self._prefix}data/{key}")
        except KeyError:
            raise PtError(f"{self._path}: storage {key} is missing from the archive") from None
        data = np.frombuffer(raw, dtype=dtype)
        if data.size < int(numel):
            raise PtError(f"{self._path}: storage {key} is shorter than declared")
        return _Storage(data, stype.name == "BFloat16Storage")


def load(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a state dict saved with ``torch.save``; float types as float32."""
    if not zipfile.is_zipfile(path):
        raise PtError(
            f"{path}: not a zip-format PyTorch file (torch >= 1.6 writes zips)",
        )
    with zipfile.ZipFile(path) as archive:
        pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise PtError(f"{path}: expected one data.pkl in the archive, found {len(pkl)}")
        prefix = pkl[0][: -len("data.pkl")]
        try:
            obj = _Unpickler(archive.read(pkl[0]), archive, prefix, path).load()
        except PtError:
            raise
        except Exception as e:
            raise PtError(f"{path}: cannot read the state dict ({e})") from None
    if not isinstance(obj, dict):
        raise PtError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if not isinstance(value, np.ndarray):
            raise PtError(f"{path}: entry {key!r} is not a tensor")
        out[str(key)] = value.astype(np.float32) if value.dtype.kind == "f" else value
    return out
