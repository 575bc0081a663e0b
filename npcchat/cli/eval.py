"""``npcchat eval``: scenario regression runs, state metrics, reports, CI gating;
``npcchat eval compare A.json B.json``: what changed between two reports."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from npcchat.cli import common

if TYPE_CHECKING:
    from npcchat import Config, SamplingParams, Scenario
    from npcchat.eval.scenarios import BadLine
    from npcchat.mind.npc import NpcDef
    from npcchat.runtime.bundle import Bundle


def eval_cmd(
    files: Annotated[
        list[str] | None,
        typer.Argument(help="Scenario JSONL files, or: compare A.json B.json", show_default=False),
    ] = None,
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
    top_k: Annotated[
        int | None,
        typer.Option(help="With --temperature: draw from the k most likely tokens (0: all)."),
    ] = None,
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
    npcs: Annotated[
        Path | None,
        typer.Option(
            help="NPC files by id: their knowledge, memory and triggers apply, as in talk."
        ),
    ] = None,
    examples: Annotated[
        bool,
        typer.Option(
            "--examples",
            help="Also run the examples of the --npcs files (flag examples, [[examples]]) "
            "as labelled cases.",
        ),
    ] = False,
    json_out: Annotated[
        bool, typer.Option("--json", help="Print the aggregates (or the comparison) as JSON.")
    ] = False,
    ray: common.RayFlag = False,
    ray_address: common.RayAddress = None,
    ray_actors: common.RayActors = None,
    config: Annotated[Path | None, typer.Option(help="Config TOML.")] = None,
) -> None:
    """Run scenarios through the same engine as `talk`; report replies, deltas and flags."""
    from npcchat.errors import ConfigError

    files = files or []
    if files and files[0] == "compare":
        if len(files) != 3:
            raise ConfigError("usage: npcchat eval compare A.json B.json")
        _compare(Path(files[1]), Path(files[2]), json_out)
        return
    if parallel < 1 or parallel > 64:
        raise ConfigError(f"--parallel {parallel}: expected 1..64")
    if examples and npcs is None:
        raise ConfigError("--examples runs the examples of NPC files: give --npcs DIR")
    if not files and not examples:
        raise ConfigError(
            "no scenario files given", hint="npcchat eval FILE.jsonl, or --npcs DIR --examples"
        )
    target = common.ray_target(ray, ray_address, ray_actors, threads)
    cfg = common.build_config(
        config,
        temperature=temperature,
        seed=seed,
        top_k=top_k,
        max_tokens=max_tokens,
        threads=threads,
        ctx=ctx,
        gpu_layers=gpu_layers,
        lora=lora,
        lora_scale=lora_scale,
    )
    run = Run(
        paths=[Path(f) for f in files],
        bundle=bundle,
        parallel=parallel,
        report=report,
        html=html_out,
        fail_under=fail_under or [],
        strict=strict,
        resume=resume,
        embed_model=embed_model,
        npcs=npcs,
        json_out=json_out,
        share_prefix=share_prefix,
        ray=target,
        examples=examples,
    )
    try:
        _run(cfg, run)
    except KeyboardInterrupt:  # before any scenario ran (a run keeps its partial report)
        from npcchat.cli import ui

        ui.warn("interrupted before any scenario ran; nothing written")
        raise typer.Exit(130) from None


@dataclass(frozen=True)
class Run:
    """What the command line asked of one eval run."""

    paths: list[Path]
    bundle: Path | None
    parallel: int
    report: Path | None
    html: Path | None
    fail_under: list[str]
    strict: bool
    resume: Path | None
    embed_model: Path | None
    npcs: Path | None
    json_out: bool
    share_prefix: bool
    ray: common.RayTarget | None = None
    examples: bool = False


def _scenarios(run: Run) -> tuple[list[Scenario], list[BadLine]]:
    """Every good scenario of the files; bad lines are warnings (fatal with --strict)."""
    import npcchat
    from npcchat.cli import ui
    from npcchat.errors import ConfigError

    found: list[Scenario] = []
    bad: list[BadLine] = []
    for p in run.paths:
        good, wrong = npcchat.read_scenarios(p)
        found += good
        bad += wrong
    if run.examples and run.npcs is not None:
        from npcchat.eval import examples
        from npcchat.mind import npc as npc_mod

        found += examples.scenarios(npc_mod.load_dir(run.npcs).values())
    for b in bad:
        if run.strict:
            raise ConfigError(
                f"{b.source}: {b.reason}", hint="fix the line, or drop --strict to skip bad lines"
            )
        ui.warn(f"skipped {b}")
    return found, bad


def _run(cfg: Config, run: Run) -> None:
    from npcchat.api import sampling_of
    from npcchat.cli import ui
    from npcchat.errors import ConfigError
    from npcchat.eval import report as report_mod
    from npcchat.eval import runner, similarity
    from npcchat.mind import npc as npc_mod

    found, bad = _scenarios(run)
    if not found and run.resume is None:  # before a model loads or a Ray runtime starts
        raise ConfigError(_nothing(bad))
    prior: list[dict[str, Any]] = []
    report_path = run.report
    resumed = report_mod.load_report(run.resume) if run.resume is not None else None
    sim_name = similarity.name_of(run.embed_model)
    s = cfg.sampling
    knowledge = cfg.knowledge.embed_model
    settings = {
        "files": [str(p) for p in run.paths],
        "examples": run.examples,
        "parallel": run.parallel,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "repeat_penalty": s.repeat_penalty,
        "seed": s.seed,
        "max_tokens": s.max_tokens,
        "n_ctx": cfg.runtime.n_ctx,
        "similarity": sim_name,
        "knowledge_ranking": f"sentence-transformers:{Path(knowledge).name}"
        if knowledge
        else "lexical",
        "prefix_reuse": "aligned" if run.share_prefix else "off",
        "npcs": str(run.npcs) if run.npcs else None,
    }
    npc_files = npc_mod.load_dir(run.npcs) if run.npcs else None
    _without_npc(found, npc_files, run.strict)
    results: list[dict[str, Any]] = []
    elapsed = runner.timer()
    complete = True
    slots = max(1, min(run.parallel, len(found) or 1))
    with _where(cfg, run, slots, sampling_of(cfg, s.seed), npc_files) as ex:
        report_mod.validate_gates(run.fail_under, ex.bundle.flags)  # before the run, not after
        found, mislabelled = _labels_of_bundle(found, ex.bundle.flags, run.strict)
        bad += mislabelled
        _npc_flag_warnings(found, npc_files, ex.bundle.flags)
        if resumed is not None and run.resume is not None:
            identity = ex.bundle.identity
            prior = report_mod.check_resumable(resumed, run.resume, identity, settings)
            done = {s["id"] for s in prior}
            found = [s for s in found if s.id not in done]
            results = list(prior)
            report_path = report_path or run.resume
        if not found and not prior:
            raise ConfigError(_nothing(bad))
        with ui.EtaProgress(len(found), enabled=not run.json_out) as progress:

            def finished(result: dict[str, Any]) -> None:
                results.append(result)
                progress.advance()

            try:
                ex.evaluate(found, finished)
            except KeyboardInterrupt:
                complete = False
        order = {sc.id: i for i, sc in enumerate(found)}
        results.sort(key=lambda r: order.get(r["id"], -1))
        rep = report_mod.build(ex.bundle, results, bad, settings, elapsed(), complete, sim_name)
        cluster = ex.cluster()
        if cluster is not None:
            rep["ray"] = cluster
            for d in cluster["deaths"]:
                ui.warn(
                    f"Ray actor {d['actor']} on {d['node']} died ({d['error']}); "
                    f"its {d['rerun']} unfinished scenarios ran again on another actor"
                )
    if not complete and report_path is None:
        report_path = Path("eval-report.partial.json")
    if report_path is not None:
        _write(report_path, json.dumps(rep, ensure_ascii=False, indent=1))
    if run.html is not None:
        from npcchat.eval import html

        _write(run.html, html.render(rep))
    if run.json_out:
        summary = {"complete": complete, "aggregates": rep["aggregates"], "gates": rep["gates"]}
        print(json.dumps(summary))
    else:
        ui.eval_summary(rep)
    if not complete:
        ui.warn(
            f"interrupted: {len(results)} scenarios kept in {report_path}; "
            f"continue with --resume {report_path}"
        )
        raise typer.Exit(130)
    failures = report_mod.check_gates(rep["gates"], run.fail_under)
    for f in failures:
        ui.fail(f)
    if failures:
        raise typer.Exit(1)


def _without_npc(found: list[Scenario], npcs: dict[str, NpcDef] | None, strict: bool) -> None:
    """Say once which NPC ids have no NPC file: their scenarios run on their own state
    alone (no knowledge, triggers or memory), which is easy to miss. Fatal with --strict."""
    from npcchat.cli import ui
    from npcchat.errors import ConfigError

    ids = sorted({sc.npc_id for sc in found if not sc.npc_file and sc.npc_id not in (npcs or {})})
    if not ids:
        return
    shown = ", ".join(repr(i) for i in ids[:10]) + (
        f" and {len(ids) - 10} more" if len(ids) > 10 else ""
    )
    message = (
        f"no NPC file for NPC id {shown} (no npc_file in the scenario, no --npcs entry): "
        "those scenarios run on their own state alone, without an NPC's knowledge, "
        "triggers or memory"
    )
    if strict:
        raise ConfigError(message, hint="give --npcs DIR or a scenario npc_file, or drop --strict")
    ui.warn(message)


def _labels_of_bundle(
    found: list[Scenario], flags: tuple[str, ...], strict: bool
) -> tuple[list[Scenario], list[BadLine]]:
    """Scenarios whose labels name a flag the bundle lacks are bad lines (a typo would
    be scored as nothing); fatal with --strict."""
    from npcchat.cli import ui
    from npcchat.errors import ConfigError
    from npcchat.eval.scenarios import BadLine, unknown_flags

    kept: list[Scenario] = []
    bad: list[BadLine] = []
    for sc in found:
        reason = unknown_flags(sc, flags)
        if reason is None:
            kept.append(sc)
            continue
        if strict:
            raise ConfigError(
                f"{sc.source}: {reason}", hint="fix the line, or drop --strict to skip bad lines"
            )
        bad.append(BadLine(sc.source, reason))
        ui.warn(f"skipped {bad[-1]}")
    return kept, bad


def _npc_flag_warnings(
    found: list[Scenario], npcs: dict[str, NpcDef] | None, flags: tuple[str, ...]
) -> None:
    """Warn once per NPC file that configures a flag the bundle does not have."""
    from npcchat.cli import ui
    from npcchat.errors import ConfigError
    from npcchat.mind import npc as npc_mod

    defs = list((npcs or {}).values())
    for path in sorted({sc.npc_file for sc in found if sc.npc_file}):
        try:
            defs.append(npc_mod.load(Path(path)))
        except ConfigError:
            continue  # the scenario reports its own NPC file's error
    for npc in defs:
        for warning in npc_mod.flag_warnings(npc, flags):
            ui.warn(warning)


def _nothing(bad: list[BadLine]) -> str:
    return "no scenarios to run" + (f" ({len(bad)} bad lines)" if bad else "")


@dataclass
class _Where:
    """Where the scenarios run: the runtime of this process, or Ray actors. ``evaluate``
    takes the scenarios and the callback for each result; ``cluster`` is the report's
    ``ray`` part after a Ray run."""

    bundle: Bundle
    evaluate: Callable[[list[Scenario], Callable[[dict[str, Any]], None]], None]
    cluster: Callable[[], dict[str, Any] | None] = lambda: None


@contextmanager
def _where(
    cfg: Config,
    run: Run,
    slots: int,
    sampling: SamplingParams,
    npcs: dict[str, NpcDef] | None,
) -> Iterator[_Where]:
    import npcchat

    if run.ray is None:
        from npcchat.eval.similarity import choose_similarity

        sim = choose_similarity(run.embed_model)  # the workers of a Ray run build their own
        with npcchat.load(run.bundle, config=cfg, slots=slots) as rt:

            def local(found: list[Scenario], on_result: Callable[[dict[str, Any]], None]) -> None:
                rt.evaluate(
                    found,
                    sampling=sampling,
                    similarity=sim,
                    on_result=on_result,
                    share_prefix=run.share_prefix,
                    npcs=npcs,
                )

            yield _Where(rt.bundle, local)
        return
    from npcchat import demo
    from npcchat.cluster.eval import RayRun

    c = run.ray
    ray_run = RayRun(run.bundle or demo.default_bundle(), cfg, c.address, c.actors, c.threads)

    def on_ray(found: list[Scenario], on_result: Callable[[dict[str, Any]], None]) -> None:
        ray_run.evaluate(
            found,
            sampling=sampling,
            slots=slots,
            embed_model=run.embed_model,
            on_result=on_result,
            share_prefix=run.share_prefix,
            npcs=npcs,
        )

    try:
        yield _Where(ray_run.bundle, on_ray, lambda: ray_run.summary or None)
    finally:
        ray_run.close()


def _write(path: Path, text: str) -> None:
    """Atomically, with Ctrl-C held back: the report keeps this run's results."""
    from npcchat.files.atomic import atomic_write, uninterrupted

    with uninterrupted():
        atomic_write(path, text.encode("utf-8"))


def _compare(a_path: Path, b_path: Path, json_out: bool) -> None:
    from npcchat.cli import ui
    from npcchat.eval import report

    result = report.compare(a_path, b_path)
    if json_out:
        print(json.dumps(result, ensure_ascii=False))
    else:
        ui.compare_summary(result)
