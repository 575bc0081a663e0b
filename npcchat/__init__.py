"""npcchat: LLM-driven game NPCs, locally. Every player line gives the NPC's reply and the
game-state change (trust/relationship deltas, event flags) from one llama.cpp prefill.

    import npcchat

    with npcchat.load() as rt:                      # a bundle directory, or the demo
        with rt.open("village_blacksmith", session="borin.toml") as chat:
            turn = chat.say("Hello, smith.")        # an npcchat.Turn
            print(turn.reply, turn.deltas, turn.fired, turn.to_json())  # JSON text

Public API (everything else is internal and may change):

* :func:`load` -> :class:`Runtime`: a bundle loaded once; ``open()`` conversations on it,
  ``evaluate()`` scenarios; ``close()`` or ``with``.
* :class:`Conversation`: ``say(text, on_text=None)`` -> :class:`Turn`; ``stream(text)``
  -> :class:`TurnStream` (reply pieces, then ``.turn``; closing it early cancels the turn);
  ``undo``, ``retry``, ``reset``, ``set``, ``apply_events`` (game events: tags, stage,
  items, actions, dated memories, the game clock), ``save``, ``session``; ``close()``.
* :class:`Turn`: reply, deltas, flags (:class:`FlagResult`), new state; ``to_dict()`` is
  the object ``npcchat talk --json`` prints, ``to_json()`` the same as JSON text.
* :mod:`events`: the typed game events (``events.Stage("complete")``, ``events.Items(
  gained=("loom_key",))``, ``events.Remember("...", day=12)``, ...).
* :func:`load_config` / :class:`Config`, :func:`read_scenarios` / :class:`Scenario`,
  :func:`info`, and :class:`NpcchatError` (every user error; ``.hint`` says what to do).

Thread safety: see :mod:`npcchat.api` (a runtime serializes its turns with one lock).
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.5.0"

if TYPE_CHECKING:
    from npcchat.api import Runtime, info, load
    from npcchat.config import Config
    from npcchat.config import load as load_config
    from npcchat.conversation import Conversation, TurnStream
    from npcchat.errors import NpcchatError
    from npcchat.eval.scenarios import Scenario
    from npcchat.eval.scenarios import read as read_scenarios
    from npcchat.sessions import events
    from npcchat.sessions.session import Session
    from npcchat.types import FlagResult, PlayerState, SamplingParams, Tags, Turn

# name -> (module, attribute): imported on first use, so `import npcchat` (and with it the
# CLI's start-up) does not load numpy, jinja2 or llama.cpp until they are needed.
_EXPORTS: dict[str, tuple[str, str | None]] = {
    "events": ("npcchat.sessions.events", None),  # a module
    "load": ("npcchat.api", "load"),
    "Runtime": ("npcchat.api", "Runtime"),
    "info": ("npcchat.api", "info"),
    "Conversation": ("npcchat.conversation", "Conversation"),
    "TurnStream": ("npcchat.conversation", "TurnStream"),
    "Turn": ("npcchat.types", "Turn"),
    "FlagResult": ("npcchat.types", "FlagResult"),
    "Tags": ("npcchat.types", "Tags"),
    "PlayerState": ("npcchat.types", "PlayerState"),
    "SamplingParams": ("npcchat.types", "SamplingParams"),
    "Session": ("npcchat.sessions.session", "Session"),
    "Config": ("npcchat.config", "Config"),
    "load_config": ("npcchat.config", "load"),
    "Scenario": ("npcchat.eval.scenarios", "Scenario"),
    "read_scenarios": ("npcchat.eval.scenarios", "read"),
    "NpcchatError": ("npcchat.errors", "NpcchatError"),
}

__all__ = [
    "Config",
    "Conversation",
    "FlagResult",
    "NpcchatError",
    "PlayerState",
    "Runtime",
    "SamplingParams",
    "Scenario",
    "Session",
    "Tags",
    "Turn",
    "TurnStream",
    "__version__",
    "events",
    "info",
    "load",
    "load_config",
    "read_scenarios",
]


def __getattr__(name: str) -> Any:
    try:
        module, attr = _EXPORTS[name]
    except KeyError:
        raise AttributeError(f"module 'npcchat' has no attribute {name!r}") from None
    value = import_module(module) if attr is None else getattr(import_module(module), attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
