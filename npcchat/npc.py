"""NPC definition files (``--npc FILE.toml``): id, location, lore, description, initial tags
and player state. Every key is checked; errors name the file, the key and the expected type.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from npcchat.config import read_toml
from npcchat.errors import ConfigError, where
from npcchat.types import NUMERIC_TAGS, PlayerState, Tags

_TOP_KEYS = {
    "id",
    "name",
    "location",
    "lore",
    "description",
    "tags",
    "player_state",
    "persona",
    "demo",
}
_PERSONA_KEYS = {"traits": list, "style": str, "backstory": str}
_TAG_KEYS = {f.name for f in fields(Tags)} - {"location"}


@dataclass(frozen=True)
class NpcDef:
    id: str
    name: str
    tags: Tags
    lore: str = ""
    description: str = ""
    player_state: PlayerState = field(default_factory=PlayerState)
    source: str = ""
    persona: dict[str, Any] = field(default_factory=dict)
    demo: dict[str, Any] = field(default_factory=dict)  # synthetic-data recipe (demo NPCs)


def _str(path: Path, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{where(path, key)}: expected a string, got {value!r}")
    return value


def _tags(path: Path, data: dict[str, Any], location: str) -> Tags:
    values: dict[str, Any] = {"location": location}
    for key, value in data.items():
        label = f"tags.{key}"
        if key not in _TAG_KEYS:
            raise ConfigError(
                f"{where(path, label)}: unknown tag", hint=f"tags: {', '.join(sorted(_TAG_KEYS))}"
            )
        if key in NUMERIC_TAGS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(
                    f"{where(path, label)}: expected a number in [0, 1], got {value!r}"
                )
            if not 0.0 <= float(value) <= 1.0:
                raise ConfigError(f"{where(path, label)}: expected a number in [0, 1], got {value}")
            values[key] = float(value)
        else:
            values[key] = _str(path, label, value)
    return Tags(**values)


def _list(path: Path, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where(path, key)}: expected a list of strings, got {value!r}")
    return tuple(value)


def parse(data: dict[str, Any], path: Path) -> NpcDef:
    unknown = set(data) - _TOP_KEYS
    if unknown:
        key = sorted(unknown)[0]
        raise ConfigError(
            f"{where(path, key)}: unknown key", hint=f"keys: {', '.join(sorted(_TOP_KEYS))}"
        )
    if "id" not in data:
        raise ConfigError(f'{where(path, "id")}: missing (the NPC\'s id, e.g. "blacksmith")')
    npc_id = _str(path, "id", data["id"])
    tags_raw = data.get("tags", {})
    if not isinstance(tags_raw, dict):
        raise ConfigError(f"{where(path, 'tags')}: expected a table")
    ps_raw = data.get("player_state", {})
    if not isinstance(ps_raw, dict):
        raise ConfigError(f"{where(path, 'player_state')}: expected a table")
    for key in set(ps_raw) - {"items", "actions", "position"}:
        raise ConfigError(f"{where(path, f'player_state.{key}')}: unknown key")
    persona = data.get("persona", {})
    if not isinstance(persona, dict):
        raise ConfigError(f"{where(path, 'persona')}: expected a table")
    for key, value in persona.items():
        kind = _PERSONA_KEYS.get(key)
        if kind is None:
            raise ConfigError(
                f"{where(path, f'persona.{key}')}: unknown key",
                hint="keys: traits, style, backstory",
            )
        if not isinstance(value, kind):
            raise ConfigError(
                f"{where(path, f'persona.{key}')}: expected {'a list of strings' if kind is list else 'a string'}"
            )
    demo = data.get("demo", {})
    if not isinstance(demo, dict):
        raise ConfigError(f"{where(path, 'demo')}: expected a table")
    return NpcDef(
        id=npc_id,
        persona=persona,
        demo=demo,
        name=_str(path, "name", data.get("name", npc_id)),
        tags=_tags(path, tags_raw, _str(path, "location", data.get("location", ""))),
        lore=_str(path, "lore", data.get("lore", "")),
        description=_str(path, "description", data.get("description", "")),
        player_state=PlayerState(
            items=_list(path, "player_state.items", ps_raw.get("items", [])),
            actions=_list(path, "player_state.actions", ps_raw.get("actions", [])),
            position=_str(path, "player_state.position", ps_raw.get("position", "")),
        ),
        source=str(path),
    )


def load(path: Path) -> NpcDef:
    return parse(read_toml(path), path)
