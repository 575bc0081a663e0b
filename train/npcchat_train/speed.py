"""Training speed and memory, one prepared run: ``python -m npcchat_train.speed``.

A random-weight Qwen2 of a real size (the tiny factory's ``qwen2.5-0.5b`` or
``qwen2.5-1.5b`` preset, made locally: nothing is downloaded) is trained with LoRA for a
fixed number of steps on the shipped sample records, once per precision (fp32, and bf16
where the device has it), each run timed by ``npcchat train`` itself (tokens/s of the
optimizer steps; peak GPU memory on CUDA). The last run goes on through ``--bundle`` to a
bundle that plays a turn. ``summary.json`` in ``--out`` holds every figure, written after
each run, so a run cut short still leaves what finished.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--preset", default="qwen2.5-0.5b")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--precisions", default="auto", help="comma list, or auto (fp32 + bf16)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--quant", default="q4_k_m")
    args = ap.parse_args(argv)

    import torch

    from npcchat.config import Config
    from npcchat_convert.tiny import make_checkpoint

    from .loop import LoopSettings
    from .model import pick_device
    from .run import TrainOptions, train

    device = pick_device(args.device)
    if args.precisions == "auto":
        bf16 = device == "cuda" and torch.cuda.is_bf16_supported()
        precisions = ["fp32", "bf16"] if bf16 else ["fp32"]
    else:
        precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"base-{args.preset}"
    t0 = time.perf_counter()
    if not (base / "config.json").is_file():
        # as a stock base: no npcchat tags (the run adds them in the spare embedding rows,
        # and trains those rows), bf16 weights
        make_checkpoint(base, args.preset, seed=0, dtype="bf16", scaffold=False)
    summary: dict[str, Any] = {
        "preset": args.preset,
        "device": device,
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "base_seconds": round(time.perf_counter() - t0, 1),
        "runs": {},
    }
    for i, precision in enumerate(precisions):
        last = i == len(precisions) - 1
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        opts = TrainOptions(
            data=(REPO / "configs" / "scenarios" / "labelled_sample.jsonl",),
            base=base,
            out=out / f"run-{precision}",
            npcs=REPO / "configs" / "npcs",
            template="reuse-v1",
            heldout=0.1,
            loop=LoopSettings(epochs=100, max_steps=args.steps, batch_size=args.batch_size),
            device=device,
            precision=precision,
            bundle=out / f"bundle-{args.quant}" if last else None,
            quant=args.quant,
        )
        t = time.perf_counter()
        report = train(opts, Config())
        run = {
            "tokens_per_s": report["tokens_per_s"],
            "tokens": report["tokens"],
            "train_seconds": report["train_seconds"],
            "wall_seconds": round(time.perf_counter() - t, 1),
            "peak_gpu_memory_mb": report.get("peak_gpu_memory_mb"),
            "heldout_loss": report["best"]["loss"]["loss"] if report["best"] else None,
        }
        if report.get("bundle"):
            run["bundle"] = {
                "path": report["bundle"]["path"],
                "smoke_reply": report["bundle"]["smoke_turn"]["reply"][:80],
            }
        summary["runs"][precision] = run
        (out / "summary.json").write_text(json.dumps(summary, indent=2), "utf-8")
        print(json.dumps({precision: run}), flush=True)
    if "fp32" in summary["runs"] and "bf16" in summary["runs"]:
        a, b = summary["runs"]["bf16"], summary["runs"]["fp32"]
        summary["bf16_over_fp32_tokens_per_s"] = a["tokens_per_s"] / b["tokens_per_s"]
        (out / "summary.json").write_text(json.dumps(summary, indent=2), "utf-8")


if __name__ == "__main__":
    main()
