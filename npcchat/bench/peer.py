"""The peer of ``npcchat bench serve --peer PATH``: the same players, prompts and token counts
against a ``llama-server`` started on loopback, so npcchat's serving speed is measured
beside llama.cpp's own server in one run, on one GGUF.

What is the same on both sides: the GGUF (the bundle's), the slots, each player's lines and
closed loop, the prompt (rendered by npcchat's template for the bench NPC, with the player's
history growing by the peer's own replies, scaffold tags parsed as control tokens), the
reply tokens per turn (``ignore_eos``: every turn generates all of them), and the sampler
(repetition penalty 1.05 over 64 tokens, temperature 0.7, top-k 50, top-p 0.9, in that
order, no min-p). Time to first token is measured as on npcchat's side: the latency minus
the generation time the server reports. What is not: llama-server keeps its own defaults
for the rest (batch sizes, flash attention), and its prompt cache reuses a slot's prefix as
npcchat's prefix reuse does. ``make peer`` builds a llama-server from the llama.cpp that
the installed llama-cpp-python vendors; llama-server is not a dependency of npcchat.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from npcchat.bench import players as players_mod
from npcchat.bench.players import LINES, ChildServer, LoadResult
from npcchat.runtime import prompt as prompt_mod
from npcchat.types import ContextTurn, PromptInput

SAMPLING = {
    "temperature": 0.7,
    "top_k": 50,
    "top_p": 0.9,
    "min_p": 0.0,
    "typical_p": 1.0,
    "repeat_penalty": 1.05,
    "repeat_last_n": 64,
    "samplers": ["penalties", "temperature", "top_k", "top_p"],
}


class Prompts:
    """The bench NPC's prompts as npcchat renders them, for a player's history."""

    def __init__(self, bundle: Path, npc_file: Path) -> None:
        from npcchat.mind import npc as npc_mod
        from npcchat.runtime import bundle as bundle_mod

        self.template = bundle_mod.load(bundle).template
        self.npc = npc_mod.load(npc_file)

    def render(self, line: str, history: list[tuple[str, str]]) -> str:
        context: list[ContextTurn] = []
        for said, reply in history:
            context += [ContextTurn("player", said), ContextTurn("npc", reply)]
        npc = self.npc
        inp = PromptInput(
            npc_id=npc.id,
            tags=npc.tags,
            player_utterance=line,
            lore=npc.knowledge.lore_block(npc.lore),
            description=npc.description,
            player_state=npc.player_state,
            context=tuple(context),
        )
        return prompt_mod.render(self.template, inp).text


def start_peer(
    binary: Path, gguf: Path, slots: int, n_ctx: int, gpu_layers: int | None, log: Path
) -> ChildServer:
    """``llama-server`` on the GGUF, as a child process on a free loopback port."""

    def command(port: int) -> list[str]:
        cmd = [str(binary), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port)]
        cmd += ["-np", str(slots), "-c", str(n_ctx * slots)]
        if gpu_layers is not None:
            cmd += ["-ngl", str(gpu_layers)]
        return cmd

    return ChildServer("llama-server", command, "/health", log)


def _player(url: str, prompts: Prompts, seed: int, turns: int, tokens: int, out: list[Any]) -> None:
    import httpx

    history: list[tuple[str, str]] = []
    with httpx.Client(base_url=url, timeout=600) as client:
        for i in range(turns):
            line = LINES[i % len(LINES)]
            body = {
                "prompt": prompts.render(line, history),
                "n_predict": tokens,
                "ignore_eos": True,
                "cache_prompt": True,
                "stream": True,
                "seed": seed * 1000 + i,
                **SAMPLING,
            }
            t0 = time.perf_counter()
            pieces: list[str] = []
            arrived: list[float] = []  # each token's event (one per token, text or not)
            final: dict[str, Any] | None = None
            status = 0
            try:
                # a new connection per turn: llama-server ends a streamed answer by closing
                # its connection, and a reused one fails at the next request
                with client.stream(
                    "POST", "/completion", json=body, headers={"Connection": "close"}
                ) as r:
                    status = r.status_code
                    for text in r.iter_lines():
                        if not text.startswith("data: "):
                            continue
                        data = json.loads(text[6:])
                        pieces.append(data.get("content", ""))
                        if data.get("stop"):
                            final = data
                        else:
                            arrived.append(time.perf_counter())
            except httpx.HTTPError:
                final = None
            done = time.perf_counter()
            if status != 200 or final is None:
                out.append((False, 0.0, done - t0, 0, 0.0))
                continue
            timings = final.get("timings", {})
            generate = float(timings.get("predicted_ms", 0.0)) / 1e3
            generated = int(timings.get("predicted_n", final.get("tokens_predicted", 0)))
            stall = players_mod.longest_gap(arrived)
            out.append((True, done - t0 - generate, done - t0, generated, stall))
            history.append((line, "".join(pieces).strip()))


def closed_loop(
    url: str, prompts: Prompts, players: int, turns: int, tokens: int, stagger: float = 0.0
) -> LoadResult:
    """The peer's counterpart of :func:`npcchat.bench.serve_load.closed_loop`."""
    return players_mod.closed_loop(
        players, lambda i, out: _player(url, prompts, i, turns, tokens, out), stagger
    )
