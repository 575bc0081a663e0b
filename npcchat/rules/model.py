"""The NPC's rules as frozen values, and what they decide for one turn.

The original AI server did not hand the model's output straight to the game: conditions
decided whether a flag may fire at all (items, trust, quest stage), a guarded reply answered
a request the NPC must refuse, and what fired changed the game's state. Here the same is
data in the NPC file (:mod:`npcchat.rules.load`), judged on the state a turn starts from:

* :meth:`Rules.judge` takes the heads' flags (after threshold overrides) and returns which
  fire, which a condition blocked (and which condition), the case each fired flag took;
* :func:`apply` makes the fired flags' effects (stage, items, tags, memory lines) on the
  state and collects the actions with their parameters for the game;
* :meth:`Rules.guard_for` names the guarded reply that answers when a flag was blocked.

Pure functions of (rules, state, flags): talk, eval, serve and the Python API all reach them
through the NPC's mind, so one code path decides for all of them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from functools import cached_property

from npcchat.text import for_matching, phrase_pattern
from npcchat.types import Action, Change, FlagResult, Param, PlayerState, Tags

NEXT = "next"  # effects.stage = "next": the stage after the current one in [quest].stages


@dataclass(frozen=True)
class State:
    """What rules read and change: the NPC's tags, the player's state, the NPC's items."""

    tags: Tags
    player: PlayerState
    npc_items: tuple[str, ...] = ()


@dataclass(frozen=True)
class Requires:
    """Conditions on the state a turn starts from; all must hold (empty: always)."""

    items: tuple[str, ...] = ()  # the player has every one
    actions: tuple[str, ...] = ()  # the player did every one
    npc_items: tuple[str, ...] = ()  # the NPC still has every one
    stages: tuple[str, ...] = ()  # the quest stage is one of them
    locations: tuple[str, ...] = ()  # the NPC is at one of them
    min_trust: float | None = None
    max_trust: float | None = None
    min_relationship: float | None = None
    max_relationship: float | None = None

    def failure(self, s: State, label: str) -> str:
        """The first condition that fails, said with the value it saw ("" when all hold)."""
        for item in self.items:
            if item not in s.player.items:
                return f"{label}.items: the player has no {item!r}"
        for act in self.actions:
            if act not in s.player.actions:
                return f"{label}.actions: the player has not done {act!r}"
        for item in self.npc_items:
            if item not in s.npc_items:
                return f"{label}.npc_items: the NPC no longer has {item!r}"
        if self.stages and s.tags.quest_stage not in self.stages:
            return (
                f"{label}.stages: quest stage is {s.tags.quest_stage!r}, not {_one_of(self.stages)}"
            )
        if self.locations and s.tags.location not in self.locations:
            return (
                f"{label}.locations: location is {s.tags.location!r}, not {_one_of(self.locations)}"
            )
        for name in ("trust", "relationship"):
            value = float(getattr(s.tags, name))
            low, high = getattr(self, f"min_{name}"), getattr(self, f"max_{name}")
            if low is not None and value < low:
                return f"{label}.min_{name}: {name} is {value:.2f}, below {low:g}"
            if high is not None and value > high:
                return f"{label}.max_{name}: {name} is {value:.2f}, above {high:g}"
        return ""


def _one_of(values: tuple[str, ...]) -> str:
    return " or ".join(repr(v) for v in values)


@dataclass(frozen=True)
class Effects:
    """What firing changes: the quest stage (a name or ``"next"``), items moving between
    the player and the NPC, other tags, a memory line."""

    stage: str = ""
    take_items: tuple[str, ...] = ()  # from the player to the NPC
    give_items: tuple[str, ...] = ()  # from the NPC to the player
    tags: tuple[tuple[str, str], ...] = ()  # npc_mood, style, player_reputation, location
    memory: str = ""


@dataclass(frozen=True)
class Choice:
    """An action parameter the model picks from a closed list (``item = { choose = [...] }``):
    after its reply, decoding is constrained by a grammar of exactly these options."""

    options: tuple[str, ...]


ActionSpec = tuple[str, tuple[tuple[str, "Param | Choice"], ...]]  # (name, parameters)


@dataclass(frozen=True)
class Case:
    """One way a flag fires: its own conditions, effects and action. A flag's cases are
    tried in order and the first whose conditions hold applies, so parameters can depend
    on the state (the item given depends on what the player brought)."""

    requires: Requires = field(default_factory=Requires)
    effects: Effects = field(default_factory=Effects)
    action: ActionSpec | None = None
    label: str = ""  # where it is in the NPC file, for messages


@dataclass(frozen=True)
class Guard:
    """How the NPC answers a request its rules block: fixed lines in rotation, or the
    model with tags overridden (``style = "guarded"``)."""

    lines: tuple[str, ...] = ()
    tags: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class FlagRule:
    flag: str
    requires: Requires = field(default_factory=Requires)
    cases: tuple[Case, ...] = ()  # at least one once loaded
    guard: Guard | None = None


@dataclass(frozen=True)
class ReplyCheck:
    """Phrases the NPC must not say (a spoiler, a name, a place) until ``until`` holds
    (a stage, a trust level, an item; empty: never). Matched as forbidden triggers are:
    case, punctuation and invisible characters aside, a Hangul phrase with any ending."""

    phrases: tuple[str, ...]
    until: Requires | None = None
    label: str = ""
    unless_fired: tuple[str, ...] = ()  # flags: the check is off in a turn one of them fires

    # (the NPC must not hand over an item in words when give_item did not fire: the reply
    # and the state change of one turn then agree)

    @cached_property
    def patterns(self) -> tuple[re.Pattern[str], ...]:
        return tuple(p for p in map(phrase_pattern, self.phrases) if p is not None)

    def active(self, state: State, fired: frozenset[str] = frozenset()) -> bool:
        if any(flag in fired for flag in self.unless_fired):
            return False
        return self.until is None or bool(self.until.failure(state, "until"))


class Gate:
    """The reply checks active in one turn, as the engine's reply gate
    (:class:`npcchat.runtime.engine.ReplyGate`)."""

    def __init__(self, checks: tuple[ReplyCheck, ...]) -> None:
        self.checks = checks
        self.longest = max(len(for_matching(p)) for c in checks for p in c.phrases) + 1

    def matched(self, text: str) -> str:
        return for_matching(text)

    def violation(self, said: str) -> tuple[int, str] | None:
        found: tuple[int, str] | None = None
        for check in self.checks:
            for pattern in check.patterns:
                m = pattern.search(said)
                if m is not None and (found is None or m.start() < found[0]):
                    found = (m.start(), check.label)
        return found


@dataclass(frozen=True)
class Judgement:
    """The flags as the game gets them, and the case each fired flag took."""

    flags: dict[str, FlagResult]
    blocked: dict[str, str]
    cases: dict[str, Case]


@dataclass(frozen=True)
class Rules:
    flags: dict[str, FlagRule] = field(default_factory=dict)
    stages: tuple[str, ...] = ()  # the quest's stages in order ([quest].stages)
    checks: tuple[ReplyCheck, ...] = ()  # [[reply_checks]]

    def __bool__(self) -> bool:
        return bool(self.flags) or bool(self.checks)

    def gate(self, state: State, fired: frozenset[str] = frozenset()) -> Gate | None:
        """The reply checks that apply in ``state`` with these flags fired (None: none)."""
        active = tuple(c for c in self.checks if c.active(state, fired))
        return Gate(active) if active else None

    def judge(self, flags: dict[str, FlagResult], state: State) -> Judgement:
        """Which flags fire: a flag the heads predicted fires only when its rule's
        conditions hold on ``state`` (and one of its cases applies)."""
        out: dict[str, FlagResult] = {}
        blocked: dict[str, str] = {}
        cases: dict[str, Case] = {}
        for name, f in flags.items():
            rule = self.flags.get(name)
            if rule is None or not f.fired:
                out[name] = f
                continue
            reason = rule.requires.failure(state, f"flags.{name}.requires")
            case = None
            if not reason:
                for c in rule.cases:
                    why = c.requires.failure(state, f"{c.label}.requires")
                    if not why:
                        case = c
                        break
                    reason = reason or why
            if case is None:
                blocked[name] = reason
                out[name] = FlagResult(f.prob, f.threshold, False, reason)
            else:
                cases[name] = case
                out[name] = f
        return Judgement(out, blocked, cases)

    def choices(self, judged: Judgement) -> tuple[tuple[str, tuple[str, ...]], ...]:
        """The parameters of the fired flags' actions that the model picks: (label
        ``flag.param``, options)."""
        out = []
        for name, case in judged.cases.items():
            if case.action is not None:
                for key, value in case.action[1]:
                    if isinstance(value, Choice):
                        out.append((f"{name}.{key}", value.options))
        return tuple(out)

    def guard_for(self, blocked: dict[str, str]) -> tuple[str, Guard] | None:
        """The guarded reply of the first blocked flag (in head order) that has one."""
        for name in blocked:
            rule = self.flags.get(name)
            if rule is not None and rule.guard is not None:
                return name, rule.guard
        return None


def retag(tags: Tags, changes: Iterable[tuple[str, str]]) -> Tags:
    """``tags`` with the text tags an effect or a guard names set (validated at load)."""
    changed: dict[str, object] = dict(changes)
    return replace(tags, **changed)  # type: ignore[arg-type]


def apply(
    rules: Rules, judged: Judgement, state: State, chosen: dict[str, str] | None = None
) -> tuple[State, tuple[Change, ...], tuple[Action, ...], tuple[str, ...]]:
    """The fired flags' effects on ``state`` (in head order), the changes they made, the
    actions for the game and the memory lines to record. ``chosen``: what the model picked
    for :class:`Choice` parameters, by ``flag.param`` (else the first option)."""
    changes: list[Change] = []
    actions: list[Action] = []
    memories: list[str] = []
    tags, player, npc_items = state.tags, state.player, list(state.npc_items)
    items = list(player.items)
    for name, case in judged.cases.items():
        e = case.effects
        if e.stage:
            target = _next_stage(rules.stages, tags.quest_stage) if e.stage == NEXT else e.stage
            if target and target != tags.quest_stage:
                changes.append(Change("tag", "quest_stage", tags.quest_stage, target))
                tags = replace(tags, quest_stage=target)
        for key, value in e.tags:
            before = str(getattr(tags, key))
            if before != value:
                changes.append(Change("tag", key, before, value))
                tags = retag(tags, [(key, value)])
        for item in e.take_items:
            if item in items:
                items.remove(item)
                npc_items.append(item)
                changes.append(Change("item", item, "player", "npc"))
        for item in e.give_items:
            if item in npc_items:
                npc_items.remove(item)
                items.append(item)
                changes.append(Change("item", item, "npc", "player"))
        if e.memory:
            memories.append(e.memory)
            changes.append(Change("memory", "memory", "", e.memory))
        if case.action is not None:
            action_name, spec = case.action
            params: list[tuple[str, Param]] = []
            for key, given in spec:
                if isinstance(given, Choice):
                    params.append((key, (chosen or {}).get(f"{name}.{key}", given.options[0])))
                else:
                    params.append((key, given))
            actions.append(Action(action_name, name, tuple(params)))
    new = State(tags, replace(player, items=tuple(items)), tuple(npc_items))
    return new, tuple(changes), tuple(actions), tuple(memories)


def _next_stage(stages: tuple[str, ...], current: str) -> str:
    if current in stages and stages.index(current) + 1 < len(stages):
        return stages[stages.index(current) + 1]
    return ""
