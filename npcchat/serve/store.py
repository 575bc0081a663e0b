"""One conversation per (player, NPC), kept in session files under the sessions directory.

``SESSIONS/<npc_id>/<player_id>.json`` is the same session file ``npcchat talk`` writes, so
a designer can open a player's session with ``npcchat talk --session FILE``. Open
conversations are cached; a request *leases* one for its whole turn, and only conversations
no request holds are evicted. That keeps exactly one object per session file in the
process, so two requests for one session take turns on its lock instead of writing the
file from two copies.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from npcchat import demo
from npcchat.api import Runtime
from npcchat.conversation import Conversation
from npcchat.errors import ConfigError, NpcchatError
from npcchat.mind import npc as npc_mod
from npcchat.serve.schemas import ID_PATTERN
from npcchat.sessions import snapshot

_ID = re.compile(ID_PATTERN)


class NotFound(NpcchatError):
    """An NPC or a session the server does not have (HTTP 404)."""


@dataclass
class _Entry:
    conversation: Conversation
    users: int = 0


def npc_registry(npcs_dir: Path | None, demo_bundle: bool) -> dict[str, npc_mod.NpcDef]:
    """The NPCs served: every ``*.toml`` of ``npcs_dir`` by its ``id`` (the demo NPCs when
    the demo bundle is served without a directory)."""
    if npcs_dir is not None:
        npcs = npc_mod.load_dir(npcs_dir)
    else:
        npcs = {n.id: n for n in map(npc_mod.load, demo.npc_files())} if demo_bundle else {}
    for npc in npcs.values():
        if not _ID.match(npc.id):
            raise ConfigError(f"{npc.source}: key 'id': {npc.id!r} is not a valid NPC id to serve")
    return npcs


class SessionStore:
    def __init__(
        self,
        runtime: Runtime,
        npcs: dict[str, npc_mod.NpcDef],
        root: Path,
        max_open: int = 1024,
    ) -> None:
        self.runtime = runtime
        self.npcs = npcs
        self.root = root
        self.max_open = max_open
        self._open: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._guard = threading.Lock()

    def path(self, player_id: str, npc_id: str) -> Path:
        for value in (player_id, npc_id):
            if not _ID.match(value):  # the schemas check too; a path is never built otherwise
                raise ConfigError(f"invalid id {value!r}")
        return self.root / npc_id / f"{player_id}.json"

    def npc(self, npc_id: str) -> npc_mod.NpcDef:
        try:
            return self.npcs[npc_id]
        except KeyError:
            raise NotFound(f"unknown NPC {npc_id!r}", hint="GET /v1/npcs lists them") from None

    @contextmanager
    def lease(self, player_id: str, npc_id: str, create: bool = True) -> Iterator[Conversation]:
        """The conversation of (player, NPC), opened (or created) on first use."""
        key = (player_id, npc_id)
        with self._guard:
            entry = self._open.get(key)
            if entry is None:
                entry = _Entry(self._open_conversation(player_id, npc_id, create))
                self._open[key] = entry
            self._open.move_to_end(key)
            entry.users += 1
        try:
            yield entry.conversation
        finally:
            with self._guard:
                entry.users -= 1
                self._evict()

    def _open_conversation(self, player_id: str, npc_id: str, create: bool) -> Conversation:
        npc = self.npc(npc_id)
        path = self.path(player_id, npc_id)
        if not create and not path.is_file():
            raise NotFound(f"no session of player {player_id!r} with NPC {npc_id!r}")
        return self.runtime.open(npc, session=path, on_warning=_ignore)

    def _evict(self) -> None:
        """Close the least recently used conversations that no request holds."""
        excess = len(self._open) - self.max_open
        if excess <= 0:  # the usual case: no scan of the open conversations per request
            return
        for key in [k for k, e in self._open.items() if e.users == 0][:excess]:
            self._open.pop(key).conversation.close()

    def delete(self, player_id: str, npc_id: str) -> None:
        """Remove the session file (and its KV snapshot); waits for a running turn."""
        with self.lease(player_id, npc_id, create=False) as conv, conv.lock:
            conv.session = conv.session.reset()  # a turn waiting for it starts afresh
            path = self.path(player_id, npc_id)
            path.unlink(missing_ok=True)
            snapshot.path_for(path).unlink(missing_ok=True)
            with self._guard:
                entry = self._open.get((player_id, npc_id))
                if entry is not None and entry.conversation is conv:
                    del self._open[(player_id, npc_id)]


def _ignore(message: str) -> None:
    """Warnings about a session (another bundle, a damaged snapshot) do not fail a turn."""
