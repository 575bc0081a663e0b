"""What one Ray actor holds and does: the bundle loaded once, chunks of scenarios (or of
heads-fit records) in, results out. Plain Python, no Ray here: :mod:`npcchat.cluster.pool`
wraps :class:`Worker` as an actor, so the worker's code is the local code.

**The bundle is read from a path every worker sees** (the same path on each node: a shared
file system, or the bundle baked into the workers' image), not shipped through Ray's
runtime environment. A shipped runtime environment is a zip uploaded to the cluster's
object store and unpacked on every node: fine for code, wrong for a 2 GB Q4_K_M model
that llama.cpp memory-maps (actors on one node then share one copy of the weights in the
page cache). A worker checks what it found: a missing bundle, other weights or another
llama.cpp version is a one-line error naming the node, never a hang or a silently
different report.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from npcchat.config import Config
from npcchat.errors import ConfigError
from npcchat.eval import runner
from npcchat.eval.scenarios import Scenario
from npcchat.eval.similarity import choose_similarity
from npcchat.eval.states import state_vectors
from npcchat.mind.npc import NpcDef
from npcchat.runtime import backend
from npcchat.runtime import bundle as bundle_mod
from npcchat.runtime.engine import Engine
from npcchat.types import SamplingParams


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, sent once when its actor starts."""

    bundle: str  # the bundle directory, the same path on every node
    identity: str  # what the driver loaded: the worker must find the same weights
    llama_version: str  # the driver's llama-cpp-python: another build could change results
    config: Config
    slots: int  # scenarios run side by side in the worker's context (eval --parallel)
    sampling: SamplingParams | None = None
    embed_model: str | None = None  # reply similarity model (a path every worker sees)
    share_prefix: bool = True
    npcs: Mapping[str, NpcDef] | None = None  # --npcs, by id
    npc_files: Mapping[str, NpcDef] | None = None  # scenario npc_file paths, read by the driver


def node() -> str:
    return f"{socket.gethostname()} (pid {os.getpid()})"


def _rss_mb() -> float:
    """Resident memory of this process, MB (Linux; 0 where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Worker:
    """A loaded engine on one node. Construction fails fast with a :class:`ConfigError`
    when the node cannot give results identical to the driver's."""

    def __init__(self, spec: WorkerSpec) -> None:
        t0 = time.perf_counter()
        root = Path(spec.bundle)
        if not (root / "bundle.toml").is_file():
            raise ConfigError(
                f"worker {node()}: no bundle at {root}",
                hint="put the bundle on a path every Ray node sees (a shared file system, "
                "or the same path in each node's image)",
            )
        found = bundle_mod.load(root)
        if found.identity != spec.identity:
            raise ConfigError(
                f"worker {node()}: the bundle at {root} is {found.identity}, "
                f"the driver's is {spec.identity}",
                hint="every node must hold the same bundle files",
            )
        self.build = backend.build_info()
        version = str(self.build["version"])
        if version != spec.llama_version:
            raise ConfigError(
                f"worker {node()}: llama-cpp-python {version}, the driver runs "
                f"{spec.llama_version}; another build can give other results",
                hint="install the same npcchat and llama-cpp-python on every node",
            )
        self.spec = spec
        self.sim = choose_similarity(Path(spec.embed_model) if spec.embed_model else None)
        self.engine = Engine.load(found, spec.config, n_seq=spec.slots)
        self.load_s = time.perf_counter() - t0

    def describe(self) -> dict[str, Any]:
        """Where the worker runs and what loading cost it (for the report's ``ray`` part)."""
        return {
            "node": node(),
            "load_s": round(self.load_s, 3),
            "rss_mb": round(_rss_mb(), 1),
            "threads": self.spec.config.runtime.n_threads,
            "cpu": self.build["backends"].get("CPU", {}),
        }

    def evaluate(self, chunk: list[Scenario]) -> Iterator[dict[str, Any]]:
        """Each scenario's result as it finishes, the same engine and settings as a
        local run (``slots`` side by side)."""
        spec = self.spec
        assert spec.sampling is not None
        yield from runner.results(
            self.engine,
            chunk,
            spec.sampling,
            self.sim,
            spec.share_prefix,
            spec.npcs,
            spec.npc_files,
        )

    def states(self, chunk: list[Scenario]) -> np.ndarray:
        """The `<STATE>` vectors of heads-fit records (one prefill each)."""
        return state_vectors(self.engine, chunk)

    def close(self) -> None:
        self.engine.close()
