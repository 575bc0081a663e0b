"""The `<STATE>` vectors of labelled records: what `npcchat heads fit` fits the heads on.

One function for a fit on this machine and for each Ray worker of a fit on a cluster
(:mod:`npcchat.cluster`), so both compute the very same vectors: one prefill of the record's
prompt through the engine `talk` runs, no reply generated.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from npcchat.eval.scenarios import Scenario
from npcchat.runtime.engine import Engine


def state_vectors(
    engine: Engine, records: Sequence[Scenario], tick: Callable[[], None] = lambda: None
) -> np.ndarray:
    """``[len(records), hidden]`` float64: the `<STATE>` vector of each single-turn record's
    prompt (its own state and context), in the records' order. ``tick`` after each."""
    rows = []
    for sc in records:
        fitted = engine.fit(engine.prompt_input(sc.new_session(), sc.turns[0][0], sc.context), 1)
        rows.append(engine.state_vector(fitted)[0])
        tick()
    if not rows:
        return np.zeros((0, engine.bundle.hidden_size))
    return np.stack(rows).astype(np.float64)
