"""Read a Hugging Face Qwen2 checkpoint directory without torch or transformers.

Config, tensors (single or sharded safetensors, memory-mapped) and the byte-level BPE
tokenizer as ``tokenizer.json`` / ``tokenizer_config.json`` write them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npcchat.errors import ConvertError
from npcchat.files.safetensors import SafeFile, SafetensorsError

SUPPORTED_ARCH = ("Qwen2ForCausalLM",)


@dataclass(frozen=True)
class Qwen2Config:
    hidden_size: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    vocab_size: int
    rms_eps: float
    rope_theta: float
    max_positions: int
    tie_embeddings: bool

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    def to_hf(self) -> dict[str, Any]:
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_positions,
            "tie_word_embeddings": self.tie_embeddings,
            "hidden_act": "silu",
            "torch_dtype": "bfloat16",
        }


# config.json and tokenizer_config.json are a few KB, Qwen2's tokenizer.json 7 MB: a file
# far larger is not one of them, and is refused before it is read into memory
MAX_JSON_BYTES = 64 << 20


def _read_json(path: Path) -> Any:
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise ConvertError(
                f"{path}: {size} bytes, over the {MAX_JSON_BYTES >> 20} MiB a model's JSON "
                "file can be"
            )
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ConvertError(f"{path}: file not found") from None
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: not valid JSON ({e})") from None


def _rope(cfg: dict[str, Any], path: Path) -> float:
    """Rope theta from ``rope_theta`` (transformers 4) or ``rope_parameters`` (5); scaling
    (YaRN, linear, dynamic...) is refused: the GGUF writer does not carry it, and a model
    that needs it would run with the wrong positions."""
    params = cfg.get("rope_parameters")
    for key in ("rope_parameters", "rope_scaling"):
        table = cfg.get(key)
        kind = table.get("rope_type", table.get("type")) if isinstance(table, dict) else None
        if kind not in (None, "default"):
            raise ConvertError(
                f"{path}: key 'rope_scaling': rope scaling {kind!r} is not supported",
                hint="npcchat converts Qwen2 models with plain rotary embeddings",
            )
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    value = cfg.get("rope_theta", 1e6) if theta is None else theta
    if not isinstance(value, int | float) or not value > 0:
        raise ConvertError(f"{path}: key 'rope_theta': expected a positive number, got {value!r}")
    return float(value)


def read_config(root: Path) -> Qwen2Config:
    path = root / "config.json"
    cfg = _read_json(path)
    arch = (cfg.get("architectures") or ["?"])[0]
    if arch not in SUPPORTED_ARCH:
        raise ConvertError(
            f"{path}: architecture {arch} is not supported", hint="npcchat converts Qwen2 models"
        )
    rope = _rope(cfg, path)
    try:
        return Qwen2Config(
            hidden_size=int(cfg["hidden_size"]),
            n_layers=int(cfg["num_hidden_layers"]),
            n_heads=int(cfg["num_attention_heads"]),
            n_kv_heads=int(cfg.get("num_key_value_heads", cfg["num_attention_heads"])),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope,
            max_positions=int(cfg.get("max_position_embeddings", 32768)),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )
    except KeyError as e:
        raise ConvertError(f"{path}: key {e.args[0]} missing") from None


class Checkpoint:
    """Tensors of a checkpoint, by HF name, across one or several safetensors files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.config = read_config(root)
        index = root / "model.safetensors.index.json"
        try:
            if index.is_file():
                weight_map: dict[str, str] = _read_json(index)["weight_map"]
                files = {name: SafeFile(root / name) for name in sorted(set(weight_map.values()))}
                self._where = {k: files[v] for k, v in weight_map.items()}
            else:
                paths = sorted(root.glob("*.safetensors"))
                if not paths:
                    raise ConvertError(f"{root}: no *.safetensors weights found")
                self._where = {k: f for f in map(SafeFile, paths) for k in f.names()}
        except SafetensorsError as e:
            raise ConvertError(str(e)) from None

    def names(self) -> list[str]:
        return list(self._where)

    def has(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shape(name)

    def get(self, name: str) -> Any:
        if name not in self._where:
            raise ConvertError(f"{self.root}: tensor {name} is missing from the checkpoint")
        return self._where[name].get(name)


@dataclass(frozen=True)
class Tokenizer:
    """What the GGUF needs of a byte-level BPE tokenizer."""

    vocab: dict[str, int]
    merges: list[str]  # "a b" strings, as llama.cpp wants them
    added: dict[int, tuple[str, bool]]  # id -> (content, special)
    eos: str
    pad: str | None


QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def check_pre_tokenizer(tj: dict[str, Any], path: Path) -> None:
    """The GGUF declares pre-tokenizer ``qwen2``: llama.cpp then splits text with Qwen2's
    regex and bytes. A tokenizer that splits or normalizes otherwise would tokenize
    differently from training, silently, so it is refused here."""
    normalizer = tj.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise ConvertError(
            f"{path}: key 'normalizer': {normalizer.get('type')!r} is not Qwen2's (NFC or none)"
        )
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    ok = (
        isinstance(steps, list)
        and len(steps) == 2
        and steps[0].get("type") == "Split"
        and (steps[0].get("pattern") or {}).get("Regex") == QWEN2_SPLIT
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex", True)
    )
    if not ok:
        raise ConvertError(
            f"{path}: key 'pre_tokenizer': not Qwen2's (the Qwen2 split regex, then ByteLevel); "
            "llama.cpp would tokenize differently from training",
            hint="npcchat converts Qwen2 models and their own tokenizer",
        )


def read_tokenizer(root: Path) -> Tokenizer:
    tj_path = root / "tokenizer.json"
    tj = _read_json(tj_path)
    model = tj.get("model", {})
    if model.get("type") != "BPE":
        raise ConvertError(f"{tj_path}: model.type {model.get('type')!r} is not BPE")
    check_pre_tokenizer(tj, tj_path)
    # tokenizers >= 0.20 writes merges as pairs, older versions as "a b" strings.
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    added = {
        int(t["id"]): (t["content"], bool(t.get("special"))) for t in tj.get("added_tokens", [])
    }
    tc_path = root / "tokenizer_config.json"
    tc = _read_json(tc_path) if tc_path.is_file() else {}
    for sid, info in (tc.get("added_tokens_decoder") or {}).items():
        added.setdefault(int(sid), (info["content"], bool(info.get("special"))))

    def token_text(v: Any) -> str | None:
        return v.get("content") if isinstance(v, dict) else v

    eos = token_text(tc.get("eos_token")) or "<|endoftext|>"
    return Tokenizer(
        vocab=dict(model["vocab"]),
        merges=merges,
        added=added,
        eos=eos,
        pad=token_text(tc.get("pad_token")),
    )
