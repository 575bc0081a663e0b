"""The sampler's ``top_k`` reaches every surface: config, CLI, the Python API, the served
turn and chat completion overrides, and eval's settings that change results. A draw from
the single most likely token (top-k 1) at any temperature is the greedy turn, so each
surface is checked by what it changes, not by what it stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

import npcchat
from npcchat import config as config_mod
from npcchat.errors import ConfigError

pytestmark = pytest.mark.model

NPC = "village_blacksmith"
LINE = "Tell me about your forge and the old days."


def test_the_default_is_50_as_the_originals_generate_and_bad_values_are_refused(
    tmp_path: Path,
) -> None:
    assert config_mod.Config().sampling.top_k == 50
    assert npcchat.SamplingParams().top_k == 50
    bad = tmp_path / "c.toml"
    bad.write_text("[sampling]\ntop_k = -1\n")
    with pytest.raises(ConfigError, match=r"'sampling\.top_k': expected 0\.\.1048576, got -1"):
        config_mod.load(bad)
    bad.write_text('[sampling]\ntop_k = "many"\n')
    with pytest.raises(ConfigError, match=r"sampling\.top_k"):
        config_mod.load(bad)


def test_top_k_1_is_greedy_through_the_python_api() -> None:
    with npcchat.load() as rt, rt.open(NPC) as chat:
        base = replace(chat.sampling, max_tokens=24, seed=11)
        greedy = chat.say(LINE, sampling=replace(base, temperature=0.0)).reply
        chat.undo()
        hot = replace(base, temperature=1.5, top_p=1.0)
        assert chat.say(LINE, sampling=replace(hot, top_k=1)).reply == greedy
        chat.undo()
        # and it is the sampler that decides: without top-k the hot draw wanders
        wandering = [
            (chat.say(LINE, sampling=replace(hot, top_k=0, seed=s)).reply, chat.undo())[0]
            for s in range(4)
        ]
        assert any(r != greedy for r in wandering)


def _talk(home: Path, *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-m", "npcchat", "talk", "--say", LINE, "--json", "--seed", "11",
         "--max-tokens", "24", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "NPCCHAT_HOME": str(home)},
        timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return dict(json.loads(proc.stdout.splitlines()[-1]))


def test_the_command_line_and_the_config_file_set_it(tmp_path: Path) -> None:
    greedy = _talk(tmp_path, "--temperature", "0")["reply"]
    assert (
        _talk(tmp_path, "--temperature", "1.5", "--top-p", "1", "--top-k", "1")["reply"] == greedy
    )
    cfg = tmp_path / "c.toml"
    cfg.write_text("[sampling]\ntop_k = 1\ntop_p = 1.0\ntemperature = 1.5\n")
    assert _talk(tmp_path, "--config", str(cfg))["reply"] == greedy


def test_eval_records_it_among_the_settings_that_change_results(tmp_path: Path) -> None:
    sc = tmp_path / "s.jsonl"
    sc.write_text(json.dumps({"id": "a", "npc_id": NPC, "player_utterance": LINE}) + "\n", "utf-8")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "npcchat", "eval", str(sc), "--max-tokens", "24", *args],
            capture_output=True,
            text=True,
            env={**os.environ, "NPCCHAT_HOME": str(tmp_path / "home")},
            timeout=120,
        )

    assert run("--report", str(tmp_path / "g.json")).returncode == 0
    hot = run("--temperature", "1.5", "--top-k", "1", "--report", str(tmp_path / "k.json"))
    assert hot.returncode == 0, hot.stderr
    greedy, top1 = (json.loads((tmp_path / n).read_text()) for n in ("g.json", "k.json"))
    assert top1["settings"]["top_k"] == 1 and greedy["settings"]["top_k"] == 50
    reply = [r["scenarios"][0]["turns"][0]["reply"] for r in (greedy, top1)]
    assert reply[0] == reply[1]
    # a report made with another top-k is not resumed into this run's
    mixed = run("--temperature", "1.5", "--top-k", "2", "--resume", str(tmp_path / "k.json"))
    assert (
        mixed.returncode == 1 and "'settings.top_k': the report used 1, this run 2" in mixed.stderr
    )


def test_served_turns_and_chat_completions_take_it_per_request(serve: Any) -> None:
    server = serve()
    with server.client() as c:
        base = {"npc_id": NPC, "text": LINE, "max_tokens": 24, "seed": 11}
        greedy = c.post("/v1/turn", json={**base, "player_id": "g"}).json()
        # the server samples at temperature 0.7 (the fixture's config): top_k 1 is greedy
        one = c.post("/v1/turn", json={**base, "player_id": "k", "top_k": 1}).json()
        chat = c.post(
            "/v1/chat/completions",
            json={
                "model": NPC,
                "messages": [{"role": "user", "content": LINE}],
                "max_tokens": 24,
                "temperature": 0,
            },
        ).json()
        chat_k1 = c.post(
            "/v1/chat/completions",
            json={
                "model": NPC,
                "messages": [{"role": "user", "content": LINE}],
                "max_tokens": 24,
                "temperature": 1.5,
                "top_p": 1.0,
                "top_k": 1,
            },
        ).json()
        bad = c.post("/v1/turn", json={**base, "player_id": "b", "top_k": -1})
    assert chat_k1["choices"][0]["message"]["content"] == chat["choices"][0]["message"]["content"]
    greedy_reply = chat["choices"][0]["message"]["content"]
    assert one["text"] == greedy_reply
    assert greedy["text"] != "" and bad.status_code == 422
