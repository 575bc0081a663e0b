"""What several commands share: the config built from files and flags."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from npcchat import config as config_mod
from npcchat.config import Config
from npcchat.errors import BundleError

S = TypeVar("S")


def _given(section: S, **values: Any) -> S:
    """``section`` with the flags that were given (None: not given) applied."""
    given = {k: v for k, v in values.items() if v is not None}
    return replace(section, **given) if given else section  # type: ignore[type-var]


def build_config(
    path: Path | None,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    max_tokens: int | None = None,
    seed: int | None = None,
    repeat_penalty: float | None = None,
    threads: int | None = None,
    gpu_layers: int | None = None,
    ctx: int | None = None,
    lora: Path | None = None,
    lora_scale: float | None = None,
) -> Config:
    """Config files first, then whatever flags were given; every other section (state,
    knowledge) as the files say."""
    cfg = config_mod.load(path)
    cfg = replace(
        cfg,
        runtime=_given(
            cfg.runtime,
            n_threads=threads,
            n_gpu_layers=gpu_layers,
            n_ctx=ctx,
            lora_path=str(lora) if lora else None,
            lora_scale=lora_scale,
        ),
        sampling=_given(
            cfg.sampling,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            seed=seed,
            repeat_penalty=repeat_penalty,
        ),
    )
    config_mod.validate(cfg, "command line")
    if lora is not None and not lora.is_file():
        raise BundleError(f"--lora {lora}: file not found")
    return cfg
