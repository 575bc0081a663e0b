"""The OpenAI-compatible routes through a real server, with the official ``openai`` Python
package as the client (streaming and not) and a raw Server-Sent Events reader."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from npcchat.sessions import session as session_mod

pytestmark = pytest.mark.model

NPC = "village_blacksmith"


def _client(server: Any, key: str = "none") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _sse(response: httpx.Response) -> list[Any]:
    """A raw SSE body as its ``data:`` payloads (JSON, or the text ``[DONE]``)."""
    out: list[Any] = []
    for block in response.text.split("\n\n"):
        for line in block.splitlines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_a_chat_completion_is_the_game_turn_with_the_npc_state_beside_it(serve: Any) -> None:
    server = serve()
    client = _client(server)
    with server.client() as c:
        turn = c.post(
            "/v1/turn",
            json={"player_id": "a", "npc_id": NPC, "text": "Can you mend my sword?", "seed": 7},
        ).json()
    done = client.chat.completions.create(
        model="village",  # a unique prefix names the NPC, as in talk
        messages=[
            {"role": "system", "content": "ignored: the NPC file is the persona"},
            {"role": "user", "content": "Can you mend my sword?"},
        ],
        user="b",
        seed=7,
    )
    assert done.object == "chat.completion" and done.model == NPC
    choice = done.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert choice.message.content == turn["text"]  # same NPC, prompt and seed: same turn
    assert (
        done.usage is not None
        and done.usage.completion_tokens == turn["meta"]["tokens"]["generated"]
    )
    npc = (done.model_extra or {})["npc"]
    assert npc["npc_id"] == NPC and npc["player_id"] == "b" and npc["turn"] == 1
    assert npc["deltas"] == turn["delta"]
    assert {n: f["fired"] for n, f in npc["flags"].items()} == turn["flags"]
    assert all({"prob", "threshold", "fired"} <= set(f) for f in npc["flags"].values())
    assert npc["state"] == turn["meta"]["state"]
    assert npc["actions"] == turn["actions"]
    assert set(npc["player_state"]) == {"items", "actions", "position"}
    # the session is the player's, saved like every served turn
    saved = session_mod.load(server.sessions / NPC / "b.json")
    assert [t.player for t in saved.history] == ["Can you mend my sword?"]
    assert saved.history[0].reply == choice.message.content


def test_streaming_with_the_openai_client_and_a_raw_sse_reader(serve: Any) -> None:
    server = serve()
    client = _client(server)
    chunks = list(
        client.chat.completions.create(
            model=NPC,
            messages=[{"role": "user", "content": "Give me a sword."}],
            user="s1",
            stream=True,
            stream_options={"include_usage": True},
            seed=3,
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    final = finals[0]
    assert final.choices[0].delta.content in (None, "")  # the npc chunk adds no text
    npc = (final.model_extra or {})["npc"]
    assert npc["player_id"] == "s1" and set(npc["deltas"]) == {"trust", "relationship"}
    usage = [c for c in chunks if not c.choices]
    assert len(usage) == 1 and usage[0].usage is not None
    saved = session_mod.load(server.sessions / NPC / "s1.json")
    assert saved.history[-1].reply == text.strip()
    # the same through a plain HTTP client reading the events itself
    with server.client() as c:
        raw = c.post(
            "/v1/chat/completions",
            json={
                "model": NPC,
                "messages": [{"role": "user", "content": "Give me a sword."}],
                "stream": True,
                "seed": 3,
            },
            headers={"X-Npcchat-Player": "s2"},
        )
    assert raw.status_code == 200 and raw.headers["content-type"].startswith("text/event-stream")
    events = _sse(raw)
    assert events[-1] == "[DONE]"
    body = events[:-1]
    assert all(e["object"] == "chat.completion.chunk" for e in body)
    assert len({e["id"] for e in body}) == 1
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in body) == text
    assert body[-1]["choices"][0]["finish_reason"] in ("stop", "length") and "npc" in body[-1]
    assert body[-1]["npc"]["player_id"] == "s2"  # the header named the player


def test_earlier_messages_must_be_the_sessions_turns_or_become_the_context(serve: Any) -> None:
    server = serve()
    client = _client(server)
    lines = ["Hello, smith.", "Can you mend my sword?"]
    first = client.chat.completions.create(
        model=NPC, messages=[{"role": "user", "content": lines[0]}], user="h", seed=1
    )
    reply = first.choices[0].message.content or ""
    # the whole chat again (as most clients send it): accepted, one more turn
    again = client.chat.completions.create(
        model=NPC,
        messages=[
            {"role": "user", "content": lines[0]},
            {"role": "assistant", "content": reply + "  "},  # surrounding space is not a change
            {"role": "user", "content": lines[1]},
        ],
        user="h",
        seed=2,
    )
    assert (again.model_extra or {})["npc"]["turn"] == 2
    # a chat that is not the session's: refused with the OpenAI error object
    with pytest.raises(openai.ConflictError) as refused:
        client.chat.completions.create(
            model=NPC,
            messages=[
                {"role": "user", "content": "Something I never said."},
                {"role": "assistant", "content": reply},
                {"role": "user", "content": "Well?"},
            ],
            user="h",
        )
    error = refused.value.body
    assert isinstance(error, dict)
    assert error["code"] == "history_mismatch" and error["param"] == "messages"
    assert error["type"] == "invalid_request_error" and "turn 2 line" in error["message"]
    assert len(session_mod.load(server.sessions / NPC / "h.json").history) == 2
    # streamed, the refusal is a 409 before any event
    with server.client() as c:
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": NPC,
                "user": "h",
                "stream": True,
                "messages": [
                    {"role": "user", "content": "x"},
                    {"role": "assistant", "content": "y"},
                    {"role": "user", "content": "z"},
                ],
            },
        )
    assert r.status_code == 409 and r.json()["error"]["code"] == "history_mismatch"
    # without a player: stateless, the earlier messages are the context, nothing is stored
    before = sorted(p.name for p in (server.sessions / NPC).iterdir())
    alone = client.chat.completions.create(
        model=NPC, messages=[{"role": "user", "content": lines[1]}], seed=4
    )
    told = client.chat.completions.create(
        model=NPC,
        messages=[
            {"role": "user", "content": lines[0]},
            {"role": "assistant", "content": reply},
            {"role": "user", "content": lines[1]},
        ],
        seed=4,
    )
    assert alone.usage is not None and told.usage is not None
    assert told.usage.prompt_tokens > alone.usage.prompt_tokens  # the context is in the prompt
    npc = (told.model_extra or {})["npc"]
    assert npc["player_id"] is None and npc["turn"] is None
    assert sorted(p.name for p in (server.sessions / NPC).iterdir()) == before


def test_stop_texts_end_the_reply_before_them_streamed_or_not(serve: Any) -> None:
    server = serve()
    client = _client(server)
    ask: dict[str, Any] = {
        "model": NPC,
        "messages": [{"role": "user", "content": "Tell me about your forge."}],
        "temperature": 0,
        "max_tokens": 24,
    }
    full = client.chat.completions.create(**ask).choices[0].message.content or ""
    words = full.split()
    assert len(words) > 3, full
    stop = words[len(words) // 2]
    cut = full[: full.index(stop)].rstrip()
    short = client.chat.completions.create(**ask, stop=[stop, "never-said-this"])
    assert short.choices[0].message.content == cut
    assert short.choices[0].finish_reason == "stop"
    assert (short.model_extra or {})["npc"]["stop_reason"] == "stop"
    pieces = [
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(**ask, stop=stop, stream=True)
        if c.choices
    ]
    assert "".join(pieces).strip() == cut  # the stop text was never sent
    # greedy with top_p 0, as OpenAI's top_p=0 means
    greedy = client.chat.completions.create(**{**ask, "temperature": 1.0, "top_p": 0})
    assert greedy.choices[0].message.content == full


def test_models_errors_and_keys_speak_the_openai_protocol(serve: Any) -> None:
    server = serve(api_key="k3y", max_text=40)
    client = _client(server, "k3y")
    ids = [m.id for m in client.models.list()]
    assert NPC in ids and len(ids) == len(set(ids)) >= 2
    assert client.models.retrieve("mother").id.startswith("mother")  # the prefix rule
    with pytest.raises(openai.NotFoundError) as missing:
        client.chat.completions.create(model="nobody", messages=[{"role": "user", "content": "hi"}])
    assert isinstance(missing.value.body, dict)
    assert missing.value.body["code"] == "model_not_found"
    assert missing.value.body["param"] == "model"
    with pytest.raises(openai.AuthenticationError):
        _client(server, "wrong").models.list()
    hi = [{"role": "user", "content": "hi"}]
    bad: list[dict[str, Any]] = [
        {"model": NPC, "messages": hi, "n": 2},
        {"model": NPC, "messages": hi, "temperature": "hot"},
        {"model": NPC, "messages": hi, "user": "../etc"},
        {"model": NPC, "messages": [{"role": "assistant", "content": "hi"}]},
        {"model": NPC, "messages": [{"role": "tool", "content": "42", "tool_call_id": "x"}]},
        {"model": NPC, "messages": [{"role": "user", "content": "x" * 41}]},
        {
            "model": NPC,
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ],
        },
        {"model": NPC, "messages": hi, "stop": ["a", "b", "c", "d", "e"]},
    ]
    with httpx.Client(base_url=server.url, headers={"Authorization": "Bearer k3y"}) as c:
        for body in bad:
            r = c.post("/v1/chat/completions", json=body)
            assert r.status_code == 400, (body, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "invalid_request_error" and "Traceback" not in r.text
        # fields OpenAI clients send that npcchat does not use: accepted and ignored
        ok = c.post(
            "/v1/chat/completions",
            json={
                "model": NPC,
                "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                "frequency_penalty": 0.5,
                "logit_bias": {"42": 1},
                "response_format": {"type": "text"},
                "max_completion_tokens": 8,
                "n": 1,
            },
        )
        assert ok.status_code == 200, ok.text
        assert ok.json()["usage"]["completion_tokens"] <= 8
