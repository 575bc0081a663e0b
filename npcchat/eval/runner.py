"""Run scenarios through the same engine as `talk`: each scenario is a conversation, up to
one per sequence of the llama.cpp context at once (npcchat.runtime.batch).

Runs are deterministic by default (temperature 0, fixed seed); results equal a sequential
run bit for bit. What is measured from the results is :mod:`npcchat.eval.report`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from npcchat.conversation import Conversation, new_session
from npcchat.errors import NpcchatError
from npcchat.eval import metrics as M
from npcchat.eval.scenarios import Expected, Scenario
from npcchat.eval.similarity import Similarity
from npcchat.mind import npc as npc_mod
from npcchat.mind.mind import NpcMind
from npcchat.mind.npc import NpcDef
from npcchat.runtime import batch
from npcchat.runtime.engine import Engine
from npcchat.runtime.kvbook import Reuse
from npcchat.types import SamplingParams, Turn, turn_json


def _expected_dict(e: Expected | None, flags: tuple[str, ...]) -> dict[str, Any] | None:
    if e is None:
        return None
    labels = dict(e.flags or {})
    if e.all_flags_negative_unless_listed:
        labels = {n: n in labels for n in (*flags, *labels)}
    return {
        "response": e.response,
        "delta": e.delta,
        "flags": labels or None,
        "thresholds": e.thresholds,
    }


def _turn_dict(
    r: Turn, e: Expected | None, flags: tuple[str, ...], sim: Similarity
) -> dict[str, Any]:
    expected = _expected_dict(e, flags)
    ref = expected["response"] if expected else None
    return {
        "player": r.player,
        **turn_json(r),
        "stop_reason": r.stop_reason,
        "expected": expected,
        "checks": {
            "empty": not r.reply.strip(),
            "truncated": r.stop_reason == "length",
            "leaked_tags": M.leaked_tags(r.reply),
            "exact_match": M.exact_match(r.reply, ref) if ref is not None else None,
            "similarity": sim.score(r.reply, ref) if ref is not None else None,
        },
    }


def _driver(
    sc: Scenario,
    engine: Engine,
    sampling: SamplingParams,
    sim: Similarity,
    reuse: Reuse,
    npc: tuple[NpcDef, NpcMind] | None,
) -> batch.Driver[dict[str, Any]]:
    """One scenario as a conversation; the NPC state carries from turn to turn. With an NPC
    file, the turns run through the very conversation `talk` runs: triggers, retrieval,
    memory and threshold overrides apply the same way."""
    out: dict[str, Any] = {
        "id": sc.id,
        "source": sc.source,
        "kind": sc.kind,
        "npc_id": sc.npc_id,
        "npc_file": npc[0].source if npc else None,
        "turns": [],
        "error": None,
    }
    flags = engine.bundle.flags
    conv = conversation_for(sc, engine, sampling, npc)
    # "aligned" (or "off"), never "prefix": results must not depend on which scenario ran
    # before in which slot, so --parallel never changes them (npcchat.runtime.kvbook)
    conv.reuse = reuse
    conv.context = sc.context
    for player, expected in sc.turns:
        try:
            r = yield from conv.driver(player, sampling=sampling)
        except NpcchatError as e:
            out["error"] = e.message
            return out
        out["turns"].append(_turn_dict(r, expected, flags, sim))
    return out


def conversation_for(
    sc: Scenario, engine: Engine, sampling: SamplingParams, npc: tuple[NpcDef, NpcMind] | None
) -> Conversation:
    """The scenario's starting session: the NPC's initial state (as talk starts it) with
    whatever the scenario sets itself on top, or the scenario's own state alone."""
    seed = sampling.seed or 0
    if npc is None:
        return Conversation(engine, sc.new_session(seed=seed), sampling)
    definition, mind = npc
    session = new_session(definition, engine, seed)
    given = sc.given
    session = replace(
        session,
        tags=sc.tags if "tags" in given or "npc_location" in given else session.tags,
        lore=sc.lore if "lore" in given else session.lore,
        description=sc.description if "description" in given else session.description,
        player_state=sc.player_state if "player_state" in given else session.player_state,
    )
    return Conversation(engine, session, sampling, mind=mind)


class Npcs:
    """The NPC of each scenario (its ``npc_file``, else the one ``--npcs`` maps its id to)
    with its mind, each file read and each mind built once per run: a mind holds no
    conversation's state, and with a sentence-embedding model it is costly to build."""

    def __init__(
        self,
        engine: Engine,
        known: Mapping[str, NpcDef],
        files: Mapping[str, NpcDef] | None = None,
    ) -> None:
        self.engine = engine
        self.known = known
        self._loaded: dict[str, NpcDef] = dict(files or {})
        self._minds: dict[int, tuple[NpcDef, NpcMind]] = {}

    def of(self, sc: Scenario) -> tuple[NpcDef, NpcMind] | None:
        if sc.npc_file:
            if sc.npc_file not in self._loaded:
                self._loaded[sc.npc_file] = npc_mod.load(Path(sc.npc_file))
            npc = self._loaded[sc.npc_file]
        elif sc.npc_id in self.known:
            npc = self.known[sc.npc_id]
        else:
            return None
        if id(npc) not in self._minds:
            mind = NpcMind(self.engine, npc.knowledge, self.engine.cfg.knowledge)
            self._minds[id(npc)] = (npc, mind)
        return self._minds[id(npc)]


def run(
    engine: Engine,
    scenarios: list[Scenario],
    sampling: SamplingParams,
    sim: Similarity,
    on_result: Callable[[dict[str, Any]], None],
    share_prefix: bool = True,
    npcs: Mapping[str, NpcDef] | None = None,
) -> None:
    """Run every scenario; ``on_result`` gets each finished scenario (completion order).

    ``share_prefix``: decode the head of the prompt that scenarios share only once (aligned
    KV reuse: identical results, fewer prefill tokens)."""
    for result in results(engine, scenarios, sampling, sim, share_prefix, npcs):
        on_result(result)


def results(
    engine: Engine,
    scenarios: list[Scenario],
    sampling: SamplingParams,
    sim: Similarity,
    share_prefix: bool = True,
    npcs: Mapping[str, NpcDef] | None = None,
    npc_files: Mapping[str, NpcDef] | None = None,
) -> Iterator[dict[str, Any]]:
    """:func:`run` as an iterator: each scenario's result as it finishes (a Ray actor
    streams them to the driver). ``npc_files``: NPC files already read, by the path a
    scenario's ``npc_file`` names (a worker that lacks the files gets them this way)."""
    keyed = zip(
        (sc.id for sc in scenarios),
        drivers(engine, scenarios, sampling, sim, share_prefix, npcs, npc_files),
        strict=True,
    )
    for _, result in batch.run(engine, keyed):
        if isinstance(result, NpcchatError):  # a scenario's driver records its own errors
            raise result
        yield result


def drivers(
    engine: Engine,
    scenarios: list[Scenario],
    sampling: SamplingParams,
    sim: Similarity,
    share_prefix: bool = True,
    npcs: Mapping[str, NpcDef] | None = None,
    npc_files: Mapping[str, NpcDef] | None = None,
) -> Iterator[batch.Driver[dict[str, Any]]]:
    """Each scenario as a driver (for :mod:`npcchat.runtime.batch` or a scheduler)."""
    reuse: Reuse = "aligned" if share_prefix else "off"
    found = Npcs(engine, npcs or {}, npc_files)
    return (_driver(sc, engine, sampling, sim, reuse, found.of(sc)) for sc in scenarios)


def timer() -> Callable[[], float]:
    t0 = time.perf_counter()
    return lambda: time.perf_counter() - t0
