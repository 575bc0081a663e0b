"""The NPC's rules around the model (npcchat.rules): conditions that block a flag, effects
with parameters, actions for the game, guarded replies; through the Python API, talk
--json, eval and serve, in English and Korean. Fixture NPC files force their flags to be
predicted (threshold 0), so the rules alone decide and the tests do not hang on what a
model happens to predict."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

from npcchat.errors import ConfigError
from npcchat.mind import npc as npc_mod
from npcchat.rules.model import State, apply
from npcchat.types import FlagResult, PlayerState, Tags

ROOT = Path(__file__).resolve().parent.parent
RULES = Path(__file__).parent / "fixtures" / "rules"
SMITH = RULES / "smith.toml"
MOTHER_GUARD = RULES / "mother_guard.toml"


def _npcchat(*args: str, home: Path, stdin: str = "") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NPCCHAT_HOME": str(home)}
    proc = subprocess.run(
        [sys.executable, "-m", "npcchat", *args],
        capture_output=True,
        text=True,
        input=stdin,
        env=env,
        timeout=300,
    )
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def _talk_json(npc: Path | str, lines: list[str], home: Path) -> list[dict[str, Any]]:
    args = ["talk", "--npc", str(npc), "--json", "--temperature", "0", "--max-tokens", "12"]
    for line in lines:
        args += ["--say", line]
    proc = _npcchat(*args, home=home)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


# -- loading -------------------------------------------------------------------------------
def _npc(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "npc.toml"
    path.write_text('id = "x"\n[quest]\nstages = ["a", "b"]\n' + body)
    return path


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[flags.f]\nrequires = { itemz = [] }\n", r"key 'flags\.f\.requires\.itemz': unknown key"),
        ("[flags.f]\nrequires = { min_trust = 2 }\n", r"flags\.f\.requires\.min_trust'.*\[0, 1\]"),
        (
            '[flags.f]\neffects = { stage = "z" }\n',
            r"flags\.f\.effects\.stage'.*'z' is not a stage",
        ),
        ('[flags.f]\naction = { name = "" }\n', r"flags\.f\.action\.name'.*non-empty"),
        ('[flags.f]\naction = { flag = "x" }\n', r"flags\.f\.action\.flag'.*reserved"),
        (
            "[flags.f]\naction = { item = [1] }\n",
            r"flags\.f\.action\.item'.*string, number or boolean",
        ),
        (
            '[flags.f.guard]\nlines = ["no"]\ntags = { style = "x" }\n',
            r"flags\.f\.guard'.*either lines .* or tags",
        ),
        (
            '[flags.f]\neffects = { memory = "m" }\n[[flags.f.cases]]\nrequires = {}\n',
            r"flags\.f\.effects'.*put it in each case",
        ),
        ("[npc_state]\nitems = [3]\n", r"key 'npc_state\.items\[0\]'"),
        (
            '[[reply_checks]]\nsay_not = ["\\u200b"]\n',
            r"reply_checks\[0\]\.say_not\[0\]'.*no visible",
        ),
        (
            "[[reply_checks]]\nuntil = { min_trust = 0.5 }\n",
            r"reply_checks\[0\]\.say_not'.*missing",
        ),
        (
            '[[reply_checks]]\nsay_not = ["x"]\nuntil = { stage = "a" }\n',
            r"reply_checks\[0\]\.until\.stage'.*unknown key",
        ),
        ("[flags.f]\naction = { item = { choose = [] } }\n", r"action\.item\.choose'.*1 to 64"),
        ('[flags.f]\naction = { item = { pick = ["a"] } }\n', r"action\.item\.pick'.*unknown key"),
        ('[flags.f]\neffects = { tags = { trust = "1" } }\n', r"flags\.f\.effects\.tags\.trust"),
    ],
)
def test_rules_are_validated_at_load_naming_file_and_key(
    tmp_path: Path, body: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        npc_mod.load(_npc(tmp_path, body))
    assert str(tmp_path / "npc.toml") in str(info.value) and "\n" not in str(info.value)


def test_next_stage_needs_the_stage_order(tmp_path: Path) -> None:
    path = tmp_path / "npc.toml"
    path.write_text('id = "x"\n[flags.f]\neffects = { stage = "next" }\n')
    with pytest.raises(ConfigError, match=r"needs the stage order"):
        npc_mod.load(path)


# -- deciding ------------------------------------------------------------------------------
def _fired(*names: str) -> dict[str, FlagResult]:
    return {n: FlagResult(0.9, 0.5, True) for n in names}


def test_a_blocked_flag_keeps_its_probability_and_says_which_condition() -> None:
    rules = npc_mod.load(SMITH).knowledge.rules
    state = State(Tags(quest_stage="start", trust=0.2), PlayerState(("iron_ore",)), ())
    judged = rules.judge(_fired("give_item", "quest_stage_change"), state)
    f = judged.flags["give_item"]
    assert not f.fired and f.prob == 0.9 and f.threshold == 0.5
    why = "quest stage is 'start', not 'in_progress' or 'complete'"
    assert f.blocked == f"flags.give_item.requires.stages: {why}"
    assert judged.flags["quest_stage_change"].fired and "give_item" not in judged.cases


def test_the_case_decides_the_parameters_and_effects_chain_in_head_order() -> None:
    rules = npc_mod.load(SMITH).knowledge.rules
    npc_items = ("steel_sword", "iron_dagger")
    brought = State(Tags(quest_stage="in_progress"), PlayerState(("iron_ore",)), npc_items)
    judged = rules.judge(_fired("give_item", "quest_stage_change"), brought)
    new, changes, actions, memories = apply(rules, judged, brought)
    assert [a.to_json() for a in actions] == [
        {"name": "give_item", "flag": "give_item", "item": "steel_sword", "received": "iron_ore"},
        {"name": "advance_quest", "flag": "quest_stage_change"},
    ]
    assert new.player.items == ("steel_sword",) and new.npc_items == ("iron_dagger", "iron_ore")
    assert new.tags.quest_stage == "complete" and new.tags.npc_mood == "calm"
    assert [str(c) for c in changes][:3] == [
        "npc_mood: - -> calm",
        "iron_ore: player -> npc",
        "steel_sword: npc -> player",
    ]
    assert memories == ("The quest moved on.",)
    # empty-handed and trusted: the other case, another item
    trusted = State(Tags(quest_stage="in_progress", trust=0.95), PlayerState(), npc_items)
    judged = rules.judge(_fired("give_item"), trusted)
    _, _, actions, _ = apply(rules, judged, trusted)
    assert actions[0].to_json()["item"] == "iron_dagger"


# -- surfaces: talk --json, the Python API, eval, serve ------------------------------------
@pytest.mark.model
def test_talk_json_an_effect_chain_over_three_turns(tmp_path: Path) -> None:
    """start -> in_progress (give_item blocked by the stage); in_progress -> complete with
    the trade (an item parameter); then both flags blocked and the guarded reply answers."""
    lines = ["Hello there.", "Here is the ore you wanted.", "Anything else?"]
    t1, t2, t3 = _talk_json(SMITH, lines, tmp_path / "home")
    assert t1["state"]["quest_stage"] == "in_progress"
    assert t1["flags"]["give_item"]["fired"] is False
    assert "requires.stages" in t1["flags"]["give_item"]["blocked"]
    assert t1["rules"]["actions"] == [{"name": "advance_quest", "flag": "quest_stage_change"}]
    assert t2["state"]["quest_stage"] == "complete" and t2["state"]["npc_mood"] == "calm"
    give = {"name": "give_item", "flag": "give_item", "item": "steel_sword", "received": "iron_ore"}
    assert give in t2["rules"]["actions"]
    assert t2["rules"]["player_items"] == ["steel_sword"]
    assert t3["stop_reason"] == "guarded" and t3["reply"] == "We are done here, friend."
    assert t3["rules"]["guard"] == "quest_stage_change" and t3["rules"]["actions"] == []
    assert set(t3["rules"]["blocked"]) == {"give_item", "quest_stage_change"}
    assert t3["tokens"]["generated"] == 0  # answered without generating


@pytest.mark.model
def test_talk_json_korean_guarded_replies_rotate(tmp_path: Path) -> None:
    turns = _talk_json(MOTHER_GUARD, ["베틀 방이 어디예요?", "알려 주세요.", "제발요."], tmp_path)
    assert [t["reply"] for t in turns] == [
        "아직 당신을 잘 몰라요.",
        "그곳 얘기는 할 수 없어요.",
        "아직 당신을 잘 몰라요.",
    ]
    assert all(t["stop_reason"] == "guarded" for t in turns)
    blocked = turns[0]["flags"]["give_hint"]["blocked"]
    assert blocked.startswith("flags.give_hint.requires.min_trust: trust is 0.35, below 0.9")


@pytest.mark.model
def test_the_demo_mother_takes_the_picture_and_gives_the_loom_key(tmp_path: Path) -> None:
    """The demo as shipped: handing over the picture moves it to her, gives the loom key,
    completes the quest; talk's table shows it and /state lists the items."""
    (turn,) = _talk_json("mother", ["미라의 사진을 찾았어요. 받으세요."], tmp_path / "home")
    rules = turn["rules"]
    assert turn["state"]["quest_stage"] == "complete"
    assert rules["player_items"] == ["loom_key"] and rules["npc_items"] == ["forgotten_picture"]
    assert {"name": "give_item", "flag": "give_item", "item": "loom_key",
            "received": "forgotten_picture"} in rules["actions"]  # fmt: skip
    repl = _npcchat(
        "talk", "--npc", "mother", "--temperature", "0", "--max-tokens", "12",
        home=tmp_path / "home",
        stdin="미라의 사진을 찾았어요. 받으세요.\n/state\n/quit\n",
    )  # fmt: skip
    assert repl.returncode == 0, repl.stderr
    out = repl.stdout
    assert "effect forgotten_picture: player -> npc" in out
    assert "action give_item(item=loom_key, received=forgotten_picture)" in out
    assert "player items loom_key" in out and "NPC items forgotten_picture" in out
    assert "['" not in out  # lists, not Python syntax


@pytest.mark.model
def test_undo_takes_the_effects_back_and_reset_restores_the_items(tmp_path: Path) -> None:
    import npcchat

    with npcchat.load() as rt:
        conv = rt.open(SMITH, session=tmp_path / "s.json", seed=1)
        conv.say("Hello.")
        conv.say("Here is the ore.")
        assert conv.session.player_state.items == ("steel_sword",)
        assert conv.session.tags.quest_stage == "complete"
        conv.undo()
        assert conv.session.player_state.items == ("iron_ore",)
        assert conv.session.npc_items == ("steel_sword", "iron_dagger")
        assert conv.session.tags.quest_stage == "in_progress"
        conv.say("Here is the ore.")
        conv.reset()
        assert conv.session.player_state.items == ("iron_ore",)
        assert conv.session.tags.quest_stage == "start"
    # the session file holds what the rules did, and reads back the same
    from npcchat.sessions import session as session_mod

    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["npc_items"] == ["steel_sword", "iron_dagger"]
    again = session_mod.load(tmp_path / "s.json")
    assert again.npc_items == ("steel_sword", "iron_dagger")


@pytest.mark.model
def test_an_npc_file_without_rules_prints_what_it_did_before(tmp_path: Path) -> None:
    plain = tmp_path / "plain.toml"
    plain.write_text('id = "village_blacksmith"\n[tags]\nquest_stage = "start"\n')
    (turn,) = _talk_json(plain, ["Hello."], tmp_path / "home")
    assert set(turn) == {"npc_id", "reply", "deltas", "flags", "state", "tokens", "timings_ms"}
    assert all(set(f) == {"prob", "threshold", "fired"} for f in turn["flags"].values())


@pytest.mark.model
def test_eval_carries_rules_over_the_turns_and_reports_them(tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    sc = tmp_path / "s.jsonl"
    lines = [
        {
            "id": "smith-chain",
            "npc_id": "village_blacksmith",
            "npc_file": str(SMITH),
            "turns": [
                {"player": "Hello there."},
                {"player": "Here is the ore you wanted.", "expect": {"flags": ["give_item"]}},
                {"player": "Anything else?"},
            ],
        },
        {
            "id": "mother-guard",
            "npc_id": "mother_abandoned_factory",
            "npc_file": str(MOTHER_GUARD),
            "turns": [{"player": "베틀 방이 어디예요?", "expect": {"flags": {"give_hint": False}}}],
        },
    ]
    sc.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
    report = tmp_path / "r.json"
    proc = _npcchat(
        "eval", str(sc), "--max-tokens", "12", "--report", str(report), home=tmp_path / "home"
    )
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(report.read_text())
    schema = json.loads(
        resources.files("npcchat.eval.schemas").joinpath("eval-report.schema.json").read_text()
    )
    jsonschema.validate(rep, schema)
    chain = next(s for s in rep["scenarios"] if s["id"] == "smith-chain")
    stages = [t["state"]["quest_stage"] for t in chain["turns"]]
    assert stages == ["in_progress", "complete", "complete"]
    assert chain["turns"][1]["flags"]["give_item"]["fired"] is True
    assert chain["turns"][2]["stop_reason"] == "guarded"
    rules = rep["aggregates"]["rules"]
    assert rules["guarded_turns"] == 2 and rules["blocked"]["give_hint"] == 1
    assert rules["actions"]["give_item"] == 1 and rules["state_changes"] >= 5
    assert rules["per_scenario"]["mother-guard"] == {"blocked": 1, "guarded": 1, "checks": 0}
    html = tmp_path / "r.html"
    proc = _npcchat("eval", str(sc), "--max-tokens", "12", "--html", str(html), home=tmp_path)
    assert proc.returncode == 0 and "guarded" in html.read_text()


@pytest.mark.model
def test_serve_returns_actions_beside_the_original_fields(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    import npcchat
    from npcchat.serve.app import Settings, create_app
    from npcchat.serve.store import SessionStore, npc_registry

    with npcchat.load() as rt:
        store = SessionStore(rt, npc_registry(RULES, False), tmp_path / "sessions")
        rt.start_batching(4)
        with TestClient(create_app(rt, store, Settings())) as client:
            body = {"player_id": "p1", "npc_id": "village_blacksmith", "max_tokens": 8}
            first = client.post("/v1/turn", json={**body, "text": "Hello."}).json()
            second = client.post("/v1/turn", json={**body, "text": "Here is the ore."}).json()
            korean = client.post(
                "/v1/turn",
                json={
                    "player_id": "p1",
                    "npc_id": "mother_abandoned_factory",
                    "text": "알려 주세요.",
                },
            ).json()
    assert set(first) == {"text", "delta", "flags", "actions", "meta"}
    assert first["flags"]["give_item"] is False  # the original field: a plain boolean
    assert "requires.stages" in first["meta"]["flags"]["give_item"]["blocked"]
    assert first["actions"] == [{"name": "advance_quest", "flag": "quest_stage_change"}]
    assert {"name": "give_item", "flag": "give_item", "item": "steel_sword",
            "received": "iron_ore"} in second["actions"]  # fmt: skip
    assert second["meta"]["state"]["quest_stage"] == "complete"
    assert second["meta"]["rules"]["player_items"] == ["steel_sword"]
    assert korean["text"] == "아직 당신을 잘 몰라요." and korean["meta"]["stop_reason"] == "guarded"


# -- examples as tests ---------------------------------------------------------------------
@pytest.mark.model
def test_examples_in_npc_files_run_as_labelled_eval_cases(tmp_path: Path) -> None:
    """Every demo NPC's examples (English and Korean) pass as a regression gate; a
    designer's example the rules contradict is reported against its NPC file and key."""
    demo_npcs = ROOT / "npcchat" / "demo" / "npcs"
    report = tmp_path / "r.json"
    args = ["eval", "--npcs", str(demo_npcs), "--examples", "--max-tokens", "8"]
    proc = _npcchat(
        *args, "--report", str(report), "--fail-under", "flag_f1_macro=1.0", home=tmp_path
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rep = json.loads(report.read_text())
    ids = {s["id"] for s in rep["scenarios"]}
    assert "mother_abandoned_factory/examples[1]" in ids and "village_blacksmith/examples[3]" in ids
    assert "mother_abandoned_factory/flags.unlock_hidden_path.examples[0]" in ids
    assert {s["kind"] for s in rep["scenarios"]} == {"example"}
    hint = next(s for s in rep["scenarios"] if s["id"] == "mother_abandoned_factory/examples[1]")
    assert hint["turns"][0]["expected"]["flags"]["give_hint"] is True
    assert hint["turns"][0]["flags"]["give_hint"]["fired"] is True
    # a designer writes an example the rules refuse: give_hint needs trust 0.9 here
    npcs = tmp_path / "npcs"
    npcs.mkdir()
    text = MOTHER_GUARD.read_text("utf-8")
    (npcs / "m.toml").write_text(
        text.replace("[flags.give_hint]\n", '[flags.give_hint]\nexamples = ["힌트 좀 주세요."]\n')
        + '\n[[examples]]\nplayer = "힌트 좀 주세요."\ntrust = 0.95\nfires = ["give_hint"]\n'
    )
    proc = _npcchat(*args[:2], str(npcs), *args[3:], "--report", str(report), home=tmp_path)
    assert proc.returncode == 0, proc.stderr
    by_id = {s["id"]: s for s in json.loads(report.read_text())["scenarios"]}
    refused = by_id["mother_abandoned_factory/flags.give_hint.examples[0]"]
    assert refused["source"].endswith("m.toml: flags.give_hint.examples[0]")
    assert refused["turns"][0]["flags"]["give_hint"]["fired"] is False  # blocked: trust 0.35
    trusted = by_id["mother_abandoned_factory/examples[0]"]
    assert trusted["turns"][0]["flags"]["give_hint"]["fired"] is True  # at trust 0.95


def test_examples_need_npc_files_and_are_validated(tmp_path: Path) -> None:
    proc = _npcchat("eval", "--examples", home=tmp_path)
    assert proc.returncode == 1 and "give --npcs DIR" in proc.stderr
    bad = _npc(tmp_path, "[[examples]]\ntrust = 0.5\n")
    with pytest.raises(ConfigError, match=r"key 'examples\[0\]\.player': missing"):
        npc_mod.load(bad)
    bad.write_text('id = "x"\n[[examples]]\nplayer = "hi"\nfires = [1]\n')
    with pytest.raises(ConfigError, match=r"key 'examples\[0\]\.fires'"):
        npc_mod.load(bad)


# -- reply checks: enforced while generating -------------------------------------------------
def _with_check(tmp_path: Path, base: str, phrase: str, until: str = "") -> Path:
    path = tmp_path / f"check-{len(list(tmp_path.glob('check-*')))}.toml"
    text = (ROOT / "npcchat" / "demo" / "npcs" / base).read_text("utf-8")
    extra = f"\nuntil = {until}" if until else ""
    path.write_text(text + f'\n[[reply_checks]]\nsay_not = ["{phrase}"]{extra}\n')
    return path


def _phrase(reply: str) -> str:
    """Two words from the middle of a reply the model gives: what the check forbids."""
    words = reply.replace(",", " ").replace(".", " ").split()
    middle = len(words) // 2
    return " ".join(words[middle : middle + 2])


@pytest.mark.model
@pytest.mark.parametrize(
    ("base", "line"),
    [
        ("village_blacksmith.toml", "I found the iron ore. Here, take it."),
        ("mother_abandoned_factory.toml", "미라의 사진을 찾았어요. 받으세요."),
    ],
    ids=["english", "korean"],
)
def test_a_reply_check_backs_up_while_generating_and_the_text_stays_whole(
    tmp_path: Path, base: str, line: str
) -> None:
    import npcchat
    from npcchat.text import for_matching

    own = (ROOT / "npcchat" / "demo" / "npcs" / base).read_text("utf-8").count("[[reply_checks]]")
    with npcchat.load() as rt:
        plain = rt.open(ROOT / "npcchat" / "demo" / "npcs" / base, seed=3).say(line)
        phrase = _phrase(plain.reply)
        assert for_matching(phrase) in for_matching(plain.reply)
        checked = _with_check(tmp_path, base, phrase)
        conv = rt.open(checked, seed=3)
        stream = conv.stream(line)
        shown = ""
        for piece in stream:
            shown += piece
            assert for_matching(phrase) not in for_matching(shown)  # never shown, not once
        turn = stream.turn
    assert shown == turn.reply and turn.reply.strip()
    assert for_matching(phrase) not in for_matching(turn.reply)
    assert (
        turn.rules is not None
        and turn.rules.checks
        and f"reply_checks[{own}]" in turn.rules.checks  # appended after the file's own
    )
    assert "\ufffd" not in turn.reply  # no half character left where it backed up
    # once the check's condition holds, the same line may say it
    allowed = _with_check(tmp_path, base, phrase, until="{ min_trust = 0.0 }")
    again = rt_free_say(allowed, line)
    assert again.rules is not None and again.rules.checks == ()


def rt_free_say(npc: Path, line: str) -> Any:
    import npcchat

    with npcchat.load() as rt:
        return rt.open(npc, seed=3).say(line)


@pytest.mark.model
def test_eval_and_serve_report_reply_check_interventions(tmp_path: Path) -> None:
    import npcchat

    line = "I found the iron ore. Here, take it."
    base = ROOT / "npcchat" / "demo" / "npcs" / "village_blacksmith.toml"
    with npcchat.load() as rt:
        phrase = _phrase(rt.open(base, seed=0).say(line).reply)
    checked = _with_check(tmp_path, "village_blacksmith.toml", phrase)
    sc = tmp_path / "s.jsonl"
    sc.write_text(
        json.dumps(
            {
                "id": "c",
                "npc_id": "village_blacksmith",
                "npc_file": str(checked),
                "turns": [{"player": line}],
            }
        )
        + "\n"
    )
    report = tmp_path / "r.json"
    proc = _npcchat("eval", str(sc), "--report", str(report), home=tmp_path / "home")
    assert proc.returncode == 0, proc.stderr
    rep = json.loads(report.read_text())
    assert rep["aggregates"]["rules"]["check_interventions"] >= 1
    assert rep["aggregates"]["rules"]["per_scenario"]["c"]["checks"] >= 1
    assert rep["scenarios"][0]["turns"][0]["rules"]["checks"]


@pytest.mark.model
def test_serve_enforces_reply_checks_in_batched_slots(tmp_path: Path) -> None:
    """Turns side by side in the scheduler's slots back up alone: each reply equals the
    one the same session gets one at a time, and none says the phrase."""
    import threading

    from fastapi.testclient import TestClient

    import npcchat
    from npcchat.serve.app import Settings, create_app
    from npcchat.serve.store import SessionStore, npc_registry
    from npcchat.text import for_matching

    line = "I found the iron ore. Here, take it."
    base = ROOT / "npcchat" / "demo" / "npcs" / "village_blacksmith.toml"
    with npcchat.load() as rt:
        phrase = _phrase(rt.open(base, seed=0).say(line).reply)
    npcs = tmp_path / "npcs"
    npcs.mkdir()
    _with_check(npcs, "village_blacksmith.toml", phrase).rename(npcs / "smith.toml")
    with npcchat.load(slots=4) as rt:
        store = SessionStore(rt, npc_registry(npcs, False), tmp_path / "sessions")
        rt.start_batching(8)
        answers: dict[str, Any] = {}
        with TestClient(create_app(rt, store, Settings())) as client:

            def turn(player: str) -> None:
                body = {"player_id": player, "npc_id": "village_blacksmith", "text": line}
                answers[player] = client.post("/v1/turn", json={**body, "seed": 7}).json()

            threads = [threading.Thread(target=turn, args=(f"p{i}",)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(120)
    assert len(answers) == 4
    replies = {a["text"] for a in answers.values()}
    assert len(replies) == 1  # same line, same seed: the same reply in every slot
    assert for_matching(phrase) not in for_matching(replies.pop())
    assert all(a["meta"]["rules"]["checks"] for a in answers.values())


# -- a parameter the model chooses from a closed list --------------------------------------
@pytest.mark.model
def test_a_parameter_chosen_by_the_model_is_always_one_of_its_options(tmp_path: Path) -> None:
    """Decoding after the reply is constrained by a grammar of the options (English and
    Korean ones alike): whatever the model, the game gets one of them, never free text."""
    options = {"steel_sword", "iron_dagger", "강철 방패"}
    lines = ["Here is the ore.", "여기 광석이요.", "Give me something.", "뭐 없어요?"]
    turns = _talk_json(RULES / "choice.toml", lines, tmp_path)
    for t in turns:
        (action,) = t["rules"]["actions"]
        assert action["name"] == "give_item" and action["item"] in options
    from npcchat.runtime.engine import gbnf_literal

    assert gbnf_literal('a "b" \\ 방패\n') == '"a \\"b\\" \\\\ 방패\\x0a"'


@pytest.mark.model
def test_a_guard_with_tags_lets_the_model_answer_in_that_style(tmp_path: Path) -> None:
    """The model writes the guarded reply from the same prompt with the guard's tags (a
    second prefill); the state change stays the player's prompt's, the session's tags are
    not the guard's."""
    import npcchat

    path = tmp_path / "m.toml"
    path.write_text(
        MOTHER_GUARD.read_text("utf-8").replace(
            'lines = ["아직 당신을 잘 몰라요.", "그곳 얘기는 할 수 없어요."]',
            'tags = { npc_mood = "tired", style = "guarded" }',
        )
    )
    with npcchat.load() as rt:
        conv = rt.open(path, seed=1)
        turn = conv.say("베틀 방이 어디예요?")
    assert turn.rules is not None and turn.rules.guard == "give_hint"
    assert turn.stop_reason != "guarded" and turn.reply.strip()  # generated, not a fixed line
    assert turn.prefill_tokens > turn.prompt_tokens  # the prompt, then its guarded variant
    assert turn.flags["give_hint"].blocked
    assert conv.session.tags.npc_mood == "grief" and conv.session.tags.style != "guarded"


@pytest.mark.model
def test_a_turn_decided_without_the_model_keeps_its_flags_under_the_files_thresholds() -> None:
    """The fixture's thresholds are 0.0 (every predicted flag fires); a scripted or trigger
    turn's flags were decided, not predicted, so the flags it does not name stay off."""
    import npcchat

    with npcchat.load() as rt, rt.open(str(RULES / "smith.toml")) as chat:
        turn = chat.scripted("Good day.", "Good day to you.", {}, [])
        assert turn.fired == () and turn.stop_reason == "scripted"
