"""The demo shipped inside the package: a small bundle (``bundle/``) and five NPC files
(``npcs/``), so ``pip install npcchat && npcchat talk`` works offline. Made by
``python -m npcchat_train.demo``.
"""

from __future__ import annotations

import os
from pathlib import Path

from npcchat.errors import BundleError, ConfigError
from npcchat.text import by_id

DEFAULT_NPC = "village_blacksmith"  # English; the mother speaks Korean (--npc mother)


def root() -> Path:
    return Path(__file__).resolve().parent


def bundle_dir() -> Path | None:
    """The demo bundle, or None when this install carries none."""
    path = root() / "bundle"
    return path if (path / "bundle.toml").is_file() else None


def is_demo_bundle(path: Path) -> bool:
    demo = bundle_dir()
    return demo is not None and path.resolve() == demo.resolve()


def default_bundle() -> Path:
    """``$NPCCHAT_BUNDLE``, else the demo bundle shipped inside the package."""
    env = os.environ.get("NPCCHAT_BUNDLE")
    if env:
        return Path(env)
    demo = bundle_dir()
    if demo is not None:
        return demo
    raise BundleError(
        "no bundle given and no demo bundle is installed",
        hint="pass --bundle DIR (make one with `npcchat convert`) or set NPCCHAT_BUNDLE",
    )


def npc_files() -> list[Path]:
    return sorted((root() / "npcs").glob("*.toml"))


def find_npc(spec: str) -> Path:
    """A demo NPC's file by id or unique id prefix (``village`` -> village_blacksmith)."""
    npcs = {p.stem: p for p in npc_files()}
    matches = by_id(spec, npcs)
    if len(matches) == 1:
        return npcs[matches[0]]
    names = ", ".join(npcs) or "(no demo NPCs installed)"
    raise ConfigError(f"NPC {spec!r}: not a file and not a demo NPC", hint=f"demo NPCs: {names}")
