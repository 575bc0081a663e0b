"""The batch loop with a live feed: results are handed out before it waits for more."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from npcchat.runtime import batch


def _immediate(value: int) -> batch.Driver[int]:
    """A driver that ends without asking for a turn (a forbidden trigger does this)."""
    return value
    yield  # a generator all the same


def test_live_feed_results_come_out_before_the_loop_waits() -> None:
    engine: Any = SimpleNamespace(model=SimpleNamespace(n_seq=2), forget=lambda seq=None: None)
    feed: batch.LiveFeed[int, int] = batch.LiveFeed()
    seen: list[tuple[int, int]] = []
    got_three = threading.Event()

    def consume() -> None:
        for item in batch.run(engine, feed):
            seen.append(item)
            if len(seen) == 3:
                got_three.set()

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    for i in range(3):
        feed.put(i, _immediate(i * 10))
    assert got_three.wait(5), f"results held back while the loop waited: {seen}"
    feed.close()
    worker.join(5)
    assert not worker.is_alive()
    assert sorted(seen) == [(0, 0), (1, 10), (2, 20)]
