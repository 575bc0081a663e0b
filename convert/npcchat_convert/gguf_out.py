"""Write a Qwen2 GGUF (metadata, byte-level BPE tokenizer, tensors) with gguf-py, streaming.

Tensor infos are declared first, then each tensor is produced, written and dropped, so
peak memory is a few tensors, not the model. The tokenizer follows what llama.cpp's
``convert_hf_to_gguf.py`` writes for Qwen2 (model ``gpt2``, pre ``qwen2``, merges as
``"a b"`` strings, added special tokens as CONTROL, padding rows as ``[PAD{i}]`` UNUSED).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from npcchat.errors import ConvertError

from .hf import Qwen2Config, Tokenizer

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_LAYER_MAP = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_TOP_MAP = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}

# gguf token types (llama.cpp's llama_token_type)
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def gguf_name(hf_name: str) -> str | None:
    """GGUF tensor name of an HF Qwen2 tensor, or None for tensors GGUF does not keep."""
    if hf_name in _TOP_MAP:
        return _TOP_MAP[hf_name]
    m = _LAYER.match(hf_name)
    if m and m.group(2) in _LAYER_MAP:
        return f"blk.{m.group(1)}.{_LAYER_MAP[m.group(2)]}"
    if hf_name.endswith("rotary_emb.inv_freq"):
        return None
    raise ConvertError(f"tensor {hf_name} is not part of a Qwen2 model")


@dataclass(frozen=True)
class TensorSpec:
    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy order ([out, in] for weights)
    produce: Callable[[], np.ndarray]


def vocab_tables(tok: Tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings and types by id, padded to the embedding's row count."""
    by_id: dict[int, str] = {i: t for t, i in tok.vocab.items()}
    types: dict[int, int] = dict.fromkeys(by_id, NORMAL)
    for i, (content, special) in tok.added.items():
        by_id[i] = content
        types[i] = CONTROL if special else USER_DEFINED
    top = max(by_id) + 1
    if top > n_vocab:
        raise ConvertError(
            f"tokenizer has ids up to {top - 1} but the embedding has only {n_vocab} rows",
            hint="the adapter's resized embed_tokens must cover every token",
        )
    tokens, kinds = [], []
    for i in range(n_vocab):
        if i in by_id:
            tokens.append(by_id[i])
            kinds.append(types[i])
        else:
            tokens.append(f"[PAD{i}]")
            kinds.append(UNUSED)
    return tokens, kinds


class _CastWriter:
    """Hands gguf-py a tensor that converts itself while being written, a block of rows at
    a time: casting a 150k-row embedding to f16 in one go would double its memory."""

    BLOCK = 1 << 22  # values per write

    def __init__(self, arr: np.ndarray, dtype: np.dtype) -> None:
        self.arr = arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(1, -1)
        self.dtype = dtype
        self.nbytes = int(arr.size) * dtype.itemsize

    def tofile(self, fout: BinaryIO) -> None:
        rows = max(1, self.BLOCK // max(1, self.arr.shape[1]))
        for start in range(0, self.arr.shape[0], rows):
            block = np.ascontiguousarray(self.arr[start : start + rows], dtype=self.dtype)
            block.tofile(fout)


def _token_id(tok: Tokenizer, text: str, what: str) -> int:
    for i, (content, _) in tok.added.items():
        if content == text:
            return i
    if text in tok.vocab:
        return tok.vocab[text]
    raise ConvertError(f"tokenizer has no {what} token {text!r}")


def write(
    path: Path,
    cfg: Qwen2Config,
    tok: Tokenizer,
    tensors: Iterable[TensorSpec],
    n_vocab: int,
    dtype: str = "f32",
    name: str = "npcchat",
    progress: Callable[[str], None] | None = None,
) -> None:
    """Write the GGUF: 2-D weights as ``dtype`` (f32 or f16), norms and biases as f32."""
    import gguf

    specs = list(tensors)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name(name)
    w.add_context_length(cfg.max_positions)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16 if dtype == "f16" else gguf.LlamaFileType.ALL_F32)
    tokens, kinds = vocab_tables(tok, n_vocab)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(kinds)
    w.add_token_merges(tok.merges)
    w.add_eos_token_id(_token_id(tok, tok.eos, "EOS"))
    if tok.pad:
        w.add_pad_token_id(_token_id(tok, tok.pad, "PAD"))
    w.add_add_bos_token(False)

    def out_dtype(spec: TensorSpec) -> np.dtype:
        return np.dtype(np.float16 if dtype == "f16" and len(spec.shape) == 2 else np.float32)

    for spec in specs:
        dt = out_dtype(spec)
        nbytes = int(np.prod(spec.shape)) * dt.itemsize
        w.add_tensor_info(spec.name, spec.shape, dt, nbytes)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for spec in specs:
        arr = spec.produce()
        if tuple(arr.shape) != spec.shape:
            raise ConvertError(f"tensor {spec.name}: shape {arr.shape}, expected {spec.shape}")
        if not np.all(np.isfinite(arr)):
            raise ConvertError(f"tensor {spec.name}: holds NaN or infinite values")
        w.write_tensor_data(_CastWriter(arr, out_dtype(spec)))  # type: ignore[arg-type]
        del arr
        if progress:
            progress(spec.name)
    w.close()
