"""Synthetic NPC dialogue records for the demo NPCs (REFERENCE section 3, nested form).

Each record picks an NPC (``configs/npcs/*.toml``), a state (trust, relationship, quest
stage, mood, location, items), an intent and a player line; the NPC's reply comes from its
``[demo.replies]`` and the labels follow the intent *and the state* (the demo's documented
rules, :func:`_labels`): asking for an item only works at trust >= 0.6, asking for a hint at
trust >= 0.5; handing over the wanted item raises trust and fires ``give_item`` +
``quest_stage_change`` (+ ``unlock_hidden_path`` for NPCs that guard one); insults and
threats lower trust and change the NPC's state. Deterministic per seed.

**Wording that generalizes.** A player line is a *frame* in a small pattern language
(:func:`expand`): ``(a|b)`` picks one, ``[x]`` may be left out, ``{item}`` is a slot and
``{item:을}`` a slot with the Korean particle that fits it. Every frame yields many
sentences, an opener or closer may join it, and a quarter of the lines get a typo, so the
model learns the words that carry an intent rather than whole sentences. Each intent has
*held-out frames*: whole sentence shapes that never appear in training, used only for the
quality figure (``split="heldout"``; ``"blind"``: frames written after the recipe was
settled, see :mod:`.demo_frames`). The player speaks the NPC's language
(``[demo] language``): English, or Korean for the mother of the abandoned factory.

**The prompt is the runtime's.** LORE and DESCRIPTION come from the NPC file's knowledge
through the same code ``npcchat talk`` runs (:meth:`Knowledge.lore_block`,
:func:`select_rag`): the persona line, then the lore entries valid for the record's stage,
location, items and trust, ranked by the lexical embedder against the player's line.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any

from npcchat.mind import knowledge as K
from npcchat.mind.embed import LexicalEmbedder
from npcchat.mind.npc import NpcDef
from npcchat.mind.npc import load as load_npc
from npcchat.runtime.prompt import builtin_template, render
from npcchat.types import ContextTurn, PlayerState, PromptInput, Tags

from .demo_frames import CLOSERS, FRAMES, OPENERS

FLAGS = [
    "give_item",
    "quest_stage_change",
    "give_hint",
    "npc_action",
    "change_npc_state",
    "unlock_hidden_path",
]
INTENTS = [
    "greeting",
    "ask_lore",
    "ask_hint",
    "ask_item",
    "give_item",
    "insult",
    "threaten",
    "flatter",
    "off_topic",
]
ITEM_TRUST, HINT_TRUST = 0.6, 0.5
TYPO_RATE = 0.25
KO_SHARE = 0.4  # Korean has one NPC but more surface forms per meaning: it gets 40 %


# -- the pattern language ------------------------------------------------------------------

_JOSA = {  # particle written in a frame -> (after a final consonant, after a vowel)
    "을": ("을", "를"),
    "를": ("을", "를"),
    "이": ("이", "가"),
    "가": ("이", "가"),
    "은": ("은", "는"),
    "는": ("은", "는"),
    "과": ("과", "와"),
    "와": ("과", "와"),
    "으로": ("으로", "로"),
    "로": ("으로", "로"),
}


def josa(word: str, particle: str) -> str:
    """``word`` + the form of ``particle`` its last syllable takes (사진을, 열쇠를; 방으로,
    길로: a final ㄹ takes 로)."""
    last = word[-1:] if word else ""
    code = ord(last) - 0xAC00 if last else -1
    final = code % 28 if 0 <= code < 11172 else 0
    consonant, vowel = _JOSA[particle]
    if particle in ("으로", "로") and final == 8:  # ㄹ
        return word + "로"
    return word + (consonant if final else vowel)


def expand(frame: str, rng: random.Random) -> str:
    """One sentence of a frame: ``(a|b)`` picks one, ``[x|y]`` picks one or nothing."""
    out, i = _seq(frame, 0, rng, "")
    if i != len(frame):
        raise ValueError(f"unbalanced frame: {frame!r}")
    return out


def _seq(s: str, i: int, rng: random.Random, stop: str) -> tuple[str, int]:
    parts: list[str] = []
    while i < len(s) and s[i] not in stop:
        c = s[i]
        if c in "([":
            alts: list[str] = []
            close = ")" if c == "(" else "]"
            i += 1
            while True:
                text, i = _seq(s, i, rng, "|" + close)
                alts.append(text)
                if i >= len(s):
                    raise ValueError(f"unbalanced frame: {s!r}")
                if s[i] == close:
                    i += 1
                    break
                i += 1  # "|"
            if c == "[":
                alts.append("")
            parts.append(rng.choice(alts))
        else:
            parts.append(c)
            i += 1
    return "".join(parts), i


def expansions(frame: str, limit: int = 200_000) -> set[str]:
    """Every sentence ``frame`` can give (for checks: no held-out sentence may come out
    of a training frame); ValueError past ``limit`` sentences."""
    out, i = _all(frame, 0, "", limit)
    if i != len(frame):
        raise ValueError(f"unbalanced frame: {frame!r}")
    return set(out)


def _all(s: str, i: int, stop: str, limit: int) -> tuple[list[str], int]:
    done = [""]
    while i < len(s) and s[i] not in stop:
        c = s[i]
        if c in "([":
            close = ")" if c == "(" else "]"
            options: list[str] = []
            i += 1
            while True:
                sub, i = _all(s, i, "|" + close, limit)
                options += sub
                if i >= len(s):
                    raise ValueError(f"unbalanced frame: {s!r}")
                if s[i] == close:
                    i += 1
                    break
                i += 1
            options += [""] if c == "[" else []
            done = [a + b for a in done for b in options]
            if len(done) > limit:
                raise ValueError(f"frame gives more than {limit} sentences: {s!r}")
        else:
            done = [a + c for a in done]
            i += 1
    return done, i


def fill(text: str, slots: dict[str, str]) -> str:
    """``{slot}`` and ``{slot:particle}`` replaced by the NPC's words."""

    def one(m: re.Match[str]) -> str:
        value = slots[m.group(1)]
        return josa(value, m.group(2)) if m.group(2) else value

    return re.sub(r"\{(\w+)(?::(\w+))?\}", one, text)


def typo(text: str, lang: str, rng: random.Random) -> str:
    """One slip of a typing player: a letter swapped, dropped or doubled (a Korean final
    consonant dropped), a space lost, the end punctuation gone or the case flattened."""
    kind = rng.randrange(5)
    if kind == 0:
        return text.rstrip(".!?") or text
    if kind == 1:
        return text.lower() if lang == "en" else text.replace(" ", "", 1)
    idx = [i for i, ch in enumerate(text) if ch.isalpha()]
    if not idx:
        return text
    i = rng.choice(idx)
    ch = text[i]
    if lang == "ko" and 0xAC00 <= ord(ch) <= 0xD7A3:
        code = ord(ch) - 0xAC00
        if code % 28 and kind == 2:
            return text[:i] + chr(ord(ch) - code % 28) + text[i + 1 :]
        return text[:i] + ch + text[i:] if kind == 3 else text[:i] + text[i + 1 :]
    if kind == 2 and i + 1 < len(text) and text[i + 1].isalpha():
        return text[:i] + text[i + 1] + ch + text[i + 2 :]
    return text[:i] + ch + text[i:] if kind == 3 else text[:i] + text[i + 1 :]


# -- labels and records ----------------------------------------------------------------------


def _labels(
    npc: NpcDef, intent: str, trust: float, relationship: float
) -> tuple[str, tuple[float, float], list[str]]:
    """(reply kind, (trust delta, relationship delta), flags that fire)."""
    if intent == "greeting":
        return "greeting", (0.1, 0.1), []
    if intent == "ask_lore":
        return "ask_lore", (0.1, 0.05), []
    if intent == "ask_hint":
        return (
            ("hint_yes", (0.1, 0.1), ["give_hint"])
            if trust >= HINT_TRUST
            else ("hint_no", (-0.1, -0.05), [])
        )
    if intent == "ask_item":
        return (
            ("item_yes", (0.1, 0.1), ["give_item"])
            if trust >= ITEM_TRUST
            else ("item_no", (-0.1, -0.1), [])
        )
    if intent == "give_item":
        flags = ["give_item", "quest_stage_change"] + (
            ["unlock_hidden_path"] if npc.demo.get("unlocks_path") else []
        )
        return "give_item", (0.5, 0.4), flags
    if intent == "insult":
        return "insult", (-0.4, -0.5), ["change_npc_state"]
    if intent == "threaten":
        return "threaten", (-0.6, -0.4), ["npc_action", "change_npc_state"]
    if intent == "flatter":
        return "flatter", ((0.2, 0.3) if relationship >= 0.3 else (0.1, 0.1)), []
    return "off_topic", (-0.1, -0.1), []


def language(npc: NpcDef) -> str:
    return str(npc.demo.get("language", "en"))


def slots(npc: NpcDef, rng: random.Random) -> dict[str, str]:
    """The words a player uses for this NPC's things, in its language."""
    d = npc.demo
    names = d.get("names") or [npc.name.split()[0] if npc.name else npc.id]
    return {
        "name": rng.choice(names),
        "item": d.get("item_name", str(d["wanted_item"]).replace("_", " ")),
        "reward": d.get("reward_name", str(d["reward"]).replace("_", " ")),
        "place": d["place"],
    }


def player_line(npc: NpcDef, intent: str, rng: random.Random, split: str = "train") -> str:
    """A line for ``intent`` from the NPC's language's frames of ``split``: ``train``,
    ``heldout`` or ``blind`` (:mod:`.demo_frames`)."""
    lang = language(npc)
    frames = FRAMES[lang][intent]
    choices = {"train": frames.train, "heldout": frames.heldout, "blind": frames.blind}
    frame = rng.choice(choices[split])
    opener, body = rng.choice(OPENERS[lang]), expand(frame, rng)
    if opener and lang == "en" and not re.match(r"I\b", body):
        body = body[0].lower() + body[1:]  # "Well, what happened?"
    line = fill(opener + body + rng.choice(CLOSERS[lang]), slots(npc, rng))
    line = line[0].upper() + line[1:] if lang == "en" else line
    return typo(line, lang, rng) if rng.random() < TYPO_RATE else line


_EMBED = LexicalEmbedder()


def rag(
    npc: NpcDef, tags: Tags, player: PlayerState, line: str, recent: list[tuple[str, str]]
) -> tuple[str, str]:
    """(LORE, DESCRIPTION) as the runtime's NPC mind builds them for this turn. Every valid
    entry is taken (the demo's entries fit the runtime's budgets; npcchat_train.demo checks it with
    the trained tokenizer), ranked as ``npcchat talk`` ranks them."""
    k = npc.knowledge
    lore, description = npc.lore, npc.description
    if k.lore or k.descriptions:
        query = K.query_of(line, recent).vector(_EMBED)
        unbounded = K.Budgets(10**9, 10**9)
        picked_lore, picked_desc = K.select_rag(
            k, tags, player, query, _EMBED, lambda _: 0, unbounded
        )
        lore = picked_lore if k.lore else lore
        description = picked_desc if k.descriptions else description
    return k.lore_block(lore), description


def record(
    npc: NpcDef, rng: random.Random, intent: str | None = None, split: str = "train"
) -> dict[str, Any]:
    intent = intent or rng.choice(INTENTS)
    # designers set states in steps of 0.05; the runtime state moves freely from there
    trust, relationship = round(rng.randint(2, 19) * 0.05, 2), round(rng.randint(2, 19) * 0.05, 2)
    d = npc.demo
    kind, (dt, dr), fired = _labels(npc, intent, trust, relationship)
    extra = [i for i in d.get("items", []) if rng.random() < 0.3]
    items = ([d["wanted_item"]] if intent == "give_item" or rng.random() < 0.3 else []) + extra
    context: list[dict[str, str]] = []
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        ctx_intent = rng.choice(["greeting", "ask_lore", "flatter"])
        context += [
            {"role": "player", "text": player_line(npc, ctx_intent, rng)},
            {"role": "npc", "text": rng.choice(d["replies"][ctx_intent])},
        ]
    line = player_line(npc, intent, rng, split)
    tags = Tags(
        quest_stage=rng.choice(d["stages"]),
        relationship=relationship,
        trust=trust,
        npc_mood=rng.choice(d["moods"]),
        player_reputation=rng.choice(["unknown", "helpful", "rude"]),
        style=npc.tags.style,
        location=rng.choice(d.get("locations", [npc.tags.location])),
    )
    player = PlayerState(tuple(items), (), "")
    recent = [(context[i]["text"], context[i + 1]["text"]) for i in range(0, len(context), 2)]
    lore, description = rag(npc, tags, player, line, recent[-2:])
    return {
        "input": {
            "npc_id": npc.id,
            "npc_location": tags.location,
            "tags": {
                "quest_stage": tags.quest_stage,
                "relationship": relationship,
                "trust": trust,
                "npc_mood": tags.npc_mood,
                "player_reputation": tags.player_reputation,
                "style": tags.style,
            },
            "lore": lore,
            "description": description,
            "player_state": {"items": items, "actions": [], "position": ""},
            "context": context,
            "player_utterance": line,
        },
        "output": {
            "response": rng.choice(d["replies"][kind]),
            "delta": {"trust": dt, "relationship": dr},
            "flag": {
                f: {"score": 1.0 if f in fired else 0.0, "threshold": 0.5, "label": int(f in fired)}
                for f in FLAGS
            },
        },
        "intent": intent,
        "language": language(npc),
        "split": split,
    }


def load_npcs(directory: Path) -> list[NpcDef]:
    npcs = [load_npc(p) for p in sorted(directory.glob("*.toml"))]
    return [n for n in npcs if n.demo]


# Requests whose outcome depends on the NPC's trust are harder to learn: they come twice as often.
SCHEDULE = [*INTENTS, "ask_hint", "ask_item"]


def generate(
    directory: Path,
    n: int,
    seed: int,
    split: str = "train",
    languages: tuple[str, ...] = ("en", "ko"),
) -> list[dict[str, Any]]:
    """``n`` records over every NPC and intent, reproducible for a seed. ``split``: train
    frames or the held-out ones; ``languages``: which NPCs speak (Korean gets ``KO_SHARE``
    of the records when both do)."""
    rng = random.Random(seed)
    by_lang = {lang: [p for p in load_npcs(directory) if language(p) == lang] for lang in languages}
    by_lang = {lang: npcs for lang, npcs in by_lang.items() if npcs}
    out = []
    counts = dict.fromkeys(by_lang, 0)
    for i in range(n):
        if len(by_lang) == 1:
            lang = next(iter(by_lang))
        else:  # deterministic interleave: Korean on the slots that keep its share
            lang = "ko" if int((i + 1) * KO_SHARE) > int(i * KO_SHARE) else "en"
        npcs = by_lang[lang]
        j = counts[lang]
        counts[lang] += 1
        npc = npcs[j % len(npcs)]
        out.append(record(npc, rng, SCHEDULE[(j // len(npcs)) % len(SCHEDULE)], split))
    rng.shuffle(out)
    return out


def write(records: list[dict[str, Any]], path: Path) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), "utf-8")


def prompt_text(rec: dict[str, Any], template: str) -> str:
    """A record's prompt as training sees it: rendered by the built-in ``template``."""
    i = rec["input"]
    t = i["tags"]
    inp = PromptInput(
        npc_id=i["npc_id"],
        tags=Tags(
            t["quest_stage"],
            t["relationship"],
            t["trust"],
            t["npc_mood"],
            t["player_reputation"],
            t["style"],
            i["npc_location"],
        ),
        player_utterance=i["player_utterance"],
        lore=i["lore"],
        description=i["description"],
        player_state=PlayerState(
            tuple(i["player_state"]["items"]),
            tuple(i["player_state"]["actions"]),
            i["player_state"]["position"],
        ),
        context=tuple(ContextTurn(c["role"], c["text"]) for c in i["context"]),
    )
    return render(builtin_template(template), inp).text
