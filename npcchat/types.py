"""Frozen value types that cross module borders (prompt, engine, session, CLI)."""

from __future__ import annotations

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
    """A long-term memory line: made by the NPC's mind, stored in the session."""

    turn: int  # index of the turn it came from
    text: str


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


@dataclass(frozen=True)
class FlagResult:
    prob: float
    threshold: float
    fired: bool


@dataclass(frozen=True)
class HeadsOutput:
    """Head outputs for one `<STATE>` vector; flags keep the bundle's head order."""

    deltas: dict[str, float]
    flags: dict[str, FlagResult]


@dataclass(frozen=True)
class Timings:
    prefill_ms: float
    heads_ms: float
    generate_ms: float


@dataclass(frozen=True)
class Turn:
    """One finished NPC turn: the reply, what the heads predicted, and the new tags.

    :meth:`to_json` is the object ``npcchat talk --json`` prints, one per turn.
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

    def to_json(self) -> dict[str, Any]:
        """``{"npc_id", "reply", "deltas", "flags", "state", "tokens", "timings_ms"}``."""
        return {"npc_id": self.npc_id, **turn_json(self)}


def flags_json(flags: Mapping[str, FlagResult]) -> dict[str, dict[str, Any]]:
    """``{name: {"prob", "threshold", "fired"}}``, the shape every output uses."""
    return {
        n: {"prob": f.prob, "threshold": f.threshold, "fired": f.fired} for n, f in flags.items()
    }


def turn_json(r: Turn) -> dict[str, Any]:
    """The part of a turn that `talk --json`, eval reports and bench print alike."""
    t = r.timings
    return {
        "reply": r.reply,
        "deltas": dict(r.heads.deltas),
        "flags": flags_json(r.heads.flags),
        "state": dict(vars(r.tags_after)),
        "tokens": {
            "prompt": r.prompt_tokens,
            "prefill": r.prefill_tokens,
            "generated": r.generated_tokens,
        },
        "timings_ms": {"prefill": t.prefill_ms, "heads": t.heads_ms, "generate": t.generate_ms},
    }
