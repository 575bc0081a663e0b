"""``npcchat train --bundle OUT``: the run's adapter and heads to a bundle that talks.

The same steps a user would run by hand, in one go: ``npcchat convert`` (merge, quantize,
verify the drift), ``npcchat heads fit`` on the quantized model (quantization moves the
`<STATE>` vector, so the heads trained on the full-precision model are refitted on the
vectors the shipped GGUF computes, for the training records rendered with their NPC files as
in play), and one greedy turn of a training record through the finished bundle.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from npcchat.config import Config
from npcchat.errors import ConfigError
from npcchat.eval.scenarios import Scenario
from npcchat.mind.npc import NpcDef

if TYPE_CHECKING:
    from .run import TrainOptions


def make_bundle(
    opts: TrainOptions,
    cfg: Config,
    flags: list[str],
    scenarios: Sequence[Scenario],
    npcs: Mapping[str, NpcDef],
    progress: Callable[[str, dict[str, Any]], None] | None,
) -> dict[str, Any]:
    from dataclasses import asdict, replace

    from npcchat.api import load
    from npcchat.eval.states import state_vectors
    from npcchat.runtime.bundle import load as load_bundle
    from npcchat.runtime.engine import Engine
    from npcchat_convert.pipeline import Options, convert
    from npcchat_heads.refit import fit_bundle

    assert opts.bundle is not None

    def stage(name: str, done: int, total: int) -> None:
        if progress:
            progress("stage", {"name": name, "done": done, "total": total})

    report = convert(
        Options(
            base=opts.base,
            out=opts.bundle,
            adapter=opts.out / "adapter",
            heads=opts.out / "heads",
            quant=opts.quant,
            template=opts.template,
            name=opts.bundle.name,
        ),
        stage,
    )
    bundle = load_bundle(opts.bundle)
    with Engine.load(bundle, cfg) as engine:
        try:
            fit = fit_bundle(
                opts.bundle,
                list(opts.data),
                None,
                cfg,
                scenarios=list(scenarios),
                flags_given=flags,
                progress=lambda d, t: stage("heads fit", d, t),
                vectors=lambda records, tick: state_vectors(engine, records, tick, npcs),
            )
        except (ValueError, np.linalg.LinAlgError) as e:  # numpy's fit of odd data
            raise ConfigError(
                f"--bundle {opts.bundle}: the heads refit failed ({e})",
                hint=f"the training's adapter and heads are in {opts.out}; convert by hand",
            ) from None
    # the finished bundle talks: one greedy turn of the first record, NPC file applied
    first = scenarios[0]
    rt = load(opts.bundle, config=replace(cfg, sampling=replace(cfg.sampling, temperature=0.0)))
    try:
        turn = rt.open(_npc_of(first, npcs), seed=0).say(first.turns[0][0])
    finally:
        rt.close()
    return {
        "path": str(opts.bundle),
        "convert": {k: v for k, v in asdict(report).items() if k != "fallbacks"},
        "heads_fit": {k: fit[k] for k in ("records", "train", "validation", "test", "held_out")},
        "smoke_turn": {"player": first.turns[0][0], "reply": turn.reply, "deltas": turn.deltas},
    }


def _npc_of(sc: Scenario, npcs: Mapping[str, NpcDef]) -> NpcDef | None:
    from npcchat.mind import npc as npc_mod

    if sc.npc_file:
        return npc_mod.load(Path(sc.npc_file))
    return npcs.get(sc.npc_id)
