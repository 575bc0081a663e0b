"""Requests and responses of ``npcchat serve``: the schema at ``/openapi.json`` is the contract.

Ids are restricted to what is safe as one file name (a session lives at
``SESSIONS/<npc_id>/<player_id>.json``): letters, digits, ``_``, ``-`` and ``.``, not
starting with a dot, at most 64 characters.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
Id = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
IdPath = Annotated[str, Path(pattern=ID_PATTERN)]  # the same, as a path parameter
MAX_TEXT = 2000  # characters of one player line (the server's --max-text can lower it)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    seed: int | None = Field(default=None, ge=0, le=2**31 - 1)
    stream: bool = False


class Delta(BaseModel):
    trust: float
    relationship: float


class FlagMeta(BaseModel):
    prob: float
    threshold: float


class TurnMeta(BaseModel):
    npc_id: str
    player_id: str
    turn: int  # how many turns the session holds, this one included
    flags: dict[str, FlagMeta]
    state: dict[str, Any]  # the NPC's tags after the turn
    stop_reason: str  # eos, tag, length, trigger
    tokens: dict[str, int]
    timings_ms: dict[str, float]


class TurnOut(BaseModel):
    """The NPC's line and the state change (the original AI server's answer)."""

    text: str
    delta: Delta
    flags: dict[str, bool]
    meta: TurnMeta


class PredictIn(Strict):
    """The original model server's request: a prompt already in the served format."""

    session_id: Annotated[str, StringConstraints(max_length=200)]
    npc_id: Annotated[str, StringConstraints(max_length=200)]
    prompt: Annotated[str, StringConstraints(min_length=1, max_length=64_000)]
    max_tokens: int = Field(default=200, ge=1, le=4096)


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


class NpcOut(BaseModel):
    id: str
    name: str
    location: str
    lore_entries: int
    triggers: int


class Health(BaseModel):
    status: str
    bundle: str
    bundle_id: str
    slots: int
    running: int
    waiting: int


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorOut(BaseModel):
    error: ErrorBody
