"""An independent numpy Qwen2 forward pass over an f32/f16 GGUF: the test oracle, and the
unquantized side of `npcchat convert`'s drift check.

Written from the architecture (RMSNorm, GQA attention with NEOX rotary embedding and q/k/v
biases, SwiGLU MLP, final RMSNorm), not from llama.cpp's code. :class:`RefModel` holds
all weights (float64, small models, tests); :func:`stream_hidden` walks a GGUF layer by layer
with positioned reads (float32), so its memory is one layer plus the activations: that is how
convert verifies a 1.5B model within 2 GB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class RefModel:
    tensors: dict[str, np.ndarray]
    n_layers: int
    n_heads: int
    n_kv_heads: int
    eps: float
    rope_base: float

    @classmethod
    def load(cls, path: Path) -> RefModel:
        import gguf

        reader = gguf.GGUFReader(str(path))

        def field(key: str) -> float:
            f = reader.fields[key]
            return float(f.parts[f.data[0]][0])

        tensors = {}
        for t in reader.tensors:
            if t.tensor_type not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                raise ValueError(
                    f"{path}: {t.name} is {t.tensor_type.name}; the reference needs f32/f16"
                )
            shape = tuple(int(d) for d in reversed(t.shape))
            tensors[t.name] = np.asarray(t.data, dtype=np.float64).reshape(shape)
        return cls(
            tensors=tensors,
            n_layers=int(field("qwen2.block_count")),
            n_heads=int(field("qwen2.attention.head_count")),
            n_kv_heads=int(field("qwen2.attention.head_count_kv")),
            eps=field("qwen2.attention.layer_norm_rms_epsilon"),
            rope_base=field("qwen2.rope.freq_base"),
        )

    def _norm(self, x: np.ndarray, name: str) -> np.ndarray:
        w = self.tensors[name]
        return np.asarray(x / np.sqrt((x * x).mean(-1, keepdims=True) + self.eps) * w)

    def _rope(self, x: np.ndarray) -> np.ndarray:
        # NEOX style: rotate the first half of each head against the second half.
        t, _, d = x.shape
        inv = self.rope_base ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        ang = np.arange(t, dtype=np.float64)[:, None] * inv[None, :]
        cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
        a, b = x[..., : d // 2], x[..., d // 2 :]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def _lin(self, x: np.ndarray, name: str) -> np.ndarray:
        out = x @ self.tensors[f"{name}.weight"].T
        bias = self.tensors.get(f"{name}.bias")
        return np.asarray(out if bias is None else out + bias)

    def _attention(self, h: np.ndarray, i: int) -> np.ndarray:
        t = h.shape[0]
        p = f"blk.{i}."
        q = self._lin(h, p + "attn_q").reshape(t, self.n_heads, -1)
        k = self._lin(h, p + "attn_k").reshape(t, self.n_kv_heads, -1)
        v = self._lin(h, p + "attn_v").reshape(t, self.n_kv_heads, -1)
        q, k = self._rope(q), self._rope(k)
        group = self.n_heads // self.n_kv_heads
        k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(q.shape[-1])
        scores = scores + np.triu(np.full((t, t), -np.inf), 1)[None]
        scores = np.exp(scores - scores.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        out = np.einsum("hqk,khd->qhd", scores, v).reshape(t, -1)
        return self._lin(out, p + "attn_output")

    def _mlp(self, h: np.ndarray, i: int) -> np.ndarray:
        p = f"blk.{i}."
        g = self._lin(h, p + "ffn_gate")
        u = self._lin(h, p + "ffn_up")
        return self._lin(g / (1.0 + np.exp(-g)) * u, p + "ffn_down")

    def hidden(self, tokens: list[int]) -> np.ndarray:
        """Post-final-norm hidden states, one row per token."""
        x = self.tensors["token_embd.weight"][tokens]
        for i in range(self.n_layers):
            x = x + self._attention(self._norm(x, f"blk.{i}.attn_norm.weight"), i)
            x = x + self._mlp(self._norm(x, f"blk.{i}.ffn_norm.weight"), i)
        return self._norm(x, "output_norm.weight")

    def logits(self, hidden: np.ndarray) -> np.ndarray:
        out = self.tensors.get("output.weight", self.tensors["token_embd.weight"])
        return np.asarray(hidden @ out.T)


def _gguf_index(
    path: Path,
) -> tuple[dict[str, tuple[int, tuple[int, ...], np.dtype]], dict[str, float]]:
    """Tensor (offset, numpy shape, dtype) and the hyper-parameters, from the header only."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    index = {}
    for t in reader.tensors:
        dt: np.dtype[Any]
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            dt = np.dtype("<f4")
        elif t.tensor_type == gguf.GGMLQuantizationType.F16:
            dt = np.dtype("<f2")
        else:
            raise ValueError(
                f"{path}: {t.name} is {t.tensor_type.name}; the reference needs f32/f16"
            )
        index[t.name] = (int(t.data_offset), tuple(int(d) for d in reversed(t.shape)), dt)
    hp = {}
    for key in (
        "block_count",
        "attention.head_count",
        "attention.head_count_kv",
        "attention.layer_norm_rms_epsilon",
        "rope.freq_base",
    ):
        f = reader.fields[f"qwen2.{key}"]
        hp[key] = float(f.parts[f.data[0]][0])
    del reader  # drop the header map; tensors are read with positioned reads below
    return index, hp


def stream_hidden(path: Path, prompts: list[list[int]]) -> list[np.ndarray]:
    """Post-final-norm hidden states (float32) of several prompts, reading one layer of
    weights at a time from the GGUF (only the embedding rows the prompts use)."""
    index, hp = _gguf_index(path)

    def read(name: str, rows: list[int] | None = None) -> np.ndarray:
        offset, shape, dt = index[name]
        if rows is None:
            arr = np.fromfile(path, dtype=dt, count=int(np.prod(shape)), offset=offset).reshape(
                shape
            )
            return arr.astype(np.float32)
        width = shape[1]
        with path.open("rb") as fh:
            out = np.empty((len(rows), width), np.float32)
            for i, r in enumerate(rows):
                fh.seek(offset + r * width * dt.itemsize)
                out[i] = np.fromfile(fh, dtype=dt, count=width)
        return out

    model = RefModel(
        {},
        int(hp["block_count"]),
        int(hp["attention.head_count"]),
        int(hp["attention.head_count_kv"]),
        hp["attention.layer_norm_rms_epsilon"],
        hp["rope.freq_base"],
    )
    xs = [read("token_embd.weight", list(p)) for p in prompts]
    for i in range(model.n_layers):
        prefix = f"blk.{i}."
        model.tensors = {n: read(n) for n in index if n.startswith(prefix)}
        for j, x in enumerate(xs):
            x = x + model._attention(model._norm(x, f"{prefix}attn_norm.weight"), i)
            xs[j] = x + model._mlp(model._norm(x, f"{prefix}ffn_norm.weight"), i)
    model.tensors = {"output_norm.weight": read("output_norm.weight")}
    return [model._norm(x, "output_norm.weight") for x in xs]
