"""Session files: exact round-trip in both formats, atomic saves, refusal of bad files."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from npcchat.errors import SessionError
from npcchat.sessions import session as S
from npcchat.types import FlagResult, HeadsOutput, PlayerState, Tags, Timings, Turn


def _result(player: str, before: Tags, after: Tags, fired: bool = True) -> Turn:
    return Turn(
        player=player,
        reply='Ah... 고마워요. "quoted" \\ back\nnew line',
        heads=HeadsOutput(
            deltas={"trust": 0.1234567890123, "relationship": -0.5},
            flags={
                "give_item": FlagResult(0.87, 0.65, fired),
                "npc_action": FlagResult(0.1, 0.5, False),
            },
        ),
        tags_before=before,
        tags_after=after,
        prompt_tokens=120,
        prefill_tokens=120,
        generated_tokens=17,
        dropped_turns=0,
        stop_reason="eos",
        timings=Timings(12.5, 0.04, 88.25),
        seed=42,
    )


def make_session(turns: int = 3) -> S.Session:
    tags = Tags("in_progress", 0.35, 0.35, "grief", "helpful", "emotional", "map1")
    s = S.Session(
        npc_id="mother_abandoned_factory",
        tags=tags,
        initial_tags=tags,
        player_state=PlayerState(("forgotten_picture",), ("knocked",), "gate"),
        lore="폐공장 lore",
        description="desc",
        bundle_name="b",
        bundle_id="abc",
        seed=7,
    )
    for i in range(turns):
        after = Tags(
            "in_progress", 0.35 + 0.1 * (i + 1), 0.2, "grief", "helpful", "emotional", "map1"
        )
        s = s.with_turn(_result(f"line {i}", s.tags, after, fired=i == 1))
    return s


@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_round_trip_is_exact(tmp_path: Path, suffix: str) -> None:
    s = make_session()
    path = tmp_path / f"s{suffix}"
    S.save(s, path)
    loaded = S.load(path)
    assert loaded == s
    S.save(loaded, path)
    assert S.load(path) == s
    assert S.dumps(loaded, suffix) == S.dumps(s, suffix)


def test_fired_flags_and_undo() -> None:
    s = make_session()
    assert s.fired_flags == ("give_item",)
    u = s.undo()
    assert len(u.history) == 2 and u.tags.trust == s.history[-1].tags_before.trust
    assert u.undo().fired_flags == ()  # the turn that fired it is gone
    assert s.reset().history == () and s.reset().tags == s.initial_tags


def test_corrupt_file_is_refused_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    path.write_text("schema_version = 1\nnpc_id = [unclosed\n")
    before = path.read_bytes()
    with pytest.raises(SessionError, match=r"s\.toml: corrupt session file"):
        S.load(path)
    with pytest.raises(SessionError, match="refusing to overwrite"):
        S.save(make_session(), path)
    assert path.read_bytes() == before


def test_wrong_type_names_the_key(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    data = S.to_dict(make_session())
    data["history"][1]["deltas"]["trust"] = "lots"
    path.write_text(json.dumps(data))
    with pytest.raises(SessionError, match=r"key 'history\[1\]\.deltas\.trust': expected float"):
        S.load(path)


def test_newer_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    data = S.to_dict(make_session())
    data["schema_version"] = 99
    path.write_text(json.dumps(data))
    before = path.read_bytes()
    with pytest.raises(SessionError, match="newer than this npcchat"):
        S.load(path)
    with pytest.raises(SessionError):
        S.save(make_session(), path)
    assert path.read_bytes() == before


def test_bad_suffix(tmp_path: Path) -> None:
    with pytest.raises(SessionError, match=r"end in \.toml or \.json"):
        S.save(make_session(), tmp_path / "s.txt")


def test_killed_mid_save_leaves_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "s.json"
    original = make_session(1)
    S.save(original, path)
    before = path.read_bytes()
    # A child writes a large session but hangs inside fsync (after writing the temp file,
    # before the rename); we SIGKILL it there.
    child = textwrap.dedent(
        f"""
        import os, sys, time
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_session import make_session
        from npcchat.sessions import session as S
        real = os.fsync
        def slow(fd):
            print("writing", flush=True)
            time.sleep(60)
        os.fsync = slow
        S.save(make_session(300), S.Path({str(path)!r}))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "writing"
    time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert path.read_bytes() == before
    assert S.load(path) == original
    leftovers = [p for p in tmp_path.iterdir() if p.name != "s.json"]
    assert all(p.name.endswith(".tmp") for p in leftovers)  # only an orphan temp file


def test_atomic_write_keeps_or_sets_normal_permissions(tmp_path: Path) -> None:
    new = tmp_path / "new.json"
    S.save(make_session(1), new)
    assert new.stat().st_mode & 0o777 == 0o666 & ~_umask()
    os.chmod(new, 0o640)
    S.save(make_session(1), new)
    assert new.stat().st_mode & 0o777 == 0o640


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current
