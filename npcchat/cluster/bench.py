"""``npcchat bench ray``: the same eval scenarios on this machine and on Ray actors,
measured in one run, with the two sets of results compared.

Figures: scenarios/s of the local run (one process, ``local_threads`` threads, --parallel
``slots``), of the Ray run from the first call (actor start and bundle load included) and
from the moment every actor was ready (the steady rate a long run approaches), their
ratios, each actor's load time and memory, the bytes per scenario through the object store,
and whether the results are identical (timings aside). The local baseline is measured first
and alone, so neither run competes with the other for cores.
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from npcchat.bench.measure import bench_scenarios, bench_session
from npcchat.config import Config
from npcchat.eval import runner
from npcchat.eval.similarity import Similarity
from npcchat.runtime import bundle as bundle_mod
from npcchat.runtime.engine import Engine
from npcchat.types import SamplingParams

from .eval import RayRun


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n, seed=0)


def _comparable(result: dict[str, Any]) -> dict[str, Any]:
    """A scenario's result without what measures the run rather than the model: timings,
    and how many prompt tokens were decoded (a shared prompt head already in the KV cache
    is not decoded again, and what is there depends on what ran before on that engine)."""
    turns = [
        {
            **{k: v for k, v in t.items() if k != "timings_ms"},
            "tokens": {k: v for k, v in t["tokens"].items() if k != "prefill"},
        }
        for t in result["turns"]
    ]
    return {**result, "turns": turns}


def run(
    bundle_root: Path,
    cfg: Config,
    *,
    scenarios: int = 16,
    gen_tokens: int = 64,
    prompt_tokens: int = 400,
    slots: int = 1,
    local_threads: int = 0,
    address: str | None = None,
    actors: int | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    local_cfg = replace(cfg, runtime=replace(cfg.runtime, n_threads=local_threads))
    sampling = _greedy(gen_tokens)
    with Engine.load(bundle_mod.load(bundle_root), local_cfg, n_seq=slots) as engine:
        s = bench_session(engine, prompt_tokens)
        items = bench_scenarios(s, scenarios)
        engine.turn(s, "warm-up", _greedy(1))
        engine.forget()
        t0 = time.perf_counter()
        local = list(runner.results(engine, items, sampling, Similarity()))
        local_s = time.perf_counter() - t0
    ray_run = RayRun(bundle_root, cfg, address, actors, threads)
    remote: list[dict[str, Any]] = []
    try:
        t0 = time.perf_counter()
        ray_run.evaluate(
            items, sampling=sampling, slots=slots, embed_model=None, on_result=remote.append
        )
        ray_s = time.perf_counter() - t0
    finally:
        ray_run.close()
    summary = ray_run.summary
    steady_s = ray_s - summary["start_s"]
    by_id = {r["id"]: _comparable(r) for r in remote}
    identical = all(by_id.get(r["id"]) == _comparable(r) for r in local)
    local_rate, ray_rate, steady_rate = scenarios / local_s, scenarios / ray_s, scenarios / steady_s
    return {
        "scenarios": scenarios,
        "gen_tokens": gen_tokens,
        "prompt_tokens": prompt_tokens,
        "slots": slots,
        "local_threads": local_threads or "llama.cpp default",
        "local_scenarios_s": local_rate,
        "ray_scenarios_s": ray_rate,
        "ray_steady_scenarios_s": steady_rate,
        "ray_over_local": ray_rate / local_rate,
        "ray_steady_over_local": steady_rate / local_rate,
        "ray_start_s": summary["start_s"],
        "actors": summary["actors"],
        "threads_per_actor": summary["threads_per_actor"],
        "actor_load_s": [w["load_s"] for w in summary["workers"]],
        "actor_rss_mb": [w["rss_mb"] for w in summary["workers"]],
        "bytes_per_scenario": summary["bytes_per_item"],
        "identical_results": identical,
    }
