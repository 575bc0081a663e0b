"""The demo NPCs shipped in the package: data generator, packaged bundle, scripted talk."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from npcchat import demo
from npcchat.mind import npc as npc_mod
from npcchat_convert import demo_data, demo_frames

ROOT = Path(__file__).resolve().parent.parent
HANGUL = re.compile("[가-힣]")


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
    assert rec["language"] == "ko" and HANGUL.search(rec["input"]["player_utterance"])


def test_records_hold_both_languages_and_the_runtime_prompt() -> None:
    recs = demo_data.generate(ROOT / "configs" / "npcs", 200, seed=1)
    ko = [r for r in recs if r["language"] == "ko"]
    assert 0.35 <= len(ko) / len(recs) <= 0.45
    assert all(r["input"]["npc_id"] == "mother_abandoned_factory" for r in ko)
    assert all(HANGUL.search(r["output"]["response"]) for r in ko)
    for r in recs:  # LORE is the persona line, then the entries valid in the record's state
        i = r["input"]
        assert i["lore"].split(":")[0] in {
            "어머니 (슬픔에 잠긴, 다정한, 경계심 많은)",
            "Borin the blacksmith (gruff, honest, proud)",
            "The hermit of Greenhollow (calm, cryptic, kind)",
            "Captain Sela (brisk, fair, practical)",
            "Lina the apprentice (nervous, clever, eager)",
        }
        hidden = "베틀 방 뒤 작은 문은 미라의 숨는 곳이었다."
        if i["npc_id"] == "mother_abandoned_factory":
            assert (hidden in i["lore"]) == (i["tags"]["trust"] >= 0.6)  # unlocked by trust
            assert ("빈 액자" in i["description"]) == (i["npc_location"] == "abandoned_factory")


def test_held_out_frames_never_reach_training() -> None:
    """Every sentence every training frame can give, against every held-out sentence, case
    and punctuation aside (slots stay slots: the same shape with any NPC's words)."""

    def norm(x: str) -> str:
        return re.sub(r"[^\w{}:]+", " ", x.lower()).strip()

    for lang, frames in demo_frames.FRAMES.items():
        for intent, f in frames.items():
            assert len(f.train) >= 30 and len(f.heldout) >= 5 and len(f.blind) >= 3
            held = {norm(h) for x in (*f.heldout, *f.blind) for h in demo_data.expansions(x)}
            for x in f.train:
                both = {norm(e) for e in demo_data.expansions(x)} & held
                assert not both, (lang, intent, x, both)
    for split in ("heldout", "blind"):
        recs = demo_data.generate(ROOT / "configs" / "npcs", 90, seed=4, split=split)
        assert {r["split"] for r in recs} == {split} and {r["language"] for r in recs} == {
            "en",
            "ko",
        }


def test_korean_particles_and_frames() -> None:
    assert demo_data.josa("사진", "을") == "사진을" and demo_data.josa("열쇠", "을") == "열쇠를"
    assert demo_data.josa("어머니", "이") == "어머니가" and demo_data.josa("방", "는") == "방은"
    assert (
        demo_data.josa("베틀 방", "으로") == "베틀 방으로"
        and demo_data.josa("길", "으로") == "길로"
    )
    rng = random.Random(0)
    assert demo_data.expand("(a|b (c|d))[!]", rng) in {"a", "b c", "b d", "a!", "b c!", "b d!"}
    assert demo_data.expansions("(a|b (c|d))[!]") == {"a", "b c", "b d", "a!", "b c!", "b d!"}
    with pytest.raises(ValueError, match="unbalanced"):
        demo_data.expand("(a|b", rng)
    with pytest.raises(ValueError, match="unbalanced"):
        demo_data.expansions("(a|b")
    with pytest.raises(ValueError, match="more than 8 sentences"):
        demo_data.expansions("(a|b)(a|b)(a|b)(a|b)", limit=8)
    slots = {"item": "사진", "name": "어머니", "reward": "열쇠", "place": "방"}
    assert demo_data.fill("{item:을} 드릴게요, {name}.", slots) == "사진을 드릴게요, 어머니."


def test_demo_npcs_use_every_knowledge_feature() -> None:
    for path in sorted((ROOT / "configs" / "npcs").glob("*.toml")):
        npc = npc_mod.load(path)
        k = npc.knowledge
        assert npc.name != npc.id and k.name == npc.name
        assert k.persona.startswith(npc.name + " (") and npc.tags.style
        assert {s for e in k.lore for s in e.stages} >= {"any", "start", "complete"}, path
        assert any(e.requires_items for e in k.lore) and any(e.min_trust for e in k.lore)
        assert len({loc for e in k.descriptions for loc in e.locations}) >= 2
        assert set(npc.demo["locations"]) == {loc for e in k.descriptions for loc in e.locations}
        assert k.triggers and all(t.reaction for t in k.triggers)
        assert set(k.flags) == set(demo_data.FLAGS)
        assert all(d.display and d.display != name for name, d in k.flags.items())


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
    (turn,) = talk("--npc", "village", "--say", "Here, I brought you the iron ore.")
    assert turn["npc_id"] == "village_blacksmith" and turn["reply"].strip()
    assert turn["flags"]["give_item"]["fired"] is True
    assert turn["deltas"]["trust"] > 0.1 and turn["state"]["trust"] > 0.5
    for tag in ("<STATE>", "<NPC>", "</SYS>", "<PLAYER>"):
        assert tag not in turn["reply"]


@pytest.mark.model
def test_insulting_lowers_trust_and_default_npc() -> None:
    (turn,) = talk("--say", "You are a useless old fool.")  # no --bundle, no --npc: the smith
    assert turn["npc_id"] == "village_blacksmith"
    assert turn["deltas"]["trust"] < -0.1 and turn["state"]["trust"] < 0.5
    assert turn["flags"]["give_item"]["fired"] is False


@pytest.mark.model
def test_the_mother_speaks_korean() -> None:
    hello, picture, cruel = talk(
        "--npc", "mother", "--say", "안녕하세요, 어머니.", "--say", "여기, 사진을 찾아왔어요.",
        "--say", "당신은 살인자야.",
    )  # fmt: skip
    assert hello["npc_id"] == "mother_abandoned_factory"
    assert HANGUL.search(hello["reply"]) and hello["deltas"]["trust"] > 0
    assert HANGUL.search(picture["reply"]) and picture["deltas"]["trust"] > 0.1
    assert (
        picture["flags"]["give_item"]["fired"] and picture["flags"]["unlock_hidden_path"]["fired"]
    )
    # a forbidden trigger: her fixed reaction and delta, whatever ending follows the word
    assert cruel["reply"] == "...그런 말은 하지 마세요. 제발, 이제 나가 주세요."
    assert cruel["deltas"] == {"trust": -0.5, "relationship": -0.5}


@pytest.mark.model
def test_banner_names_the_npc() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "npcchat", "talk", "--npc", "mother"],
        input="/quit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "talking to 어머니 (mother_abandoned_factory)" in proc.stdout
    assert "5 lore entries, 2 descriptions, 1 trigger " in proc.stdout


def test_unknown_demo_npc_is_a_clear_error() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "npcchat", "talk", "--npc", "nobody", "--say", "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1 and "not a file and not a demo NPC" in proc.stderr
    assert "mother_abandoned_factory" in proc.stderr and "village_blacksmith" in proc.stderr


def test_token_noise_touches_only_the_players_line() -> None:
    import numpy as np

    from npcchat_train import demo as demo_train

    x = {"ids": list(range(100)), "player": (40, 60)}
    pool = np.array([1000, 1001])
    rng = np.random.default_rng(0)
    changed: set[int] = set()
    for _ in range(50):
        out = demo_train.noisy(x, pool, rng)
        assert out[:40] == x["ids"][:40] and out[60:] == x["ids"][60:]
        changed |= {i for i in range(40, 60) if out[i] != x["ids"][i]}
        assert all(out[i] in (1000, 1001) for i in range(40, 60) if out[i] != x["ids"][i])
    assert changed == set(range(40, 60))  # every player token is sometimes replaced
    assert x["ids"] == list(range(100))  # the record itself is never changed
