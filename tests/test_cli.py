"""The `npcchat` command as a user runs it: exit codes, one-line errors, files kept safe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from npcchat.sessions import session as S


def run(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "npcchat", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=120,
    )


def assert_user_error(proc: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: ")
    assert len([line for line in lines if line.startswith("error: ")]) == 1
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_help_lists_commands() -> None:
    proc = run("--help")
    assert proc.returncode == 0
    for cmd in ("talk", "bench"):
        assert cmd in proc.stdout


@pytest.mark.model
def test_say_json_schema(bundle_q4: Path, tmp_path: Path) -> None:
    npc = tmp_path / "npc.toml"
    npc.write_text('id = "smith"\nlocation = "forge"\n[tags]\ntrust = 0.4\nquest_stage = "start"\n')
    proc = run(
        "talk",
        "--bundle",
        str(bundle_q4),
        "--npc",
        str(npc),
        "--say",
        "Hello",
        "--say",
        "<STATE> hi",
        "--json",
        "--max-tokens",
        "8",
        "--seed",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    turns = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(turns) == 2
    t = turns[0]
    assert set(t) == {"npc_id", "reply", "deltas", "flags", "state", "tokens", "timings_ms"}
    assert t["npc_id"] == "smith" and isinstance(t["reply"], str)
    assert set(t["deltas"]) == {"trust", "relationship"}
    assert next(iter(t["flags"])) == "give_item"
    assert set(t["flags"]["give_item"]) == {"prob", "threshold", "fired"}
    assert t["state"]["location"] == "forge" and t["state"]["quest_stage"] == "start"
    assert t["state"]["trust"] == round(min(1, max(0, 0.4 + t["deltas"]["trust"])), 2)
    assert turns[1]["state"]["trust"] == round(
        min(1, max(0, t["state"]["trust"] + turns[1]["deltas"]["trust"])), 2
    )
    assert t["tokens"]["generated"] <= 8 and t["tokens"]["prompt"] > 20
    assert set(t["timings_ms"]) == {"prefill", "heads", "generate", "stall"}
    assert turns[1]["tokens"]["prompt"] > t["tokens"]["prompt"]  # history is in the prompt


@pytest.mark.model
@pytest.mark.parametrize("suffix", [".toml", ".json"])
def test_session_create_and_resume(bundle_q4: Path, tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"s{suffix}"
    assert (
        run(
            "talk",
            "--bundle",
            str(bundle_q4),
            "--session",
            str(path),
            "--say",
            "one",
            "--json",
            "--max-tokens",
            "4",
        ).returncode
        == 0
    )
    assert len(S.load(path).history) == 1
    proc = run(
        "talk",
        "--bundle",
        str(bundle_q4),
        "--session",
        str(path),
        "--say",
        "two",
        "--json",
        "--max-tokens",
        "4",
    )
    assert proc.returncode == 0, proc.stderr
    s = S.load(path)
    assert [t.player for t in s.history] == ["one", "two"]
    assert json.loads(proc.stdout)["state"]["trust"] == s.tags.trust


@pytest.mark.model
def test_corrupt_and_future_sessions_are_refused_and_kept(bundle_q4: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema_version": 1, "npc_id": ')
    proc = run("talk", "--bundle", str(bundle_q4), "--session", str(bad), "--say", "hi")
    assert_user_error(proc, "bad.json", "corrupt session file")
    assert bad.read_text() == '{"schema_version": 1, "npc_id": '
    future = tmp_path / "future.toml"
    future.write_text("schema_version = 9\n")
    proc = run("talk", "--bundle", str(bundle_q4), "--session", str(future), "--say", "hi")
    assert_user_error(proc, "future.toml", "newer than this npcchat")
    assert future.read_text() == "schema_version = 9\n"


def test_missing_bundle(tmp_path: Path) -> None:
    assert_user_error(run("talk", "--bundle", str(tmp_path), "--say", "hi"), "not a model bundle")


def test_no_bundle_and_no_demo(tmp_path: Path) -> None:
    proc = run("talk", "--say", "hi", env={"NPCCHAT_BUNDLE": str(tmp_path / "nope")})
    assert_user_error(proc, "nope: no such directory")


@pytest.mark.model
def test_bad_npc_file_names_the_key(bundle_q4: Path, tmp_path: Path) -> None:
    npc = tmp_path / "npc.toml"
    npc.write_text('id = "x"\n[tags]\ntrust = "high"\n')
    assert_user_error(
        run("talk", "--bundle", str(bundle_q4), "--npc", str(npc), "--say", "hi"),
        "npc.toml",
        "tags.trust",
    )


@pytest.mark.model
def test_bad_flag_values(bundle_q4: Path) -> None:
    assert_user_error(
        run(
            "talk", "--bundle", str(bundle_q4), "--ctx", "256", "--max-tokens", "300", "--say", "x"
        ),
        "max_tokens",
    )
    assert_user_error(
        run("talk", "--bundle", str(bundle_q4), "--top-p", "0", "--say", "x"), "top_p"
    )


def test_debug_env_shows_traceback(tmp_path: Path) -> None:
    proc = run("talk", "--bundle", str(tmp_path), "--say", "hi", env={"NPCCHAT_DEBUG": "1"})
    assert proc.returncode != 0 and "Traceback" in proc.stderr


@pytest.mark.model
def test_repl_commands(bundle_q4: Path, tmp_path: Path) -> None:
    saved, after = tmp_path / "saved.toml", tmp_path / "after.json"
    script = "\n".join(
        [
            "/help",
            "hello there",
            "/set trust 0.9",
            "/set quest_stage complete",
            "/set items key, map",
            "/set trust lots",
            "/state",
            "second line",
            "/undo",
            "/retry",
            f"/save {saved}",
            "/bogus",
            f"/save {after}",  # from now on the session file: saved.toml keeps the state above
            "/reset",
            "/state",
            "/quit",
            "never reached",
        ]
    )
    proc = run(
        "talk", "--bundle", str(bundle_q4), "--max-tokens", "6", "--seed", "5", stdin=script + "\n"
    )
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "/retry" in out and "/quit" in out  # help table
    assert "last turn taken back" in out and "unknown command /bogus" in out
    assert "session reset" in out and "saved " in out
    assert "expected a number in [0, 1]" in proc.stderr
    s = S.load(saved)
    assert [t.player for t in s.history] == ["hello there"]  # undo, then retry of the first line
    assert s.tags.quest_stage == "complete" and s.player_state.items == ("key", "map")
    assert s.history[0].tags_before.trust == 0.5
    assert S.load(after).history == ()  # /reset after /save FILE was saved to FILE


@pytest.mark.model
def test_repl_ctrl_d_quits_and_autosaves(bundle_q4: Path, tmp_path: Path) -> None:
    path = tmp_path / "auto.json"
    proc = run(
        "talk",
        "--bundle",
        str(bundle_q4),
        "--session",
        str(path),
        "--max-tokens",
        "4",
        stdin="hi\n",
    )
    assert proc.returncode == 0, proc.stderr
    assert [t.player for t in S.load(path).history] == ["hi"]


@pytest.mark.model
def test_save_refuses_to_clobber_a_foreign_file(bundle_q4: Path, tmp_path: Path) -> None:
    notes = tmp_path / "notes.toml"
    notes.write_text('title = "my notes"\n')
    proc = run(
        "talk", "--bundle", str(bundle_q4), "--max-tokens", "4", stdin=f"hi\n/save {notes}\n/quit\n"
    )
    assert proc.returncode == 0
    assert "refusing to overwrite" in proc.stderr
    assert notes.read_text() == 'title = "my notes"\n'


@pytest.mark.model
def test_bench_json(bundle_q4: Path) -> None:
    proc = run(
        "bench",
        "--bundle",
        str(bundle_q4),
        "--json",
        "--no-rss",
        "--prompt-tokens",
        "120",
        "--tokens",
        "8",
        "--repeats",
        "1",
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for key in ("prefill_tok_s", "decode_tok_s", "heads_us", "turn_over_generate_only", "help_s"):
        assert report[key] > 0
    assert report["prompt_tokens"] >= 120


@pytest.mark.parametrize(
    ("args", "what"),
    [
        (["convert", "--base", "b", "--out", "o"], "npcchat convert"),
        (["heads", "fit", "data.jsonl"], "npcchat heads fit"),
    ],
)
def test_a_missing_extra_names_the_pip_install_line(
    args: list[str], what: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """On a runtime-only install the model-side commands say what to install, in one line."""
    from npcchat import extras

    # one module of the extra that no machine has: the real lookup reports it missing
    monkeypatch.setitem(extras.EXTRAS, "convert", ("gguf", "npcchat_no_such_module"))
    assert extras.missing("convert") == ["npcchat_no_such_module"]
    code = (
        "import sys; from npcchat import extras; "
        "extras.EXTRAS['convert'] = ('gguf', 'npcchat_no_such_module'); "
        f"sys.argv = ['npcchat', *{args!r}]; "
        "from npcchat.cli import main; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert_user_error(proc, f"{what} needs the 'convert' extra (npcchat_no_such_module")
    assert "pip install '.[convert]'" in proc.stderr


def test_ray_without_its_extra_names_the_pip_install_line(tmp_path: Path) -> None:
    code = (
        "import sys; from npcchat import extras; "
        "extras.EXTRAS['ray'] = ('npcchat_no_such_module',); "
        "sys.argv = ['npcchat', 'eval', 'x.jsonl', '--ray']; "
        "from npcchat.cli import main; main()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert_user_error(proc, "--ray needs the 'ray' extra (npcchat_no_such_module")
    assert "pip install '.[ray]'" in proc.stderr


def test_serve_refuses_to_bind_beyond_loopback_without_a_key() -> None:
    proc = run("serve", "--host", "0.0.0.0", env={"NPCCHAT_API_KEY": ""})
    assert_user_error(proc, "--host 0.0.0.0: refusing to serve beyond this machine")
    assert "--api-key" in proc.stderr
    bad = run("serve", "--slots", "0")
    assert_user_error(bad, "--slots 0: expected 1..64")
