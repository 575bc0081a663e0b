"""Turns of many conversations side by side on one engine, as they arrive.

A :class:`Scheduler` is one thread that owns the engine while it runs: it takes drivers
(see :mod:`npcchat.runtime.batch`) from any thread, starts each in a free sequence slot at
the next step (continuous batching: a new turn joins while others generate) and resolves
the caller's future when the driver ends. Beyond the slots, at most ``max_waiting`` turns
wait; one more is refused at once with :class:`BusyError`, so a server can answer 503
instead of letting latency grow without bound.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from npcchat.errors import BusyError, NpcchatError
from npcchat.runtime import batch
from npcchat.runtime.engine import Engine

log = logging.getLogger("npcchat")


@dataclass(frozen=True)
class Load:
    """What the scheduler holds right now."""

    slots: int
    running: int  # turns in a slot
    waiting: int  # turns queued for a slot
    max_waiting: int = 0  # more waiting turns are refused (BusyError)

    @property
    def full(self) -> bool:
        """Every slot taken and the waiting line at its bound: the next turn is refused."""
        return self.running >= self.slots and self.waiting >= self.max_waiting


class Scheduler:
    """Runs submitted drivers on ``engine`` in a thread of its own until :meth:`close`.

    ``lock`` (the runtime's) is held by the scheduler thread for its whole life, so
    nothing else decodes on the engine meanwhile.
    """

    def __init__(self, engine: Engine, lock: threading.Lock, max_waiting: int) -> None:
        self.engine = engine
        self.slots = engine.model.n_seq
        self.max_waiting = max_waiting
        self._lock = lock
        self._feed: batch.LiveFeed[int, Any] = batch.LiveFeed()
        self._futures: dict[int, Future[Any]] = {}
        self._ids = itertools.count()
        self._guard = threading.Lock()  # _futures and the counters
        self._ready = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="npcchat-scheduler", daemon=True)
        self._thread.start()
        self._ready.wait()

    @property
    def load(self) -> Load:
        with self._guard:
            return self._load()

    def _load(self) -> Load:
        """(The caller holds ``_guard``.)"""
        inflight = len(self._futures)
        running = min(inflight, self.slots)
        return Load(self.slots, running, inflight - running, self.max_waiting)

    def submit(self, driver: batch.Driver[Any], *, queue: bool = True) -> Future[Any]:
        """Run ``driver`` in the next free slot; its return value resolves the future.
        ``queue=False`` skips the waiting bound (a caller that submits a known batch)."""
        future: Future[Any] = Future()
        with self._guard:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            load = self._load()
            if queue and load.full:
                driver.close()
                raise BusyError(
                    f"all {self.slots} slots are busy and {load.waiting} turns are waiting"
                )
            key = next(self._ids)
            self._futures[key] = future
            self._feed.put(key, driver)
        return future

    def _run(self) -> None:
        with self._lock:
            self._ready.set()
            while True:
                try:
                    for key, result in batch.run(self.engine, self._feed):
                        if isinstance(result, NpcchatError):
                            self._resolve(key, error=result)
                        else:
                            self._resolve(key, result=result)
                    return  # the feed was closed and every driver has ended
                except Exception as e:
                    log.exception("npcchat scheduler: a batch failed")
                    self._fail_all(e)
                    time.sleep(0.01)

    def _fail_all(self, error: Exception) -> None:
        """A driver or the engine failed mid-batch: every turn in flight fails with it, and
        the ones still waiting are closed unrun (none of them may commit a turn whose
        caller was told it failed)."""
        with self._guard:
            old, self._feed = self._feed, batch.LiveFeed()
            failed = list(self._futures)
            if self._closed:
                self._feed.close()
        while (item := old.get(block=False)) is not None:
            item[1].close()
        for key in failed:
            self._resolve(key, error=error)

    def _resolve(self, key: int, result: Any = None, error: BaseException | None = None) -> None:
        with self._guard:
            future = self._futures.pop(key, None)
        if future is None:
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def close(self) -> None:
        """Finish the turns in flight, then stop; the engine is free again."""
        with self._guard:
            if self._closed:
                return
            self._closed = True
            self._feed.close()
        self._thread.join()
