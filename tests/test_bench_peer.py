"""``npcchat bench serve --peer``: the same players against a llama-server, here a stub that
speaks llama-server's /health and streamed /completion and records what it was asked, so
the test checks the prompts (npcchat's own rendering), token counts and sampler the peer
gets, and the report's two tables and ratios. With a real llama-server (``make peer``) the
last test runs it too."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.model, pytest.mark.slow]

STUB = r'''#!PYTHON
"""A stand-in for llama-server: /health, and /completion streaming n_predict pieces."""
import json, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

args = sys.argv[1:]
port = int(args[args.index("--port") + 1])
log = open(LOGFILE, "a", encoding="utf-8")
print(json.dumps({"argv": args}), file=log, flush=True)

class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass
    def do_GET(self):
        body = b'{"status": "ok"}'
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        print(json.dumps({**req, "t": time.monotonic()}, ensure_ascii=False), file=log, flush=True)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        n = req["n_predict"]
        for i in range(n):
            if i == 4:
                self.wfile.flush()
                time.sleep(0.3)  # a stall in the middle of every reply
            piece = json.dumps({"content": f" w{i}", "stop": False})
            self.wfile.write(f"data: {piece}\n\n".encode())
        final = {"content": "", "stop": True, "timings": {"predicted_n": n, "predicted_ms": 5.0}}
        self.wfile.write(f"data: {json.dumps(final)}\n\n".encode())

ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
'''


def _stub(tmp_path: Path) -> tuple[Path, Path]:
    log = tmp_path / "peer-requests.jsonl"
    path = tmp_path / "llama-server"
    text = STUB.replace("PYTHON", sys.executable).replace("LOGFILE", repr(str(log)))
    path.write_text(text, "utf-8")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path, log


def _bench(tmp_path: Path, peer: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "npcchat", "bench", "serve", "--players", "1,2", "--turns", "2",
         "--tokens", "8", "--slots", "2", "--peer", str(peer), "--stagger", "0.2",
         "--prefill-chunk", "16", "--paired", "2", "--json"],
        capture_output=True,
        text=True,
        env={**os.environ, "NPCCHAT_HOME": str(tmp_path / "home")},
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return dict(json.loads(proc.stdout.splitlines()[-1]))


def test_the_peer_gets_the_same_players_prompts_and_tokens(tmp_path: Path) -> None:
    peer, log = _stub(tmp_path)
    report = _bench(tmp_path, peer)
    ours, theirs = report["loads"], report["peer"]["loads"]
    assert [r["players"] for r in ours] == [r["players"] for r in theirs] == [1, 2]
    assert all(r["errors"] == 0 for r in ours + theirs)
    assert [r["turns"] for r in theirs] == [2, 4]
    assert [r["generated"] for r in theirs] == [16, 32]  # every turn all 8 tokens
    for n in (1, 2):
        assert report[f"npcchat_over_peer_turns_per_s_{n}"] > 0
    assert "ttft_p95_2_over_ttft_p50_1" in report
    assert report["stagger_s"] == 0.2 and report["prefill_chunk"] == 16
    assert all(0 <= r["stall_p95_ms"] <= r["stall_max_ms"] for r in ours + theirs)
    assert all(r["stall_max_ms"] >= 300 for r in theirs)  # the stub's pause, seen
    # --paired 2: two rounds of one player against each side, both servers up
    assert len(report["paired_one_player_ratios"]) == 2
    assert report["npcchat_over_peer_turns_per_s_1_paired_median"] > 0
    lines = [json.loads(x) for x in log.read_text("utf-8").splitlines()]
    starts = [line["argv"] for line in lines if "argv" in line]
    assert len(starts) == 2  # the paired rounds' llama-server, then the loads'
    assert all(a[a.index("-np") + 1] == "2" and "-m" in a for a in starts)
    requests = [line for line in lines if "argv" not in line]
    # paired: a warm-up and 2 rounds of 2 turns; then a warm-up, one and two players
    assert len(requests) == (1 + 2 * 2) + (1 + 2 + 4)
    for req in requests:
        assert req["n_predict"] == 8 and req["ignore_eos"] and req["cache_prompt"]
        assert req["samplers"] == ["penalties", "temperature", "top_k", "top_p"]
        assert req["top_k"] == 50 and req["min_p"] == 0.0
        prompt = req["prompt"]
        assert "NPC_ID=bench_captain" in prompt and prompt.rstrip().endswith("<NPC>")
    # the second of two players starts --stagger seconds after the first
    first = {r["seed"]: r["t"] for r in requests[-4:] if r["seed"] in (0, 1000)}
    assert first[1000] - first[0] >= 0.15  # (received by the server: less its jitter)
    # a player's second prompt holds its first line and the peer's own reply
    second = [r["prompt"] for r in requests if "w7" in r["prompt"]]
    assert second and "player: Hello there." in second[0]


def _refused(tmp_path: Path, *args: str) -> str:
    """``npcchat bench serve ARGS`` refused with one line and exit 1: its stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "npcchat", "bench", "serve", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "NPCCHAT_HOME": str(tmp_path / "home")},
        timeout=60,
    )
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    return proc.stderr


def test_a_peer_that_is_not_a_program_is_one_line(tmp_path: Path) -> None:
    assert "not an executable file" in _refused(tmp_path, "--peer", str(tmp_path / "nope"))


REAL = Path(os.environ.get("NPCCHAT_PEER", "build/peer/build/bin/llama-server"))


@pytest.mark.skipif(not REAL.is_file(), reason="needs llama-server: `make peer` builds it")
def test_a_real_llama_server_as_the_peer(tmp_path: Path) -> None:
    report = _bench(tmp_path, REAL.resolve())
    assert all(r["errors"] == 0 and r["turns"] for r in report["peer"]["loads"])


def test_paired_rounds_need_a_peer(tmp_path: Path) -> None:
    assert "--paired needs --peer" in _refused(tmp_path, "--paired", "3")
