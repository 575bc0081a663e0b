"""Training examples rendered by the runtime's own prompt code, so training and play see
byte-identical prompts.

The original trained on prompts of its own making and served others (REFERENCE section 5).
Here every example's prompt comes from :meth:`npcchat.Conversation.prompt`, the very
prompt a turn decodes: the bundle's template, the NPC file's lore and descriptions picked
within the runtime's budgets, recalled memories, the state. Records are the scenario forms
``npcchat eval`` reads (nested, flat, multi-turn), with their NPC files (``npc_file``, or
``--npcs`` by id) applied exactly as in eval and talk. A multi-turn scenario is played by
teacher forcing: after each turn, the record's own reply and labelled state change are
committed (:meth:`npcchat.Conversation.scripted`), so the NPC's rules move the state as
they would in play and the next prompt holds the history the model should have produced.
A line that meets a forbidden trigger yields no example: in play the model never sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from npcchat.errors import ConfigError, PromptError
from npcchat.eval import runner
from npcchat.eval.scenarios import Expected, Scenario
from npcchat.mind.npc import NpcDef
from npcchat.runtime.engine import Engine
from npcchat.types import SamplingParams


@dataclass(frozen=True)
class Example:
    """One turn to learn from: the prompt as the runtime renders it, and its labels."""

    id: str  # the scenario's id, and the turn's number in a multi-turn one
    source: str  # file:line
    prompt: str  # the text (scaffold tags as text): what the tokenizer of a base reads
    tokens: tuple[int, ...]  # the prompt as the bundle's model decodes it
    reply: str  # the reference reply ("" when the record has none)
    delta: tuple[float, float] | None  # trust, relationship
    flags: Mapping[str, bool] | None  # the labelled flags (a flat record: every flag)
    thresholds: Mapping[str, float] | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "source": self.source,
            "prompt": self.prompt,
            "reply": self.reply,
            "delta": list(self.delta) if self.delta else None,
            "flags": dict(self.flags) if self.flags is not None else None,
            "thresholds": dict(self.thresholds) if self.thresholds is not None else None,
        }


def examples(
    engine: Engine,
    scenarios: Sequence[Scenario],
    npcs: Mapping[str, NpcDef] | None = None,
    sampling: SamplingParams | None = None,
    on_error: Callable[[Scenario, str], None] | None = None,
) -> Iterator[Example]:
    """Every labelled turn of ``scenarios`` as an :class:`Example`, in order, rendered by
    ``engine`` (a loaded bundle, or :func:`npcchat_train.tokens.render_engine`: its
    template, and its tokenizer for the budgets). ``sampling``: its ``max_tokens`` sets
    the prompt's budget as in play (default: the engine's config). A turn whose prompt
    cannot fit the context is an error naming its record, or with ``on_error`` reported
    there and the rest of that scenario skipped."""
    from npcchat.api import sampling_of

    flags = engine.bundle.flags
    found = runner.Npcs(engine, npcs or {})
    sampling = replace(sampling or sampling_of(engine.cfg), temperature=0.0, seed=0)
    for sc in scenarios:
        conv = runner.conversation_for(sc, engine, sampling, found.of(sc))
        conv.context = sc.context
        for i, (player, expected) in enumerate(sc.turns):
            triggered = conv.mind.know.trigger_for(player) if conv.mind else None
            if triggered is None and expected is not None:
                try:
                    fitted = conv.prompt(player)
                except PromptError as e:
                    if on_error is None:
                        raise ConfigError(
                            f"{sc.source}: {e.message}",
                            hint="shorten the record, or raise [runtime] n_ctx in --config",
                        ) from None
                    later = f" (and its turns from {i + 1} on)" if len(sc.turns) > 1 else ""
                    on_error(sc, f"{e.message}{later}")
                    break
                yield Example(
                    id=sc.id if len(sc.turns) == 1 else f"{sc.id}#{i + 1}",
                    source=sc.source,
                    prompt=fitted.prompt.text,
                    tokens=fitted.tokens,
                    reply=expected.response or "",
                    delta=_delta(expected),
                    flags=_flags(expected, flags),
                    thresholds=dict(expected.thresholds) if expected.thresholds else None,
                )
            deltas = dict(expected.delta or {}) if expected else {}
            fired = [n for n, on in (_flags(expected, flags) or {}).items() if on]
            reply = expected.response or "" if expected else ""
            conv.scripted(player, reply, deltas, fired)


def _delta(e: Expected) -> tuple[float, float] | None:
    if e.delta is None:
        return None
    return (float(e.delta.get("trust", 0.0)), float(e.delta.get("relationship", 0.0)))


def _flags(e: Expected | None, names: Sequence[str]) -> dict[str, bool] | None:
    """The flag labels: those the record names, or for the flat form every flag of the
    bundle (a flag it does not list did not fire)."""
    if e is None or e.flags is None:
        return None
    if e.all_flags_negative_unless_listed:
        return {n: bool(e.flags.get(n, False)) for n in names}
    return {n: v for n, v in e.flags.items() if n in names}
