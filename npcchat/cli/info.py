"""``npcchat info``: versions and build features, for bug reports and GPU set-ups."""

from __future__ import annotations

import json
from typing import Annotated

import typer


def info(
    json_out: Annotated[bool, typer.Option("--json", help="Print as JSON.")] = False,
) -> None:
    """Versions, llama.cpp build features (CPU, GPU backends, threads), extras, demo path."""
    import npcchat
    from npcchat.cli import ui

    data = npcchat.info()
    if json_out:
        print(json.dumps(data))
    else:
        ui.info_table(data)
