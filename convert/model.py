"""HF Qwen2 checkpoint -> GGUF -> quantized GGUF, and the bundle around it.

The quantizer is llama.cpp's own (``llama_model_quantize`` through npcchat.backend, the one
module that imports llama_cpp); nothing here needs torch.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from npcchat.errors import ConvertError

from . import gguf_out
from .hf import Checkpoint, read_tokenizer

QUANTS = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "f16", "f32")


def tensor_specs(ckpt: Checkpoint) -> list[gguf_out.TensorSpec]:
    """GGUF tensors of a checkpoint, produced lazily one by one."""
    specs = []
    for hf_name in ckpt.names():
        name = gguf_out.gguf_name(hf_name)
        if name is None:
            continue
        if name == "output.weight" and ckpt.config.tie_embeddings:
            continue  # llama.cpp reuses token_embd when output is absent
        specs.append(gguf_out.TensorSpec(name, ckpt.shape(hf_name), lambda n=hf_name: ckpt.get(n)))
    order = {n: i for i, n in enumerate(("token_embd.weight",))}
    specs.sort(key=lambda s: (order.get(s.name, 1), _layer_key(s.name)))
    return specs


def _layer_key(name: str) -> tuple[int, str]:
    parts = name.split(".")
    return (int(parts[1]), name) if parts[0] == "blk" else (1 << 30, name)


def hf_to_gguf(
    root: Path,
    out: Path,
    dtype: str = "f32",
    name: str = "npcchat",
    progress: Callable[[str], None] | None = None,
) -> None:
    """Convert a HF-layout Qwen2 checkpoint to an f32 or f16 GGUF."""
    if dtype not in ("f32", "f16"):
        raise ConvertError(f"unsupported GGUF float type {dtype!r}")
    ckpt = Checkpoint(root)
    tok = read_tokenizer(root)
    n_vocab = ckpt.shape("model.embed_tokens.weight")[0]
    gguf_out.write(out, ckpt.config, tok, tensor_specs(ckpt), n_vocab, dtype, name, progress)


def quantize(src: Path, dst: Path, quant: str, threads: int = 0) -> None:
    """Quantize ``src`` (f32/f16 GGUF) into ``dst`` with llama.cpp's quantizer."""
    from npcchat import backend

    if quant not in QUANTS:
        raise ConvertError(
            f"unknown quantization {quant!r}", hint=f"choose one of {', '.join(QUANTS)}"
        )
    backend.quantize(src, dst, quant, threads)
