"""``npcchat train``: LoRA plus state heads on the runtime's own prompts (needs the ``train``
extra). Registered into the ``npcchat`` command through the ``npcchat.commands`` entry point.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from npcchat.errors import ConfigError

LORA = "LoRA"
RUN = "Run"
LOSS = "Loss"
OUT = "Output"


def _pattern(text: str | None, what: str, conv: type) -> dict[str, float]:
    """``q_proj=8,v_proj=4`` -> {"q_proj": 8, "v_proj": 4} (PEFT's rank/alpha patterns)."""
    out: dict[str, float] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        try:
            if not sep or not key.strip():
                raise ValueError
            out[key.strip()] = conv(value)
        except ValueError:
            raise ConfigError(
                f"{what} {part.strip()!r}: expected MODULE=NUMBER[,MODULE=NUMBER...]"
            ) from None
    return out


def train(
    data: Annotated[
        list[Path],
        typer.Argument(
            help="Records eval reads (nested, flat or multi-turn JSONL).", show_default=False
        ),
    ],
    base: Annotated[Path, typer.Option(help="Base model directory (Hugging Face layout, Qwen2).")],
    out: Annotated[Path, typer.Option(help="Run directory (adapter/, heads/, checkpoints).")],
    npcs: Annotated[
        Path | None, typer.Option(help="NPC files, applied to records by their npc_id.")
    ] = None,
    examples: Annotated[
        bool, typer.Option("--examples", help="Also train on the --npcs files' examples.")
    ] = False,
    heldout_file: Annotated[
        list[Path] | None,
        typer.Option(help="Held-out records (default: a share of DATA, see --heldout)."),
    ] = None,
    heldout: Annotated[
        float, typer.Option(help="Share of DATA's scenarios held out for scoring.")
    ] = 0.1,
    template: Annotated[
        str, typer.Option(help="The bundle's prompt template: built-in name or a .jinja file.")
    ] = "served-v1",
    flags: Annotated[
        str | None, typer.Option(help="Flag names in head order (default: as the data names them).")
    ] = None,
    epochs: Annotated[int, typer.Option(rich_help_panel=RUN)] = 3,
    max_steps: Annotated[
        int,
        typer.Option(help="Stop after this many optimizer steps (0: none).", rich_help_panel=RUN),
    ] = 0,
    batch_size: Annotated[int, typer.Option(rich_help_panel=RUN)] = 4,
    grad_accum: Annotated[
        int, typer.Option(help="Batches per optimizer step.", rich_help_panel=RUN)
    ] = 1,
    lr: Annotated[float, typer.Option(help="LoRA learning rate.", rich_help_panel=RUN)] = 2e-4,
    heads_lr: Annotated[
        float, typer.Option(help="The heads' learning rate.", rich_help_panel=RUN)
    ] = 1e-3,
    warmup: Annotated[
        float, typer.Option(help="Share of the steps warming up.", rich_help_panel=RUN)
    ] = 0.05,
    weight_decay: Annotated[float, typer.Option(rich_help_panel=RUN)] = 0.0,
    seed: Annotated[int, typer.Option(rich_help_panel=RUN)] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.", rich_help_panel=RUN)] = "auto",
    precision: Annotated[
        str,
        typer.Option(help="auto (bf16 on GPUs that have it), fp32 or bf16.", rich_help_panel=RUN),
    ] = "auto",
    qlora: Annotated[
        bool,
        typer.Option("--qlora", help="4-bit base (CUDA + bitsandbytes).", rich_help_panel=LORA),
    ] = False,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out.", rich_help_panel=RUN)
    ] = False,
    best_by: Annotated[
        str,
        typer.Option(
            help="Keep the epoch best by: loss, flag_f1_macro or delta_mae.", rich_help_panel=RUN
        ),
    ] = "loss",
    lora_r: Annotated[int, typer.Option(rich_help_panel=LORA)] = 16,
    lora_alpha: Annotated[float, typer.Option(rich_help_panel=LORA)] = 32.0,
    lora_dropout: Annotated[float, typer.Option(rich_help_panel=LORA)] = 0.05,
    lora_targets: Annotated[
        str, typer.Option(help="Module names, comma-separated.", rich_help_panel=LORA)
    ] = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
    rank_pattern: Annotated[
        str | None, typer.Option(help="Per-module ranks: q_proj=8,v_proj=4.", rich_help_panel=LORA)
    ] = None,
    alpha_pattern: Annotated[
        str | None, typer.Option(help="Per-module alphas: q_proj=16.", rich_help_panel=LORA)
    ] = None,
    rslora: Annotated[
        bool, typer.Option("--rslora", help="Scale by alpha/sqrt(r).", rich_help_panel=LORA)
    ] = False,
    lm_weight: Annotated[float, typer.Option(rich_help_panel=LOSS)] = 1.0,
    delta_weight: Annotated[float, typer.Option(rich_help_panel=LOSS)] = 4.0,
    flags_weight: Annotated[float, typer.Option(rich_help_panel=LOSS)] = 1.0,
    thresholds_weight: Annotated[float, typer.Option(rich_help_panel=LOSS)] = 1.0,
    flag_pos_weight: Annotated[
        float, typer.Option(help="Weight of a positive flag label.", rich_help_panel=LOSS)
    ] = 4.0,
    bundle: Annotated[
        Path | None,
        typer.Option(
            help="Also convert, quantize, refit the heads and write a bundle here.",
            rich_help_panel=OUT,
        ),
    ] = None,
    quant: Annotated[
        str, typer.Option(help="The bundle's quantization.", rich_help_panel=OUT)
    ] = "q4_k_m",
    skip_bad_lines: Annotated[
        bool, typer.Option("--skip-bad-lines", help="Train on the good lines of a file.")
    ] = False,
    threads: Annotated[int | None, typer.Option(help="CPU threads.")] = None,
    config: Annotated[Path | None, typer.Option(help="Config TOML (budgets, n_ctx).")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Fine-tune a Qwen2 base with LoRA and train the state heads on `<STATE>`, on prompts
    rendered by the runtime itself; writes what `npcchat convert` reads (and, with
    --bundle, the bundle)."""
    from npcchat import extras

    extras.require("train", "npcchat train")
    from npcchat.cli import common, ui
    from npcchat_train.loop import LoopSettings
    from npcchat_train.model import LoraSettings
    from npcchat_train.run import TrainOptions
    from npcchat_train.run import train as run
    from npcchat_train.state_heads import LossWeights

    if threads:
        import torch

        torch.set_num_threads(threads)
    cfg = common.build_config(config, threads=threads)
    names = tuple(f.strip() for f in flags.split(",") if f.strip()) if flags else None
    opts = TrainOptions(
        data=tuple(data),
        base=base,
        out=out,
        npcs=npcs,
        examples=examples,
        heldout_files=tuple(heldout_file or ()),
        heldout=heldout,
        template=template,
        flags=names,
        lora=LoraSettings(
            r=lora_r,
            alpha=lora_alpha,
            dropout=lora_dropout,
            targets=tuple(t.strip() for t in lora_targets.split(",") if t.strip()),
            rank_pattern={
                k: int(v) for k, v in _pattern(rank_pattern, "--rank-pattern", int).items()
            },
            alpha_pattern=_pattern(alpha_pattern, "--alpha-pattern", float),
            rslora=rslora,
        ),
        loop=LoopSettings(
            epochs=epochs,
            max_steps=max_steps,
            batch_size=batch_size,
            grad_accum=grad_accum,
            lr=lr,
            heads_lr=heads_lr,
            warmup=warmup,
            weight_decay=weight_decay,
            lm_weight=lm_weight,
            weights=LossWeights(delta_weight, flags_weight, thresholds_weight, flag_pos_weight),
            best_by=best_by,
            seed=seed,
        ),
        device=device,
        precision=precision,
        qlora=qlora,
        resume=resume,
        strict=not skip_bad_lines,
        bundle=bundle,
        quant=quant.lower(),
    )
    with ui.TrainProgress(enabled=not json_out) as progress:
        report = run(opts, cfg, progress)
    if json_out:
        print(json.dumps(report, default=str))
    else:
        ui.train_summary(report)


def register(app: typer.Typer) -> None:
    """Add ``npcchat train`` to the CLI (entry point ``npcchat.commands``)."""
    app.command("train")(train)
