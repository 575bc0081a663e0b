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
from typing import TYPE_CHECKING, Any

from npcchat.bench.baseline import baseline_generate
from npcchat.config import Config
from npcchat.conversation import new_session
from npcchat.mind.npc import NpcDef
from npcchat.runtime.engine import Engine
from npcchat.sessions import session as session_mod
from npcchat.sessions.session import Session
from npcchat.types import SamplingParams, Tags

if TYPE_CHECKING:
    from npcchat.eval.scenarios import Scenario

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
    model = engine.model
    params = SamplingParams(
        temperature=0.0, top_p=1.0, repeat_penalty=1.05, max_tokens=gen_tokens, seed=0
    )
    engine.turn(s, PLAYER_LINE, params)  # warm-up: page in weights, build graphs
    turns, bases, prefill, decode = [], [], [], []
    n_prompt = n_gen = 0
    for _ in range(repeats):
        engine.forget()  # a cold turn: the whole prompt is decoded, as in the baseline
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
        "npcchat.bench.child",
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


def _greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, top_p=1.0, repeat_penalty=1.05, max_tokens=n, seed=0)


def _ttft(r: Any) -> float:
    return float(r.timings.prefill_ms + r.timings.heads_ms)


def multi_turn(
    engine: Engine, s: Session, gen_tokens: int, turns: int = 10
) -> tuple[dict[str, float], Session]:
    """A 10-turn conversation as `talk` runs it: between turns, while the player types, the
    next prompt is decoded up to `<PLAYER>` (reported apart as ``predecoded``); what the
    player waits for is the prefill after they spoke."""
    from npcchat.conversation import Conversation

    engine.forget()
    conv = Conversation(engine, s, _greedy(gen_tokens))
    results, ahead = [], []
    for i in range(turns):
        results.append(conv.say(f"{PLAYER_LINE} ({i + 1})"))
        ahead.append(conv.predecode())
    first, last = results[0], results[-1]
    return {
        "turn1_prefill_tokens": first.prefill_tokens,
        f"turn{turns}_prefill_tokens": last.prefill_tokens,
        f"turn{turns}_predecoded_tokens": ahead[-2],
        f"turn{turns}_prompt_tokens": last.prompt_tokens,
        f"prefill_tokens_turn{turns}_over_turn1": last.prefill_tokens / first.prefill_tokens,
        "turn1_ttft_ms": _ttft(first),
        f"turn{turns}_ttft_ms": _ttft(last),
    }, conv.session


def resume(bundle_root: Path, cfg: Config, s: Session, gen_tokens: int) -> dict[str, float]:
    """TTFT of the next turn after resuming a saved session, with and without its snapshot."""
    from npcchat.conversation import Conversation
    from npcchat.runtime.engine import load_engine

    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench-session.toml"
        with load_engine(bundle_root, cfg) as engine:  # replay the last turn to save a snapshot
            conv = Conversation(
                engine, replace(s, history=s.history[:-1]), _greedy(gen_tokens), path
            )
            conv.say(s.history[-1].player)
            conv.predecode()  # as talk does before it waits for the player
        for mode in ("snapshot", "cold"):
            runtime = replace(cfg.runtime, snapshots=mode == "snapshot")
            with load_engine(bundle_root, replace(cfg, runtime=runtime)) as engine:
                engine.turn(s, "warm-up", _greedy(1))  # the same warm-up for both modes
                engine.forget()
                conv = Conversation(engine, session_mod.load(path), _greedy(gen_tokens), path)
                conv.resume_snapshot()
                conv.path = None  # measure, do not save
                r = conv.say(PLAYER_LINE + " (resumed)")
                out[f"resume_{mode}_ttft_ms"] = _ttft(r)
                out[f"resume_{mode}_prefill_tokens"] = r.prefill_tokens
    out["resume_ttft_over_cold"] = out["resume_snapshot_ttft_ms"] / out["resume_cold_ttft_ms"]
    return out


def bench_scenarios(s: Session, n: int) -> list[Scenario]:
    """``n`` scenarios of one NPC, as in a designer's regression file: the lore of ``s``,
    four trust levels, a different player line each."""
    from npcchat.eval.scenarios import Scenario

    return [
        Scenario(
            id=f"b{i}",
            source="bench",
            kind="unlabelled",
            npc_id=s.npc_id,
            tags=replace(s.tags, trust=round(0.2 + 0.2 * (i % 4), 2)),
            lore=s.lore,
            turns=((f"{PLAYER_LINE} #{i}", None),),
        )
        for i in range(n)
    ]


def eval_throughput(
    bundle_root: Path, cfg: Config, s: Session, gen_tokens: int, n: int = 16
) -> dict[str, float]:
    """Scenarios per second through `npcchat eval`'s runner at --parallel 1 and 8, with the
    shared prompt head decoded once (eval's default) and decoded for every scenario.

    The scenarios: :func:`bench_scenarios`."""
    from npcchat.eval import runner as evaluate
    from npcchat.eval.similarity import Similarity
    from npcchat.runtime import bundle as bundle_mod

    scenarios = bench_scenarios(s, n)
    out: dict[str, float] = {}
    b = bundle_mod.load(bundle_root)
    for par in (1, 8):
        with Engine.load(b, cfg, n_seq=par) as engine:
            engine.turn(s, "warm-up", _greedy(1))
            for share, name in ((True, ""), (False, "_noshare")):
                engine.forget()
                t0 = time.perf_counter()
                evaluate.run(
                    engine,
                    scenarios,
                    _greedy(gen_tokens),
                    Similarity(),
                    lambda r: None,
                    share_prefix=share,
                )
                out[f"eval_parallel{par}{name}_scenarios_s"] = n / (time.perf_counter() - t0)
    for name in ("", "_noshare"):
        out[f"eval_parallel8_over_1{name}"] = (
            out[f"eval_parallel8{name}_scenarios_s"] / out[f"eval_parallel1{name}_scenarios_s"]
        )
    out["eval_share_speedup_parallel1"] = (
        out["eval_parallel1_scenarios_s"] / out["eval_parallel1_noshare_scenarios_s"]
    )
    return out


def run(
    engine: Engine,
    cfg: Config,
    prompt_tokens: int,
    gen_tokens: int,
    repeats: int,
    rss: bool,
    extras: bool = True,
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
    if extras:
        figures, after = multi_turn(engine, s, gen_tokens)
        report |= figures
        report |= resume(engine.bundle.root, cfg, after, gen_tokens)
        report |= eval_throughput(engine.bundle.root, cfg, s, gen_tokens)
    return report
