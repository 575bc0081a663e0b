"""Show the drift a quantized model ships with: built-in prompts through the unquantized and
the quantized model, comparing `<STATE>` vectors (cosine), head outputs (largest absolute
difference) and flag decisions (how many flip). The quantized side runs the real engine path
(same prompt builder, same one-prefill turn); the unquantized side is the numpy reference
streamed layer by layer from the f16/f32 GGUF, so memory stays at the quantized model plus
one layer (loading the f16 model in llama.cpp would double the converter's peak).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from npcchat.config import Config, RuntimeConfig
from npcchat.runtime.bundle import Bundle
from npcchat.runtime.engine import Engine
from npcchat.runtime.heads import Heads
from npcchat.types import ContextTurn, PlayerState, PromptInput, Tags

from .reference import stream_hidden

_TAGS = Tags("in_progress", 0.35, 0.35, "grief", "helpful", "emotional", "map1")
PROMPTS = (
    PromptInput(
        "mother_abandoned_factory",
        _TAGS,
        "I found this picture near the gate. Is it your daughter?",
        lore="Ten years ago a fire closed the factory.",
        player_state=PlayerState(("forgotten_picture",)),
    ),
    PromptInput(
        "mother_abandoned_factory",
        replace(_TAGS, trust=0.8, relationship=0.7),
        "Here, take the picture. It belongs to you.",
        context=(
            ContextTurn("player", "Hello?"),
            ContextTurn("npc", "Who is there... who are you?"),
        ),
    ),
    PromptInput(
        "village_blacksmith",
        replace(_TAGS, npc_mood="busy", style="gruff", location="forge"),
        "You are a useless old fool.",
        lore="The forge has burned for three generations.",
    ),
    PromptInput(
        "forest_hermit",
        replace(_TAGS, quest_stage="start", location="forest"),
        "Can you tell me the way to the hidden shrine?",
        description="Moss covers the hut; the hermit hums.",
    ),
    PromptInput(
        "port_captain",
        replace(_TAGS, npc_mood="calm", location="port"),
        "안녕하세요, 선장님. 배는 언제 떠나나요?",
    ),
    PromptInput(
        "apprentice_mage",
        replace(_TAGS, quest_stage="complete", trust=0.95),
        "Thank you for everything. <STATE> What now?",
        player_state=PlayerState((), ("saved_the_tower",), "tower_top"),
    ),
)


@dataclass(frozen=True)
class Drift:
    prompts: int
    cosine_min: float
    cosine_mean: float
    head_max_abs_diff: float | None  # None when the bundle has no heads
    flag_flips: int | None
    flag_decisions: int | None


def _heads_out(heads: Heads | None, vecs: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray] | None:
    if heads is None:
        return None
    raw = heads.run_batch(np.stack(vecs))
    return np.concatenate([r.ravel() for r in raw]), raw[1] >= raw[2]


def drift(unquantized: Path, quantized: Bundle, n_ctx: int = 1024) -> Drift:
    """Quantized bundle (llama.cpp) against the unquantized GGUF (numpy, layer by layer).

    The quantized model is closed before the reference runs: peak memory is the larger of
    the two, not their sum."""
    with Engine.load(quantized, Config(runtime=RuntimeConfig(n_ctx=n_ctx))) as engine:
        state_id = engine.vocab.tags["<STATE>"]
        fitted = [engine.fit(p, 1) for p in PROMPTS]
        q_vecs = [engine.state_vector(f)[0] for f in fitted]
        tokens = [list(f.tokens) for f in fitted]
        heads = engine.heads
    ref_hidden = stream_hidden(unquantized, tokens)
    ref_vecs = [
        h[[i for i, t in enumerate(tok) if t == state_id]].mean(axis=0)
        for h, tok in zip(ref_hidden, tokens, strict=True)
    ]
    q_out, ref_out = _heads_out(heads, q_vecs), _heads_out(heads, ref_vecs)
    cos = [
        float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        for a, b in zip(ref_vecs, q_vecs, strict=True)
    ]
    if q_out is None or ref_out is None:
        return Drift(len(PROMPTS), min(cos), float(np.mean(cos)), None, None, None)
    return Drift(
        prompts=len(PROMPTS),
        cosine_min=min(cos),
        cosine_mean=float(np.mean(cos)),
        head_max_abs_diff=float(np.max(np.abs(ref_out[0] - q_out[0]))),
        flag_flips=int(np.sum(ref_out[1] != q_out[1])),
        flag_decisions=int(ref_out[1].size),
    )
