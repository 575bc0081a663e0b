"""Frozen value types that cross module borders (prompt, engine, session, CLI)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

TAG_FIELDS = ("quest_stage", "relationship", "trust", "npc_mood", "player_reputation", "style")
NUMERIC_TAGS = ("relationship", "trust")
DELTA_NAMES = ("trust", "relationship")


@dataclass(frozen=True)
class Tags:
    """The NPC state the prompt shows and the heads change (trust/relationship in [0, 1])."""

    quest_stage: str = ""
    relationship: float = 0.5
    trust: float = 0.5
    npc_mood: str = ""
    player_reputation: str = ""
    style: str = ""
    location: str = ""


@dataclass(frozen=True)
class PlayerState:
    items: tuple[str, ...] = ()
    actions: tuple[str, ...] = ()
    position: str = ""


@dataclass(frozen=True)
class ContextTurn:
    role: str  # "player" or "npc"
    text: str


@dataclass(frozen=True)
class Memory:
    """A long-term memory line: made by the NPC's mind (a turn that left the context
    window, a rule's effect) or given by the game (an event), stored in the session.
    ``day``/``when``: the game's own time it carries (None/"": none given)."""

    turn: int  # index of the turn it came from (an event's: the turns before it)
    text: str
    day: float | None = None  # the game's day number
    when: str = ""  # the game's timestamp, as the game shows it
    source: str = "turn"  # "turn", "rules" or "event"

    @property
    def line(self) -> str:
        """The line as the prompt shows it: the game time first, when it has one."""
        day = f"day {self.day:g}" if self.day is not None else ""
        stamp = ", ".join(x for x in (day, self.when) if x)
        return f"({stamp}) {self.text}" if stamp else self.text


@dataclass(frozen=True)
class PromptInput:
    """Everything one prompt is rendered from."""

    npc_id: str
    tags: Tags
    player_utterance: str
    lore: str = ""
    description: str = ""
    player_state: PlayerState = field(default_factory=PlayerState)
    context: tuple[ContextTurn, ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.7
    top_p: float = 0.9
    repeat_penalty: float = 1.05
    max_tokens: int = 200
    seed: int | None = None
    # the stop texts field below; top_k: only the k most likely tokens may be drawn (0:
    # all). 50 is what the original's transformers generate() used, and it spares top-p
    # a sort of the whole vocabulary (151,936 tokens for Qwen2) at every token
    # the reply ends before the first of these texts (not included; OpenAI's ``stop``)
    stop: tuple[str, ...] = ()
    top_k: int = 50


@dataclass(frozen=True)
class FlagResult:
    """``fired``: what the game acts on. ``blocked``: the NPC's rule that kept a flag the
    heads predicted (prob >= threshold) from firing ("" when none did): the model wanted
    to, the rules said no."""

    prob: float
    threshold: float
    fired: bool
    blocked: str = ""


Param = str | int | float | bool


@dataclass(frozen=True)
class Action:
    """Something the game executes because a flag fired, with its parameters
    (``{"name": "give_item", "item": "loom_key"}``), as the NPC file defines it."""

    name: str
    flag: str
    params: tuple[tuple[str, Param], ...] = ()

    def to_json(self) -> dict[str, Param]:
        """``{"name", "flag", **params}``: the flag that fired it beside its parameters."""
        return {"name": self.name, "flag": self.flag, **dict(self.params)}


@dataclass(frozen=True)
class Change:
    """One state change an effect made: a tag (``quest_stage``: ``in_progress`` ->
    ``complete``), an item moving (``forgotten_picture``: ``player`` -> ``npc``) or a
    memory line recorded (``memory``: "" -> the line)."""

    kind: str  # "tag", "item" or "memory"
    key: str
    before: str
    after: str

    def to_json(self) -> dict[str, str]:
        return {"kind": self.kind, "key": self.key, "from": self.before, "to": self.after}

    def __str__(self) -> str:
        if self.kind == "memory":
            return f"memory: {self.after}" if self.after else f"memory forgotten: {self.before}"
        return f"{self.key}: {self.before or '-'} -> {self.after or '-'}"


@dataclass(frozen=True)
class RulesOutcome:
    """What the NPC's rules did in one turn (npcchat.rules): flags kept from firing, the
    state changes their effects made, the actions for the game, the guarded reply."""

    blocked: dict[str, str] = field(default_factory=dict)  # flag -> the condition that failed
    effects: tuple[Change, ...] = ()  # every state change, in the order it was made
    actions: tuple[Action, ...] = ()
    memories: tuple[str, ...] = ()  # memory lines the effects recorded
    guard: str = ""  # the flag whose guarded reply answered ("" when none did)
    checks: tuple[str, ...] = ()  # reply checks that intervened while generating
    player_items: tuple[str, ...] = ()  # after the turn
    npc_items: tuple[str, ...] = ()  # after the turn

    def to_json(self) -> dict[str, Any]:
        return {
            "blocked": dict(self.blocked),
            "effects": [c.to_json() for c in self.effects],
            "actions": [a.to_json() for a in self.actions],
            "memories": list(self.memories),
            "guard": self.guard,
            "checks": list(self.checks),
            "player_items": list(self.player_items),
            "npc_items": list(self.npc_items),
        }


@dataclass(frozen=True)
class HeadsOutput:
    """Head outputs for one `<STATE>` vector; flags keep the bundle's head order."""

    deltas: dict[str, float]
    flags: dict[str, FlagResult]


@dataclass(frozen=True)
class Timings:
    prefill_ms: float  # from the prompt's first decode call to its last
    heads_ms: float
    generate_ms: float
    # the longest wait between two of the reply's tokens: in a server, the other turns'
    # prompt chunks and batched steps a reply waited through
    stall_ms: float = 0.0

    def to_ms(self) -> dict[str, float]:
        """``{"prefill", "heads", "generate", "stall"}``: the ``timings_ms`` of answers,
        ``talk --json`` and session records."""
        return {
            "prefill": self.prefill_ms,
            "heads": self.heads_ms,
            "generate": self.generate_ms,
            "stall": self.stall_ms,
        }


@dataclass(frozen=True)
class Turn:
    """One finished NPC turn: the reply, what the heads predicted, and the new tags.

    :meth:`to_dict` is the object ``npcchat talk --json`` prints, one per turn, and
    :meth:`to_json` that object as JSON text (one line, UTF-8 as is).
    """

    player: str
    reply: str
    heads: HeadsOutput
    tags_before: Tags
    tags_after: Tags
    prompt_tokens: int
    prefill_tokens: int  # decoded this turn (fewer than prompt_tokens when a prefix was reused)
    generated_tokens: int
    dropped_turns: int
    stop_reason: str  # "eos", "tag", "length", "trigger"
    timings: Timings
    seed: int
    npc_id: str = ""
    rules: RulesOutcome | None = None  # None: the NPC has no rules (output as before)
    interventions: tuple[str, ...] = ()  # reply checks that made generation back up
    choices: tuple[tuple[str, str], ...] = ()  # (label, option) the model picked after it
    trigger_phrase: str = ""  # the forbidden trigger's phrase that matched (stop "trigger")

    @property
    def deltas(self) -> dict[str, float]:
        """Trust and relationship change predicted by the heads, each in [-1, 1]."""
        return dict(self.heads.deltas)

    @property
    def flags(self) -> dict[str, FlagResult]:
        """Every flag of the bundle, in head order: probability, threshold, fired."""
        return dict(self.heads.flags)

    @property
    def fired(self) -> tuple[str, ...]:
        """The names of the flags that fired this turn."""
        return tuple(n for n, f in self.heads.flags.items() if f.fired)

    @property
    def actions(self) -> tuple[Action, ...]:
        """What the game should execute this turn (the NPC file's actions of fired flags)."""
        return self.rules.actions if self.rules else ()

    def to_dict(self) -> dict[str, Any]:
        """``{"npc_id", "reply", "deltas", "flags", "state", "tokens", "timings_ms"}``
        (plus ``stop_reason`` and ``rules`` for an NPC with rules)."""
        return {"npc_id": self.npc_id, **turn_json(self)}

    def to_json(self) -> str:
        """:meth:`to_dict` as JSON text: one line, non-ASCII (Korean) as is. Until
        npcchat 0.2 this returned the dict; that is :meth:`to_dict` now."""
        return json.dumps(self.to_dict(), ensure_ascii=False, allow_nan=False)


def flags_json(flags: Mapping[str, FlagResult]) -> dict[str, dict[str, Any]]:
    """``{name: {"prob", "threshold", "fired"}}``, the shape every output uses (plus
    ``"blocked"``: the failed condition, for a flag an NPC's rule kept from firing)."""
    out: dict[str, dict[str, Any]] = {}
    for n, f in flags.items():
        out[n] = {"prob": f.prob, "threshold": f.threshold, "fired": f.fired}
        if f.blocked:
            out[n]["blocked"] = f.blocked
    return out


def turn_json(r: Turn) -> dict[str, Any]:
    """The part of a turn that `talk --json`, eval reports and bench print alike."""
    out = {
        "reply": r.reply,
        "deltas": dict(r.heads.deltas),
        "flags": flags_json(r.heads.flags),
        "state": dict(vars(r.tags_after)),
        "tokens": {
            "prompt": r.prompt_tokens,
            "prefill": r.prefill_tokens,
            "generated": r.generated_tokens,
        },
        "timings_ms": r.timings.to_ms(),
    }
    if r.rules is not None:  # an NPC without rules prints exactly what it did before
        out["stop_reason"] = r.stop_reason
        out["rules"] = r.rules.to_json()
    return out
