"""Read tensors from a PyTorch ``.pt`` state dict without torch and without running its code.

A ``.pt`` file (torch >= 1.6) is a zip: ``*/data.pkl`` is a pickle that rebuilds tensors
from storages kept as ``*/data/<key>``. Unpickling is code execution in general, so this
reader resolves only the handful of globals a plain state dict needs
(``collections.OrderedDict``, ``torch._utils._rebuild_tensor_v2`` / ``_rebuild_parameter``
and the typed storage classes) to harmless stand-ins, and refuses every other global: a
pickle that tries to reach ``os.system`` or anything else fails before anything runs.

Everything a hostile file can inflate is bounded before it is allocated or walked: the
archive members are read through a size cap (a zip bomb stops at the cap, whatever its
header claims), the pickle's opcodes are counted before it is unpickled, tensor metadata
must be plain ints of a plain shape, and every view is checked whole (non-negative strides,
no overlapping elements, inside its storage, at most ``max_elements`` values: what a head,
hidden x flags, can be) before a single value is copied.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


class PtError(ValueError):
    pass


MAX_ELEMENTS = 1 << 24  # values of one tensor: 16 M (4096 flags x 4096 hidden)
MAX_PICKLE_BYTES = 1 << 20  # data.pkl of a state dict of a few tensors is a few KB
MAX_OPCODES = 100_000
MAX_PICKLE_OBJECTS = 100_000  # expanded size of one object, memo references counted whole
MAX_PICKLE_DEPTH = 32  # a state dict nests: dict > tensor call > args tuple > shape tuple
MAX_DIMS = 8

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


def _int(value: Any, what: str) -> int:
    if type(value) is not int:  # not bool, not a nested structure
        raise PtError(f"tensor {what} is not an integer")
    return value


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if type(value) is not tuple or len(value) > MAX_DIMS:
        raise PtError(f"tensor {what} is not a tuple of at most {MAX_DIMS} integers")
    return tuple(_int(v, what) for v in value)


def check_view(
    numel: int, offset: int, size: tuple[int, ...], stride: tuple[int, ...], max_elements: int
) -> int:
    """Refuse any view that is not a plain, in-bounds, non-overlapping window of its storage;
    returns the number of values. Nothing is read until this passed."""
    if len(size) != len(stride):
        raise PtError("tensor size and stride differ in length")
    if offset < 0 or any(s < 0 for s in size) or any(st < 0 for st in stride):
        raise PtError("tensor view has a negative offset, size or stride")
    n = 1
    for s in size:
        n *= s
    if n > max_elements:
        raise PtError(f"tensor of {n} values exceeds the bound of {max_elements}")
    if n == 0:
        return 0
    # no two elements may share memory: each dimension (by stride) steps over the inner ones
    extent = 0
    for s, st in sorted(
        (d for d in zip(size, stride, strict=True) if d[0] > 1), key=lambda d: d[1]
    ):
        if st <= extent:
            raise PtError("tensor view overlaps itself (stride too small)")
        extent += (s - 1) * st
    if offset + extent >= numel:
        raise PtError("tensor view reaches outside its storage")
    return n


def _rebuild_tensor(max_elements: int) -> Any:
    def rebuild(storage: Any, offset: Any, size: Any, stride: Any, *_: Any) -> np.ndarray:
        if not isinstance(storage, _Storage):
            raise PtError("tensor data is not a storage")
        off, shape, strides = _int(offset, "offset"), _ints(size, "size"), _ints(stride, "stride")
        flat = storage.data
        if check_view(flat.size, off, shape, strides, max_elements) == 0:
            return np.zeros(shape, dtype=flat.dtype)
        item = flat.itemsize
        view = np.lib.stride_tricks.as_strided(
            flat[off:], shape=shape, strides=tuple(st * item for st in strides), writeable=False
        )
        out = np.array(view)
        if storage.bf16:
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out

    return rebuild


def _rebuild_parameter(data: Any, *_: Any) -> np.ndarray:
    if not isinstance(data, np.ndarray):
        raise PtError("parameter data is not a tensor")
    return data


class _Unpickler(pickle.Unpickler):
    def __init__(
        self, data: bytes, archive: zipfile.ZipFile, prefix: str, path: Path, max_elements: int
    ) -> None:
        super().__init__(io.BytesIO(data))
        self._zip = archive
        self._prefix = prefix
        self._path = path
        self._max = max_elements
        self._allowed: dict[tuple[str, str], Any] = {
            ("collections", "OrderedDict"): OrderedDict,
            ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor(max_elements),
            ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
        }

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGES:
            return _StorageType(name)
        found = self._allowed.get((module, name))
        if found is None:
            raise PtError(
                f"{self._path}: refusing to load: its pickle asks for {module}.{name}, "
                "which a plain state dict never needs (it could run code)"
            )
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        if not (type(pid) is tuple and len(pid) >= 5 and pid[0] == "storage"):
            raise PtError(f"{self._path}: unexpected persistent id")
        _, stype, key, _location, numel = pid[:5]
        if not isinstance(stype, _StorageType) or type(key) is not str:
            raise PtError(f"{self._path}: unknown storage type or key")
        count = _int(numel, "storage size")
        dtype = _STORAGES[stype.name]
        if not 0 <= count <= self._max:
            raise PtError(f"{self._path}: storage {key} of {count} values exceeds the bound")
        raw = _member(self._zip, f"{self._prefix}data/{key}", count * dtype.itemsize, self._path)
        if len(raw) != count * dtype.itemsize:
            raise PtError(f"{self._path}: storage {key} holds {len(raw)} bytes, not {count} values")
        return _Storage(np.frombuffer(raw, dtype=dtype), stype.name == "BFloat16Storage")


def _member(archive: zipfile.ZipFile, name: str, limit: int, path: Path) -> bytes:
    """A member's bytes, reading at most ``limit`` + 1 (the header's size may lie)."""
    try:
        with archive.open(name) as fh:
            data = fh.read(limit + 1)
    except KeyError:
        raise PtError(f"{path}: {name} is missing from the archive") from None
    if len(data) > limit:
        raise PtError(f"{path}: {name} is larger than {limit} bytes")
    return data


def _check_pickle(data: bytes, path: Path) -> None:
    """Weigh the pickle before it runs. Its stack is simulated from pickletools' declared
    stack effects, following each object's expanded size (a memo reference counts whole
    again) and nesting depth: a state dict is a flat table of a few tensors, so anything
    large, deep or fanned out (a tuple of itself repeated, which would hash for ever) is
    refused before a single object is built."""
    stack: list[tuple[int, int]] = []  # (expanded size, depth) of each stack item
    marks: list[int] = []
    memo: dict[Any, tuple[int, int]] = {}
    try:
        for n, (op, arg, _pos) in enumerate(pickletools.genops(data)):
            if n >= MAX_OPCODES:
                raise PtError(f"the pickle has over {MAX_OPCODES} operations")
            name = op.name
            if name == "MARK":
                marks.append(len(stack))
            elif name in ("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"):
                memo[arg if name != "MEMOIZE" else len(memo)] = stack[-1]
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(arg, (1, 1)))
            elif name == "STOP":
                break
            else:
                before = op.stack_before
                taken: list[tuple[int, int]] = []
                if pickletools.markobject in before:
                    start = marks.pop()
                    taken += stack[start:]
                    del stack[start:]
                    below = before.index(pickletools.markobject)
                else:
                    below = len(before)
                for _ in range(below):
                    taken.append(stack.pop())
                size = 1 + sum(t[0] for t in taken)
                depth = 1 + max((t[1] for t in taken), default=0)
                if size > MAX_PICKLE_OBJECTS or depth > MAX_PICKLE_DEPTH:
                    raise PtError(
                        "the pickle builds objects far larger or deeper than a state dict"
                    )
                stack += [(size, depth)] * len(op.stack_after)
    except PtError:
        raise
    except Exception as e:
        raise PtError(f"not a readable pickle ({type(e).__name__})") from None


def load(path: Path, max_elements: int = MAX_ELEMENTS) -> dict[str, np.ndarray]:
    """The tensors of a state dict saved with ``torch.save``; float types as float32."""
    try:
        if not zipfile.is_zipfile(path):
            raise PtError(f"{path}: not a zip-format PyTorch file (torch >= 1.6 writes zips)")
        with zipfile.ZipFile(path) as archive:
            pkl = [n for n in archive.namelist() if n.endswith("data.pkl")]
            if len(pkl) != 1:
                raise PtError(f"{path}: expected one data.pkl in the archive, found {len(pkl)}")
            prefix = pkl[0][: -len("data.pkl")]
            data = _member(archive, pkl[0], MAX_PICKLE_BYTES, path)
            _check_pickle(data, path)
            obj = _Unpickler(data, archive, prefix, path, max_elements).load()
    except PtError as e:
        if str(e).startswith(f"{path}:"):
            raise
        raise PtError(f"{path}: {e}") from None
    except Exception as e:  # zip, pickle, recursion or memory errors of a damaged file
        raise PtError(f"{path}: cannot read the state dict ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise PtError(f"{path}: expected a state dict, found {type(obj).__name__}")
    out: dict[str, np.ndarray] = {}
    for key, value in obj.items():
        if type(key) is not str or len(key) > 256:
            raise PtError(f"{path}: a state dict key is not a short string")
        if not isinstance(value, np.ndarray):
            raise PtError(f"{path}: entry {key!r} is not a tensor")
        out[key] = value.astype(np.float32) if value.dtype.kind == "f" else value
    return out
