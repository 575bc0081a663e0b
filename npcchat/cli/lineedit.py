"""The REPL's line editor: prompt_toolkit, the only module that imports it.

``input()`` on a terminal knows nothing of wide characters: backspace over Hangul left
stale cells on screen (the screen showed ``고마워요요`` while ``고마워요`` was sent), arrow
keys printed ``^[[A``, and there was no history. prompt_toolkit measures East Asian
widths, edits with Emacs keys, keeps history (one file per NPC under
``$NPCCHAT_HOME/history``) and completes slash commands and ``/set`` keys with Tab. It is
used only when stdin and stdout are terminals: piped or scripted input reads lines exactly
as before.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, InMemoryHistory

MAX_HISTORY_BYTES = 1 << 20  # a history file past this starts over (it is a convenience)


class SlashCompleter(Completer):
    """Slash commands at the start of a line, and ``/set`` keys after ``/set ``."""

    def __init__(self, commands: Sequence[str], set_keys: Sequence[str]) -> None:
        self.commands = list(commands)
        self.set_keys = list(set_keys)

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterable[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/"):
            return
        if " " not in text:
            for cmd in self.commands:
                if cmd.startswith(text):
                    yield Completion(cmd, start_position=-len(text))
            return
        head, _, rest = text.partition(" ")
        if head == "/set" and " " not in rest:
            for key in self.set_keys:
                if key.startswith(rest):
                    yield Completion(key, start_position=-len(rest))


def interactive() -> bool:
    """Both ends are terminals: the line editor, else plain line reading."""
    return sys.stdin.isatty() and sys.stdout.isatty()


def history_path(home: Path, npc_id: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", npc_id)[:64] or "npc"
    return home / "history" / f"{safe}.txt"


class LineEditor:
    """Reads the player's lines with history and completion; ``read`` returns None at
    Ctrl-D and raises KeyboardInterrupt at Ctrl-C, as ``input()`` does."""

    def __init__(
        self, history: Path | None, commands: Sequence[str], set_keys: Sequence[str]
    ) -> None:
        store: FileHistory | InMemoryHistory = InMemoryHistory()
        if history is not None:
            try:
                history.parent.mkdir(parents=True, exist_ok=True)
                if history.is_file() and history.stat().st_size > MAX_HISTORY_BYTES:
                    history.unlink()
                store = FileHistory(str(history))
            except OSError:
                store = InMemoryHistory()  # no writable home: history for this run only
        self.session: PromptSession[str] = PromptSession(
            history=store,
            completer=SlashCompleter(commands, set_keys),
            complete_while_typing=False,
            enable_history_search=True,
        )

    def read(self, prompt: str) -> str | None:
        try:
            return self.session.prompt(prompt)
        except EOFError:
            return None
