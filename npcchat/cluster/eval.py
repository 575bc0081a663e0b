"""``npcchat eval --ray`` and ``npcchat heads fit --ray``: the local run's work, spread
over Ray actors, gathered into the same results.

The driver never loads the model: it reads the bundle's manifest (identity, flags) for the
report and the checks, reads the NPC files the scenarios name (the workers get them as
values, so a scenario file's NPC files need not exist on the nodes), and collects results.
What the report adds under ``ray``: the actors, where they ran, what loading cost each,
the bytes that travelled per scenario, and every actor that died with the scenarios
that were run again elsewhere.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import ray

from npcchat.config import Config
from npcchat.eval.scenarios import Scenario
from npcchat.mind import npc as npc_mod
from npcchat.mind.npc import NpcDef
from npcchat.runtime import backend
from npcchat.runtime import bundle as bundle_mod
from npcchat.runtime.bundle import Bundle
from npcchat.types import SamplingParams

from .pool import Pool, chunk_size, connect
from .worker import WorkerSpec


class RayRun:
    """A connection to a Ray cluster and a bundle every node holds at ``root``."""

    def __init__(
        self,
        root: Path,
        cfg: Config,
        address: str | None,
        actors: int | None,
        threads: int,
    ) -> None:
        self.root = root.resolve()
        self.bundle: Bundle = bundle_mod.load(self.root)
        self.cfg = cfg
        self.address = address
        self.actors = actors
        self.threads = threads
        self.summary: dict[str, Any] = {}
        self._start_s = 0.0
        self._joined = connect(address)

    def close(self) -> None:
        """Leave the cluster if this run joined it (a Ray runtime it started stops)."""
        if self._joined and ray.is_initialized():
            ray.shutdown()
        self._joined = False

    def _spec(self, slots: int, **more: Any) -> WorkerSpec:
        return WorkerSpec(
            bundle=str(self.root),
            identity=self.bundle.identity,
            llama_version=str(backend.build_info()["version"]),
            config=self.cfg,
            slots=slots,
            **more,
        )

    def _pool(self, spec: WorkerSpec) -> Pool:
        t0 = time.perf_counter()
        pool = Pool(spec, self.actors, self.threads)
        self._start_s = time.perf_counter() - t0
        return pool

    def _record(self, pool: Pool, items: int, moved: int) -> None:
        self.summary = {
            "address": self.address or "local",
            "actors": len(pool.actors),
            "threads_per_actor": self.threads,
            "start_s": round(self._start_s, 3),
            "workers": pool.workers,
            "bytes_per_item": round(moved / items) if items else 0,
            "deaths": [asdict(d) for d in pool.deaths],
        }

    def evaluate(
        self,
        scenarios: Sequence[Scenario],
        *,
        sampling: SamplingParams,
        slots: int,
        embed_model: Path | None,
        on_result: Callable[[dict[str, Any]], None],
        share_prefix: bool = True,
        npcs: Mapping[str, NpcDef] | None = None,
    ) -> None:
        """Each scenario's result to ``on_result`` as it comes back (any order)."""
        files = {sc.npc_file for sc in scenarios if sc.npc_file}
        spec = self._spec(
            slots,
            sampling=sampling,
            embed_model=str(embed_model.resolve()) if embed_model else None,
            share_prefix=share_prefix,
            npcs=dict(npcs or {}),
            npc_files={f: npc_mod.load(Path(f)) for f in sorted(files)},
        )
        moved = [0]

        def back(_: int, result: dict[str, Any]) -> None:
            moved[0] += len(pickle.dumps(result))
            on_result(result)

        items = list(scenarios)
        moved[0] = sum(len(pickle.dumps(sc)) for sc in items)
        with self._pool(spec) as pool:
            try:
                pool.map("evaluate", items, chunk_size(len(items), len(pool.actors), slots), back)
            finally:
                self._record(pool, len(items), moved[0])

    def states(
        self, records: Sequence[Scenario], tick: Callable[[], None] = lambda: None
    ) -> np.ndarray:
        """The `<STATE>` vector of each heads-fit record, in order (as
        :func:`npcchat.eval.states.state_vectors` computes them on this machine)."""
        rows: list[np.ndarray | None] = [None] * len(records)
        items = list(records)
        moved = [sum(len(pickle.dumps(sc)) for sc in items)]

        def back(i: int, row: np.ndarray) -> None:
            rows[i] = row
            moved[0] += row.nbytes
            tick()

        with self._pool(self._spec(1)) as pool:
            try:
                pool.map("states", items, chunk_size(len(items), len(pool.actors), 4), back)
            finally:
                self._record(pool, len(items), moved[0])
        if not items:
            return np.zeros((0, self.bundle.hidden_size))
        missing = sum(r is None for r in rows)
        if missing:  # never silently: a gap would shift every later record's labels
            raise RuntimeError(f"{missing} state vectors did not come back from the Ray workers")
        return np.stack([r for r in rows if r is not None]).astype(np.float64)
