"""Write PyTorch zip-format ``.pt`` state dicts without torch (test fixtures only).

The pickle names torch's globals (``torch._utils._rebuild_tensor_v2``, ``torch.FloatStorage``)
exactly as ``torch.save`` does; stand-in modules are registered only while pickling.
"""

from __future__ import annotations

import io
import pickle
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np


def _fake_torch() -> tuple[types.ModuleType, types.ModuleType]:
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    class FloatStorage:
        pass

    FloatStorage.__module__ = "torch"
    FloatStorage.__qualname__ = "FloatStorage"

    def _rebuild_tensor_v2(*args: Any) -> None:  # never called: only its name is pickled
        raise AssertionError

    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    torch.FloatStorage = FloatStorage  # type: ignore[attr-defined]
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2  # type: ignore[attr-defined]
    return torch, utils


class _Storage:
    def __init__(self, key: str, data: np.ndarray) -> None:
        self.key = key
        self.data = data


class _Tensor:
    def __init__(self, rebuild: Any, storage: _Storage, shape: tuple[int, ...]) -> None:
        self.rebuild, self.storage, self.shape = rebuild, storage, shape

    def __reduce__(self) -> Any:
        stride = tuple(int(np.prod(self.shape[i + 1 :])) for i in range(len(self.shape)))
        return (self.rebuild, (self.storage, 0, self.shape, stride, False, OrderedDict()))


def save(tensors: dict[str, np.ndarray], path: Path, extra: Any = None) -> None:
    """``torch.save(state_dict)`` look-alike; ``extra`` is pickled into the dict as is."""
    torch, utils = _fake_torch()
    saved = {k: sys.modules.get(k) for k in ("torch", "torch._utils")}
    sys.modules["torch"], sys.modules["torch._utils"] = torch, utils
    try:
        storages = {}
        sd: OrderedDict[str, Any] = OrderedDict()
        for i, (name, arr) in enumerate(tensors.items()):
            st = _Storage(str(i), np.ascontiguousarray(arr, dtype=np.float32))
            storages[st.key] = st
            sd[name] = _Tensor(utils._rebuild_tensor_v2, st, tuple(arr.shape))  # type: ignore[attr-defined]
        if extra is not None:
            sd["extra"] = extra

        class P(pickle.Pickler):
            def persistent_id(self, obj: Any) -> Any:
                if isinstance(obj, _Storage):
                    return ("storage", torch.FloatStorage, obj.key, "cpu", obj.data.size)  # type: ignore[attr-defined]
                return None

        buf = io.BytesIO()
        P(buf, protocol=2).dump(sd)
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", buf.getvalue())
        z.writestr("archive/version", "3\n")
        for key, st in storages.items():
            z.writestr(f"archive/data/{key}", st.data.tobytes())


def write_heads(
    root: Path,
    hidden: int,
    flags: list[str],
    fmt: str = "pt",
    seed: int = 0,
    threshold_name: str = "threshold_head",
) -> dict[str, np.ndarray]:
    """Head state dicts + flags.json as training writes them; returns the weights."""
    import json

    from npcchat.files.safetensors import save as save_st

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    w: dict[str, np.ndarray] = {}
    for stem, rows in (("delta_head", 2), ("flag_head", len(flags)), (threshold_name, len(flags))):
        sd = {
            "weight": (rng.standard_normal((rows, hidden)) * 0.1).astype(np.float32),
            "bias": (rng.standard_normal(rows) * 0.1).astype(np.float32),
        }
        w[f"{stem}.weight"], w[f"{stem}.bias"] = sd["weight"], sd["bias"]
        if fmt == "pt":
            save(sd, root / f"{stem}.pt")
        else:
            save_st(sd, root / f"{stem}.safetensors")
    (root / "flags.json").write_text(json.dumps({"ALL_FLAGS": flags}))
    return w
