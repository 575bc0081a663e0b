"""The eval report as one self-contained HTML file: tables and inline SVG plots (per-flag
calibration curves, predicted-vs-expected delta scatter, latency histogram). No scripts,
no fonts, no network: it opens anywhere, offline."""

from __future__ import annotations

import html
from typing import Any

W, H, PAD = 260, 220, 32


STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222}
h1{font-size:20px} h2{font-size:16px;margin-top:28px}
table{border-collapse:collapse;font-size:13px}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f3f3f3} figure{display:inline-block;margin:6px}
figcaption{font-size:12px;text-align:center}
.note{color:#666;font-size:12px}
"""


def _esc(x: object) -> str:
    return html.escape(str(x))


def _fmt(x: Any) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.3f}"
    return _esc(x)


def _axes(x0: float, x1: float, y0: float, y1: float, xlabel: str, ylabel: str) -> tuple[str, Any]:
    def px(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (W - 2 * PAD)

    def py(y: float) -> float:
        return H - PAD - (y - y0) / (y1 - y0) * (H - 2 * PAD)

    inner_w, inner_h = W - 2 * PAD, H - 2 * PAD
    parts = [
        f'<rect x="{PAD}" y="{PAD}" width="{inner_w}" height="{inner_h}" '
        'fill="#fafafa" stroke="#999"/>',
        _text(W / 2, H - 6, 11, "middle", xlabel),
        _text(10, H / 2, 11, "middle", ylabel, f' transform="rotate(-90 10 {H / 2})"'),
        _text(PAD, H - PAD + 12, 9, "middle", f"{x0:g}"),
        _text(W - PAD, H - PAD + 12, 9, "middle", f"{x1:g}"),
        _text(PAD - 4, H - PAD, 9, "end", f"{y0:g}"),
        _text(PAD - 4, PAD + 8, 9, "end", f"{y1:g}"),
    ]
    return "".join(parts), (px, py)


def _text(x: float, y: float, size: int, anchor: str, body: str, extra: str = "") -> str:
    """An SVG text element; ``body`` is escaped (it may come from a report file)."""
    return (
        f'<text x="{x}" y="{y}" font-size="{size}" text-anchor="{anchor}"{extra}>'
        f"{_esc(body)}</text>"
    )


def _diagonal(x1: float, y1: float, x2: float, y2: float) -> str:
    return f'<line x1="{x1}" y1="{y1}" x2="{x2}" y2="{y2}" stroke="#bbb" stroke-dasharray="4 3"/>'


def _svg(title: str, body: str, cls: str) -> str:
    return (
        f'<figure class="{cls}"><svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}">{body}</svg><figcaption>{_esc(title)}</figcaption></figure>'
    )


def calibration_svg(name: str, table: list[dict[str, Any]]) -> str:
    frame, (px, py) = _axes(0, 1, 0, 1, "predicted probability", "observed rate")
    diag = _diagonal(px(0), py(0), px(1), py(1))
    pts = [(px(b["mean_prob"]), py(b["observed"]), b["count"]) for b in table]
    line = " ".join(f"{x:.1f},{y:.1f}" for x, y, _ in pts)
    poly = (
        f'<polyline points="{line}" fill="none" stroke="#2a6fdb" stroke-width="2"/>'
        if len(pts) > 1
        else ""
    )
    dots = "".join(
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="{2 + min(6, c**0.5):.1f}" fill="#2a6fdb">'
        f"<title>n={c}</title></circle>"
        for x, y, c in pts
    )
    return _svg(f"calibration: {name}", frame + diag + poly + dots, "calibration")


def scatter_svg(name: str, pairs: list[tuple[float, float]]) -> str:
    frame, (px, py) = _axes(-1, 1, -1, 1, f"expected {name} delta", f"predicted {name} delta")
    diag = _diagonal(px(-1), py(-1), px(1), py(1))
    dots = "".join(
        f'<circle cx="{px(e):.1f}" cy="{py(p):.1f}" r="3" fill="#d9534f" fill-opacity="0.6"/>'
        for e, p in pairs
    )
    return _svg(f"delta scatter: {name} (n={len(pairs)})", frame + diag + dots, "scatter")


def histogram_svg(name: str, values: list[float], bins: int = 12) -> str:
    if not values:
        return _svg(f"latency: {name} (no data)", "", "histogram")
    lo, hi = min(values), max(values)
    hi = hi if hi > lo else lo + 1.0
    counts = [0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / (hi - lo) * bins))] += 1
    top = max(counts)
    frame, (_, py) = _axes(lo, hi, 0, top, f"{name} ms", "turns")
    bw = (W - 2 * PAD) / bins
    bars = "".join(
        f'<rect class="bar" x="{PAD + i * bw:.1f}" y="{py(c):.1f}" width="{bw - 1:.1f}" '
        f'height="{py(0) - py(c):.1f}" fill="#5cb85c"><title>{c}</title></rect>'
        for i, c in enumerate(counts)
    )
    return _svg(f"latency: {name}", frame + bars, "histogram")


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render(report: dict[str, Any]) -> str:
    agg = report["aggregates"]
    turns = [t for s in report["scenarios"] for t in s["turns"]]
    flags = agg["flags"]
    flag_rows = [
        [
            n,
            v["n"],
            v["positives"],
            v["precision"],
            v["recall"],
            v["f1"],
            v["best_threshold"],
            v["best_f1"],
            v["brier"],
            v["threshold_mae"],
        ]
        for n, v in flags.items()
    ]
    cal = "".join(calibration_svg(n, v["calibration"]) for n, v in flags.items() if v["n"])
    scatters = ""
    for name in ("trust", "relationship"):
        pairs = [
            (t["expected"]["delta"][name], t["deltas"][name])
            for t in turns
            if t["expected"] and t["expected"]["delta"]
        ]
        scatters += scatter_svg(name, pairs)
    lat = histogram_svg("prefill", [t["timings_ms"]["prefill"] for t in turns])
    lat += histogram_svg("generate", [t["timings_ms"]["generate"] for t in turns])
    r = agg["replies"]
    summary = [
        ["scenarios", agg["scenarios"]],
        ["turns", agg["turns"]],
        ["errors", agg["errors"]],
        ["bad lines", agg["bad_lines"]],
        ["flag F1 (macro)", agg["flag_f1_macro"]],
        ["flag F1 at best thresholds (in-sample)", agg["flag_best_f1_macro"]],
        ["Brier (mean)", agg["brier_mean"]],
        ["delta MAE trust", agg["delta"]["trust"]["mae"]],
        ["delta MAE relationship", agg["delta"]["relationship"]["mae"]],
        ["sign agreement trust", agg["delta"]["trust"]["sign_agreement"]],
        ["sign agreement relationship", agg["delta"]["relationship"]["sign_agreement"]],
        ["empty replies", r["empty_rate"]],
        ["truncated replies", r["truncated_rate"]],
        ["tag leaks", r["leak_rate"]],
        ["exact match", r["exact_match_rate"]],
        [f"similarity ({r['similarity_method']})", r["similarity_mean"]],
        ["tokens/s", agg["tokens_per_s"]],
        ["scenarios/s", agg["scenarios_per_s"]],
    ]
    worst = sorted(
        (t for t in turns if t["checks"]["similarity"] is not None),
        key=lambda t: t["checks"]["similarity"],
    )[:10]
    worst_rows = [
        [t["player"], t["reply"], (t["expected"] or {}).get("response"), t["checks"]["similarity"]]
        for t in worst
    ]
    rules_html = _rules(report)
    b = report["bundle"]
    state = "complete" if report["complete"] else "PARTIAL (interrupted)"
    flag_head = [
        "flag",
        "n",
        "positives",
        "precision",
        "recall",
        "F1",
        "best threshold (in-sample)",
        "best F1",
        "Brier",
        "threshold MAE",
    ]
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>npcchat eval · {_esc(b["name"])}</title>
<style>{STYLE}</style></head><body>
<h1>npcchat eval · {_esc(b["name"])} ({_esc(b["quant"])})</h1>
<p class="note">{_esc(report["created"])} · {state} · bundle id {_esc(b["id"])}</p>
<h2>Summary</h2>{_table(["metric", "value"], summary)}
<h2>Flags</h2>{_table(flag_head, flag_rows)}
<h2>Calibration</h2><div>{cal or '<p class="note">no flag labels</p>'}</div>
<h2>Deltas: predicted vs expected</h2><div>{scatters}</div>
<h2>Latency</h2><div>{lat}</div>
<h2>Least similar replies</h2>{_table(["player", "reply", "reference", "similarity"], worst_rows)}
{rules_html}</body></html>
"""


def _rules(report: dict[str, Any]) -> str:
    """What the NPCs' rules did: the totals, then every turn they changed, by scenario id
    (empty when no NPC file with rules ran)."""
    agg = report["aggregates"].get("rules")
    if not agg:
        return ""
    totals = [
        ["turns under rules", agg["turns"]],
        ["turns with a blocked flag", agg["blocked_turns"]],
        ["guarded replies", agg["guarded_turns"]],
        ["state changes", agg["state_changes"]],
        ["reply check interventions", agg["check_interventions"]],
        *[[f"blocked: {k}", v] for k, v in agg["blocked"].items()],
        *[[f"action: {k}", v] for k, v in agg["actions"].items()],
    ]
    rows = []
    for sc in report["scenarios"]:
        for i, t in enumerate(sc.get("turns", [])):
            r = t.get("rules")
            if not r or not (r["blocked"] or r["effects"] or r["actions"] or r["guard"]):
                continue
            rows.append(
                [
                    f"{sc['id']} #{i + 1}",
                    t["player"],
                    "; ".join(f"{k}: {v}" for k, v in r["blocked"].items()),
                    f"guarded ({r['guard']})" if r["guard"] else "",
                    "; ".join(f"{c['key']}: {c['from']} -> {c['to']}" for c in r["effects"]),
                    "; ".join(
                        a["name"]
                        + "("
                        + ", ".join(f"{k}={v}" for k, v in a.items() if k not in ("name", "flag"))
                        + ")"
                        for a in r["actions"]
                    ),
                ]
            )
    head = ["scenario · turn", "player", "blocked", "reply", "effects", "actions"]
    return f"""<h2>Rules</h2>{_table(["", "count"], totals)}
<h2>Turns the rules changed</h2>{_table(head, rows)}
"""
