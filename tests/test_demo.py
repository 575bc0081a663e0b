"""The demo NPCs shipped in the package: data generator, packaged bundle, scripted talk."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from npcchat import demo
from npcchat_convert import demo_data

ROOT = Path(__file__).resolve().parent.parent


def talk(*args: str) -> list[dict]:  # type: ignore[type-arg]
    proc = subprocess.run(
        [sys.executable, "-m", "npcchat", "talk", *args, "--json", "--temperature", "0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_generator_labels_follow_intent_and_state() -> None:
    npcs = {n.id: n for n in demo_data.load_npcs(ROOT / "configs" / "npcs")}
    assert len(npcs) >= 5
    mother = npcs["mother_abandoned_factory"]
    kind, delta, fired = demo_data._labels(mother, "ask_item", trust=0.7, relationship=0.5)
    assert kind == "item_yes" and fired == ["give_item"] and delta[0] > 0
    kind, delta, fired = demo_data._labels(mother, "ask_item", trust=0.3, relationship=0.5)
    assert kind == "item_no" and fired == [] and delta[0] < 0
    _, delta, fired = demo_data._labels(mother, "give_item", 0.2, 0.2)
    assert (
        set(fired) == {"give_item", "quest_stage_change", "unlock_hidden_path"} and delta[0] > 0.3
    )
    _, _, fired = demo_data._labels(npcs["village_blacksmith"], "give_item", 0.2, 0.2)
    assert "unlock_hidden_path" not in fired
    a = demo_data.generate(ROOT / "configs" / "npcs", 30, seed=3)
    assert a == demo_data.generate(ROOT / "configs" / "npcs", 30, seed=3)
    rec = demo_data.record(mother, random.Random(0), "give_item")
    assert "forgotten_picture" in rec["input"]["player_state"]["items"]
    assert rec["output"]["response"] in mother.demo["replies"]["give_item"]


def test_packaged_npc_files_match_configs() -> None:
    packaged = sorted((demo.root() / "npcs").glob("*.toml"))
    assert [p.name for p in packaged] == sorted(
        p.name for p in (ROOT / "configs" / "npcs").glob("*.toml")
    )
    for p in packaged:
        assert p.read_text() == (ROOT / "configs" / "npcs" / p.name).read_text()


@pytest.mark.model
def test_packaged_demo_bundle_loads() -> None:
    from npcchat.runtime import bundle

    b = bundle.load(demo.default_bundle())
    assert b.root == demo.root() / "bundle"
    assert b.quant == "q4_k_m" and b.heads is not None and "give_item" in b.flags
    size = sum(p.stat().st_size for p in b.root.iterdir())
    assert size <= 25 * 1024 * 1024


@pytest.mark.model
def test_handing_over_the_wanted_item_fires_and_raises_trust() -> None:
    (turn,) = talk(
        "--npc", "mother_abandoned_factory", "--say", "Here, I brought you the forgotten picture."
    )
    assert turn["reply"].strip()
    assert turn["flags"]["give_item"]["fired"] is True
    assert turn["deltas"]["trust"] > 0.1 and turn["state"]["trust"] > 0.35
    for tag in ("<STATE>", "<NPC>", "</SYS>", "<PLAYER>"):
        assert tag not in turn["reply"]


@pytest.mark.model
def test_insulting_lowers_trust_and_default_npc() -> None:
    (turn,) = talk("--say", "You are a useless old fool.")  # no --bundle, no --npc: the demo mother
    assert turn["npc_id"] == "mother_abandoned_factory"
    assert turn["deltas"]["trust"] < -0.1 and turn["state"]["trust"] < 0.35
    assert turn["flags"]["give_item"]["fired"] is False
    (smith,) = talk("--npc", "village", "--say", "Hello there.")  # a unique id prefix
    assert smith["npc_id"] == "village_blacksmith" and smith["reply"].strip()


def test_unknown_demo_npc_is_a_clear_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "npcchat", "talk", "--npc", "nobody", "--say", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "not a file and not a demo NPC" in proc.stderr
    assert "mother_abandoned_factory" in proc.stderr
