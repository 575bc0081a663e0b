"""``npcchat bench serve``: simulated players against a real ``npcchat serve`` on loopback.

Each player is a closed loop: it sends its next line when the answer to its last one has
arrived (over SSE, as a game would). Time to first token is the client's latency minus the
generation time the final event reports: waiting, prefill and heads (a random model's first
tokens often hold no text, so the first text piece would measure the wrong thing). For
each player count: aggregate turns per second, p50/p95 time to first token and turn
latency. Then the same turns of one player through the Python API in-process (same
bundle, settings and slots) give the cost of HTTP and the server, and the server's peak
RSS is read at the end (after the largest player count). Ratios, not timed assertions.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from npcchat.bench import players as players_mod
from npcchat.bench.players import LINES, ChildServer, LoadResult

LORE = (
    "The port of Saltmere trades salt, tar and stories. Its lighthouse went dark three "
    "winters ago when the keeper vanished; since then ships steer by the chapel bell. The "
    "harbour master keeps a ledger of every wreck on the northern reef and will not show it "
    "to strangers. Smugglers use the sea caves below the cliffs at low tide. "
)


def write_npc(directory: Path) -> Path:
    """The benchmark NPC: a few hundred tokens of lore, like a real one."""
    path = directory / "bench_captain.toml"
    path.write_text(
        'id = "bench_captain"\nname = "Captain Sela"\nlocation = "saltmere_port"\n'
        f'lore = "{LORE * 2}"\n'
        'description = "Gulls circle over the quay; the captain checks her charts."\n'
        '[tags]\nquest_stage = "in_progress"\nrelationship = 0.5\ntrust = 0.5\n'
        'npc_mood = "wary"\nplayer_reputation = "unknown"\nstyle = "curt"\n',
        "utf-8",
    )
    return path


def _config_file(directory: Path, prefill_chunk: int | None = None) -> Path:
    """Sampling as in play (temperature 0.7) with a fixed seed: every session draws the
    same tokens in the server and in-process, and a random model's replies hold text (greedy
    decoding on random weights settles on a token with none). Written once per run (with
    ``prefill_chunk`` when given), then read by every side."""
    path = directory / "bench-config.toml"
    if prefill_chunk is not None or not path.exists():
        text = "[sampling]\ntemperature = 0.7\nseed = 0\n"
        if prefill_chunk is not None:
            text += f"\n[runtime]\nprefill_chunk = {prefill_chunk}\n"
        path.write_text(text, "utf-8")
    return path


def start_server(
    bundle: Path, work: Path, slots: int, queue: int, gpu_layers: int | None = None
) -> ChildServer:
    """``npcchat serve`` on the bench NPC, as a child process on a free loopback port."""

    def command(port: int) -> list[str]:
        cmd = [sys.executable, "-m", "npcchat", "serve", "--bundle", str(bundle)]
        cmd += ["--npcs", str(work / "npcs"), "--sessions", str(work / "sessions")]
        cmd += ["--port", str(port), "--slots", str(slots), "--queue", str(queue)]
        cmd += ["--config", str(_config_file(work)), "--log-level", "warning"]
        if gpu_layers is not None:
            cmd += ["--gpu-layers", str(gpu_layers)]
        return cmd

    return ChildServer("npcchat serve", command, "/healthz", work / "serve.log")


def _player(url: str, player: str, turns: int, tokens: int, out: list[Any]) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=600) as client:
        for i in range(turns):
            body = {
                "player_id": player,
                "npc_id": "bench_captain",
                "text": LINES[i % len(LINES)],
                "max_tokens": tokens,
                "stream": True,
            }
            t0 = time.perf_counter()
            final = None
            with client.stream("POST", "/v1/turn", json=body) as r:
                event = ""
                for line in r.iter_lines():
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event in ("turn", "error"):
                        final = (event, json.loads(line[6:]))
            done = time.perf_counter()
            ok = r.status_code == 200 and final is not None and final[0] == "turn"
            if not ok or final is None:
                out.append((False, 0.0, done - t0, 0, 0.0))
                continue
            # to the first token: what is left of the latency before generation started
            meta = final[1]["meta"]
            generate = meta["timings_ms"]["generate"] / 1e3
            generated = meta["tokens"]["generated"]
            # the server's own figure: the longest wait between two tokens (a random
            # model's tokens are mostly ones with no text, so the pieces a client gets
            # cannot time them)
            stall = meta["timings_ms"]["stall"] / 1e3
            out.append((True, done - t0 - generate, done - t0, generated, stall))


def closed_loop(
    url: str, players: int, turns: int, tokens: int, tag: str, stagger: float = 0.0
) -> LoadResult:
    """``players`` closed-loop players, ``turns`` turns each (see
    :func:`npcchat.bench.players.closed_loop`)."""
    return players_mod.closed_loop(
        players, lambda i, out: _player(url, f"{tag}-{i}", turns, tokens, out), stagger
    )


class InProcess:
    """The same turns through the Python API, with the server's bundle and settings."""

    def __init__(self, bundle: Path, work: Path, slots: int) -> None:
        import npcchat
        from npcchat.mind import npc as npc_mod

        self.work = work
        self.npc = npc_mod.load(work / "npcs" / "bench_captain.toml")
        self.runtime = npcchat.load(
            bundle, config=npcchat.load_config(_config_file(work)), slots=slots
        )
        self.runtime.start_batching()

    def player(self, name: str, turns: int, tokens: int) -> float:
        """One player's ``turns`` turns in a new session; the total time."""
        chat = self.runtime.open(self.npc, session=self.work / "inproc" / f"{name}.json")
        t0 = time.perf_counter()
        for i in range(turns):
            chat.say(LINES[i % len(LINES)], sampling=replace(chat.sampling, max_tokens=tokens))
        return time.perf_counter() - t0

    def close(self) -> None:
        self.runtime.close()


def run(
    bundle: Path,
    players: Sequence[int] = (1, 4, 8, 16),
    turns: int = 3,
    tokens: int = 64,
    slots: int = 8,
    queue: int | None = None,
    rounds: int = 3,
    peer: Path | None = None,
    gpu_layers: int | None = None,
    stagger: float = 0.0,
    prefill_chunk: int | None = None,
    paired: int = 0,
) -> dict[str, Any]:
    """``peer``: a llama-server binary, measured after npcchat (alone on the machine) with
    the same players (:mod:`npcchat.bench.peer`). ``stagger``: player i of a load starts
    i * stagger seconds after the first, so prompts join while other replies stream.
    ``prefill_chunk``: the server's ``runtime.prefill_chunk`` (default: the config's).
    ``paired``: that many rounds of one player against each side in alternation, both
    servers up (see :func:`_paired`)."""
    import npcchat

    peer_loads: list[LoadResult] = []
    peer_info: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="npcchat-bench-serve-") as tmp:
        work = Path(tmp)
        (work / "npcs").mkdir()
        (work / "inproc").mkdir()
        npc_file = write_npc(work / "npcs")
        chunk = npcchat.load_config(_config_file(work, prefill_chunk)).runtime.prefill_chunk
        limit = queue if queue is not None else max(players)
        server = start_server(bundle, work, slots, limit, gpu_layers)
        try:
            local = InProcess(bundle, work, slots)
            try:
                closed_loop(server.url, 1, 1, tokens, "warm")  # page the weights in, both sides
                local.player("warm", 1, tokens)
                # one player's turns, HTTP and in-process in alternation (the other side idles)
                http_s, local_s = [], []
                for i in range(rounds):
                    local_s.append(local.player(f"round{i}", turns, tokens))
                    http_s.append(closed_loop(server.url, 1, turns, tokens, f"round{i}").wall_s)
            finally:
                local.close()  # its model is freed before the load runs
            results = [closed_loop(server.url, n, turns, tokens, f"p{n}", stagger) for n in players]
            rss = server.peak_rss_mb()
            ratios = []
            if peer is not None and paired:
                ratios = _paired(peer, bundle, work, npc_file, server.url, paired, turns, tokens,
                                 slots, gpu_layers)  # fmt: skip
        finally:
            server.stop()
        if peer is not None:
            peer_loads, peer_info = _peer(peer, bundle, work, npc_file, players, turns, tokens,
                                          slots, gpu_layers, stagger)  # fmt: skip
    by_n = {r.players: r for r in results}
    report: dict[str, Any] = {
        "bundle": str(bundle),
        "slots": slots,
        "turns_per_player": turns,
        "reply_tokens": tokens,
        "cpus": os.cpu_count(),
        "stagger_s": stagger,
        "prefill_chunk": chunk,
        "loads": [asdict(r) for r in results],
        "server_peak_rss_mb": rss,
        "one_player_http_s": http_s,
        "one_player_in_process_s": local_s,
        "http_over_in_process": statistics.median(http_s) / statistics.median(local_s),
    }
    one = by_n.get(1)
    if one is not None:
        for n, r in by_n.items():
            report[f"turns_per_s_{n}_over_1"] = r.turns_per_s / one.turns_per_s
    if peer is not None:
        report["peer"] = {**peer_info, "loads": [asdict(r) for r in peer_loads]}
        for theirs in peer_loads:
            ours = by_n[theirs.players]
            n = theirs.players
            report[f"npcchat_over_peer_turns_per_s_{n}"] = ours.turns_per_s / theirs.turns_per_s
            report[f"npcchat_over_peer_ttft_p95_{n}"] = ours.ttft_p95_ms / theirs.ttft_p95_ms
        if ratios:
            report["paired_one_player_ratios"] = ratios
            report["npcchat_over_peer_turns_per_s_1_paired_median"] = statistics.median(ratios)
        if one is not None:  # the goal: TTFT p95 at the most players over TTFT p50 at one
            most = by_n[max(by_n)]
            report[f"ttft_p95_{most.players}_over_ttft_p50_1"] = most.ttft_p95_ms / one.ttft_p50_ms
    return report


def _launch_peer(
    binary: Path,
    bundle: Path,
    work: Path,
    npc_file: Path,
    slots: int,
    tokens: int,
    gpu_layers: int | None,
    log: str,
) -> tuple[ChildServer, Any]:
    """llama-server on the bundle's GGUF with npcchat's context per slot, its weights paged
    in by one turn; and the bench NPC's prompts as npcchat renders them."""
    import npcchat
    from npcchat.bench import peer as peer_mod
    from npcchat.runtime import bundle as bundle_mod

    gguf = bundle_mod.load(bundle).gguf
    n_ctx = npcchat.load_config(_config_file(work)).runtime.n_ctx
    prompts = peer_mod.Prompts(bundle, npc_file)
    server = peer_mod.start_peer(binary, gguf, slots, n_ctx, gpu_layers, work / log)
    try:
        peer_mod.closed_loop(server.url, prompts, 1, 1, tokens)
    except BaseException:
        server.stop()
        raise
    return server, prompts


def _paired(
    binary: Path,
    bundle: Path,
    work: Path,
    npc_file: Path,
    url: str,
    rounds: int,
    turns: int,
    tokens: int,
    slots: int,
    gpu_layers: int | None,
) -> list[float]:
    """One player's turns against npcchat (``url``) and a llama-server in alternation, both
    servers up and idle in turn: the one-player ratio of each round. Two loads measured
    minutes apart on a shared machine drift apart by more than the difference measured
    (single runs gave 0.84 to 1.00); rounds side by side do not."""
    from npcchat.bench import peer as peer_mod

    other, prompts = _launch_peer(binary, bundle, work, npc_file, slots, tokens, gpu_layers,
                                  "paired.log")  # fmt: skip
    try:
        ratios = []
        for i in range(rounds):
            ours = closed_loop(url, 1, turns, tokens, f"paired{i}")
            theirs = peer_mod.closed_loop(other.url, prompts, 1, turns, tokens)
            ratios.append(ours.turns_per_s / theirs.turns_per_s)
        return ratios
    finally:
        other.stop()


def _peer(
    binary: Path,
    bundle: Path,
    work: Path,
    npc_file: Path,
    players: Sequence[int],
    turns: int,
    tokens: int,
    slots: int,
    gpu_layers: int | None,
    stagger: float = 0.0,
) -> tuple[list[LoadResult], dict[str, Any]]:
    """The same loads against llama-server on the bundle's GGUF."""
    from npcchat.bench import peer as peer_mod

    server, prompts = _launch_peer(binary, bundle, work, npc_file, slots, tokens, gpu_layers,
                                   "peer.log")  # fmt: skip
    try:
        loads = [
            peer_mod.closed_loop(server.url, prompts, n, turns, tokens, stagger) for n in players
        ]
        info = {
            "binary": str(binary),
            "command": server.command,
            "peak_rss_mb": server.peak_rss_mb(),
            "sampling": peer_mod.SAMPLING,
        }
    finally:
        server.stop()
    return loads, info
