"""npcchat_train.state_heads: the one definition of the vector the heads read and of their
loss, the same functions the runtime's ONNX heads compute. Needs torch (development)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from npcchat_train import state_heads  # noqa: E402


def test_the_vector_is_the_mean_final_state_at_the_state_positions() -> None:
    hidden = torch.randn(2, 7, 5)
    got = state_heads.state_vectors(hidden, [[3], [2, 5]])
    assert torch.equal(got[0], hidden[0, 3])
    assert torch.allclose(got[1], (hidden[1, 2] + hidden[1, 5]) / 2)


def test_the_loss_parts_are_the_runtime_functions_and_their_weights() -> None:
    from torch.nn import functional as F

    torch.manual_seed(0)
    heads = state_heads.heads(5, 3)
    x = torch.randn(4, 5)
    delta = torch.rand(4, 2) * 2 - 1
    flags = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 0], [1, 1, 0]])
    thr = torch.tensor([[0.5, float("nan"), 0.7]] * 4)
    w = state_heads.LossWeights(delta=2.0, flags=3.0, thresholds=5.0, flag_pos_weight=4.0)
    parts = state_heads.state_loss(heads, x, delta, flags, thr, w)
    assert torch.allclose(parts["delta"], F.mse_loss(torch.tanh(heads.delta_head(x)), delta) * 2.0)
    bce = F.binary_cross_entropy_with_logits(
        heads.flag_head(x), flags, pos_weight=torch.full((3,), 4.0)
    )
    assert torch.allclose(parts["flags"], bce * 3.0)
    known = ~torch.isnan(thr)  # a label without a threshold adds nothing
    want = F.mse_loss(torch.sigmoid(heads.threshold_head(x))[known], thr[known]) * 5.0
    assert torch.allclose(parts["thresholds"], want)
    assert torch.allclose(parts["total"], parts["delta"] + parts["flags"] + parts["thresholds"])
    assert "thresholds" not in state_heads.state_loss(heads, x, delta, flags)
    parts["total"].backward()  # every head learns from it
    assert all(p.grad is not None for p in heads.parameters())


def test_trained_heads_give_what_the_runtime_heads_compute(tmp_path: Path) -> None:
    """The heads module, saved as convert reads it and built into the ONNX graph the runtime
    runs, gives the torch functions' outputs on the same vector."""
    pytest.importorskip("onnx")
    from npcchat.runtime.heads import Heads
    from npcchat_heads.loader import load
    from npcchat_heads.onnx_builder import write

    torch.manual_seed(1)
    heads = state_heads.heads(8, 2)
    for name in ("delta_head", "flag_head", "threshold_head"):
        torch.save(getattr(heads, name).state_dict(), tmp_path / f"{name}.pt")
    (tmp_path / "flags.json").write_text('{"ALL_FLAGS": ["give_item", "give_hint"]}')
    weights, flags, _ = load(tmp_path, hidden=8)
    write(weights, flags, tmp_path / "heads.onnx")
    runtime = Heads(tmp_path / "heads.onnx", tuple(flags), 8)
    x = torch.randn(3, 8)
    delta, prob, thr = runtime.run_batch(x.numpy())
    with torch.no_grad():
        assert np.allclose(delta, torch.tanh(heads.delta_head(x)).numpy(), atol=1e-6)
        assert np.allclose(prob, torch.sigmoid(heads.flag_head(x)).numpy(), atol=1e-6)
        assert np.allclose(thr, torch.sigmoid(heads.threshold_head(x)).numpy(), atol=1e-6)


def test_the_demo_recipe_trains_its_heads_through_this_module() -> None:
    import inspect

    from npcchat_train import demo

    source = inspect.getsource(demo.train)
    assert "state_heads.state_loss(" in source and "state_heads.state_vectors(" in source
    assert "binary_cross_entropy" not in source and "mse_loss" not in source


REPO = Path(__file__).resolve().parents[1]


@pytest.mark.model
def test_training_prompts_are_the_prompts_the_runtime_decodes() -> None:
    """Each example's tokens are the tokens eval (the engine talk runs) decodes for that
    record, NPC file applied; a multi-turn record is teacher-forced: the next prompt holds
    the record's own reply and the state its labels and the NPC's rules give."""
    from npcchat import demo
    from npcchat.config import Config
    from npcchat.eval import runner
    from npcchat.eval.scenarios import read
    from npcchat.eval.similarity import Similarity
    from npcchat.mind import npc as npc_mod
    from npcchat.runtime.engine import load_engine
    from npcchat.types import SamplingParams
    from npcchat_train.records import examples

    scenarios, bad = read(REPO / "configs" / "scenarios" / "labelled_sample.jsonl")
    assert not bad
    npcs = npc_mod.load_dir(REPO / "configs" / "npcs")
    greedy = SamplingParams(temperature=0.0, max_tokens=8, seed=0)
    with load_engine(demo.default_bundle(), Config()) as engine:
        for sc in scenarios[:12]:
            (example,) = examples(engine, [sc], npcs)
            assert example.delta is not None and example.flags is not None
            assert set(example.flags) == set(engine.bundle.flags)  # flat or nested: all
            runner.run(engine, [sc], greedy, Similarity(), lambda _: None, False, npcs)
            decoded = tuple(engine.kv_tokens(0)[: len(example.tokens)])
            assert decoded == example.tokens, sc.source
            assert example.prompt.count("<STATE>") == 1 and sc.turns[0][0] in example.prompt
        # teacher forcing over two turns
        multi, _ = read(REPO / "configs" / "scenarios" / "multi_turn.jsonl")
        sc = next(s for s in multi if len(s.turns) >= 2 and s.turns[0][1] is not None)
        first, second = list(examples(engine, [sc], npcs))[:2]
        said, expected = sc.turns[0]
        assert f"player: {said}" in second.prompt
        if expected is not None and expected.response:
            assert f"npc: {expected.response}" in second.prompt
        assert first.id.endswith("#1") and second.id.endswith("#2")
