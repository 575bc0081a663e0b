"""Every config section reaches the commands (issue 13): `[knowledge]` used to be dropped.

Each test sets one section in a `--config` file and reads its effect off `talk --json` and
the eval report, on the demo bundle and an NPC file with lore entries.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.model

NPC = """
id = "warden"
name = "Warden Ila"
location = "gate"

[tags]
quest_stage = "start"
trust = 0.5
relationship = 0.5

[[lore_entries]]
text = "The north tower hides a stair behind the tapestry, and the old keys hang in the guard room."
[[lore_entries]]
text = "The gate was built by the river people long before the kingdom had a name."
"""
LINES = ["Hello there, warden.", "Tell me about the gate."]


def _files(tmp_path: Path, config: str) -> tuple[Path, Path]:
    (tmp_path / "warden.toml").write_text(NPC)
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(config)
    scenario = {"id": "w", "npc_file": "warden.toml", "npc_id": "warden"}
    scenario["turns"] = [{"player": line} for line in LINES]
    (tmp_path / "s.jsonl").write_text(json.dumps(scenario) + "\n")
    return tmp_path / "warden.toml", cfg


def _talk(tmp_path: Path, config: str) -> list[dict[str, Any]]:
    npc, cfg = _files(tmp_path, config)
    args = [sys.executable, "-m", "npcchat", "talk", "--npc", str(npc), "--json"]
    args += ["--temperature", "0", "--config", str(cfg)]
    for line in LINES:
        args += ["--say", line]
    out = subprocess.run(
        args, capture_output=True, text=True, timeout=120, check=True, env=_env(tmp_path)
    ).stdout
    return [json.loads(line) for line in out.splitlines()]


def _env(tmp_path: Path) -> dict[str, str]:
    """A home of its own: caches these runs write stay out of other tests' way."""
    import os

    return {**os.environ, "NPCCHAT_HOME": str(tmp_path / "home")}


def _eval(tmp_path: Path, config: str) -> dict[str, Any]:
    _, cfg = _files(tmp_path, config)
    report = tmp_path / "r.json"
    args = [sys.executable, "-m", "npcchat", "eval", str(tmp_path / "s.jsonl")]
    args += ["--report", str(report), "--config", str(cfg)]
    subprocess.run(
        args, capture_output=True, text=True, timeout=120, check=True, env=_env(tmp_path)
    )
    data: dict[str, Any] = json.loads(report.read_text())
    return data


def test_state_section(tmp_path: Path) -> None:
    config = "[state]\ndelta_scale = 0.0\n"  # the heads' deltas move nothing
    assert {t["state"]["trust"] for t in _talk(tmp_path, config)} == {0.5}
    turns = _eval(tmp_path, config)["scenarios"][0]["turns"]
    assert {t["state"]["trust"] for t in turns} == {0.5}


def test_sampling_section(tmp_path: Path) -> None:
    config = "[sampling]\nmax_tokens = 3\n"
    assert all(t["tokens"]["generated"] <= 3 for t in _talk(tmp_path, config))
    report = _eval(tmp_path, config)
    assert report["settings"]["max_tokens"] == 3
    assert all(t["tokens"]["generated"] <= 3 for t in report["scenarios"][0]["turns"])


def test_runtime_section(tmp_path: Path) -> None:
    config = "[runtime]\nn_ctx = 1024\nprefix_reuse = false\n"
    second = _talk(tmp_path, config)[1]
    assert second["tokens"]["prefill"] == second["tokens"]["prompt"]  # nothing reused
    assert _eval(tmp_path, config)["settings"]["n_ctx"] == 1024


def test_knowledge_section(tmp_path: Path) -> None:
    base = _talk(tmp_path, "")[0]["tokens"]["prompt"]
    config = "[knowledge]\nlore_tokens = 0\n"  # no lore entry fits: a shorter prompt
    assert _talk(tmp_path, config)[0]["tokens"]["prompt"] < base
    report = _eval(tmp_path, config)
    assert report["scenarios"][0]["turns"][0]["tokens"]["prompt"] < base
    assert report["settings"]["knowledge_ranking"] == "lexical"
