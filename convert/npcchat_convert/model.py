"""HF Qwen2 checkpoint (+ PEFT LoRA) -> GGUF -> quantized GGUF.

Tensors are produced one at a time (read base tensor, add ``scale * B @ A``, write, drop),
so peak memory is a few tensors. The quantizer is llama.cpp's own
(``llama_model_quantize`` through npcchat.backend, the one module importing llama_cpp).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from npcchat.errors import ConvertError

from . import gguf_out
from .hf import Checkpoint, Tokenizer, read_tokenizer
from .lora import Adapter, check_against

QUANTS = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16", "f32")
K_QUANTS = ("q4_k_m", "q5_k_m", "q6_k")
EMBED, HEAD = "model.embed_tokens.weight", "lm_head.weight"


@dataclass(frozen=True)
class Source:
    """A base checkpoint and, optionally, an adapter merged into it."""

    ckpt: Checkpoint
    adapter: Adapter | None
    tokenizer: Tokenizer

    @property
    def n_vocab(self) -> int:
        return self.shape(EMBED)[0]

    def shape(self, name: str) -> tuple[int, ...]:
        if self.adapter is not None and (s := self.adapter.full_shape(name)) is not None:
            return s
        return self.ckpt.shape(name)

    def tensor(self, name: str) -> np.ndarray:
        """The merged tensor: the adapter's full copy or the base, plus its LoRA delta."""
        full = self.adapter.full_tensor(name) if self.adapter else None
        w = full if full is not None else self.ckpt.get(name)
        if self.adapter is not None:
            d = self.adapter.delta(name, tuple(w.shape))
            if d is not None:
                w = w.astype(np.float32) + d
        return w


def open_source(base: Path, adapter: Adapter | None) -> Source:
    """Open and cross-check base and adapter before anything is written."""
    ckpt = Checkpoint(base)
    names = set(ckpt.names())
    for required in (EMBED, "model.norm.weight"):
        if required not in names:
            raise ConvertError(f"{base}: tensor {required} is missing from the checkpoint")
    if adapter is not None:
        check_against(adapter, names | {HEAD})
    # A resized vocabulary ships its tokenizer with the adapter; otherwise the base's.
    tok_root = adapter.root if adapter and (adapter.root / "tokenizer.json").is_file() else base
    src = Source(ckpt, adapter, read_tokenizer(tok_root))
    hidden = ckpt.config.hidden_size
    for name in (EMBED, HEAD):
        if (name in names or (adapter and name in adapter.full)) and src.shape(name)[1] != hidden:
            raise ConvertError(
                f"{name}: width {src.shape(name)[1]}, the model's hidden size is {hidden}"
            )
    if _has_head(src) and src.shape(HEAD)[0] != src.n_vocab:
        raise ConvertError(
            f"lm_head has {src.shape(HEAD)[0]} rows but embed_tokens has {src.n_vocab}",
            hint="an adapter that resizes the vocabulary must carry both, "
            "or the base must tie them",
        )
    return src


def _has_head(src: Source) -> bool:
    """Whether the GGUF needs its own output matrix (untied, or the adapter unties it)."""
    a = src.adapter
    touched = a is not None and (HEAD in a.full or HEAD in a.pairs)
    return touched or (not src.ckpt.config.tie_embeddings and src.ckpt.has(HEAD))


def tensor_specs(src: Source) -> list[gguf_out.TensorSpec]:
    """GGUF tensors, produced lazily in llama.cpp's usual order."""
    specs = []
    for hf_name in src.ckpt.names():
        name = gguf_out.gguf_name(hf_name)
        if name is None or hf_name == HEAD:
            continue
        specs.append(gguf_out.TensorSpec(name, src.shape(hf_name), partial(src.tensor, hf_name)))
    if _has_head(src):
        head = HEAD if (src.ckpt.has(HEAD) or (src.adapter and HEAD in src.adapter.full)) else EMBED

        def produce() -> np.ndarray:
            w = src.tensor(head)
            if head == EMBED and src.adapter is not None:  # tied base, LoRA on lm_head only
                d = src.adapter.delta(HEAD, tuple(w.shape))
                w = w if d is None else w + d
            return w

        specs.append(gguf_out.TensorSpec("output.weight", src.shape(head), produce))
    specs.sort(key=lambda s: _order(s.name))
    return specs


def _order(name: str) -> tuple[int, int, str]:
    parts = name.split(".")
    if parts[0] == "token_embd":
        return (0, 0, name)
    if parts[0] == "blk":
        return (1, int(parts[1]), name)
    return (2, 0, name)


def write_gguf(
    src: Source, out: Path, dtype: str, name: str, progress: Callable[[str], None] | None = None
) -> int:
    """Write the merged model as an f32 or f16 GGUF; returns the tensor count."""
    if dtype not in ("f32", "f16"):
        raise ConvertError(f"unsupported GGUF float type {dtype!r}")
    specs = tensor_specs(src)
    gguf_out.write(out, src.ckpt.config, src.tokenizer, specs, src.n_vocab, dtype, name, progress)
    return len(specs)


def hf_to_gguf(root: Path, out: Path, dtype: str = "f32", name: str = "npcchat") -> None:
    """Convert a plain HF-layout Qwen2 checkpoint (no adapter)."""
    write_gguf(open_source(root, None), out, dtype, name)


def fallbacks(path: Path, quant: str) -> list[tuple[str, str, int]]:
    """Tensors that could not take a K-quant because their rows are not a multiple of 256:
    (name, type llama.cpp used instead, row length)."""
    import gguf

    if quant not in K_QUANTS:
        return []
    out = []
    for t in gguf.GGUFReader(str(path)).tensors:
        row = int(t.shape[0])
        if len(t.shape) >= 2 and row % 256 != 0:
            out.append((t.name, t.tensor_type.name, row))
    return out
