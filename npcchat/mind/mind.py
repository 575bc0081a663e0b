"""What an NPC knows and remembers, applied around each engine turn (npcchat.mind.knowledge).

Before a turn: a forbidden trigger short-circuits the model; otherwise the `<RAG>` block is
filled from the NPC's lore entries and descriptions for the current stage and location, and
relevant long-term memories are pinned at the top of the context. After a turn: turns that
fell out of the context window become memory lines, and flag threshold overrides from the
NPC file are applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from npcchat.config import KnowledgeConfig
from npcchat.mind import knowledge as K
from npcchat.mind.embed import CachedEmbedder, Embedder, choose_embedder
from npcchat.rules.model import State, apply, retag
from npcchat.runtime.engine import Engine, Guide, Guided
from npcchat.sessions.session import Session
from npcchat.types import ContextTurn, FlagResult, HeadsOutput, Memory, RulesOutcome, Turn


@dataclass(frozen=True)
class Prepared:
    session: Session  # with this turn's LORE and DESCRIPTION
    pinned: tuple[ContextTurn, ...]  # recalled memories
    recalled: tuple[Memory, ...]


class NpcMind:
    def __init__(
        self,
        engine: Engine,
        know: K.Knowledge,
        cfg: KnowledgeConfig,
        embedder: Embedder | None = None,
    ) -> None:
        self.engine = engine
        self.know = know
        inner = embedder or choose_embedder(cfg.embed_model or None, cfg.allow_download)
        self.embedder = CachedEmbedder(inner)  # static lore: cached on disk by content hash
        self.memo = _Memo(inner)  # memories and queries: kept in memory for the session
        self.budgets = K.Budgets(
            cfg.lore_tokens,
            cfg.description_tokens,
            cfg.memory_tokens,
            cfg.memories,
            recall_days=cfg.recall_days,
        )

    @property
    def method(self) -> str:
        return self.embedder.name

    def count(self, text: str) -> int:
        return len(self.engine.model.tokenize(text))

    def trigger(self, session: Session, player: str) -> Turn | None:
        t = self.know.trigger_for(player)
        if t is None:
            return None
        deltas = {"trust": t.trust, "relationship": t.relationship}
        turn = self.engine.fixed_turn(session, player, t.reaction, deltas, t.flags)
        return replace(turn, trigger_phrase=t.matched(player))

    def prepare(self, session: Session, player: str) -> Prepared:
        recent = [(t.player, t.reply) for t in session.history[-self.budgets.recent_turns :]]
        # queries change every turn: embedded in memory, never written to the lore cache
        query = K.query_of(player, recent).vector(self.memo)
        lore, description = session.lore, session.description
        if self.know.lore or self.know.descriptions:
            picked_lore, picked_desc = K.select_rag(
                self.know,
                session.tags,
                session.player_state,
                query,
                self.embedder,
                self.count,
                self.budgets,
            )
            lore = picked_lore if self.know.lore else lore
            description = picked_desc if self.know.descriptions else description
        lore = self.know.lore_block(lore)
        days = self.budgets.recall_days
        since = session.game_day - days if days and session.game_day is not None else None
        recalled = K.recall(
            session.memories,
            query,
            self.memo,
            self.count,
            self.budgets,
            fresh_from=len(session.history),
            since_day=since,
        )
        prepared = replace(session, lore=lore, description=description)
        return Prepared(prepared, K.memory_context(recalled), recalled)

    def guide(self, session: Session) -> Guide | None:
        """What the NPC's rules decide on a turn's heads, before a token is generated: a
        flag they block that has a guarded reply answers with it (a fixed line in rotation,
        or the model with the guard's tags). None: no rules, nothing to decide."""
        rules = self.know.rules
        if not rules:
            return None
        state = State(session.tags, session.player_state, session.npc_items)

        def decide(heads: HeadsOutput) -> Guided | None:
            judged = rules.judge(self._override_flags(heads.flags), state)
            fired = frozenset(n for n, f in judged.flags.items() if f.fired)
            gate = rules.gate(state, fired)  # the reply checks of this state and these flags
            found = rules.guard_for(judged.blocked)
            choices = rules.choices(judged)
            if found is None:
                if gate is None and not choices:
                    return None
                return Guided(gate=gate, choices=choices)
            name, guard = found
            if guard.lines:
                used = sum(1 for t in session.history if t.rules and t.rules.guard == name)
                return Guided(reply=guard.lines[used % len(guard.lines)])
            tags = retag(session.tags, guard.tags)
            return Guided(session=replace(session, tags=tags), gate=gate, choices=choices)

        return decide

    def after(self, session: Session, result: Turn) -> tuple[Session, Turn]:
        """Apply threshold overrides and the NPC's rules (conditions, effects, actions);
        turn history that left the window into memories."""
        result = self._overrides(result)
        rules = self.know.rules
        if not rules:
            session = session.with_turn(result)
        else:
            start = State(session.tags, session.player_state, session.npc_items)
            judged = rules.judge(result.heads.flags, start)
            moved = State(result.tags_after, session.player_state, session.npc_items)
            ruled, changes, actions, lines = apply(rules, judged, moved, dict(result.choices))
            found = rules.guard_for(judged.blocked) if result.stop_reason != "trigger" else None
            outcome = RulesOutcome(
                blocked=judged.blocked,
                effects=changes,
                actions=actions,
                memories=lines,
                guard=found[0] if found else "",
                checks=result.interventions,
                player_items=ruled.player.items,
                npc_items=ruled.npc_items,
            )
            result = replace(
                result,
                heads=HeadsOutput(deltas=result.heads.deltas, flags=judged.flags),
                tags_after=ruled.tags,
                rules=outcome,
            )
            session = session.with_turn(result, ruled.player, ruled.npc_items)
            turn = len(session.history) - 1
            day, when = session.game_day, session.game_time
            noted = tuple(Memory(turn, line, day, when, "rules") for line in lines)
            session = replace(session, memories=session.memories + noted)
        out_of_window = result.dropped_turns // 2  # two context lines per earlier turn
        if out_of_window > session.memorized:
            new = [
                K.summarize(i, session.history[i].player, session.history[i].reply)
                for i in range(session.memorized, out_of_window)
            ]
            if session.game_day is not None or session.game_time:  # dated by the game clock
                new = [replace(m, day=session.game_day, when=session.game_time) for m in new]
            session = replace(
                session, memories=session.memories + tuple(new), memorized=out_of_window
            )
        return session, result

    def _overrides(self, r: Turn) -> Turn:
        if r.stop_reason in ("trigger", "scripted"):  # decided, not predicted: nothing to
            return r  # weigh against a threshold (0.0 would fire every flag not named)
        flags = self._override_flags(r.heads.flags)
        if flags is r.heads.flags:
            return r
        return replace(r, heads=HeadsOutput(deltas=r.heads.deltas, flags=flags))

    def _override_flags(self, flags: dict[str, FlagResult]) -> dict[str, FlagResult]:
        """The NPC file's thresholds in place of the learned ones, where it sets them."""
        defs = self.know.flags
        if not any(d.threshold is not None for d in defs.values()):
            return flags
        out = {}
        for name, f in flags.items():
            thr = (
                defs[name].threshold
                if name in defs and defs[name].threshold is not None
                else f.threshold
            )
            assert thr is not None
            out[name] = FlagResult(f.prob, thr, f.prob >= thr)
        return out


def knowledge_of(session: Session) -> K.Knowledge:
    """The knowledge of the NPC file a session was started from (none when it is gone)."""
    if not session.npc_file or not Path(session.npc_file).is_file():
        return K.Knowledge()
    from npcchat.mind import npc

    return npc.load(Path(session.npc_file)).knowledge


class _Memo:
    """Embeddings of memory lines, computed once per text for the life of a conversation."""

    def __init__(self, inner: Embedder) -> None:
        self.inner = inner
        self.name = inner.name
        self._seen: dict[str, np.ndarray] = {}

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._seen]
        if missing:
            for t, v in zip(missing, self.inner.embed(missing), strict=True):
                self._seen[t] = v
        if not texts:
            return self.inner.embed([])
        return np.stack([self._seen[t] for t in texts])
