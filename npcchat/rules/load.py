"""The rules of an NPC file, validated at load: every error names the file and the key.

```toml
[quest]
stages = ["start", "in_progress", "complete"]   # the order "next" follows

[npc_state]
items = ["loom_key"]                            # what the NPC has and can give

[flags.give_item]
requires = { min_trust = 0.3 }                  # all cases need this
[[flags.give_item.cases]]                       # the first case whose conditions hold
requires = { items = ["forgotten_picture"] }
effects = { stage = "complete", take_items = ["forgotten_picture"], give_items = ["loom_key"] }
action = { name = "give_item", item = "loom_key" }
[flags.give_item.guard]                         # the answer when the rules say no
lines = ["I have nothing for a stranger."]      # or: tags = { style = "guarded" }
```

A flag without ``cases`` may put ``requires``, ``effects`` and ``action`` in its own table
(one case). Conditions: ``items``, ``actions``, ``npc_items``, ``stages``, ``locations``,
``min_trust``/``max_trust``, ``min_relationship``/``max_relationship``. Effects: ``stage``
(a stage, or ``"next"``), ``take_items``, ``give_items``, ``tags`` (npc_mood, style,
player_reputation, location), ``memory``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from npcchat.errors import ConfigError, where
from npcchat.rules.model import (
    NEXT,
    ActionSpec,
    Case,
    Choice,
    Effects,
    FlagRule,
    Guard,
    ReplyCheck,
    Requires,
    Rules,
)
from npcchat.text import phrase_pattern
from npcchat.types import Param

RULE_KEYS = {"requires", "effects", "action", "cases", "guard"}
_REQUIRES = {
    "items",
    "actions",
    "npc_items",
    "stages",
    "locations",
    "min_trust",
    "max_trust",
    "min_relationship",
    "max_relationship",
}
_EFFECTS = {"stage", "take_items", "give_items", "tags", "memory"}
_EFFECT_TAGS = {"npc_mood", "style", "player_reputation", "location"}
_CASE = {"requires", "effects", "action"}
MAX_LINE = 2000  # characters of a guarded line or memory line


class _Reader:
    def __init__(self, path: Path) -> None:
        self.path = path

    def fail(self, key: str, expected: str, hint: str | None = None) -> ConfigError:
        return ConfigError(f"{where(self.path, key)}: {expected}", hint=hint)

    def table(self, key: str, value: Any, allowed: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, "expected a table")
        for name in value:
            if name not in allowed:
                raise self.fail(
                    f"{key}.{name}", "unknown key", hint=f"keys: {', '.join(sorted(allowed))}"
                )
        return value

    def text(self, key: str, value: Any, limit: int = 200) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key, f"expected a non-empty string, got {value!r}"[:200])
        if len(value) > limit:
            raise self.fail(key, f"at most {limit} characters")
        return value

    def texts(self, key: str, value: Any, limit: int = 200) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(key, "expected a list of strings")
        return tuple(self.text(f"{key}[{i}]", v, limit) for i, v in enumerate(value))

    def unit(self, key: str, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a number in [0, 1], got {value!r}")
        if not (math.isfinite(value) and 0.0 <= value <= 1.0):
            raise self.fail(key, f"expected a number in [0, 1], got {value}")
        return float(value)


def load(data: dict[str, Any], path: Path, flags: dict[str, Any]) -> Rules:
    """The rules in an NPC file's ``[quest]``, ``[npc_state]`` and ``[flags.*]`` tables
    (``flags``: the raw ``[flags]`` table, already checked to be one)."""
    r = _Reader(path)
    stages: tuple[str, ...] = ()
    if "quest" in data:
        quest = r.table("quest", data["quest"], {"stages"})
        stages = r.texts("quest.stages", quest.get("stages", []))
        if len(set(stages)) != len(stages):
            raise r.fail("quest.stages", "stage names repeat")
    out: dict[str, FlagRule] = {}
    for name, raw in flags.items():
        if isinstance(raw, dict) and RULE_KEYS & set(raw):
            out[name] = _flag(r, name, raw, stages)
    return Rules(out, stages, _checks(r, data.get("reply_checks", []), stages))


def _checks(r: _Reader, raw: Any, stages: tuple[str, ...]) -> tuple[ReplyCheck, ...]:
    if not isinstance(raw, list):
        raise r.fail("reply_checks", "expected [[reply_checks]] tables")
    out = []
    for i, value in enumerate(raw):
        label = f"reply_checks[{i}]"
        t = r.table(label, value, {"say_not", "until", "unless_fired"})
        if "say_not" not in t:
            raise r.fail(f"{label}.say_not", "missing (the phrases the NPC must not say)")
        phrases = r.texts(f"{label}.say_not", t["say_not"])
        if not phrases:
            raise r.fail(f"{label}.say_not", "expected at least one phrase")
        for j, phrase in enumerate(phrases):
            if phrase_pattern(phrase) is None:
                raise r.fail(
                    f"{label}.say_not[{j}]",
                    f"{phrase!a} has no visible letters or digits, so it could never match",
                )
        until = _requires(r, f"{label}.until", t["until"], stages) if "until" in t else None
        unless: tuple[str, ...] = ()
        if "unless_fired" in t:  # a flag, or a list of them
            raw_unless = t["unless_fired"]
            raw_unless = [raw_unless] if isinstance(raw_unless, str) else raw_unless
            unless = r.texts(f"{label}.unless_fired", raw_unless)
        out.append(ReplyCheck(phrases, until, label, unless))
    return tuple(out)


def npc_items(data: dict[str, Any], path: Path) -> tuple[str, ...]:
    """``[npc_state] items``: what the NPC has at the start."""
    r = _Reader(path)
    if "npc_state" not in data:
        return ()
    table = r.table("npc_state", data["npc_state"], {"items"})
    return r.texts("npc_state.items", table.get("items", []))


def _flag(r: _Reader, name: str, raw: dict[str, Any], stages: tuple[str, ...]) -> FlagRule:
    label = f"flags.{name}"
    requires = _requires(r, f"{label}.requires", raw.get("requires", {}), stages)
    if "cases" in raw:
        for key in ("effects", "action"):
            if key in raw:
                raise r.fail(
                    f"{label}.{key}",
                    "put it in each case when the flag has cases",
                    hint=f"[[{label}.cases]] tables hold requires, effects and action",
                )
        cases_raw = raw["cases"]
        if not isinstance(cases_raw, list) or not cases_raw:
            raise r.fail(f"{label}.cases", "expected a list of [[cases]] tables")
        cases = tuple(
            _case(r, f"{label}.cases[{i}]", c, name, stages) for i, c in enumerate(cases_raw)
        )
    else:
        body = {k: raw[k] for k in ("effects", "action") if k in raw}
        cases = (_case(r, label, body, name, stages),)
    guard = _guard(r, f"{label}.guard", raw["guard"]) if "guard" in raw else None
    return FlagRule(name, requires, cases, guard)


def _case(r: _Reader, label: str, raw: Any, flag: str, stages: tuple[str, ...]) -> Case:
    table = r.table(label, raw, _CASE)
    return Case(
        requires=_requires(r, f"{label}.requires", table.get("requires", {}), stages),
        effects=_effects(r, f"{label}.effects", table.get("effects", {}), stages),
        action=_action(r, f"{label}.action", table["action"], flag) if "action" in table else None,
        label=label,
    )


def _requires(r: _Reader, label: str, raw: Any, stages: tuple[str, ...]) -> Requires:
    t = r.table(label, raw, _REQUIRES)
    values: dict[str, Any] = {}
    for key in ("items", "actions", "npc_items", "stages", "locations"):
        if key in t:
            values[key] = r.texts(f"{label}.{key}", t[key])
    for stage in values.get("stages", ()):
        _known_stage(r, f"{label}.stages", stage, stages)
    for key in ("min_trust", "max_trust", "min_relationship", "max_relationship"):
        if key in t:
            values[key] = r.unit(f"{label}.{key}", t[key])
    return Requires(**values)


def _effects(r: _Reader, label: str, raw: Any, stages: tuple[str, ...]) -> Effects:
    t = r.table(label, raw, _EFFECTS)
    stage = ""
    if "stage" in t:
        stage = r.text(f"{label}.stage", t["stage"])
        if stage == NEXT and not stages:
            raise r.fail(f"{label}.stage", '"next" needs the stage order: [quest] stages = [...]')
        if stage != NEXT:
            _known_stage(r, f"{label}.stage", stage, stages)
    tags: list[tuple[str, str]] = []
    if "tags" in t:
        tag_table = r.table(f"{label}.tags", t["tags"], _EFFECT_TAGS)
        tags = [(k, r.text(f"{label}.tags.{k}", v)) for k, v in tag_table.items()]
    return Effects(
        stage=stage,
        take_items=r.texts(f"{label}.take_items", t.get("take_items", [])),
        give_items=r.texts(f"{label}.give_items", t.get("give_items", [])),
        tags=tuple(tags),
        memory=r.text(f"{label}.memory", t["memory"], MAX_LINE) if "memory" in t else "",
    )


def _action(r: _Reader, label: str, raw: Any, flag: str) -> ActionSpec:
    if not isinstance(raw, dict):
        raise r.fail(label, "expected a table: name and the action's parameters")
    name = r.text(f"{label}.name", raw.get("name", flag))
    params: list[tuple[str, Param | Choice]] = []
    for key, value in raw.items():
        if key == "name":
            continue
        if isinstance(value, dict):  # { choose = [...] }: the model picks, by grammar
            t = r.table(f"{label}.{key}", value, {"choose"})
            options = r.texts(f"{label}.{key}.choose", t.get("choose", []))
            if not 1 <= len(options) <= 64 or len(set(options)) != len(options):
                raise r.fail(f"{label}.{key}.choose", "expected 1 to 64 different options")
            params.append((key, Choice(options)))
            continue
        if key in ("flag",):
            raise r.fail(f"{label}.{key}", "reserved (the game gets the flag's name beside it)")
        if isinstance(value, float) and not math.isfinite(value):
            raise r.fail(f"{label}.{key}", "expected a finite number")
        if not isinstance(value, str | int | float | bool):
            raise r.fail(f"{label}.{key}", "expected a string, number or boolean parameter")
        if isinstance(value, str) and len(value) > 200:
            raise r.fail(f"{label}.{key}", "at most 200 characters")
        params.append((key, value))
    return name, tuple(params)


def _guard(r: _Reader, label: str, raw: Any) -> Guard:
    t = r.table(label, raw, {"lines", "tags"})
    lines = r.texts(f"{label}.lines", t.get("lines", []), MAX_LINE)
    tags: list[tuple[str, str]] = []
    if "tags" in t:
        tag_table = r.table(f"{label}.tags", t["tags"], _EFFECT_TAGS | {"quest_stage"})
        tags = [(k, r.text(f"{label}.tags.{k}", v)) for k, v in tag_table.items()]
    if bool(lines) == bool(tags):
        raise r.fail(
            label,
            "expected either lines (fixed replies in rotation) or tags (the model with "
            "those tags), not both or neither",
        )
    return Guard(lines, tuple(tags))


def _known_stage(r: _Reader, key: str, stage: str, stages: tuple[str, ...]) -> None:
    if stages and stage not in stages:
        raise r.fail(key, f"{stage!r} is not a stage of [quest] stages ({', '.join(stages)})")
