"""Closed-loop players and what one load of them measured, shared by ``npcchat bench
serve`` (npcchat's server) and its ``--peer`` (llama-server): the same lines, the same
figures, computed the same way on both sides."""

from __future__ import annotations

import itertools
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
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
    # the longest wait between two tokens of one reply (what a player sees while other
    # turns' prompts are decoded): p95 and max over the good turns
    stall_p95_ms: float = float("nan")
    stall_max_ms: float = float("nan")


def _pct(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] * 1e3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_loop(
    players: int, play: Callable[[int, list[Any]], None], stagger: float = 0.0
) -> LoadResult:
    """``players`` closed-loop players: ``play(i, records)`` runs player ``i``'s turns,
    appending one ``(ok, ttft_s, latency_s, generated, stall_s)`` record per turn. Player
    ``i`` starts ``i * stagger`` seconds after the first (0: all at once)."""
    records: list[Any] = []

    def delayed(i: int) -> None:
        time.sleep(i * stagger)
        play(i, records)

    threads = [threading.Thread(target=delayed, args=(i,)) for i in range(players)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summarize(players, records, time.perf_counter() - t0)


class ChildServer:
    """A server as a child process on a free loopback port (``command(port)`` starts it),
    ready once ``health`` answers 200; its output goes to ``log``. Both sides of ``bench
    serve`` (npcchat serve, and llama-server as the peer) run through this."""

    def __init__(
        self, name: str, command: Callable[[int], list[str]], health: str, log: Path
    ) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.command = command(self.port)
        self._log_path = log
        self._log = log.open("wb")
        self.proc = subprocess.Popen(self.command, stdout=self._log, stderr=subprocess.STDOUT)
        self._wait(health)

    def _wait(self, health: str) -> None:
        import httpx

        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = self._log_path.read_text(errors="replace").strip()[-800:]
                raise RuntimeError(f"{self.name} exited ({self.proc.returncode}): {text}")
            try:
                if httpx.get(f"{self.url}{health}", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer {health} within 300 s")

    def peak_rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def longest_gap(times: Sequence[float]) -> float:
    """The longest wait between two consecutive arrivals (0 for fewer than two)."""
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def summarize(players: int, records: Sequence[Any], wall: float) -> LoadResult:
    """One load's figures from its turns' ``(ok, ttft_s, latency_s, generated, stall_s)``."""
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
        stall_p95_ms=_pct([r[4] for r in good], 95),
        stall_max_ms=_pct([r[4] for r in good], 100),
    )
