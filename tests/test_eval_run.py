"""`npcchat eval` end to end on the tiny model: report schema, parallel == sequential,
gating exit codes, interrupted runs and --resume, the HTML report, compare."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.model
ROOT = Path(__file__).resolve().parent.parent


def scenario_file(tmp_path: Path) -> Path:
    lines = [
        {
            "input": {
                "npc_id": "mother",
                "npc_location": "map1",
                "tags": {"quest_stage": "in_progress", "trust": 0.35},
                "lore": "Fire.",
                "context": [{"role": "player", "text": "hi"}],
                "player_utterance": f"Here is picture {i}.",
            },
            "output": {
                "response": "Thank you.",
                "delta": {"trust": 0.4, "relationship": 0.2},
                "flag": {"give_item": {"score": 0.5, "threshold": 0.6, "label": i % 2}},
            },
        }
        for i in range(6)
    ]
    lines.append(
        {
            "npc_id": "smith",
            "tags": {"location": "forge"},
            "player_utterance": "fool!",
            "delta": [-0.3, -0.2],
            "flag": ["npc_action"],
        }
    )
    lines.append({"id": "plain", "npc_id": "hermit", "player_utterance": "hello", "tags": {}})
    p = tmp_path / "s.jsonl"
    text = "\n".join(json.dumps(x) for x in lines)
    multi = (ROOT / "configs" / "scenarios" / "multi_turn.jsonl").read_text()
    p.write_text(text + "\n{broken\n" + multi)
    return p


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "npcchat", "eval", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ},
    )


def strip_timing(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-scenario results without what a run costs (times, prefill tokens saved by sharing)."""
    out = []
    for s in report["scenarios"]:
        turns = [
            {
                **{k: v for k, v in t.items() if k != "timings_ms"},
                "tokens": {k: v for k, v in t["tokens"].items() if k != "prefill"},
            }
            for t in s["turns"]
        ]
        out.append({**s, "turns": turns})
    return out


def prefilled(report: dict[str, Any]) -> int:
    return sum(t["tokens"]["prefill"] for s in report["scenarios"] for t in s["turns"])


def test_report_validates_and_parallel_equals_sequential(bundle_q4: Path, tmp_path: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    sc = scenario_file(tmp_path)
    reports = {}
    for n, share in ((1, "--share-prefix"), (4, "--share-prefix"), (4, "--no-share-prefix")):
        out = tmp_path / f"r{n}{share}.json"
        proc = run(
            str(sc),
            "--bundle",
            str(bundle_q4),
            "--parallel",
            str(n),
            "--max-tokens",
            "12",
            "--report",
            str(out),
            share,
        )
        assert proc.returncode == 0, proc.stderr
        assert "s.jsonl:9: not valid JSON" in proc.stderr  # the bad line is named and skipped
        reports[n, share] = json.loads(out.read_text())
    schema = json.loads(
        resources.files("npcchat.eval.schemas").joinpath("eval-report.schema.json").read_text()
    )
    for rep in reports.values():
        jsonschema.validate(rep, schema)
    a, b, cold = (
        reports[1, "--share-prefix"],
        reports[4, "--share-prefix"],
        reports[4, "--no-share-prefix"],
    )
    # sharing the prompt head between scenarios changes nothing but what it costs
    assert strip_timing(a) == strip_timing(cold)
    assert prefilled(a) < prefilled(cold) and prefilled(b) < prefilled(cold)
    assert cold["settings"]["prefix_reuse"] == "off" and a["settings"]["prefix_reuse"] == "aligned"
    assert (
        a["aggregates"]["scenarios"] == 10
        and a["aggregates"]["turns"] == 12
        and a["aggregates"]["bad_lines"] == 1
    )
    assert strip_timing(a) == strip_timing(b)
    assert [s["id"] for s in a["scenarios"]][-3:] == ["plain", "mother-picture", "smith-insult"]
    kinds = {s["kind"] for s in a["scenarios"]}
    assert kinds == {"nested", "flat", "unlabelled", "multi"}
    multi = next(s for s in a["scenarios"] if s["id"] == "mother-picture")
    t0, t1 = multi["turns"]
    assert t1["state"]["trust"] == round(
        min(1, max(0, t0["state"]["trust"] + t1["deltas"]["trust"])), 2
    )
    flat = next(s for s in a["scenarios"] if s["kind"] == "flat")
    labels = flat["turns"][0]["expected"]["flags"]
    assert (
        labels["npc_action"] is True and labels["give_item"] is False
    )  # flat form: unlisted = negative


def test_strict_and_gating_exit_codes(bundle_q4: Path, tmp_path: Path) -> None:
    sc = scenario_file(tmp_path)
    strict = run(str(sc), "--bundle", str(bundle_q4), "--strict")
    assert (
        strict.returncode == 1 and "s.jsonl:9" in strict.stderr and "Traceback" not in strict.stderr
    )
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(sc.read_text().splitlines()[:7]) + "\n")
    ok = run(
        str(good),
        "--bundle",
        str(bundle_q4),
        "--max-tokens",
        "4",
        "--fail-under",
        "flag_f1_macro=0",
        "--fail-under",
        "errors=0",
        "--json",
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["complete"] is True
    bad = run(
        str(good),
        "--bundle",
        str(bundle_q4),
        "--max-tokens",
        "4",
        "--fail-under",
        "flag_f1_macro=1.01",
        "--fail-under",
        "delta_mae_trust=0",
    )
    assert bad.returncode == 1
    assert "flag_f1_macro" in bad.stderr and "required at least 1.01" in bad.stderr
    assert "delta_mae_trust" in bad.stderr and "required at most 0" in bad.stderr
    unknown = run(str(good), "--bundle", str(bundle_q4), "--fail-under", "nonsense=1")
    assert unknown.returncode == 1 and "unknown metric 'nonsense'" in unknown.stderr


def test_interrupt_keeps_partial_report_and_resume_finishes(
    bundle_q4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from npcchat.cli import eval as eval_cli
    from npcchat.eval import runner as evaluate

    sc = scenario_file(tmp_path)
    out = tmp_path / "partial.json"
    real_run = evaluate.run

    def interrupted(engine, found, sampling, sim, on_result, share=True, npcs=None):  # type: ignore[no-untyped-def]
        count = [0]

        def once(r: dict[str, Any]) -> None:
            on_result(r)
            count[0] += 1
            if count[0] == 3:
                raise KeyboardInterrupt

        real_run(engine, found, sampling, sim, once, share, npcs)

    monkeypatch.setattr(evaluate, "run", interrupted)
    import typer

    with pytest.raises(typer.Exit) as info:
        eval_cli.eval_cmd([str(sc)], bundle=bundle_q4, report=out, max_tokens=6)
    assert info.value.exit_code == 130
    partial = json.loads(out.read_text())
    assert partial["complete"] is False and len(partial["scenarios"]) == 3
    monkeypatch.setattr(evaluate, "run", real_run)
    eval_cli.eval_cmd([str(sc)], bundle=bundle_q4, resume=out, max_tokens=6)
    full = json.loads(out.read_text())
    assert full["complete"] is True and len(full["scenarios"]) == 10
    assert len({s["id"] for s in full["scenarios"]}) == 10


def test_html_report_holds_the_plots(bundle_q4: Path, tmp_path: Path) -> None:
    sc = scenario_file(tmp_path)
    html = tmp_path / "r.html"
    proc = run(str(sc), "--bundle", str(bundle_q4), "--max-tokens", "6", "--html", str(html))
    assert proc.returncode == 0, proc.stderr
    text = html.read_text()
    assert text.count('class="calibration"') >= 2  # give_item and npc_action are labelled
    assert text.count('class="scatter"') == 2 and text.count('class="histogram"') == 2
    assert text.count("<svg") >= 6 and "http://" not in text.replace(
        'xmlns="http://www.w3.org/2000/svg"', ""
    )
    assert "<script src" not in text and text.count("<script") == 1  # inline, no network
    assert 'id="turns"' in text and text.count('<tr data-npc="') == 12  # a row per turn
    assert 'data-fail="1"' in text or 'data-fail="0"' in text
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium not installed: rendered check skipped")
    png = tmp_path / "r.png"
    subprocess.run(
        [
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'chr'}",
            f"--screenshot={png}",
            "--window-size=1200,2400",
            html.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert png.is_file() and png.stat().st_size > 20_000


def test_compare_reports(bundle_q4: Path, tmp_path: Path) -> None:
    sc = scenario_file(tmp_path)
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    assert (
        run(str(sc), "--bundle", str(bundle_q4), "--max-tokens", "4", "--report", str(a)).returncode
        == 0
    )
    assert (
        run(str(sc), "--bundle", str(bundle_q4), "--max-tokens", "4", "--report", str(b)).returncode
        == 0
    )
    data = json.loads(b.read_text())
    target = data["scenarios"][0]["turns"][0]
    target["flags"]["give_item"]["fired"] = not target["flags"]["give_item"]["fired"]
    b.write_text(json.dumps(data))
    proc = run("compare", str(a), str(b), "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["metrics"]["flag_f1_macro"]["diff"] == 0.0
    assert [c["id"] for c in result["changed"]] == [data["scenarios"][0]["id"]]
    assert run("compare", str(a)).returncode == 1


WARDEN = """
id = "warden"
name = "Warden Ila"
location = "gate"
lore = "The gate is old."

[tags]
quest_stage = "start"
trust = 0.45
relationship = 0.5

[player_state]
items = ["lamp"]

[[lore_entries]]
text = "The north tower hides a stair behind the tapestry."
stages = ["start"]

[[descriptions]]
text = "Ila stands before the closed inner gate."
[[descriptions]]
text = "Ila unlocks the inner gate and waves the player through."
min_trust = 0.5

[flags.give_item]
threshold = 0.99

[[triggers]]
match = ["idiot"]
reaction = "Watch your tongue at my gate."
trust = -0.2
relationship = -0.2
flags = ["npc_action"]
"""


def test_eval_runs_npc_files_exactly_as_talk(tmp_path: Path) -> None:
    """The same NPC file and lines: talk --json and the eval report give identical replies,
    deltas and flags, a forbidden trigger and a description that unlocks included."""
    import sys

    (tmp_path / "warden.toml").write_text(WARDEN)
    lines = ["Hello there, warden.", "Can you open the gate for me?", "You idiot.", "Sorry."]
    cfg = tmp_path / "cfg.toml"
    cfg.write_text("[runtime]\nprefix_reuse = false\n[sampling]\nmax_tokens = 24\n")
    talk = [sys.executable, "-m", "npcchat", "talk", "--npc", str(tmp_path / "warden.toml")]
    talk += ["--json", "--temperature", "0", "--config", str(cfg)]
    for line in lines:
        talk += ["--say", line]
    env = {**os.environ, "NPCCHAT_HOME": str(tmp_path / "home")}  # its caches stay its own
    out = subprocess.run(
        talk, capture_output=True, text=True, timeout=120, check=True, env=env
    ).stdout
    talked = [json.loads(line) for line in out.splitlines()]

    scenario = {"id": "w", "npc_file": "warden.toml", "npc_id": "warden"}
    scenario["turns"] = [{"player": line} for line in lines]
    (tmp_path / "s.jsonl").write_text(json.dumps(scenario) + "\n")
    report = tmp_path / "r.json"
    evaluate = [sys.executable, "-m", "npcchat", "eval", str(tmp_path / "s.jsonl"), "--report"]
    evaluate += [str(report), "--no-share-prefix", "--config", str(cfg)]
    subprocess.run(evaluate, capture_output=True, text=True, timeout=120, check=True, env=env)
    turns = json.loads(report.read_text())["scenarios"][0]["turns"]

    assert [t["reply"] for t in turns] == [t["reply"] for t in talked]
    assert [t["deltas"] for t in turns] == [t["deltas"] for t in talked]
    assert [t["flags"] for t in turns] == [t["flags"] for t in talked]
    assert [t["state"] for t in turns] == [t["state"] for t in talked]
    assert turns[2]["stop_reason"] == "trigger"
    assert turns[2]["reply"] == "Watch your tongue at my gate."
    assert all(t["flags"]["give_item"]["threshold"] == 0.99 for t in turns[:2])  # the override
    assert talked[0]["state"]["trust"] >= 0.5  # the second description unlocked for turn 2
