"""`npcchat talk` as a designer uses it: a real terminal (a pseudo-terminal) for the line
editor, piped stdin for the slash commands; scripted use stays as it was."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.model


def _talk(args: list[str], stdin: str, home: Path) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "npcchat", "talk", "--max-tokens", "8", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**os.environ, "NPCCHAT_HOME": str(home)},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stdout + proc.stderr


class _Terminal:
    """`npcchat talk` on a pseudo-terminal: keys in, the screen's bytes out."""

    def __init__(self, args: list[str], home: Path) -> None:
        import pty

        pid, fd = pty.fork()
        if pid == 0:  # the child: the REPL on a real terminal
            env = {
                **os.environ,
                "NPCCHAT_HOME": str(home),
                "TERM": "xterm",
                "COLUMNS": "100",
                "PROMPT_TOOLKIT_NO_CPR": "1",  # this fake terminal answers no cursor queries
            }
            os.execve(
                sys.executable,
                [sys.executable, "-m", "npcchat", "talk", "--max-tokens", "8", *args],
                env,
            )
        self.pid, self.fd = pid, fd
        self.screen = b""

    def read_until(self, needle: bytes, timeout: float = 60) -> bytes:
        deadline = time.monotonic() + timeout
        while needle not in self.screen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"never saw {needle!r}; screen: {self.screen[-800:]!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    self.screen += os.read(self.fd, 65536)
                except OSError:
                    break
        return self.screen

    def type(self, keys: str | bytes) -> None:
        os.write(self.fd, keys.encode() if isinstance(keys, str) else keys)
        time.sleep(0.3)

    def close(self) -> int:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)
        _, status = os.waitpid(self.pid, 0)
        os.close(self.fd)
        return status


def test_the_line_editor_edits_hangul_keeps_history_and_completes(tmp_path: Path) -> None:
    """Backspace over a Hangul syllable removes the syllable, an arrow key recalls the
    last line (history per NPC, kept across runs), Tab completes /set and its keys."""
    home = tmp_path / "home"
    session = tmp_path / "s.json"
    term = _Terminal(["--npc", "mother", "--session", str(session)], home)
    try:
        term.read_until(b"you>")
        term.type("고마워요요")
        term.type(b"\x7f")  # backspace: one syllable, two cells on screen
        term.screen = b""
        term.type("\r")
        deadline = time.monotonic() + 60
        while len(json.loads(session.read_text())["history"]) < 1:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert json.loads(session.read_text())["history"][0]["player"] == "고마워요"
        term.read_until(b"stop: ")  # the turn's footer; then the editor waits again
        term.screen = term.screen[term.screen.rindex(b"stop: ") :]
        term.read_until(b"you>")  # keys go to the editor only once it waits for them
        term.screen = b""
        term.type("/se\t")  # completes to /set
        term.type(" tru\t")  # and the key
        term.type(" 0.9\r")
        screen = term.read_until(b"player items", timeout=30)  # the state after /set
        assert b"trust" in screen and b"0.9" in screen
        term.screen = term.screen[term.screen.rindex(b"player items") :]
        term.read_until(b"you>")
        term.type("/quit\r")
        term.read_until(b"/quit\r", timeout=30)
    finally:
        term.close()
    assert json.loads(session.read_text())["tags"]["trust"] == 0.9
    history = (home / "history" / "mother_abandoned_factory.txt").read_text("utf-8")
    assert "고마워요" in history and "고마워요요" not in history
    # a new run recalls it with the up arrow
    again = _Terminal(["--npc", "mother", "--session", str(tmp_path / "t.json")], home)
    try:
        again.read_until(b"you>")
        again.screen = b""
        again.type(b"\x1b[A")  # up
        assert b"/quit" in again.read_until(b"/quit", timeout=10)
        again.type(b"\x1b[A")
        again.type(b"\x1b[A")
        assert "고마워요".encode() in again.read_until("고마워요".encode(), timeout=10)
        again.type(b"\x15/quit\r")  # Ctrl-U clears the line
    finally:
        again.close()


def test_piped_slash_commands_behave_as_a_designer_expects(tmp_path: Path) -> None:
    home = tmp_path / "home"
    saved = tmp_path / "later.json"
    out = _talk(
        ["--npc", "village_blacksmith"],
        "Hello there.\n/quit\n/save " + str(saved) + "\nAnd again.\n/quit\n",
        home,
    )
    assert out.count("are not saved") == 1  # /quit warned once
    assert "later turns are saved there too" in out
    history = json.loads(saved.read_text())["history"]
    assert [t["player"] for t in history] == ["Hello there.", "And again."]  # /save FILE stuck
    out = _talk(["--npc", "village_blacksmith"], "You are a thief!\n/undo\n/quit\n/quit\n", home)
    assert "forbidden trigger 'thief'" in out and "0 prompt + 0 reply tokens" not in out
    assert "last turn taken back; the state is now:" in out and "player items" in out


def test_retry_keeps_what_set_changed(tmp_path: Path) -> None:
    import npcchat

    with npcchat.load() as rt:
        conv = rt.open("village_blacksmith", seed=1)
        conv.say("Hello there.")
        conv.set("trust", "0.8")
        conv.set("npc_mood", "calm")
        again = conv.retry()
    assert again is not None
    assert again.tags_before.trust == 0.8 and again.tags_before.npc_mood == "calm"


def test_numbers_are_shown_at_the_precision_the_state_keeps(tmp_path: Path) -> None:
    out = _talk(["--npc", "village_blacksmith", "--say", "Hello there."], "", tmp_path)
    trust_row = next(line for line in out.splitlines() if line.startswith("trust"))
    numbers = [w for w in trust_row.replace("→", " ").split() if any(c.isdigit() for c in w)]
    assert numbers and all(len(n.split(".")[1]) == 2 for n in numbers), trust_row
