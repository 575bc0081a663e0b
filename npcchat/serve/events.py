"""Route for game events: what the game tells an NPC's session without a player line (a
quest stage moved, the inventory changed, the player did something, a dated memory, the
game clock). The events and their JSON form are :mod:`npcchat.sessions.events`; this file
is their HTTP face. One route group, one file.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field, StringConstraints

from npcchat.serve import contract
from npcchat.serve import schemas as S
from npcchat.serve.store import SessionStore
from npcchat.sessions import events as E
from npcchat.sessions import session as session_mod

# one visible character at least: the server strips surrounding space
Name = Annotated[str, StringConstraints(min_length=1, max_length=E.MAX_NAME, pattern=r"\S")]
Label = Annotated[str, StringConstraints(max_length=E.MAX_NAME)]
Day = Annotated[float, Field(ge=0, le=E.MAX_DAY, allow_inf_nan=False)]
Names = Annotated[list[Name], Field(max_length=E.MAX_NAMES)]


class TagsEvent(S.Strict):
    """Set tags of the NPC's state (trust and relationship: numbers in [0, 1])."""

    type: Literal["tags"]
    tags: S.TagsIn


class StageEvent(S.Strict):
    """The quest stage moved on (the tag ``quest_stage``)."""

    type: Literal["stage"]
    stage: Name


class ItemsEvent(S.Strict):
    """Items the player gained or lost through the game (the inventory)."""

    type: Literal["items"]
    gained: Names = Field(default_factory=list)
    lost: Names = Field(default_factory=list)


class ActionsEvent(S.Strict):
    """What the player did (``killed_wolves``), or no longer counts as having done."""

    type: Literal["actions"]
    gained: Names = Field(default_factory=list)
    lost: Names = Field(default_factory=list)


class MemoryEvent(S.Strict):
    """Something the NPC remembers, at the game's own time: ``day`` (a number; default:
    the session clock's day) and ``time`` (the game's timestamp as text)."""

    type: Literal["memory"]
    text: Annotated[str, StringConstraints(min_length=1, max_length=E.MAX_TEXT, pattern=r"\S")]
    day: Day | None = None
    time: Label = ""


class TimeEvent(S.Strict):
    """The game clock moved on: its day, and the timestamp as the game shows it."""

    type: Literal["time"]
    day: Day
    time: Label = ""


EventIn = Annotated[
    TagsEvent | StageEvent | ItemsEvent | ActionsEvent | MemoryEvent | TimeEvent,
    Field(discriminator="type"),
]


class EventsIn(S.Strict):
    events: list[EventIn] = Field(min_length=1, max_length=E.MAX_EVENTS)


class EventsOut(BaseModel):
    applied: S.EventLogOut
    session: S.SessionOut


def mount(app: FastAPI, store: SessionStore, guarded: list[Any], auth: tuple[int, ...]) -> None:
    @app.post(
        "/v1/sessions/{player_id}/{npc_id}/events",
        response_model=EventsOut,
        dependencies=guarded,
        responses=contract.errors(*auth, 400, 404, 409, 413, 422),
        summary="Game events into a session: tags, stage, items, actions, memories, clock",
    )
    async def post_events(player_id: S.IdPath, npc_id: S.IdPath, body: EventsIn) -> dict[str, Any]:
        """The events are applied in order, all or none, and saved before the answer, as a
        turn is; a session that does not exist yet is started from the NPC's file. They
        show in the next prompt: tags and the player's items and actions as state, a
        memory given since the last turn among its memory lines (later ones recalled by
        relevance, within ``knowledge.recall_days`` of the game clock when set)."""
        given = [e.model_dump(exclude_none=True) for e in body.events]

        def apply() -> dict[str, Any]:
            with store.lease(player_id, npc_id) as conv:
                record = conv.apply_events(given)
                with conv.lock:
                    return {
                        "applied": record.to_json(),
                        "session": session_mod.to_dict(conv.session),
                    }

        return await run_in_threadpool(apply)
