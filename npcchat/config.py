"""Settings: built-in defaults, then ``$NPCCHAT_HOME/config.toml``, then ``--config``, then flags.

Only typed, frozen values leave this module. Unknown keys and wrong types are errors that
name the file and the key, because a silently ignored typo is a designer's lost afternoon.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from npcchat.errors import ConfigError, where
from npcchat.files.toml import read_toml


def home() -> Path:
    """npcchat's own directory (config, caches); ``NPCCHAT_HOME`` overrides it."""
    env = os.environ.get("NPCCHAT_HOME")
    return Path(env).expanduser() if env else Path.home() / ".npcchat"


@dataclass(frozen=True)
class RuntimeConfig:
    """How llama.cpp runs the model."""

    n_ctx: int = 2048
    n_batch: int = 512
    # The most prompt tokens one decode call takes (and at most n_batch). Every prompt is
    # cut this way, alone or served, so a served turn is the turn talk computes; a server
    # decodes joining prompts a chunk's worth per step between the running replies' steps,
    # so a running reply waits for at most one chunk. 128 costs what 512 does on a CPU
    # (measured); smaller: shorter waits, slower prompts.
    prefill_chunk: int = 128
    n_threads: int = 0  # 0: let llama.cpp choose
    n_gpu_layers: int = 0
    # Flash attention makes hidden states depend on how the prompt is chunked; off by
    # default so the same prompt gives the same game state every time.
    flash_attn: bool = False
    # Repacked CPU weights make results depend on how many sequences decode together
    # (eval --parallel); off by default for the same reason.
    repack: bool = False
    # Decode only what changed since the last turn (the KV cache keeps the shared prefix).
    prefix_reuse: bool = True
    # KV snapshots saved beside session files (FILE.kv); larger states are not saved.
    snapshots: bool = True
    snapshot_max_mb: int = 256
    lora_path: str = ""
    lora_scale: float = 1.0


@dataclass(frozen=True)
class StateConfig:
    """How head deltas move the NPC state."""

    delta_scale: float = 1.0
    clamp_min: float = 0.0
    clamp_max: float = 1.0
    # The state is kept to this many decimals: the prompt shows it (0.8 rather than
    # 0.8017920879647136, which the model never saw in training and costs 16 tokens).
    decimals: int = 2


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50  # only the k most likely tokens may be drawn (0: every token)
    repeat_penalty: float = 1.05
    max_tokens: int = 200
    seed: int = -1  # -1: a fresh random seed per session (recorded in each turn)


@dataclass(frozen=True)
class KnowledgeConfig:
    """Retrieval of NPC lore and long-term memory (token budgets per turn)."""

    embed_model: str = ""  # a local sentence-transformers model; empty: built-in lexical ranking
    allow_download: bool = False
    lore_tokens: int = 160
    description_tokens: int = 80
    memory_tokens: int = 120
    memories: int = 4
    # recall only memories of the last N game days by the session's game clock (game
    # events set it); 0: no limit. Memories without a game day are always recalled.
    recall_days: float = 0.0


@dataclass(frozen=True)
class Config:
    runtime: RuntimeConfig = RuntimeConfig()
    state: StateConfig = StateConfig()
    sampling: SamplingConfig = SamplingConfig()
    knowledge: KnowledgeConfig = KnowledgeConfig()


_SECTIONS = {
    "runtime": RuntimeConfig,
    "state": StateConfig,
    "sampling": SamplingConfig,
    "knowledge": KnowledgeConfig,
}


def _coerce(path: Path, key: str, value: Any, default: Any) -> Any:
    kind = type(default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    raise ConfigError(
        f"{where(path, key)}: expected {kind.__name__}, got {type(value).__name__} {value!r}"
    )


def _apply(cfg: Config, data: dict[str, Any], path: Path) -> Config:
    for section, values in data.items():
        cls = _SECTIONS.get(section)
        if cls is None or not isinstance(values, dict):
            raise ConfigError(
                f"{where(path, section)}: unknown section", hint=f"sections: {', '.join(_SECTIONS)}"
            )
        current = getattr(cfg, section)
        known = {f.name for f in fields(cls)}
        updates: dict[str, Any] = {}
        for key, value in values.items():
            if key not in known:
                raise ConfigError(
                    f"{where(path, f'{section}.{key}')}: unknown key",
                    hint=f"known keys: {', '.join(sorted(known))}",
                )
            updates[key] = _coerce(path, f"{section}.{key}", value, getattr(current, key))
        cfg = replace(cfg, **{section: replace(current, **updates)})
    validate(cfg, path)
    return cfg


# The range of every number, inclusive: what llama.cpp and the state rule can honour. A value
# outside (NaN and infinities included) is an error naming the key, never a silent clamp or
# an abort inside llama.cpp (n_ctx = 4294967360 used to end the process with SIGABRT).
RANGES: dict[str, tuple[float, float]] = {
    "runtime.n_ctx": (64, 1 << 20),
    "runtime.n_batch": (1, 1 << 16),
    "runtime.prefill_chunk": (16, 1 << 16),
    "runtime.n_threads": (0, 1024),
    "runtime.n_gpu_layers": (-1, 100_000),
    "runtime.snapshot_max_mb": (0, 1 << 20),
    "runtime.lora_scale": (-100.0, 100.0),
    "state.delta_scale": (0.0, 100.0),
    "state.clamp_min": (0.0, 1.0),
    "state.clamp_max": (0.0, 1.0),
    "state.decimals": (0, 12),
    "sampling.temperature": (0.0, 100.0),
    "sampling.top_p": (0.0, 1.0),
    "sampling.top_k": (0, 1 << 20),
    "sampling.repeat_penalty": (0.01, 100.0),
    "sampling.max_tokens": (1, 1 << 20),
    "sampling.seed": (-1, 2**31 - 1),
    "knowledge.lore_tokens": (0, 1 << 20),
    "knowledge.description_tokens": (0, 1 << 20),
    "knowledge.memory_tokens": (0, 1 << 20),
    "knowledge.memories": (0, 10_000),
    "knowledge.recall_days": (0, 1e9),
}


def _num(value: float) -> str:
    """A bound as a reader writes it: 1048576, not 1.04858e+06."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def validate(cfg: Config, path: object = "config") -> None:
    """Every number finite and in its range, and the rules between keys."""
    lo_clamp, hi_clamp = cfg.state.clamp_min, cfg.state.clamp_max
    if math.isfinite(lo_clamp) and math.isfinite(hi_clamp) and not lo_clamp < hi_clamp:
        raise ConfigError(f"{where(path, 'state.clamp_min')}: must be below state.clamp_max")
    for key, (lo, hi) in RANGES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if not (math.isfinite(value) and lo <= value <= hi):
            raise ConfigError(f"{where(path, key)}: expected {_num(lo)}..{_num(hi)}, got {value}")
    s, r, p = cfg.state, cfg.runtime, cfg.sampling
    if not s.clamp_min < s.clamp_max:
        raise ConfigError(f"{where(path, 'state.clamp_min')}: must be below state.clamp_max")
    if p.max_tokens >= r.n_ctx:
        raise ConfigError(
            f"{where(path, 'sampling.max_tokens')}: expected 1..{r.n_ctx - 1}, got {p.max_tokens}"
        )
    if p.top_p <= 0.0:
        raise ConfigError(f"{where(path, 'sampling.top_p')}: expected (0, 1], got {p.top_p}")


def load(path: Path | None = None) -> Config:
    """Defaults, then the user's config in the npcchat home, then ``path`` if given."""
    cfg = Config()
    user = home() / "config.toml"
    if user.is_file():
        cfg = _apply(cfg, read_toml(user), user)
    if path is not None:
        cfg = _apply(cfg, read_toml(path), path)
    return cfg
