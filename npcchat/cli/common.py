"""Helpers shared by commands: config from flags, bundle lookup, NPC loading."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from npcchat import config as config_mod
from npcchat.config import Config
from npcchat.errors import BundleError

if TYPE_CHECKING:
    from npcchat.bundle import Bundle
    from npcchat.engine import Engine
    from npcchat.npc import NpcDef


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
    """Config files first, then whatever flags were given."""
    cfg = config_mod.load(path)

    def pick(section: object, **values: object) -> object:
        given = {k: v for k, v in values.items() if v is not None}
        return replace(section, **given) if given else section  # type: ignore[type-var]

    cfg = Config(
        runtime=pick(  # type: ignore[arg-type]
            cfg.runtime,
            n_threads=threads,
            n_gpu_layers=gpu_layers,
            n_ctx=ctx,
            lora_path=str(lora) if lora else None,
            lora_scale=lora_scale,
        ),
        state=cfg.state,
        sampling=pick(  # type: ignore[arg-type]
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


def default_bundle() -> Path:
    """``$NPCCHAT_BUNDLE``, else the demo bundle shipped inside the package."""
    env = os.environ.get("NPCCHAT_BUNDLE")
    if env:
        return Path(env)
    from importlib import resources

    demo = Path(str(resources.files("npcchat"))) / "demo" / "bundle"
    if (demo / "bundle.toml").is_file():
        return demo
    raise BundleError(
        "no --bundle given and no demo bundle is installed",
        hint="pass --bundle DIR (make one with `npcchat convert`) or set NPCCHAT_BUNDLE",
    )


def load_bundle(path: Path | None) -> Bundle:
    from npcchat import bundle as bundle_mod

    return bundle_mod.load(path or default_bundle())


def open_engine(bundle: Path | None, cfg: Config) -> Engine:
    from npcchat.engine import load_engine

    return load_engine(bundle or default_bundle(), cfg)


def load_npc(path: Path | None) -> NpcDef:
    from npcchat import npc
    from npcchat.types import Tags

    if path is None:
        return npc.NpcDef(id="npc", name="npc", tags=Tags())
    return npc.load(path)
