"""``npcchat eval``: scenario regression runs, state metrics, reports, CI gating;
``npcchat eval compare A.json B.json``: what changed between two reports."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer


def eval_cmd(
    files: Annotated[
        list[str],
        typer.Argument(help="Scenario JSONL files, or: compare A.json B.json", show_default=False),
    ],
    bundle: Annotated[Path | None, typer.Option(help="Model bundle directory.")] = None,
    parallel: Annotated[
        int, typer.Option(help="Scenarios run at once (sequences in one llama.cpp context).")
    ] = 1,
    report: Annotated[
        Path | None, typer.Option("--report", help="Write the full JSON report here.")
    ] = None,
    html_out: Annotated[
        Path | None, typer.Option("--html", help="Write a self-contained HTML report here.")
    ] = None,
    fail_under: Annotated[
        list[str] | None,
        typer.Option(
            "--fail-under",
            help="METRIC=VALUE; exit 1 when missed (error metrics: at most). Repeatable.",
        ),
    ] = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Any bad scenario line is fatal.")
    ] = False,
    share_prefix: Annotated[
        bool,
        typer.Option(
            "--share-prefix/--no-share-prefix",
            help="Decode a prompt head that scenarios share once (same results, faster).",
        ),
    ] = True,
    resume: Annotated[
        Path | None, typer.Option(help="Continue a partial report (skips finished scenarios).")
    ] = None,
    temperature: Annotated[
        float, typer.Option(help="Sampling temperature (0: deterministic).")
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    max_tokens: Annotated[int | None, typer.Option(help="Most reply tokens per turn.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    ctx: Annotated[int | None, typer.Option(help="Context size per scenario, in tokens.")] = None,
    gpu_layers: Annotated[int | None, typer.Option(help="Layers to offload to a GPU.")] = None,
    lora: Annotated[
        Path | None, typer.Option(help="GGUF LoRA adapter applied at run time.")
    ] = None,
    lora_scale: Annotated[float | None, typer.Option(help="Scale of --lora.")] = None,
    embed_model: Annotated[
        Path | None, typer.Option(help="Local sentence-transformers model for reply similarity.")
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the aggregates (or the comparison) as JSON.")
    ] = False,
    config: Annotated[Path | None, typer.Option(help="Config TOML.")] = None,
) -> None:
    """Run scenarios through the same engine as `talk`; report replies, deltas and flags."""
    from npcchat.errors import ConfigError

    if files and files[0] == "compare":
        if len(files) != 3:
            raise ConfigError("usage: npcchat eval compare A.json B.json")
        _compare(Path(files[1]), Path(files[2]), json_out)
        return
    if parallel < 1 or parallel > 64:
        raise ConfigError(f"--parallel {parallel}: expected 1..64")
    from npcchat.cli import common

    cfg = common.build_config(config, temperature=temperature, seed=seed, max_tokens=max_tokens, threads=threads,
                              ctx=ctx, gpu_layers=gpu_layers, lora=lora, lora_scale=lora_scale)  # fmt: skip
    _run(cfg, [Path(f) for f in files], bundle, parallel, report, html_out, fail_under or [], strict, resume,
         embed_model, json_out, share_prefix)  # fmt: skip


def _run(cfg: Any, paths: list[Path], bundle: Path | None, parallel: int, report_path: Path | None,
         html_path: Path | None, fail_under: list[str], strict: bool, resume: Path | None,
         embed_model: Path | None, json_out: bool, share_prefix: bool) -> None:  # fmt: skip
    from npcchat import evaluate, scenarios, similarity
    from npcchat.cli import common, ui
    from npcchat.errors import ConfigError
    from npcchat.types import SamplingParams

    found, bad = [], []
    for p in paths:
        good, wrong = scenarios.read(p)
        found += good
        bad += wrong
    for b in bad:
        if strict:
            raise ConfigError(
                f"{b.source}: {b.reason}", hint="fix the line, or drop --strict to skip bad lines"
            )
        ui.warn(f"skipped {b}")
    prior: list[dict[str, Any]] = []
    if resume is not None:
        prior = evaluate.load_report(resume)["scenarios"]
        done = {s["id"] for s in prior}
        found = [s for s in found if s.id not in done]
        report_path = report_path or resume
    if not found and not prior:
        raise ConfigError("no scenarios to run" + (f" ({len(bad)} bad lines)" if bad else ""))
    sim = similarity.choose(embed_model)
    s = cfg.sampling
    sampling = SamplingParams(s.temperature, s.top_p, s.repeat_penalty, s.max_tokens, s.seed)
    settings = {"files": [str(p) for p in paths], "parallel": parallel, "temperature": s.temperature, "seed": s.seed,
                "max_tokens": s.max_tokens, "n_ctx": cfg.runtime.n_ctx, "similarity": sim.name,
                "knowledge_ranking": f"sentence-transformers:{Path(cfg.knowledge.embed_model).name}"
                if cfg.knowledge.embed_model else "lexical",
                "prefix_reuse": "aligned" if share_prefix else "off"}  # fmt: skip
    results = list(prior)
    elapsed = evaluate.timer()
    complete = True
    from npcchat.engine import Engine

    the_bundle = common.load_bundle(bundle)
    evaluate.validate_gates(fail_under, the_bundle.flags)  # before the run, not after it
    with Engine.load(the_bundle, cfg, n_seq=max(1, min(parallel, len(found)))) as engine:
        with ui.EtaProgress(len(found), enabled=not json_out) as progress:

            def finished(result: dict[str, Any]) -> None:
                results.append(result)
                progress.advance()

            try:
                evaluate.run(engine, found, sampling, sim, finished, share_prefix)
            except KeyboardInterrupt:
                complete = False
        order = {sc.id: i for i, sc in enumerate(found)}
        results.sort(key=lambda r: order.get(r["id"], -1))
        rep = evaluate.report(engine, results, bad, settings, elapsed(), complete, sim.name)
    if not complete and report_path is None:
        report_path = Path("eval-report.partial.json")
    if report_path is not None:
        _write(report_path, json.dumps(rep, ensure_ascii=False, indent=1))
    if html_path is not None:
        from npcchat import report_html

        _write(html_path, report_html.render(rep))
    if json_out:
        print(
            json.dumps(
                {"complete": complete, "aggregates": rep["aggregates"], "gates": rep["gates"]}
            )
        )
    else:
        ui.eval_summary(rep)
    if not complete:
        ui.warn(
            f"interrupted: {len(results)} scenarios kept in {report_path}; continue with --resume {report_path}"
        )
        raise typer.Exit(130)
    failures = evaluate.check_gates(rep["gates"], fail_under)
    for f in failures:
        ui.err.print(f"[bold red]fail:[/bold red] {f}")
    if failures:
        raise typer.Exit(1)


def _write(path: Path, text: str) -> None:
    from npcchat.session import atomic_write

    atomic_write(path, text.encode("utf-8"))


def _compare(a_path: Path, b_path: Path, json_out: bool) -> None:
    from npcchat import evaluate
    from npcchat.cli import ui

    a, b = evaluate.load_report(a_path), evaluate.load_report(b_path)
    metrics = {}
    for name in sorted(set(a["gates"]) | set(b["gates"])):
        va, vb = a["gates"].get(name), b["gates"].get(name)
        metrics[name] = {
            "a": va,
            "b": vb,
            "diff": (vb - va) if va is not None and vb is not None else None,
        }
    changed = _changed_scenarios(a["scenarios"], b["scenarios"])
    result = {"a": str(a_path), "b": str(b_path), "metrics": metrics, "changed": changed}
    if json_out:
        print(json.dumps(result, ensure_ascii=False))
    else:
        ui.compare_summary(result)


def _changed_scenarios(
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
                out.append({"id": s["id"], "turn": i, "player": tb["player"], "flags_a": sorted(fa),
                            "flags_b": sorted(fb), "delta_diff": dd})  # fmt: skip
    return out
