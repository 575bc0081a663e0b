"""What the engine needs of a model: :class:`npcchat.runtime.backend.Model` (llama.cpp), or
the scripted fake the fast tests use. A protocol of its own, so the modules that only read
a model's vocabulary (``vocab``) do not depend on the engine that drives it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from npcchat.runtime.prefill import Chunk
from npcchat.types import SamplingParams


class ModelLike(Protocol):
    """What the engine needs of a model. Sequences (``seq``) are independent KV streams of
    one context; positions count from 0 in each."""

    n_embd: int
    n_ctx: int  # per sequence
    n_batch: int
    n_seq: int

    def tokenize(self, text: str, special: bool = False) -> list[int]: ...

    def piece(self, token: int) -> bytes: ...

    def is_control(self, token: int) -> bool: ...

    def is_eog(self, token: int) -> bool: ...

    def eos(self) -> int: ...

    def prefill_chunk(
        self, tokens: Sequence[int], chunk: Chunk, outputs: Sequence[int], seq: int = 0
    ) -> dict[int, np.ndarray]: ...

    def extend(self, tokens: Sequence[int], start: int, seq: int = 0) -> None: ...

    def share(self, src: int, dst: int, keep: int) -> None: ...

    def new_sampler(self, params: SamplingParams, seed: int, seq: int = 0) -> None: ...

    def sample(self, seq: int = 0, idx: int = -1) -> int: ...

    def sample_banned(self, banned: Sequence[int], seq: int = 0, idx: int = -1) -> int: ...

    def step(self, token: int, pos: int, seq: int = 0) -> None: ...

    def choose(self, tokens: Sequence[int], pos: int, grammar: str, seq: int = 0) -> list[int]: ...

    def step_many(self, items: Sequence[tuple[int, int, int]]) -> None: ...

    def keep_prefix(self, n: int, seq: int = 0) -> None: ...

    def state_get(self, seq: int = 0) -> bytes: ...

    def state_set(self, seq: int, data: bytes) -> bool: ...

    def close(self) -> None: ...
