"""How often the demo's replies contradict the flags of their own turn, without the NPCs'
rules and with them, on the recipe's held-out sets (``python -m npcchat_convert.demo_rules``).

A demo reply is one of the memorized lines of its NPC file's ``[demo.replies]``, so its
kind is known: ``item_yes`` and ``give_item`` hand an item over, ``hint_yes`` gives a hint,
``item_no`` and ``hint_no`` refuse. A turn contradicts itself when its reply hands over an
item (or gives a hint) while ``give_item`` (``give_hint``) did not fire, or refuses while it
did ("Take this blade" with ``give_item`` at 0.000). Both runs go through the same NPC
files, eval and engine; the only difference is whether the files keep their rules.
"""

from __future__ import annotations

import argparse
import json
import tomllib
from pathlib import Path
from typing import Any

from npcchat.eval.metrics import token_f1

from . import demo_data

IMPLIES = {
    "item_yes": ("give_item", True),
    "give_item": ("give_item", True),
    "item_no": ("give_item", False),
    "hint_yes": ("give_hint", True),
    "hint_no": ("give_hint", False),
}
SETS = (
    ("heldout_en.jsonl", "heldout", ("en",), 2000),
    ("heldout_ko.jsonl", "heldout", ("ko",), 3000),
)


def kind_of(reply: str, lines: dict[str, list[str]]) -> str | None:
    """The reply kind whose line the reply is closest to (token F1 >= 0.6), or None."""
    best, kind = 0.0, None
    for k, texts in lines.items():
        for text in texts:
            score = token_f1(reply, text)
            if score > best:
                best, kind = score, k
    return kind if best >= 0.6 else None


def contradictions(
    report: dict[str, Any], lines: dict[str, dict[str, list[str]]]
) -> dict[str, Any]:
    turns = judged = bad = 0
    for sc in report["scenarios"]:
        for t in sc["turns"]:
            turns += 1
            kind = kind_of(t["reply"], lines.get(sc["npc_id"], {}))
            if kind not in IMPLIES:
                continue
            flag, fires = IMPLIES[kind]
            judged += 1
            if t["flags"][flag]["fired"] != fires:
                bad += 1
    rate = bad / judged if judged else 0.0
    return {"turns": turns, "judged": judged, "contradict": bad, "rate": rate}


def _strip_rules(src: Path, dst: Path) -> None:
    """The NPC files without their rules: [quest], [npc_state], reply checks and the rule
    keys of each flag go; everything else stays byte for byte as TOML allows."""
    import tomli_w

    from npcchat.rules.load import RULE_KEYS

    dst.mkdir(parents=True, exist_ok=True)
    for path in sorted(src.glob("*.toml")):
        data = tomllib.loads(path.read_text("utf-8"))
        for key in ("quest", "npc_state", "reply_checks"):
            data.pop(key, None)
        for flag in data.get("flags", {}).values():
            for key in RULE_KEYS:
                flag.pop(key, None)
        (dst / path.name).write_text(tomli_w.dumps(data), "utf-8")


def main(argv: list[str] | None = None) -> None:
    import npcchat
    from npcchat.mind import npc as npc_mod

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--npcs", type=Path, default=Path("configs/npcs"))
    ap.add_argument("--out", type=Path, default=Path("build/demo-rules"))
    ap.add_argument("--records", type=int, default=450)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    bare = args.out / "npcs-without-rules"
    _strip_rules(args.npcs, bare)
    lines = {
        n.id: {k: list(v) for k, v in n.demo.get("replies", {}).items()}
        for n in demo_data.load_npcs(args.npcs)
    }
    result: dict[str, Any] = {}
    with npcchat.load() as rt:
        for name, split, langs, seed in SETS:
            recs = demo_data.generate(args.npcs, args.records, args.seed + seed, split, langs)
            demo_data.write(recs, args.out / name)
            scenarios, bad = npcchat.read_scenarios(args.out / name)
            assert not bad, bad
            for label, directory in (("without_rules", bare), ("with_rules", args.npcs)):
                npcs = npc_mod.load_dir(directory)
                results = rt.evaluate(scenarios, npcs=npcs)
                report = {"scenarios": results}
                result[f"{name}:{label}"] = contradictions(report, lines)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
