"""``npcchat convert``: PEFT LoRA adapter + heads -> a verified quantized bundle (no torch).

Registered into the ``npcchat`` command through the ``npcchat.commands`` entry point.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

import typer


def convert(
    base: Annotated[Path, typer.Option(help="Base model directory (Hugging Face layout, Qwen2).")],
    out: Annotated[
        Path, typer.Option(help="Bundle directory to create (must not exist or be empty).")
    ],
    adapter: Annotated[Path | None, typer.Option(help="PEFT LoRA adapter directory.")] = None,
    heads: Annotated[
        Path | None, typer.Option(help="Heads directory (*.pt or *.safetensors + flags.json).")
    ] = None,
    quant: Annotated[str, typer.Option(help="q4_k_m, q5_k_m, q6_k, q8_0, f16 or f32.")] = "q4_k_m",
    adapter_only: Annotated[
        bool,
        typer.Option(
            "--adapter-only",
            help="Write the LoRA as a GGUF adapter applied at run time (--lora) "
            "instead of merging.",
        ),
    ] = False,
    verify: Annotated[
        bool,
        typer.Option("--verify/--no-verify", help="Measure the drift the quantization causes."),
    ] = True,
    template: Annotated[
        str, typer.Option(help="Prompt template: built-in name or a .jinja file.")
    ] = "served-v1",
    threads: Annotated[int, typer.Option(help="Quantizer threads (0: all).")] = 0,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Merge a LoRA adapter into a Qwen2 base, quantize it with llama.cpp, convert the heads
    to ONNX and write a bundle that `talk` and `eval` run."""
    from npcchat import extras
    from npcchat.cli import ui

    extras.require("convert", "npcchat convert")
    from npcchat_convert.pipeline import Options
    from npcchat_convert.pipeline import convert as run

    opts = Options(
        base=base,
        out=out,
        adapter=adapter,
        heads=heads,
        quant=quant.lower(),
        adapter_only=adapter_only,
        verify=verify,
        template=template,
        threads=threads,
    )
    with ui.StageProgress(enabled=not json_out) as progress:
        report = run(opts, progress)
    data = asdict(report)
    if json_out:
        print(json.dumps(data))
    else:
        ui.convert_summary(data)
        if report.adapter_file:
            ui.info(f"use it with: npcchat talk --bundle {out} --lora {out / report.adapter_file}")


def register(app: typer.Typer) -> None:
    """Add ``npcchat convert`` to the CLI (entry point ``npcchat.commands``)."""
    app.command("convert")(convert)
