"""The benchmark's yardstick: plain llama.cpp generation, with nothing of npcchat around it.

Kept apart from npcchat.bench so the baseline child process of ``npcchat bench`` imports
only this and the backend: its peak RSS is llama.cpp's, not npcchat's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from npcchat.types import SamplingParams


def baseline_generate(
    model: Any, tokens: Sequence[int], n_tokens: int, params: SamplingParams, seed: int
) -> int:
    """Plain llama.cpp, as any program would call it: decode the whole prompt asking for
    the last logits only, then sample and decode ``n_tokens`` tokens (no stop tokens).
    The benchmark's yardstick for what a turn costs on top of llama.cpp."""
    model.keep_prefix(0)
    for start in range(0, len(tokens), model.n_batch):
        chunk = tokens[start : start + model.n_batch]
        model.decode(chunk, start, start + len(chunk) == len(tokens), last_only=True)
    model.new_sampler(params, seed)
    return sum(1 for _ in model.generate(len(tokens), n_tokens, frozenset()))
