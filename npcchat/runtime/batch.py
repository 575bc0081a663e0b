"""Run many conversations side by side in one llama.cpp context.

Each conversation is a *driver*: a generator that yields turn requests and receives each
turn's result, so multi-turn scenarios can build on their own replies. Up to
``model.n_seq`` drivers hold a sequence slot each. Every turn still gets its own single
prefill (so its `<STATE>` vector is the one a sequential run computes); what is shared is
the generation: one batched decode per step for all slots, which reads the weights once
for all of them. On a memory-bound CPU that is most of a turn's cost.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from npcchat.errors import NpcchatError
from npcchat.runtime.engine import Engine, Pending
from npcchat.runtime.kvbook import Reuse
from npcchat.sessions.session import Session
from npcchat.types import ContextTurn, SamplingParams, Turn

K = TypeVar("K")
R = TypeVar("R")


@dataclass(frozen=True)
class TurnRequest:
    session: Session
    player: str
    sampling: SamplingParams
    context: tuple[ContextTurn, ...] = ()  # extra history before the session's own
    reuse: Reuse | None = None  # KV reuse for this turn (None: the engine's setting)


Driver = Generator[TurnRequest, Turn, R]


@dataclass
class _Slot(Generic[K, R]):
    key: K
    driver: Driver[R]
    pending: Pending | None = None


def run(engine: Engine, drivers: Iterable[tuple[K, Driver[R]]]) -> Iterator[tuple[K, R]]:
    """Drive every conversation to its end; yields ``(key, driver's return value)`` as
    each one finishes (completion order, not input order).

    A request that fails with an NpcchatError (a prompt that cannot fit, say) is thrown
    into its driver, which may record it and return or let it propagate.
    """
    n_slots = engine.model.n_seq
    queue = iter(drivers)
    slots: dict[int, _Slot[K, R]] = {}
    free = list(range(n_slots - 1, -1, -1))
    finished: list[tuple[K, R]] = []

    def next_request(seq: int, slot: _Slot[K, R], send: Turn | NpcchatError | None) -> None:
        """Get the driver's next request and start it, until one starts or it ends."""
        while True:
            try:
                if isinstance(send, NpcchatError):
                    req = slot.driver.throw(send)
                else:
                    req = slot.driver.send(send) if send is not None else next(slot.driver)
            except StopIteration as stop:
                finished.append((slot.key, stop.value))
                del slots[seq]
                free.append(seq)
                return
            try:
                slot.pending = engine.start(
                    req.session,
                    req.player,
                    req.sampling,
                    seq=seq,
                    context=req.context,
                    reuse=req.reuse,
                )
                return
            except NpcchatError as e:
                send = e

    try:
        yield from _loop(engine, queue, slots, free, finished, next_request)
    except BaseException:
        engine.forget()  # KV caches of interrupted turns are in an unknown state
        raise


def _loop(
    engine: Engine, queue: Any, slots: Any, free: list[int], finished: list[Any], next_request: Any
) -> Iterator[Any]:
    """Fill free slots, then one step for every active turn, until all drivers end."""
    while True:
        while free and (item := next(queue, None)) is not None:
            seq = free.pop()
            slots[seq] = _Slot(item[0], item[1])
            next_request(seq, slots[seq], None)
        yield from finished
        finished.clear()
        if not slots:
            return
        going: list[tuple[int, Pending]] = []
        for seq, slot in list(slots.items()):
            p = slot.pending
            assert p is not None
            if engine.accept(p):
                going.append((seq, p))
            else:
                slot.pending = None
                next_request(seq, slot, engine.finish(p))
        if going:
            engine.advance([p for _, p in going])
