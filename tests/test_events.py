"""Game events into sessions: their JSON and typed forms, applying them (all or none, in
order, saved like a turn), what the next prompt shows, recall by game time, and the same
through the Python API, ``talk``'s ``/event`` and the server's route."""

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
from npcchat import events as E
from npcchat.errors import ConfigError
from npcchat.sessions import session as session_mod
from npcchat.types import Memory, PlayerState, Tags

NPC = "village_blacksmith"


# -- the forms ---------------------------------------------------------------------------------
def test_every_event_kind_reads_from_json_and_round_trips() -> None:
    given = [
        {"type": "tags", "tags": {"npc_mood": "grateful", "trust": 1}},
        {"type": "stage", "stage": " complete "},
        {"type": "items", "gained": ["loom_key", "loom_key"], "lost": ["coin"]},
        {"type": "actions", "gained": ["killed_wolves"]},
        {
            "type": "memory",
            "text": "플레이어가 잃어버린 양을 찾아왔다",
            "day": 12,
            "time": "Last Seed 17",
        },
        {"type": "time", "day": 13.5},
    ]
    parsed = E.parse_all(given)
    assert parsed == (
        E.SetTags((("npc_mood", "grateful"), ("trust", 1.0))),
        E.Stage("complete"),
        E.Items(("loom_key",), ("coin",)),
        E.Actions(("killed_wolves",)),
        E.Remember("플레이어가 잃어버린 양을 찾아왔다", 12.0, "Last Seed 17"),
        E.Clock(13.5),
    )
    assert E.parse_all([e.to_json() for e in parsed]) == parsed
    assert E.parse_all(parsed) == parsed  # typed values pass through, checked
    # NFD Hangul is stored as NFC, as every other line of npcchat
    nfd = "\u1100\u1161\u11ab"  # 간, decomposed
    assert E.parse({"type": "stage", "stage": nfd}) == E.Stage("간")


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"type": "weather"}, "events[0].type: expected one of"),
        ({"type": "stage"}, "events[0].stage: expected non-empty text"),
        ({"type": "stage", "stage": "x", "colour": 1}, "events[0].colour: not a key"),
        ({"type": "tags", "tags": {"trust": 1.5}}, "events[0].tags.trust: expected a number"),
        ({"type": "tags", "tags": {"trust": True}}, "events[0].tags.trust: expected a number"),
        ({"type": "tags", "tags": {"gold": "x"}}, "events[0].tags.gold: not a tag"),
        ({"type": "items", "gained": "sword"}, "events[0].gained: expected a list"),
        ({"type": "items", "gained": [""]}, "events[0].gained[0]: expected non-empty"),
        ({"type": "memory", "text": "x", "day": -1}, "events[0].day: expected a number in"),
        ({"type": "memory", "text": "x", "day": float("nan")}, "events[0].day"),
        ({"type": "memory", "text": "x" * 2001}, "events[0].text: at most 2000"),
        ({"type": "time"}, "events[0].day: missing"),
        ("stage", "events[0]: expected an object"),
    ],
)
def test_a_bad_event_names_the_event_and_key(given: Any, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        E.parse_all([given])
    assert message in refused.value.message


def test_calls_are_bounded_before_anything_is_built() -> None:
    with pytest.raises(ConfigError, match="at most 64 events"):
        E.parse_all([{"type": "time", "day": 1}] * 65)
    with pytest.raises(ConfigError, match="at most 200 names"):
        E.parse({"type": "items", "gained": ["x"] * 201})
    with pytest.raises(ConfigError, match="at least one"):
        E.parse_all([])


def test_talks_short_forms_mean_the_json_forms() -> None:
    assert E.parse_command("stage complete") == (E.Stage("complete"),)
    assert E.parse_command("tags npc_mood=grateful trust=0.7") == (
        E.SetTags((("npc_mood", "grateful"), ("trust", 0.7))),
    )
    assert E.parse_command("items +loom_key -coin") == (E.Items(("loom_key",), ("coin",)),)
    assert E.parse_command("action +killed_wolves") == (E.Actions(("killed_wolves",)),)
    assert E.parse_command('memory day=12 time="Last Seed 17" The player returned the ring') == (
        E.Remember("The player returned the ring", 12.0, "Last Seed 17"),
    )
    assert E.parse_command("memory 반지를 돌려받았다") == (E.Remember("반지를 돌려받았다"),)
    assert E.parse_command("time 13 Last Seed 18") == (E.Clock(13.0, "Last Seed 18"),)
    assert E.parse_command('[{"type": "stage", "stage": "a"}, {"type": "time", "day": 2}]') == (
        E.Stage("a"),
        E.Clock(2.0),
    )
    for bad in ("", "items sword", "tags trust", "tags trust=high", "memory day=x hi", "{oops"):
        with pytest.raises(ConfigError):
            E.parse_command(bad)


# -- applying ----------------------------------------------------------------------------------
def _session(**more: Any) -> session_mod.Session:
    tags = Tags(quest_stage="start", trust=0.5)
    return session_mod.Session(npc_id="smith", tags=tags, initial_tags=tags, **more)


def test_events_change_state_in_order_and_log_what_they_changed() -> None:
    s = _session(player_state=PlayerState(items=("coin",)))
    s = s.with_events(
        E.parse_all(
            [
                {"type": "stage", "stage": "done"},
                {"type": "items", "gained": ["loom_key"], "lost": ["coin", "never_had"]},
                {"type": "memory", "text": "The player brought the lamb back", "day": 12},
                {"type": "stage", "stage": "done"},  # already so: no change
                {"type": "time", "day": 14, "time": "Last Seed 19"},
            ]
        )
    )
    assert s.tags.quest_stage == "done" and s.player_state.items == ("loom_key",)
    assert (s.game_day, s.game_time) == (14.0, "Last Seed 19")
    assert s.memories == (Memory(0, "The player brought the lamb back", 12.0, "", "event"),)
    assert s.memories[0].line == "(day 12) The player brought the lamb back"
    (record,) = s.events
    assert record.turn == 0 and len(record.events) == 5
    assert [str(c) for c in record.changes] == [
        "quest_stage: start -> done",
        "coin: player -> -",
        "loom_key: - -> player",
        "memory: (day 12) The player brought the lamb back",
        "day: - -> 12",
        "day: 12 -> 14",
    ]
    # a memory without a day takes the clock's; one with its timestamp shows it
    s = s.with_events([E.Remember("Snow fell", time="Frostfall 1")])
    assert s.memories[-1].day == 14.0 and s.memories[-1].line == "(day 14, Frostfall 1) Snow fell"
    # /reset forgets the game's events too
    assert s.reset().events == () and s.reset().game_day is None


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_the_session_file_keeps_events_memories_and_the_clock(tmp_path: Path, suffix: str) -> None:
    s = _session().with_events([E.Remember("장이 섰다", day=3.5, time="장날"), E.Clock(4.0)])
    path = tmp_path / f"s{suffix}"
    session_mod.save(s, path)
    back = session_mod.load(path)
    assert back.events == s.events and back.memories == s.memories
    assert (back.game_day, back.game_time) == (4.0, "장날")
    # a session without a clock writes none (TOML has no null) and reads back the same
    plain = tmp_path / f"plain{suffix}"
    session_mod.save(_session(), plain)
    assert session_mod.load(plain).game_day is None
    # a hand-edited event the reader cannot take names its place
    data = session_mod.to_dict(s)
    data["events"][0]["events"][0]["day"] = "soon"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(npcchat.NpcchatError, match=r"events\[0\]\.events\[0\]\.day"):
        session_mod.load(bad)


# -- on the model ------------------------------------------------------------------------------
def _prompt(chat: npcchat.Conversation, line: str) -> str:
    return chat.prompt(line).prompt.text  # what the next turn decodes (tests/test_api.py)


@pytest.mark.model
def test_the_next_prompt_shows_the_events_as_documented(tmp_path: Path) -> None:
    path = tmp_path / "borin.json"
    with npcchat.load() as rt, rt.open(NPC, session=path) as chat:
        record = chat.apply_events(
            [
                E.Stage("sword_returned"),
                {"type": "items", "gained": ["loom_key"]},
                {"type": "actions", "gained": ["killed_wolves"]},
                E.Remember("The player killed the wolves that raided the farm", day=12),
            ]
        )
        assert len(record.changes) == 5
        on_disk = session_mod.load(path)  # saved before apply_events returned
        assert on_disk.events == chat.session.events
        prompt = _prompt(chat, "Good morning.")  # a line about something else entirely
        assert "quest_stage=sword_returned" in prompt
        assert "items=iron_ore,loom_key" in prompt and "actions=killed_wolves" in prompt
        assert "memory: (day 12) The player killed the wolves that raided the farm" in prompt
        chat.say("Good morning.")
        # after a turn the memory is recalled by relevance, like every memory
        assert "wolves that raided" not in _prompt(chat, "Good morning.")
        assert "memory: (day 12) The player killed the wolves" in _prompt(
            chat, "Do you remember the wolves that raided the farm?"
        )
        # /undo takes back the turn, not what the game said
        chat.undo()
        assert chat.session.memories == on_disk.memories
        assert chat.session.events == on_disk.events


@pytest.mark.model
def test_recall_can_be_limited_to_recent_game_days(tmp_path: Path) -> None:
    cfg = npcchat.load_config()
    from dataclasses import replace

    cfg = replace(cfg, knowledge=replace(cfg.knowledge, recall_days=30.0))
    question = "Do you remember the wolves that raided the farm?"
    with npcchat.load(config=cfg) as rt, rt.open(NPC) as chat:
        chat.apply_events([E.Remember("The player killed the wolves that raided the farm", day=1)])
        chat.say("Hello.")
        chat.apply_events([E.Clock(20)])
        assert "memory: (day 1) The player killed" in _prompt(chat, question)  # 19 days ago
        chat.apply_events([E.Clock(40)])
        assert "memory: (day 1)" not in _prompt(chat, question)  # 39 days ago: not recalled
        chat.apply_events([E.Remember("An undated rumour about wolves that raided the farm")])
        chat.say("Hi.")
        assert "memory: (day 40) An undated rumour" in _prompt(chat, question)  # the clock's day


@pytest.mark.model
def test_a_bad_event_applies_none_and_the_file_is_untouched(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    with npcchat.load() as rt, rt.open(NPC, session=path) as chat:
        before = path.read_bytes()
        with pytest.raises(ConfigError, match=r"events\[1\]\.day"):
            chat.apply_events([E.Stage("x").to_json(), {"type": "time", "day": "tomorrow"}])
        assert path.read_bytes() == before and chat.session.events == ()
        assert chat.session.tags.quest_stage != "x"


@pytest.mark.model
def test_talk_takes_events_with_slash_event(tmp_path: Path) -> None:
    session = tmp_path / "s.json"
    script = "\n".join(
        [
            "/event stage complete",
            "/event items +loom_key",
            '/event memory day=3 time="장날" 대장장이가 칼을 벼렸다',
            "/event weather rain",
            "/event",
            "/state",
            "/memory",
            "/prompt 칼은 언제 되나요?",
            "/quit",
        ]
    )
    proc = subprocess.run(
        [sys.executable, "-m", "npcchat", "talk", "--session", str(session)],
        input=script + "\n",
        capture_output=True,
        text=True,
        env={**os.environ, "NPCCHAT_HOME": str(tmp_path / "home")},
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in out, out
    assert "event quest_stage: start -> complete" in out
    assert "event loom_key: - -> player" in out
    # the change, /memory, and the next prompt (/prompt): the game's memory is in it
    assert out.count("(day 3, 장날) 대장장이가 칼을 벼렸다") == 3
    assert "/event: weather rain?" in out  # a form it does not know: the usage, no crash
    assert "game clock day 3" in out
    assert "<PLAYER>칼은 언제 되나요?" in out and "tokens" in out  # /prompt: what the model reads
    saved = session_mod.load(session)
    assert saved.player_state.items[-1] == "loom_key" and saved.game_day == 3.0
    assert [len(r.events) for r in saved.events] == [1, 1, 1]


# -- the route ---------------------------------------------------------------------------------
@pytest.mark.model
def test_the_events_route_applies_saves_and_refuses_like_the_api(serve: Any) -> None:
    server = serve()
    url = f"/v1/sessions/p1/{NPC}/events"
    with server.client() as c:
        # a player who has not spoken yet: the session starts from the NPC file
        r = c.post(
            url,
            json={
                "events": [
                    {"type": "stage", "stage": "complete"},
                    {"type": "memory", "text": "The player paid the debt", "day": 2},
                ]
            },
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert [ch["kind"] for ch in body["applied"]["changes"]] == ["tag", "memory", "time"]
        assert body["session"]["tags"]["quest_stage"] == "complete"
        assert body["session"]["game_clock"] == {"day": 2.0, "time": ""}
        assert body["session"]["memories"][0]["source"] == "event"
        on_disk = session_mod.load(server.sessions / NPC / "p1.json")
        assert len(on_disk.events) == 1
        # the prefix rule, as everywhere
        assert (
            c.post(
                "/v1/sessions/p1/village/events", json={"events": [{"type": "time", "day": 3}]}
            ).status_code
            == 200
        )
        turn = c.post("/v1/turn", json={"player_id": "p1", "npc_id": NPC, "text": "Hello."})
        assert turn.status_code == 200
        got = c.get(f"/v1/sessions/p1/{NPC}").json()
        assert [e["turn"] for e in got["events"]] == [0, 0] and len(got["history"]) == 1
        for bad, status in (
            ({"events": []}, 422),
            ({"events": [{"type": "stage", "stage": "  "}]}, 422),
            ({"events": [{"type": "time", "day": "x"}]}, 422),
            ({"events": [{"type": "items", "gained": "sword"}]}, 422),
            ({"events": [{"type": "time", "day": 1}] * 65}, 422),
        ):
            r = c.post(url, json=bad)
            assert r.status_code == status, (bad, r.text)
            assert r.json()["error"]["code"] == "invalid_request"
        assert (
            c.post(
                "/v1/sessions/p1/nobody/events", json={"events": [{"type": "time", "day": 1}]}
            ).status_code
            == 404
        )
    assert len(session_mod.load(server.sessions / NPC / "p1.json").events) == 2


def _turned(s: session_mod.Session) -> session_mod.Session:
    """``s`` after one turn whose rules moved items (so /undo takes the whole state back)."""
    from npcchat.types import FlagResult

    record = session_mod.TurnRecord(
        player="Here is the ore.",
        reply="Take the sword.",
        deltas={"trust": 0.1, "relationship": 0.0},
        flags={"give_item": FlagResult(0.9, 0.5, True)},
        tags_before=s.tags,
        prompt_tokens=10,
        generated_tokens=3,
        dropped_turns=0,
        stop_reason="eos",
        seed=0,
        prefill_tokens=10,
        timings_ms={"prefill": 1.0, "heads": 0.1, "generate": 1.0},
        time="2026-01-01T00:00:00+00:00",
        player_before=s.player_state,
        npc_items_before=s.npc_items,
    )
    after = replace(s.tags, trust=0.6, quest_stage="in_progress")
    return replace(
        s,
        tags=after,
        history=(*s.history, record),
        player_state=PlayerState(items=("sword",)),
        npc_items=(),
    )


def test_undo_takes_back_the_turn_and_keeps_what_the_game_said_after_it() -> None:
    s = _turned(_session(player_state=PlayerState(items=("ore",)), npc_items=("sword",)))
    s = s.with_events(
        [
            E.SetTags((("trust", 0.9),)),
            E.Stage("complete"),
            E.Items(gained=("loom_key",)),
            E.Remember("The mayor thanked the player", day=3),
        ]
    )
    back = s.undo()
    assert back.history == () and back.npc_items == ("sword",)  # the turn's effects went
    # the game's word after the turn stays, made again on the state before the turn
    assert back.tags.trust == 0.9 and back.tags.quest_stage == "complete"
    assert back.player_state.items == ("ore", "loom_key")
    assert [m.text for m in back.memories] == ["The mayor thanked the player"]
    assert back.events == s.events and back.game_day == 3.0


def test_a_session_keeps_a_bounded_number_of_the_games_memories(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(E, "MAX_EVENT_MEMORIES", 3)
    monkeypatch.setattr(E, "MAX_LOG", 2)
    s = _session()
    for i in range(4):
        s = s.with_events([E.Remember(f"note {i}")])
    assert [m.text for m in s.memories] == ["note 1", "note 2", "note 3"]
    assert str(s.events[-1].changes[-1]) == "memory forgotten: note 0"  # said, not silent
    assert len(s.events) == 2  # the newest records of the log


@pytest.mark.model
def test_a_memory_longer_than_the_memory_budget_is_refused(tmp_path: Path) -> None:
    with npcchat.load() as rt, rt.open(NPC) as chat:
        with pytest.raises(ConfigError, match=r"events\[1\]\.text: \d+ tokens, over the memory"):
            chat.apply_events([E.Stage("x"), E.Remember("word " * 400)])
        assert chat.session.events == ()
