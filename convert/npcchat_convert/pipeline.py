"""``npcchat convert``: base (+ adapter) (+ heads) -> a verified bundle directory.

Everything is written into a hidden staging directory next to ``--out`` and renamed into
place only when complete, so a failure (a full disk included) never leaves a half-written
bundle that looks finished, and an existing directory is never overwritten.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from npcchat.errors import ConvertError, NpcchatError
from npcchat.runtime.bundle import Bundle, write_manifest
from npcchat.runtime.bundle import load as load_bundle
from npcchat.runtime.prompt import (
    NPC_TAG,
    SCAFFOLD_TAGS,
    STATE_TAG,
    PromptTemplate,
    builtin_template,
    load_template,
)

from . import lora_gguf
from .hf import Tokenizer
from .lora import read_adapter
from .model import QUANTS, fallbacks, open_source, write_gguf
from .verify import Drift, drift

Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class Options:
    base: Path
    out: Path
    adapter: Path | None = None
    heads: Path | None = None
    quant: str = "q4_k_m"
    adapter_only: bool = False
    verify: bool = True
    template: str = "served-v1"  # a built-in name or a .jinja file
    threads: int = 0
    name: str | None = None


@dataclass(frozen=True)
class Report:
    out: str
    quant: str
    tensors: int
    fallbacks: list[dict[str, Any]]
    lora_pairs: int
    adapter_file: str | None
    flags: list[str]
    drift: dict[str, Any] | None
    seconds: float
    notes: list[str] = field(default_factory=list)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def check_scaffold(tokenizer: Tokenizer, template: PromptTemplate) -> None:
    """Every scaffold tag the template uses (and `<STATE>`, `<NPC>` always) must be a special
    added token: found now, with the fix named, not when the bundle is first loaded."""
    special = {content for content, is_special in tokenizer.added.values() if is_special}
    plain = {content for content, is_special in tokenizer.added.values() if not is_special}
    used = {tag for tag in SCAFFOLD_TAGS if tag in template.source} | {STATE_TAG, NPC_TAG}
    for tag in sorted(used - special):
        what = "a non-special added token" if tag in plain else "not an added token"
        raise ConvertError(
            f"tokenizer.json: scaffold tag {tag} is {what}; template '{template.name}' needs "
            "it as one special token",
            hint='add it to the tokenizer with "special": true and train with it',
        )


def template_of(spec: str) -> PromptTemplate:
    p = Path(spec)
    return load_template(p) if p.suffix == ".jinja" or p.is_file() else builtin_template(spec)


def _sources(opts: Options) -> dict[str, Any]:
    """Hashes of what the bundle was made from (small files only; weights by size)."""
    src: dict[str, Any] = {"base": str(opts.base.resolve())}
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        if (opts.base / f).is_file():
            src[f"base_{f}"] = _sha256(opts.base / f)
    if opts.adapter:
        src["adapter"] = str(opts.adapter.resolve())
        for f in ("adapter_config.json", "adapter_model.safetensors"):
            src[f"adapter_{f}"] = _sha256(opts.adapter / f)
    return src


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(
            f"{out}: already exists and is not empty; npcchat never overwrites it",
            hint="choose another --out or remove the old bundle first",
        )


def convert(opts: Options, progress: Progress | None = None) -> Report:
    t0 = time.perf_counter()
    if opts.quant not in QUANTS:
        raise ConvertError(
            f"--quant {opts.quant}: unknown", hint=f"choose one of {', '.join(QUANTS)}"
        )
    _check_out(opts.out)
    # Read and cross-check every input before writing a byte.
    adapter = read_adapter(opts.adapter) if opts.adapter else None
    if opts.adapter_only and adapter is None:
        raise ConvertError("--adapter-only needs --adapter DIR")
    src = open_source(opts.base, None if opts.adapter_only else adapter)
    hidden = src.ckpt.config.hidden_size
    heads = None
    if opts.heads:
        from npcchat_heads import loader

        heads = loader.load(opts.heads, hidden)
    template = template_of(opts.template)
    check_scaffold(src.tokenizer, template)
    stage = opts.out.parent / f".{opts.out.name}.partial-{os.getpid()}"
    shutil.rmtree(stage, ignore_errors=True)
    try:
        stage.mkdir(parents=True)
        report = _build(opts, src, adapter, heads, template, stage, progress)
        opts.out.parent.mkdir(parents=True, exist_ok=True)
        if opts.out.exists():
            opts.out.rmdir()  # empty (checked above)
        os.replace(stage, opts.out)
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        why = "no space left on device" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        raise ConvertError(
            f"{opts.out}: writing the bundle failed ({why}); nothing was left behind"
        ) from None
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return Report(**{**asdict(report), "out": str(opts.out), "seconds": time.perf_counter() - t0})


def _build(
    opts: Options,
    src: Any,
    adapter: Any,
    heads: Any,
    template: PromptTemplate,
    stage: Path,
    progress: Progress | None,
) -> Report:
    name = opts.name or opts.out.name
    hidden = src.ckpt.config.hidden_size
    notes = list(adapter.notes) if adapter else []
    total = len(src.ckpt.names())
    done = [0]

    def tick(_tensor: str) -> None:
        done[0] += 1
        if progress:
            progress("merge + write", done[0], total)

    unquant_type = "f32" if opts.quant == "f32" else "f16"
    model_file = stage / "model.gguf"
    unquant = model_file if opts.quant in ("f32", "f16") else stage / f"model-{unquant_type}.gguf"
    n_tensors = write_gguf(src, unquant, unquant_type, name, tick)
    if unquant != model_file:
        from npcchat.runtime.backend import quantize  # llama.cpp loads only when a bundle quantizes

        quantize(
            unquant,
            model_file,
            opts.quant,
            opts.threads,
            lambda d, t: progress and progress("quantize", d, t),
        )
    lora_pairs, adapter_file = 0, None
    if opts.adapter_only and adapter is not None:
        lora_pairs = lora_gguf.write(adapter, stage / "adapter.gguf")
        adapter_file = "adapter.gguf"
    elif adapter is not None:
        lora_pairs = len(adapter.pairs)
    flags: list[str] = []
    if heads is not None:
        from npcchat_heads import onnx_builder

        weights, flags, head_sources = heads
        onnx_builder.write(weights, flags, stage / "heads.onnx")
    extra: dict[str, Any] = {"source": _sources(opts)}
    if heads is not None:
        extra["source"]["heads"] = head_sources
    if adapter_file:
        extra["adapter"] = {
            "file": adapter_file,
            "sha256": _sha256(stage / adapter_file),
            "pairs": lora_pairs,
        }
    fb = [{"tensor": n, "type": t, "row": r} for n, t, r in fallbacks(model_file, opts.quant)]
    extra["convert"] = {"fallbacks": len(fb), "tensors": n_tensors}
    write_manifest(
        stage,
        name=name,
        gguf="model.gguf",
        heads="heads.onnx" if heads else None,
        template=template,
        flags=flags,
        hidden_size=hidden,
        quant=opts.quant,
        extra=extra,
    )
    result: Drift | None = None
    if opts.verify and unquant != model_file and not opts.adapter_only:
        if progress:
            progress("verify", 0, 1)
        result = _verify(stage, unquant)
        if progress:
            progress("verify", 1, 1)
    if unquant != model_file:
        unquant.unlink()
    return Report(
        out=str(stage),
        quant=opts.quant,
        tensors=n_tensors,
        fallbacks=fb,
        lora_pairs=lora_pairs,
        adapter_file=adapter_file,
        flags=flags,
        drift=asdict(result) if result else None,
        seconds=0.0,
        notes=notes,
    )


def _verify(stage: Path, unquant: Path) -> Drift:
    quantized: Bundle = load_bundle(stage)
    try:
        return drift(unquant, quantized)
    except NpcchatError as e:
        raise ConvertError(
            f"verify failed: {e.message}", hint="--no-verify skips this check"
        ) from None
