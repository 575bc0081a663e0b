"""Aligned KV sharing (eval): the grid prefill plan, the bookkeeping, and bit-identical
`<STATE>` vectors and replies whichever sequence a prompt head was copied from."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from npcchat.config import Config
from npcchat.runtime.engine import Engine, load_engine
from npcchat.runtime.kvbook import KvBook, Start
from npcchat.runtime.prefill import Chunk, plan_prefill
from npcchat.sessions.session import Session
from npcchat.types import SamplingParams, Tags

GREEDY = SamplingParams(temperature=0.0, top_p=1.0, repeat_penalty=1.05, max_tokens=10, seed=0)


# -- the grid plan ------------------------------------------------------------------------
def test_grid_plan_cuts_at_absolute_multiples() -> None:
    assert plan_prefill(150, [149], 512, start=0, grid=64) == [
        Chunk(0, 64, False),
        Chunk(64, 128, False),
        Chunk(128, 149, False),
        Chunk(149, 150, True),
    ]
    # from a shared prefix of 64: exactly the cold plan's calls after it
    assert (
        plan_prefill(150, [149], 512, start=64, grid=64)
        == plan_prefill(150, [149], 512, grid=64)[1:]
    )
    with pytest.raises(ValueError, match="exceeds the batch"):
        plan_prefill(10, [9], 32, grid=64)


def test_grid_plan_from_any_aligned_start_is_the_tail_of_the_cold_plan() -> None:
    rng = random.Random(7)
    for _ in range(500):
        n = rng.randrange(2, 700)
        outs = sorted({rng.randrange(0, n) for _ in range(rng.randrange(0, 4))} | {n - 1})
        grid = rng.choice([16, 64, 128])
        cold = plan_prefill(n, outs, 512, grid=grid)
        for c in cold:  # no plain call crosses a grid line
            assert c.embeddings or c.start // grid == (c.end - 1) // grid
        start = rng.randrange(0, outs[0] + 1) // grid * grid
        assert plan_prefill(n, outs, 512, start=start, grid=grid) == [
            c for c in cold if c.start >= start
        ]


# -- the bookkeeping ----------------------------------------------------------------------
def test_aligned_start_takes_the_longest_exact_grid_prefix_of_any_sequence() -> None:
    book = KvBook()
    head = list(range(1000, 1200))
    assert book.aligned_start(0, head, 190, 64) == Start(0, 0)  # nothing cached yet
    book.record(1, [*head[:150], 1, 2, 3], exact=150)
    book.record(2, head[:100], exact=100)
    assert book.aligned_start(0, head, 190, 64) == Start(1, 128)  # 150 shared -> 128
    assert book.aligned_start(0, head, 100, 64) == Start(1, 64)  # never past the first output
    book.record(0, head[:140], exact=140)
    assert book.aligned_start(0, head, 190, 64) == Start(0, 128)  # a tie: no copy
    book.record(1, head[:150], exact=40)  # a prefix decoded in other calls is not shared
    book.forget(0)
    assert book.aligned_start(0, head, 190, 64) == Start(2, 64)


def test_generated_tokens_and_unfinished_decodes_are_never_shared() -> None:
    book = KvBook()
    book.record(1, [5] * 64, exact=64)
    for _ in range(100):
        book.append(1, 5)  # one-token decodes: not grid calls
    assert book.aligned_start(0, [5] * 300, 299, 64) == Start(1, 64)
    assert book.prefix_start(1, [5] * 300, 299) == 164  # talk's prefix reuse may use them
    book.begin(1)  # a decode is under way: the cache is unknown
    assert book.aligned_start(0, [5] * 300, 299, 64) == Start(0, 0)


# -- on the tiny model ----------------------------------------------------------------------
def _session(i: int) -> Session:
    lore = "Ten years ago a fire closed the factory by the river. " * 6
    return Session(
        npc_id="mother",
        tags=Tags("in_progress", 0.3 + 0.1 * (i % 3), 0.4, location="map1"),
        lore=lore,
        description="She sits by the loom.",
        seed=1,
    )


def _turns(engine: Engine, order: list[int], reuse: str) -> dict[int, tuple[np.ndarray, str, int]]:
    """Scenario i as (head outputs, reply, prefill tokens), run two at a time in two slots."""
    out: dict[int, tuple[np.ndarray, str, int]] = {}
    for a, b in zip(order[::2], order[1::2], strict=True):
        ps = [
            engine.start(_session(i), f"Have you seen picture {i}?", GREEDY, seq=slot, reuse=reuse)  # type: ignore[arg-type]
            for slot, i in enumerate((a, b))
        ]
        going = list(ps)
        while going := [p for p in going if engine.accept(p)]:
            engine.advance(going)
        for i, p in zip((a, b), ps, strict=True):
            r = engine.finish(p)
            out[i] = (np.array(list(r.heads.deltas.values())), r.reply, r.prefill_tokens)
    return out


@pytest.mark.model
def test_aligned_sharing_is_bit_identical_to_cold_prefills(bundle_reuse: Path) -> None:
    with load_engine(bundle_reuse, Config(), n_seq=2) as engine:
        cold = _turns(engine, [0, 1, 2, 3, 4, 5], "off")
        engine.forget()
        shared = _turns(engine, [5, 3, 1, 0, 4, 2], "aligned")  # other order, other slots
    for i in range(6):
        assert np.array_equal(cold[i][0], shared[i][0]) and cold[i][1] == shared[i][1]
    assert all(cold[i][2] > shared[i][2] for i in (3, 1, 0, 4, 2))  # the head came from a cache
    assert shared[5][2] == cold[5][2]  # the very first one had nothing to share


@pytest.mark.model
def test_batched_steps_go_in_sequence_order_and_keep_each_turn_its_own(bundle_q4: Path) -> None:
    """Slots listed 2, 0, 1 are decoded as 0, 1, 2 (llama.cpp runs non-consecutive streams
    as separate decodes), and every turn still gets its own tokens."""
    with load_engine(bundle_q4, Config(), n_seq=3) as engine:
        alone = {}
        for i in range(3):
            engine.forget()
            alone[i] = engine.turn(_session(i), f"Have you seen picture {i}?", GREEDY).reply
        engine.forget()
        seen: list[list[int]] = []
        step_many = engine.model.step_many

        def spy(items: list[tuple[int, int, int]]) -> None:
            seen.append([seq for seq, _, _ in items])
            step_many(items)

        engine.model.step_many = spy  # type: ignore[method-assign]
        ps = {
            i: engine.start(_session(i), f"Have you seen picture {i}?", GREEDY, seq=i, reuse="off")
            for i in (2, 0, 1)
        }
        going = [ps[2], ps[0], ps[1]]
        while going := [p for p in going if engine.accept(p)]:
            engine.advance(going)
        assert seen and all(s == sorted(s) for s in seen)
        assert {i: engine.finish(p).reply for i, p in ps.items()} == alone


def test_prefix_reuse_may_start_from_another_sequences_cache() -> None:
    book = KvBook()
    book.record(0, [1, 2, 3, 4, 5, 6])
    book.record(1, [1, 2, 9])
    assert book.shared_start(1, [1, 2, 3, 4, 7], limit=10) == Start(0, 4)
    assert book.shared_start(1, [1, 2, 3, 4, 7], limit=3) == Start(0, 3)  # never past <STATE>
    assert book.shared_start(1, [1, 2, 9, 9], limit=10) == Start(1, 3)  # its own cache first
    book.record(1, [1, 2, 3, 4])
    assert book.shared_start(1, [1, 2, 3, 4, 7], limit=10) == Start(1, 4)  # a tie: no copy


@pytest.mark.model
def test_prefix_shared_from_another_slot_gives_the_cold_turn(bundle_reuse: Path) -> None:
    """A new conversation in slot 1 starts from slot 0's copy of the common head: same reply,
    same state change (within rounding), far fewer tokens decoded."""
    with load_engine(bundle_reuse, Config(), n_seq=2) as engine:
        cold = _turns(engine, [0, 1], "off")
        engine.forget()
        shared = _turns(engine, [0, 1], "prefix")
    for i in (0, 1):
        assert cold[i][1] == shared[i][1]
        assert np.allclose(cold[i][0], shared[i][0], atol=1e-3)
    assert shared[1][2] < cold[1][2]  # slot 1 decoded only what differs from slot 0
