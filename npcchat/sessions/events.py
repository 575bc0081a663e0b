"""Game events: what the game tells an NPC's session without a player line.

A game knows things the NPC should know before the player speaks: a quest stage moved on,
an item changed hands through the inventory, the player did something, a day passed, or
something happened that the NPC should remember. Each is an event, applied to a session
as one atomic step (all events of a call or none, in order), saved as durably as a turn
and logged in the session file beside its turns.

Event kinds (the JSON form; the typed values below are the Python form):

* ``{"type": "tags", "tags": {"npc_mood": "grateful", "trust": 0.7}}``: set tags
  (``quest_stage``, ``npc_mood``, ``player_reputation``, ``style``, ``location``, and
  ``trust``/``relationship`` as numbers in [0, 1]).
* ``{"type": "stage", "stage": "complete"}``: the quest stage (the tag ``quest_stage``).
* ``{"type": "items", "gained": ["loom_key"], "lost": ["coin"]}``: the player's items.
* ``{"type": "actions", "gained": ["killed_wolves"], "lost": []}``: what the player did.
* ``{"type": "memory", "text": "...", "day": 12, "time": "Last Seed 17"}``: a line the NPC
  remembers, carrying the game's own day (a number) and/or its timestamp (free text).
* ``{"type": "time", "day": 13, "time": "Last Seed 18"}``: the game clock moved on.

In the next prompt: tags and the player's items and actions as the session's state shows
them; a memory given since the player's last line is always among the memory lines of the
next prompt (``memory: (day 12) ...``), later ones are recalled by relevance like every
memory, and only within ``knowledge.recall_days`` game days of the clock when that is set.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from npcchat.errors import ConfigError
from npcchat.text import nfc
from npcchat.types import NUMERIC_TAGS, TAG_FIELDS, Change, Memory, PlayerState, Tags

MAX_EVENTS = 64  # events in one call
MAX_TEXT = 2000  # characters of a memory line
MAX_NAME = 200  # characters of an item, action, tag value or time label
MAX_NAMES = 200  # items or actions named in one event
MAX_DAY = 1e9  # a game day number (finite, not negative)
TAG_KEYS = (*TAG_FIELDS, "location")
KINDS = ("tags", "stage", "items", "actions", "memory", "time")
# what one session keeps: the game's memories beyond this are forgotten oldest first (a
# change says so), and the log keeps the newest records: events cost no model time, so
# nothing else would bound a session a game keeps feeding
MAX_EVENT_MEMORIES = 1000
MAX_LOG = 1000


@dataclass(frozen=True)
class SetTags:
    """Set tags of the NPC's state (``("npc_mood", "grateful")``, ``("trust", 0.7)``)."""

    tags: tuple[tuple[str, str | float], ...]
    type: str = "tags"

    def to_json(self) -> dict[str, Any]:
        return {"type": "tags", "tags": dict(self.tags)}


@dataclass(frozen=True)
class Stage:
    """The quest stage moved (the tag ``quest_stage``)."""

    stage: str
    type: str = "stage"

    def to_json(self) -> dict[str, Any]:
        return {"type": "stage", "stage": self.stage}


@dataclass(frozen=True)
class Items:
    """Items the player gained or lost (the inventory, not a conversation)."""

    gained: tuple[str, ...] = ()
    lost: tuple[str, ...] = ()
    type: str = "items"

    def to_json(self) -> dict[str, Any]:
        return {"type": "items", "gained": list(self.gained), "lost": list(self.lost)}


@dataclass(frozen=True)
class Actions:
    """What the player did (or no longer counts as having done)."""

    gained: tuple[str, ...] = ()
    lost: tuple[str, ...] = ()
    type: str = "actions"

    def to_json(self) -> dict[str, Any]:
        return {"type": "actions", "gained": list(self.gained), "lost": list(self.lost)}


@dataclass(frozen=True)
class Remember:
    """Something the NPC should remember, at the game's own time: ``day`` (a number, None:
    the session clock's day) and ``time`` (the game's timestamp as text)."""

    text: str
    day: float | None = None
    time: str = ""
    type: str = "memory"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "memory", "text": self.text}
        if self.day is not None:
            out["day"] = self.day
        if self.time:
            out["time"] = self.time
        return out


@dataclass(frozen=True)
class Clock:
    """The game clock: its day (and the timestamp as the game shows it)."""

    day: float
    time: str = ""
    type: str = "time"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": "time", "day": self.day}
        if self.time:
            out["time"] = self.time
        return out


Event = SetTags | Stage | Items | Actions | Remember | Clock


@dataclass(frozen=True)
class EventRecord:
    """One call's events as the session file logs them: before which turn (``turn``: the
    number of turns then), when (UTC), the events, and the changes they made."""

    turn: int
    time: str
    events: tuple[Event, ...]
    changes: tuple[Change, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "turn": self.turn,
            "time": self.time,
            "events": [e.to_json() for e in self.events],
            "changes": [c.to_json() for c in self.changes],
        }


# -- reading -----------------------------------------------------------------------------------
def parse_all(items: Any, label: str = "events") -> tuple[Event, ...]:
    """A list of events in their JSON form (or typed values); ConfigError naming the
    event and key at fault. Bounded before anything is built."""
    if isinstance(items, Mapping | Event):
        items = [items]
    if not isinstance(items, Sequence) or isinstance(items, str | bytes):
        raise ConfigError(f"{label}: expected a list of events")
    if not items:
        raise ConfigError(f"{label}: expected at least one event")
    if len(items) > MAX_EVENTS:
        raise ConfigError(f"{label}: at most {MAX_EVENTS} events in one call, got {len(items)}")
    return tuple(parse(e, f"{label}[{i}]") for i, e in enumerate(items))


def parse(obj: Any, label: str = "event") -> Event:
    """One event from its JSON form (a typed value is checked and returned normalized)."""
    if isinstance(obj, Event):
        obj = obj.to_json()
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{label}: expected an object with a 'type' ({', '.join(KINDS)})")
    kind = obj.get("type")
    if kind not in KINDS:
        raise ConfigError(f"{label}.type: expected one of {', '.join(KINDS)}, got {kind!r}")
    allowed = {
        "tags": {"tags"},
        "stage": {"stage"},
        "items": {"gained", "lost"},
        "actions": {"gained", "lost"},
        "memory": {"text", "day", "time"},
        "time": {"day", "time"},
    }[kind]
    extra = sorted(str(k) for k in obj if k != "type" and k not in allowed)
    if extra:
        raise ConfigError(
            f"{label}.{extra[0]}: not a key of a {kind!r} event "
            f"(keys: type, {', '.join(sorted(allowed))})"
        )
    if kind == "tags":
        return SetTags(_tags(obj.get("tags"), f"{label}.tags"))
    if kind == "stage":
        return Stage(_text(obj, "stage", label, MAX_NAME, required=True))
    if kind in ("items", "actions"):
        gained = _names(obj.get("gained", []), f"{label}.gained")
        lost = _names(obj.get("lost", []), f"{label}.lost")
        return Items(gained, lost) if kind == "items" else Actions(gained, lost)
    if kind == "memory":
        text = _text(obj, "text", label, MAX_TEXT, required=True)
        return Remember(text, _day(obj, label, required=False), _text(obj, "time", label))
    day = _day(obj, label, required=True)
    assert day is not None
    return Clock(day, _text(obj, "time", label))


def _text(
    obj: Mapping[str, Any], key: str, label: str, limit: int = MAX_NAME, *, required: bool = False
) -> str:
    return _clean(obj.get(key, ""), f"{label}.{key}", limit, required=required)


def _clean(value: Any, label: str, limit: int = MAX_NAME, *, required: bool = False) -> str:
    """Text as every other line of npcchat: NFC, no surrounding space, within ``limit``."""
    if not isinstance(value, str):
        raise ConfigError(f"{label}: expected text, got {type(value).__name__}")
    if len(value) > limit:
        raise ConfigError(f"{label}: at most {limit} characters, got {len(value)}")
    text = nfc(value).strip()
    if required and not text:
        raise ConfigError(f"{label}: expected non-empty text")
    return text


def _day(obj: Mapping[str, Any], label: str, *, required: bool) -> float | None:
    if "day" not in obj or obj["day"] is None:
        if required:
            raise ConfigError(f"{label}.day: missing (the game's day, a number)")
        return None
    value = obj["day"]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{label}.day: expected a number, got {value!r}")
    if not (math.isfinite(value) and 0 <= value <= MAX_DAY):
        raise ConfigError(f"{label}.day: expected a number in 0..{MAX_DAY:g}, got {value!r}")
    return float(value)


def _names(value: Any, label: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"{label}: expected a list of names")
    if len(value) > MAX_NAMES:
        raise ConfigError(f"{label}: at most {MAX_NAMES} names, got {len(value)}")
    out: list[str] = []
    for i, v in enumerate(value):
        name = _clean(v, f"{label}[{i}]", required=True)
        if name not in out:
            out.append(name)
    return tuple(out)


def _tags(value: Any, label: str) -> tuple[tuple[str, str | float], ...]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{label}: expected a table of tags ({', '.join(TAG_KEYS)})")
    out: list[tuple[str, str | float]] = []
    for key, v in value.items():
        if key not in TAG_KEYS:
            raise ConfigError(f"{label}.{key}: not a tag (tags: {', '.join(TAG_KEYS)})")
        if key in NUMERIC_TAGS:
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise ConfigError(f"{label}.{key}: expected a number in [0, 1], got {v!r}")
            if not (math.isfinite(v) and 0.0 <= v <= 1.0):
                raise ConfigError(f"{label}.{key}: expected a number in [0, 1], got {v!r}")
            out.append((key, float(v)))
        else:
            out.append((key, _clean(v, f"{label}.{key}")))
    return tuple(out)


# -- talk's /event -----------------------------------------------------------------------------
COMMAND_HELP = (
    "/event stage complete · /event tags npc_mood=grateful trust=0.7 · "
    "/event items +loom_key -coin · /event actions +killed_wolves · "
    '/event memory day=12 time="Last Seed 17" The player returned the ring · '
    "/event time 13 Last Seed 18 · /event {JSON} or [JSON, ...]"
)
_SETTING = re.compile(r'^(day|time)=(?:"([^"]*)"|(\S*))\s*')


def parse_command(text: str) -> tuple[Event, ...]:
    """Talk's ``/event ...`` (see :data:`COMMAND_HELP`): the short forms, or the JSON form
    of one event or a list. ConfigError with the usage when it is neither."""
    text = text.strip()
    if text[:1] in ("{", "["):
        try:
            data = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"/event: not valid JSON ({e})") from None
        return parse_all(data, "/event")
    kind, _, rest = text.partition(" ")
    rest = rest.strip()
    usage = f"usage: {COMMAND_HELP}"
    if kind == "stage" and rest:
        return (parse({"type": "stage", "stage": rest}, "/event"),)
    if kind == "tags" and rest:
        tags: dict[str, Any] = {}
        for pair in rest.split():
            key, eq, value = pair.partition("=")
            if not eq:
                raise ConfigError(f"/event tags: expected KEY=VALUE, got {pair!r}", hint=usage)
            tags[key] = _number(value) if key in NUMERIC_TAGS else value
        return (parse({"type": "tags", "tags": tags}, "/event"),)
    if kind in ("items", "item", "actions", "action") and rest:
        gained = [w[1:] for w in rest.split() if w.startswith("+") and len(w) > 1]
        lost = [w[1:] for w in rest.split() if w.startswith("-") and len(w) > 1]
        if len(gained) + len(lost) != len(rest.split()):
            raise ConfigError(f"/event {kind}: expected +NAME (gained) or -NAME (lost)", hint=usage)
        which = "items" if kind.startswith("item") else "actions"
        return (parse({"type": which, "gained": gained, "lost": lost}, "/event"),)
    if kind in ("time", "day") and rest:
        day, _, label = rest.partition(" ")
        return (parse({"type": "time", "day": _number(day), "time": label}, "/event"),)
    if kind == "memory" and rest:
        event: dict[str, Any] = {"type": "memory"}
        while m := _SETTING.match(rest):
            value = m.group(2) if m.group(2) is not None else m.group(3)
            event[m.group(1)] = _number(value) if m.group(1) == "day" else value
            rest = rest[m.end() :]
        event["text"] = rest
        return (parse(event, "/event"),)
    raise ConfigError(f"/event: {text or 'nothing given'}?", hint=usage)


def _number(text: str) -> float | str:
    """A number written in a command (left as text when it is not one: parse says why)."""
    try:
        return float(text)
    except ValueError:
        return text


# -- applying ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Applied:
    """The state after some events, and every change they made, in order."""

    tags: Tags
    player: PlayerState
    memories: tuple[Memory, ...]
    day: float | None
    time: str
    changes: tuple[Change, ...]


def apply(
    events: Sequence[Event],
    tags: Tags,
    player: PlayerState,
    day: float | None,
    time: str,
    turn: int,
) -> Applied:
    """Apply ``events`` in order to a state (pure: the session layer stores the result).
    ``turn``: the number of turns so far (the memories' place in the history)."""
    changes: list[Change] = []
    memories: list[Memory] = []
    for e in events:
        if isinstance(e, SetTags | Stage):
            pairs = e.tags if isinstance(e, SetTags) else (("quest_stage", e.stage),)
            for key, value in pairs:
                before = getattr(tags, key)
                if before != value:
                    changes.append(Change("tag", key, _shown(before), _shown(value)))
                    new: dict[str, Any] = {key: value}
                    tags = replace(tags, **new)
        elif isinstance(e, Items | Actions):
            which = "items" if isinstance(e, Items) else "actions"
            kind = "item" if which == "items" else "action"
            held = list(getattr(player, which))
            for name in e.lost:
                if name in held:
                    held.remove(name)
                    changes.append(Change(kind, name, "player", ""))
            for name in e.gained:
                if name not in held:
                    held.append(name)
                    changes.append(Change(kind, name, "", "player"))
            moved: dict[str, Any] = {which: tuple(held)}
            player = replace(player, **moved)
        elif isinstance(e, Remember):
            when_day = e.day if e.day is not None else day
            memory = Memory(turn, e.text, day=when_day, when=e.time or "", source="event")
            memories.append(memory)
            changes.append(Change("memory", "memory", "", memory.line))
            if e.day is not None and (day is None or e.day > day):
                changes.append(Change("time", "day", _shown(day), _shown(e.day)))
                day = e.day
                time = e.time or time
        else:
            if day != e.day or (e.time and e.time != time):
                changes.append(Change("time", "day", _shown(day), _shown(e.day)))
            day, time = e.day, e.time or time
    return Applied(tags, player, tuple(memories), day, time, tuple(changes))


def _shown(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
