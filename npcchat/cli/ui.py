"""Terminal output: the only module that imports rich."""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from npcchat.errors import NpcchatError
from npcchat.sessions.session import Session
from npcchat.types import Tags, Turn

# markup=False: text from users and files (player lines, tags, scenario ids) is printed as
# it is, never read as rich markup; our own styles are Text styles.
out = Console(highlight=False, markup=False)
err = Console(stderr=True, highlight=False, markup=False)


def error(e: NpcchatError) -> None:
    message = " ".join(e.message.split())  # always one line
    err.print(Text(f"error: {message}", style="bold red"), soft_wrap=True)
    if e.hint:
        err.print(Text(f"hint: {e.hint}", style="yellow"))


def warn(message: str) -> None:
    err.print(Text(f"warning: {message}", style="yellow"), soft_wrap=True)


def fail(message: str) -> None:
    err.print(Text.assemble(("fail: ", "bold red"), message), soft_wrap=True)


def info(message: str) -> None:
    out.print(Text(message, style="dim"), soft_wrap=True)


def banner(npc_name: str, npc_id: str, bundle: str, session_path: str | None, resumed: int) -> None:
    where = f"session {session_path}" if session_path else "unsaved session (/save FILE)"
    extra = f", resumed after {resumed} turns" if resumed else ""
    out.print(
        Text.assemble(("npcchat", "bold"), f" · talking to {npc_name} ({npc_id}) · bundle {bundle}")
    )
    out.print(Text(f"{where}{extra} · /help for commands, Ctrl-D to quit", style="dim"))


def you(line: str) -> None:
    """A scripted player line, echoed as the REPL shows it."""
    out.print(Text.assemble(("you>", "bold"), f" {line}"))


def prompt_text() -> str:
    return "you> "


def reply_start(npc_name: str) -> None:
    out.print(Text(f"{npc_name}> ", style="bold cyan"), end="")


def reply_text(chunk: str) -> None:
    # Written straight through so each token shows as soon as it is decoded.
    sys.stdout.write(chunk)
    sys.stdout.flush()


def reply_end() -> None:
    out.print()


def _signed(x: float, decimals: int = 3) -> Text:
    style = "green" if x > 0 else "red" if x < 0 else "dim"
    return Text(f"{x:+.{decimals}f}", style=style)


def turn_summary(r: Turn, display: Mapping[str, str] | None = None, decimals: int = 2) -> None:
    """Deltas, every flag against its threshold, and what the turn cost; ``display`` maps
    flag names to the NPC file's display names. State numbers at the precision the state
    keeps (``[state] decimals``): a delta shown as +0.004 that moves nothing misleads."""
    grid = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    grid.add_column("state")
    grid.add_column("delta", justify="right")
    grid.add_column("now", justify="right")
    for name in ("trust", "relationship"):
        before, after = getattr(r.tags_before, name), getattr(r.tags_after, name)
        grid.add_row(
            name,
            _signed(r.heads.deltas[name], decimals),
            f"{before:.{decimals}f} → {after:.{decimals}f}",
        )
    flags = Table(show_header=True, header_style="bold", box=None, pad_edge=False)
    flags.add_column("flag")
    flags.add_column("prob", justify="right")
    flags.add_column("threshold", justify="right")
    flags.add_column("fired")
    for name, f in r.heads.flags.items():
        mark = Text("FIRED", style="bold magenta") if f.fired else Text("·", style="dim")
        if f.blocked:  # the model wanted to, the rules said no
            mark = Text("BLOCKED", style="bold yellow")
        label = f"{name} ({display[name]})" if display and display.get(name, name) != name else name
        flags.add_row(label, f"{f.prob:.3f}", f"{f.threshold:.3f}", mark)
    out.print(grid)
    out.print(flags)
    if r.rules is not None:
        _rules(r)
    t = r.timings
    dropped = f" · {r.dropped_turns} old turns left out" if r.dropped_turns else ""
    if r.stop_reason == "trigger":  # no model call: say which phrase, not zero tokens
        out.print(
            Text.assemble(
                ("forbidden trigger ", "bold yellow"),
                (repr(r.trigger_phrase), "yellow"),
                (" · fixed reaction, no model call", "dim"),
            ),
            soft_wrap=True,
        )
        return
    out.print(
        Text(
            f"{r.prompt_tokens} prompt + {r.generated_tokens} reply tokens"
            f" · prefill {t.prefill_ms:.0f} ms"
            f" · heads {t.heads_ms * 1000:.0f} µs · generate {t.generate_ms:.0f} ms"
            f" · stop: {r.stop_reason}{dropped}",
            style="dim",
        ),
        soft_wrap=True,
    )


def _rules(r: Turn) -> None:
    """What the NPC's rules did: blocked flags and why, state changes, actions."""
    rules = r.rules
    assert rules is not None
    for name, why in rules.blocked.items():
        out.print(Text.assemble(("blocked ", "bold yellow"), f"{name}: {why}"))
    if rules.guard:
        out.print(Text.assemble(("guarded reply ", "bold yellow"), f"for {rules.guard}"))
    for change in rules.effects:
        out.print(Text.assemble(("effect ", "bold cyan"), str(change)))
    for action in rules.actions:
        params = ", ".join(f"{k}={v}" for k, v in action.params)
        out.print(Text.assemble(("action ", "bold green"), f"{action.name}({params})"))


def _items(values: Sequence[str]) -> str:
    return ", ".join(values) if values else "(none)"


def tags_table(tags: Tags, title: str = "state") -> Table:
    table = Table(title=title, show_header=False, box=None, title_justify="left")
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in vars(tags).items():
        table.add_row(key, str(value))
    return table


def state(s: Session) -> None:
    out.print(tags_table(s.tags))
    ps = s.player_state
    out.print(Text.assemble(("player items", "bold"), f" {_items(ps.items)}"))
    out.print(Text.assemble(("player actions", "bold"), f" {_items(ps.actions)}"))
    out.print(Text.assemble(("player position", "bold"), f" {ps.position or '(none)'}"))
    if s.npc_items or s.initial_npc_items:
        out.print(Text.assemble(("NPC items", "bold"), f" {_items(s.npc_items)}"))
    fired = f" {', '.join(s.fired_flags) or '(none)'} · {len(s.history)} turns"
    out.print(Text.assemble(("fired flags", "bold"), fired))
    if s.game_day is not None or s.game_time:
        day = f"day {s.game_day:g}" if s.game_day is not None else ""
        clock = " · ".join(x for x in (day, s.game_time) if x)
        out.print(Text.assemble(("game clock", "bold"), f" {clock}"))


def model_prompt(text: str, tokens: int, dropped: int) -> None:
    """``/prompt``: the prompt as the model reads it (plain text: never markup)."""
    out.print(Text(text))
    note = f"{tokens} tokens" + (f" · {dropped} oldest turns dropped to fit" if dropped else "")
    info(note)


def event_changes(changes: Sequence[Any]) -> None:
    """What a game event changed (``/event``), one line each."""
    if not changes:
        info("(the event changed nothing: the state already was so)")
        return
    for c in changes:
        out.print(Text.assemble(("event ", "bold"), str(c)))


def help_table(commands: Sequence[tuple[str, str]]) -> None:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for cmd, what in commands:
        table.add_row(cmd, what)
    out.print(table)


def kv_table(title: str, rows: Mapping[str, Any]) -> None:
    table = Table(title=title, show_header=True, header_style="bold", title_justify="left")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for k, v in rows.items():
        table.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    out.print(table)


def info_table(data: Mapping[str, Any]) -> None:
    """``npcchat info``: one row per fact; llama.cpp's backends one row each."""
    table = Table(title="npcchat info", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    llama = data["llama_cpp"]
    ort = data["onnxruntime"]
    rows = [
        ("npcchat", data["npcchat"]),
        ("llama-cpp-python", llama["version"]),
        ("GPU offload", "yes" if llama["gpu_offload"] else "no (CPU-only build)"),
        ("default threads", str(llama["default_threads"])),
    ]
    for name, features in llama["backends"].items():
        on = [k for k, v in features.items() if v not in ("0", "")]
        rows.append(
            (
                f"llama.cpp {name}",
                " ".join(f"{k}={features[k]}" if features[k] != "1" else k for k in on),
            )
        )
    rows += [
        ("onnxruntime", f"{ort['version']} ({', '.join(ort['providers'])})"),
        (
            "extras",
            ", ".join(
                f"{k}: {'installed' if v else 'not installed'}" for k, v in data["extras"].items()
            ),
        ),
        ("demo bundle", data["demo_bundle"] or "(none installed)"),
    ]
    for key, value in rows:
        table.add_row(Text(key), Text(str(value)))
    out.print(table)


def serve_bench(report: Mapping[str, Any]) -> None:
    """``npcchat bench serve``: one row per player count (npcchat, then the peer), then the
    ratios."""
    title = f"npcchat bench serve · {report['slots']} slots · {report['reply_tokens']} tokens"
    if report.get("stagger_s"):
        title += f" · players {report['stagger_s']:g} s apart"
    _load_table(f"{title} · npcchat serve", report["loads"])
    peer = report.get("peer")
    if peer:
        _load_table(f"{title} · llama-server ({peer['binary']})", peer["loads"])
    keys = ("turns_per_s_", "http_", "server_", "npcchat_over_peer_", "ttft_p95_")
    extra = {k: v for k, v in report.items() if k.startswith(keys)}
    kv_table("ratios", extra)


def _load_table(title: str, loads: Sequence[Mapping[str, Any]]) -> None:
    table = Table(title=title, title_justify="left")
    cols = ("players", "turns/s", "TTFT p50", "TTFT p95", "latency p50", "latency p95", "stall p95")
    for col in cols:
        table.add_column(col, justify="right")
    table.add_column("tokens", justify="right")
    table.add_column("errors", justify="right")
    for r in loads:
        table.add_row(
            str(r["players"]),
            f"{r['turns_per_s']:.3f}",
            f"{r['ttft_p50_ms']:.0f} ms",
            f"{r['ttft_p95_ms']:.0f} ms",
            f"{r['latency_p50_ms']:.0f} ms",
            f"{r['latency_p95_ms']:.0f} ms",
            f"{r.get('stall_p95_ms', float('nan')):.0f} ms",
            str(r.get("generated", "")),
            str(r["errors"]),
        )
    out.print(table)


class StageProgress:
    """Progress bars for named stages, fed by ``(stage, done, total)`` callbacks."""

    def __init__(self, enabled: bool = True) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self._progress = Progress(
            TextColumn("{task.description:<14}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
            disable=not enabled,
            transient=False,
        )
        self._tasks: dict[str, Any] = {}
        self._started = False

    def __enter__(self) -> StageProgress:
        return self  # the display starts with the first update: early errors print clean

    def __exit__(self, *exc: object) -> None:
        if self._started:
            self._progress.stop()

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self._started:
            self._progress.start()
            self._started = True
        task = self._tasks.get(stage)
        if task is None:
            task = self._tasks[stage] = self._progress.add_task(stage, total=total)
        self._progress.update(task, completed=done, total=total)


def convert_summary(report: Mapping[str, Any]) -> None:
    table = Table(title=f"bundle written: {report['out']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("quantization", str(report["quant"]))
    table.add_row("tensors", str(report["tensors"]))
    table.add_row(
        "LoRA pairs",
        str(report["lora_pairs"])
        + (
            f" (run-time adapter {report['adapter_file']})"
            if report["adapter_file"]
            else " (merged)"
            if report["lora_pairs"]
            else ""
        ),
    )
    table.add_row("flags", ", ".join(report["flags"]) or "(no heads: run `npcchat heads fit`)")
    fb = report["fallbacks"]
    table.add_row(
        "K-quant fallbacks",
        f"{len(fb)}"
        + (
            ": " + ", ".join(f"{f['tensor']}→{f['type']} (row {f['row']})" for f in fb[:6])
            if fb
            else ""
        ),
    )
    d = report["drift"]
    if d:
        table.add_row(
            "<STATE> cosine",
            f"min {d['cosine_min']:.5f}, mean {d['cosine_mean']:.5f} over {d['prompts']} prompts",
        )
        if d["head_max_abs_diff"] is not None:
            table.add_row("head outputs", f"largest difference {d['head_max_abs_diff']:.4f}")
            table.add_row("flag decisions", f"{d['flag_flips']} of {d['flag_decisions']} flip")
    for note in report["notes"]:
        table.add_row("note", note)
    table.add_row("time", f"{report['seconds']:.1f} s")
    out.print(table)


class EtaProgress:
    """One bar with an ETA, advanced per finished item."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        self._p = Progress(
            TextColumn("eval"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err,
            disable=not enabled,
        )
        self._task = self._p.add_task("eval", total=total)

    def __enter__(self) -> EtaProgress:
        self._p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._p.stop()

    def advance(self) -> None:
        self._p.advance(self._task)


class TrainProgress:
    """``npcchat train``'s display: a bar over the optimizer steps with the loss parts and
    the ETA, the held-out scores after each epoch, and the stages around them."""

    def __init__(self, enabled: bool = True) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.enabled = enabled
        self._p = Progress(
            TextColumn("train"),
            BarColumn(bar_width=16),
            MofNCompleteColumn(),
            TextColumn("{task.fields[loss]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err,
            disable=not enabled,
        )
        self._task: Any = None
        self._stages = StageProgress(enabled)

    def __enter__(self) -> TrainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._p.stop()
        self._stages.__exit__()

    def __call__(self, event: str, values: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        if event == "stage":
            if self._task is not None:  # training is over: its bar stays as it ended
                self._p.stop()
                self._task = None
            if "total" in values:
                self._stages(str(values["name"]), int(values["done"]), int(values["total"]))
            else:
                err.print(Text(f"· {values['name']}", style="dim"))
        elif event == "start":
            m = values["model"]
            err.print(
                f"{m['trainable_parameters']:,} trainable of {m['parameters']:,} parameters, "
                f"{m['device']}, {m['precision']}"
                + (f", {m['tokens_trained']} added tokens trained" if m["tokens_trained"] else "")
            )
            self._task = self._p.add_task(
                "train", total=values["total_steps"], completed=values["step"], loss=""
            )
            self._p.start()
        elif event == "step" and self._task is not None:
            parts = (
                f"loss {values['loss']:.3f} ("
                + " ".join(
                    f"{k} {values[k]:.2f}"
                    for k in ("lm", "delta", "flags", "thresholds")
                    if k in values
                )
                + ")"
            )
            self._p.update(self._task, completed=values["step"], loss=parts)
        elif event == "epoch":
            h = values.get("heldout")
            line = f"epoch {values['epoch']}"
            if h:
                line += (
                    f" · held out: loss {_f(h['loss']['loss'])}, lm {_f(h['loss']['lm'])}, "
                    f"delta MAE {_f(h['delta_mae'])}, flag F1 {_f(h['flag_f1_macro'])}"
                )
            best = " (best)" if values["best_epoch"] == values["epoch"] else ""
            self._p.console.print(line + best)


def train_summary(report: Mapping[str, Any]) -> None:
    table = Table(title=f"run: {report['out']}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("adapter", str(report["adapter"]))
    table.add_row("heads", f"{report['heads']} ({', '.join(report['flags'])})")
    if report["tokens_added"]:
        table.add_row("tokens added", ", ".join(report["tokens_added"]))
    t = report["train"]
    table.add_row(
        "data",
        f"{t['examples']} examples ({t['tokens']} tokens, {t['reply_tokens']} reply tokens), "
        f"{report['heldout_examples']} held out",
    )
    table.add_row("steps", f"{report['steps']} in {report['epochs']} epoch(s)")
    tps = report["tokens_per_s"]
    table.add_row(
        "speed",
        f"{report['train_seconds']:.1f} s of training" + (f", {tps:.0f} tokens/s" if tps else ""),
    )
    best = report["best"]
    if best:
        table.add_row(
            "best epoch",
            f"{report['best_epoch']}: held-out loss {_f(best['loss']['loss'])}, delta MAE "
            f"{_f(best['delta_mae'])}, flag F1 macro {_f(best['flag_f1_macro'])}",
        )
    b = report.get("bundle")
    if b:
        table.add_row("bundle", str(b["path"]))
        fit = b["heads_fit"]["held_out"]
        table.add_row("heads refit", f"flag F1 macro (held out) {_f(fit['flag_f1_macro'])}")
        table.add_row("first turn", str(b["smoke_turn"]["reply"])[:120])
    for note in report["notes"][:10]:
        table.add_row("note", str(note))
    out.print(table)
    if b:
        info(f"talk to it: npcchat talk --bundle {b['path']}")


def _f(x: Any) -> str:
    return "–" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def eval_summary(rep: Mapping[str, Any]) -> None:
    agg = rep["aggregates"]
    head = Table(
        title=f"npcchat eval · {rep['bundle']['name']}" + ("" if rep["complete"] else " (PARTIAL)"),
        show_header=False,
        title_justify="left",
    )
    head.add_column(style="bold")
    head.add_column(justify="right")
    r = agg["replies"]
    rows = [
        ("scenarios / turns", f"{agg['scenarios']} / {agg['turns']}"),
        ("errors / bad lines", f"{agg['errors']} / {agg['bad_lines']}"),
        ("flag F1 macro (model thr.)", _f(agg["flag_f1_macro"])),
        ("flag F1 macro (best thr., in-sample)", _f(agg["flag_best_f1_macro"])),
        ("Brier mean", _f(agg["brier_mean"])),
        ("threshold MAE", _f(agg["threshold_mae"])),
    ]
    for n in ("trust", "relationship"):
        d = agg["delta"][n]
        rows.append((f"{n}: MAE / sign agreement", f"{_f(d['mae'])} / {_f(d['sign_agreement'])}"))
    rows += [
        (
            "empty / truncated / leaked",
            f"{_f(r['empty_rate'])} / {_f(r['truncated_rate'])} / {_f(r['leak_rate'])}",
        ),
        ("exact match", _f(r["exact_match_rate"])),
        (f"similarity ({r['similarity_method']})", _f(r["similarity_mean"])),
        (
            "prefill p50 / p95 ms",
            f"{_f(agg['latency_ms']['prefill_p50'])} / {_f(agg['latency_ms']['prefill_p95'])}",
        ),
        (
            "generate p50 / p95 ms",
            f"{_f(agg['latency_ms']['generate_p50'])} / {_f(agg['latency_ms']['generate_p95'])}",
        ),
        ("tokens/s · scenarios/s", f"{_f(agg['tokens_per_s'])} · {_f(agg['scenarios_per_s'])}"),
    ]
    cluster = rep.get("ray")
    if cluster:
        nodes = len({w["node"].split(" (")[0] for w in cluster["workers"]})
        died = len(cluster["deaths"])
        rows.append(
            (
                "Ray actors (threads each) · nodes",
                f"{cluster['actors']} ({cluster['threads_per_actor']}) · {nodes}"
                + (f" · {died} died, rerun" if died else ""),
            )
        )
    for k, v in rows:
        head.add_row(k, v)
    out.print(head)
    flags = Table(show_header=True, header_style="bold")
    for col in ("flag", "n", "pos", "P", "R", "F1", "best thr", "best F1", "Brier"):
        flags.add_column(col, justify="right" if col != "flag" else "left")
    for n, v in agg["flags"].items():
        flags.add_row(
            n,
            str(v["n"]),
            str(v["positives"]),
            _f(v["precision"]),
            _f(v["recall"]),
            _f(v["f1"]),
            _f(v["best_threshold"]),
            _f(v["best_f1"]),
            _f(v["brier"]),
        )
    out.print(flags)
    rules = agg.get("rules")
    if rules:
        blocked = ", ".join(f"{k} {v}" for k, v in rules["blocked"].items()) or "none"
        actions = ", ".join(f"{k} {v}" for k, v in rules["actions"].items()) or "none"
        out.print(
            Text.assemble(
                ("rules ", "bold"),
                f"{rules['turns']} turns · blocked: {blocked} · guarded replies "
                f"{rules['guarded_turns']} · actions: {actions} · state changes "
                f"{rules['state_changes']} · reply checks {rules['check_interventions']}",
            )
        )


def compare_summary(result: Mapping[str, Any]) -> None:
    table = Table(title=f"{result['a']} → {result['b']}", title_justify="left")
    for col in ("metric", "A", "B", "B − A"):
        table.add_column(col, justify="left" if col == "metric" else "right")
    for name, m in result["metrics"].items():
        if m["a"] is None and m["b"] is None:
            continue
        diff = m["diff"]
        table.add_row(name, _f(m["a"]), _f(m["b"]), "–" if diff is None else f"{diff:+.4g}")
    out.print(table)
    changed = result["changed"]
    out.print(Text(f"{len(changed)} turns changed flags or deltas", style="bold"))
    for c in changed[:30]:
        dd = ", ".join(f"{k} {v:+.2f}" for k, v in c["delta_diff"].items())
        out.print(
            f"  {c['id']} turn {c['turn']}: flags {c['flags_a']} → {c['flags_b']}; delta {dd}"
        )


def fit_summary(result: Mapping[str, Any]) -> None:
    h = result["held_out"]
    out.print(
        Text.assemble(
            (f"heads written to {result['bundle']}", "bold"),
            f" · {result['records']} records ({result['train']} train / "
            f"{result['validation']} validation / {result['test']} held out)",
        )
    )
    table = Table(title="held-out metrics", title_justify="left")
    for col in ("flag", "n", "pos", "P", "R", "F1", "Brier", "threshold"):
        table.add_column(col, justify="left" if col in ("flag", "threshold") else "right")
    for name, v in h["flags"].items():
        table.add_row(
            name,
            str(v["n"]),
            str(v["positives"]),
            _f(v["precision"]),
            _f(v["recall"]),
            _f(v["f1"]),
            _f(v["brier"]),
            str(result["thresholds"].get(name, "")),
        )
    out.print(table)
    for name, d in h["delta"].items():
        out.print(f"{name}: MAE {_f(d['mae'])} · sign agreement {_f(d['sign_agreement'])}")
    out.print(f"flag F1 macro (held out): {_f(h['flag_f1_macro'])}")
    for note in result["notes"][:10]:
        warn(note)


def memories(items: Sequence[Any]) -> None:
    if not items:
        info(
            "(no memories yet: they form when old turns leave the context window, from "
            "the NPC's rules and from game events)"
        )
        return
    for m in items:
        line = Text(f"· {m.line}")
        if m.source != "turn":
            line.append(f"  ({m.source})", style="dim")
        out.print(line)


def flag_defs(flags: Sequence[str], defs: Mapping[str, Any]) -> None:
    table = Table(show_header=True, header_style="bold", box=None)
    for col in ("flag", "display", "threshold", "examples"):
        table.add_column(col)
    for name in flags:
        d = defs.get(name)
        thr = "learned" if d is None or d.threshold is None else f"{d.threshold:g} (NPC file)"
        table.add_row(name, d.display if d else "", thr, " | ".join(d.examples) if d else "")
    out.print(table)
