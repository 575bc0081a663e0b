"""``npcchat heads fit``: refit the heads on the bundle's own (quantized) GGUF.

Registered into the ``npcchat`` command through the ``npcchat.commands`` entry point.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Annotated

import typer

from npcchat.cli import common

app = typer.Typer(help="Work on a bundle's heads.", no_args_is_help=True, add_completion=False)


@app.command("fit")
def fit(
    data: Annotated[
        list[Path],
        typer.Argument(help="Labelled JSONL records (nested or flat form).", show_default=False),
    ],
    bundle: Annotated[
        Path | None, typer.Option(help="Bundle whose GGUF gives the <STATE> vectors.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Write a new bundle here instead of updating --bundle.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the train/validation/test split.")] = 0,
    l2: Annotated[float, typer.Option(help="L2 regularization strength.")] = 1.0,
    test_frac: Annotated[
        float, typer.Option(help="Share of records held out for the metrics.")
    ] = 0.2,
    flags: Annotated[
        str | None, typer.Option(help="Flag names in head order (default: the bundle's).")
    ] = None,
    npcs: Annotated[
        Path | None,
        typer.Option(help="NPC files, applied to records by their npc_id (as eval does)."),
    ] = None,
    strict: Annotated[bool, typer.Option("--strict", help="Any bad line is fatal.")] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    ray: common.RayFlag = False,
    ray_address: common.RayAddress = None,
    ray_actors: common.RayActors = None,
    config: Annotated[Path | None, typer.Option(help="Config TOML.")] = None,
) -> None:
    """Collect <STATE> vectors through the same one-prefill path as talk, fit the delta,
    flag and threshold heads with numpy, and write them into the bundle."""
    from npcchat import demo, extras
    from npcchat.cli import ui

    extras.require("convert", "npcchat heads fit")
    if bundle is None and out is None and demo.is_demo_bundle(demo.default_bundle()):
        from npcchat.errors import ConfigError

        raise ConfigError(
            "npcchat heads fit: no --bundle given, and the default is the demo bundle inside "
            "the installed package",
            hint="pass --bundle DIR to refit a bundle of yours, or --out DIR for a new one",
        )
    from npcchat_heads.refit import fit_bundle

    cfg = common.build_config(config, threads=threads)
    names = [f.strip() for f in flags.split(",") if f.strip()] if flags else None
    root = bundle or demo.default_bundle()
    target = common.ray_target(ray, ray_address, ray_actors, threads)
    known = None
    if npcs is not None:
        if target is not None:
            from npcchat.errors import ConfigError

            raise ConfigError(
                "--npcs with --ray: not supported yet",
                hint="fit on this machine, or give each record its npc_file",
            )
        from npcchat.mind import npc as npc_mod

        known = npc_mod.load_dir(npcs)
    with contextlib.ExitStack() as stack:
        vectors = None
        if target is not None:
            from npcchat.cluster.eval import RayRun

            ray_run = RayRun(root, cfg, target.address, target.actors, target.threads)
            stack.callback(ray_run.close)
            vectors = ray_run.states
        with ui.StageProgress(enabled=not json_out) as progress:
            result = fit_bundle(
                root,
                data,
                out,
                cfg,
                seed=seed,
                l2=l2,
                test_frac=test_frac,
                flags_given=names,
                strict=strict,
                progress=lambda d, t: progress("state vectors", d, t),
                vectors=vectors,
                npcs=known,
            )
        if target is not None:
            result["ray"] = ray_run.summary
    if json_out:
        print(json.dumps(result))
    else:
        ui.fit_summary(result)


def register(root: typer.Typer) -> None:
    """Add ``npcchat heads ...`` to the CLI (entry point ``npcchat.commands``)."""
    root.add_typer(app, name="heads")
