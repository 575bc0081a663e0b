"""The eval report as one self-contained HTML file: tables and inline SVG plots (per-flag
calibration curves, predicted-vs-expected delta scatter, latency histogram), and a row per
scenario turn (id, NPC, player line, reply, expected and predicted deltas and flags, pass
or fail per check) that a small inline script sorts and filters. No script or font from
anywhere else, no network: it opens anywhere, offline."""

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
.fail{color:#b00;font-weight:bold} .pass{color:#080}
#turns th{cursor:pointer} #turns td{vertical-align:top;max-width:320px}
.filters{margin:8px 0;font-size:13px} .filters *{margin-right:8px}
"""

# Sorting and filtering of the per-turn table: a few lines inline, no library, no network.
SCRIPT = """
(function(){
const table=document.getElementById('turns'); if(!table) return;
const body=table.tBodies[0], rows=[...body.rows];
const q=document.getElementById('q'), npc=document.getElementById('npc'),
      flag=document.getElementById('flag'), failed=document.getElementById('failed');
function apply(){
  const text=q.value.toLowerCase();
  for(const r of rows){
    const show=(!text||r.textContent.toLowerCase().includes(text))
      &&(!npc.value||r.dataset.npc===npc.value)
      &&(!flag.value||(' '+r.dataset.flags+' ').includes(' '+flag.value+' '))
      &&(!failed.checked||r.dataset.fail==='1');
    r.style.display=show?'':'none';
  }
}
[q,npc,flag,failed].forEach(e=>e.addEventListener('input',apply));
[...table.tHead.rows[0].cells].forEach((th,i)=>th.addEventListener('click',()=>{
  const dir=th.dataset.dir==='asc'?-1:1; th.dataset.dir=dir===1?'asc':'desc';
  const key=r=>{const t=r.cells[i].textContent.trim(); const n=parseFloat(t);
    return isNaN(n)?t:n;};
  rows.sort((a,b)=>{const x=key(a),y=key(b);
    return (typeof x===typeof y?(x<y?-1:x>y?1:0):(typeof x==='number'?-1:1))*dir;});
  rows.forEach(r=>body.appendChild(r));
}));
})();
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
        _text(PAD, H - PAD + 12, 9, "middle", _tick(x0)),
        _text(W - PAD, H - PAD + 12, 9, "middle", _tick(x1)),
        _text(PAD - 4, H - PAD, 9, "end", _tick(y0)),
        _text(PAD - 4, PAD + 8, 9, "end", _tick(y1)),
    ]
    return "".join(parts), (px, py)


def _tick(x: float) -> str:
    """An axis label a person reads: three significant digits (6.1, not 6.12252)."""
    return f"{x:.3g}"


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
{rules_html}{_turn_rows(report)}<script>{SCRIPT}</script></body></html>
"""


def _mark(ok: bool | None) -> str:
    if ok is None:
        return "<td>–</td>"
    return '<td class="pass">pass</td>' if ok else '<td class="fail">FAIL</td>'


def _turn_rows(report: dict[str, Any]) -> str:
    """Every scenario turn as a row, with pass or fail for each check the report's metrics
    count (delta signs, flags, a usable reply), filterable by NPC, flag and failures."""
    from npcchat.eval.metrics import sign

    rows: list[str] = []
    npcs: set[str] = set()
    flag_names: set[str] = set()
    for sc in report["scenarios"]:
        npc = str(sc.get("npc_id", ""))
        npcs.add(npc)
        for i, t in enumerate(sc.get("turns", [])):
            exp = t.get("expected") or {}
            fired = sorted(n for n, f in t["flags"].items() if f["fired"])
            want = exp.get("flags") or {}
            labelled = {n: v for n, v in want.items() if n in t["flags"]}
            flags_ok = (
                all(t["flags"][n]["fired"] == v for n, v in labelled.items()) if labelled else None
            )
            delta = exp.get("delta") or {}
            signs = {
                k: (sign(t["deltas"][k]) == sign(delta[k]) if k in delta else None)
                for k in ("trust", "relationship")
            }
            c = t.get("checks", {})
            reply_ok = not (c.get("empty") or c.get("truncated") or c.get("leaked_tags"))
            checks = [signs["trust"], signs["relationship"], flags_ok, reply_ok]
            failed = any(x is False for x in checks)
            expected_fired = sorted(n for n, v in labelled.items() if v)
            names = set(fired) | set(labelled)
            flag_names |= names
            cells = [
                f"<td>{_esc(sc['id'])}</td><td>{i + 1}</td><td>{_esc(npc)}</td>",
                f"<td>{_esc(t['player'])}</td><td>{_esc(t['reply'])}</td>",
                "".join(
                    f"<td>{t['deltas'][k]:+.2f}"
                    + (f" / {delta[k]:+.2f}" if k in delta else "")
                    + "</td>"
                    for k in ("trust", "relationship")
                ),
                f"<td>{_esc(', '.join(fired) or '–')}</td>",
                f"<td>{_esc(', '.join(expected_fired) or ('none' if labelled else '–'))}</td>",
                "".join(_mark(x) for x in checks),
            ]
            rows.append(
                f'<tr data-npc="{_esc(npc)}" data-flags="{_esc(" ".join(sorted(names)))}" '
                f'data-fail="{1 if failed else 0}">' + "".join(cells) + "</tr>"
            )
    head = [
        "scenario",
        "turn",
        "NPC",
        "player",
        "reply",
        "Δ trust (pred / exp)",
        "Δ relationship (pred / exp)",
        "fired",
        "expected to fire",
        "trust sign",
        "relationship sign",
        "flags",
        "reply",
    ]
    options = "".join(f'<option value="{_esc(n)}">{_esc(n)}</option>' for n in sorted(npcs))
    flag_opts = "".join(f'<option value="{_esc(n)}">{_esc(n)}</option>' for n in sorted(flag_names))
    filters = (
        '<div class="filters"><input id="q" placeholder="search" size="24">'
        f'<select id="npc"><option value="">every NPC</option>{options}</select>'
        f'<select id="flag"><option value="">every flag</option>{flag_opts}</select>'
        '<label><input id="failed" type="checkbox"> failed only</label></div>'
    )
    ths = "".join(f"<th>{_esc(h)}</th>" for h in head)
    return (
        f"<h2>Scenarios, turn by turn</h2>{filters}"
        f'<table id="turns"><thead><tr>{ths}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    )


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
