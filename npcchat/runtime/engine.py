"""One NPC turn: prompt -> tokens -> one prefill -> `<STATE>` vector -> heads -> generate.

The prompt is decoded exactly once per turn. The same decode yields the post-final-norm
hidden state(s) at `<STATE>` (mean if several) and the logits of the first reply token;
generation continues on that KV cache. Game-state decisions are pure functions of the
head outputs: no randomness, so the same prompt always moves the state the same way.

The prompt's decode calls are planned once (:meth:`Engine.plan`, at most
``runtime.prefill_chunk`` tokens each, never a short one after a reused prefix): ``talk``
runs them back to back, a server's batch a chunk's worth per step between its running
replies (:mod:`npcchat.runtime.batch`), and a served turn is the turn ``talk`` computes.
"""

from __future__ import annotations

import codecs
import hashlib
import random
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from npcchat.config import Config, StateConfig
from npcchat.errors import BackendError, BundleError
from npcchat.runtime import prompt as prompt_mod
from npcchat.runtime.bundle import Bundle
from npcchat.runtime.heads import Heads
from npcchat.runtime.kvbook import GRID, KvBook, Reuse
from npcchat.runtime.model import ModelLike
from npcchat.runtime.prefill import MIN_CALL, Chunk, plan_prefill, widened
from npcchat.runtime.prompt import SpecialTag
from npcchat.runtime.vocab import check_vocab
from npcchat.sessions.session import Session
from npcchat.sessions.snapshot import KvState
from npcchat.types import (
    DELTA_NAMES,
    ContextTurn,
    FlagResult,
    HeadsOutput,
    PromptInput,
    SamplingParams,
    Tags,
    Timings,
    Turn,
)


def apply_deltas(tags: Tags, deltas: dict[str, float], rule: StateConfig) -> Tags:
    """trust/relationship += scale * delta, clamped to the configured range and rounded."""

    def move(value: float, delta: float) -> float:
        moved = min(rule.clamp_max, max(rule.clamp_min, value + rule.delta_scale * delta))
        return round(moved, rule.decimals)

    return replace(
        tags,
        trust=move(tags.trust, deltas["trust"]),
        relationship=move(tags.relationship, deltas["relationship"]),
    )


def context_of(session: Session) -> tuple[ContextTurn, ...]:
    turns: list[ContextTurn] = []
    for t in session.history:
        turns += [ContextTurn("player", t.player), ContextTurn("npc", t.reply)]
    return tuple(turns)


@dataclass
class PromptJob:
    """A prompt being decoded, one call at a time (see :meth:`Engine.plan`)."""

    tokens: tuple[int, ...]
    outputs: tuple[int, ...]  # the `<STATE>` positions, then the last token
    n_state: int
    chunks: tuple[Chunk, ...]
    seq: int
    start: int  # the first position decoded (the KV cache held the ones before)
    grid: int
    done: int = 0  # calls run
    states: dict[int, np.ndarray] = field(default_factory=dict)

    @property
    def decoded(self) -> int:
        """Prompt tokens this job decodes (those after the reused KV prefix)."""
        return len(self.tokens) - self.start


class Engine:
    """A bundle loaded and ready for turns. Owns the model; call :meth:`close`."""

    def __init__(self, bundle: Bundle, cfg: Config, model: ModelLike, heads: Heads | None) -> None:
        self.bundle = bundle
        self.cfg = cfg
        self.model = model
        self.heads = heads
        self.vocab = check_vocab(model, bundle.name)
        self.reuse: Reuse = "prefix" if cfg.runtime.prefix_reuse else "off"
        self.kv = KvBook()
        # eval's aligned reuse cuts prefills at multiples of this (at most a prefill call)
        self.grid = min(GRID, model.n_batch, cfg.runtime.prefill_chunk)
        # Sequences decoded together in one call of a batched step. On a CPU build a call of
        # 8 tokens or more is computed with other kernels than a single token (see
        # MIN_CALL): 8 replies stepped together drew other tokens than each alone (measured,
        # Qwen2.5-0.5B size), so steps go in calls of at most 7 (8 slots: 4 % slower a step,
        # measured). With layers on a GPU, where a step's cost is reading the weights and
        # equality with talk is not measured here, a step is one call.
        self.step_seqs = MIN_CALL - 1 if cfg.runtime.n_gpu_layers == 0 else max(1, model.n_seq)
        self.identity = _identity(bundle, cfg)
        if model.n_embd != bundle.hidden_size:
            raise BundleError(
                f"{bundle.root}: manifest hidden_size is {bundle.hidden_size}, "
                f"but the GGUF's n_embd is {model.n_embd}"
            )

    @classmethod
    def load(cls, bundle: Bundle, cfg: Config, n_seq: int = 1) -> Engine:
        from npcchat.runtime.backend import Model

        model = Model(bundle.gguf, cfg.runtime, n_seq)
        try:
            heads = Heads(bundle.heads, bundle.flags, model.n_embd) if bundle.heads else None
            return cls(bundle, cfg, model, heads)
        except BaseException:
            model.close()
            raise

    def close(self) -> None:
        self.model.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- prompt ---------------------------------------------------------------------------
    def tokenize_prompt(self, rendered: prompt_mod.RenderedPrompt) -> list[int]:
        """Scaffold tags become their control ids; all other text is plain text."""
        out: list[int] = []
        for part in rendered.parts:
            if isinstance(part, SpecialTag):
                tid = self.vocab.tags.get(part.text)
                if tid is None:
                    raise BundleError(f"{self.bundle.name}: the GGUF has no token for {part.text}")
                out.append(tid)
            else:
                out += self.model.tokenize(part, special=False)
        return out

    def prompt_input(
        self, session: Session, player: str, context: tuple[ContextTurn, ...] = ()
    ) -> PromptInput:
        """What the prompt is rendered from; ``context`` is history from outside the
        session (a scenario's recorded exchanges), placed before the session's own turns."""
        return PromptInput(
            npc_id=session.npc_id,
            tags=session.tags,
            player_utterance=player,
            lore=session.lore,
            description=session.description,
            player_state=session.player_state,
            context=context + context_of(session),
        )

    def fit(self, inp: PromptInput, max_tokens: int, pinned: int = 0) -> prompt_mod.FittedPrompt:
        budget = self.model.n_ctx - max_tokens
        return prompt_mod.fit(self.bundle.template, inp, self.tokenize_prompt, budget, pinned)

    # -- the turn -------------------------------------------------------------------------
    def state_vector(
        self, fitted: prompt_mod.FittedPrompt, seq: int = 0, reuse: Reuse | None = None
    ) -> tuple[np.ndarray, list[int]]:
        """Prefill once; the mean hidden state over `<STATE>` positions.

        With reuse (see :mod:`npcchat.runtime.kvbook`), only the tokens after a prefix some KV
        cache already holds are decoded (never past the first `<STATE>`: its hidden state
        must come out of this decode).
        """
        job = self.plan(fitted, seq, reuse)
        while not self.prefill_step(job):
            pass
        return self.prefilled(job), list(job.tokens)

    def plan(
        self, fitted: prompt_mod.FittedPrompt, seq: int = 0, reuse: Reuse | None = None
    ) -> PromptJob:
        """Where ``fitted``'s prefill starts in ``seq`` (a KV prefix reused, copied from
        another sequence when that one holds more) and its decode calls; nothing decoded
        yet. Run it with :meth:`prefill_step`, then :meth:`prefilled`.

        Whoever runs the calls (talk all at once, a server a chunk's worth per step between
        its running replies' steps), the turn is the same."""
        tokens = tuple(fitted.tokens)
        if len(tokens) > self.model.n_ctx:
            raise BackendError(
                f"prompt of {len(tokens)} tokens exceeds the context ({self.model.n_ctx})"
            )
        state_id = self.vocab.tags[prompt_mod.STATE_TAG]
        positions = [i for i, t in enumerate(tokens) if t == state_id]
        outputs = (*positions, len(tokens) - 1)
        mode = reuse or self.reuse
        grid = self.grid if mode == "aligned" else 0
        start = 0
        if mode == "prefix":
            shared = self.kv.shared_start(seq, tokens, outputs[0])
            # never a short call (see MIN_CALL): a start that depends on which slot held
            # what would otherwise change the turn's rounding
            start = widened(shared.position, outputs[0])
            if shared.source != seq:
                self.model.share(shared.source, seq, start)
        elif mode == "aligned":
            where = self.kv.aligned_start(seq, tokens, outputs[0], grid)
            self.model.share(where.source, seq, where.position)
            start = where.position
        self.kv.begin(seq)  # unknown until the last call has decoded
        self.model.keep_prefix(start, seq)
        chunks = tuple(plan_prefill(len(tokens), outputs, self.prefill_chunk, start, grid=grid))
        return PromptJob(tokens, outputs, len(positions), chunks, seq, start, grid)

    def prefill_step(self, job: PromptJob) -> bool:
        """Decode ``job``'s next call; True once its last one has run."""
        chunk = job.chunks[job.done]
        job.states.update(self.model.prefill_chunk(job.tokens, chunk, job.outputs, job.seq))
        job.done += 1
        return job.done == len(job.chunks)

    def prefilled(self, job: PromptJob) -> np.ndarray:
        """After ``job``'s last call: the `<STATE>` vector (the mean over its positions);
        the sequence's KV cache is now known to hold the prompt."""
        exact = job.outputs[0] // job.grid * job.grid if job.grid else 0
        self.kv.record(job.seq, job.tokens, exact=exact)
        rows = [job.states[p] for p in job.outputs[: job.n_state]]
        vec: np.ndarray = np.stack(rows).mean(axis=0)
        return vec

    def predecode(
        self,
        session: Session,
        pinned: tuple[ContextTurn, ...] = (),
        max_tokens: int = 1,
        seq: int = 0,
    ) -> int:
        """Decode, ahead of time, the part of the next prompt that cannot depend on what the
        player will say: everything up to and including `<PLAYER>`. Called while the player
        reads and types; the next turn then decodes little more than the player's line.
        Returns how many tokens were decoded (0 when reuse is off or nothing is new)."""
        if self.reuse == "off":
            return 0
        player_id = self.vocab.tags.get(prompt_mod.PLAYER_TAG)
        fitted = self.fit(self.prompt_input(session, "", pinned), max_tokens, pinned=len(pinned))
        tokens = list(fitted.tokens)
        if player_id is None or player_id not in tokens:
            return 0
        end = len(tokens) - tokens[::-1].index(player_id)  # through the last <PLAYER>
        start = self.kv.prefix_start(seq, tokens[:end], end)
        if start >= end:
            return 0
        start = widened(start, end)
        self.kv.begin(seq)
        self.model.extend(tokens[:end], start, seq)
        self.kv.record(seq, tokens[:end])
        return end - start

    def forget(self, seq: int | None = None) -> None:
        """Treat a sequence's (or every) KV cache as empty: the next prefill starts cold."""
        self.kv.forget(seq)

    def kv_tokens(self, seq: int = 0) -> list[int]:
        return self.kv.tokens(seq)

    def adopt(self, tokens: list[int], seq: int = 0) -> None:
        """Declare that ``seq``'s KV cache holds ``tokens`` (after a snapshot restore)."""
        self.kv.record(seq, tokens)

    def kv_state(self, seq: int = 0) -> KvState | None:
        """``seq``'s KV cache as a snapshot (None when it holds nothing known)."""
        tokens = self.kv_tokens(seq)
        if not tokens:
            return None
        payload = self.model.state_get(seq)
        return KvState(self.identity, self.model.n_ctx, tuple(tokens), payload)

    def restore_kv(self, state: KvState, seq: int = 0) -> bool:
        """Load a snapshot into ``seq``; False (and an empty cache) when llama.cpp refuses."""
        if state.bundle_id != self.identity or state.n_ctx != self.model.n_ctx:
            return False
        if not self.model.state_set(seq, state.payload):
            self.forget(seq)
            self.model.keep_prefix(0, seq)
            return False
        self.adopt(list(state.tokens), seq)
        return True

    def run_heads(self, vec: np.ndarray) -> HeadsOutput:
        if self.heads is None:  # model-only bundle: no state changes until heads are fitted
            return HeadsOutput(deltas=dict.fromkeys(DELTA_NAMES, 0.0), flags={})
        return self.heads.run(vec)

    def start(
        self,
        session: Session,
        player: str,
        sampling: SamplingParams,
        on_text: Callable[[str], None] | None = None,
        seq: int = 0,
        context: tuple[ContextTurn, ...] = (),
        pinned: tuple[ContextTurn, ...] = (),
        reuse: Reuse | None = None,
        guide: Guide | None = None,
    ) -> Pending:
        """First half of a turn: prompt, the one prefill, heads, first token drawn
        (:meth:`begin`, then :meth:`prefill` until it is done).

        ``guide`` sees the heads before a token is drawn (the NPC's rules): it may answer
        with a fixed reply (no generation) or with other tags for the reply, which the
        model then generates from a second prefill of the same prompt with those tags;
        the state change stays the one the player's prompt gave."""
        p = self.begin(session, player, sampling, on_text, seq, context, pinned, reuse, guide)
        while not self.prefill(p):
            pass
        return p

    def begin(
        self,
        session: Session,
        player: str,
        sampling: SamplingParams,
        on_text: Callable[[str], None] | None = None,
        seq: int = 0,
        context: tuple[ContextTurn, ...] = (),
        pinned: tuple[ContextTurn, ...] = (),
        reuse: Reuse | None = None,
        guide: Guide | None = None,
    ) -> Pending:
        """A turn's prompt, fitted (see :meth:`start`); nothing decoded yet."""
        t0 = time.perf_counter()
        inp = self.prompt_input(session, player, pinned + context)
        fitted = self.fit(inp, sampling.max_tokens, pinned=len(pinned))
        p = Pending(session, player, sampling, fitted, seq, on_text, t0)
        p.guide, p.context, p.pinned, p.reuse = guide, context, pinned, reuse
        return p

    @property
    def prefill_chunk(self) -> int:
        """The most prompt tokens one decode call takes."""
        return min(self.model.n_batch, self.cfg.runtime.prefill_chunk)

    def next_call(self, p: Pending) -> int:
        """How many tokens ``p``'s next prompt call decodes. The prompt is planned at its
        first call, not when the turn begins, so a turn that waited behind others starts
        from what they decoded meanwhile (a prefix shared across slots)."""
        if p.job is None:
            assert not p.ready, "the turn's prompt is already decoded"
            if p.heads is None:  # the prefill time counts from here, not from the queue
                p.times[0] = time.perf_counter()
            p.job = self.plan(p.fitted, p.seq, p.reuse)
        chunk = p.job.chunks[p.job.done]
        return chunk.end - chunk.start

    def prefill(self, p: Pending) -> bool:
        """One decode call of ``p``'s prompt; True when the prompt is done, the heads have
        run and the first token is drawn (or a guide fixed the reply): ``p.ready``.

        The first token is sampled as soon as the last call has run because its logits
        only live until the next decode (another sequence's, when turns run side by side)."""
        self.next_call(p)
        job = p.job
        assert job is not None
        if not self.prefill_step(job):
            return False
        vec = self.prefilled(job)
        p.prefilled += job.decoded
        p.pos = len(job.tokens)
        p.job = None
        if p.heads is None:  # the player's prompt: the state change comes from it
            t1 = time.perf_counter()
            p.heads = self.run_heads(vec)
            p.times += [t1, time.perf_counter()]
            sampling = p.sampling
            p.seed = sampling.seed if sampling.seed is not None else random.randrange(2**31)
            guided = p.guide(p.heads) if p.guide is not None else None
            if guided is not None:
                p.gate, p.choices = guided.gate, guided.choices
                p.fixed = guided.reply  # answered without generating: nothing is sampled
                if guided.session is not None:  # the reply comes from a prompt with other tags
                    inp = self.prompt_input(guided.session, p.player, p.pinned + p.context)
                    p.fitted = replace(
                        self.fit(inp, sampling.max_tokens, pinned=len(p.pinned)),
                        dropped_turns=p.fitted.dropped_turns,
                    )
                    return False  # planned at its first call
        if p.fixed is None:
            self.model.new_sampler(p.sampling, p.seed, p.seq)
            p.next_token = self.model.sample(p.seq)
            p.drawn = time.perf_counter()
        p.ready = True
        return True

    def accept(self, p: Pending) -> bool:
        """Take ``p.next_token`` into the reply; True when it must be decoded to go on."""
        if p.fixed is not None:
            p.emit(p.fixed)
            p.reason = "guarded"
            return False
        tok = p.next_token
        if tok in self.vocab.stop or self.model.is_eog(tok):
            p.reason = "tag" if tok in self.vocab.tags.values() else "eos"
            return False
        p.n += 1
        p.tokens.append(tok)
        p.emit(p.decoder.decode(self.model.piece(tok)))
        if p.gate is not None:  # first: a stop text must not cut a reply the gate refuses
            verdict = self._checked(p, tok)
            if verdict == "redraw":  # backed up: the redrawn token goes through the same door
                return self.accept(p)
            if verdict == "stop":
                p.reason = "check"
                return False
        if p.stops and p.stopped():
            p.reason = "stop"
            return False
        if p.n >= p.sampling.max_tokens or p.pos >= self.model.n_ctx:
            p.reason = "length"
            return False
        return True

    def _checked(self, p: Pending, tok: int) -> str:
        """After a generated token: "ok" when the reply may go on as it is. When it now says
        a phrase its gate forbids, back up to the token that began the phrase, draw again
        with that token banned: "redraw" (the redrawn token awaits acceptance), or "stop"
        after :data:`MAX_BACKUPS` tries (the reply ends before the phrase).
        Text is released to the listener only where no forbidden phrase can start any more,
        so nothing taken back was ever shown."""
        gate = p.gate
        assert gate is not None
        text = "".join(p.pieces)
        p.offsets.append(len(text))
        p.states.append(p.decoder.getstate())
        said = gate.matched(text)  # normalized once per token, for both questions below
        hit = gate.violation(said)
        if hit is None:
            # release up to the last token whose text no forbidden phrase can reach back
            # into; scanned on from the last such token (the matched text only grows), so a
            # reply costs one normalization per token, not one per token and offset
            keep = len(said) - gate.longest
            while p.safe + 1 < len(p.offsets):
                if len(gate.matched(text[: p.offsets[p.safe + 1]])) > keep:
                    break
                p.safe += 1
            p.release(p.offsets[p.safe] if p.safe >= 0 else 0)
            return "ok"
        start, label = hit
        p.interventions.append(label)
        j = next(
            i for i, off in enumerate(p.offsets) if len(gate.matched(text[:off])) > start
        )  # the token that began the phrase
        while j > 0 and p.states[j - 1][0]:  # it completed a character an earlier one began
            j -= 1
        prompt = p.pos - (len(p.tokens) - 1)  # tokens decoded so far: all but this last one
        banned = p.banned.setdefault(j, set())
        banned.add(p.tokens[j])
        # the reply as it was before token j, and the KV cache and logits to match
        kept = text[: p.offsets[j - 1]] if j else ""
        p.pieces[:] = [kept] if kept else []
        p.started = bool(kept)
        p.shown = min(p.shown, len(kept))
        p.decoder.setstate(p.states[j - 1] if j else (b"", 0))
        del p.tokens[j:], p.offsets[j:], p.states[j:]
        p.safe = min(p.safe, j - 1)
        p.n = j
        if len(p.interventions) > MAX_BACKUPS:  # give up on this phrase: end the reply here
            p.pos = prompt + j
            self.model.keep_prefix(p.pos, p.seq)
            self.kv.record(p.seq, self.kv.tokens(p.seq)[: p.pos])
            return "stop"
        last = p.tokens[j - 1] if j else p.fitted.tokens[-1]
        at = prompt + j - 1
        self.model.keep_prefix(at, p.seq)
        self.model.step(last, at, p.seq)
        self.kv.record(p.seq, [*self.kv.tokens(p.seq)[:at], last])
        p.pos = at + 1
        p.next_token = self.model.sample_banned(sorted(banned), p.seq)
        return "redraw"

    def finish(self, p: Pending) -> Turn:
        p.emit(p.decoder.decode(b"", final=True))
        p.release(None)
        chosen = self._choose(p) if p.choices else ()
        t0, t1, t2 = p.times
        t3 = time.perf_counter()
        heads = p.heads
        assert heads is not None, "the turn's prompt is not decoded yet"
        return Turn(
            player=p.player,
            reply="".join(p.pieces).rstrip(),
            heads=heads,
            tags_before=p.session.tags,
            tags_after=apply_deltas(p.session.tags, heads.deltas, self.cfg.state),
            prompt_tokens=len(p.fitted.tokens),
            prefill_tokens=p.prefilled,
            generated_tokens=p.n,
            dropped_turns=p.fitted.dropped_turns,
            stop_reason=p.reason,
            timings=Timings((t1 - t0) * 1e3, (t2 - t1) * 1e3, (t3 - t2) * 1e3, p.stall * 1e3),
            seed=p.seed,
            npc_id=p.session.npc_id,
            interventions=tuple(p.interventions),
            choices=chosen,
        )

    def _choose(self, p: Pending) -> tuple[tuple[str, str], ...]:
        """The parameters the model picks from closed lists, after its reply in the same
        sequence: a cue line (``\\nLABEL: ``), then greedy decoding under a GBNF grammar of
        exactly the options, so the answer is always one of them, never free text."""
        prompt = len(p.fitted.tokens)
        pending = p.tokens[p.pos - prompt :]  # accepted into the reply, not yet decoded
        out = []
        for label, options in p.choices:
            cue = self.model.tokenize(f"\n{label}: ")
            grammar = "root ::= " + " | ".join(gbnf_literal(o) for o in options)
            got = self.model.choose([*pending, *cue], p.pos, grammar, p.seq)
            for tok in (*pending, *cue, *got):
                self.kv.append(p.seq, tok)
            p.pos += len(pending) + len(cue) + len(got)
            pending = []
            text = b"".join(self.model.piece(t) for t in got).decode("utf-8", "replace")
            out.append((label, text if text in options else options[0]))
        return tuple(out)

    def stream(
        self,
        session: Session,
        player: str,
        sampling: SamplingParams,
        context: tuple[ContextTurn, ...] = (),
        pinned: tuple[ContextTurn, ...] = (),
        guide: Guide | None = None,
    ) -> Generator[str, None, Turn]:
        """One turn as a generator: yields the reply's text pieces as they are generated
        and returns the :class:`Turn`. Closing it early (or any exception) abandons the
        turn: the session is not changed and sequence 0's KV cache is treated as unknown.

        ``context`` is history from outside the session (dropped first when the window is
        full); ``pinned`` lines (recalled memories) come first and are never dropped."""
        pieces: list[str] = []
        try:
            p = self.start(
                session,
                player,
                sampling,
                pieces.append,
                context=context,
                pinned=pinned,
                guide=guide,
            )
            while True:
                going = self.accept(p)
                yield from pieces
                pieces.clear()
                if not going:
                    break
                self.advance([p])
            result = self.finish(p)
            yield from pieces
            return result
        except BaseException:
            self.forget(0)  # an interrupted turn leaves the KV cache in an unknown state
            raise

    def turn(
        self,
        session: Session,
        player: str,
        sampling: SamplingParams,
        on_text: Callable[[str], None] | None = None,
        context: tuple[ContextTurn, ...] = (),
        pinned: tuple[ContextTurn, ...] = (),
    ) -> Turn:
        """Run one turn (see :meth:`stream`), passing each text piece to ``on_text``.
        Raises KeyboardInterrupt untouched: the session is not changed."""
        return drive(self.stream(session, player, sampling, context, pinned), on_text)

    def fixed_turn(
        self,
        session: Session,
        player: str,
        reply: str,
        deltas: dict[str, float],
        fired: tuple[str, ...],
        reason: str = "trigger",
    ) -> Turn:
        """A turn decided without the model (a forbidden trigger, a scripted turn): fixed
        reply and delta, the named flags fired."""
        flags = {
            n: FlagResult(1.0 if n in fired else 0.0, 0.5, n in fired) for n in self.bundle.flags
        }
        heads = HeadsOutput(deltas={n: float(deltas.get(n, 0.0)) for n in DELTA_NAMES}, flags=flags)
        return Turn(
            player=player,
            reply=reply,
            heads=heads,
            tags_before=session.tags,
            tags_after=apply_deltas(session.tags, heads.deltas, self.cfg.state),
            prompt_tokens=0,
            prefill_tokens=0,
            generated_tokens=0,
            dropped_turns=0,
            stop_reason=reason,
            timings=Timings(0.0, 0.0, 0.0),
            seed=0,
            npc_id=session.npc_id,
        )

    def advance(self, pending: list[Pending]) -> None:
        """Decode each turn's accepted token (batched) and draw its next one."""
        # In ascending sequence order: with one KV stream per sequence, llama.cpp splits a
        # batch into ubatches of consecutive streams (split_equal(..., sequential=true) in
        # llama-kv-cache.cpp), so 8 slots listed 7..0 ran as 8 one-token decodes (measured
        # 165 ms a step instead of 94 for Qwen2.5-0.5B dimensions on 2 cores).
        pending = sorted(pending, key=lambda p: p.seq)
        for g in range(0, len(pending), self.step_seqs):
            group = pending[g : g + self.step_seqs]
            if len(group) == 1:
                p = group[0]
                self.model.step(p.next_token, p.pos, p.seq)
            else:
                self.model.step_many([(p.seq, p.next_token, p.pos) for p in group])
            for i, p in enumerate(group):  # before the next call overwrites the logits
                self.kv.append(p.seq, p.next_token)
                p.pos += 1
                p.next_token = self.model.sample(p.seq, i if len(group) > 1 else -1)
                now = time.perf_counter()
                p.stall, p.drawn = max(p.stall, now - p.drawn), now


class ReplyGate(Protocol):
    """What a reply must not say yet (the NPC's reply checks, :mod:`npcchat.rules`),
    enforced while it is generated."""

    longest: int  # characters of the longest phrase, as matched

    def violation(self, said: str) -> tuple[int, str] | None:
        """(where the first forbidden phrase starts in ``said``, text as :meth:`matched`
        gives it, the check's label), or None."""
        ...

    def matched(self, text: str) -> str:
        """``text`` as phrases are matched on it (normalized)."""
        ...


MAX_BACKUPS = 8  # per turn: then the reply ends before the phrase


@dataclass(frozen=True)
class Guided:
    """What a :data:`Guide` decided on a turn's heads: a fixed ``reply``, or the
    ``session`` (other tags) the reply is generated from instead; ``gate``: what the reply
    must not say."""

    reply: str | None = None
    session: Session | None = None
    gate: ReplyGate | None = None
    # parameters the model picks from a closed list after its reply: (label, options)
    choices: tuple[tuple[str, tuple[str, ...]], ...] = ()


Guide = Callable[[HeadsOutput], "Guided | None"]


class Pending:
    """A turn from its planned prompt to its last token (mutable, internal to the engine).

    Until ``ready``, its prompt is being decoded (:meth:`Engine.prefill`; ``job`` is set
    from the prompt's first call on)."""

    def __init__(
        self,
        session: Session,
        player: str,
        sampling: SamplingParams,
        fitted: prompt_mod.FittedPrompt,
        seq: int,
        on_text: Callable[[str], None] | None,
        t0: float,
    ) -> None:
        self.session, self.player, self.sampling = session, player, sampling
        self.fitted, self.seq, self.on_text = fitted, seq, on_text
        self.times = [t0]  # begun; the prompt decoded; the heads run
        self.seed = 0
        self.heads: HeadsOutput | None = None
        self.pos = 0  # the next token's position in the sequence
        self.job: PromptJob | None = None
        self.ready = False  # the prompt is decoded and the first token drawn
        self.guide: Guide | None = None
        self.context: tuple[ContextTurn, ...] = ()
        self.pinned: tuple[ContextTurn, ...] = ()
        self.reuse: Reuse | None = None
        self.prefilled = 0  # prompt tokens decoded (both prompts when a guide re-prompted)
        self.drawn = 0.0  # when the last token was drawn
        self.stall = 0.0  # the longest wait between two drawn tokens (seconds)
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.pieces: list[str] = []
        self.n = 0
        self.next_token = -1
        self.reason = "length"
        self.started = False
        self.fixed: str | None = None  # a reply decided on the heads (a guarded reply)
        # reply checks: what the gate forbids, and what backing up needs per token
        self.gate: ReplyGate | None = None
        self.tokens: list[int] = []
        self.offsets: list[int] = []  # characters of the reply after each token
        self.states: list[tuple[bytes, int]] = []  # the UTF-8 decoder's state after each
        self.banned: dict[int, set[int]] = {}  # tokens ruled out at a reply position
        self.interventions: list[str] = []
        self.choices: tuple[tuple[str, tuple[str, ...]], ...] = ()
        self.shown = 0  # characters handed to on_text
        self.safe = -1  # index of the last token whose text is released
        # stop texts: the reply ends before the first; the text that may still begin one
        # (up to the longest's length - 1 characters) is held back from the listener
        self.stops = tuple(s for s in sampling.stop if s)
        self.hold = max((len(s) for s in self.stops), default=1) - 1

    @property
    def held(self) -> bool:
        """Text waits for :meth:`release` (a reply gate or stop texts may take it back)."""
        return self.gate is not None or bool(self.stops)

    def emit(self, text: str) -> None:
        if not self.started:  # the reply starts at its first visible character
            text = text.lstrip()
            self.started = bool(text)
        if text:
            self.pieces.append(text)
            if self.on_text and not self.held:
                self.on_text(text)

    def stopped(self) -> bool:
        """After a token: True (the reply cut before it) when the reply now holds a stop
        text; else the text no stop can begin in any more goes to the listener."""
        text = "".join(self.pieces)
        look = max(0, self.shown - self.hold)  # a stop cannot lie wholly in shown text
        found = [i for i in (text.find(s, look) for s in self.stops) if i >= 0]
        if found:
            self.pieces[:] = [text[: min(found)]]
            self.decoder.reset()  # a character begun after the cut is not the reply's
            return True
        if self.gate is None:
            self.release(len(text))
        return False

    def release(self, upto: int | None) -> None:
        """With a reply gate or stop texts, hand the text up to ``upto`` characters (None:
        all of it) to the listener: the part no backing up (and no stop) can take back."""
        if not self.held or not self.on_text:
            return
        text = "".join(self.pieces)
        end = len(text) if upto is None else upto
        if upto is not None and self.stops:
            end = min(end, len(text) - self.hold)
        if end > self.shown:
            self.on_text(text[self.shown : end])
            self.shown = end


def gbnf_literal(text: str) -> str:
    """``text`` as a GBNF string literal (quotes, backslashes and control characters
    escaped; any other character, Hangul included, as itself)."""
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ch == "\x7f":
            out.append(f"\\x{ord(ch):02x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _identity(bundle: Bundle, cfg: Config) -> str:
    """What decides a KV cache's content: the bundle and the runtime LoRA with its scale."""
    lora = cfg.runtime.lora_path
    if not lora:
        return bundle.identity
    from npcchat.files.atomic import sha256_file

    h = hashlib.sha256(bundle.identity.encode())
    h.update(f"|{sha256_file(Path(lora))}|{cfg.runtime.lora_scale!r}".encode())
    return h.hexdigest()[:16]


def drive(steps: Generator[str, None, Turn], on_text: Callable[[str], None] | None) -> Turn:
    """Run a turn generator to its end, passing each text piece to ``on_text``; a failure
    in ``on_text`` (Ctrl-C while printing) closes the generator, abandoning the turn."""
    try:
        while True:
            try:
                piece = next(steps)
            except StopIteration as stop:
                turn: Turn = stop.value
                return turn
            if on_text is not None:
                on_text(piece)
    except BaseException:
        steps.close()
        raise


def load_engine(bundle_dir: Path, cfg: Config, n_seq: int = 1) -> Engine:
    from npcchat.runtime import bundle as bundle_mod

    return Engine.load(bundle_mod.load(bundle_dir), cfg, n_seq)
