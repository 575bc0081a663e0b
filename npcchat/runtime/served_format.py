"""Prompts in the original served format (REFERENCE section 2), parsed back into fields.

The original model server took a prompt its caller had already built. npcchat never feeds
such text to the model as is: it is parsed into a :class:`PromptInput` and rendered again
through the bundle's own template, so only the template's scaffold tags become control
tokens and a `<STATE>` a player typed stays plain text. Anything that does not follow the
format is refused with the line at fault and what was expected there.
"""

from __future__ import annotations

from npcchat.errors import PromptError
from npcchat.types import ContextTurn, PlayerState, PromptInput, Tags

NONE_MARK = "(없음)"  # what the format writes for an empty LORE or DESCRIPTION
TAG_KEYS = ("quest_stage", "relationship", "trust", "npc_mood", "player_reputation", "style")
STATE_KEYS = ("items", "actions", "position")


class _Lines:
    """The prompt's lines with a cursor; errors name the 1-based line."""

    def __init__(self, text: str) -> None:
        self.lines = text.split("\n")
        self.i = 0

    def fail(self, expected: str) -> PromptError:
        got = self.lines[self.i] if self.i < len(self.lines) else "the end of the prompt"
        shown = got if len(got) <= 60 else got[:57] + "..."
        return PromptError(f"prompt line {self.i + 1}: expected {expected}, got {shown!r}")

    def peek(self) -> str | None:
        return self.lines[self.i] if self.i < len(self.lines) else None

    def exact(self, want: str) -> None:
        if self.peek() != want:
            raise self.fail(repr(want))
        self.i += 1

    def prefixed(self, prefix: str) -> str:
        line = self.peek()
        if line is None or not line.startswith(prefix):
            raise self.fail(f"a line starting with {prefix!r}")
        self.i += 1
        return line[len(prefix) :]


def _number(lines: _Lines, key: str, raw: str) -> float:
    """The number on the line just read (errors point back at it)."""
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # also refuses nan
        lines.i -= 1
        raise lines.fail(f"{key}= a number in [0, 1]")
    return value


def parse(text: str) -> PromptInput:
    """The fields of a served-format prompt; raises PromptError naming the wrong line."""
    text = text.rstrip("\n ")
    lines = _Lines(text)
    lines.exact("<SYS>")
    npc_id = lines.prefixed("NPC_ID=")
    location = lines.prefixed("NPC_LOCATION=")
    lines.exact("TAGS:")
    raw: dict[str, str] = {}
    numbers: dict[str, float] = {}
    for key in TAG_KEYS:
        raw[key] = lines.prefixed(f" {key}=")
        if key in ("relationship", "trust"):
            numbers[key] = _number(lines, key, raw[key])
    lines.exact("</SYS>")
    lines.exact("<RAG>")
    lore = lines.prefixed("LORE: ")
    description = lines.prefixed("DESCRIPTION: ")
    lines.exact("</RAG>")
    lines.exact("<PLAYER_STATE>")
    state: dict[str, str] = {}
    for key in STATE_KEYS:
        line = lines.peek()
        if line is not None and line.startswith(f"{key}="):
            state[key] = lines.prefixed(f"{key}=")
    lines.exact("</PLAYER_STATE>")
    lines.exact("<CTX>")
    context: list[ContextTurn] = []
    while (line := lines.peek()) is not None and line != "</CTX>":
        role, sep, said = line.partition(": ")
        if not sep or role.lower() not in ("player", "npc"):
            raise lines.fail("'player: TEXT', 'npc: TEXT' or '</CTX>'")
        context.append(ContextTurn(role.lower(), said))
        lines.i += 1
    lines.exact("</CTX>")
    first = lines.prefixed("<PLAYER>")
    tail = lines.lines[lines.i :]
    if len(tail) < 2 or tail[-2:] != ["<STATE>", "<NPC>"]:
        lines.i = len(lines.lines) - 1
        raise lines.fail("the prompt to end with the lines '<STATE>' and '<NPC>'")
    utterance = "\n".join([first, *tail[:-2]])
    return PromptInput(
        npc_id=npc_id,
        tags=Tags(
            quest_stage=raw["quest_stage"],
            relationship=numbers["relationship"],
            trust=numbers["trust"],
            npc_mood=raw["npc_mood"],
            player_reputation=raw["player_reputation"],
            style=raw["style"],
            location=location,
        ),
        player_utterance=utterance,
        lore="" if lore == NONE_MARK else lore,
        description="" if description == NONE_MARK else description,
        player_state=PlayerState(
            items=_split(state.get("items", "")),
            actions=_split(state.get("actions", "")),
            position=state.get("position", ""),
        ),
        context=tuple(context),
    )


def _split(value: str) -> tuple[str, ...]:
    return tuple(v for v in value.split(",") if v)
