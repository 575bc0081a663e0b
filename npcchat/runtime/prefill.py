"""How a prompt is cut into llama_decode calls (pure; tested on its own).

Only the `<STATE>` position(s) and the last prompt token need outputs. llama.cpp makes every
token of a batch an output while embeddings are on (llama-batch.cpp: "embeddings required
... -> overriding"), so outputs are requested in short runs of their own and everything else
is decoded with no outputs at all: never an output row (a 150k-wide logits row) per prompt token.

With a ``grid``, plain runs are cut at absolute multiples of it whatever ``start`` is, so a
prefill that starts from a KV prefix shared at a grid boundary makes exactly the decode calls
a cold prefill makes for the rest of the prompt: results cannot depend on the sharing, even
on backends whose kernels round differently for different batch sizes.

Without one, plain runs are cut in pieces of near-equal size of at most the given size
(``runtime.prefill_chunk``): never a short tail, and a server decodes a joining prompt a
piece at a time between its running replies' steps (:mod:`npcchat.runtime.batch`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# On a CPU build, llama.cpp computes calls of under 8 tokens with other kernels than longer
# ones (measured: a 7-token call moves the `<STATE>` vector of a Qwen2.5-0.5B-size Q4_K_M
# model, calls of 8 to 512 tokens give the same bits), so npcchat never makes a plain call
# shorter than this when it can help it: a turn then computes the same bits wherever its
# decoding started (after a prefix another slot held, or one talk decoded ahead of time).
MIN_CALL = 8


def widened(start: int, end: int) -> int:
    """Where to start decoding ``[start, end)`` (the rest is in the KV cache) so that it is
    no call of under :data:`MIN_CALL` tokens: ``start``, or up to 7 tokens earlier (those
    are decoded again)."""
    if 0 < end - start < MIN_CALL:
        return max(0, end - MIN_CALL)
    return start


@dataclass(frozen=True)
class Chunk:
    start: int
    end: int
    embeddings: bool  # decode with embeddings on: every token of the chunk is an output


def plan_prefill(
    n_tokens: int,
    outputs: Sequence[int],
    n_batch: int,
    start: int = 0,
    max_gap: int = 8,
    grid: int = 0,
) -> list[Chunk]:
    """Split ``[start, n_tokens)`` into decode chunks so that every position in ``outputs``
    lands in an embeddings chunk and as few other tokens as possible do.

    Output positions closer than ``max_gap`` share one chunk (one decode call instead of
    several); everything else is decoded without outputs, at most ``n_batch`` per call, in
    pieces of near-equal size (``grid`` > 0: cut at every multiple of ``grid`` instead,
    counted from position 0).
    """
    chunks: list[Chunk] = []
    if grid > n_batch:
        raise ValueError(f"prefill grid {grid} exceeds the batch size {n_batch}")

    def plain(a: int, b: int) -> None:
        if grid:
            s = a
            while s < b:
                e = min(b, (s // grid + 1) * grid)
                chunks.append(Chunk(s, e, False))
                s = e
            return
        # near-equal pieces: never a short remainder (on CPU, llama.cpp computes calls of
        # under 8 tokens with other kernels, so a 2-token tail would round differently
        # from the same tokens decoded inside a longer call)
        pieces = -(-(b - a) // n_batch)
        for k in range(pieces):
            chunks.append(Chunk(a + (b - a) * k // pieces, a + (b - a) * (k + 1) // pieces, False))

    pos = start
    wanted = sorted(p for p in set(outputs) if p >= start)
    i = 0
    while i < len(wanted):
        lo = hi = wanted[i]
        while (
            i + 1 < len(wanted) and wanted[i + 1] - hi <= max_gap and wanted[i + 1] - lo < n_batch
        ):
            i += 1
            hi = wanted[i]
        plain(pos, lo)
        chunks.append(Chunk(lo, hi + 1, True))
        pos = hi + 1
        i += 1
    plain(pos, n_tokens)
    return chunks
