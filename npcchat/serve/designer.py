"""Routes for designer tools (and the web playground to come): every session on the
server, a session's ``/set`` and ``/undo`` as talk has them, and an NPC file as served
with the error of its last change. One route group, one file; the game's turn and the
original contracts stay in :mod:`npcchat.serve.app`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from fastapi import FastAPI, Query
from fastapi.concurrency import run_in_threadpool

from npcchat.conversation import Conversation
from npcchat.serve import contract
from npcchat.serve import schemas as S
from npcchat.serve.store import SessionStore

MAX_NPC_FILE = 1 << 20  # bytes of an NPC file shown as text


def mount(app: FastAPI, store: SessionStore, guarded: list[Any], auth: tuple[int, ...]) -> None:
    @app.get(
        "/v1/sessions",
        response_model=list[S.SessionListItem],
        dependencies=guarded,
        responses=contract.errors(*auth, 422),
        summary="Every session on the server, the most recently changed first",
    )
    async def list_sessions(
        npc_id: S.IdQuery = None,
        limit: int = Query(default=200, ge=1, le=10_000),
    ) -> list[S.SessionListItem]:
        return await run_in_threadpool(_sessions, store, npc_id, limit)

    @app.post(
        "/v1/sessions/{player_id}/{npc_id}/set",
        response_model=S.SessionOut,
        dependencies=guarded,
        responses=contract.errors(*auth, 400, 404, 409, 413, 422),
        summary="Change a tag or the player state of a session, as talk's /set does",
    )
    async def set_value(player_id: S.IdPath, npc_id: S.IdPath, body: S.SetIn) -> dict[str, Any]:
        """``key`` is a tag (trust, relationship, quest_stage, npc_mood, ...), ``location``,
        ``items``/``actions`` (comma-separated), ``position``, ``lore`` or
        ``description``; trust and relationship take a number in [0, 1] (else 422)."""

        def change(conv: Conversation) -> None:
            conv.set(body.key, body.value)

        return await run_in_threadpool(store.session_after, player_id, npc_id, change)

    @app.post(
        "/v1/sessions/{player_id}/{npc_id}/undo",
        response_model=S.SessionOut,
        dependencies=guarded,
        responses=contract.errors(*auth, 404, 409, 422),
        summary="Take back the last turn of a session, as talk's /undo does",
    )
    async def undo(player_id: S.IdPath, npc_id: S.IdPath) -> dict[str, Any]:
        """Trust and relationship (and what the NPC's rules changed) return to before the
        last turn; a session without turns is answered as it is."""

        def back(conv: Conversation) -> None:
            conv.undo()

        return await run_in_threadpool(store.session_after, player_id, npc_id, back)

    @app.get(
        "/v1/npcs/{npc_id}",
        response_model=S.NpcDetail,
        dependencies=guarded,
        responses=contract.errors(*auth, 404, 422),
        summary="An NPC as served: its file, and the error of the file's last change",
    )
    async def npc_detail(npc_id: S.IdPath) -> S.NpcDetail:
        npc = store.npc(npc_id)
        text = ""
        if npc.source:
            try:
                with open(npc.source, "rb") as fh:
                    text = fh.read(MAX_NPC_FILE).decode("utf-8", "replace")
            except OSError:
                text = ""
        rules = npc.knowledge.rules
        return S.NpcDetail(
            id=npc.id,
            name=npc.name,
            source=npc.source,
            text=text,
            error=store.npc_errors.get(npc.source) if npc.source else None,
            flags=sorted(npc.knowledge.flags),
            rules=len(rules.flags),
            reply_checks=len(rules.checks),
            examples=len(npc.examples)
            + sum(len(f.examples) + len(f.negative_examples) for f in npc.knowledge.flags.values()),
        )


def _sessions(store: SessionStore, npc_id: str | None, limit: int) -> list[S.SessionListItem]:
    """The session files, newest first, without reading them (a server holds thousands)."""
    out: list[tuple[float, S.SessionListItem]] = []
    if not store.root.is_dir():
        return []
    dirs = [store.root / npc_id] if npc_id else sorted(store.root.iterdir())
    for directory in dirs:
        if not directory.is_dir() or directory.name not in store.npcs:
            continue
        for path in directory.glob("*.json"):
            try:
                st = path.stat()
            except OSError:
                continue
            when = datetime.fromtimestamp(st.st_mtime, UTC).isoformat(timespec="seconds")
            item = S.SessionListItem(
                player_id=path.stem, npc_id=directory.name, updated=when, bytes=st.st_size
            )
            out.append((st.st_mtime, item))
    out.sort(key=lambda pair: -pair[0])
    return [item for _, item in out[:limit]]
