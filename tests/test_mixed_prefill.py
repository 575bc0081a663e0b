"""Prefill that does not stall the batch (issue 24): a joining turn's prompt is decoded one
chunk per step between the running replies' steps, and every turn is still the solo turn,
bit for bit."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from npcchat.config import Config, RuntimeConfig
from npcchat.runtime import batch
from npcchat.runtime.engine import Engine, load_engine
from npcchat.runtime.prefill import Chunk, plan_prefill
from npcchat.sessions.session import Session
from npcchat.types import SamplingParams, Tags, Turn

LINES = [
    ("Hello there. Have you seen anything strange around the harbour?", "What of the bell?"),
    ("안녕하세요, 등대지기님. 어젯밤에 불빛을 보셨나요?", "배는 어디로 갔나요?"),
    ("I found a broken compass on the beach.", "Does it point anywhere?"),
    ("Tell me about the ship that sank last winter.", "Who was aboard?"),
    ("I need a way into the old lighthouse.", "Is there a key?"),
    ("The fishermen talk about lights on the reef.", "Should I go there at night?"),
    ("Good morning! Any work for a traveller?", "How much does it pay?"),
    ("Why is the chapel bell ringing?", "Who rings it?"),
]
SAMPLING = SamplingParams(temperature=0.8, top_k=40, top_p=0.95, max_tokens=10, seed=7)


def test_plain_runs_are_cut_in_near_equal_pieces_never_a_short_tail() -> None:
    chunks = plan_prefill(130, [122, 129], 48)
    plain = [c.end - c.start for c in chunks if not c.embeddings]
    assert plain == [40, 41, 41]  # not 48 + 48 + 26
    assert chunks[-1] == Chunk(122, 130, True)
    assert [c.end - c.start for c in plan_prefill(131, [130], 65)] == [65, 65, 1]  # not 129 + 1
    for n in range(1, 400):
        sizes = [c.end - c.start for c in plan_prefill(n + 1, [n], 48) if not c.embeddings]
        assert sum(sizes) == n and max(sizes, default=0) <= 48
        assert max(sizes, default=0) - min(sizes, default=0) <= 1


def _session(i: int) -> Session:
    return Session(npc_id=f"npc{i}", tags=Tags(), lore=f"Lore of harbour {i}. " * (2 + i), seed=i)


def _conversation(i: int, reuse: str) -> batch.Driver[list[Turn]]:
    session = _session(i)
    turns = []
    for line in LINES[i]:
        turn = yield batch.TurnRequest(session, line, SAMPLING, reuse=reuse)  # type: ignore[arg-type]
        turns.append(turn)
        session = session.with_turn(turn)
    return turns


class _Record:
    """What the engine computed: each prompt's `<STATE>` vector, and the order of decode
    calls (an int: a prompt call of that many tokens; a set: one step of those sequences'
    replies; ``(F, seq)``: that sequence's turn finished)."""

    def __init__(self, engine: Engine) -> None:
        self.vectors: dict[tuple[int, ...], np.ndarray] = {}
        self.calls: list[Any] = []
        prefilled, advance, chunk = engine.prefilled, engine.advance, engine.model.prefill_chunk
        finish = engine.finish

        def spy_prefilled(job: Any) -> np.ndarray:
            vec = prefilled(job)
            self.vectors[job.tokens] = vec
            return vec

        def spy_advance(going: list[Any]) -> None:
            self.calls.append(frozenset(p.seq for p in going))
            advance(going)

        def spy_chunk(tokens: Any, c: Chunk, *args: Any) -> Any:
            self.calls.append(c.end - c.start)
            return chunk(tokens, c, *args)

        def spy_finish(p: Any) -> Turn:
            self.calls.append(("F", p.seq))
            return finish(p)

        engine.finish = spy_finish  # type: ignore[method-assign]
        engine.prefilled = spy_prefilled  # type: ignore[method-assign]
        engine.advance = spy_advance  # type: ignore[method-assign]
        engine.model.prefill_chunk = spy_chunk  # type: ignore[method-assign]


class _AtSteps(batch.LiveFeed[int, list[Turn]]):
    """Hands each driver out once the batch has run ``at`` reply steps (or at once when
    nothing runs, so the loop never waits for a step that cannot come)."""

    def __init__(self, record: _Record, schedule: list[tuple[int, int]], reuse: str) -> None:
        super().__init__()
        self.record = record
        self.todo = sorted(schedule)
        self.reuse = reuse

    def get(self, block: bool) -> tuple[int, batch.Driver[list[Turn]]] | None:
        if not self.todo:
            self._closed = True
            return None
        steps = sum(1 for c in self.record.calls if isinstance(c, frozenset))
        at, i = self.todo[0]
        if at > steps and not block:
            return None
        self.todo.pop(0)
        return i, _conversation(i, self.reuse)


@pytest.mark.model
@pytest.mark.parametrize(("seed", "reuse"), [(1, "off"), (2, "off"), (3, "aligned")])
def test_eight_turns_joining_at_random_steps_equal_solo_turns(
    bundle_q4: Path, seed: int, reuse: str
) -> None:
    """8 two-turn conversations join a running batch at random steps; their prompts (cut
    in 16-token chunks, so most take several steps) are decoded between the replies'
    steps. Every reply, state change, flag probability and `<STATE>` vector equals the one
    the same conversation gives alone, bit for bit; no running reply ever waits for more
    than one chunk's worth of prompt (16 tokens, or one call) between two of its tokens."""
    cfg = Config(runtime=RuntimeConfig(prefill_chunk=16))
    with load_engine(bundle_q4, cfg, n_seq=1) as engine:
        solo_record = _Record(engine)
        solo = {}
        for i in range(8):
            engine.forget()
            solo[i] = next(v for _, v in batch.run(engine, [(i, _conversation(i, reuse))]))
    rng = random.Random(seed)
    schedule = [(rng.randrange(0, 40), i) for i in range(8)]
    with load_engine(bundle_q4, cfg, n_seq=8) as engine:
        record = _Record(engine)
        together = dict(batch.run(engine, _AtSteps(record, schedule, reuse)))

    for i in range(8):
        got, want = together[i], solo[i]
        assert not isinstance(got, Exception) and not isinstance(want, Exception)
        for a, b in zip(got, want, strict=True):
            assert a.reply == b.reply
            assert a.heads.deltas == b.heads.deltas
            assert {n: f.prob for n, f in a.heads.flags.items()} == {
                n: f.prob for n, f in b.heads.flags.items()
            }
            assert (a.prompt_tokens, a.generated_tokens) == (b.prompt_tokens, b.generated_tokens)
            if a.generated_tokens > 1:  # the longest wait between two tokens is reported
                assert 0 < a.timings.stall_ms <= a.timings.generate_ms
    assert record.vectors.keys() == solo_record.vectors.keys()
    for tokens, vec in record.vectors.items():
        assert np.array_equal(vec, solo_record.vectors[tokens])

    # a running reply waits for at most one chunk's worth of prompt between two tokens ...
    waited: dict[int, list[int]] = {}  # running replies: prompt calls since their last step
    interleaved = 0
    for call in record.calls:
        if isinstance(call, int):
            for seq in waited:
                waited[seq].append(call)
        elif isinstance(call, tuple):  # its turn finished: not running any more
            waited.pop(call[1], None)
        else:
            for seq in call:
                calls = waited.get(seq, [])
                assert len(calls) <= 1 or sum(calls) <= 16, f"a reply waited for {calls}"
                interleaved += len(calls)
                waited[seq] = []
    # ... and prompts really were decoded while replies ran
    assert interleaved >= 4
    if reuse == "off":  # the same calls, only in another order
        assert sorted(c for c in record.calls if isinstance(c, int)) == sorted(
            c for c in solo_record.calls if isinstance(c, int)
        )


@pytest.mark.model
def test_the_chunk_size_changes_the_calls_not_the_turn(bundle_q4: Path) -> None:
    """The chunk size decides the calls, alone or batched: a prompt of ~100 tokens at a
    16-token chunk takes several calls, and the turn equals the one a 512-token call
    would give on this CPU build (the kernels round the same for calls of 8 tokens or
    more)."""
    session = _session(3)
    results = []
    for chunk in (16, 512):
        cfg = Config(runtime=RuntimeConfig(prefill_chunk=chunk))
        with load_engine(bundle_q4, cfg) as engine:
            calls: list[int] = []
            real = engine.model.prefill_chunk

            def spy(tokens: Any, c: Chunk, *a: Any, calls: Any = calls, real: Any = real) -> Any:
                calls.append(c.end - c.start)
                return real(tokens, c, *a)

            engine.model.prefill_chunk = spy  # type: ignore[method-assign]
            turn = engine.turn(session, LINES[3][0], replace(SAMPLING, max_tokens=6))
            results.append((turn, calls))
    (small, small_calls), (big, big_calls) = results
    assert len(small_calls) > len(big_calls) and max(small_calls[:-1]) <= 16
    assert small.reply == big.reply and small.heads.deltas == big.heads.deltas


@pytest.mark.model
def test_a_turn_that_waited_starts_from_what_the_turn_before_it_decoded(bundle_q4: Path) -> None:
    """Two players say the same line to the same NPC at once: the second turn's prompt is
    planned when its first call runs, after the first turn's, so it copies that prompt
    from the other slot and decodes only what follows `<STATE>`'s prefix."""
    with load_engine(bundle_q4, Config(), n_seq=2) as engine:

        def one(i: int) -> batch.Driver[Turn]:
            return (yield batch.TurnRequest(_session(0), LINES[0][0], SAMPLING))

        done = dict(batch.run(engine, [(0, one(0)), (1, one(1))]))
    first, second = done[0], done[1]
    assert isinstance(first, Turn) and isinstance(second, Turn)
    assert second.prefill_tokens < first.prefill_tokens // 4
    assert (second.reply, second.heads.deltas) == (first.reply, first.heads.deltas)
