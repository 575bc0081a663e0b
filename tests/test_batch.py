"""The batch loop: live feeds, cancellation."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import pytest

from npcchat.runtime import batch


def _immediate(value: int) -> batch.Driver[int]:
    """A driver that ends without asking for a turn (a forbidden trigger does this)."""
    return value
    yield  # a generator all the same


def test_live_feed_results_come_out_before_the_loop_waits() -> None:
    engine: Any = SimpleNamespace(
        model=SimpleNamespace(n_seq=2), forget=lambda seq=None: None, prefill_chunk=128
    )
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


@pytest.mark.model
def test_a_turn_cancelled_mid_generation_ends_its_driver_only(bundle_q4: Any) -> None:
    """Two turns side by side; one is cancelled from its own first piece: its driver gets
    TurnCancelled at the next step, the other turn runs to its end."""
    from npcchat.config import Config
    from npcchat.runtime.batch import TurnCancelled, TurnRequest
    from npcchat.runtime.engine import load_engine
    from npcchat.sessions.session import Session
    from npcchat.types import SamplingParams, Tags

    session = Session(npc_id="x", tags=Tags())
    greedy = SamplingParams(temperature=0.0, max_tokens=16, seed=0)
    cancel = threading.Event()
    outcome: dict[str, Any] = {}

    def driver(name: str, req: TurnRequest) -> batch.Driver[str]:
        try:
            turn = yield req
        except TurnCancelled:
            outcome[name] = "cancelled"
            return name
        outcome[name] = turn.generated_tokens
        return name

    doomed = TurnRequest(session, "hello", greedy, on_text=lambda _: cancel.set(), cancel=cancel)
    other = TurnRequest(session, "hello", greedy)
    with load_engine(bundle_q4, Config(), n_seq=2) as engine:
        done = list(batch.run(engine, [("a", driver("a", doomed)), ("b", driver("b", other))]))
    assert sorted(k for k, _ in done) == ["a", "b"]
    assert outcome["a"] == "cancelled" and isinstance(outcome["b"], int) and outcome["b"] >= 1
