"""Session files: NPC state and history, as TOML or JSON by suffix, written atomically.

A session is a frozen value; every change makes a new one. Files carry a schema version.
Reading validates every key and names the one at fault; a corrupt file or one from a newer
npcchat is refused and never overwritten. Writing goes to a temp file in the same
directory, is fsynced, then renamed over the target, so a crash mid-save leaves the old file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from npcchat.errors import ConfigError, SessionError, where
from npcchat.files.atomic import atomic_write, sweep
from npcchat.sessions import events as events_mod
from npcchat.types import (
    DELTA_NAMES,
    Action,
    Change,
    FlagResult,
    Memory,
    Param,
    PlayerState,
    RulesOutcome,
    Tags,
    Turn,
    flags_json,
)

SCHEMA_VERSION = 1
SUFFIXES = (".toml", ".json")


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class TurnRecord:
    player: str
    reply: str
    deltas: dict[str, float]
    flags: dict[str, FlagResult]
    tags_before: Tags
    prompt_tokens: int
    generated_tokens: int
    dropped_turns: int
    stop_reason: str
    seed: int
    prefill_tokens: int
    timings_ms: dict[str, float]
    time: str
    # what the NPC's rules did, and the state before the turn when their effects changed
    # it (so /undo takes the effects back too); None: no rules
    rules: RulesOutcome | None = None
    player_before: PlayerState | None = None
    npc_items_before: tuple[str, ...] | None = None

    @classmethod
    def from_result(cls, r: Turn, before: Session | None = None) -> TurnRecord:
        changed = before is not None and r.rules is not None and bool(r.rules.effects)
        return cls(
            player=r.player,
            reply=r.reply,
            deltas=dict(r.heads.deltas),
            flags=dict(r.heads.flags),
            tags_before=r.tags_before,
            prompt_tokens=r.prompt_tokens,
            prefill_tokens=r.prefill_tokens,
            generated_tokens=r.generated_tokens,
            dropped_turns=r.dropped_turns,
            stop_reason=r.stop_reason,
            seed=r.seed,
            timings_ms=r.timings.to_ms(),
            time=_now(),
            rules=r.rules,
            player_before=before.player_state if changed and before else None,
            npc_items_before=before.npc_items if changed and before else None,
        )


@dataclass(frozen=True)
class Session:
    npc_id: str
    tags: Tags
    player_state: PlayerState = field(default_factory=PlayerState)
    lore: str = ""
    description: str = ""
    history: tuple[TurnRecord, ...] = ()
    fired_flags: tuple[str, ...] = ()  # every flag that fired, in order of first firing
    bundle_name: str = ""
    bundle_id: str = ""
    seed: int = 0
    created: str = field(default_factory=_now)
    initial_tags: Tags | None = None  # what /reset returns to
    npc_file: str = ""  # the NPC definition its knowledge (lore entries, triggers) comes from
    memories: tuple[Memory, ...] = ()  # long-term memory lines of turns out of the window
    memorized: int = 0  # history turns [0, memorized) have been turned into memories
    npc_items: tuple[str, ...] = ()  # what the NPC has now (rules move items)
    initial_player_state: PlayerState | None = None  # what /reset returns to
    initial_npc_items: tuple[str, ...] | None = None
    # the game's clock (game events set it): recall can be limited to recent game days
    game_day: float | None = None
    game_time: str = ""
    events: tuple[events_mod.EventRecord, ...] = ()  # game events, in the order given

    def with_events(self, given: Sequence[events_mod.Event]) -> Session:
        """The session after game events (all of them, in order; see
        :mod:`npcchat.sessions.events`), logged before the next turn."""
        turn = len(self.history)
        done = events_mod.apply(
            given, self.tags, self.player_state, self.game_day, self.game_time, turn
        )
        memories = self.memories + done.memories
        changes = done.changes
        excess = sum(m.source == "event" for m in memories) - events_mod.MAX_EVENT_MEMORIES
        if excess > 0:  # the oldest of the game's memories make room, and the log says so
            oldest = [i for i, m in enumerate(memories) if m.source == "event"][:excess]
            changes += tuple(Change("memory", "forgotten", memories[i].line, "") for i in oldest)
            gone = set(oldest)
            memories = tuple(m for i, m in enumerate(memories) if i not in gone)
        record = events_mod.EventRecord(turn, _now(), tuple(given), changes)
        return replace(
            self,
            tags=done.tags,
            player_state=done.player,
            memories=memories,
            game_day=done.day,
            game_time=done.time,
            events=(*self.events, record)[-events_mod.MAX_LOG :],
        )

    def with_turn(
        self,
        r: Turn,
        player_state: PlayerState | None = None,
        npc_items: tuple[str, ...] | None = None,
    ) -> Session:
        """The session after a finished turn: new tags, one more record, fired flags noted;
        ``player_state`` and ``npc_items``: as the NPC's rules left them."""
        fired = list(self.fired_flags)
        fired += [n for n, f in r.heads.flags.items() if f.fired and n not in fired]
        return replace(
            self,
            tags=r.tags_after,
            history=(*self.history, TurnRecord.from_result(r, self)),
            fired_flags=tuple(fired),
            player_state=self.player_state if player_state is None else player_state,
            npc_items=self.npc_items if npc_items is None else npc_items,
        )

    def undo(self) -> Session:
        """Drop the last turn and take back what it changed (trust and relationship).

        Other tags are only changed by the designer (/set), so they stay as they are now.
        What the game said after that turn (events) is not the turn's: its changes are made
        again on the state the turn started from, so they stay."""
        if not self.history:
            return self
        last = self.history[-1]
        before = last.tags_before
        rest = self.history[:-1]
        fired = [n for n in self.fired_flags if any(t.flags.get(n, _NO).fired for t in rest)]
        tags = replace(self.tags, trust=before.trust, relationship=before.relationship)
        player, npc_items = self.player_state, self.npc_items
        if last.player_before is not None:  # the turn's effects changed more: all back
            tags = replace(before, location=self.tags.location)
            player = last.player_before
            npc_items = last.npc_items_before or ()
        for record in self.events:
            if record.turn >= len(self.history):  # given after the undone turn
                again = events_mod.apply(
                    record.events, tags, player, self.game_day, self.game_time, record.turn
                )
                tags, player = again.tags, again.player
        # what the game said (events) stays: it happened in the game, not in this turn
        memories = tuple(m for m in self.memories if m.source == "event" or m.turn < len(rest))
        return replace(
            self,
            tags=tags,
            history=rest,
            fired_flags=tuple(fired),
            memories=memories,
            memorized=min(self.memorized, len(rest)),
            player_state=player,
            npc_items=npc_items,
        )

    def reset(self) -> Session:
        return replace(
            self,
            tags=self.initial_tags or self.tags,
            history=(),
            fired_flags=(),
            memories=(),
            memorized=0,
            game_day=None,
            game_time="",
            events=(),
            player_state=self.initial_player_state or self.player_state,
            npc_items=self.npc_items if self.initial_npc_items is None else self.initial_npc_items,
        )


_NO = FlagResult(0.0, 1.0, False)


# -- serialization ---------------------------------------------------------------------------
def _tags_dict(t: Tags) -> dict[str, Any]:
    return {f.name: getattr(t, f.name) for f in fields(Tags)}


def to_dict(s: Session) -> dict[str, Any]:
    out: dict[str, Any] = {
        "schema_version": SCHEMA_VERSION,
        "npc_id": s.npc_id,
        "created": s.created,
        "seed": s.seed,
        "bundle": {"name": s.bundle_name, "id": s.bundle_id},
        "lore": s.lore,
        "description": s.description,
        "tags": _tags_dict(s.tags),
        "initial_tags": _tags_dict(s.initial_tags or s.tags),
        "player_state": _player_dict(s.player_state),
        "fired_flags": list(s.fired_flags),
        "npc_file": s.npc_file,
        "npc_items": list(s.npc_items),
        "memorized": s.memorized,
        "memories": [_memory_dict(m) for m in s.memories],
        "history": [_turn_dict(t) for t in s.history],
    }
    if s.game_day is not None or s.game_time:
        out["game_clock"] = {"day": s.game_day, "time": s.game_time}
        if s.game_day is None:
            del out["game_clock"]["day"]  # TOML has no null
    if s.events:
        out["events"] = [e.to_json() for e in s.events]
    if s.initial_player_state is not None:  # what /reset returns to, once rules move items
        out["initial_player_state"] = _player_dict(s.initial_player_state)
    if s.initial_npc_items is not None:
        out["initial_npc_items"] = list(s.initial_npc_items)
    return out


def _memory_dict(m: Memory) -> dict[str, Any]:
    out: dict[str, Any] = {"turn": m.turn, "text": m.text}
    if m.day is not None:
        out["day"] = m.day
    if m.when:
        out["when"] = m.when
    if m.source != "turn":
        out["source"] = m.source
    return out


def _player_dict(p: PlayerState) -> dict[str, Any]:
    return {"items": list(p.items), "actions": list(p.actions), "position": p.position}


def _turn_dict(t: TurnRecord) -> dict[str, Any]:
    out = {
        "player": t.player,
        "reply": t.reply,
        "deltas": dict(t.deltas),
        "flags": flags_json(t.flags),
        "tags_before": _tags_dict(t.tags_before),
        "tokens": {
            "prompt": t.prompt_tokens,
            "prefill": t.prefill_tokens,
            "generated": t.generated_tokens,
        },
        "dropped_turns": t.dropped_turns,
        "stop_reason": t.stop_reason,
        "seed": t.seed,
        "timings_ms": dict(t.timings_ms),
        "time": t.time,
    }
    if t.rules is not None:
        out["rules"] = t.rules.to_json()
    if t.player_before is not None:
        out["player_before"] = _player_dict(t.player_before)
        out["npc_items_before"] = list(t.npc_items_before or ())
    return out


class _Reader:
    """Typed access to a parsed file that names the key at fault."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def get(
        self,
        d: Any,
        key: str,
        kind: type | tuple[type, ...],
        label: str,
        lo: float = -math.inf,
        hi: float = math.inf,
    ) -> Any:
        """``d[key]`` of type ``kind``; numbers must be finite and within [lo, hi]."""
        if not isinstance(d, dict) or key not in d:
            raise SessionError(f"{where(self.path, label)}: missing")
        v = d[key]
        if kind is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, kind) or (isinstance(v, bool) and kind in (int, float)):
            name = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
            raise SessionError(f"{where(self.path, label)}: expected {name}, got {v!r}")
        if isinstance(v, int | float) and not (math.isfinite(v) and lo <= v <= hi):
            raise SessionError(f"{where(self.path, label)}: expected {lo:g}..{hi:g}, got {v!r}")
        return v

    def strs(self, d: Any, key: str, label: str) -> tuple[str, ...]:
        items = self.get(d, key, list, label)
        if not all(isinstance(x, str) for x in items):
            raise SessionError(f"{where(self.path, label)}: expected a list of strings")
        return tuple(items)

    def tags(self, d: Any, label: str) -> Tags:
        values = {}
        for f in fields(Tags):
            if f.name in ("trust", "relationship"):
                values[f.name] = self.get(d, f.name, float, f"{label}.{f.name}", 0.0, 1.0)
            else:
                values[f.name] = self.get(d, f.name, str, f"{label}.{f.name}")
        return Tags(**values)

    def floats(
        self, d: Any, label: str, lo: float = -math.inf, hi: float = math.inf
    ) -> dict[str, float]:
        if not isinstance(d, dict):
            raise SessionError(f"{where(self.path, label)}: expected a table")
        return {k: self.get(d, k, float, f"{label}.{k}", lo, hi) for k in d}

    def player(self, d: Any, label: str) -> PlayerState:
        return PlayerState(
            items=self.strs(d, "items", f"{label}.items"),
            actions=self.strs(d, "actions", f"{label}.actions"),
            position=self.get(d, "position", str, f"{label}.position"),
        )

    def rules(self, d: Any, label: str) -> RulesOutcome:
        g = self.get
        blocked = g(d, "blocked", dict, f"{label}.blocked")
        for k in blocked:
            g(blocked, k, str, f"{label}.blocked.{k}")
        effects = tuple(
            Change(
                *(g(e, k, str, f"{label}.effects[{i}].{k}") for k in ("kind", "key", "from", "to"))
            )
            for i, e in enumerate(g(d, "effects", list, f"{label}.effects"))
        )
        actions = []
        for i, a in enumerate(g(d, "actions", list, f"{label}.actions")):
            where_a = f"{label}.actions[{i}]"
            name = g(a, "name", str, f"{where_a}.name")
            flag = g(a, "flag", str, f"{where_a}.flag")
            params: list[tuple[str, Param]] = [
                (k, g(a, k, (str, int, float, bool), f"{where_a}.{k}"))
                for k in a
                if k not in ("name", "flag")
            ]
            actions.append(Action(name, flag, tuple(params)))
        return RulesOutcome(
            blocked=dict(blocked),
            effects=effects,
            actions=tuple(actions),
            memories=self.strs(d, "memories", f"{label}.memories"),
            guard=g(d, "guard", str, f"{label}.guard"),
            checks=self.strs(d, "checks", f"{label}.checks"),
            player_items=self.strs(d, "player_items", f"{label}.player_items")
            if "player_items" in d
            else (),
            npc_items=self.strs(d, "npc_items", f"{label}.npc_items") if "npc_items" in d else (),
        )

    def memory(self, m: Any, label: str) -> Memory:
        g = self.get
        source = g(m, "source", str, f"{label}.source") if "source" in m else "turn"
        if source not in ("turn", "rules", "event"):
            raise SessionError(
                f"{where(self.path, f'{label}.source')}: expected turn, rules or event, "
                f"got {source!r}"
            )
        return Memory(
            g(m, "turn", int, f"{label}.turn", 0),
            g(m, "text", str, f"{label}.text"),
            day=g(m, "day", float, f"{label}.day", 0.0) if "day" in m else None,
            when=g(m, "when", str, f"{label}.when") if "when" in m else "",
            source=source,
        )

    def events(self, d: Any, label: str) -> events_mod.EventRecord:
        g = self.get
        given = g(d, "events", list, f"{label}.events")
        try:
            parsed = tuple(events_mod.parse(e, f"{label}.events[{i}]") for i, e in enumerate(given))
        except ConfigError as e:
            raise SessionError(f"{self.path}: {e.message}") from None
        changes = tuple(
            Change(
                *(g(c, k, str, f"{label}.changes[{i}].{k}") for k in ("kind", "key", "from", "to"))
            )
            for i, c in enumerate(g(d, "changes", list, f"{label}.changes"))
        )
        return events_mod.EventRecord(
            g(d, "turn", int, f"{label}.turn", 0),
            g(d, "time", str, f"{label}.time"),
            parsed,
            changes,
        )

    def turn(self, d: Any, label: str) -> TurnRecord:
        g = self.get
        flags_raw = g(d, "flags", dict, f"{label}.flags")
        flags = {
            n: FlagResult(
                g(v, "prob", float, f"{label}.flags.{n}.prob", 0.0, 1.0),
                g(v, "threshold", float, f"{label}.flags.{n}.threshold", 0.0, 1.0),
                g(v, "fired", bool, f"{label}.flags.{n}.fired"),
                g(v, "blocked", str, f"{label}.flags.{n}.blocked") if "blocked" in v else "",
            )
            for n, v in flags_raw.items()
        }
        deltas = self.floats(g(d, "deltas", dict, f"{label}.deltas"), f"{label}.deltas", -1.0, 1.0)
        for name in DELTA_NAMES:
            if name not in deltas:
                raise SessionError(f"{where(self.path, f'{label}.deltas.{name}')}: missing")
        tokens = g(d, "tokens", dict, f"{label}.tokens")
        return TurnRecord(
            player=g(d, "player", str, f"{label}.player"),
            reply=g(d, "reply", str, f"{label}.reply"),
            deltas=deltas,
            flags=flags,
            tags_before=self.tags(
                g(d, "tags_before", dict, f"{label}.tags_before"), f"{label}.tags_before"
            ),
            prompt_tokens=g(tokens, "prompt", int, f"{label}.tokens.prompt", 0),
            prefill_tokens=g(tokens, "prefill", int, f"{label}.tokens.prefill", 0)
            if "prefill" in tokens
            else g(tokens, "prompt", int, f"{label}.tokens.prompt", 0),
            generated_tokens=g(tokens, "generated", int, f"{label}.tokens.generated", 0),
            dropped_turns=g(d, "dropped_turns", int, f"{label}.dropped_turns", 0),
            stop_reason=g(d, "stop_reason", str, f"{label}.stop_reason"),
            seed=g(d, "seed", int, f"{label}.seed"),
            timings_ms=self.floats(
                g(d, "timings_ms", dict, f"{label}.timings_ms"), f"{label}.timings_ms", 0.0
            ),
            time=g(d, "time", str, f"{label}.time"),
            rules=self.rules(d["rules"], f"{label}.rules") if "rules" in d else None,
            player_before=self.player(d["player_before"], f"{label}.player_before")
            if "player_before" in d
            else None,
            npc_items_before=self.strs(d, "npc_items_before", f"{label}.npc_items_before")
            if "npc_items_before" in d
            else None,
        )


def from_dict(data: Any, path: Path) -> Session:
    r = _Reader(path)
    if not isinstance(data, dict):
        raise SessionError(f"{path}: not an npcchat session (expected a table at the top)")
    version = r.get(data, "schema_version", int, "schema_version")
    if version > SCHEMA_VERSION:
        raise SessionError(
            f"{where(path, 'schema_version')}: session format {version} is newer than this npcchat "
            f"reads ({SCHEMA_VERSION})",
            hint="upgrade npcchat to open it; the file was left untouched",
        )
    if version < 1:
        raise SessionError(f"{where(path, 'schema_version')}: expected 1, got {version}")
    ps = r.get(data, "player_state", dict, "player_state")
    bundle = r.get(data, "bundle", dict, "bundle")
    history = r.get(data, "history", list, "history")
    clock = r.get(data, "game_clock", dict, "game_clock") if "game_clock" in data else {}
    return Session(
        npc_id=r.get(data, "npc_id", str, "npc_id"),
        tags=r.tags(r.get(data, "tags", dict, "tags"), "tags"),
        initial_tags=r.tags(r.get(data, "initial_tags", dict, "initial_tags"), "initial_tags"),
        player_state=r.player(ps, "player_state"),
        npc_items=r.strs(data, "npc_items", "npc_items") if "npc_items" in data else (),
        initial_player_state=r.player(data["initial_player_state"], "initial_player_state")
        if "initial_player_state" in data
        else None,
        initial_npc_items=r.strs(data, "initial_npc_items", "initial_npc_items")
        if "initial_npc_items" in data
        else None,
        lore=r.get(data, "lore", str, "lore"),
        description=r.get(data, "description", str, "description"),
        history=tuple(r.turn(t, f"history[{i}]") for i, t in enumerate(history)),
        fired_flags=r.strs(data, "fired_flags", "fired_flags"),
        bundle_name=r.get(bundle, "name", str, "bundle.name"),
        bundle_id=r.get(bundle, "id", str, "bundle.id"),
        seed=r.get(data, "seed", int, "seed"),
        created=r.get(data, "created", str, "created"),
        npc_file=r.get(data, "npc_file", str, "npc_file") if "npc_file" in data else "",
        memorized=r.get(data, "memorized", int, "memorized", 0) if "memorized" in data else 0,
        memories=tuple(
            r.memory(m, f"memories[{i}]")
            for i, m in enumerate(
                r.get(data, "memories", list, "memories") if "memories" in data else []
            )
        ),
        game_day=r.get(clock, "day", float, "game_clock.day", 0.0) if "day" in clock else None,
        game_time=r.get(clock, "time", str, "game_clock.time") if "time" in clock else "",
        events=tuple(
            r.events(e, f"events[{i}]")
            for i, e in enumerate(r.get(data, "events", list, "events") if "events" in data else [])
        ),
    )


def _suffix(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise SessionError(f"{path}: session files end in .toml or .json, not {suffix or '(none)'}")
    return suffix


def dumps(s: Session, suffix: str) -> str:
    data = to_dict(s)
    if suffix == ".json":
        return json.dumps(data, ensure_ascii=False, indent=2) + "\n"
    import tomli_w

    return tomli_w.dumps(data)


Stamp = tuple[int, int, int, int]  # inode, size, mtime, ctime of one version of a file


def stamp(path: Path) -> Stamp | None:
    """Which version of the file is on disk (None: none). Every save makes a new one: an
    atomic write replaces the inode, and ctime cannot be set back."""
    try:
        return _stamp_of(path.stat())
    except FileNotFoundError:
        return None


def _stamp_of(st: os.stat_result) -> Stamp:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def load(path: Path) -> Session:
    return load_stamped(path)[0]


def load_stamped(path: Path) -> tuple[Session, Stamp]:
    """The session and the stamp of the very version read (one open file, fstat)."""
    suffix = _suffix(path)
    if path.exists() and not path.is_file():  # a FIFO would block the open for ever
        raise SessionError(f"{path}: not a regular file", hint="sessions are .toml/.json files")
    sweep(path)  # leftovers of a writer killed mid-save
    try:
        with path.open("rb") as fh:
            st = os.fstat(fh.fileno())
            raw = fh.read()
    except FileNotFoundError:
        raise SessionError(f"{path}: no such session file") from None
    except OSError as e:
        raise SessionError(f"{path}: cannot read ({e.strerror})") from None
    version = _stamp_of(st)
    try:
        text = raw.decode("utf-8")
        if suffix == ".json":
            data = json.loads(text)
        else:
            import tomllib

            data = tomllib.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise SessionError(
            f"{path}: corrupt session file ({reason})", hint="the file was left untouched"
        ) from None
    return from_dict(data, path), version


def save(s: Session, path: Path, known: Stamp | bool | None = None) -> Stamp:
    """Write atomically; returns the stamp of the version written.

    ``known``: the stamp of the version this writer last read or wrote. If the file on disk
    is another version now (another process or conversation saved it meanwhile), nothing is
    overwritten: SessionError, so two writers never lose each other's turns silently. The
    comparison and the write happen under a lock on the directory. Without a stamp, an
    existing file is read first and replaced only if it is a session."""
    text = dumps(s, _suffix(path))
    with _directory_lock(path):
        current = stamp(path)
        if isinstance(known, tuple):
            if current is not None and current != known:
                raise SessionError(
                    f"{path}: changed by another program since this session read it; "
                    "not overwritten",
                    hint="reopen the session to continue from what is on disk",
                )
        elif current is not None and not known:
            try:
                load(path)
            except SessionError as e:
                raise SessionError(
                    f"{path}: refusing to overwrite a file npcchat cannot read as a session ({e})",
                    hint="save to another file name",
                ) from None
        atomic_write(path, text.encode("utf-8"))
        written = stamp(path)
    assert written is not None
    return written


def set_aside(path: Path) -> Path:
    """Move a file npcchat cannot read as a session out of the way, as
    ``NAME.corrupt-<UTC time>`` beside it (never deleted: its bytes may still matter to
    someone); returns the new path. Its KV snapshot, no use without it, is removed."""
    with _directory_lock(path):
        stamp_text = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        target = path.with_name(f"{path.name}.corrupt-{stamp_text}")
        n = 1
        while target.exists() or target.is_symlink():
            n += 1
            target = path.with_name(f"{path.name}.corrupt-{stamp_text}-{n}")
        os.rename(path, target)
    path.with_name(path.name + ".kv").unlink(missing_ok=True)
    return target


@contextlib.contextmanager
def _directory_lock(path: Path) -> Iterator[None]:
    """An exclusive lock on the session's directory for one compare-and-write (POSIX)."""
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no cross-process check
        yield
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
