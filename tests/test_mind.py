"""Knowledge and memory around real turns on the tiny model (issue 6)."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from npcchat.config import Config, KnowledgeConfig, RuntimeConfig
from npcchat.conversation import Conversation, new_session
from npcchat.mind import npc as npc_mod
from npcchat.mind.mind import NpcMind, knowledge_of
from npcchat.runtime.engine import load_engine
from npcchat.sessions import session as session_mod
from npcchat.types import SamplingParams

pytestmark = pytest.mark.model
KEEPER = Path(__file__).parent / "fixtures" / "keeper.toml"
GREEDY = SamplingParams(temperature=0.0, top_p=1.0, repeat_penalty=1.05, max_tokens=4, seed=0)


def test_trigger_reacts_without_a_model_call(bundle_q4: Path) -> None:
    d = npc_mod.load(KEEPER)
    with load_engine(bundle_q4, Config()) as engine:
        conv = Conversation(
            engine,
            new_session(d, engine, 1),
            GREEDY,
            mind=NpcMind(engine, d.knowledge, KnowledgeConfig()),
        )
        before = engine.model.decoded_tokens  # type: ignore[attr-defined]
        r = conv.say("Shut   UP, you old idiot!")
        assert engine.model.decoded_tokens == before  # type: ignore[attr-defined]
        assert r.reply == "Mind your manners in my lighthouse." and r.stop_reason == "trigger"
        assert r.heads.deltas == {"trust": -0.25, "relationship": -0.3}
        assert r.heads.flags["npc_action"].fired and not r.heads.flags["give_item"].fired
        assert conv.session.tags.trust == pytest.approx(0.15)
        assert conv.say("What a fine shutter.").stop_reason != "trigger"  # whole words only


def test_lore_is_retrieved_into_the_prompt_and_thresholds_overridden(
    bundle_q4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NPCCHAT_HOME", str(tmp_path))  # a lore cache of its own, counted below
    d = npc_mod.load(KEEPER)
    with load_engine(bundle_q4, Config()) as engine:
        mind = NpcMind(engine, d.knowledge, KnowledgeConfig())
        conv = Conversation(engine, new_session(d, engine, 1), GREEDY, mind=mind)
        prep = mind.prepare(conv.session, "Tell me about the ship on the reef")
        text = engine.fit(engine.prompt_input(prep.session, "x"), 4).prompt.text
        # the persona leads LORE, then the entries the line retrieves
        persona = "Old Tam (gruff, watchful): Has kept the light for forty years."
        assert f"LORE: {persona} A storm sank the merchant ship Aurora" in text
        assert "Smugglers" not in text and "style=gruff" in text  # persona style: the default
        r = conv.say("Tell me about the ship on the reef")
        conv.say("And the smugglers?")
        cached = list(mind.embedder.root.glob("*.npy"))
        assert 0 < len(cached) <= len(d.knowledge.lore) + len(d.knowledge.descriptions)  # lore only
        assert r.heads.flags["give_item"].threshold == 0.9
        assert r.heads.flags["give_item"].fired == (r.heads.flags["give_item"].prob >= 0.9)


def test_five_hundred_turns_at_small_context_recall_an_early_fact(
    bundle_q4: Path, tmp_path: Path
) -> None:
    d = npc_mod.load(KEEPER)
    cfg = Config(runtime=RuntimeConfig(n_ctx=384))
    path = tmp_path / "long.json"
    with load_engine(bundle_q4, cfg) as engine:
        mind = NpcMind(engine, d.knowledge, KnowledgeConfig(memories=3))
        conv = Conversation(
            engine, new_session(d, engine, 1), replace(GREEDY, max_tokens=2), mind=mind
        )
        conv.say("My name is Arin and I come from Eastwatch.")
        for i in range(498):
            conv.say(f"Tell me about the weather number {i}.")
        assert conv.session.memorized > 400 and len(conv.session.memories) == conv.session.memorized
        question = "Do you remember where I come from?"
        prep = mind.prepare(conv.session, question)
        assert any("Eastwatch" in c.text for c in prep.pinned)
        r = conv.say(question)
        assert len(conv.session.history) == 500 and r.prompt_tokens <= engine.model.n_ctx - 2
        conv.path = path
        conv.save(path)
    resumed = session_mod.load(path)
    assert resumed.memories == conv.session.memories and resumed.memorized == conv.session.memorized
    assert len(knowledge_of(resumed).lore) == 4  # the NPC file is found again on resume


def test_cli_memory_command_and_banner(bundle_q4: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "npcchat",
            "talk",
            "--bundle",
            str(bundle_q4),
            "--npc",
            str(KEEPER),
            "--ctx",
            "256",
            "--max-tokens",
            "4",
        ],
        input="hello\n/memory\n/flags\nyou idiot\n/quit\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "talking to Old Tam (lighthouse_keeper)" in proc.stdout  # the name, then the id
    assert "retrieval and memory ranking: lexical" in proc.stdout
    assert "no memories yet" in proc.stdout
    assert "Mind your manners in my lighthouse." in proc.stdout
    assert "give_item (Gives an item)" in proc.stdout and "0.9 (NPC file)" in proc.stdout
