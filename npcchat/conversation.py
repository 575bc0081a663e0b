"""A conversation: an engine, a session and where it is saved. The core API behind `talk`.

Every change produces a new frozen Session; a turn only lands when it finished, so an
interrupted turn (Ctrl-C) leaves the session exactly as it was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from npcchat import session as session_mod
from npcchat.engine import Engine
from npcchat.errors import ConfigError
from npcchat.mind import NpcMind
from npcchat.npc import NpcDef
from npcchat.session import Session
from npcchat.types import (
    NUMERIC_TAGS,
    TAG_FIELDS,
    ContextTurn,
    SamplingParams,
    TurnResult,
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
    def __init__(
        self,
        engine: Engine,
        session: Session,
        sampling: SamplingParams,
        path: Path | None = None,
        on_warning: Callable[[str], None] | None = None,
        mind: NpcMind | None = None,
    ) -> None:
        self.engine = engine
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

    def _turn_sampling(self) -> SamplingParams:
        # The session seed plus a turn counter: reproducible runs, and /retry draws anew.
        return replace(self.sampling, seed=(self.session.seed + self._turns) % 2**31)

    def say(self, text: str, on_text: Callable[[str], None] | None = None) -> TurnResult:
        result = self.mind.trigger(self.session, text) if self.mind else None
        if result is not None:  # a forbidden trigger: fixed reaction, no model call
            if on_text:
                on_text(result.reply)
        elif self.mind is not None:
            prep = self.mind.prepare(self.session, text)
            result = self.engine.turn(
                prep.session, text, self._turn_sampling(), on_text, pinned=prep.pinned
            )
        else:
            result = self.engine.turn(self.session, text, self._turn_sampling(), on_text)
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
        pinned: tuple[ContextTurn, ...] = ()
        session = self.session
        if self.mind is not None:
            prep = self.mind.prepare(self.session, "")
            session, pinned = prep.session, prep.pinned
        n = self.engine.predecode(session, pinned, self.sampling.max_tokens)
        self._snapshot_due |= n > 0
        self.flush_snapshot()
        return n

    def flush_snapshot(self) -> None:
        """Write the session's KV snapshot if one is due."""
        if self.path is not None and self._snapshot_due:
            self._snapshot_due = False
            self._snapshot(self.path)

    def retry(self, on_text: Callable[[str], None] | None = None) -> TurnResult | None:
        """Redo the last turn with a new draw (the state vector is the same: same prompt)."""
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
        if not self.session.history:
            return False
        self.session = self.session.undo()
        self.autosave()
        return True

    def reset(self) -> None:
        self.session = self.session.reset()
        self.autosave()

    def set(self, key: str, value: str) -> None:
        self.session = set_value(self.session, key, value)
        self.autosave()

    def save(self, path: Path | None = None) -> Path:
        target = path or self.path
        if target is None:
            raise ConfigError(
                "/save: no file given and the session has none", hint="/save FILE.toml"
            )
        self._write(target)
        return target

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
        from npcchat import snapshot

        warning = snapshot.save(self.engine, target, runtime.snapshot_max_mb)
        if warning and self.on_warning:
            self.on_warning(warning)

    def resume_snapshot(self) -> bool:
        """Restore the KV snapshot saved with this session, when it matches the bundle."""
        if self.path is None or not self.engine.cfg.runtime.snapshots:
            return False
        from npcchat import snapshot

        restored, warning = snapshot.restore(self.engine, self.path)
        if warning and self.on_warning:
            self.on_warning(warning)
        return restored
