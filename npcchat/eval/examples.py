"""The examples a designer writes in NPC files, run as labelled eval cases
(``npcchat eval --npcs DIR --examples``): a regression test without writing JSONL.

* ``[flags.NAME] examples`` (lines that must fire the flag) and ``negative_examples``
  (lines that must not), from the NPC's initial state;
* ``[[examples]]``, the original's example exchanges (``dialogue_turn``): a player line in
  a state of its own (``stage``, ``location``, ``trust``, ``relationship``, ``items``,
  ``actions``), the flags it must fire (``fires``) and must not (``not_fires``), and the
  reply it should get (``reply``, scored by similarity).

Each becomes a one-turn scenario through the NPC file, so knowledge, triggers, threshold
overrides and rules apply exactly as in ``talk``. Its id says where it came from
(``village_blacksmith/flags.give_hint.examples[0]``), and so does its source.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from npcchat.eval.scenarios import Expected, Scenario
from npcchat.mind.npc import NpcDef


def scenarios(npcs: Iterable[NpcDef]) -> list[Scenario]:
    """Every example of these NPCs as a scenario, NPC by NPC, in file order."""
    out: list[Scenario] = []
    for npc in npcs:
        for flag, fdef in npc.knowledge.flags.items():
            for kind, lines, fires in (
                ("examples", fdef.examples, True),
                ("negative_examples", fdef.negative_examples, False),
            ):
                for i, line in enumerate(lines):
                    where = f"flags.{flag}.{kind}[{i}]"
                    out.append(_scenario(npc, where, line, Expected(flags={flag: fires})))
        for i, ex in enumerate(npc.examples):
            where = f"examples[{i}]"
            flags = {**dict.fromkeys(ex.fires, True), **dict.fromkeys(ex.not_fires, False)}
            expected = Expected(response=ex.reply or None, flags=flags or None)
            sc = _scenario(npc, where, ex.player, expected)
            tags = npc.tags
            changed: dict[str, object] = {}
            if ex.stage:
                changed["quest_stage"] = ex.stage
            if ex.location:
                changed["location"] = ex.location
            if ex.trust is not None:
                changed["trust"] = ex.trust
            if ex.relationship is not None:
                changed["relationship"] = ex.relationship
            given: set[str] = set()
            if changed:
                sc = replace(sc, tags=replace(tags, **changed))  # type: ignore[arg-type]
                given.add("tags")
            if ex.items is not None or ex.actions is not None:
                player = replace(
                    npc.player_state,
                    items=ex.items if ex.items is not None else npc.player_state.items,
                    actions=ex.actions if ex.actions is not None else npc.player_state.actions,
                )
                sc = replace(sc, player_state=player)
                given.add("player_state")
            out.append(replace(sc, given=frozenset(given)))
    return out


def _scenario(npc: NpcDef, where: str, line: str, expected: Expected) -> Scenario:
    return Scenario(
        id=f"{npc.id}/{where}",
        source=f"{npc.source}: {where}",
        kind="example",
        npc_id=npc.id,
        tags=npc.tags,
        player_state=npc.player_state,
        turns=((line, expected),),
        npc_file=npc.source,
    )
