"""The eval report: aggregates (the metrics of :mod:`npcchat.eval.metrics` over every turn),
the flat gate names ``--fail-under`` understands, the JSON file and its checks, and the
comparison of two reports. Plain JSON; schema: ``npcchat/eval/schemas/eval-report.schema.json``.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from npcchat.errors import ConfigError, where
from npcchat.eval import metrics as M
from npcchat.eval.scenarios import BadLine
from npcchat.runtime.bundle import Bundle
from npcchat.types import DELTA_NAMES

REPORT_FORMAT = "npcchat-eval-report"
REPORT_VERSION = 1
HIGHER_IS_BETTER = (
    "flag_f1_macro",
    "flag_best_f1_macro",
    "sign_agreement_trust",
    "sign_agreement_relationship",
    "exact_match_rate",
    "similarity_mean",
    "tokens_per_s",
    "scenarios_per_s",
)
LOWER_IS_BETTER = (
    "delta_mae_trust",
    "delta_mae_relationship",
    "brier_mean",
    "threshold_mae",
    "empty_rate",
    "truncated_rate",
    "leak_rate",
    "latency_prefill_p95",
    "latency_generate_p95",
    "errors",
    "bad_lines",
)


def aggregate(
    results: list[dict[str, Any]], flags: tuple[str, ...], wall_s: float, sim_method: str
) -> dict[str, Any]:
    turns = [t for r in results for t in r["turns"]]
    agg: dict[str, Any] = {
        "scenarios": len(results),
        "turns": len(turns),
        "errors": sum(1 for r in results if r["error"]),
    }
    agg["delta"] = {}
    for name in DELTA_NAMES:
        pairs = [
            (t["deltas"][name], t["expected"]["delta"][name])
            for t in turns
            if t["expected"] and t["expected"]["delta"]
        ]
        pred, true = [p for p, _ in pairs], [e for _, e in pairs]
        agg["delta"][name] = {
            "n": len(pairs),
            "mae": M.mae(pred, true),
            "sign_agreement": M.sign_agreement(pred, true),
        }
    agg["flags"], unknown = _flag_metrics(turns, flags)
    agg["unknown_flags"] = sorted(unknown)
    per = [v for v in agg["flags"].values() if v["n"]]
    # F1 of a flag with no positive label says nothing (1.0 when it never fires): the macro
    # averages flags that have positives, and the others are listed apart
    scored = [v for v in per if v["positives"]]
    agg["flag_f1_macro"] = _mean([v["f1"] for v in scored])
    agg["flag_best_f1_macro"] = _mean([v["best_f1"] for v in scored])
    agg["flags_without_positives"] = sorted(
        n for n, v in agg["flags"].items() if v["n"] and not v["positives"]
    )
    # best thresholds are tuned on the very labels they are scored on
    agg["best_threshold_scope"] = "in-sample"
    agg["brier_mean"] = _mean([v["brier"] for v in per])
    agg["threshold_mae"] = _mean(
        [v["threshold_mae"] for v in per if v["threshold_mae"] is not None]
    )
    agg["replies"] = _reply_metrics(turns, sim_method)
    pre = [t["timings_ms"]["prefill"] for t in turns]
    gen = [t["timings_ms"]["generate"] for t in turns]
    agg["latency_ms"] = {
        "prefill_p50": M.percentile(pre, 50),
        "prefill_p95": M.percentile(pre, 95),
        "generate_p50": M.percentile(gen, 50),
        "generate_p95": M.percentile(gen, 95),
    }
    n_gen = sum(t["tokens"]["generated"] for t in turns)
    # per wall second of the run: per-turn generate times overlap when turns run in parallel
    agg["tokens_per_s"] = n_gen / wall_s if wall_s > 0 else None
    agg["wall_s"] = wall_s
    agg["scenarios_per_s"] = len(results) / wall_s if wall_s > 0 else None
    return agg


def _mean(xs: list[float]) -> float | None:
    return float(sum(xs) / len(xs)) if xs else None


def _flag_metrics(
    turns: list[dict[str, Any]], flags: tuple[str, ...]
) -> tuple[dict[str, Any], set[str]]:
    out: dict[str, Any] = {}
    unknown: set[str] = set()
    for t in turns:
        if t["expected"] and t["expected"]["flags"]:
            unknown |= set(t["expected"]["flags"]) - set(flags)
    for name in flags:
        rows = [
            (t["flags"][name], t["expected"])
            for t in turns
            if t["expected"]
            and t["expected"]["flags"]
            and name in t["expected"]["flags"]
            and name in t["flags"]
        ]
        probs = [f["prob"] for f, _ in rows]
        fired = [f["fired"] for f, _ in rows]
        true = [bool(e["flags"][name]) for _, e in rows]
        thr_pairs = [
            (f["threshold"], e["thresholds"][name])
            for f, e in rows
            if e["thresholds"] and name in e["thresholds"]
        ]
        res = M.prf(fired, true) if rows else None
        best_t, best_f1 = M.best_threshold(probs, true) if rows else (None, None)
        out[name] = {
            "n": len(rows),
            "positives": sum(true),
            "precision": res.precision if res else None,
            "recall": res.recall if res else None,
            "f1": res.f1 if res else None,
            "best_threshold": best_t,
            "best_f1": best_f1,
            "brier": M.brier(probs, true),
            "calibration": M.calibration(probs, true) if rows else [],
            "threshold_mae": M.mae([a for a, _ in thr_pairs], [b for _, b in thr_pairs]),
        }
    return out, unknown


def _reply_metrics(turns: list[dict[str, Any]], sim_method: str) -> dict[str, Any]:
    n = len(turns)
    refs = [t for t in turns if t["checks"]["exact_match"] is not None]
    return {
        "n": n,
        "mean_chars": _mean([len(t["reply"]) for t in turns]),
        "mean_tokens": _mean([t["tokens"]["generated"] for t in turns]),
        "empty_rate": _mean([float(t["checks"]["empty"]) for t in turns]),
        "truncated_rate": _mean([float(t["checks"]["truncated"]) for t in turns]),
        "leak_rate": _mean([float(bool(t["checks"]["leaked_tags"])) for t in turns]),
        "with_reference": len(refs),
        "exact_match_rate": _mean([float(t["checks"]["exact_match"]) for t in refs]),
        "similarity_mean": _mean([t["checks"]["similarity"] for t in refs]),
        "similarity_method": sim_method,
    }


def gates(agg: dict[str, Any]) -> dict[str, float | None]:
    """The flat metric names ``--fail-under`` understands."""
    g: dict[str, float | None] = {
        "flag_f1_macro": agg["flag_f1_macro"],
        "flag_best_f1_macro": agg["flag_best_f1_macro"],
        "brier_mean": agg["brier_mean"],
        "threshold_mae": agg["threshold_mae"],
        "tokens_per_s": agg["tokens_per_s"],
        "scenarios_per_s": agg["scenarios_per_s"],
        "errors": agg["errors"],
        "bad_lines": agg.get("bad_lines", 0),
        "latency_prefill_p95": agg["latency_ms"]["prefill_p95"],
        "latency_generate_p95": agg["latency_ms"]["generate_p95"],
    }
    for name in DELTA_NAMES:
        g[f"delta_mae_{name}"] = agg["delta"][name]["mae"]
        g[f"sign_agreement_{name}"] = agg["delta"][name]["sign_agreement"]
    for key in ("empty_rate", "truncated_rate", "leak_rate", "exact_match_rate", "similarity_mean"):
        g[key] = agg["replies"][key]
    for name, v in agg["flags"].items():
        g[f"flag_f1.{name}"] = v["f1"]
    return g


def validate_gates(specs: list[str], flags: tuple[str, ...]) -> None:
    known = {*HIGHER_IS_BETTER, *LOWER_IS_BETTER, *(f"flag_f1.{n}" for n in flags)}
    for spec in specs:
        name, eq, raw = spec.partition("=")
        try:
            limit = float(raw)
        except ValueError:
            raise ConfigError(f"--fail-under {spec}: expected METRIC=NUMBER") from None
        if not math.isfinite(limit):  # nan compares false: the gate would always pass
            raise ConfigError(f"--fail-under {spec}: expected a finite number")
        if not eq or name not in known:
            raise ConfigError(
                f"--fail-under {spec}: unknown metric '{name}'",
                hint=f"metrics: {', '.join(sorted(known))}",
            )


def check_gates(g: dict[str, float | None], wanted: list[str]) -> list[str]:
    """Each ``METRIC=VALUE`` that is missed, as a sentence; error metrics are "at most"."""
    failures = []
    for spec in wanted:
        name, _, raw = spec.partition("=")
        try:
            limit = float(raw)
        except ValueError:
            raise ConfigError(f"--fail-under {spec}: expected METRIC=NUMBER") from None
        if name not in g:
            raise ConfigError(
                f"--fail-under {spec}: unknown metric '{name}'",
                hint=f"metrics: {', '.join(sorted(g))}",
            )
        value = g[name]
        lower = name in LOWER_IS_BETTER
        if value is None:
            failures.append(f"{name} is not available (no labels for it)")
        elif (value > limit) if lower else (value < limit):
            failures.append(
                f"{name} = {value:.4g}, required {'at most' if lower else 'at least'} {limit:g}"
            )
    return failures


def build(
    bundle: Bundle,
    results: list[dict[str, Any]],
    bad: list[BadLine],
    settings: dict[str, Any],
    wall_s: float,
    complete: bool,
    sim_method: str,
) -> dict[str, Any]:
    """The whole report of a run (complete or interrupted)."""
    agg = aggregate(results, bundle.flags, wall_s, sim_method)
    agg["bad_lines"] = len(bad)
    rules = rules_summary(results)
    if rules is not None:  # only where NPC files with rules ran: older reports are unchanged
        agg["rules"] = rules
    b = bundle
    return {
        "format": REPORT_FORMAT,
        "version": REPORT_VERSION,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "complete": complete,
        "bundle": {"name": b.name, "id": b.identity, "quant": b.quant, "flags": list(b.flags)},
        "settings": settings,
        "bad_lines": [{"source": x.source, "reason": x.reason} for x in bad],
        "aggregates": agg,
        "gates": gates(agg),
        "scenarios": results,
    }


def rules_summary(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What the NPCs' rules did over the run: flags blocked (by flag), guarded replies,
    actions (by name), state changes, reply checks that intervened; per scenario too.
    None when no turn ran under rules."""
    turns = [t for sc in results for t in sc.get("turns", []) if "rules" in t]
    if not turns:
        return None
    blocked: dict[str, int] = {}
    actions: dict[str, int] = {}
    for t in turns:
        for name in t["rules"]["blocked"]:
            blocked[name] = blocked.get(name, 0) + 1
        for a in t["rules"]["actions"]:
            actions[a["name"]] = actions.get(a["name"], 0) + 1
    per_scenario = {
        sc["id"]: {
            "blocked": sum(len(t["rules"]["blocked"]) for t in sc["turns"] if "rules" in t),
            "guarded": sum(1 for t in sc["turns"] if "rules" in t and t["rules"]["guard"]),
            "checks": sum(len(t["rules"]["checks"]) for t in sc["turns"] if "rules" in t),
        }
        for sc in results
        if any("rules" in t for t in sc.get("turns", []))
    }
    return {
        "turns": len(turns),
        "blocked": blocked,
        "blocked_turns": sum(1 for t in turns if t["rules"]["blocked"]),
        "guarded_turns": sum(1 for t in turns if t["rules"]["guard"]),
        "actions": actions,
        "state_changes": sum(len(t["rules"]["effects"]) for t in turns),
        "check_interventions": sum(len(t["rules"]["checks"]) for t in turns),
        "per_scenario": per_scenario,
    }


# settings that change results: a report resumed with other ones would mix two runs
RESULT_SETTINGS = (
    "temperature",
    "top_p",
    "top_k",
    "repeat_penalty",
    "seed",
    "max_tokens",
    "n_ctx",
    "similarity",
    "knowledge_ranking",
)


def check_resumable(
    prior: dict[str, Any], path: Path, bundle_id: str, settings: dict[str, Any]
) -> list[dict[str, Any]]:
    """The finished scenarios of a report this run may continue: same bundle, same
    settings that change results, a well-formed scenario list. Checked before the run,
    so a damaged report never costs the run's results."""
    made = prior.get("bundle")
    if not isinstance(made, dict) or made.get("id") != bundle_id:
        other = made.get("id") if isinstance(made, dict) else None
        raise ConfigError(
            f"{where(path, 'bundle.id')}: the report was made with bundle {other!r}, "
            f"this run uses {bundle_id!r}",
            hint="resume with the same bundle, or start a new report",
        )
    old = prior.get("settings")
    if not isinstance(old, dict):
        raise ConfigError(f"{where(path, 'settings')}: expected a table")
    for key in RESULT_SETTINGS:
        if key in old and old[key] != settings.get(key):
            raise ConfigError(
                f"{where(path, f'settings.{key}')}: the report used {old[key]!r}, "
                f"this run {settings.get(key)!r}",
                hint="resume with the same settings, or start a new report",
            )
    scenarios: list[dict[str, Any]] = prior["scenarios"]  # a list: load_report checked it
    for i, sc in enumerate(scenarios):
        ok = isinstance(sc, dict) and isinstance(sc.get("id"), str)
        if not ok or not isinstance(sc.get("turns"), list):
            raise ConfigError(f"{where(path, f'scenarios[{i}]')}: expected an id and turns")
    return scenarios


def load_report(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such report") from None
    except (OSError, ValueError, RecursionError) as e:
        raise ConfigError(f"{path}: not a readable JSON report ({type(e).__name__})") from None
    if not isinstance(data, dict) or data.get("format") != REPORT_FORMAT:
        raise ConfigError(f"{path}: not an npcchat eval report (key 'format')")
    for key, kind in (("gates", dict), ("scenarios", list)):
        if not isinstance(data.get(key), kind):
            raise ConfigError(f"{where(path, key)}: expected a {kind.__name__}")
    version = data.get("version", 0)
    if type(version) is not int:
        raise ConfigError(f"{where(path, 'version')}: expected an integer, got {version!r}")
    if version > REPORT_VERSION:
        raise ConfigError(
            f"{path}: report version {data['version']} is newer than this npcchat reads"
        )
    return data


def compare(a_path: Path, b_path: Path) -> dict[str, Any]:
    """Every gate metric of two reports side by side, and the scenarios that changed."""
    a, b = load_report(a_path), load_report(b_path)
    metrics = {}
    for name in sorted(set(a["gates"]) | set(b["gates"])):
        va, vb = a["gates"].get(name), b["gates"].get(name)
        metrics[name] = {
            "a": va,
            "b": vb,
            "diff": (vb - va) if va is not None and vb is not None else None,
        }
    changed = changed_scenarios(a["scenarios"], b["scenarios"])
    return {"a": str(a_path), "b": str(b_path), "metrics": metrics, "changed": changed}


def changed_scenarios(
    sa: list[dict[str, Any]], sb: list[dict[str, Any]], tol: float = 0.05
) -> list[dict[str, Any]]:
    """Scenarios (by id, present in both) whose fired flags or deltas (beyond ``tol``) differ."""
    by_id = {s["id"]: s for s in sa}
    out = []
    for s in sb:
        other = by_id.get(s["id"])
        if other is None:
            continue
        for i, (ta, tb) in enumerate(zip(other["turns"], s["turns"], strict=False)):
            fa = {n for n, f in ta["flags"].items() if f["fired"]}
            fb = {n for n, f in tb["flags"].items() if f["fired"]}
            dd = {n: tb["deltas"][n] - ta["deltas"][n] for n in tb["deltas"]}
            if fa != fb or any(abs(v) > tol for v in dd.values()):
                out.append(
                    {
                        "id": s["id"],
                        "turn": i,
                        "player": tb["player"],
                        "flags_a": sorted(fa),
                        "flags_b": sorted(fb),
                        "delta_diff": dd,
                    }
                )
    return out
