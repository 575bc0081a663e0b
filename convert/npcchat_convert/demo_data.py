"""Synthetic NPC dialogue records for the demo NPCs (REFERENCE section 3, nested form).

Each record picks an NPC (``configs/npcs/*.toml``), a state (trust, relationship, quest
stage, mood), an intent and a player line; the NPC's reply comes from its ``[demo.replies]``
and the labels follow the intent *and the state*: asking for an item only works at
trust >= 0.6, asking for a hint at trust >= 0.5; handing over the wanted item raises trust
and fires ``give_item`` + ``quest_stage_change`` (+ ``unlock_hidden_path`` for NPCs that
guard one); insults and threats lower trust and change the NPC's state. Deterministic per seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from npcchat.mind.npc import NpcDef
from npcchat.mind.npc import load as load_npc
from npcchat.runtime.prompt import builtin_template, render
from npcchat.types import ContextTurn, PlayerState, PromptInput, Tags

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

PLAYER_LINES: dict[str, list[str]] = {
    "greeting": [
        "Hello there.",
        "Good day, {name}.",
        "Hi! How are you?",
        "Greetings, friend.",
        "Hey, {name}. Nice to meet you.",
    ],
    "ask_lore": [
        "What happened here?",
        "Tell me about this place.",
        "What is your story, {name}?",
        "Can you tell me about {place}?",
        "How long have you been here?",
    ],
    "ask_hint": [
        "Where should I go next?",
        "Do you know the way to {place}?",
        "Any advice for me?",
        "How do I reach {place}?",
        "Can you give me a hint?",
    ],
    "ask_item": [
        "Could you give me something to help me?",
        "Do you have anything for me?",
        "Can I have the {reward}?",
        "Please, I need your help. Can you spare something?",
        "Would you give me a gift?",
    ],
    "give_item": [
        "Here, I brought you the {item}.",
        "Take this {item}, it is yours.",
        "I found the {item}. Please take it.",
        "This {item} belongs to you. Here.",
        "I give you the {item}.",
    ],
    "insult": [
        "You are a useless old fool.",
        "What a pathetic place and a pathetic person.",
        "You are a liar and a coward.",
        "Nobody cares about you, {name}.",
        "You stink, go away.",
    ],
    "threaten": [
        "Give me everything or I will hurt you.",
        "I will burn this place down.",
        "One more word and you are dead.",
        "Hand it over or suffer.",
        "I will kill you, {name}.",
    ],
    "flatter": [
        "You are very wise, {name}.",
        "I admire your strength.",
        "You have a kind heart.",
        "Everyone says you are the best.",
        "What a wonderful person you are.",
    ],
    "off_topic": [
        "What do you think about taxes?",
        "Do you like cheese?",
        "How much is a horse these days?",
        "Have you ever played cards?",
        "Is it going to rain tomorrow?",
    ],
}


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


def _fill(text: str, npc: NpcDef) -> str:
    d = npc.demo
    return text.format(
        name=npc.name.split()[0] if npc.name else npc.id,
        item=str(d["wanted_item"]).replace("_", " "),
        reward=str(d["reward"]).replace("_", " "),
        place=d["place"],
    )


def record(npc: NpcDef, rng: random.Random, intent: str | None = None) -> dict[str, Any]:
    intent = intent or rng.choice(INTENTS)
    # designers set states in steps of 0.05; the runtime state moves freely from there
    trust, relationship = round(rng.randint(2, 19) * 0.05, 2), round(rng.randint(2, 19) * 0.05, 2)
    d = npc.demo
    kind, (dt, dr), fired = _labels(npc, intent, trust, relationship)
    items = [d["wanted_item"]] if intent == "give_item" or rng.random() < 0.3 else []
    context = []
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        ctx_intent = rng.choice(["greeting", "ask_lore", "flatter"])
        context += [
            {"role": "player", "text": _fill(rng.choice(PLAYER_LINES[ctx_intent]), npc)},
            {"role": "npc", "text": rng.choice(d["replies"][ctx_intent])},
        ]
    return {
        "input": {
            "npc_id": npc.id,
            "npc_location": npc.tags.location,
            "tags": {
                "quest_stage": rng.choice(d["stages"]),
                "relationship": relationship,
                "trust": trust,
                "npc_mood": rng.choice(d["moods"]),
                "player_reputation": rng.choice(["unknown", "helpful", "rude"]),
                "style": npc.tags.style,
            },
            "lore": npc.lore,
            "description": npc.description,
            "player_state": {"items": items, "actions": [], "position": ""},
            "context": context,
            "player_utterance": _fill(rng.choice(PLAYER_LINES[intent]), npc),
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
    }


def load_npcs(directory: Path) -> list[NpcDef]:
    npcs = [load_npc(p) for p in sorted(directory.glob("*.toml"))]
    return [n for n in npcs if n.demo]


# Requests whose outcome depends on the NPC's trust are harder to learn: they come twice as often.
SCHEDULE = [*INTENTS, "ask_hint", "ask_item"]


def generate(directory: Path, n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` records over every NPC and intent, reproducible for a seed."""
    rng = random.Random(seed)
    npcs = load_npcs(directory)
    out = []
    for i in range(n):
        npc = npcs[i % len(npcs)]
        out.append(record(npc, rng, SCHEDULE[(i // len(npcs)) % len(SCHEDULE)]))
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
