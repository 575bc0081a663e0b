"""The ``npcchat`` command. One module per command; heavy imports (llama_cpp, onnxruntime,
numpy-heavy code) happen inside the command functions, so ``npcchat --help`` stays fast.
"""

from __future__ import annotations

import os
import sys

import typer

from npcchat.cli import bench, convert, eval, heads, talk

app = typer.Typer(
    name="npcchat",
    help="Local-first NPC dialogue: replies plus game-state changes from one llama.cpp prefill.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("talk")(talk.talk)
app.command("bench")(bench.bench)
app.command("convert")(convert.convert)
app.command("eval")(eval.eval_cmd)
app.add_typer(heads.app, name="heads")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 1."""
    from npcchat.errors import NpcchatError

    try:
        app()
    except NpcchatError as e:
        if os.environ.get("NPCCHAT_DEBUG") == "1":
            raise
        from npcchat.cli import ui

        ui.error(e)
        sys.exit(e.exit_code)
