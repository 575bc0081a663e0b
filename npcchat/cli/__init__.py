"""The ``npcchat`` command: a thin client of the public API (:mod:`npcchat`).

One module per command. Heavy imports (llama_cpp, onnxruntime, numpy-heavy code) happen
inside the command functions, so ``npcchat --help`` stays fast. Commands of the packages
above the runtime (``npcchat convert`` from ``npcchat_convert``, ``npcchat heads`` from
``npcchat_heads``) are found through the ``npcchat.commands`` entry points, so nothing in
``npcchat`` imports those packages: the imports run one way.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points
from typing import Annotated

import typer

from npcchat import __version__
from npcchat.cli import bench, eval, info, serve, talk

app = typer.Typer(
    name="npcchat",
    help="Local-first NPC dialogue: replies plus game-state changes from one llama.cpp prefill.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        print(f"npcchat {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Local-first NPC dialogue: replies plus game-state changes from one llama.cpp prefill."""


app.command("talk")(talk.talk)
app.command("eval")(eval.eval_cmd)
app.add_typer(bench.app, name="bench")
app.command("serve")(serve.serve)
app.command("info")(info.info)


def _plugins() -> None:
    """Let installed packages add commands (``register(app)`` under ``npcchat.commands``)."""
    for ep in sorted(entry_points(group="npcchat.commands"), key=lambda e: e.name):
        try:
            ep.load()(app)
        except Exception as e:  # a broken plugin must not take the other commands down
            if os.environ.get("NPCCHAT_DEBUG") == "1":
                raise
            print(f"npcchat: command '{ep.name}' is unavailable ({e})", file=sys.stderr)


_plugins()


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 1."""
    from npcchat.errors import NpcchatError

    # a player's line that is not valid UTF-8 reads as U+FFFD, never as an encoding crash
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")
    try:
        app()
    except NpcchatError as e:
        if os.environ.get("NPCCHAT_DEBUG") == "1":
            raise
        from npcchat.cli import ui

        ui.error(e)
        sys.exit(e.exit_code)
