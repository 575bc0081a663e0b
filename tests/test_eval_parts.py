"""Scenario parsing and metrics, checked against values computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from npcchat.errors import ConfigError
from npcchat.eval import metrics as M
from npcchat.eval import report as evaluate
from npcchat.eval import scenarios

NESTED = {
    "input": {
        "npc_id": "mother",
        "npc_location": "map1",
        "tags": {
            "quest_stage": "in_progress",
            "relationship": 0.35,
            "trust": 0.35,
            "npc_mood": "grief",
            "player_reputation": "helpful",
            "style": "emotional",
        },
        "lore": "L",
        "description": "D",
        "player_state": {"items": ["pic"], "actions": [], "position": "gate"},
        "context": [{"role": "player", "text": "hi"}, {"role": "npc", "text": "who?"}],
        "player_utterance": "Here.",
    },
    "output": {
        "response": "Thank you.",
        "delta": {"trust": 0.45, "relationship": 0.2},
        "flag": {
            "give_item": {"score": 0.43, "threshold": 0.65, "label": 1},
            "give_hint": {"score": 0.1, "threshold": 0.5, "label": 0},
        },
    },
}
FLAT = {
    "npc_id": "smith",
    "tags": {"location": "forge", "trust": 0.6},
    "context": ["player: hey", "npc: what"],
    "player_utterance": "fool!",
    "response": "Out.",
    "delta": [-0.3, -0.4],
    "flag": ["npc_action"],
}
UNLABELLED = {
    "id": "u1",
    "npc_id": "hermit",
    "npc_location": "forest",
    "description": "moss",
    "player_utterance": "hello",
    "tags": {"quest_stage": "start"},
    "lore": "",
    "context": [],
}
MULTI = {
    "id": "m1",
    "npc_id": "mage",
    "tags": {"trust": 0.9},
    "turns": [
        {
            "player": "one",
            "expect": {"delta": {"trust": 0.1, "relationship": 0.0}, "flags": ["give_hint"]},
        },
        {"player": "two"},
        {
            "player": "three",
            "expect": {"flags": {"give_item": False}, "thresholds": {"give_item": 0.7}},
        },
    ],
}


def _write(tmp_path: Path, *lines: object) -> Path:
    p = tmp_path / "s.jsonl"
    p.write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n")
    return p


def test_every_form_parses(tmp_path: Path) -> None:
    good, bad = scenarios.read(
        _write(tmp_path, NESTED, FLAT, UNLABELLED, MULTI, "", "// a comment")
    )
    assert bad == []
    nested, flat, unl, multi = good
    assert nested.kind == "nested" and nested.id == "s:1" and nested.source.endswith("s.jsonl:1")
    assert (
        nested.tags.location == "map1"
        and nested.tags.trust == 0.35
        and nested.player_state.position == "gate"
    )
    assert [c.role for c in nested.context] == ["player", "npc"]
    ((player, exp),) = nested.turns
    assert player == "Here." and exp is not None
    assert exp.delta == {"trust": 0.45, "relationship": 0.2}
    assert exp.flags == {"give_item": True, "give_hint": False} and exp.thresholds == {
        "give_item": 0.65,
        "give_hint": 0.5,
    }
    assert flat.kind == "flat" and flat.tags.location == "forge" and flat.context[1].text == "what"
    e = flat.turns[0][1]
    assert (
        e is not None
        and e.delta == {"trust": -0.3, "relationship": -0.4}
        and e.all_flags_negative_unless_listed
    )
    assert (
        unl.kind == "unlabelled"
        and unl.id == "u1"
        and unl.turns == (("hello", None),)
        and not unl.labelled
    )
    assert multi.kind == "multi" and len(multi.turns) == 3 and multi.turns[1][1] is None
    assert multi.turns[0][1].flags == {"give_hint": True}  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ({"npc_id": "x"}, "not a scenario"),
        ({"npc_id": 3, "player_utterance": "x"}, "key 'npc_id': expected a string"),
        ({"player_utterance": "x"}, "key 'npc_id': missing"),
        (
            {"npc_id": "x", "player_utterance": "x", "tags": {"trust": 2}},
            "key 'tags.trust': expected a number in [0, 1]",
        ),
        (
            {"npc_id": "x", "player_utterance": "x", "delta": [0.1]},
            "key 'delta': expected [trust, relationship]",
        ),
        (
            {"npc_id": "x", "player_utterance": "x", "flag": "give_item"},
            "key 'flag': expected the list",
        ),
        ({"npc_id": "x", "turns": []}, "key 'turns': expected a non-empty list"),
        (
            {"npc_id": "x", "turns": [{"player": "a", "expect": {"flags": {"a": 1}}}]},
            "turns[0].expect.flags",
        ),
        (
            {
                "input": {"npc_id": "x", "player_utterance": "p"},
                "output": {"flag": {"a": {"score": 1}}},
            },
            "output.flag.a",
        ),
        ({"npc_id": "x", "player_utterance": "x", "context": [5]}, "key 'context[0]'"),
    ],
)
def test_bad_lines_are_named_and_the_rest_still_parse(
    tmp_path: Path, line: object, reason: str
) -> None:
    good, bad = scenarios.read(_write(tmp_path, UNLABELLED, line, FLAT))
    assert len(good) == 2
    assert len(bad) == 1 and bad[0].source.endswith("s.jsonl:2") and reason in bad[0].reason


def test_duplicate_ids(tmp_path: Path) -> None:
    _, bad = scenarios.read(_write(tmp_path, UNLABELLED, UNLABELLED))
    assert bad[0].reason.startswith("id 'u1' already used at")


# -- metrics ------------------------------------------------------------------------------
def test_delta_metrics_by_hand() -> None:
    pred, true = [0.5, -0.1, 0.01, 0.3], [0.4, 0.2, -0.01, -0.3]
    assert M.mae(pred, true) == pytest.approx((0.1 + 0.3 + 0.02 + 0.6) / 4)
    # signs: +/+ agree, -/+ disagree, 0/0 agree (inside the 0.02 deadband), +/- disagree
    assert M.sign_agreement(pred, true) == 0.5
    assert M.mae([], []) is None


def test_prf_and_best_threshold_by_hand() -> None:
    fired = [True, True, False, False, True]
    true = [True, False, True, False, True]
    r = M.prf(fired, true)
    assert (r.tp, r.fp, r.fn, r.tn) == (2, 1, 1, 1)
    assert (
        r.precision == pytest.approx(2 / 3)
        and r.recall == pytest.approx(2 / 3)
        and r.f1 == pytest.approx(2 / 3)
    )
    assert M.prf([False, False], [False, False]).f1 == 1.0
    assert M.prf([True], [False]).f1 == 0.0
    probs = [0.9, 0.6, 0.55, 0.2, 0.8]
    # thresholds: 0.55 -> fires 0.9,0.6,0.55,0.8: tp3 fp1 fn0 -> F1 6/7; 0.8 -> tp2 fn1 -> 0.8
    t, f1 = M.best_threshold(probs, true)
    assert t == 0.55 and f1 == pytest.approx(6 / 7)


def test_brier_and_calibration_by_hand() -> None:
    probs, true = [0.05, 0.15, 0.12, 0.95, 1.0], [False, True, False, True, True]
    assert M.brier(probs, true) == pytest.approx((0.05**2 + 0.85**2 + 0.12**2 + 0.05**2 + 0) / 5)
    cal = M.calibration(probs, true)
    assert [(b["bin"], b["count"]) for b in cal] == [(0, 1), (1, 2), (9, 2)]
    assert cal[1]["mean_prob"] == pytest.approx(0.135) and cal[1]["observed"] == 0.5
    assert cal[2]["observed"] == 1.0


def test_reply_checks_by_hand() -> None:
    assert M.token_f1("the key is here", "here is the map") == pytest.approx(2 * 0.75 * 0.75 / 1.5)
    assert M.token_f1("", "") == 1.0 and M.token_f1("a", "b") == 0.0
    assert M.leaked_tags("hi <STATE> there </SYS>") == ["</SYS>", "<STATE>"]
    assert M.exact_match(" Thank  you. ", "Thank you.")
    assert M.percentile([1, 2, 3, 4], 50) == 2.5 and M.percentile([], 95) is None


def _turn(
    deltas: dict[str, float], flags: dict[str, tuple[float, float]], expected: dict | None
) -> dict:  # type: ignore[type-arg]
    return {
        "player": "p",
        "reply": "r",
        "deltas": deltas,
        "stop_reason": "eos",
        "flags": {n: {"prob": p, "threshold": t, "fired": p >= t} for n, (p, t) in flags.items()},
        "tokens": {"prompt": 10, "generated": 4},
        "timings_ms": {"prefill": 10.0, "heads": 0.1, "generate": 40.0},
        "expected": expected,
        "checks": {
            "empty": False,
            "truncated": False,
            "leaked_tags": [],
            "exact_match": None,
            "similarity": None,
        },
    }


def test_aggregate_and_gates_by_hand() -> None:
    flags = ("give_item", "npc_action")
    t1 = _turn(
        {"trust": 0.3, "relationship": -0.1},
        {"give_item": (0.8, 0.5), "npc_action": (0.2, 0.5)},
        {
            "delta": {"trust": 0.5, "relationship": 0.1},
            "flags": {"give_item": True, "npc_action": False},
            "thresholds": {"give_item": 0.6},
            "response": None,
        },
    )
    t2 = _turn(
        {"trust": -0.2, "relationship": 0.0},
        {"give_item": (0.6, 0.7), "npc_action": (0.9, 0.5)},
        {
            "delta": {"trust": -0.1, "relationship": 0.3},
            "flags": {"give_item": True},
            "thresholds": None,
            "response": None,
        },
    )
    t3 = _turn(
        {"trust": 0.0, "relationship": 0.0},
        {"give_item": (0.1, 0.5), "npc_action": (0.1, 0.5)},
        None,
    )
    results = [
        {"id": "a", "turns": [t1, t2], "error": None},
        {"id": "b", "turns": [t3], "error": "boom"},
    ]
    agg = evaluate.aggregate(results, flags, wall_s=2.0, sim_method="lexical token F1")
    assert agg["scenarios"] == 2 and agg["turns"] == 3 and agg["errors"] == 1
    assert agg["delta"]["trust"]["mae"] == pytest.approx((0.2 + 0.1) / 2)
    assert agg["delta"]["relationship"]["sign_agreement"] == 0.0  # -/+ and 0/+
    gi = agg["flags"]["give_item"]
    assert gi["n"] == 2 and gi["positives"] == 2 and gi["recall"] == 0.5 and gi["precision"] == 1.0
    assert gi["best_threshold"] == 0.6 and gi["best_f1"] == 1.0
    assert gi["threshold_mae"] == pytest.approx(0.1)
    assert agg["flags"]["npc_action"]["n"] == 1 and agg["flags"]["npc_action"]["f1"] == 1.0
    # npc_action has no positive label: its F1 (1.0, never fired) stays out of the macro
    assert agg["flag_f1_macro"] == pytest.approx(2 / 3)
    assert agg["flags_without_positives"] == ["npc_action"]
    assert agg["best_threshold_scope"] == "in-sample"
    assert agg["tokens_per_s"] == pytest.approx(12 / 2.0) and agg["scenarios_per_s"] == 1.0
    agg["bad_lines"] = 0
    g = evaluate.gates(agg)
    assert evaluate.check_gates(g, ["flag_f1_macro=0.6"]) == []
    assert evaluate.check_gates(g, ["flag_f1_macro=0.9"])[0].startswith(
        "flag_f1_macro = 0.6667, required at least 0.9"
    )
    assert evaluate.check_gates(g, ["delta_mae_trust=0.1"])[0].endswith("required at most 0.1")
    assert evaluate.check_gates(g, ["errors=1", "flag_f1.give_item=0.6"]) == []
    assert "not available" in evaluate.check_gates(g, ["similarity_mean=0.5"])[0]
    with pytest.raises(ConfigError, match="unknown metric 'nope'"):
        evaluate.validate_gates(["nope=1"], flags)
    with pytest.raises(ConfigError, match="expected METRIC=NUMBER"):
        evaluate.validate_gates(["flag_f1_macro=high"], flags)
