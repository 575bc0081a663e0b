"""NPC definition files (``--npc FILE.toml``): id, location, lore, description, initial tags
and player state. Every key is checked; errors name the file, the key and the expected type.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from npcchat.errors import ConfigError, where
from npcchat.files.toml import read_toml
from npcchat.mind.knowledge import Entry, FlagDef, Knowledge, Trigger, persona_line
from npcchat.rules import load as rules_load
from npcchat.text import for_matching, phrase_pattern
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
    "lore_entries",
    "descriptions",
    "flags",
    "triggers",
    "quest",
    "npc_state",
    "examples",
    "reply_checks",
}
_ENTRY_KEYS = {"text", "stages", "locations", "requires_items", "requires_actions", "min_trust"}
_TRIGGER_KEYS = {"match", "reaction", "trust", "relationship", "flags"}
_PERSONA_KEYS = {"traits": list, "style": str, "backstory": str}
_TAG_KEYS = {f.name for f in fields(Tags)} - {"location"}


_EXAMPLE_KEYS = {
    "player",
    "stage",
    "location",
    "trust",
    "relationship",
    "items",
    "actions",
    "fires",
    "not_fires",
    "reply",
}


@dataclass(frozen=True)
class Example:
    """An example exchange (the original's ``dialogue_turn``): a player line in a state,
    the flags it must and must not fire, the reply it should get. ``npcchat eval
    --examples`` runs them as labelled cases."""

    player: str
    stage: str = ""
    location: str = ""
    trust: float | None = None
    relationship: float | None = None
    items: tuple[str, ...] | None = None
    actions: tuple[str, ...] | None = None
    fires: tuple[str, ...] = ()
    not_fires: tuple[str, ...] = ()
    reply: str = ""


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
    knowledge: Knowledge = field(default_factory=Knowledge)
    npc_items: tuple[str, ...] = ()  # what the NPC has at the start ([npc_state] items)
    examples: tuple[Example, ...] = ()  # [[examples]]: exchanges that are regression tests


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
        if not isinstance(value, kind) or (
            kind is list and not all(isinstance(v, str) for v in value)
        ):
            expected = "a list of strings" if kind is list else "a string"
            raise ConfigError(f"{where(path, f'persona.{key}')}: expected {expected}")
    demo = data.get("demo", {})
    if not isinstance(demo, dict):
        raise ConfigError(f"{where(path, 'demo')}: expected a table")
    name = _str(path, "name", data.get("name", npc_id))
    if "style" in persona and "style" not in tags_raw:
        tags_raw = {**tags_raw, "style": persona["style"]}  # the persona's style is the default
    knowledge = replace(
        _knowledge(path, data),
        persona=persona_line(name, persona.get("traits", []), persona.get("backstory", "")),
        name=name,
    )
    return NpcDef(
        id=npc_id,
        persona=persona,
        demo=demo,
        knowledge=knowledge,
        name=name,
        tags=_tags(path, tags_raw, _str(path, "location", data.get("location", ""))),
        lore=_str(path, "lore", data.get("lore", "")),
        description=_str(path, "description", data.get("description", "")),
        player_state=PlayerState(
            items=_list(path, "player_state.items", ps_raw.get("items", [])),
            actions=_list(path, "player_state.actions", ps_raw.get("actions", [])),
            position=_str(path, "player_state.position", ps_raw.get("position", "")),
        ),
        source=str(path),
        npc_items=rules_load.npc_items(data, path),
        examples=_examples(path, data),
    )


def load(path: Path) -> NpcDef:
    return parse(read_toml(path), path)


def _strs(path: Path, key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    return _list(path, key, value)


def _number(path: Path, key: str, value: Any, lo: float, hi: float) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not lo <= float(value) <= hi
    ):
        raise ConfigError(
            f"{where(path, key)}: expected a number in [{lo:g}, {hi:g}], got {value!r}"
        )
    return float(value)


def _table(
    path: Path, label: str, value: Any, known: set[str], required: tuple[str, ...] = ()
) -> dict[str, Any]:
    """A table with only ``known`` keys and every ``required`` one, or a ConfigError."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where(path, label)}: expected a table")
    for k in sorted(set(value) - known):
        raise ConfigError(
            f"{where(path, f'{label}.{k}')}: unknown key", hint=f"keys: {', '.join(sorted(known))}"
        )
    for k in required:
        if k not in value:
            raise ConfigError(f"{where(path, f'{label}.{k}')}: missing")
    return value


def _array(path: Path, data: dict[str, Any], key: str) -> list[Any]:
    raw = data.get(key, [])
    if not isinstance(raw, list):
        raise ConfigError(f"{where(path, key)}: expected an array of tables ([[{key}]])")
    return raw


def _entries(path: Path, data: dict[str, Any], key: str) -> tuple[Entry, ...]:
    out = []
    for i, raw in enumerate(_array(path, data, key)):
        label = f"{key}[{i}]"
        e = _table(path, label, raw, _ENTRY_KEYS, ("text",))
        out.append(
            Entry(
                text=_str(path, f"{label}.text", e["text"]),
                stages=_strs(path, f"{label}.stages", e.get("stages", "any")),
                locations=_strs(path, f"{label}.locations", e.get("locations", "any")),
                requires_items=_strs(path, f"{label}.requires_items", e.get("requires_items", [])),
                requires_actions=_strs(
                    path, f"{label}.requires_actions", e.get("requires_actions", [])
                ),
                min_trust=_number(path, f"{label}.min_trust", e.get("min_trust", 0.0), 0.0, 1.0),
            )
        )
    return tuple(out)


def _triggers(path: Path, data: dict[str, Any]) -> tuple[Trigger, ...]:
    out = []
    for i, raw in enumerate(_array(path, data, "triggers")):
        label = f"triggers[{i}]"
        t = _table(path, label, raw, _TRIGGER_KEYS, ("match", "reaction"))
        phrases = tuple(p for p in _strs(path, f"{label}.match", t["match"]) if p.strip())
        if not phrases:
            raise ConfigError(
                f"{where(path, f'{label}.match')}: expected at least one word or phrase"
            )
        # punctuation and invisible characters are ignored in matching: a phrase of nothing
        # else could never fire
        for p in phrases:
            if phrase_pattern(p) is None:
                raise ConfigError(
                    f"{where(path, f'{label}.match')}: {p!a} has no visible letters or "
                    "digits, so it could never match (punctuation, case and invisible "
                    "characters such as zero-width spaces and Hangul fillers are ignored)"
                )
        out.append(
            Trigger(
                phrases=tuple(for_matching(p) for p in phrases),
                reaction=_str(path, f"{label}.reaction", t["reaction"]),
                trust=_number(path, f"{label}.trust", t.get("trust", 0.0), -1.0, 1.0),
                relationship=_number(
                    path, f"{label}.relationship", t.get("relationship", 0.0), -1.0, 1.0
                ),
                flags=_strs(path, f"{label}.flags", t.get("flags", [])),
            )
        )
    return tuple(out)


def _examples(path: Path, data: dict[str, Any]) -> tuple[Example, ...]:
    raw = data.get("examples", [])
    if not isinstance(raw, list):
        raise ConfigError(f"{where(path, 'examples')}: expected [[examples]] tables")
    out = []
    for i, value in enumerate(raw):
        label = f"examples[{i}]"
        t = _table(path, label, value, _EXAMPLE_KEYS)
        if "player" not in t:
            raise ConfigError(f"{where(path, f'{label}.player')}: missing (the player's line)")

        def unit(key: str, t: dict[str, Any] = t, label: str = label) -> float | None:
            return _number(path, f"{label}.{key}", t[key], 0.0, 1.0) if key in t else None

        def names(key: str, t: dict[str, Any] = t, label: str = label) -> tuple[str, ...] | None:
            return _strs(path, f"{label}.{key}", t[key]) if key in t else None

        out.append(
            Example(
                player=_str(path, f"{label}.player", t["player"]),
                stage=_str(path, f"{label}.stage", t.get("stage", "")),
                location=_str(path, f"{label}.location", t.get("location", "")),
                trust=unit("trust"),
                relationship=unit("relationship"),
                items=names("items"),
                actions=names("actions"),
                fires=names("fires") or (),
                not_fires=names("not_fires") or (),
                reply=_str(path, f"{label}.reply", t.get("reply", "")),
            )
        )
    return tuple(out)


def _flags(path: Path, data: dict[str, Any]) -> dict[str, FlagDef]:
    raw = data.get("flags", {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{where(path, 'flags')}: expected a table of [flags.NAME] tables")
    out = {}
    for name, value in raw.items():
        label = f"flags.{name}"
        keys = {"display", "threshold", "examples", "negative_examples", *rules_load.RULE_KEYS}
        f = _table(path, label, value, keys)
        thr = f.get("threshold")
        out[name] = FlagDef(
            display=_str(path, f"{label}.display", f.get("display", name)),
            threshold=None if thr is None else _number(path, f"{label}.threshold", thr, 0.0, 1.0),
            examples=_strs(path, f"{label}.examples", f.get("examples", [])),
            negative_examples=_strs(
                path, f"{label}.negative_examples", f.get("negative_examples", [])
            ),
        )
    return out


def _knowledge(path: Path, data: dict[str, Any]) -> Knowledge:
    lore = _entries(path, data, "lore_entries")
    descriptions = _entries(path, data, "descriptions")
    return Knowledge(
        lore=lore,
        descriptions=descriptions,
        triggers=_triggers(path, data),
        flags=_flags(path, data),
        rules=rules_load.load(data, path, data.get("flags", {})),
    )


def load_dir(directory: Path) -> dict[str, NpcDef]:
    """Every ``*.toml`` NPC file of ``directory``, by its ``id`` (two files, one id: error)."""
    if not directory.is_dir():
        raise ConfigError(f"{directory}: not a directory of NPC files")
    npcs: dict[str, NpcDef] = {}
    for f in sorted(directory.glob("*.toml")):
        npc = load(f)
        if npc.id in npcs:
            raise ConfigError(
                f"{where(f, 'id')}: NPC {npc.id!r} is also defined in {npcs[npc.id].source}"
            )
        npcs[npc.id] = npc
    return npcs


def flag_warnings(npc: NpcDef, bundle_flags: Sequence[str]) -> list[str]:
    """One warning per place the NPC file names a flag the bundle does not have: legal
    (the file may serve several bundles) but it does nothing, and is usually a typo."""
    known = set(bundle_flags)
    listed = ", ".join(bundle_flags) or "none: the bundle has no heads"
    source = npc.source or npc.id
    out = [
        f"{where(source, f'flags.{name}')}: the bundle has no flag {name!r} "
        f"(its flags: {listed}); this table does nothing"
        for name in npc.knowledge.flags
        if name not in known
    ]
    for check in npc.knowledge.rules.checks:
        out += [
            f"{where(source, f'{check.label}.unless_fired')}: the bundle has no flag "
            f"{name!r} (its flags: {listed}); it never turns the check off"
            for name in check.unless_fired
            if name not in known
        ]
    for i, trigger in enumerate(npc.knowledge.triggers):
        out += [
            f"{where(source, f'triggers[{i}].flags')}: the bundle has no flag {name!r} "
            f"(its flags: {listed}); it never fires"
            for name in trigger.flags
            if name not in known
        ]
    return out
