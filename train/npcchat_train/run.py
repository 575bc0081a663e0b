"""``npcchat train``: records + a Qwen2 base -> LoRA adapter + state heads (+ a bundle).

The run directory holds everything a run makes and needs to continue:

* ``settings.json``: the options, the fingerprint of the inputs and the tags added; a
  ``--resume`` with other options or other data is refused (it would not continue *this* run);
* ``prompts.jsonl``: every training and held-out example as the runtime renders it;
* ``adapter/`` (PEFT, the tokenizer beside it when tags were added), ``heads/``
  (``*_head.safetensors`` + ``flags.json``): the best epoch's, exactly what
  ``npcchat convert --adapter --heads`` reads;
* ``checkpoint/``: the resumable state; ``log.jsonl``: each step's loss parts and each
  epoch's held-out scores; ``report.json``: the summary;
* with ``--bundle OUT``: the bundle (convert, quantize, heads refitted on the quantized
  model, verified, one turn played).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from npcchat.config import Config
from npcchat.errors import ConfigError
from npcchat.files.atomic import atomic_write

from . import data as data_mod
from .loop import LoopSettings
from .model import LoraSettings, settings_dict

Progress = Callable[[str, dict[str, Any]], None]  # (event, values): "step", "epoch", "stage"


@dataclass(frozen=True)
class TrainOptions:
    data: tuple[Path, ...]
    base: Path
    out: Path
    npcs: Path | None = None
    examples: bool = False  # also the NPC files' own examples
    heldout_files: tuple[Path, ...] = ()  # held-out records (else a share of --data)
    heldout: float = 0.1
    template: str = "served-v1"
    flags: tuple[str, ...] | None = None
    lora: LoraSettings = field(default_factory=LoraSettings)
    loop: LoopSettings = field(default_factory=LoopSettings)
    device: str = "auto"
    precision: str = "auto"
    qlora: bool = False
    resume: bool = False
    strict: bool = True
    bundle: Path | None = None
    quant: str = "q4_k_m"

    def fingerprint(self, cfg: Config) -> dict[str, Any]:
        """What decides the run's result: a resumed run must have the same (the records,
        the NPC files, the base's config and tokenizer, the runtime's budgets)."""

        def sha(paths: list[Path]) -> str:
            digest = hashlib.sha256()
            for p in paths:
                digest.update(p.name.encode() + b"\0" + p.read_bytes())
            return digest.hexdigest()

        base_files = [
            self.base / f
            for f in ("config.json", "tokenizer.json", "tokenizer_config.json")
            if (self.base / f).is_file()
        ]
        npc_files = sorted(self.npcs.glob("*.toml")) if self.npcs and self.npcs.is_dir() else []
        return {
            "data_sha256": sha([*self.data, *self.heldout_files]),
            "base": str(self.base.resolve()),
            "base_sha256": sha(base_files),
            "npcs": str(self.npcs.resolve()) if self.npcs else None,
            "npcs_sha256": sha(npc_files),
            "runtime": {
                "n_ctx": cfg.runtime.n_ctx,
                "max_tokens": cfg.sampling.max_tokens,
                "knowledge": asdict(cfg.knowledge),
            },
            "examples": self.examples,
            "heldout": self.heldout,
            "template": self.template,
            "flags": list(self.flags) if self.flags else None,
            "lora": settings_dict(self.lora),
            "loop": {**asdict(self.loop), "weights": asdict(self.loop.weights)},
            "qlora": self.qlora,
        }


def check_out(opts: TrainOptions, cfg: Config) -> None:
    out = opts.out
    settings = out / "settings.json"
    if opts.resume:
        if not settings.is_file():
            raise ConfigError(
                f"--resume: {out} holds no run to continue", hint="start it without --resume"
            )
        try:
            old = json.loads(settings.read_text("utf-8"))["fingerprint"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(
                f"{settings}: not the settings of an npcchat train run",
                hint="start a new run with another --out",
            ) from None
        new = opts.fingerprint(cfg)
        changed = sorted(k for k in new if new[k] != old.get(k))
        if changed:
            raise ConfigError(
                f"--resume: {out} was started with other {', '.join(changed)}",
                hint="resume with the options and data it started with, or start a new --out",
            )
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(
            f"--out {out}: already exists and is not empty; npcchat never overwrites a run",
            hint="--resume continues it; or choose another --out",
        )
    if opts.bundle is not None and opts.bundle.exists() and any(opts.bundle.iterdir()):
        raise ConfigError(f"--bundle {opts.bundle}: already exists and is not empty")


def train(opts: TrainOptions, cfg: Config, progress: Progress | None = None) -> dict[str, Any]:
    """The whole run; returns the report (also written to ``report.json``). Ctrl-C during
    training saves a checkpoint (:class:`npcchat_train.loop.Interrupted`); anywhere else it
    ends the run with the same one-line kind of message."""
    from .loop import Interrupted

    try:
        return _train(opts, cfg, progress)
    except KeyboardInterrupt:
        if (opts.out / "report.json").is_file():
            raise Interrupted(
                f"interrupted while making the bundle; the trained adapter and heads are in "
                f"{opts.out}",
                hint=f"convert them by hand: npcchat convert --base {opts.base} --adapter "
                f"{opts.out / 'adapter'} --heads {opts.out / 'heads'} --out BUNDLE",
            ) from None
        if (opts.out / "checkpoint" / "state.json").is_file():
            raise Interrupted(
                f"interrupted; the last checkpoint is in {opts.out / 'checkpoint'}",
                hint="run the same command with --resume to continue",
            ) from None
        raise Interrupted("interrupted before training began; no checkpoint was written") from None


def _train(opts: TrainOptions, cfg: Config, progress: Progress | None) -> dict[str, Any]:
    from npcchat.api import sampling_of
    from npcchat_convert.hf import read_config
    from npcchat_convert.pipeline import template_of

    from . import records, tokens
    from .loop import Trainer
    from .model import TrainModel, pick_device, pick_precision

    def tell(event: str, **values: Any) -> None:
        if progress:
            progress(event, values)

    opts.loop.check()
    opts.lora.check()
    for p in (*opts.data, *opts.heldout_files):
        if not p.is_file():
            raise ConfigError(f"{p}: file not found", hint="give JSONL records eval reads")
    if opts.bundle is not None:
        from npcchat_convert.model import QUANTS

        if opts.quant not in QUANTS:
            raise ConfigError(f"--quant {opts.quant}: expected one of {', '.join(QUANTS)}")
    check_out(opts, cfg)
    device = pick_device(opts.device)
    precision = pick_precision(opts.precision, device)
    if opts.qlora:
        from .model import check_qlora

        check_qlora(device)
    hf = read_config(opts.base)  # a Qwen2 directory, checked before torch loads it
    template = template_of(opts.template)
    tok = tokens.prepare(opts.base, template)
    tell("stage", name="render prompts")
    scenarios, notes = data_mod.read_records(opts.data, opts.strict)
    npcs = data_mod.npc_files(opts.npcs)
    if opts.examples:
        if not npcs:
            raise ConfigError("--examples trains on the NPC files' examples: give --npcs DIR")
        from npcchat.eval import examples as npc_examples

        scenarios += npc_examples.scenarios(npcs.values())
    if opts.heldout_files:
        held_sc, held_notes = data_mod.read_records(opts.heldout_files, opts.strict)
        train_sc, notes = scenarios, notes + held_notes
    else:
        train_sc, held_sc = data_mod.split(scenarios, opts.heldout, opts.loop.seed)
    flags = data_mod.flag_names([*train_sc, *held_sc], opts.flags)
    engine = tokens.render_engine(tok, template, flags, hf.hidden_size, cfg, opts.out)
    sampling = sampling_of(cfg, 0)

    def skipped(sc: Any, why: str) -> None:
        notes.append(f"skipped {sc.source}: {why}")

    on_error = None if opts.strict else skipped
    train_ex = list(records.examples(engine, train_sc, npcs, sampling, on_error))
    held_ex = list(records.examples(engine, held_sc, npcs, sampling, on_error))
    train_items = data_mod.encode(train_ex, tok, flags, sampling.max_tokens)
    held_items = data_mod.encode(held_ex, tok, flags, sampling.max_tokens)
    data_mod.check_labelled(train_items, "training")
    fit_records = data_mod.fit_records([*train_sc, *held_sc], [*train_ex, *held_ex])
    if opts.bundle is not None and len(fit_records) < data_mod.MIN_FIT_RECORDS:
        raise ConfigError(
            f"--bundle refits the heads on labelled single-turn records: the data has "
            f"{len(fit_records)}, at least {data_mod.MIN_FIT_RECORDS} are needed",
            hint="add single-turn records, or train without --bundle and convert by hand",
        )
    tell(
        "stage",
        name="load model",
        train=(train_summary := data_mod.summary(train_items)),
        heldout=len(held_items),
    )
    model = TrainModel(
        opts.base,
        tok.n_vocab,
        tok.added_ids,
        len(flags),
        opts.lora,
        device,
        precision,
        opts.qlora,
        opts.loop.seed,
    )
    extra = tok.files if tok.added else {}
    opts.out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(model, train_items, held_items, flags, opts.loop, opts.out, extra)
    if not (opts.resume and trainer.resume()):
        # written once the model is loaded: a run that never got this far left nothing
        # behind, and one stopped before its first checkpoint restarts with --resume
        settings = {
            "fingerprint": opts.fingerprint(cfg),
            "data": [str(p) for p in opts.data],
            "heldout_files": [str(p) for p in opts.heldout_files],
            "heldout": sorted({ex.source for ex in held_ex}),
            "flags": list(flags),
            "tokens_added": list(tok.added),
            "device": device,
            "precision": precision,
        }
        atomic_write(opts.out / "settings.json", json.dumps(settings, indent=2).encode())
        with (opts.out / "prompts.jsonl").open("w", encoding="utf-8") as fh:
            for split, exs in (("train", train_ex), ("heldout", held_ex)):
                for ex in exs:
                    fh.write(json.dumps({"split": split, **ex.to_json()}, ensure_ascii=False))
                    fh.write("\n")
    tell("start", total_steps=trainer.total_steps, step=trainer.step, model=model.describe())
    summary = trainer.run(
        on_step=lambda r: tell("step", **r), on_epoch=lambda r: tell("epoch", **r)
    )
    report: dict[str, Any] = {
        "out": str(opts.out),
        "adapter": str(opts.out / "adapter"),
        "heads": str(opts.out / "heads"),
        "flags": list(flags),
        "tokens_added": list(tok.added),
        "train": train_summary,
        "heldout_examples": len(held_items),
        "model": model.describe(),
        "notes": notes,
        **summary,
    }
    if device == "cuda":
        import torch

        report["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    write_report(opts.out, report)  # the training's result stands whatever --bundle does
    if opts.bundle is not None:
        del model, trainer  # the torch model's memory, before llama.cpp loads the bundle
        from .bundle import make_bundle

        tell("stage", name="bundle")
        report["bundle"] = make_bundle(opts, cfg, list(flags), fit_records, npcs, progress)
        write_report(opts.out, report)
    return report


def write_report(out: Path, report: dict[str, Any]) -> None:
    atomic_write(out / "report.json", json.dumps(report, indent=2, default=str).encode())
