"""``npcchat bench``: what a turn costs, as ratios against plain llama.cpp in the same run.

Figures: prefill and decode tokens/s, heads microseconds per turn, turn time divided by a
llama.cpp generate-only run on the same prompt tokens and token count, peak RSS of a full
turn beside llama.cpp alone (two child processes, the same prompt), and the wall time of
``npcchat --help``. Never used as timed assertions in tests.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from npcchat import session as session_mod
from npcchat.config import Config
from npcchat.conversation import new_session
from npcchat.engine import Engine
from npcchat.npc import NpcDef
from npcchat.session import Session
from npcchat.types import SamplingParams, Tags

_WORDS = [
    "the",
    "old",
    "factory",
    "stands",
    "by",
    "the",
    "river",
    "where",
    "the",
    "mother",
    "waits",
    "for",
    "news",
    "of",
    "her",
    "lost",
    "daughter",
    "and",
    "the",
    "blacksmith",
    "forges",
    "blades",
    "for",
    "the",
    "guard",
    "while",
    "travelers",
    "trade",
    "stories",
]
PLAYER_LINE = "Have you seen anything strange around the factory lately?"


def bench_session(engine: Engine, prompt_tokens: int) -> Session:
    """A session whose prompt is about ``prompt_tokens`` tokens long (lore pads it)."""
    npc = NpcDef(
        id="bench_npc", name="bench", tags=Tags(quest_stage="in_progress", location="map1")
    )
    s = new_session(npc, engine, seed=1)
    words: list[str] = []
    while True:
        fitted = engine.fit(engine.prompt_input(replace(s, lore=" ".join(words)), PLAYER_LINE), 1)
        if len(fitted.tokens) >= prompt_tokens or len(fitted.tokens) >= engine.model.n_ctx - 256:
            return replace(s, lore=" ".join(words))
        words += _WORDS[: max(1, (prompt_tokens - len(fitted.tokens)) // 2)]


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1e3


def timing(engine: Engine, s: Session, gen_tokens: int, repeats: int) -> dict[str, float]:
    from npcchat.backend import Model, baseline_generate

    model = engine.model
    assert isinstance(model, Model)
    params = SamplingParams(
        temperature=0.0, top_p=1.0, repeat_penalty=1.05, max_tokens=gen_tokens, seed=0
    )
    engine.turn(s, PLAYER_LINE, params)  # warm-up: page in weights, build graphs
    turns, bases, prefill, decode = [], [], [], []
    n_prompt = n_gen = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        r = engine.turn(s, PLAYER_LINE, params)
        turns.append(time.perf_counter() - t0)
        n_prompt, n_gen = r.prompt_tokens, r.generated_tokens
        prefill.append(r.prompt_tokens / (r.timings.prefill_ms / 1e3))
        decode.append(max(1, r.generated_tokens) / (r.timings.generate_ms / 1e3))
        tokens = engine.fit(engine.prompt_input(s, PLAYER_LINE), gen_tokens).tokens
        t0 = time.perf_counter()
        # the turn also samples the token that ends it: the baseline samples as many
        baseline_generate(
            model, tokens, r.generated_tokens + (r.stop_reason != "length"), params, 0
        )
        bases.append(time.perf_counter() - t0)
    return {
        "prompt_tokens": n_prompt,
        "generated_tokens": n_gen,
        "prefill_tok_s": statistics.median(prefill),
        "decode_tok_s": statistics.median(decode),
        "turn_ms": _median_ms(turns),
        "generate_only_ms": _median_ms(bases),
        "turn_over_generate_only": statistics.median(turns) / statistics.median(bases),
    }


def heads_us(engine: Engine, n: int = 2000) -> float:
    import numpy as np

    vec = np.random.default_rng(0).standard_normal(engine.model.n_embd).astype(np.float32)
    for _ in range(100):
        engine.run_heads(vec)
    batches = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n // 5):
            engine.run_heads(vec)
        batches.append((time.perf_counter() - t0) / (n // 5))
    return statistics.median(batches) * 1e6


def _child(mode: str, bundle: Path, session_file: Path, cfg_file: Path, gen_tokens: int) -> float:
    cmd = [
        sys.executable,
        "-m",
        "npcchat._bench_child",
        mode,
        str(bundle),
        str(session_file),
        str(cfg_file),
        str(gen_tokens),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"bench child {mode} failed: {out.stderr.strip()[-500:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["maxrss_mb"])


def peak_rss(engine: Engine, s: Session, cfg: Config, gen_tokens: int) -> dict[str, float]:
    import tomli_w

    with tempfile.TemporaryDirectory() as tmp:
        sf = Path(tmp) / "bench.json"
        session_mod.save(s, sf)
        tokens = engine.fit(engine.prompt_input(s, PLAYER_LINE), gen_tokens).tokens
        sf.with_suffix(".tokens").write_text(json.dumps(list(tokens)))
        cf = Path(tmp) / "cfg.toml"
        r = cfg.runtime
        cf.write_text(
            tomli_w.dumps({"n_ctx": r.n_ctx, "n_batch": r.n_batch, "n_threads": r.n_threads})
        )
        base = _child("llama", engine.bundle.root, sf, cf, gen_tokens)
        full = _child("npcchat", engine.bundle.root, sf, cf, gen_tokens)
    return {"rss_llama_mb": base, "rss_npcchat_mb": full, "rss_overhead_mb": full - base}


def help_seconds(repeats: int = 3) -> float:
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "npcchat", "--help"], capture_output=True, check=True)
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def run(
    engine: Engine, cfg: Config, prompt_tokens: int, gen_tokens: int, repeats: int, rss: bool
) -> dict[str, Any]:
    s = bench_session(engine, prompt_tokens)
    report: dict[str, Any] = {
        "bundle": engine.bundle.name,
        "quant": engine.bundle.quant,
        "n_embd": engine.model.n_embd,
        "threads": cfg.runtime.n_threads or "auto",
    }
    report |= timing(engine, s, gen_tokens, repeats)
    report["heads_us"] = heads_us(engine)
    if rss:
        report |= peak_rss(engine, s, cfg, gen_tokens)
    report["help_s"] = help_seconds()
    return report
