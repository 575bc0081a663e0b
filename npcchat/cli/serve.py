"""``npcchat serve``: the HTTP endpoint a game server calls (FastAPI on uvicorn)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def serve(
    bundle: Annotated[Path | None, typer.Option(help="Model bundle directory.")] = None,
    npcs: Annotated[
        Path | None,
        typer.Option(help="Directory of NPC files served by their id (default: the demo's)."),
    ] = None,
    sessions: Annotated[
        Path | None,
        typer.Option(help="Session files, one per player and NPC ($NPCCHAT_HOME/sessions)."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8000,
    slots: Annotated[int, typer.Option(help="Turns generated side by side.")] = 4,
    queue: Annotated[
        int | None, typer.Option(help="Turns that may wait for a slot (default: --slots).")
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="NPCCHAT_API_KEY", help="Bearer token clients must send ($NPCCHAT_API_KEY)."
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option("--insecure", help="Allow a non-loopback address without --api-key."),
    ] = False,
    max_body: Annotated[int, typer.Option(help="Largest request body, in bytes.")] = 256 * 1024,
    max_text: Annotated[int, typer.Option(help="Longest player line, in characters.")] = 2000,
    ctx: Annotated[int | None, typer.Option(help="Context size per slot, in tokens.")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    gpu_layers: Annotated[int | None, typer.Option(help="Layers to offload to a GPU.")] = None,
    top_k: Annotated[
        int | None,
        typer.Option(help="Draw from the k most likely tokens (0: all; default 50)."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    config: Annotated[Path | None, typer.Option(help="Config TOML.")] = None,
) -> None:
    """Serve NPC turns over HTTP: the game's /v1/turn (JSON or SSE), OpenAI's
    /v1/chat/completions, /api/predict_main, sessions and game events, /healthz and
    /metrics; the playground at /ui, OpenAPI docs at /docs."""
    from npcchat import extras
    from npcchat.errors import ConfigError

    extras.require("serve", "npcchat serve")
    if host not in LOOPBACK and not api_key and not insecure:
        raise ConfigError(
            f"--host {host}: refusing to serve beyond this machine without --api-key",
            hint="pass --api-key KEY (or set NPCCHAT_API_KEY), or --insecure on purpose",
        )
    if not 1024 <= max_body <= 64 * 1024 * 1024:
        raise ConfigError(f"--max-body {max_body}: expected 1024..67108864 bytes")
    if not 1 <= max_text <= 2000:  # the schema's own bound (npcchat.serve.schemas.MAX_TEXT)
        raise ConfigError(f"--max-text {max_text}: expected 1..2000")
    if not 1 <= slots <= 64:
        raise ConfigError(f"--slots {slots}: expected 1..64")
    if queue is not None and queue < 0:
        raise ConfigError(f"--queue {queue}: expected 0 or more")
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port}: expected 1..65535")
    import uvicorn

    import npcchat
    from npcchat import demo
    from npcchat.cli import common, ui
    from npcchat.config import home
    from npcchat.serve.app import Settings, create_app
    from npcchat.serve.store import SessionStore, npc_registry

    cfg = common.build_config(config, threads=threads, gpu_layers=gpu_layers, ctx=ctx, top_k=top_k)
    root = sessions or home() / "sessions"
    with npcchat.load(bundle, config=cfg, slots=slots) as rt:
        served = npc_registry(npcs, demo.is_demo_bundle(rt.bundle.root))
        store = SessionStore(rt, served, root)
        for warning in store.warnings():
            ui.warn(warning)
        rt.start_batching(queue)
        app = create_app(rt, store, Settings(api_key, max_body, max_text), npcs_dir=npcs)
        where = f"http://{host}:{port}" if ":" not in host else f"http://[{host}]:{port}"
        ui.info(
            f"npcchat serve · bundle {rt.bundle.name} · {len(served)} NPCs · {slots} slots · "
            f"sessions in {root} · {where} (docs at {where}/docs)"
        )
        try:
            uvicorn.run(
                app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10
            )
        finally:
            if store.runtime is not rt:  # a reload's bundle: the `with` closes the first one
                store.runtime.close()
