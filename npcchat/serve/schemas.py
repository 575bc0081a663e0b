"""Requests and responses of ``npcchat serve``: the schema at ``/openapi.json`` is the contract.

Ids are restricted to what is safe as one file name (a session lives at
``SESSIONS/<npc_id>/<player_id>.json``): letters, digits, ``_``, ``-`` and ``.``, not
starting with a dot, at most 64 characters.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from typing import Annotated, Any, Literal

from fastapi import Path, Query
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

from npcchat.sessions.session import Session
from npcchat.types import PlayerState, Turn

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
IdPath = Annotated[str, Path(pattern=ID_PATTERN)]  # the same, as a path parameter
IdQuery = Annotated[str | None, Query(pattern=ID_PATTERN)]  # and as an optional query one
MAX_TEXT = 2000  # characters of one player line (the server's --max-text can lower it)


# Requests are validated strictly: what the schema says a field is, and nothing pydantic
# could coerce into it ("0.5" for a number, 0 for a boolean), or a client generated from
# the contract and one written by hand would see different servers. Integers are the one
# exception, as JSON Schema defines them: 3.0 is the integer 3 (never "3" or true).


def _no_text_or_bool(value: Any) -> Any:
    if isinstance(value, str | bool):
        raise ValueError("Input should be a valid integer")
    return value


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class PlayerStateIn(Strict):
    items: list[Annotated[str, StringConstraints(max_length=200)]] | None = Field(
        default=None, max_length=200
    )
    actions: list[Annotated[str, StringConstraints(max_length=200)]] | None = Field(
        default=None, max_length=200
    )
    position: Annotated[str, StringConstraints(max_length=200)] | None = None


class TagsIn(Strict):
    """Tag overrides: the game's own view of the NPC's state, kept in the session."""

    quest_stage: Annotated[str, StringConstraints(max_length=200)] | None = None
    relationship: float | None = Field(default=None, ge=0.0, le=1.0)
    trust: float | None = Field(default=None, ge=0.0, le=1.0)
    npc_mood: Annotated[str, StringConstraints(max_length=200)] | None = None
    player_reputation: Annotated[str, StringConstraints(max_length=200)] | None = None
    style: Annotated[str, StringConstraints(max_length=200)] | None = None
    location: Annotated[str, StringConstraints(max_length=200)] | None = None


class TurnIn(Strict):
    """A player's line to an NPC (the original AI server's request)."""

    player_id: Id
    npc_id: Id
    text: Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT)]
    tags: TagsIn | None = None
    player_state: PlayerStateIn | None = None
    max_tokens: Annotated[int, Field(strict=False, ge=1, le=4096)] | None = Field(
        default=None,
        description="Most reply tokens (at most half the server's context size).",
    )
    seed: Annotated[int, Field(strict=False, ge=0, le=2**31 - 1)] | None = None
    top_k: Annotated[int, Field(strict=False, ge=0, le=1 << 20)] | None = Field(
        default=None,
        description="Draw from the k most likely tokens (0: all; default: the server's).",
    )
    stream: bool = False

    _ints = field_validator("max_tokens", "seed", "top_k", mode="before")(_no_text_or_bool)


class Delta(BaseModel):
    trust: float
    relationship: float


class FlagMeta(BaseModel):
    prob: float
    threshold: float
    blocked: str | None = None  # the NPC rule's condition that kept it from firing


class ActionOut(BaseModel):
    """An action for the game, with the parameters the NPC file gives it
    (``{"name": "give_item", "flag": "give_item", "item": "loom_key"}``)."""

    model_config = ConfigDict(extra="allow")

    name: str
    flag: str


class ChangeOut(BaseModel):
    kind: str  # tag, item, action, memory, time
    key: str
    from_: str = Field(alias="from")
    to: str


class RulesOut(BaseModel):
    """What the NPC's rules did this turn (only for NPC files with rules)."""

    blocked: dict[str, str]
    effects: list[ChangeOut]
    actions: list[ActionOut]
    memories: list[str]
    guard: str
    checks: list[str]
    player_items: list[str]
    npc_items: list[str]


class TurnMeta(BaseModel):
    npc_id: str
    player_id: str
    bundle_id: str = ""  # the bundle that answered (a reload switches bundles)
    turn: int  # how many turns the session holds, this one included
    flags: dict[str, FlagMeta]
    state: dict[str, Any]  # the NPC's tags after the turn
    stop_reason: str  # eos, tag, length, trigger, guarded
    tokens: dict[str, int]
    timings_ms: dict[str, float]
    rules: RulesOut | None = None


class TurnOut(BaseModel):
    """The NPC's line and the state change (the original AI server's answer)."""

    text: str
    delta: Delta
    flags: dict[str, bool]
    actions: list[ActionOut] = Field(
        default_factory=list, description="What the game executes (the NPC file's actions)."
    )
    meta: TurnMeta


_LINE = r"[^\n]*"
# a number in [0, 1], as Python prints one too (1e-05)
_UNIT = r"(?:0(?:\.[0-9]+)?|1(?:\.0+)?|\.[0-9]+|[0-9](?:\.[0-9]+)?[eE]-0*[1-9][0-9]*)"
# The served format (README, "Use it from a game"), line by line, as the server parses it.
PROMPT_PATTERN = (
    rf"^<SYS>\nNPC_ID={ID_PATTERN[1:-1]}\nNPC_LOCATION={_LINE}\nTAGS:\n"
    rf" quest_stage={_LINE}\n relationship={_UNIT}\n trust={_UNIT}\n"
    rf" npc_mood={_LINE}\n player_reputation={_LINE}\n style={_LINE}\n</SYS>\n"
    rf"<RAG>\nLORE: {_LINE}\nDESCRIPTION: {_LINE}\n</RAG>\n"
    rf"<PLAYER_STATE>\n(?:items={_LINE}\n)?(?:actions={_LINE}\n)?(?:position={_LINE}\n)?"
    rf"</PLAYER_STATE>\n<CTX>\n(?:(?:[Pp][Ll][Aa][Yy][Ee][Rr]|[Nn][Pp][Cc]): {_LINE}\n)*"
    rf"</CTX>\n<PLAYER>{_LINE}(?:\n{_LINE})*\n<STATE>\n<NPC>[\n ]*$"
)


class PredictIn(Strict):
    """The original model server's request: a prompt already in the served format."""

    # the prompt's pattern is matched as Python's re does (as schema-based test generators
    # do), so what the schema admits and what the server admits are the same strings
    model_config = ConfigDict(extra="forbid", strict=True, regex_engine="python-re")

    session_id: Annotated[str, StringConstraints(max_length=200)]
    npc_id: Id = Field(
        description="The NPC; must equal the prompt's NPC_ID line (else 422 bad_prompt)."
    )
    prompt: Annotated[
        str, StringConstraints(min_length=1, max_length=64_000, pattern=PROMPT_PATTERN)
    ] = Field(
        description="A prompt in the original served format: <SYS> with NPC_ID, "
        "NPC_LOCATION and TAGS, <RAG> with LORE and DESCRIPTION, <PLAYER_STATE>, <CTX> "
        "with 'player: ' / 'npc: ' lines, then <PLAYER> with the player's line, <STATE> and "
        "<NPC> (README: 'Use it from a game'). It is parsed into fields and rendered again "
        "through the bundle's template; one that does not fit the context is 422 bad_prompt."
    )
    max_tokens: Annotated[int, Field(strict=False, ge=1, le=4096)] = Field(
        default=200,
        description="Most reply tokens (at most half the server's context size).",
    )

    _ints = field_validator("max_tokens", mode="before")(_no_text_or_bool)


class PredictOut(BaseModel):
    session_id: str
    npc_id: str
    npc_response: str
    deltas: Delta
    flags: dict[str, float]  # probability per flag
    thresholds: dict[str, float]


class SessionBundle(BaseModel):
    name: str
    id: str


class SessionPlayerState(BaseModel):
    items: list[str]
    actions: list[str]
    position: str


class SessionMemory(BaseModel):
    turn: int
    text: str
    day: float | None = None  # the game day it carries
    when: str | None = None  # the game's timestamp
    source: str | None = None  # "rules" or "event" (absent: a turn that left the window)


class GameClock(BaseModel):
    day: float | None = None
    time: str = ""


class EventLogOut(BaseModel):
    """One call's game events as the session logs them: before which turn, when (UTC),
    the events and the changes they made."""

    turn: int
    time: str
    events: list[dict[str, Any]]
    changes: list[ChangeOut]


class SessionOut(BaseModel):
    """A session as its file holds it (the file ``npcchat talk --session`` opens)."""

    schema_version: int
    npc_id: str
    created: str
    seed: int
    bundle: SessionBundle
    lore: str
    description: str
    tags: dict[str, Any]
    initial_tags: dict[str, Any]
    player_state: SessionPlayerState
    fired_flags: list[str]
    npc_file: str
    memorized: int
    memories: list[SessionMemory]
    history: list[dict[str, Any]]  # every turn: player, reply, deltas, flags, tokens, timings
    game_clock: GameClock | None = None  # the game's clock, once an event set it
    events: list[EventLogOut] = Field(default_factory=list)  # game events, in order


class NpcOut(BaseModel):
    id: str
    name: str
    location: str
    lore_entries: int
    triggers: int


UNIT_TEXT = r"^\s*(?:0(?:\.[0-9]+)?|1(?:\.0+)?|\.[0-9]+)\s*$"  # a number in [0, 1], as text
NUMERIC_KEYS = ("relationship", "trust")


class SetIn(Strict):
    """A session change, as talk's ``/set KEY VALUE``: ``/set trust 0.8``, ``/set items
    key,map``. Trust and relationship take a number in [0, 1] written as text (the schema
    says so with if/then, and the server checks it: 422)."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        json_schema_extra={
            "if": {"properties": {"key": {"enum": list(NUMERIC_KEYS)}}, "required": ["key"]},
            "then": {"properties": {"value": {"pattern": UNIT_TEXT, "maxLength": 40}}},
        },
    )

    key: Literal[
        "quest_stage",
        "relationship",
        "trust",
        "npc_mood",
        "player_reputation",
        "style",
        "location",
        "items",
        "actions",
        "position",
        "lore",
        "description",
    ]
    value: Annotated[str, StringConstraints(max_length=2000)]

    @model_validator(mode="after")
    def _number_for_numbers(self) -> SetIn:
        if self.key in NUMERIC_KEYS and (
            len(self.value) > 40 or not re.match(UNIT_TEXT, self.value)
        ):
            raise ValueError(f"{self.key} takes a number in [0, 1]")
        return self


class SessionListItem(BaseModel):
    player_id: str
    npc_id: str
    updated: str  # ISO 8601, UTC
    bytes: int


class NpcDetail(BaseModel):
    """An NPC as served, with its file's text and the error of the file's last change
    (the served definition is then the last good one)."""

    id: str
    name: str
    source: str
    text: str
    error: str | None
    flags: list[str]
    rules: int
    reply_checks: int
    examples: int


class Health(BaseModel):
    status: str
    bundle: str
    bundle_id: str
    slots: int
    running: int
    waiting: int
    npc_errors: dict[str, str] = Field(
        default_factory=dict,
        description="NPC files whose last change did not validate (their last good version "
        "is served), with the error",
    )


class ReloadIn(Strict):
    bundle: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = Field(
        default=None, description="The bundle directory to load (default: the one served)."
    )


class ReloadOut(BaseModel):
    bundle: str
    bundle_id: str
    previous_id: str
    seconds: float  # from the request to the new bundle serving (old one drained)


class ErrorBody(BaseModel):
    code: str  # npcchat's short code: what a game branches on
    message: str  # one line, with what to do
    type: str  # the OpenAI error type of the status (invalid_request_error, ...)
    param: str | None = None  # the request field at fault, when one is


class ErrorOut(BaseModel):
    error: ErrorBody


# -- between the wire and npcchat's values ------------------------------------------------------
def overrides(
    tags: TagsIn | None, player_state: PlayerStateIn | None
) -> Callable[[Session], Session] | None:
    """The game's tags and player state, applied to the session just before the turn."""
    if tags is None and player_state is None:
        return None
    new_tags = tags.model_dump(exclude_none=True) if tags else {}
    state = player_state.model_dump(exclude_none=True) if player_state else {}

    def apply(s: Session) -> Session:
        player = s.player_state
        if state:
            player = PlayerState(
                items=tuple(state.get("items", player.items)),
                actions=tuple(state.get("actions", player.actions)),
                position=state.get("position", player.position),
            )
        return replace(s, tags=replace(s.tags, **new_tags), player_state=player)

    return apply


def deltas_of(turn: Turn) -> dict[str, float]:
    """Clamped to [-1, 1] and rounded, as the original answered."""
    return {k: round(max(-1.0, min(1.0, v)), 4) for k, v in turn.heads.deltas.items()}
