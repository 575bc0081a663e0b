"""The `<STATE>` vectors of labelled records: what `npcchat heads fit` fits the heads on.

One function for a fit on this machine, for each Ray worker of a fit on a cluster
(:mod:`npcchat.cluster`) and for ``npcchat train --bundle``'s refit, so all compute the very
same vectors: one prefill of the record's prompt through the engine `talk` runs, no reply
generated. A record with an NPC (its ``npc_file``, or ``npcs`` by its id) is rendered as
eval and talk render it: the NPC's lore and descriptions picked for the line, its rules'
state, through :meth:`npcchat.Conversation.prompt`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from npcchat.eval.scenarios import Scenario
from npcchat.mind.npc import NpcDef
from npcchat.runtime.engine import Engine
from npcchat.types import SamplingParams


def state_vectors(
    engine: Engine,
    records: Sequence[Scenario],
    tick: Callable[[], None] = lambda: None,
    npcs: Mapping[str, NpcDef] | None = None,
) -> np.ndarray:
    """``[len(records), hidden]`` float64: the `<STATE>` vector of each single-turn record's
    prompt (its own state and context, its NPC's knowledge when it has one), in the
    records' order. ``tick`` after each."""
    from npcchat.eval import runner

    found = runner.Npcs(engine, npcs or {})
    sampling = SamplingParams(temperature=0.0, seed=0, max_tokens=1)
    rows = []
    for sc in records:
        npc = found.of(sc)
        if npc is None:
            inp = engine.prompt_input(sc.new_session(), sc.turns[0][0], sc.context)
            fitted = engine.fit(inp, 1)
        else:
            conv = runner.conversation_for(sc, engine, sampling, npc)
            conv.context = sc.context
            fitted = conv.prompt(sc.turns[0][0])
        rows.append(engine.state_vector(fitted)[0])
        tick()
    if not rows:
        return np.zeros((0, engine.bundle.hidden_size))
    return np.stack(rows).astype(np.float64)
