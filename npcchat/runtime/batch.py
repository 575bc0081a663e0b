"""Run many conversations side by side in one llama.cpp context (continuous batching).

Each conversation is a *driver*: a generator that yields turn requests and receives each
turn's result, so multi-turn scenarios can build on their own replies. Up to
``model.n_seq`` drivers hold a sequence slot each. Every turn still gets its own prefill,
cut as a sequential run cuts it (see :mod:`npcchat.runtime.prefill`), so its `<STATE>`
vector and reply are the ones a sequential run computes; what is shared is the generation:
one batched step for all slots, which reads the weights once for all of them (in calls of
at most 7 sequences on a CPU build, see :meth:`Engine.advance`).

A joining turn's prompt does not stall the others: each step runs prompt calls of the
joining turns, oldest first, up to ``runtime.prefill_chunk`` tokens in all (at least one
call; one call holds at most that many), then the step of every running reply. A running
reply therefore waits for at most one chunk's worth of prompt between two tokens, however
long the prompts that join, while short joins (a prompt whose head another slot already
decoded) still go several to a step. A prompt is planned at its first call, so a turn that
waited starts from what the turns before it decoded. The prompt calls and the step stay
separate llama_decode calls: with one KV stream per sequence, llama.cpp would cut a mixed
call into the same micro-batches anyway, except that the chunk's first token would be
computed among the other sequences' tokens, which moves its hidden state by rounding
(measured).

Drivers come from a plain iterable (eval: every scenario is known up front) or a
:class:`LiveFeed` that a server fills while turns run (a new turn joins the batch at the
next step, and the loop sleeps when nothing is waiting or running).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from npcchat.errors import NpcchatError
from npcchat.runtime.engine import Engine, Guide, Pending
from npcchat.runtime.kvbook import Reuse
from npcchat.sessions.session import Session
from npcchat.types import ContextTurn, SamplingParams, Turn

K = TypeVar("K")
R = TypeVar("R")


class TurnCancelled(NpcchatError):
    """Thrown into a driver whose request was cancelled (its client went away)."""


@dataclass(frozen=True)
class TurnRequest:
    session: Session
    player: str
    sampling: SamplingParams
    context: tuple[ContextTurn, ...] = ()  # extra history before the session's own
    pinned: tuple[ContextTurn, ...] = ()  # recalled memories, never dropped
    reuse: Reuse | None = None  # KV reuse for this turn (None: the engine's setting)
    on_text: Callable[[str], None] | None = None  # each reply piece, as it is generated
    cancel: threading.Event | None = None  # set it to abandon the turn at the next step
    affinity: str = ""  # turns with the same affinity prefer the slot that ran the last one
    guide: Guide | None = None  # decides on the heads before generating (the NPC's rules)


Driver = Generator[TurnRequest, Turn, R]


class IterFeed(Generic[K, R]):
    """Drivers known up front. ``get`` never waits; :attr:`closed` once exhausted."""

    def __init__(self, drivers: Iterable[tuple[K, Driver[R]]]) -> None:
        self._it = iter(drivers)
        self._done = False

    @property
    def closed(self) -> bool:
        return self._done

    def get(self, block: bool) -> tuple[K, Driver[R]] | None:
        item = next(self._it, None)
        self._done = item is None
        return item


class LiveFeed(Generic[K, R]):
    """Drivers that other threads add while the batch runs. ``get(block=True)`` waits for
    one (the batch does that only when no turn is running); None after :meth:`close`."""

    _STOP = object()

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, key: K, driver: Driver[R]) -> None:
        self._queue.put((key, driver))

    def close(self) -> None:
        """No more drivers: the batch ends when the running ones have."""
        self._queue.put(self._STOP)

    def get(self, block: bool) -> tuple[K, Driver[R]] | None:
        try:
            item = self._queue.get(block=block)
        except queue.Empty:
            return None
        if item is self._STOP:
            self._closed = True
            return None
        return item  # type: ignore[return-value]


@dataclass
class _Slot(Generic[K, R]):
    key: K
    driver: Driver[R]
    request: TurnRequest | None = None
    pending: Pending | None = None
    order: int = 0  # when its turn began: joining prompts are decoded oldest first


def run(
    engine: Engine, drivers: Iterable[tuple[K, Driver[R]]] | LiveFeed[K, R]
) -> Iterator[tuple[K, R | NpcchatError]]:
    """Drive every conversation to its end; yields ``(key, driver's return value)`` as
    each one finishes (completion order, not input order).

    A request that fails with an NpcchatError (a prompt that cannot fit, say) or is
    cancelled (:class:`TurnCancelled`) is thrown into its driver, which may record it and
    return; a driver that lets it propagate ends with it (yielded in place of a value),
    and the other drivers go on.
    """
    feed = drivers if isinstance(drivers, LiveFeed) else IterFeed(drivers)
    # a server's replies stream to players: prompts go in a chunk's worth at a time between
    # their steps; a batch known up front (eval) has no one waiting on a reply, and decoding
    # the prompts first keeps more sequences in each step
    budget = engine.prefill_chunk if isinstance(feed, LiveFeed) else 0
    try:
        yield from _Batch(engine, feed, budget).loop()
    except BaseException:
        engine.forget()  # KV caches of interrupted turns are in an unknown state
        raise


class _Batch(Generic[K, R]):
    def __init__(
        self, engine: Engine, feed: IterFeed[K, R] | LiveFeed[K, R], budget: int = 0
    ) -> None:
        self.engine = engine
        self.feed = feed
        self.budget = budget  # prompt tokens a step (0: every joining prompt, whole)
        self.slots: dict[int, _Slot[K, R]] = {}
        self.free = list(range(engine.model.n_seq - 1, -1, -1))
        self.finished: list[tuple[K, R | NpcchatError]] = []
        self.affinity: dict[int, str] = {}  # the affinity of the last turn each slot ran
        self.begun = 0  # turns begun so far (their order)

    def loop(self) -> Iterator[tuple[K, R | NpcchatError]]:
        """Fill free slots, then one step for every active turn; wait when idle."""
        while True:
            while self.free and not self.feed.closed:
                # wait only when nothing runs and nothing finished is left to hand out
                item = self.feed.get(block=not self.slots and not self.finished)
                if item is None:
                    break
                self._admit(*item)
            yield from self.finished
            self.finished.clear()
            if not self.slots:
                if self.feed.closed:
                    return
                continue
            self._step()

    def _admit(self, key: K, driver: Driver[R]) -> None:
        """Take a new driver: its first request decides the slot (affinity first)."""
        try:
            req = next(driver)
        except StopIteration as stop:
            self.finished.append((key, stop.value))
            return
        except NpcchatError as e:
            self.finished.append((key, e))
            return
        want = req.affinity
        seq = next((s for s in self.free if want and self.affinity.get(s) == want), None)
        if seq is None:
            seq = self.free[-1]
        self.free.remove(seq)
        self.slots[seq] = slot = _Slot(key, driver)
        self._start(seq, slot, req)

    def _start(self, seq: int, slot: _Slot[K, R], req: TurnRequest) -> None:
        """Begin ``req`` in ``seq`` (its prompt is decoded by the steps that follow); a
        request that cannot begin goes back to its driver."""
        while True:
            try:
                if req.cancel is not None and req.cancel.is_set():
                    raise TurnCancelled("the turn was cancelled before it started")
                slot.request = req
                self.affinity[seq] = req.affinity
                self.begun += 1
                slot.order = self.begun
                slot.pending = self.engine.begin(
                    req.session,
                    req.player,
                    req.sampling,
                    req.on_text,
                    seq=seq,
                    context=req.context,
                    pinned=req.pinned,
                    reuse=req.reuse,
                    guide=req.guide,
                )
                return
            except NpcchatError as e:
                next_req = self._send(seq, slot, e)
            if next_req is None:
                return
            req = next_req

    def _send(self, seq: int, slot: _Slot[K, R], value: Turn | NpcchatError) -> TurnRequest | None:
        """The driver's answer to a result (or an error): its next request, or None when
        it has ended (its slot is free again)."""
        try:
            if isinstance(value, NpcchatError):
                return slot.driver.throw(value)
            return slot.driver.send(value)
        except StopIteration as stop:
            self.finished.append((slot.key, stop.value))
        except NpcchatError as e:
            self.finished.append((slot.key, e))
        del self.slots[seq]
        self.free.append(seq)
        return None

    def _step(self) -> None:
        """Prompt calls of joining turns (oldest first) up to one chunk's worth of tokens,
        then one token for every running reply (a reply that ends hands its driver's next
        request a fresh start)."""
        going: list[Pending] = []
        for seq, slot in list(self.slots.items()):
            p, req = slot.pending, slot.request
            assert p is not None and req is not None
            if req.cancel is not None and req.cancel.is_set():
                self.engine.forget(seq)  # a half-decoded prompt or reply is not a prompt
                slot.pending = None
                self._next(seq, slot, TurnCancelled("the turn was cancelled"))
            elif p.ready:
                self._go(seq, slot, p, going)
        spent = 0
        while (joining := self._oldest_joining()) is not None:
            seq, slot = joining
            p = slot.pending
            assert p is not None
            try:
                size = self.engine.next_call(p)
                if self.budget and spent and spent + size > self.budget:
                    break  # the rest waits for the next step: the replies go first
                spent += size
                ready = self.engine.prefill(p)
            except NpcchatError as e:
                self.engine.forget(seq)
                slot.pending = None
                self._next(seq, slot, e)
                continue
            if ready:
                self._go(seq, slot, p, going)
        if going:
            self.engine.advance(going)

    def _oldest_joining(self) -> tuple[int, _Slot[K, R]] | None:
        """The slot whose turn began first among those still decoding their prompt."""
        joining = [
            (slot.order, seq)
            for seq, slot in self.slots.items()
            if slot.pending is not None and not slot.pending.ready
        ]
        if not joining:
            return None
        seq = min(joining)[1]
        return seq, self.slots[seq]

    def _go(self, seq: int, slot: _Slot[K, R], p: Pending, going: list[Pending]) -> None:
        """``p``'s drawn token: into this step's batch, or the end of its turn."""
        if self.engine.accept(p):
            going.append(p)
        else:
            slot.pending = None
            self._next(seq, slot, self.engine.finish(p))

    def _next(self, seq: int, slot: _Slot[K, R], value: Turn | NpcchatError) -> None:
        """Hand ``value`` to the driver and begin its next request, if it has one."""
        after = self._send(seq, slot, value)
        if after is not None:
            self._start(seq, slot, after)
