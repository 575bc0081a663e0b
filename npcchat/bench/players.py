"""Closed-loop players and what one load of them measured, shared by ``npcchat bench
serve`` (npcchat's server) and its ``--peer`` (llama-server): the same lines, the same
figures, computed the same way on both sides."""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LINES = (
    "Hello there. Have you seen anything strange around the harbour lately?",
    "I found a broken compass on the beach. Does it mean something to you?",
    "The fishermen talk about lights on the reef at night. What do you know?",
    "Could you tell me more about the ship that sank last winter?",
    "I need a way into the old lighthouse. Can you help me?",
    "Thank you. I will come back when I know more.",
)


@dataclass(frozen=True)
class LoadResult:
    players: int
    turns: int
    errors: int
    wall_s: float
    turns_per_s: float
    ttft_p50_ms: float
    ttft_p95_ms: float
    latency_p50_ms: float
    latency_p95_ms: float
    generated: int = 0  # reply tokens of all good turns


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] * 1e3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def summarize(players: int, records: Sequence[Any], wall: float) -> LoadResult:
    """One load's figures from its turns' ``(ok, ttft_s, latency_s, generated)``."""
    good = [r for r in records if r[0]]
    return LoadResult(
        players=players,
        turns=len(good),
        errors=len(records) - len(good),
        wall_s=wall,
        turns_per_s=len(good) / wall,
        ttft_p50_ms=_pct([r[1] for r in good], 50),
        ttft_p95_ms=_pct([r[1] for r in good], 95),
        latency_p50_ms=_pct([r[2] for r in good], 50),
        latency_p95_ms=_pct([r[2] for r in good], 95),
        generated=sum(r[3] for r in good),
    )
