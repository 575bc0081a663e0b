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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from npcchat import demo
from npcchat.api import Runtime
from npcchat.conversation import Conversation
from npcchat.errors import ConfigError, SessionError
from npcchat.mind import npc as npc_mod
from npcchat.serve.errors import NotFound
from npcchat.serve.schemas import ID_PATTERN
from npcchat.sessions import session as session_mod
from npcchat.sessions import snapshot
from npcchat.text import by_id

_ID = re.compile(ID_PATTERN)


@dataclass
class _Entry:
    conversation: Conversation
    runtime: Runtime  # the bundle it runs on (a reload swaps the store's runtime)
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
        self._busy: dict[int, int] = {}  # id(runtime) -> requests using it right now
        self._idle = threading.Condition(self._guard)
        self.npc_errors: dict[str, str] = {}  # NPC file -> why its last version was refused

    # -- the bundle a request runs on --------------------------------------------------------
    @contextmanager
    def using(self) -> Iterator[Runtime]:
        """The current runtime, held for a request that runs on it without a session
        (``/api/predict_main``): a reload waits for it before closing the old one."""
        with self._guard:
            rt = self.runtime
            self._busy[id(rt)] = self._busy.get(id(rt), 0) + 1
        try:
            yield rt
        finally:
            self._release(rt)

    def _release(self, rt: Runtime) -> None:
        with self._guard:
            self._busy[id(rt)] -= 1
            if not self._busy[id(rt)]:
                del self._busy[id(rt)]
                self._idle.notify_all()

    def swap(self, new: Runtime, timeout: float = 600.0) -> Runtime:
        """Serve ``new`` from now on; returns the old runtime once no request uses it any
        more (turns already running finish on it; new ones start on ``new``)."""
        with self._guard:
            old, self.runtime = self.runtime, new
            for key in [k for k, e in self._open.items() if e.runtime is old and not e.users]:
                self._open.pop(key).conversation.close()
            self._idle.wait_for(lambda: not self._busy.get(id(old)), timeout)
            for key in [k for k, e in self._open.items() if e.runtime is old]:
                self._open.pop(key).conversation.close()
        return old

    def replace_npc(self, npc: npc_mod.NpcDef) -> None:
        """A changed NPC file: its next turns use the new definition (idle conversations
        of that NPC are reopened; a running turn finishes with the old one)."""
        with self._guard:
            self.npcs[npc.id] = npc
            for key in [k for k, e in self._open.items() if k[1] == npc.id and not e.users]:
                self._open.pop(key).conversation.close()

    def reply_room(self, asked: int) -> int:
        """A reply takes at most half the context: more would leave no room for a prompt,
        so it is a bound of this server, not an error of the request (see the schema)."""
        return max(1, min(asked, self.runtime.config.runtime.n_ctx // 2))

    def warnings(self) -> list[str]:
        """What the NPC files configure that this bundle lacks (said once, at start)."""
        flags = self.runtime.flags
        return [w for npc in self.npcs.values() for w in npc_mod.flag_warnings(npc, flags)]

    def path(self, player_id: str, npc_id: str) -> Path:
        for value in (player_id, npc_id):
            if not _ID.match(value):  # the schemas check too; a path is never built otherwise
                raise ConfigError(f"invalid id {value!r}")
        return self.root / npc_id / f"{player_id}.json"

    def npc(self, npc_id: str) -> npc_mod.NpcDef:
        """The NPC an id names: its own id, or a unique prefix of one (``mother`` ->
        ``mother_guard``), as talk and eval resolve demo NPCs."""
        found = self.npcs.get(npc_id)
        if found is not None:  # the usual case, on every turn: no scan
            return found
        npcs = dict(self.npcs)  # a copy: the file watcher may add one meanwhile
        matches = by_id(npc_id, npcs)
        if len(matches) == 1:
            return npcs[matches[0]]
        if matches:
            raise NotFound(
                f"NPC {npc_id!r} is ambiguous: {', '.join(sorted(matches))}",
                hint="give more of the id",
            )
        raise NotFound(f"unknown NPC {npc_id!r}", hint="GET /v1/npcs lists them")

    def canonical(self, npc_id: str) -> str:
        """The full id of the NPC ``npc_id`` names (NotFound when none or several)."""
        return self.npc(npc_id).id

    @contextmanager
    def lease(self, player_id: str, npc_id: str, create: bool = True) -> Iterator[Conversation]:
        """The conversation of (player, NPC), opened (or created) on first use."""
        npc_id = self.canonical(npc_id)
        key = (player_id, npc_id)
        with self._guard:
            entry = self._open.get(key)
            if entry is not None and entry.users == 0 and entry.runtime is not self.runtime:
                entry.conversation.close()  # opened on the bundle a reload replaced
                del self._open[key]
                entry = None
            if entry is not None and entry.users == 0 and entry.conversation.stale():
                # another program changed the file: read its version, never overwrite it
                entry.conversation.close()
                del self._open[key]
                entry = None
            if entry is None:
                rt = self.runtime
                entry = _Entry(self._open_conversation(rt, player_id, npc_id, create), rt)
                self._open[key] = entry
            self._open.move_to_end(key)
            entry.users += 1
            self._busy[id(entry.runtime)] = self._busy.get(id(entry.runtime), 0) + 1
        try:
            yield entry.conversation
        except SessionError as e:
            # the file changed on disk or broke: the next request reads it again instead of
            # failing for good on this copy's stale version
            with self._guard:
                if self._open.get(key) is entry:
                    del self._open[key]
            raise SessionError(_recoverable(e.message, player_id, npc_id)) from None
        finally:
            with self._guard:
                entry.users -= 1
                self._evict()
            self._release(entry.runtime)

    def _open_conversation(
        self, rt: Runtime, player_id: str, npc_id: str, create: bool
    ) -> Conversation:
        npc = self.npc(npc_id)
        path = self.path(player_id, npc_id)
        if not create and not (path.exists() or path.is_symlink()):
            raise NotFound(f"no session of player {player_id!r} with NPC {npc_id!r}")
        try:
            # the served definition (the last good version of its file), also for a session
            # that is resumed
            return rt.open(npc, session=path, on_warning=_ignore)
        except SessionError as e:
            raise SessionError(_recoverable(e.message, player_id, npc_id)) from None

    def _evict(self) -> None:
        """Close the least recently used conversations that no request holds."""
        excess = len(self._open) - self.max_open
        if excess <= 0:  # the usual case: no scan of the open conversations per request
            return
        for key in [k for k, e in self._open.items() if e.users == 0][:excess]:
            self._open.pop(key).conversation.close()

    def session_after(
        self,
        player_id: str,
        npc_id: str,
        action: Callable[[Conversation], object] | None = None,
    ) -> dict[str, Any]:
        """Run ``action`` on an existing session's conversation (None: only read it) and
        return the session as its file holds it (the routes' SessionOut)."""
        with self.lease(player_id, npc_id, create=False) as conv:
            if action is not None:
                action(conv)  # takes the conversation's lock itself
            with conv.lock:
                return session_mod.to_dict(conv.session)

    def reset(self, player_id: str, npc_id: str) -> dict[str, object]:
        """Back to the NPC's initial state, from the file as it is on disk now (another
        program may have changed it since this server read it)."""
        with self.lease(player_id, npc_id, create=False) as conv:
            conv.reset(reload=True)
            return session_mod.to_dict(conv.session)

    def delete(self, player_id: str, npc_id: str) -> str | None:
        """Remove the session file (and its KV snapshot); waits for a running turn. A file
        that cannot be read as a session is moved aside instead (``NAME.corrupt-<time>``,
        returned), so a broken session never needs shell access to clear."""
        npc_id = self.canonical(npc_id)
        path = self.path(player_id, npc_id)
        try:
            with self.lease(player_id, npc_id, create=False) as conv, conv.lock:
                conv.session = conv.session.reset()  # a turn waiting for it starts afresh
                path.unlink(missing_ok=True)
                snapshot.path_for(path).unlink(missing_ok=True)
                self._forget(player_id, npc_id, conv)
            return None
        except SessionError:
            if not (path.exists() or path.is_symlink()):
                return None
            self._forget(player_id, npc_id, None)
            return str(session_mod.set_aside(path))

    def _forget(self, player_id: str, npc_id: str, conv: Conversation | None) -> None:
        """Drop the cached conversation (only ``conv`` when given)."""
        with self._guard:
            entry = self._open.get((player_id, npc_id))
            if entry is not None and (conv is None or entry.conversation is conv):
                del self._open[(player_id, npc_id)]


def _recoverable(message: str, player_id: str, npc_id: str) -> str:
    """A 409's message with what the game (or a designer) can do about it."""
    return (
        f"{message}; DELETE /v1/sessions/{player_id}/{npc_id} removes it (a file that "
        "cannot be read is moved aside as *.corrupt-<time>), POST .../reset starts over "
        "from the file as it is now"
    )


def _ignore(message: str) -> None:
    """Warnings about a session (another bundle, a damaged snapshot) do not fail a turn."""
