"""NPC knowledge and memory: what goes into the `<RAG>` and `<CTX>` blocks each turn.

* Lore entries and descriptions are keyed by quest stage and location ("any" matches all);
  a description may require items, actions or a minimum trust before it unlocks. Each turn
  the entries valid for the current stage and location are ranked by similarity to the
  player's line and the recent exchanges, and taken best-first within a token budget.
* Forbidden triggers (keywords or phrases) give a fixed reaction and delta with no model call.
* Long-term memory is extractive: when old turns fall out of the context window, each
  becomes one short line built from the player's words and the start of the reply (no
  model call: a summary by a small quantized model is slow per turn and can invent facts;
  the player's own words keep names and places verbatim). Each turn the most relevant
  memories are recalled into the context within a budget.

Everything here is deterministic: the same session and line give the same prompt.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from npcchat.mind.embed import Embedder, rank
from npcchat.rules.model import Rules
from npcchat.text import for_matching, phrase_pattern
from npcchat.types import ContextTurn, Memory, PlayerState, Tags

ANY = "any"


@dataclass(frozen=True)
class Entry:
    """A lore entry or a description, valid for some stages and locations."""

    text: str
    stages: tuple[str, ...] = (ANY,)
    locations: tuple[str, ...] = (ANY,)
    requires_items: tuple[str, ...] = ()
    requires_actions: tuple[str, ...] = ()
    min_trust: float = 0.0

    def valid(self, tags: Tags, player: PlayerState) -> bool:
        stage_ok = ANY in self.stages or tags.quest_stage in self.stages
        loc_ok = ANY in self.locations or tags.location in self.locations
        unlocked = (
            all(i in player.items for i in self.requires_items)
            and all(a in player.actions for a in self.requires_actions)
            and tags.trust >= self.min_trust
        )
        return stage_ok and loc_ok and unlocked


@dataclass(frozen=True)
class Trigger:
    """Words that get a fixed reaction and delta, with no model call."""

    phrases: tuple[str, ...]
    reaction: str
    trust: float
    relationship: float
    flags: tuple[str, ...] = ()

    @cached_property
    def patterns(self) -> tuple[re.Pattern[str], ...]:
        """The phrases' regexes, built once (a trigger is checked on every turn)."""
        return tuple(p for p in map(phrase_pattern, self.phrases) if p is not None)

    def matched(self, text: str) -> str:
        """The phrase of this trigger that ``text`` says, as the NPC file writes it."""
        said = for_matching(text)
        for phrase in self.phrases:
            pattern = phrase_pattern(phrase)
            if pattern is not None and pattern.search(said):
                return phrase
        return ""

    def matches(self, text: str) -> bool:
        """On NFKC, case-folded text without invisible characters: a Latin phrase as whole
        words, a Hangul phrase from a word start with any particle or ending after it."""
        said = for_matching(text)
        return any(p.search(said) for p in self.patterns)


@dataclass(frozen=True)
class FlagDef:
    display: str = ""
    threshold: float | None = None  # overrides the learned threshold when set
    examples: tuple[str, ...] = ()  # lines that must fire it
    negative_examples: tuple[str, ...] = ()  # lines that must not


@dataclass(frozen=True)
class Knowledge:
    lore: tuple[Entry, ...] = ()
    descriptions: tuple[Entry, ...] = ()
    triggers: tuple[Trigger, ...] = ()
    flags: dict[str, FlagDef] = field(default_factory=dict)
    persona: str = ""  # the rendered ``[persona]`` line (:func:`persona_line`)
    name: str = ""  # the NPC's display name (banners, reports); empty: use its id
    rules: Rules = field(default_factory=Rules)  # conditions, effects, actions, guards

    def trigger_for(self, text: str) -> Trigger | None:
        return next((t for t in self.triggers if t.matches(text)), None)

    def lore_block(self, lore: str) -> str:
        """The LORE line of a prompt: the persona first, then this turn's lore. The
        reference format has no persona line, and the original put the persona into the
        prompt context with the lore, so it leads the LORE text; a model is trained on
        the same composition (the demo recipe builds its records through this method)."""
        return " ".join(part for part in (self.persona, lore) if part)


def persona_line(name: str, traits: Sequence[str], backstory: str) -> str:
    """``name (trait, trait): backstory`` in the NPC's own language; empty without traits
    and backstory (a name alone says nothing the model can use)."""
    if not traits and not backstory:
        return ""
    head = f"{name} ({', '.join(traits)})" if traits else name
    return f"{head}: {backstory}" if backstory else head


@dataclass(frozen=True)
class Budgets:
    lore_tokens: int = 160
    description_tokens: int = 80
    memory_tokens: int = 120
    memories: int = 4
    recent_turns: int = 2
    recall_days: float = 0.0  # only memories of the last N game days (0: no limit)


def _take(ranked: Sequence[str], budget: int, count: Callable[[str], int], sep: str = " ") -> str:
    out: list[str] = []
    used = 0
    for text in ranked:
        n = count(text)
        if used + n > budget:
            continue  # a shorter, lower-ranked entry may still fit
        out.append(text)
        used += n
    return sep.join(out)


def select_rag(
    k: Knowledge,
    tags: Tags,
    player: PlayerState,
    query: Query | np.ndarray,
    embedder: Embedder,
    count: Callable[[str], int],
    budgets: Budgets,
) -> tuple[str, str]:
    """(LORE, DESCRIPTION) for this turn: valid entries, most relevant first, within budget."""
    q = query.vector(embedder) if isinstance(query, Query) else query

    def pick(entries: Sequence[Entry], budget: int) -> str:
        valid = [e.text for e in entries if e.valid(tags, player)]
        if not valid:
            return ""
        order = rank(q, embedder.embed(valid))
        return _take([valid[i] for i in order], budget, count)

    return pick(k.lore, budgets.lore_tokens), pick(k.descriptions, budgets.description_tokens)


def _clip(text: str, words: int, chars: int) -> str:
    parts = text.split()
    out = " ".join(parts[:words])
    if len(out) > chars:
        out = out[:chars].rstrip()
    return out + ("…" if out != " ".join(parts) else "")


def summarize(turn: int, player: str, reply: str) -> Memory:
    """One short memory line from a turn that left the context window (extractive): the
    player's own words first (they carry names and places), then the reply's first sentence."""
    said = _clip(player, 24, 160)
    first = re.split(r"(?<=[.!?])\s", reply.strip(), maxsplit=1)[0] if reply.strip() else ""
    answer = _clip(first, 10, 60)
    text = f'turn {turn + 1}: player said "{said}"' + (f'; I answered "{answer}"' if answer else "")
    return Memory(turn, text)


def recall(
    memories: Sequence[Memory],
    query: Query | np.ndarray,
    embedder: Embedder,
    count: Callable[[str], int],
    budgets: Budgets,
    fresh_from: int | None = None,
    since_day: float | None = None,
) -> tuple[Memory, ...]:
    """The memories of the next prompt, within the budget, in the order they happened.

    First the game's events given since the last turn (``turn >= fresh_from``): the game
    just told the NPC, so they are shown whatever the player says (newest first while the
    budget lasts). Then the most relevant others. ``since_day``: memories dated before
    that game day are not recalled (undated ones always may be)."""
    if not memories:
        return ()
    fresh = [
        i
        for i, m in enumerate(memories)
        if fresh_from is not None and m.source == "event" and m.turn >= fresh_from
    ]
    chosen: list[int] = []
    used = 0
    for i in reversed(fresh):
        n = count(memories[i].line)
        if used + n <= budgets.memory_tokens:
            chosen.append(i)
            used += n
    fresh_set = set(fresh)
    rest = [
        i
        for i, m in enumerate(memories)
        if i not in fresh_set and (since_day is None or m.day is None or m.day >= since_day)
    ]
    if rest and len(chosen) < budgets.memories:
        vecs = embedder.embed([memories[i].text for i in rest])
        q = query.vector(embedder) if isinstance(query, Query) else query
        scores = vecs @ q
        order = [rest[j] for j in rank(q, vecs) if scores[j] > 0]
        for i in order[: budgets.memories - len(chosen)]:
            n = count(memories[i].line)
            if used + n <= budgets.memory_tokens:
                chosen.append(i)
                used += n
    return tuple(memories[i] for i in sorted(chosen))


def memory_context(recalled: Sequence[Memory]) -> tuple[ContextTurn, ...]:
    return tuple(ContextTurn("memory", m.line) for m in recalled)


@dataclass(frozen=True)
class Query:
    """What is being asked now, and the recent exchanges around it."""

    player: str
    recent: str = ""

    def vector(self, embedder: Embedder) -> np.ndarray:
        """The player's line, plus the recent exchanges at a third of the weight: context
        helps with "tell me more", but must not drown out a question about something else."""
        now, ctx = embedder.embed([self.player, self.recent])
        v = now + (RECENT_WEIGHT * ctx if self.recent else 0.0)
        n = float(np.linalg.norm(v))
        return np.asarray(v / n if n else v)


RECENT_WEIGHT = 0.33


def query_of(player: str, recent: Sequence[tuple[str, str]]) -> Query:
    return Query(player, " ".join(f"{p} {r}" for p, r in recent))
