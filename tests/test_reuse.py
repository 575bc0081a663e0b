"""Prefix reuse between turns and KV snapshots in sessions (issue 7).

Tolerance: with reuse, the prompt is decoded in different chunks, which moves hidden
states by float rounding only; we require cosine >= 0.9999 and head outputs within 1e-3,
and identical greedy replies.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from npcchat.config import Config, RuntimeConfig
from npcchat.conversation import Conversation
from npcchat.runtime.engine import load_engine
from npcchat.sessions import session as session_mod
from npcchat.sessions import snapshot
from npcchat.sessions.session import Session
from npcchat.types import SamplingParams, Tags, Turn

pytestmark = pytest.mark.model
GREEDY = SamplingParams(temperature=0.0, top_p=1.0, repeat_penalty=1.05, max_tokens=8, seed=0)
LINES = [
    "Hello there.",
    "What happened to the factory?",
    "I found a picture by the gate.",
    "Here, take it.",
    "Where does the hidden path lead?",
]


def _session() -> Session:
    return Session(
        npc_id="mother",
        tags=Tags("in_progress", 0.4, 0.4, "grief", "helpful", "emotional", "map1"),
        lore="Ten years ago a fire closed the factory.",
        description="She sits by the loom.",
        seed=1,
    )


def _run(bundle: Path, reuse: bool, lines: list[str] = LINES) -> list[Turn]:
    cfg = Config(runtime=RuntimeConfig(prefix_reuse=reuse))
    with load_engine(bundle, cfg) as engine:
        conv = Conversation(engine, _session(), GREEDY)
        return [conv.say(line) for line in lines]


def _close(a: Turn, b: Turn) -> None:
    assert a.reply == b.reply
    for name in ("trust", "relationship"):
        assert a.heads.deltas[name] == pytest.approx(b.heads.deltas[name], abs=1e-3)
    for name, f in a.heads.flags.items():
        assert f.prob == pytest.approx(b.heads.flags[name].prob, abs=1e-3)


def test_reuse_decodes_only_what_changed_and_matches_cold(bundle_reuse: Path) -> None:
    warm, cold = _run(bundle_reuse, True), _run(bundle_reuse, False)
    for w, c in zip(warm, cold, strict=True):
        _close(w, c)
        assert c.prefill_tokens == c.prompt_tokens
    assert warm[0].prefill_tokens == warm[0].prompt_tokens
    # history grows, the decoded part does not: the last exchange, the tags, the player line
    assert all(w.prefill_tokens < w.prompt_tokens for w in warm[1:])
    assert max(w.prefill_tokens for w in warm[1:]) <= warm[0].prompt_tokens
    assert warm[-1].prefill_tokens < 0.5 * warm[-1].prompt_tokens


def test_served_template_still_reuses_the_static_head(bundle_q4: Path) -> None:
    warm = _run(bundle_q4, True, LINES[:2])
    assert 0 < warm[1].prefill_tokens <= warm[1].prompt_tokens


def _talk_and_save(bundle: Path, path: Path) -> list[Turn]:
    with load_engine(bundle, Config()) as engine:
        conv = Conversation(engine, _session(), GREEDY, path)
        return [conv.say(line) for line in LINES[:3]]


def _resume(bundle: Path, path: Path, cfg: Config | None = None) -> tuple[bool, list[str], Turn]:
    """Resume a copy of the saved session (and its snapshot), so every call starts alike."""
    work = path.parent / f"resume-{len(list(path.parent.iterdir()))}{path.suffix}"
    shutil.copyfile(path, work)
    if snapshot.path_for(path).exists():
        shutil.copyfile(snapshot.path_for(path), snapshot.path_for(work))
    warnings: list[str] = []
    with load_engine(bundle, cfg or Config()) as engine:
        conv = Conversation(
            engine, session_mod.load(work), GREEDY, work, on_warning=warnings.append
        )
        restored = conv.resume_snapshot()
        return restored, [w.replace(str(work), str(path)) for w in warnings], conv.say(LINES[3])


def test_snapshot_resume_equals_cold_and_skips_the_prefix(
    bundle_reuse: Path, tmp_path: Path
) -> None:
    path = tmp_path / "s.toml"
    _talk_and_save(bundle_reuse, path)
    assert snapshot.path_for(path).is_file()
    restored, warnings, warm = _resume(bundle_reuse, path)
    assert restored and warnings == []
    cold_cfg = Config(runtime=RuntimeConfig(snapshots=False))
    restored_cold, _, cold = _resume(bundle_reuse, path, cold_cfg)
    assert not restored_cold and cold.prefill_tokens == cold.prompt_tokens
    _close(warm, cold)
    assert warm.prefill_tokens < cold.prefill_tokens * 0.5


def test_snapshot_of_another_bundle_or_prefix_falls_back(
    bundle_reuse: Path, bundle_q4: Path, tmp_path: Path
) -> None:
    path = tmp_path / "s.json"
    _talk_and_save(bundle_reuse, path)
    restored, warnings, r = _resume(bundle_q4, path)  # another bundle: not loaded, no fuss
    assert not restored and warnings == [] and r.prefill_tokens == r.prompt_tokens
    # same bundle, but the designer edited the session (lore changed): restored, then the
    # prefix check decodes from the first changed token, and the result equals a cold run
    s = session_mod.load(path)
    session_mod.save(replace(s, lore="A different story entirely."), path)
    restored, warnings, warm = _resume(bundle_reuse, path)
    assert restored and warnings == []
    _, _, cold = _resume(bundle_reuse, path, Config(runtime=RuntimeConfig(snapshots=False)))
    _close(warm, cold)
    assert warm.prefill_tokens > cold.prefill_tokens * 0.5


def test_corrupt_snapshot_is_ignored_with_a_warning(bundle_reuse: Path, tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    _talk_and_save(bundle_reuse, path)
    kv = snapshot.path_for(path)
    data = bytearray(kv.read_bytes())
    data[-100] ^= 0xFF
    kv.write_bytes(bytes(data))
    restored, warnings, r = _resume(bundle_reuse, path)
    assert not restored and len(warnings) == 1 and "ignoring the KV snapshot" in warnings[0]
    assert r.prefill_tokens == r.prompt_tokens and r.reply is not None
    kv.write_bytes(b"garbage")
    restored, warnings, _ = _resume(bundle_reuse, path)
    assert not restored and "not an npcchat KV snapshot" in warnings[0]


def test_snapshot_size_bound(bundle_reuse: Path, tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    cfg = Config(runtime=RuntimeConfig(snapshot_max_mb=0))
    warnings: list[str] = []
    with load_engine(bundle_reuse, cfg) as engine:
        conv = Conversation(engine, _session(), GREEDY, path, on_warning=warnings.append)
        conv.say("hello")
    assert not snapshot.path_for(path).exists()
    assert warnings and "exceeds snapshot_max_mb=0" in warnings[0]


def test_cli_resume_restores_snapshot(bundle_reuse: Path, tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    path = tmp_path / "s.toml"
    base = [
        sys.executable,
        "-m",
        "npcchat",
        "talk",
        "--bundle",
        str(bundle_reuse),
        "--session",
        str(path),
        "--max-tokens",
        "6",
        "--temperature",
        "0",
        "--json",
    ]
    first = subprocess.run(
        [*base, "--say", "hello", "--say", "tell me more"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert first.returncode == 0, first.stderr
    second = subprocess.run(
        [*base, "--say", "and then?"], capture_output=True, text=True, timeout=120
    )
    assert second.returncode == 0, second.stderr
    turn = json.loads(second.stdout)
    assert turn["tokens"]["prefill"] < turn["tokens"]["prompt"] * 0.8
    assert np.isfinite(turn["deltas"]["trust"])


def test_predecode_ahead_of_the_player_matches_cold(bundle_reuse: Path, tmp_path: Path) -> None:
    cold = _run(bundle_reuse, False, LINES[:3])
    with load_engine(bundle_reuse, Config()) as engine:
        conv = Conversation(engine, _session(), GREEDY, tmp_path / "s.json")
        first = conv.predecode()  # the static part, before the first line is typed
        assert first > 0 and conv.predecode() == 0  # nothing new the second time
        warm = []
        for line in LINES[:3]:
            warm.append(conv.say(line))
            assert conv.predecode() > 0
    for w, c in zip(warm, cold, strict=True):
        _close(w, c)
    # after the player speaks, only their line and the <STATE>/<NPC> tail are decoded
    assert all(w.prefill_tokens < 0.25 * w.prompt_tokens for w in warm)
    # the snapshot saved after predecode lets a resumed session start from there too
    restored, warnings, r = _resume(bundle_reuse, tmp_path / "s.json")
    assert restored and warnings == [] and r.prefill_tokens < 0.25 * r.prompt_tokens


def test_repl_writes_the_kv_snapshot_once_per_turn(
    bundle_reuse: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """talk's REPL predecodes after every turn: the snapshot is written then, not twice."""
    writes: list[int] = []
    real = snapshot.save

    def counted(*args: object, **kw: object) -> str | None:
        writes.append(1)
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(snapshot, "save", counted)
    path = tmp_path / "s.json"
    with load_engine(bundle_reuse, Config()) as engine:
        conv = Conversation(engine, _session(), GREEDY, path)
        conv.idle_snapshots = True
        conv.predecode()
        for line in LINES[:3]:
            conv.say(line)
            assert conv.predecode() > 0
        conv.flush_snapshot()  # nothing due any more
        tokens = engine.kv_tokens()
    assert len(writes) == 4  # one per predecode: before the first turn and after each
    _, warnings, r = _resume(bundle_reuse, path)
    assert not warnings and r.prefill_tokens < r.prompt_tokens
    assert tokens


def test_a_forged_snapshot_splicing_another_npcs_cache_is_ignored_and_the_turn_runs_cold(
    bundle_reuse: Path, tmp_path: Path
) -> None:
    """Another NPC's cache under this session's tokens, with every checksum an attacker can
    compute redone: without the installation's key the snapshot is refused with one
    warning, the turn equals a cold one, and the session file is untouched."""
    import hashlib
    import json

    path, other = tmp_path / "s.json", tmp_path / "other.json"
    _talk_and_save(bundle_reuse, path)
    with load_engine(bundle_reuse, Config()) as engine:
        stranger = replace(_session(), npc_id="smith", lore="A forge by the river.", seed=7)
        conv = Conversation(engine, stranger, GREEDY, other)
        for line in ("Sharpen this.", "How much?", "Fine, do it."):
            conv.say(line)
    raw, foreign = snapshot.path_for(path).read_bytes(), snapshot.path_for(other).read_bytes()

    def split(blob: bytes) -> tuple[dict[str, object], bytes]:
        n = int.from_bytes(blob[6:10], "little")
        return json.loads(blob[10 : 10 + n]), blob[10 + n :]

    header, _ = split(raw)
    _, payload = split(foreign)
    header["size"] = len(payload)
    header["hmac"] = hashlib.sha256(json.dumps(header).encode() + payload).hexdigest()
    blob = json.dumps(header).encode()
    before = path.read_bytes()
    snapshot.path_for(path).write_bytes(raw[:6] + len(blob).to_bytes(4, "little") + blob + payload)
    restored, warnings, forged = _resume(bundle_reuse, path)
    assert not restored and len(warnings) == 1
    assert "not signed by this installation" in warnings[0]
    assert forged.prefill_tokens == forged.prompt_tokens  # read in full, nothing adopted
    _, _, cold = _resume(bundle_reuse, path, Config(runtime=RuntimeConfig(snapshots=False)))
    _close(forged, cold)
    assert path.read_bytes() == before
