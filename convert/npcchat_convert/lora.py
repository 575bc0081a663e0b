"""PEFT LoRA adapters: read, check against the base, and merge tensor by tensor.

Merge rule ``W' = W + scale * B @ A`` with ``scale = alpha / r`` (``alpha / sqrt(r)`` with
rsLoRA), per module (``alpha_pattern`` and ``rank_pattern`` honoured; the rank is read off
A's shape). Full ``embed_tokens`` / ``lm_head`` matrices saved with the adapter (a resized
vocabulary, PEFT ``save_embedding_layers`` or ``modules_to_save``) replace the base ones.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from npcchat.errors import ConvertError
from npcchat.files.safetensors import SafeFile, SafetensorsError

_PREFIX = "base_model.model."
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.default)?(\.weight)?$"
)
FULL_MODULES = ("model.embed_tokens", "lm_head")


@dataclass(frozen=True)
class LoraPair:
    module: str  # HF module name, e.g. model.layers.3.self_attn.q_proj
    a_key: str
    b_key: str
    embedding: bool  # lora_embedding_A/B: delta is (B @ A).T


@dataclass
class Adapter:
    root: Path
    alpha: float
    r: int
    rslora: bool
    fan_in_fan_out: bool
    target_modules: list[str] | str
    alpha_pattern: dict[str, float]
    pairs: dict[str, LoraPair]  # by HF weight name (module + ".weight")
    full: dict[str, str]  # HF tensor name -> adapter key, for tensors taken over whole
    file: SafeFile
    notes: list[str] = field(default_factory=list)

    def scale(self, module: str, rank: int) -> float:
        alpha = self.alpha
        for pattern, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?{pattern}$", module):
                alpha = float(value)
                break  # PEFT (get_pattern_key) takes the first pattern that matches
        return alpha / math.sqrt(rank) if self.rslora else alpha / rank

    def delta(self, weight_name: str, shape: tuple[int, ...]) -> np.ndarray | None:
        """``scale * B @ A`` for this weight, or None when the adapter does not touch it."""
        pair = self.pairs.get(weight_name)
        if pair is None:
            return None
        a = self.file.get(pair.a_key).astype(np.float32)
        b = self.file.get(pair.b_key).astype(np.float32)
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != a.shape[0]:
            raise ConvertError(
                f"{self.root}: {pair.module}: lora_A {a.shape} and lora_B {b.shape} do not chain"
            )
        rank = a.shape[0]
        d = b @ a
        if pair.embedding:
            d = d.T
        if d.shape != shape:
            raise ConvertError(
                f"{self.root}: {pair.module}: LoRA delta has shape {d.shape}, "
                f"the base weight {shape}"
            )
        return np.asarray(self.scale(pair.module, rank) * d, dtype=np.float32)

    def full_tensor(self, name: str) -> np.ndarray | None:
        key = self.full.get(name)
        return None if key is None else self.file.get(key)

    def full_shape(self, name: str) -> tuple[int, ...] | None:
        key = self.full.get(name)
        return None if key is None else self.file.shape(key)


def _config(root: Path) -> dict[str, object]:
    path = root / "adapter_config.json"
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ConvertError(
            f"{path}: file not found", hint="--adapter must be a PEFT adapter directory"
        ) from None
    except ValueError as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConvertError(f"{path}: expected a JSON object")
    if data.get("use_dora"):
        raise ConvertError(f"{path}: key 'use_dora': DoRA adapters are not supported")
    if data.get("peft_type", "LORA") != "LORA":
        raise ConvertError(f"{path}: key 'peft_type': expected LORA, got {data['peft_type']!r}")
    for key in ("r", "lora_alpha"):
        if not isinstance(data.get(key), int | float) or isinstance(data.get(key), bool):
            raise ConvertError(f"{path}: key '{key}': expected a number")
    return data


def _normalise(key: str) -> str:
    key = key[len(_PREFIX) :] if key.startswith(_PREFIX) else key
    return key.replace(".modules_to_save", "").replace(".default", "")


def read_adapter(root: Path) -> Adapter:
    cfg = _config(root)
    st = root / "adapter_model.safetensors"
    if not st.is_file():
        bin_path = root / "adapter_model.bin"
        hint = (
            "save it with save_pretrained(safe_serialization=True)" if bin_path.exists() else None
        )
        raise ConvertError(f"{st}: file not found", hint=hint)
    try:
        file = SafeFile(st)
    except SafetensorsError as e:
        raise ConvertError(str(e)) from None
    halves: dict[str, dict[str, str]] = {}
    full: dict[str, str] = {}
    for key in file.names():
        m = _LORA_KEY.match(key[len(_PREFIX) :] if key.startswith(_PREFIX) else key)
        if m:
            halves.setdefault(m.group("module"), {})[m.group("kind")] = key
            continue
        name = _normalise(key)
        if any(name == f"{mod}.weight" for mod in FULL_MODULES) or name.endswith(".bias"):
            full[name] = key
        else:
            raise ConvertError(
                f"{st}: unexpected tensor {key}",
                hint="only LoRA A/B pairs and full embed/lm_head/bias tensors are understood",
            )
    pairs: dict[str, LoraPair] = {}
    for module, kinds in halves.items():
        embedding = "lora_embedding_A" in kinds or "lora_embedding_B" in kinds
        a, b = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
        if a not in kinds or b not in kinds:
            raise ConvertError(f"{st}: {module} has only one of {a}/{b}")
        pairs[f"{module}.weight"] = LoraPair(module, kinds[a], kinds[b], embedding)
    adapter = Adapter(
        root=root,
        alpha=float(cfg["lora_alpha"]),  # type: ignore[arg-type]
        r=int(cfg["r"]),  # type: ignore[call-overload]
        rslora=bool(cfg.get("use_rslora", False)),
        fan_in_fan_out=bool(cfg.get("fan_in_fan_out", False)),
        target_modules=cfg.get("target_modules") or [],  # type: ignore[arg-type]
        alpha_pattern=dict(cfg.get("alpha_pattern") or {}),  # type: ignore[call-overload]
        pairs=pairs,
        full=full,
        file=file,
    )
    if adapter.fan_in_fan_out:
        # PEFT itself resets fan_in_fan_out for nn.Linear (all Qwen2 projections are
        # Linear), so the trained delta is B @ A in the Linear layout either way.
        adapter.notes.append(
            "fan_in_fan_out=true ignored: Qwen2 projections are nn.Linear (as PEFT does)"
        )
    if not pairs and not full:
        raise ConvertError(f"{st}: the adapter holds no LoRA tensors")
    return adapter


def check_against(adapter: Adapter, base_names: set[str]) -> None:
    """Every module the adapter targets must exist in the base model."""
    missing = sorted(n for n in adapter.pairs if n not in base_names)
    if missing:
        raise ConvertError(
            f"{adapter.root}: the adapter targets {len(missing)} module(s) the base model lacks, "
            f"first {missing[0]}",
            hint="was the adapter trained on another base model?",
        )
    for name in adapter.full:
        if name.endswith(".bias") and name not in base_names:
            raise ConvertError(
                f"{adapter.root}: the adapter carries {name}, which the base model lacks"
            )
