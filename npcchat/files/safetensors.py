"""A small safetensors reader/writer on numpy (no torch; bf16 handled by bit shifting).

Format: 8-byte little-endian header length, a JSON header ``{name: {dtype, shape,
data_offsets}}`` (plus optional ``__metadata__``), then the raw little-endian data.
Reading memory-maps the file so a tensor costs memory only when it is used.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

_DTYPES: dict[str, np.dtype[Any]] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}


class SafetensorsError(ValueError):
    pass


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    wide = raw.astype(np.uint32)
    wide <<= 16
    return wide.view(np.float32)


class SafeFile:
    """Lazy view of one .safetensors file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            with path.open("rb") as fh:
                head = fh.read(8)
                if len(head) != 8:
                    raise SafetensorsError(f"{path}: too short for a safetensors file")
                (n,) = struct.unpack("<Q", head)
                if n > 100_000_000:
                    raise SafetensorsError(f"{path}: header length {n} is not plausible")
                header: dict[str, Any] = json.loads(fh.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise SafetensorsError(f"{path}: not a readable safetensors file ({e})") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.header = header
        self._base = 8 + n

    def names(self) -> list[str]:
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str, as_f32: bool = True) -> np.ndarray:
        """The tensor; floating types come back as float32 unless ``as_f32`` is false.

        Read with a positioned read, not a memory map: mapped pages count toward RSS for
        as long as the map lives, and the converter must stay at a few tensors of memory.
        """
        info = self.header[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise SafetensorsError(
                f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}"
            )
        start, end = info["data_offsets"]
        count = (end - start) // dtype.itemsize
        if count != int(np.prod(info["shape"])):
            raise SafetensorsError(
                f"{self.path}: tensor {name} has {count} values for shape {info['shape']}"
            )
        offset = self._base + start
        if as_f32 and info["dtype"] in ("BF16", "F16"):
            return self._read_f32(offset, count, dtype, info["dtype"] == "BF16").reshape(
                info["shape"]
            )
        raw = np.fromfile(self.path, dtype=dtype, count=count, offset=offset)
        if raw.size != count:
            raise SafetensorsError(f"{self.path}: file ends inside tensor {name}")
        raw = raw.reshape(info["shape"])
        if as_f32 and raw.dtype.kind == "f":
            return raw.astype(np.float32, copy=False)
        return raw

    def _read_f32(self, offset: int, count: int, dtype: np.dtype[Any], bf16: bool) -> np.ndarray:
        """Widen 16-bit floats block by block into one float32 array (peak: output + block)."""
        out = np.empty(count, dtype=np.float32)
        block = 1 << 22
        with self.path.open("rb") as fh:
            fh.seek(offset)
            for s in range(0, count, block):
                n = min(block, count - s)
                raw = np.fromfile(fh, dtype=dtype, count=n)
                if raw.size != n:
                    raise SafetensorsError(f"{self.path}: file ends inside a tensor")
                if bf16:
                    out.view(np.uint32)[s : s + n] = raw.astype(np.uint32) << 16
                else:
                    out[s : s + n] = raw
        return out


def f32_to_bf16(arr: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bits (uint16)."""
    bits = np.ascontiguousarray(arr, dtype=np.float32).view(np.uint32)
    rounded = bits + (0x7FFF + ((bits >> 16) & 1))
    return (rounded >> 16).astype(np.uint16)


_STORE: dict[str, tuple[str, np.dtype[Any]]] = {
    "f32": ("F32", np.dtype("<f4")),
    "f16": ("F16", np.dtype("<f2")),
    "bf16": ("BF16", np.dtype("<u2")),
}


def save_lazy(
    entries: Sequence[tuple[str, tuple[int, ...], Callable[[], np.ndarray]]],
    path: Path,
    dtype: str = "f32",
    metadata: dict[str, str] | None = None,
) -> None:
    """Write tensors produced one at a time (peak memory: one tensor) as ``dtype``."""
    tag, np_dtype = _STORE[dtype]
    header: dict[str, Any] = {}
    offset = 0
    for name, shape, _ in entries:
        nbytes = int(np.prod(shape)) * np_dtype.itemsize
        header[name] = {
            "dtype": tag,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with path.open("wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for name, shape, produce in entries:
            arr = produce()
            if tuple(arr.shape) != tuple(shape):
                raise SafetensorsError(f"tensor {name}: shape {arr.shape}, declared {shape}")
            out = f32_to_bf16(arr) if dtype == "bf16" else np.ascontiguousarray(arr, dtype=np_dtype)
            fh.write(out.tobytes())


def save(
    tensors: Mapping[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """Write in-memory float32 tensors."""
    entries = [(n, tuple(a.shape), partial(np.asarray, a)) for n, a in tensors.items()]
    save_lazy(entries, path, "f32", metadata)
