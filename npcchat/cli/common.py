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
    demo = demo_dir() / "bundle"
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


DEMO_DEFAULT_NPC = "mother_abandoned_factory"


def demo_dir() -> Path:
    from importlib import resources

    return Path(str(resources.files("npcchat"))) / "demo"


def load_npc(spec: str | None, demo: bool = False) -> NpcDef:
    """``--npc``: a TOML file, or the id (or a unique prefix) of a demo NPC.

    Without ``--npc`` the demo bundle talks as its first NPC; other bundles get a bare NPC."""
    from npcchat import npc
    from npcchat.errors import ConfigError
    from npcchat.types import Tags

    npcs = sorted((demo_dir() / "npcs").glob("*.toml"))
    if spec is None:
        wanted = demo_dir() / "npcs" / f"{DEMO_DEFAULT_NPC}.toml"
        if demo and wanted.is_file():
            return npc.load(wanted)
        return npc.NpcDef(id="npc", name="npc", tags=Tags())
    path = Path(spec)
    if path.is_file():
        return npc.load(path)
    matches = [p for p in npcs if p.stem == spec] or [p for p in npcs if p.stem.startswith(spec)]
    if len(matches) == 1:
        return npc.load(matches[0])
    names = ", ".join(p.stem for p in npcs) or "(no demo NPCs installed)"
    if path.suffix == ".toml" or "/" in spec:
        raise ConfigError(f"--npc {spec}: file not found")
    raise ConfigError(f"--npc {spec}: not a file and not a demo NPC", hint=f"demo NPCs: {names}")
