"""Write a PEFT adapter as a GGUF LoRA adapter that llama.cpp applies at run time.

llama.cpp's rule (src/llama-adapter.h, ``get_scale``): scale = alpha ? user_scale * alpha / rank
: user_scale. Per-module alphas, rank patterns and rsLoRA cannot be said with one file-wide
alpha, so each B is multiplied by its module's own scale and alpha is written as 0: the
run-time scale is then exactly ``--lora-scale`` times the trained delta.
Shapes as llama.cpp checks them: ``lora_a`` ne = [in, rank] (numpy [rank, in], PEFT's
lora_A as is), ``lora_b`` ne = [rank, out] (numpy [out, rank], PEFT's lora_B).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from npcchat.errors import ConvertError

from .gguf_out import gguf_name
from .lora import Adapter


def write(adapter: Adapter, out: Path, progress: Callable[[str], None] | None = None) -> int:
    """Write the adapter; returns the number of LoRA pairs."""
    import gguf

    if adapter.full:
        raise ConvertError(
            f"{adapter.root}: the adapter replaces {', '.join(sorted(adapter.full))}; "
            "a run-time LoRA cannot carry full matrices",
            hint="merge it instead (drop --adapter-only)",
        )
    w = gguf.GGUFWriter(str(out), "qwen2")
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_string("adapter.type", "lora")
    w.add_float32("adapter.lora.alpha", 0.0)  # scales are folded into B (see module doc)
    pairs = []
    for weight_name, pair in sorted(adapter.pairs.items()):
        if pair.embedding:
            raise ConvertError(
                f"{adapter.root}: {pair.module} has an embedding LoRA; merge it instead",
                hint="drop --adapter-only",
            )
        target = gguf_name(weight_name)
        if target is None:
            continue
        a = adapter.file.get(pair.a_key).astype(np.float32)
        b = adapter.file.get(pair.b_key).astype(np.float32) * adapter.scale(pair.module, a.shape[0])
        pairs.append((target, a, b))
    for target, a, b in pairs:
        w.add_tensor(f"{target}.lora_a", np.ascontiguousarray(a))
        w.add_tensor(f"{target}.lora_b", np.ascontiguousarray(b))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if progress:
        progress(f"{len(pairs)} LoRA pairs")
    return len(pairs)
