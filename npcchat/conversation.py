"""A conversation: an engine, a session, the NPC's mind and where it is saved.

This is the object :meth:`npcchat.Runtime.open` returns and ``npcchat talk`` drives. Every
change produces a new frozen Session; a turn only lands when it finished, so an interrupted
or cancelled turn (Ctrl-C, a closed stream) leaves the session exactly as it was.

Threads: every method takes the runtime's lock (one llama.cpp context serves every
conversation opened on it), so a conversation may be used from any thread and turns of
several conversations on one runtime run one after the other, never interleaved. A
:class:`TurnStream` holds that lock from its first piece to its end: consume or close it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Generator, Iterator
from dataclasses import replace
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from npcchat.errors import ConfigError
from npcchat.mind.mind import NpcMind
from npcchat.mind.npc import NpcDef
from npcchat.runtime.engine import Engine, drive
from npcchat.sessions import session as session_mod
from npcchat.sessions import snapshot
from npcchat.sessions.session import Session
from npcchat.types import (
    NUMERIC_TAGS,
    TAG_FIELDS,
    ContextTurn,
    SamplingParams,
    Turn,
)

T = TypeVar("T")

SETTABLE = (*TAG_FIELDS, "location", "items", "actions", "position", "lore", "description")


def new_session(npc: NpcDef, engine: Engine, seed: int) -> Session:
    return Session(
        npc_file=str(Path(npc.source).resolve()) if npc.source else "",
        npc_id=npc.id,
        tags=npc.tags,
        initial_tags=npc.tags,
        player_state=npc.player_state,
        lore=npc.lore,
        description=npc.description,
        bundle_name=engine.bundle.name,
        bundle_id=engine.bundle.identity,
        seed=seed,
    )


def _with(obj: T, key: str, value: Any) -> T:
    changes: dict[str, Any] = {key: value}
    return replace(obj, **changes)  # type: ignore[type-var]


def set_value(s: Session, key: str, value: str) -> Session:
    """Apply ``/set KEY VALUE``; raises ConfigError naming the key and what it expects."""
    if key in NUMERIC_TAGS:
        try:
            number = float(value)
        except ValueError:
            raise ConfigError(f"/set {key}: expected a number in [0, 1], got {value!r}") from None
        if not 0.0 <= number <= 1.0:
            raise ConfigError(f"/set {key}: expected a number in [0, 1], got {number}")
        return replace(s, tags=_with(s.tags, key, number))
    if key in (*TAG_FIELDS, "location"):
        return replace(s, tags=_with(s.tags, key, value))
    if key in ("items", "actions"):
        items = tuple(v.strip() for v in value.split(",") if v.strip())
        return replace(s, player_state=_with(s.player_state, key, items))
    if key == "position":
        return replace(s, player_state=replace(s.player_state, position=value))
    if key in ("lore", "description"):
        return _with(s, key, value)
    raise ConfigError(f"/set: unknown key {key!r}", hint=f"keys: {', '.join(SETTABLE)}")


class Conversation:
    """An NPC and a session on a loaded bundle: :meth:`say` or :meth:`stream` a player's
    line, get a :class:`npcchat.Turn`. With a ``path`` the session is saved atomically after
    every change (and its KV snapshot beside it)."""

    def __init__(
        self,
        engine: Engine,
        session: Session,
        sampling: SamplingParams,
        path: Path | None = None,
        on_warning: Callable[[str], None] | None = None,
        mind: NpcMind | None = None,
        lock: threading.RLock | None = None,
    ) -> None:
        self.engine = engine
        self.lock = lock or threading.RLock()
        self.session = session
        self.sampling = sampling
        self.path = path
        self.on_warning = on_warning
        self.mind = mind  # knowledge and long-term memory; None: the session's lore as is
        self._turns = len(session.history)
        self._ours: set[Path] = set()  # session files this conversation has written
        # talk's REPL predecodes after every turn: its KV snapshot is written then, once,
        # instead of once after the turn and again after the predecode
        self.idle_snapshots = False
        self._snapshot_due = False
        self.restored_snapshot = False  # set by Runtime.open when a KV snapshot was restored

    def _turn_sampling(self) -> SamplingParams:
        # The session seed plus a turn counter: reproducible runs, and /retry draws anew.
        return replace(self.sampling, seed=(self.session.seed + self._turns) % 2**31)

    def say(self, text: str, on_text: Callable[[str], None] | None = None) -> Turn:
        """Run one turn for the player's ``text``; ``on_text`` gets each reply piece as it
        is generated. Returns the :class:`npcchat.Turn` (its ``to_json()`` is a line of
        ``talk --json``). The turn is committed (and saved) only when it finished."""
        with self.lock:
            return drive(self._steps(text), on_text)

    def stream(self, text: str) -> TurnStream:
        """The same turn as :meth:`say`, as an iterator of reply pieces; ``.turn`` is the
        finished turn. Closing the stream before its end cancels the turn: nothing of it is
        committed."""
        return TurnStream(self._steps(text), self.lock)

    def _steps(self, text: str) -> Generator[str, None, Turn]:
        """One turn as a generator of text pieces; commits the session when it returns."""
        result = self.mind.trigger(self.session, text) if self.mind else None
        if result is not None:  # a forbidden trigger: fixed reaction, no model call
            yield result.reply
        elif self.mind is not None:
            prep = self.mind.prepare(self.session, text)
            result = yield from self.engine.stream(
                prep.session, text, self._turn_sampling(), pinned=prep.pinned
            )
        else:
            result = yield from self.engine.stream(self.session, text, self._turn_sampling())
        if self.mind is not None:
            self.session, result = self.mind.after(self.session, result)
        else:
            self.session = self.session.with_turn(result)
        self._turns += 1
        self.autosave()
        return result

    def predecode(self) -> int:
        """Idle-time work: decode the next prompt up to `<PLAYER>` (see Engine.predecode),
        and refresh the KV snapshot so a resumed session starts from there too (an
        interrupted predecode leaves it due: :meth:`flush_snapshot`)."""
        with self.lock:
            pinned: tuple[ContextTurn, ...] = ()
            session = self.session
            if self.mind is not None:
                prep = self.mind.prepare(self.session, "")
                session, pinned = prep.session, prep.pinned
            try:
                n = self.engine.predecode(session, pinned, self.sampling.max_tokens)
            except BaseException:
                self.engine.forget()  # an interrupted predecode leaves the KV cache unknown
                raise
            self._snapshot_due |= n > 0
            self.flush_snapshot()
            return n

    def flush_snapshot(self) -> None:
        """Write the session's KV snapshot if one is due."""
        with self.lock:
            if self.path is not None and self._snapshot_due:
                self._snapshot_due = False
                self._snapshot(self.path)

    def retry(self, on_text: Callable[[str], None] | None = None) -> Turn | None:
        """Redo the last turn with a new draw (the state vector is the same: same prompt)."""
        with self.lock:
            if not self.session.history:
                return None
            last = self.session.history[-1].player
            before = self.session
            self.session = self.session.undo()
            try:
                return self.say(last, on_text)
            except BaseException:
                self.session = before
                raise

    def undo(self) -> bool:
        """Take back the last turn (trust and relationship return to before it)."""
        with self.lock:
            if not self.session.history:
                return False
            self.session = self.session.undo()
            self.autosave()
            return True

    def reset(self) -> None:
        """Back to the initial state: no history, no memories."""
        with self.lock:
            self.session = self.session.reset()
            self.autosave()

    def set(self, key: str, value: str) -> None:
        """``/set KEY VALUE``: a tag, the player state, lore or description."""
        with self.lock:
            self.session = set_value(self.session, key, value)
            self.autosave()

    def save(self, path: Path | None = None) -> Path:
        """Save the session to ``path`` (default: its own file); returns where."""
        target = path or self.path
        if target is None:
            raise ConfigError(
                "/save: no file given and the session has none", hint="/save FILE.toml"
            )
        with self.lock:
            self._write(target)
        return target

    def close(self) -> None:
        """Write a KV snapshot that is still due. The runtime stays open."""
        self.flush_snapshot()

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def autosave(self) -> None:
        if self.path is not None:
            self._write(self.path)

    def _write(self, target: Path) -> None:
        session_mod.save(self.session, target, known=target in self._ours)
        self._ours.add(target)
        if self.idle_snapshots and target == self.path:
            self._snapshot_due = True
        else:
            self._snapshot(target)

    def _snapshot(self, target: Path) -> None:
        """KV snapshot beside the session file (optional; problems are warnings)."""
        runtime = self.engine.cfg.runtime
        if not runtime.snapshots:
            return
        state = self.engine.kv_state()
        if state is None:
            return
        self._warn(snapshot.save(target, state, runtime.snapshot_max_mb))

    def resume_snapshot(self) -> bool:
        """Restore the KV snapshot saved with this session, when it matches the bundle."""
        if self.path is None or not self.engine.cfg.runtime.snapshots:
            return False
        bundle_id, n_ctx = self.engine.bundle.identity, self.engine.model.n_ctx
        state, warning = snapshot.load(self.path, bundle_id, n_ctx)
        self._warn(warning)
        if state is None:
            return False
        if not self.engine.restore_kv(state):
            self._warn(
                f"{snapshot.path_for(self.path)}: llama.cpp refused the KV snapshot; "
                "the next turn reads the prompt in full"
            )
            return False
        return True

    def _warn(self, message: str | None) -> None:
        if message and self.on_warning:
            self.on_warning(message)


class TurnStream(Iterator[str]):
    """Reply pieces of one turn as they are generated; then :attr:`turn`.

    ``for piece in stream: ...`` and afterwards ``stream.turn``; reading ``turn`` early
    runs the turn to its end. :meth:`close` (or leaving a ``with`` block) before the end
    cancels the turn: nothing of it is committed. The runtime's lock is held from the
    first piece to the end, so consume a stream from one thread and do not leave it open.
    """

    def __init__(self, steps: Generator[str, None, Turn], lock: threading.RLock) -> None:
        self._steps = steps
        self._lock = lock
        self._locked = False
        self._turn: Turn | None = None
        self._done = False

    def __iter__(self) -> TurnStream:
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        if not self._locked:
            self._lock.acquire()
            self._locked = True
        try:
            return next(self._steps)
        except StopIteration as stop:
            self._turn = stop.value
            self._end()
            raise StopIteration from None
        except BaseException:
            self._end()
            raise

    @property
    def turn(self) -> Turn:
        """The finished turn (runs the rest of it first if the stream was not consumed)."""
        for _ in self:
            pass
        if self._turn is None:
            raise RuntimeError("the turn was cancelled or failed; there is no result")
        return self._turn

    def close(self) -> None:
        """Cancel the turn if it has not finished (nothing is committed)."""
        if not self._done:
            self._steps.close()
            self._end()

    def _end(self) -> None:
        self._done = True
        if self._locked:
            self._locked = False
            self._lock.release()

    def __enter__(self) -> TurnStream:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()
