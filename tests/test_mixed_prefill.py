"""Prefill that does not stall the batch (issue 24): a joining turn's prompt is decoded a
chunk's worth per step between the running replies' steps, and every turn is still the
solo turn, bit for bit."""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from npcchat.config import Config, RuntimeConfig
from npcchat.errors import NpcchatError
from npcchat.runtime import batch
from npcchat.runtime.engine import Engine, Guided, load_engine
from npcchat.runtime.prefill import MIN_CALL, Chunk, plan_prefill, widened
from npcchat.sessions.session import Session
from npcchat.types import HeadsOutput, SamplingParams, Tags, Turn

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
CHUNK = 16


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


def test_a_run_after_a_reused_prefix_is_never_a_short_call() -> None:
    assert widened(100, 103) == 103 - MIN_CALL  # 3 tokens: start 5 earlier
    assert widened(100, 108) == 100 and widened(100, 100) == 100
    assert widened(0, 3) == 0 and widened(2, 5) == 0


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
    calls: an int is a prompt call of that many tokens, a set one step of those sequences'
    replies, ``("R", seq)`` that sequence's prompt done (its reply runs from here) and
    ``("F", seq)`` its turn over (finished, or forgotten when cancelled or failed)."""

    def __init__(self, engine: Engine) -> None:
        self.vectors: dict[tuple[int, ...], np.ndarray] = {}
        self.calls: list[Any] = []
        prefilled, advance, chunk = engine.prefilled, engine.advance, engine.model.prefill_chunk
        prefill, finish, forget = engine.prefill, engine.finish, engine.forget

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

        def spy_prefill(p: Any) -> bool:
            ready = prefill(p)
            if ready:
                self.calls.append(("R", p.seq))
            return ready

        def spy_finish(p: Any) -> Turn:
            self.calls.append(("F", p.seq))
            return finish(p)

        def spy_forget(seq: int | None = None) -> None:
            self.calls.append(("F", seq))
            forget(seq)

        engine.prefilled = spy_prefilled  # type: ignore[method-assign]
        engine.advance = spy_advance  # type: ignore[method-assign]
        engine.model.prefill_chunk = spy_chunk  # type: ignore[method-assign]
        engine.prefill = spy_prefill  # type: ignore[method-assign]
        engine.finish = spy_finish  # type: ignore[method-assign]
        engine.forget = spy_forget  # type: ignore[method-assign]

    @property
    def steps(self) -> int:
        return sum(1 for c in self.calls if isinstance(c, frozenset))

    def check_waits(self, budget: int) -> int:
        """Assert that no running reply waited, between two of its tokens, for more than
        ``budget`` tokens of prompt calls (or one call); return how many prompt calls ran
        while some reply was running."""
        waited: dict[int, list[int]] = {}  # running replies: prompt calls since their token
        interleaved = 0
        for call in self.calls:
            if isinstance(call, int):
                for calls in waited.values():
                    calls.append(call)
                interleaved += bool(waited)
            elif isinstance(call, tuple) and call[0] == "R":
                waited[call[1]] = []
            elif isinstance(call, tuple):
                if call[1] is None:
                    waited.clear()
                waited.pop(call[1], None)
            else:
                for seq in call:
                    calls = waited.get(seq, [])
                    assert len(calls) <= 1 or sum(calls) <= budget, f"a reply waited {calls}"
                    waited[seq] = []
        return interleaved


class _AtSteps(batch.LiveFeed[int, Any]):
    """Hands each driver out once the batch has run ``at`` reply steps (or at once when
    nothing runs, so the loop never waits for a step that cannot come)."""

    def __init__(
        self,
        record: _Record,
        schedule: list[tuple[int, int]],
        make: Callable[[int], batch.Driver[Any]],
    ) -> None:
        super().__init__()
        self.record = record
        self.todo = sorted(schedule)
        self.make = make

    def get(self, block: bool) -> tuple[int, batch.Driver[Any]] | None:
        if not self.todo:
            self._closed = True
            return None
        at, i = self.todo[0]
        if at > self.record.steps and not block:
            return None
        self.todo.pop(0)
        return i, self.make(i)


def _same_turn(a: Turn, b: Turn) -> None:
    assert a.reply == b.reply
    assert a.heads.deltas == b.heads.deltas
    assert {n: f.prob for n, f in a.heads.flags.items()} == {
        n: f.prob for n, f in b.heads.flags.items()
    }
    assert (a.prompt_tokens, a.generated_tokens) == (b.prompt_tokens, b.generated_tokens)


@pytest.mark.model
@pytest.mark.parametrize(
    ("seed", "reuse"), [(1, "off"), (2, "off"), (3, "aligned"), (4, "prefix"), (5, "prefix")]
)
def test_eight_turns_joining_at_random_steps_equal_solo_turns(
    bundle_q4: Path, seed: int, reuse: str
) -> None:
    """8 two-turn conversations join a running batch at random steps; their prompts (cut
    in 16-token chunks, so most take several steps) are decoded between the replies'
    steps. Every reply, state change, flag probability and `<STATE>` vector equals the one
    the same conversation gives alone, bit for bit, with prefix reuse too (a prompt then
    starts after whatever another slot held); no running reply ever waits for more than
    one chunk's worth of prompt (16 tokens, or one call) between two of its tokens."""
    cfg = Config(runtime=RuntimeConfig(prefill_chunk=CHUNK))
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
        feed = _AtSteps(record, schedule, lambda i: _conversation(i, reuse))
        together = dict(batch.run(engine, feed))

    for i in range(8):
        got, want = together[i], solo[i]
        assert not isinstance(got, Exception) and not isinstance(want, Exception)
        for a, b in zip(got, want, strict=True):
            _same_turn(a, b)
            if a.generated_tokens > 1:  # the longest wait between two tokens is reported
                assert 0 < a.timings.stall_ms <= a.timings.generate_ms
    assert record.vectors.keys() == solo_record.vectors.keys()
    for tokens, vec in record.vectors.items():
        assert np.array_equal(vec, solo_record.vectors[tokens])
    assert record.check_waits(CHUNK) >= 4  # and prompts really ran while replies streamed
    if reuse == "off":  # the same calls, only in another order
        assert sorted(c for c in record.calls if isinstance(c, int)) == sorted(
            c for c in solo_record.calls if isinstance(c, int)
        )


class _Boom(NpcchatError):
    """A guide that fails (a rule that raises)."""


def _guide(kind: str, npc: int) -> Callable[[HeadsOutput], Guided | None] | None:
    def guide(heads: HeadsOutput) -> Guided | None:
        if kind == "fixed":
            return Guided(reply="Go away.")
        if kind == "retag":  # the reply comes from a second prompt with other tags
            return Guided(session=replace(_npc(npc), tags=Tags(quest_stage="angry", trust=0.2)))
        raise _Boom("the rule failed")

    return None if kind == "none" else guide


def _npc(npc: int) -> Session:
    return Session(npc_id=f"npc{npc}", tags=Tags(), lore=f"Shared lore of {npc}. " * 8, seed=npc)


@pytest.mark.model
@pytest.mark.parametrize(("seed", "reuse"), [(11, "prefix"), (12, "prefix"), (13, "off")])
def test_cancelled_failed_and_guided_turns_amid_joins_leave_every_other_turn_solo(
    bundle_q4: Path, seed: int, reuse: str
) -> None:
    """10 conversations of 1-3 turns with three NPCs (so slots share prompt heads) join at
    random steps; some turns are cancelled mid-prompt or mid-reply (and asked again),
    some guides fix the reply, re-prompt with other tags or raise. Every turn that ends
    equals the same conversation run alone, and the waits stay within a chunk."""
    rng = random.Random(seed)
    lines = ["Hello there.", "Have you seen the ship?", "Hi", "Who?", "Is there a key?"]
    kinds = ["none", "none", "fixed", "retag", "boom"]
    plans = [
        (rng.randrange(3), [(rng.choice(lines), rng.choice(kinds), rng.randrange(3, 12))
                            for _ in range(rng.randrange(1, 4))])
        for _ in range(10)
    ]  # fmt: skip
    cancels = {
        (i, k): threading.Event()
        for i, (_, turns) in enumerate(plans)
        for k in range(len(turns))
        if rng.random() < 0.3
    }
    countdown = {ev: rng.randrange(1, 30) for ev in cancels.values()}
    armed: set[threading.Event] = set()

    def conversation(i: int, solo: bool) -> batch.Driver[list[Turn | str]]:
        npc, turns = plans[i]
        session, out = _npc(npc), []
        for k, (line, kind, max_tokens) in enumerate(turns):
            sampling = replace(SAMPLING, max_tokens=max_tokens, seed=100 * i + k)
            cancel = None if solo else cancels.get((i, k))
            while True:
                if cancel is not None:
                    armed.add(cancel)
                req = batch.TurnRequest(
                    session, line, sampling, reuse=reuse, guide=_guide(kind, npc), cancel=cancel
                )  # type: ignore[arg-type]
                try:
                    turn = yield req
                except batch.TurnCancelled:
                    cancel = None  # the player asks again
                    continue
                except _Boom:
                    out.append("boom")
                    break
                out.append(turn)
                session = session.with_turn(turn)
                break
        return out

    cfg = Config(runtime=RuntimeConfig(prefill_chunk=CHUNK))
    with load_engine(bundle_q4, cfg, n_seq=4) as engine:
        record = _Record(engine)
        step = engine.model.prefill_chunk

        def tick(*args: Any) -> Any:  # cancellations fire a few decode calls after arming
            for ev in armed:
                countdown[ev] -= 1
                if countdown[ev] <= 0:
                    ev.set()
            return step(*args)

        engine.model.prefill_chunk = tick  # type: ignore[method-assign]
        schedule = [(rng.randrange(0, 60), i) for i in range(10)]
        together = dict(
            batch.run(engine, _AtSteps(record, schedule, lambda i: conversation(i, False)))
        )
    assert any(ev.is_set() for ev in cancels.values())
    record.check_waits(CHUNK)
    for i in range(10):
        with load_engine(bundle_q4, cfg, n_seq=1) as engine:
            ((_, alone),) = batch.run(engine, [(i, conversation(i, True))])
        got = together[i]
        assert isinstance(got, list) and isinstance(alone, list) and len(got) == len(alone)
        for a, b in zip(got, alone, strict=True):
            if isinstance(a, str) or isinstance(b, str):
                assert a == b
            else:
                _same_turn(a, b)


@pytest.mark.model
def test_the_chunk_size_changes_the_calls_not_the_turn(bundle_q4: Path) -> None:
    """The chunk size decides the calls, alone or batched: a prompt of ~100 tokens at a
    16-token chunk takes several calls, and the turn equals the one a 512-token call
    gives. This is a property of llama.cpp's CPU kernels (the same bits for calls of 8
    tokens or more) that prefix reuse relies on: a build that breaks it fails here."""
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
    from the other slot and decodes only the last few tokens."""
    with load_engine(bundle_q4, Config(), n_seq=2) as engine:

        def one(i: int) -> batch.Driver[Turn]:
            return (yield batch.TurnRequest(_session(0), LINES[0][0], SAMPLING))

        done = dict(batch.run(engine, batch_feed([(0, one(0)), (1, one(1))])))
    first, second = done[0], done[1]
    assert isinstance(first, Turn) and isinstance(second, Turn)
    assert second.prefill_tokens <= MIN_CALL + 8 < first.prefill_tokens
    assert (second.reply, second.heads.deltas) == (first.reply, first.heads.deltas)


def batch_feed(items: list[tuple[int, batch.Driver[Any]]]) -> batch.LiveFeed[int, Any]:
    """A live feed (a server's) holding ``items``, closed behind them."""
    feed: batch.LiveFeed[int, Any] = batch.LiveFeed()
    for key, driver in items:
        feed.put(key, driver)
    feed.close()
    return feed


@pytest.mark.model
def test_a_batch_known_up_front_decodes_its_prompts_before_the_replies(bundle_q4: Path) -> None:
    """eval's batches (every driver known up front) have no player waiting on a reply:
    their prompts are decoded whole before the step, so each step carries every slot."""
    cfg = Config(runtime=RuntimeConfig(prefill_chunk=CHUNK))
    with load_engine(bundle_q4, cfg, n_seq=4) as engine:
        record = _Record(engine)
        drivers = [(i, _conversation(i, "off")) for i in range(4)]
        list(batch.run(engine, drivers))
    first_step = next(c for c in record.calls if isinstance(c, frozenset))
    assert first_step == {0, 1, 2, 3}


@pytest.mark.model
def test_a_step_of_eight_replies_goes_in_calls_of_at_most_seven(bundle_q4: Path) -> None:
    """On a CPU, llama.cpp computes a call of 8 tokens or more with other kernels than one
    token: 8 replies stepped in one call drew other tokens than each alone (measured on a
    Qwen2.5-0.5B-size model). A step therefore never puts more than 7 sequences in a call,
    so each reply is the one `talk` draws."""
    with load_engine(bundle_q4, Config(), n_seq=8) as engine:
        sizes: list[int] = []
        step_many = engine.model.step_many

        def spy(items: list[tuple[int, int, int]]) -> None:
            sizes.append(len(items))
            step_many(items)

        engine.model.step_many = spy  # type: ignore[method-assign]
        drivers = [(i, _conversation(i, "off")) for i in range(8)]
        together = dict(batch.run(engine, drivers))
    assert engine.step_seqs == MIN_CALL - 1
    assert sizes and max(sizes) == 7 and 1 not in sizes  # 8 = 7 + 1 alone (model.step)
    with load_engine(bundle_q4, Config(), n_seq=1) as engine:
        for i in range(8):
            engine.forget()
            ((_, alone),) = batch.run(engine, [(i, _conversation(i, "off"))])
            for a, b in zip(together[i], alone, strict=True):  # type: ignore[call-overload]
                _same_turn(a, b)
