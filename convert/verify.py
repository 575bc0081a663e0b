"""Show the drift a quantized model ships with: built-in prompts through the unquantized and
the quantized GGUF, comparing `<STATE>` vectors (cosine), head outputs (largest absolute
difference) and flag decisions (how many flip). Runs the real engine path (same prompt
builder, same one-prefill turn), one model at a time to keep memory low.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from npcchat.bundle import Bundle
from npcchat.config import Config, RuntimeConfig
from npcchat.engine import Engine
from npcchat.types import ContextTurn, PlayerState, PromptInput, Tags

_TAGS = Tags("in_progress", 0.35, 0.35, "grief", "helpful", "emotional", "map1")
PROMPTS = (
    PromptInput("mother_abandoned_factory", _TAGS, "I found this picture near the gate. Is it your daughter?",
                lore="Ten years ago a fire closed the factory.", player_state=PlayerState(("forgotten_picture",))),
    PromptInput("mother_abandoned_factory", replace(_TAGS, trust=0.8, relationship=0.7), "Here, take the picture. It belongs to you.",
                context=(ContextTurn("player", "Hello?"), ContextTurn("npc", "Who is there... who are you?"))),
    PromptInput("village_blacksmith", replace(_TAGS, npc_mood="busy", style="gruff", location="forge"), "You are a useless old fool.",
                lore="The forge has burned for three generations."),
    PromptInput("forest_hermit", replace(_TAGS, quest_stage="start", location="forest"), "Can you tell me the way to the hidden shrine?",
                description="Moss covers the hut; the hermit hums."),
    PromptInput("port_captain", replace(_TAGS, npc_mood="calm", location="port"), "안녕하세요, 선장님. 배는 언제 떠나나요?"),
    PromptInput("apprentice_mage", replace(_TAGS, quest_stage="complete", trust=0.95), "Thank you for everything. <STATE> What now?",
                player_state=PlayerState((), ("saved_the_tower",), "tower_top")),
)  # fmt: skip


@dataclass(frozen=True)
class Drift:
    prompts: int
    cosine_min: float
    cosine_mean: float
    head_max_abs_diff: float | None  # None when the bundle has no heads
    flag_flips: int | None
    flag_decisions: int | None


def _outputs(
    bundle: Bundle, n_ctx: int
) -> tuple[list[np.ndarray], list[np.ndarray] | None, list[np.ndarray] | None]:
    with Engine.load(bundle, Config(runtime=RuntimeConfig(n_ctx=n_ctx))) as engine:
        vecs = [engine.state_vector(engine.fit(p, 1))[0] for p in PROMPTS]
        if engine.heads is None:
            return vecs, None, None
        raw = engine.heads.run_batch(np.stack(vecs))
        heads = [np.concatenate([r.ravel() for r in raw])]
        fired = [raw[1] >= raw[2]]
    return vecs, heads, fired


def drift(reference: Bundle, quantized: Bundle, n_ctx: int = 1024) -> Drift:
    ref_vecs, ref_heads, ref_fired = _outputs(reference, n_ctx)
    q_vecs, q_heads, q_fired = _outputs(quantized, n_ctx)
    cos = [
        float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        for a, b in zip(ref_vecs, q_vecs, strict=True)
    ]
    if ref_heads is None or q_heads is None or ref_fired is None or q_fired is None:
        return Drift(len(PROMPTS), min(cos), float(np.mean(cos)), None, None, None)
    return Drift(
        prompts=len(PROMPTS),
        cosine_min=min(cos),
        cosine_mean=float(np.mean(cos)),
        head_max_abs_diff=float(np.max(np.abs(ref_heads[0] - q_heads[0]))),
        flag_flips=int(np.sum(ref_fired[0] != q_fired[0])),
        flag_decisions=int(ref_fired[0].size),
    )
