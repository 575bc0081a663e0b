"""``npcchat bench rules``: what the NPC's rules cost, each figure against its baseline
measured in the same run.

* **Rules per turn**: the decisions around one engine turn (judging the flags on the heads,
  the guard, effects and actions after it) for an NPC file with rules, against the same
  work for the same file without them, on the heads of a real turn; median µs over many
  repetitions, next to the median time of the whole turn.
* **Reply checks while generating**: decode speed (tokens/s) of the same greedy turns with
  a reply check that never fires and without one (the cost of checking every token), and
  with one that does fire (the cost of backing up).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from npcchat.config import KnowledgeConfig
from npcchat.conversation import Conversation, new_session
from npcchat.mind import npc as npc_mod
from npcchat.mind.mind import NpcMind
from npcchat.rules.model import ReplyCheck, Rules
from npcchat.runtime.engine import Engine
from npcchat.types import SamplingParams, Turn

ROUNDS = 5
LINES = (
    "Hello there.",
    "How do I get to the northern mine?",
    "I found the iron ore. Here, take it.",
    "Can I have one of your swords?",
    "You are a useless fool.",
)


def _median_us(fn: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    return statistics.median(times)


def _open(engine: Engine, npc: npc_mod.NpcDef, sampling: SamplingParams) -> Conversation:
    mind = NpcMind(engine, npc.knowledge, engine.cfg.knowledge)
    return Conversation(engine, new_session(npc, engine, 0), sampling, mind=mind)


def run(engine: Engine, npc_path: Path, turns: int = 20, repeats: int = 2000) -> dict[str, Any]:
    npc = npc_mod.load(npc_path)
    bare = replace(npc, knowledge=replace(npc.knowledge, rules=Rules()))
    greedy = SamplingParams(temperature=0.0, top_p=1.0, repeat_penalty=1.0, max_tokens=48, seed=0)

    # -- rules per turn: the mind's work around a turn, with and without rules --------------
    conv = _open(engine, npc, greedy)
    turn_ms: list[float] = []
    sample: list[tuple[Any, Turn]] = []
    for i in range(turns):
        before = conv.session
        t0 = time.perf_counter()
        turn = conv.say(LINES[i % len(LINES)])
        turn_ms.append((time.perf_counter() - t0) * 1e3)
        sample.append((before, turn))
    cfg: KnowledgeConfig = engine.cfg.knowledge
    with_rules = NpcMind(engine, npc.knowledge, cfg)
    without = NpcMind(engine, bare.knowledge, cfg)

    def around(mind: NpcMind) -> None:
        for session, turn in sample:
            guide = mind.guide(session)
            if guide is not None:
                guide(turn.heads)
            mind.after(session, replace(turn, rules=None))

    per = max(1, repeats // len(sample))
    rules_us = _median_us(lambda: around(with_rules), per) / len(sample)
    plain_us = _median_us(lambda: around(without), per) / len(sample)

    # -- reply checks while generating ------------------------------------------------------
    never = ReplyCheck(("zzqx never said phrase",), None, "bench-never")
    interventions: dict[str, int] = {}
    plain_turns = _turns(engine, bare, greedy, turns)
    phrases = [_phrase(t.reply) for t in plain_turns if _phrase(t.reply)]
    firing = ReplyCheck(tuple(dict.fromkeys(phrases)) or ("zzqx",), None, "bench-fires")
    rounds: dict[str, list[float]] = {}
    for _ in range(ROUNDS):  # interleaved rounds, the median of each: the noise is shared
        for name, checks in (("none", ()), ("never_fires", (never,)), ("fires", (firing,))):
            know = replace(bare.knowledge, rules=Rules(checks=checks))
            got = _turns(engine, replace(bare, knowledge=know), greedy, turns)
            tokens = sum(t.generated_tokens for t in got)
            seconds = sum(t.timings.generate_ms for t in got) / 1e3
            rounds.setdefault(name, []).append(tokens / seconds if seconds else 0.0)
            interventions[name] = sum(len(t.interventions) for t in got)
    speeds = {name: statistics.median(values) for name, values in rounds.items()}
    return {
        "npc": str(npc_path),
        "turns": turns,
        "turn_ms_median": statistics.median(turn_ms),
        "rules_us_per_turn": rules_us,
        "no_rules_us_per_turn": plain_us,
        "rules_overhead_us": rules_us - plain_us,
        "rules_overhead_of_turn": (rules_us - plain_us) / 1e3 / statistics.median(turn_ms),
        "decode_tok_s": speeds,
        "check_vs_none": speeds["never_fires"] / speeds["none"] if speeds["none"] else None,
        "backing_up_vs_none": speeds["fires"] / speeds["none"] if speeds["none"] else None,
        "check_interventions": interventions,
    }


def _turns(engine: Engine, npc: npc_mod.NpcDef, sampling: SamplingParams, n: int) -> list[Turn]:
    conv = _open(engine, npc, sampling)
    out = []
    for i in range(n):
        out.append(conv.say(LINES[i % len(LINES)]))
        if (i + 1) % len(LINES) == 0:
            conv.reset()
    return out


def _phrase(reply: str) -> str:
    words = reply.replace(",", " ").replace(".", " ").split()
    return " ".join(words[len(words) // 2 : len(words) // 2 + 2]) if len(words) >= 4 else ""
