"""``npcchat bench``: turn cost as ratios against plain llama.cpp, measured in one run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Measure npcchat against plain llama.cpp in one run, or a server under load.",
    add_completion=False,
)


@app.callback(invoke_without_command=True)
def bench(
    context: typer.Context,
    bundle: Annotated[Path | None, typer.Option(help="Model bundle directory.")] = None,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length to measure with.")] = 400,
    tokens: Annotated[int, typer.Option(help="Reply tokens per turn.")] = 64,
    repeats: Annotated[int, typer.Option(help="Timed repetitions (median is reported).")] = 3,
    rss: Annotated[
        bool, typer.Option("--rss/--no-rss", help="Measure peak RSS in child processes.")
    ] = True,
    extras: Annotated[
        bool,
        typer.Option(
            "--multi-turn/--no-multi-turn",
            help="Also: 10-turn prefill and TTFT, snapshot resume, eval at parallel 1 and 8.",
        ),
    ] = True,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    ctx: Annotated[int | None, typer.Option(help="Context size in tokens.")] = None,
    gpu_layers: Annotated[int | None, typer.Option(help="Layers to offload to a GPU.")] = None,
    lora: Annotated[
        Path | None, typer.Option(help="GGUF LoRA adapter applied at run time.")
    ] = None,
    lora_scale: Annotated[float | None, typer.Option(help="Scale of --lora.")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    config: Annotated[Path | None, typer.Option(help="Config TOML.")] = None,
) -> None:
    """Measure prefill/decode speed, heads time, turn overhead and memory against llama.cpp
    (``npcchat bench serve``: simulated players against a real server)."""
    if context.invoked_subcommand is not None:
        return
    from npcchat import demo
    from npcchat.bench import measure as bench_mod
    from npcchat.cli import common, ui
    from npcchat.runtime.engine import load_engine

    cfg = common.build_config(
        config, threads=threads, ctx=ctx, gpu_layers=gpu_layers, lora=lora, lora_scale=lora_scale
    )
    with load_engine(bundle or demo.default_bundle(), cfg) as engine:
        report = bench_mod.run(engine, cfg, prompt_tokens, tokens, repeats, rss, extras)
    if json_out:
        print(json.dumps(report))
    else:
        ui.kv_table(f"npcchat bench · {report['bundle']} ({report['quant']})", report)


@app.command("rules")
def rules_bench(
    bundle: Annotated[Path | None, typer.Option(help="Model bundle directory.")] = None,
    npc: Annotated[
        Path | None, typer.Option(help="NPC file with rules (default: the demo blacksmith).")
    ] = None,
    turns: Annotated[int, typer.Option(help="Turns per measurement.")] = 20,
    json_out: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    config: Annotated[Path | None, typer.Option(help="Config TOML.")] = None,
) -> None:
    """What the NPC's rules cost per turn, and reply checks while generating (tokens/s with
    and without), each against its baseline in the same run."""
    from npcchat import demo
    from npcchat.bench import rules as rules_bench_mod
    from npcchat.cli import common, ui
    from npcchat.errors import ConfigError
    from npcchat.runtime.engine import load_engine

    if not 1 <= turns <= 1000:
        raise ConfigError(f"--turns {turns}: expected 1..1000")
    cfg = common.build_config(config)
    path = npc or demo.root() / "npcs" / "village_blacksmith.toml"
    with load_engine(bundle or demo.default_bundle(), cfg) as engine:
        report = rules_bench_mod.run(engine, path, turns)
    if json_out:
        print(json.dumps(report))
    else:
        ui.kv_table("npcchat bench rules", report)


@app.command("serve")
def serve(
    bundle: Annotated[Path | None, typer.Option(help="Model bundle directory.")] = None,
    players: Annotated[str, typer.Option(help="Player counts to run, comma-separated.")] = (
        "1,4,8,16"
    ),
    turns: Annotated[int, typer.Option(help="Turns per player at each count.")] = 3,
    tokens: Annotated[int, typer.Option(help="Reply tokens per turn.")] = 64,
    slots: Annotated[int, typer.Option(help="The server's --slots.")] = 8,
    queue: Annotated[
        int | None, typer.Option(help="The server's --queue (default: the most players).")
    ] = None,
    peer: Annotated[
        Path | None,
        typer.Option(
            help="A llama-server binary (`make peer` builds one): the same players against it "
            "on the bundle's GGUF, measured after npcchat, with the ratios."
        ),
    ] = None,
    gpu_layers: Annotated[
        int | None, typer.Option(help="Layers to offload to a GPU, on both sides.")
    ] = None,
    stagger: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=60.0,
            help="Seconds between two players' starts (0: all at once); staggered players' "
            "prompts join while other replies stream.",
        ),
    ] = 0.0,
    prefill_chunk: Annotated[
        int | None,
        typer.Option(
            min=16, max=1 << 16, help="The server's runtime.prefill_chunk (default: the config's)."
        ),
    ] = None,
    paired: Annotated[
        int,
        typer.Option(
            min=0,
            max=100,
            help="With --peer: rounds of one player against each side in alternation, both "
            "servers up (the one-player ratio without the drift between two loads).",
        ),
    ] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
) -> None:
    """N players in closed loop against a real `npcchat serve` on loopback: turns/s,
    p50/p95 time to first token and latency, HTTP overhead, the server's peak RSS; with
    --peer, the same against llama-server."""
    from npcchat import demo, extras
    from npcchat.bench import serve_load
    from npcchat.cli import ui
    from npcchat.errors import ConfigError

    extras.require("serve", "npcchat bench serve")
    try:
        counts = [int(p) for p in players.split(",") if p.strip()]
    except ValueError:
        raise ConfigError(f"--players {players}: expected numbers like 1,4,8,16") from None
    if not counts or min(counts) < 1:
        raise ConfigError(f"--players {players}: expected numbers like 1,4,8,16")
    if paired and peer is None:
        raise ConfigError("--paired needs --peer", hint="--peer PATH_TO_LLAMA_SERVER")
    if peer is not None and not (peer.is_file() and os.access(peer, os.X_OK)):
        raise ConfigError(f"--peer {peer}: not an executable file", hint="make peer builds one")
    report = serve_load.run(
        bundle or demo.default_bundle(),
        counts,
        turns,
        tokens,
        slots,
        queue,
        peer=peer,
        gpu_layers=gpu_layers,
        stagger=stagger,
        prefill_chunk=prefill_chunk,
        paired=paired,
    )
    if json_out:
        print(json.dumps(report))
    else:
        ui.serve_bench(report)


@app.command("ray")
def ray_bench(
    bundle: Annotated[Path | None, typer.Option(help="Model bundle directory.")] = None,
    scenarios: Annotated[int, typer.Option(help="Eval scenarios (one NPC's).")] = 16,
    tokens: Annotated[int, typer.Option(help="Reply tokens per scenario.")] = 64,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length of each scenario.")] = 400,
    parallel: Annotated[int, typer.Option(help="--parallel, locally and per actor.")] = 1,
    local_threads: Annotated[
        int, typer.Option(help="Threads of the local run (0: llama.cpp's default).")
    ] = 0,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster (default: $RAY_ADDRESS, else this machine).")
    ] = None,
    ray_actors: Annotated[int | None, typer.Option(help="Ray actors (default: CPUs).")] = None,
    threads: Annotated[int, typer.Option(help="CPU threads per actor.")] = 1,
    json_out: Annotated[bool, typer.Option("--json", help="Print the figures as JSON.")] = False,
    config: Annotated[Path | None, typer.Option(help="Config TOML.")] = None,
) -> None:
    """The same eval scenarios here and on Ray actors: scenarios/s and their ratio, actor
    start, load time and memory, bytes per scenario, and whether the results are equal."""
    from npcchat import demo, extras
    from npcchat.cli import common, ui
    from npcchat.errors import ConfigError

    extras.require("ray", "npcchat bench ray")
    if scenarios < 1 or tokens < 1 or not 1 <= parallel <= 64 or threads < 1:
        raise ConfigError("--scenarios, --tokens, --threads: at least 1; --parallel: 1..64")
    from npcchat.cluster import bench as ray_bench_mod

    report = ray_bench_mod.run(
        bundle or demo.default_bundle(),
        common.build_config(config),
        scenarios=scenarios,
        gen_tokens=tokens,
        prompt_tokens=prompt_tokens,
        slots=parallel,
        local_threads=local_threads,
        address=ray_address,
        actors=ray_actors,
        threads=threads,
    )
    if json_out:
        print(json.dumps(report))
    else:
        ui.kv_table("npcchat bench ray", report)
