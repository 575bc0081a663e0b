"""Scenario files for `npcchat eval`: JSONL in every form of REFERENCE section 3, plus
multi-turn scenarios.

Forms, told apart by their keys:

* nested training record: ``{"input": {...}, "output": {"response", "delta": {trust,
  relationship}, "flag": {name: {"score", "threshold", "label"}}}}``
* flat record: ``npc_id``, ``tags`` (with ``location``), ``context``, ``player_utterance``,
  ``response``, ``delta`` as ``[trust, relationship]``, ``flag`` as the list of names that
  fired (every other bundle flag is then a negative)
* unlabelled test case: the input keys only (``id``, ``npc_id``, ``npc_location``,
  ``description``, ``player_utterance``, ``tags``, ``lore``, ``context``)
* multi-turn (npcchat's own, see ``configs/scenarios/multi_turn.jsonl``): the input keys
  and ``turns: [{"player": "...", "expect": {"response", "delta", "flags", "thresholds"}}]``
  where every ``expect`` key is optional; the NPC state carries from turn to turn.

Every line is validated; a bad one becomes a :class:`BadLine` naming file:line and why.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from npcchat.sessions.session import Session
from npcchat.types import DELTA_NAMES, ContextTurn, PlayerState, Tags


@dataclass(frozen=True)
class Expected:
    response: str | None = None
    delta: dict[str, float] | None = None
    flags: dict[str, bool] | None = None  # None: no flag labels; names absent: unlabelled
    thresholds: dict[str, float] | None = None
    all_flags_negative_unless_listed: bool = False  # flat form: ``flag`` lists the positives


@dataclass(frozen=True)
class Scenario:
    id: str
    source: str  # file:line
    kind: str  # nested | flat | unlabelled | multi | example (an NPC file's, eval.examples)
    npc_id: str
    tags: Tags
    lore: str = ""
    description: str = ""
    player_state: PlayerState = field(default_factory=PlayerState)
    context: tuple[ContextTurn, ...] = ()
    turns: tuple[tuple[str, Expected | None], ...] = ()
    npc_file: str = ""  # an NPC file whose knowledge, memory and triggers apply, as in talk
    given: frozenset[str] = frozenset()  # the state keys the scenario set itself

    @property
    def labelled(self) -> bool:
        return any(e is not None for _, e in self.turns)

    def new_session(self, seed: int = 0) -> Session:
        """The session the scenario starts from (no history: its context is separate)."""
        return Session(
            npc_id=self.npc_id,
            tags=self.tags,
            player_state=self.player_state,
            lore=self.lore,
            description=self.description,
            seed=seed,
        )


@dataclass(frozen=True)
class BadLine:
    source: str
    reason: str

    def __str__(self) -> str:
        return f"{self.source}: {self.reason}"


class _Bad(Exception):
    pass


def _str(d: dict[str, Any], key: str, default: str | None = "") -> str:
    v = d.get(key, default)
    if v is None and default is None:
        raise _Bad(f"key '{key}': missing")
    if not isinstance(v, str):
        raise _Bad(f"key '{key}': expected a string, got {v!r}")
    return v


def _num(v: Any, key: str, lo: float, hi: float) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _Bad(f"key '{key}': expected a number, got {v!r}")
    if not lo <= float(v) <= hi:
        raise _Bad(f"key '{key}': expected a number in [{lo:g}, {hi:g}], got {v}")
    return float(v)


def _tags(d: Any, location: str, key: str = "tags") -> Tags:
    if d is None:
        d = {}
    if not isinstance(d, dict):
        raise _Bad(f"key '{key}': expected an object")
    values: dict[str, Any] = {"location": str(d.get("location", location) or location)}
    for name in ("quest_stage", "npc_mood", "player_reputation", "style"):
        v = d.get(name, "")
        values[name] = "" if v is None else str(v)
    for name in ("trust", "relationship"):
        if name in d:
            values[name] = _num(d[name], f"{key}.{name}", 0.0, 1.0)
    return Tags(**values)


def _context(v: Any) -> tuple[ContextTurn, ...]:
    if v is None:
        return ()
    if not isinstance(v, list):
        raise _Bad("key 'context': expected a list")
    out = []
    for i, item in enumerate(v):
        if (
            isinstance(item, dict)
            and isinstance(item.get("role"), str)
            and isinstance(item.get("text"), str)
        ):
            out.append(ContextTurn(item["role"], item["text"]))
        elif isinstance(item, str) and ":" in item:
            role, _, text = item.partition(":")
            out.append(ContextTurn(role.strip(), text.strip()))
        else:
            raise _Bad(f'key \'context[{i}]\': expected {{"role", "text"}} or "role: text"')
    return tuple(out)


def _player_state(v: Any) -> PlayerState:
    if v is None:
        return PlayerState()
    if not isinstance(v, dict):
        raise _Bad("key 'player_state': expected an object")
    lists = {}
    for name in ("items", "actions"):
        items = v.get(name, []) or []
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise _Bad(f"key 'player_state.{name}': expected a list of strings")
        lists[name] = tuple(items)
    return PlayerState(lists["items"], lists["actions"], str(v.get("position", "") or ""))


def _delta(v: Any, key: str) -> dict[str, float]:
    if isinstance(v, list):
        if len(v) != 2:
            raise _Bad(f"key '{key}': expected [trust, relationship]")
        v = dict(zip(DELTA_NAMES, v, strict=True))
    if not isinstance(v, dict) or set(v) != set(DELTA_NAMES):
        raise _Bad(f'key \'{key}\': expected {{"trust", "relationship"}}')
    return {n: _num(v[n], f"{key}.{n}", -1.0, 1.0) for n in DELTA_NAMES}


def _base(
    d: dict[str, Any],
    kind: str,
    sid: str,
    source: str,
    turns: tuple[tuple[str, Expected | None], ...],
) -> Scenario:
    location = _str(d, "npc_location") if "npc_location" in d else ""
    keys = ("tags", "lore", "description", "player_state", "npc_location")
    return Scenario(
        id=sid,
        source=source,
        kind=kind,
        npc_id=_str(d, "npc_id", None),
        tags=_tags(d.get("tags"), location),
        lore=_str(d, "lore") if d.get("lore") is not None else "",
        description=_str(d, "description") if d.get("description") is not None else "",
        player_state=_player_state(d.get("player_state")),
        context=_context(d.get("context")),
        turns=turns,
        given=frozenset(k for k in keys if d.get(k) is not None),
    )


def _nested(rec: dict[str, Any], sid: str, source: str) -> Scenario:
    inp, out = rec["input"], rec.get("output")
    if not isinstance(inp, dict):
        raise _Bad("key 'input': expected an object")
    expected = None
    if out is not None:
        if not isinstance(out, dict):
            raise _Bad("key 'output': expected an object")
        flags: dict[str, bool] = {}
        thresholds: dict[str, float] = {}
        raw_flags = out.get("flag") or {}
        if not isinstance(raw_flags, dict):
            raise _Bad(
                'key \'output.flag\': expected {name: {"score", "threshold", "label"}} '
                f"(the nested form), got {type(raw_flags).__name__}"
            )
        for name, f in raw_flags.items():
            if not isinstance(f, dict) or "label" not in f:
                raise _Bad(
                    f'key \'output.flag.{name}\': expected {{"score", "threshold", "label"}}'
                )
            flags[name] = bool(_num(f["label"], f"output.flag.{name}.label", 0, 1))
            if "threshold" in f:
                thresholds[name] = _num(f["threshold"], f"output.flag.{name}.threshold", 0, 1)
        expected = Expected(
            response=_str(out, "response") if "response" in out else None,
            delta=_delta(out["delta"], "output.delta") if "delta" in out else None,
            flags=flags or None,
            thresholds=thresholds or None,
        )
    player = _str(inp, "player_utterance", None)
    return _base(inp, "nested", sid, source, ((player, expected),))


def _flat(rec: dict[str, Any], sid: str, source: str) -> Scenario:
    labelled = any(k in rec for k in ("response", "delta", "flag"))
    expected = None
    if labelled:
        fired = rec.get("flag")
        if fired is not None and (
            not isinstance(fired, list) or not all(isinstance(x, str) for x in fired)
        ):
            raise _Bad("key 'flag': expected the list of flag names that fired")
        expected = Expected(
            response=_str(rec, "response") if "response" in rec else None,
            delta=_delta(rec["delta"], "delta") if "delta" in rec else None,
            flags=dict.fromkeys(fired, True) if fired is not None else None,
            all_flags_negative_unless_listed=fired is not None,
        )
    kind = "flat" if labelled else "unlabelled"
    return _base(rec, kind, sid, source, ((_str(rec, "player_utterance", None), expected),))


def _multi(rec: dict[str, Any], sid: str, source: str) -> Scenario:
    turns_raw = rec["turns"]
    if not isinstance(turns_raw, list) or not turns_raw:
        raise _Bad("key 'turns': expected a non-empty list")
    turns = []
    for i, t in enumerate(turns_raw):
        key = f"turns[{i}]"
        if not isinstance(t, dict):
            raise _Bad(f"key '{key}': expected an object")
        player = _str(t, "player", None)
        e = t.get("expect")
        expected = None
        if e is not None:
            if not isinstance(e, dict):
                raise _Bad(f"key '{key}.expect': expected an object")
            flags = e.get("flags")
            if isinstance(flags, list):
                if not all(isinstance(n, str) for n in flags):
                    raise _Bad(f"key '{key}.expect.flags': expected a list of flag names")
                flags = dict.fromkeys(flags, True)
            if flags is not None and (
                not isinstance(flags, dict) or not all(isinstance(v, bool) for v in flags.values())
            ):
                raise _Bad(
                    f"key '{key}.expect.flags': expected {{name: true/false}} or a list of names"
                )
            thr = e.get("thresholds")
            if thr is not None and not isinstance(thr, dict):
                raise _Bad(
                    f"key '{key}.expect.thresholds': expected {{name: threshold}}, "
                    f"got {type(thr).__name__}"
                )
            expected = Expected(
                response=_str(e, "response") if "response" in e else None,
                delta=_delta(e["delta"], f"{key}.expect.delta") if "delta" in e else None,
                flags=flags,
                thresholds={
                    k: _num(v, f"{key}.expect.thresholds.{k}", 0, 1) for k, v in thr.items()
                }
                if isinstance(thr, dict)
                else None,
            )
        turns.append((player, expected))
    return _base(rec, "multi", sid, source, tuple(turns))


def single_labelled(sc: Scenario) -> bool:
    """One turn with labels: what ``heads fit`` fits on."""
    return len(sc.turns) == 1 and sc.turns[0][1] is not None


def labelled_flags(scenarios: Sequence[Scenario]) -> list[str]:
    """Every flag the scenarios' labels name, in order of first appearance (the head order
    when nothing else gives one)."""
    names: list[str] = []
    for sc in scenarios:
        for _, e in sc.turns:
            for n in (e.flags or {}) if e else {}:
                if n not in names:
                    names.append(n)
    return names


def unknown_flags(sc: Scenario, flags: tuple[str, ...] | list[str]) -> str | None:
    """Why the scenario cannot be scored on a bundle with these flags (a label for a flag
    the bundle lacks, ``give_itme`` for ``give_item``, would count as nothing), or None."""
    known = set(flags)
    for i, (_, e) in enumerate(sc.turns):
        if e is None:
            continue
        for what, names in (("flags", e.flags or {}), ("thresholds", e.thresholds or {})):
            for name in names:
                if name not in known:
                    key = {
                        "nested": f"output.flag.{name}",
                        "flat": "flag",
                        "multi": f"turns[{i}].expect.{what}.{name}",
                    }.get(sc.kind, f"{what}.{name}")
                    listed = ", ".join(flags) or "none"
                    return (
                        f"key '{key}': {name!r} is not a flag of this bundle (its flags: {listed})"
                    )
    return None


def parse_line(text: str, source: str, default_id: str) -> Scenario:
    """One JSONL line; raises ValueError with the reason (no location) when it is bad."""
    try:
        rec = json.loads(text)
    except ValueError as e:
        raise ValueError(f"not valid JSON ({e.args[0] if e.args else e})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if not isinstance(rec, dict):
        raise ValueError("expected a JSON object")
    try:
        inner = rec["input"] if isinstance(rec.get("input"), dict) else {}
        sid = str(rec.get("id", inner.get("id", default_id)))
        npc_file = rec.get("npc_file", "")
        if not isinstance(npc_file, str):
            raise _Bad("key 'npc_file': expected a path (relative to the scenario file)")
        if "input" in rec:
            sc = _nested(rec, sid, source)
        elif "turns" in rec:
            sc = _multi(rec, sid, source)
        elif "player_utterance" in rec:
            sc = _flat(rec, sid, source)
        else:
            raise _Bad("not a scenario: expected 'input', 'turns' or 'player_utterance'")
        return replace(sc, npc_file=npc_file)
    except _Bad as e:
        raise ValueError(str(e)) from None
    except (TypeError, KeyError, AttributeError, RecursionError) as e:
        # a shape no check above foresaw: still a bad line, never a traceback
        raise ValueError(f"malformed scenario ({type(e).__name__}: {e})") from None


def read(path: Path) -> tuple[list[Scenario], list[BadLine]]:
    """All scenarios of a JSONL file and every bad line, each named file:line."""
    good: list[Scenario] = []
    bad: list[BadLine] = []
    if path.exists() and not path.is_file():  # a FIFO would block the read for ever
        return [], [BadLine(str(path), "not a regular file")]
    try:
        lines = path.read_text("utf-8").splitlines()
    except OSError as e:
        return [], [BadLine(str(path), f"cannot read ({e.strerror})")]
    except UnicodeDecodeError:
        return [], [BadLine(str(path), "not UTF-8 text")]
    seen: dict[str, str] = {}
    for n, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("//"):
            continue
        source = f"{path}:{n}"
        try:
            sc = parse_line(line, source, f"{path.stem}:{n}")
        except ValueError as e:
            bad.append(BadLine(source, str(e)))
            continue
        if sc.npc_file and not Path(sc.npc_file).is_absolute():
            sc = replace(sc, npc_file=str(path.parent / sc.npc_file))
        if sc.id in seen:
            bad.append(BadLine(source, f"id '{sc.id}' already used at {seen[sc.id]}"))
            continue
        seen[sc.id] = source
        good.append(sc)
    return good, bad
