"""Training data: the records eval reads, rendered by the runtime, encoded for the model.

Records are read by eval's own reader (nested, flat and multi-turn forms, one error per
bad line naming its file and line), with their NPC files. The held-out split is by
scenario, never by turn (the turns of one conversation would leak into each other), and
reproducible for a seed. Every example's prompt comes from :mod:`npcchat_train.records`
(the runtime's prompt code); the reply is the record's own, NFC-normalized, followed by
the token that ends a reply, and cut where the runtime's ``max_tokens`` would cut it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path

import numpy as np

from npcchat.errors import ConfigError
from npcchat.eval.scenarios import Scenario, labelled_flags, read, single_labelled
from npcchat.mind.npc import NpcDef
from npcchat.text import nfc

from .records import Example
from .tokens import TrainTokenizer

# ``heads fit``'s split (a fifth tested, a fifth of the rest validating) leaves nothing to
# fit on below this
MIN_FIT_RECORDS = 5


@dataclass(frozen=True)
class Item:
    """One example as the model trains on it."""

    id: str
    ids: tuple[int, ...]  # prompt, then the reply and its end token
    n_prompt: int
    state: tuple[int, ...]  # the `<STATE>` positions in the prompt
    delta: tuple[float, float]  # NaN: no delta label
    flags: tuple[float, ...]  # 1/0, NaN where the record does not label the flag
    thresholds: tuple[float, ...]  # NaN where none is given

    @property
    def reply_tokens(self) -> int:
        return len(self.ids) - self.n_prompt


def read_records(paths: Sequence[Path], strict: bool = True) -> tuple[list[Scenario], list[str]]:
    """Every scenario of ``paths``; bad lines are fatal with ``strict`` (the first named),
    otherwise skipped and listed."""
    out: list[Scenario] = []
    notes: list[str] = []
    for p in paths:
        if not p.is_file():
            raise ConfigError(f"{p}: file not found", hint="give JSONL records eval reads")
        good, bad = read(p)
        if bad and strict:
            raise ConfigError(
                f"{bad[0].source}: {bad[0].reason}",
                hint=f"{len(bad)} bad line(s) in {p}; --skip-bad-lines trains on the rest",
            )
        notes += [f"skipped {b.source}: {b.reason}" for b in bad]
        out += good
    if not out:
        raise ConfigError("no records to train on", hint="give JSONL records eval reads")
    return out, notes


def flag_names(scenarios: Sequence[Scenario], given: Sequence[str] | None) -> tuple[str, ...]:
    """The flags in head order: ``given``, else every flag the labels name, in order of
    first appearance."""
    if given:
        return tuple(given)
    names = labelled_flags(scenarios)
    if not names:
        raise ConfigError("the records label no flags", hint="pass --flags a,b,c")
    return tuple(names)


def identity(sc: Scenario) -> str:
    """What a scenario *is*, whatever file, path spelling, line or id it has: its NPC,
    state, knowledge, history and turns (lines, references, labels). Identical records
    share it, and so a side of the split."""
    content = {
        f.name: getattr(sc, f.name)
        for f in fields(sc)
        if f.name not in ("id", "source", "kind", "given", "npc_file")
    }
    return json.dumps(content, default=_plain, ensure_ascii=False, sort_keys=True)


def _plain(value: object) -> object:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, frozenset | set):
        return sorted(map(str, value))
    return str(value)


def split(
    scenarios: Sequence[Scenario], fraction: float, seed: int
) -> tuple[list[Scenario], list[Scenario]]:
    """(train, held out): each scenario goes by a hash of the seed and its
    :func:`identity`, so the split is the same however the files are named or ordered,
    and adding records never moves an old one across it. A tiny set still gets one record
    on each side (the one whose hash is nearest the line)."""
    if not 0.0 <= fraction < 1.0:
        raise ConfigError(f"--heldout {fraction}: expected a share from 0 up to (not) 1")
    train: list[tuple[float, Scenario]] = []
    held: list[tuple[float, Scenario]] = []
    for sc in scenarios:
        h = hashlib.sha256(f"{seed}|{identity(sc)}".encode()).digest()
        u = int.from_bytes(h[:8], "big") / 2**64
        (held if u < fraction else train).append((u, sc))
    if fraction > 0 and not held and len(train) > 1:
        nearest = min(train, key=lambda x: x[0])
        train.remove(nearest)
        held.append(nearest)
    if not train and held:
        nearest = max(held, key=lambda x: x[0])
        held.remove(nearest)
        train.append(nearest)
    return [sc for _, sc in train], [sc for _, sc in held]


def encode(
    examples: Sequence[Example],
    tok: TrainTokenizer,
    flags: Sequence[str],
    max_reply_tokens: int,
) -> list[Item]:
    state_id = tok.id_of("<STATE>")
    items = []
    for ex in examples:
        prompt = list(ex.tokens)
        state = tuple(i for i, t in enumerate(prompt) if t == state_id)
        if not state:
            raise ConfigError(f"{ex.source}: the rendered prompt has no <STATE> token")
        reply: list[int] = []
        if ex.reply:
            reply = tok.encode(nfc(ex.reply))
            reply = (
                reply[:max_reply_tokens] if len(reply) >= max_reply_tokens else [*reply, tok.eos]
            )
        items.append(
            Item(
                id=ex.id,
                ids=(*prompt, *reply),
                n_prompt=len(prompt),
                state=state,
                delta=ex.delta or (float("nan"), float("nan")),
                flags=_row(ex.flags, flags, lambda v: float(bool(v))),
                thresholds=_row(ex.thresholds, flags, float),
            )
        )
    return items


def _row(
    values: Mapping[str, object] | None, names: Sequence[str], conv: object
) -> tuple[float, ...]:
    if not values:
        return tuple(float("nan") for _ in names)
    return tuple(conv(values[n]) if n in values else float("nan") for n in names)  # type: ignore[operator]


def check_labelled(items: Sequence[Item], what: str) -> None:
    if not items:
        raise ConfigError(
            f"no labelled turns in the {what} records",
            hint="each turn to learn from needs an expected reply, delta or flags",
        )


def summary(items: Sequence[Item]) -> dict[str, float | int]:
    lengths = np.array([len(x.ids) for x in items])
    return {
        "examples": len(items),
        "tokens": int(lengths.sum()),
        "reply_tokens": int(sum(x.reply_tokens for x in items)),
        "max_length": int(lengths.max()) if len(lengths) else 0,
    }


def npc_files(directory: Path | None) -> dict[str, NpcDef]:
    """``--npcs DIR``: every NPC file there, by id (as eval's ``--npcs``)."""
    if directory is None:
        return {}
    from npcchat.mind import npc as npc_mod

    return npc_mod.load_dir(directory)


def fit_records(scenarios: Sequence[Scenario], examples: Sequence[Example]) -> list[Scenario]:
    """The single-turn labelled scenarios that gave an example (not a forbidden trigger's
    line, not skipped): what ``--bundle`` refits the heads on, as training saw them."""
    seen = {(ex.source, ex.id) for ex in examples}
    return [sc for sc in scenarios if single_labelled(sc) and (sc.source, sc.id) in seen]
