"""A conversation: an engine, a session, the NPC's mind and where it is saved.

This is the object :meth:`npcchat.Runtime.open` returns and ``npcchat talk`` drives. Every
change produces a new frozen Session; a turn only lands when it finished, so an interrupted
or cancelled turn (Ctrl-C, a closed stream) leaves the session exactly as it was.

Threads: every method may be called from any thread. A conversation's own lock makes its
turns and changes happen one at a time, in full (two threads saying something to the same
NPC in one session get two whole turns, one after the other). Turns of different
conversations share the runtime's engine through :class:`EngineAccess`: one after the
other under the runtime's lock, or side by side in the slots of a running scheduler
(:meth:`npcchat.Runtime.start_batching`). A :class:`TurnStream` holds its conversation
(and, without a scheduler, the engine) from its first piece to its end: consume or close it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from npcchat.errors import ConfigError
from npcchat.mind.mind import NpcMind
from npcchat.mind.npc import NpcDef
from npcchat.runtime.batch import Driver, TurnCancelled, TurnRequest
from npcchat.runtime.engine import Engine, drive
from npcchat.runtime.kvbook import Reuse
from npcchat.runtime.prompt import FittedPrompt
from npcchat.runtime.scheduler import Scheduler
from npcchat.sessions import events as events_mod
from npcchat.sessions import session as session_mod
from npcchat.sessions import snapshot
from npcchat.sessions.events import Event, EventRecord
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
        initial_player_state=npc.player_state,
        npc_items=npc.npc_items,
        initial_npc_items=npc.npc_items,
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


@dataclass
class EngineAccess:
    """How conversations reach the one engine of a runtime: ``lock`` serializes turns (and
    every other use of the engine) while no ``scheduler`` runs; with one, turns go to its
    slots instead, side by side, and nothing else touches the engine."""

    engine: Engine
    lock: threading.Lock
    scheduler: Scheduler | None = None


class Conversation:
    """An NPC and a session on a loaded bundle: :meth:`say` or :meth:`stream` a player's
    line, get a :class:`npcchat.Turn`. With a ``path`` the session is saved atomically after
    every change (and, outside a scheduler, its KV snapshot beside it)."""

    def __init__(
        self,
        engine: Engine,
        session: Session,
        sampling: SamplingParams,
        path: Path | None = None,
        on_warning: Callable[[str], None] | None = None,
        mind: NpcMind | None = None,
        access: EngineAccess | None = None,
        affinity: str = "",
        stamp: session_mod.Stamp | None = None,
    ) -> None:
        self.engine = engine
        self.access = access or EngineAccess(engine, threading.Lock())
        self.lock = threading.Lock()  # this conversation's turns and changes, one at a time
        self.session = session
        self.sampling = sampling
        self.path = path
        self.on_warning = on_warning
        self.mind = mind  # knowledge and long-term memory; None: the session's lore as is
        self.affinity = affinity or (str(path) if path else f"conversation-{id(self)}")
        self.reuse: Reuse | None = None  # KV reuse of its turns (eval: "aligned")
        self.context: tuple[ContextTurn, ...] = ()  # history from outside the session
        self._turns = len(session.history)
        # the version of each session file this conversation last read or wrote: a save
        # refuses to overwrite a version someone else wrote meanwhile
        self._stamps: dict[Path, session_mod.Stamp] = {path: stamp} if path and stamp else {}
        # talk's REPL predecodes after every turn: its KV snapshot is written then, once,
        # instead of once after the turn and again after the predecode
        self.idle_snapshots = False
        self._snapshot_due = False
        self.restored_snapshot = False  # set by Runtime.open when a KV snapshot was restored
        self._engine_held = False  # this conversation holds the engine lock (inside a turn)
        # what /set changed since the last turn: /retry redoes the turn with it kept
        self._set_since_turn: dict[str, str] = {}

    @property
    def npc_name(self) -> str:
        """The NPC's name from its file (its id when the session has no NPC file)."""
        name = self.mind.know.name if self.mind is not None else ""
        return name or self.session.npc_id

    def _turn_sampling(self) -> SamplingParams:
        # The session seed plus a turn counter: reproducible runs, and /retry draws anew.
        return replace(self.sampling, seed=(self.session.seed + self._turns) % 2**31)

    # -- turns ----------------------------------------------------------------------------
    def say(
        self,
        text: str,
        on_text: Callable[[str], None] | None = None,
        sampling: SamplingParams | None = None,
        *,
        update: Callable[[Session], Session] | None = None,
        cancel: threading.Event | None = None,
    ) -> Turn:
        """Run one turn for the player's ``text``; ``on_text`` gets each reply piece as it
        is generated. Returns the :class:`npcchat.Turn` (its ``to_json()`` is a line of
        ``talk --json``). The turn is committed (and saved) only when it finished.

        ``sampling`` replaces the conversation's settings for this turn (its seed, when
        None, is the session's seed plus the turn number, as always). ``update`` changes
        the session just before the turn (a game sending its own tags), committed with the
        turn. Setting ``cancel`` abandons the turn (TurnCancelled; nothing committed)."""
        steps = self._steps(text, sampling=sampling, update=update, cancel=cancel)
        return drive(steps, on_text)

    def stream(self, text: str, sampling: SamplingParams | None = None) -> TurnStream:
        """The same turn as :meth:`say`, as an iterator of reply pieces; ``.turn`` is the
        finished turn. Closing the stream before its end cancels the turn: nothing of it is
        committed."""
        return TurnStream(self._steps(text, sampling=sampling))

    def retry(self, on_text: Callable[[str], None] | None = None) -> Turn | None:
        """Redo the last turn with a new draw (the state vector is the same: same prompt)."""
        if not self.session.history:
            return None
        return drive(self._steps("", retry=True), on_text)

    def _steps(
        self,
        text: str,
        retry: bool = False,
        sampling: SamplingParams | None = None,
        update: Callable[[Session], Session] | None = None,
        cancel: threading.Event | None = None,
    ) -> Generator[str, None, Turn]:
        """One turn as a generator of text pieces; commits the session when it returns.
        Holds the conversation's lock (and, without a scheduler, the engine's) from its
        first piece to its end, releasing both when it ends or is closed."""
        with ExitStack() as held:
            held.enter_context(self.lock)
            before = self.session
            try:
                if retry:
                    text = self.session.history[-1].player
                    self.session = self.session.undo()
                    for key, value in self._set_since_turn.items():  # the designer's word
                        self.session = set_value(self.session, key, value)
                if update is not None:
                    self.session = update(self.session)
                scheduler = self.access.scheduler
                if scheduler is not None:
                    result = yield from self._batched(scheduler, text, sampling, cancel)
                else:
                    held.enter_context(self._hold_engine())
                    result = yield from self._sequential(text, sampling, cancel)
            except BaseException:
                self.session = before
                raise
            return result

    def _begin(self, text: str, sampling: SamplingParams | None) -> Turn | TurnRequest:
        """A forbidden trigger's fixed turn, or the request the engine must run."""
        result = self.mind.trigger(self.session, text) if self.mind else None
        if result is not None:
            return result
        params = sampling or self.sampling
        if params.seed is None:
            params = replace(params, seed=self._turn_sampling().seed)
        session, pinned = self._prepared(text)
        return TurnRequest(
            session,
            text,
            params,
            context=self.context,
            pinned=pinned,
            reuse=self.reuse,
            affinity=self.affinity,
            guide=self.mind.guide(session) if self.mind else None,
        )

    def scripted(
        self,
        text: str,
        reply: str,
        deltas: Mapping[str, float] | None = None,
        fired: Sequence[str] = (),
    ) -> Turn:
        """Commit a turn whose reply and state change are given instead of generated (a
        scripted scene; training's teacher forcing): the model is not run, and the NPC's
        rules, memory and the session file take it as any turn (``stop_reason``
        "scripted"). A line that meets a forbidden trigger gets the trigger's turn, as in
        play. Returns the turn."""
        with self.lock:
            turn = self.mind.trigger(self.session, text) if self.mind else None
            if turn is None:
                fitted = self._fitted(text)
                turn = self.engine.fixed_turn(
                    self.session, text, reply, dict(deltas or {}), tuple(fired), "scripted"
                )
                turn = replace(
                    turn, prompt_tokens=len(fitted.tokens), dropped_turns=fitted.dropped_turns
                )
            return self._commit(turn)

    def prompt(self, text: str) -> FittedPrompt:
        """The prompt the next turn would decode for the player's ``text``, exactly as the
        engine fits it: ``.prompt.text`` (scaffold tags as text), ``.tokens`` (tags as
        their control ids) and ``.dropped_turns``. The lore picked, the memories recalled
        and the game's events show here as the model will see them. Nothing is decoded or
        changed. (A guarded reply may be written from the same prompt with the guard's
        tags; the state change is always this prompt's.)"""
        with self.lock:
            return self._fitted(text)

    def _fitted(self, text: str) -> FittedPrompt:
        session, pinned = self._prepared(text)
        inp = self.engine.prompt_input(session, text, pinned + self.context)
        return self.engine.fit(inp, self.sampling.max_tokens, pinned=len(pinned))

    def _prepared(self, text: str) -> tuple[Session, tuple[ContextTurn, ...]]:
        """The session with this turn's lore and description, and the recalled memories
        pinned before its history (the session as it is without an NPC's mind)."""
        if self.mind is None:
            return self.session, ()
        prep = self.mind.prepare(self.session, text)
        return prep.session, prep.pinned

    def _commit(self, result: Turn) -> Turn:
        """The finished turn lands in the session, which is saved."""
        if self.mind is not None:
            self.session, result = self.mind.after(self.session, result)
        else:
            self.session = self.session.with_turn(result)
        self._turns += 1
        self._set_since_turn = {}
        self.autosave()
        return result

    def _sequential(
        self, text: str, sampling: SamplingParams | None, cancel: threading.Event | None
    ) -> Generator[str, None, Turn]:
        first = self._begin(text, sampling)
        if isinstance(first, Turn):  # a forbidden trigger: fixed reaction, no model call
            yield first.reply
            return self._commit(first)
        steps = self.engine.stream(
            first.session, first.player, first.sampling, first.context, first.pinned, first.guide
        )
        while True:
            if cancel is not None and cancel.is_set():
                steps.close()
                raise TurnCancelled("the turn was cancelled")
            try:
                piece = next(steps)
            except StopIteration as stop:
                return self._commit(stop.value)
            yield piece

    def _batched(
        self,
        scheduler: Scheduler,
        text: str,
        sampling: SamplingParams | None,
        cancel: threading.Event | None,
    ) -> Generator[str, None, Turn]:
        """The turn in a scheduler slot; pieces come back through a queue. Closing this
        generator cancels the turn (the driver gets TurnCancelled and commits nothing)."""
        pieces: queue.SimpleQueue[object] = queue.SimpleQueue()
        cancel = cancel or threading.Event()
        done = object()
        future = scheduler.submit(self.driver(text, pieces.put, cancel, sampling))
        future.add_done_callback(lambda _: pieces.put(done))
        try:
            while (piece := pieces.get()) is not done:
                yield str(piece)
            turn: Turn = future.result()
            return turn
        except BaseException:
            cancel.set()
            raise

    def driver(
        self,
        text: str,
        on_text: Callable[[str], None] | None = None,
        cancel: threading.Event | None = None,
        sampling: SamplingParams | None = None,
    ) -> Driver[Turn]:
        """This conversation's next turn as a driver for :mod:`npcchat.runtime.batch`
        (run by a scheduler thread; the caller holds the conversation's lock)."""
        first = self._begin(text, sampling)
        if isinstance(first, Turn):
            if on_text is not None:
                on_text(first.reply)
            return self._commit(first)
        result = yield replace(first, on_text=on_text, cancel=cancel)
        return self._commit(result)

    def predecode(self) -> int:
        """Idle-time work: decode the next prompt up to `<PLAYER>` (see Engine.predecode),
        and refresh the KV snapshot so a resumed session starts from there too (an
        interrupted predecode leaves it due: :meth:`flush_snapshot`). Nothing to do while a
        scheduler owns the engine."""
        if self.access.scheduler is not None:
            return 0
        with self.lock, self._hold_engine():
            session, pinned = self._prepared("")
            try:
                n = self.engine.predecode(session, pinned, self.sampling.max_tokens)
            except BaseException:
                self.engine.forget()  # an interrupted predecode leaves the KV cache unknown
                raise
            self._snapshot_due |= n > 0
            self._flush_snapshot()
            return n

    # -- state ----------------------------------------------------------------------------
    def undo(self) -> bool:
        """Take back the last turn (trust and relationship return to before it)."""
        with self.lock:
            if not self.session.history:
                return False
            self.session = self.session.undo()
            self._set_since_turn = {}
            self.autosave()
            return True

    def reset(self, reload: bool = False) -> None:
        """Back to the initial state: no history, no memories. ``reload``: from the session
        file as it is on disk now (see :meth:`reload`), in the same step."""
        with self.lock:
            if reload:
                self._reload()
            self.session = self.session.reset()
            self._set_since_turn = {}
            self.autosave()

    def reload(self) -> None:
        """Read the session file again: another program (or a person) changed it, and a
        save would otherwise refuse to overwrite their version. SessionError when the file
        is gone or cannot be read as a session (this conversation is then unchanged)."""
        with self.lock:
            self._reload()

    def _reload(self) -> None:
        if self.path is None:
            return
        session, version = session_mod.load_stamped(self.path)
        self.session = session
        self._stamps[self.path] = version
        self._turns = len(session.history)

    def stale(self) -> bool:
        """The session file on disk is not the version this conversation last read or
        wrote (another program changed, replaced or removed it)."""
        if self.path is None or self.path not in self._stamps:
            return False
        return session_mod.stamp(self.path) != self._stamps[self.path]

    def set(self, key: str, value: str) -> None:
        """``/set KEY VALUE``: a tag, the player state, lore or description."""
        with self.lock:
            self.session = set_value(self.session, key, value)
            self._set_since_turn[key] = value
            self.autosave()

    def apply_events(self, given: Sequence[Event | Mapping[str, Any]]) -> EventRecord:
        """Game events (see :mod:`npcchat.sessions.events`): typed values or their JSON
        form, applied in order as one step and saved before this returns, as a turn is.
        One bad event (ConfigError naming it) applies none. Returns the log entry."""
        parsed = events_mod.parse_all(given)
        self._check_memories(parsed)
        with self.lock:
            before = self.session
            self.session = before.with_events(parsed)
            try:
                self.autosave()
            except BaseException:
                self.session = before  # not on disk: not applied
                raise
            return self.session.events[-1]

    def _check_memories(self, parsed: Sequence[Event]) -> None:
        """A memory line longer than the memory budget could never be shown (ConfigError
        naming it): the budget is in tokens, so it is counted with the model's tokenizer."""
        if self.mind is None:
            return
        budget = self.mind.budgets.memory_tokens
        for i, e in enumerate(parsed):
            if isinstance(e, events_mod.Remember):
                n = self.mind.count(e.text)
                if n > budget:
                    raise ConfigError(
                        f"events[{i}].text: {n} tokens, over the memory budget of {budget}",
                        hint="shorten the line, or raise [knowledge] memory_tokens",
                    )

    def update(self, session: Session) -> None:
        """Replace the session's state (a game sending its own tags); saved at once."""
        with self.lock:
            self.session = session
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

    def save_as(self, path: Path) -> Path:
        """Save to ``path`` and make it this conversation's session file: every later
        change is saved there (talk's ``/save FILE``)."""
        with self.lock:
            self._write(path)
            self.path = path
            self.affinity = str(path)
        return path

    def close(self) -> None:
        """Write a KV snapshot that is still due. The runtime stays open."""
        self.flush_snapshot()

    def __enter__(self) -> Conversation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- files ----------------------------------------------------------------------------
    def autosave(self) -> None:
        if self.path is not None:
            self._write(self.path)

    def _write(self, target: Path) -> None:
        self._stamps[target] = session_mod.save(
            self.session, target, known=self._stamps.get(target)
        )
        if self.idle_snapshots and target == self.path:
            self._snapshot_due = True
        else:
            self._snapshot(target)

    def flush_snapshot(self) -> None:
        """Write the session's KV snapshot if one is due."""
        with self.lock:
            self._flush_snapshot()

    def _flush_snapshot(self) -> None:
        if self.path is not None and self._snapshot_due:
            self._snapshot_due = False
            self._snapshot(self.path)

    def _snapshot(self, target: Path) -> None:
        """KV snapshot beside the session file (optional; problems are warnings). Only
        while turns run one at a time: a scheduler's slots are not this session's cache."""
        runtime = self.engine.cfg.runtime
        if not runtime.snapshots or self.access.scheduler is not None:
            return
        with self._engine_context():
            state = self.engine.kv_state()
        if state is not None:
            self._warn(snapshot.save(target, state, runtime.snapshot_max_mb, self._owner()))

    @contextmanager
    def _hold_engine(self) -> Iterator[None]:
        with self.access.lock:
            self._engine_held = True
            try:
                yield
            finally:
                self._engine_held = False

    def _engine_context(self) -> AbstractContextManager[None]:
        """The engine lock, unless this conversation holds it already (inside a turn)."""
        return nullcontext() if self._engine_held else self._hold_engine()

    def resume_snapshot(self) -> bool:
        """Restore the KV snapshot saved with this session, when it matches the bundle."""
        if self.path is None or not self.engine.cfg.runtime.snapshots:
            return False
        if self.access.scheduler is not None:
            return False  # the scheduler's slots are not this session's cache
        engine_id, n_ctx = self.engine.identity, self.engine.model.n_ctx
        state, warning = snapshot.load(self.path, engine_id, n_ctx, self._owner())
        self._warn(warning)
        if state is None:
            return False
        with self.lock, self._hold_engine():
            restored = self.engine.restore_kv(state)
        if not restored:
            self._warn(
                f"{snapshot.path_for(self.path)}: llama.cpp refused the KV snapshot; "
                "the next turn reads the prompt in full"
            )
        return restored

    def _owner(self) -> str:
        """Which session a KV snapshot belongs to (another session's is never adopted)."""
        return f"{self.session.npc_id}|{self.session.created}"

    def _warn(self, message: str | None) -> None:
        if message and self.on_warning:
            self.on_warning(message)


class TurnStream(Iterator[str]):
    """Reply pieces of one turn as they are generated; then :attr:`turn`.

    ``for piece in stream: ...`` and afterwards ``stream.turn``; reading ``turn`` early
    runs the turn to its end. :meth:`close` (or leaving a ``with`` block) before the end
    cancels the turn: nothing of it is committed. From its first piece to its end the
    stream holds its conversation (and, without a scheduler, the engine): consume it or
    close it. Any thread may call ``next``, one at a time.
    """

    def __init__(self, steps: Generator[str, None, Turn]) -> None:
        self._steps = steps
        self._turn: Turn | None = None
        self._done = False

    def __iter__(self) -> TurnStream:
        return self

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        try:
            return next(self._steps)
        except StopIteration as stop:
            self._turn = stop.value
            self._done = True
            raise StopIteration from None
        except BaseException:
            self._done = True
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
            self._done = True
            self._steps.close()

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
