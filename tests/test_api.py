"""The public Python API (``import npcchat``), driven the way a game or tool would use it:
nothing here imports an npcchat submodule."""

from __future__ import annotations

import json
import pydoc
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
from typer.testing import CliRunner

import npcchat

pytestmark = pytest.mark.model  # the demo bundle shipped in the package runs in llama.cpp

LINES = ("Hello there, smith.", "Can you mend my sword?", "Farewell.")


def _config(seed: int = 7) -> npcchat.Config:
    cfg = npcchat.load_config()
    return replace(cfg, sampling=replace(cfg.sampling, temperature=0.0, seed=seed, max_tokens=24))


def _core(turn: dict[str, object]) -> dict[str, object]:
    return {k: v for k, v in turn.items() if k != "timings_ms"}


def test_a_conversation_saved_and_resumed_through_the_public_api(tmp_path: Path) -> None:
    path = tmp_path / "borin.toml"
    pieces: list[str] = []
    with npcchat.load(config=_config()) as rt:
        assert rt.has_heads and "give_item" in rt.flags
        with rt.open("village_blacksmith", session=path) as chat:
            first = chat.say(LINES[0], on_text=pieces.append)
            stream = chat.stream(LINES[1])
            streamed = list(stream)
            second = stream.turn
    assert isinstance(first, npcchat.Turn) and isinstance(second, npcchat.Turn)
    assert "".join(pieces).rstrip() == first.reply and first.reply
    assert "".join(streamed).rstrip() == second.reply
    assert first.npc_id == "village_blacksmith" and first.to_dict()["npc_id"] == first.npc_id
    assert json.loads(first.to_json()) == first.to_dict()
    assert set(first.flags) == set(rt.flags) and set(first.deltas) == {"trust", "relationship"}
    assert second.tags_before == first.tags_after  # the state carries from turn to turn

    # resumed: the session's own NPC, history and state
    with npcchat.load(config=_config()) as rt, rt.open(session=path) as chat:
        assert [t.player for t in chat.session.history] == list(LINES[:2])
        assert chat.session.tags == second.tags_after
        third = chat.say(LINES[2])
        assert third.tags_before == second.tags_after
    with npcchat.load(config=_config()) as rt, rt.open(session=path) as chat:
        assert len(chat.session.history) == 3


def test_say_gives_the_object_talk_json_prints(tmp_path: Path) -> None:
    from npcchat.cli import app

    cfg = _config(seed=11)
    with npcchat.load(config=cfg) as rt, rt.open("village_blacksmith", seed=11) as chat:
        turns = [chat.say(line).to_dict() for line in LINES[:2]]
    args = ["talk", "--npc", "village_blacksmith", "--json", "--temperature", "0"]
    args += ["--seed", "11", "--max-tokens", "24"]
    for line in LINES[:2]:
        args += ["--say", line]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    assert [_core(t) for t in printed] == [_core(t) for t in turns]


def test_a_closed_stream_cancels_its_turn(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    with npcchat.load(config=_config()) as rt, rt.open("village_blacksmith", session=path) as chat:
        chat.say(LINES[0])
        saved = path.read_bytes()
        before = chat.session
        with chat.stream(LINES[1]) as stream:
            next(stream)
        assert chat.session == before and path.read_bytes() == saved
        with pytest.raises(RuntimeError, match="cancelled"):
            _ = stream.turn
        again = chat.say(LINES[1])  # the runtime's lock was released; the turn runs whole
    with npcchat.load(config=_config()) as rt, rt.open("village_blacksmith") as fresh:
        fresh.say(LINES[0])
        expected = fresh.say(LINES[1])
    # the same turn as if the cancelled one never ran (it only had to prefill in full again)
    assert (again.reply, again.heads, again.tags_after) == (
        expected.reply,
        expected.heads,
        expected.tags_after,
    )
    assert again.prefill_tokens == again.prompt_tokens


def test_conversations_on_one_runtime_from_two_threads() -> None:
    """Turns from two threads are serialized by the runtime's lock: each thread gets what a
    run on its own gives."""

    def talk(chat: npcchat.Conversation, out: list[str]) -> None:
        out.extend(chat.say(line).reply for line in LINES)

    with npcchat.load(config=_config()) as rt:
        alone: list[str] = []
        talk(rt.open("village_blacksmith"), alone)
        a: list[str] = []
        b: list[str] = []
        threads = [
            threading.Thread(target=talk, args=(rt.open("village_blacksmith"), a)),
            threading.Thread(target=talk, args=(rt.open("village_blacksmith"), b)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert a == alone and b == alone


def test_errors_are_npcchat_errors_with_hints(tmp_path: Path) -> None:
    with pytest.raises(npcchat.NpcchatError, match="not a model bundle"):
        npcchat.load(tmp_path)
    with npcchat.load(config=_config()) as rt:
        with pytest.raises(npcchat.NpcchatError) as info:
            rt.open("no_such_npc")
        assert info.value.hint and "village_blacksmith" in info.value.hint


def test_help_shows_the_public_api() -> None:
    text = pydoc.render_doc(npcchat, renderer=pydoc.plaintext)
    for name in ("load", "Runtime", "Conversation", "TurnStream", "Turn", "read_scenarios"):
        assert name in text
    assert "Thread" in text  # what is thread-safe is part of the documented contract


def test_version_info_and_the_commands_of_the_model_side() -> None:
    from npcchat.cli import app

    runner = CliRunner()
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.strip() == f"npcchat {npcchat.__version__}"
    info = runner.invoke(app, ["info", "--json"])
    assert info.exit_code == 0, info.output
    data = json.loads(info.stdout)
    assert data["npcchat"] == npcchat.__version__
    assert data["llama_cpp"]["version"] and "CPU" in data["llama_cpp"]["backends"]
    assert "CPUExecutionProvider" in data["onnxruntime"]["providers"]
    assert data["demo_bundle"] and data["extras"]["convert"] is True
    table = runner.invoke(app, ["info"])
    assert table.exit_code == 0 and "llama.cpp CPU" in table.stdout
    # npcchat convert / heads come from the model-side packages through entry points
    out = subprocess.run(
        [sys.executable, "-m", "npcchat", "--help"], capture_output=True, text=True, check=True
    )
    assert "convert" in out.stdout and "heads" in out.stdout and "talk" in out.stdout


def test_batched_turns_of_many_conversations_equal_one_at_a_time() -> None:
    """start_batching: turns of four conversations run side by side in the slots of one
    context; each conversation gets what it gets alone."""
    with npcchat.load(config=_config()) as rt:
        alone: list[str] = []
        chat = rt.open("village_blacksmith")
        alone = [chat.say(line).reply for line in LINES]
    results: dict[int, list[str]] = {}
    with npcchat.load(config=_config(), slots=4) as rt:
        rt.start_batching()
        chats = [rt.open("village_blacksmith") for _ in range(4)]

        def talk(i: int) -> None:
            results[i] = [chats[i].say(line).reply for line in LINES]

        threads = [threading.Thread(target=talk, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert rt.occupancy.running == 0
        stream = chats[0].stream("One more thing.")
        pieces = list(stream)
        assert "".join(pieces).rstrip() == stream.turn.reply
    assert [results[i] for i in range(4)] == [alone] * 4


def test_the_prompt_shown_is_the_prompt_the_turn_decodes(tmp_path: Path) -> None:
    """``Conversation.prompt`` (talk's ``/prompt``) gives the very tokens the next turn
    decodes: lore picked, memories and the game's events included."""
    with npcchat.load() as rt, rt.open("mother", session=tmp_path / "m.json") as chat:
        chat.say("안녕하세요.")
        chat.apply_events([npcchat.events.Remember("손님이 공장 문을 고쳤다", day=2)])
        line = "따님에 대해 말해 주세요."
        shown = chat.prompt(line)
        assert "memory: (day 2) 손님이 공장 문을 고쳤다" in shown.prompt.text
        assert shown.prompt.text.count("<STATE>") == 1 and line in shown.prompt.text
        chat.say(line)
        decoded = rt._engine.kv_tokens(0)  # the KV cache: the prompt, then the reply
        assert tuple(decoded[: len(shown.tokens)]) == shown.tokens


def test_a_scripted_turn_goes_through_the_rules_and_the_session_without_the_model(
    tmp_path: Path,
) -> None:
    path = tmp_path / "borin.json"
    with npcchat.load() as rt, rt.open("village_blacksmith", session=path) as chat:
        decoded = rt._engine.model.decoded_tokens
        turn = chat.scripted(
            "Here is the ore.", "Fine steel for fine ore.", {"trust": 0.2}, ["give_item"]
        )
        assert rt._engine.model.decoded_tokens == decoded  # nothing ran through the model
        assert turn.stop_reason == "scripted" and turn.reply == "Fine steel for fine ore."
        assert [a.to_json() for a in turn.actions] == [
            {
                "name": "give_item",
                "flag": "give_item",
                "item": "steel_sword",
                "received": "iron_ore",
            }
        ]
        assert "steel_sword" in chat.session.player_state.items  # the rules moved the item
        assert turn.tags_after.trust > turn.tags_before.trust
        # a forbidden trigger gets the trigger's turn, as in play
        assert chat.scripted("You thief!", "ignored", {}, []).stop_reason == "trigger"
    with npcchat.load() as rt, rt.open(session=path) as again:  # saved, as every turn
        assert [t.stop_reason for t in again.session.history] == ["scripted", "trigger"]
