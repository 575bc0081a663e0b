"""ONNX heads: graph vs numpy, decisions, and shape checks against the bundle."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from npcchat.errors import BundleError
from npcchat.runtime.heads import Heads, decide
from npcchat_heads import onnx_builder

FLAGS = ("give_item", "npc_action", "give_hint")


def test_onnx_matches_numpy(tmp_path: Path) -> None:
    w = onnx_builder.random_weights(64, 3, seed=1, scale=0.3)
    path = tmp_path / "h.onnx"
    onnx_builder.write(w, list(FLAGS), path)
    heads = Heads(path, FLAGS, 64)
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    got = heads.run_batch(x)
    want = onnx_builder.reference(w, x)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, atol=1e-5)
    assert np.all(np.abs(got[0]) <= 1) and np.all((got[1] > 0) & (got[1] < 1))


def test_decisions_are_threshold_and_deterministic() -> None:
    out = decide(
        FLAGS, np.array([0.5, -2.0]), np.array([0.65, 0.2, 0.9]), np.array([0.65, 0.3, 0.95])
    )
    assert [f.fired for f in out.flags.values()] == [True, False, False]  # prob >= threshold fires
    assert out.deltas == {"trust": 0.5, "relationship": -1.0}
    again = decide(
        FLAGS, np.array([0.5, -2.0]), np.array([0.65, 0.2, 0.9]), np.array([0.65, 0.3, 0.95])
    )
    assert again == out


def test_width_and_flag_count_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "h.onnx"
    onnx_builder.write(onnx_builder.random_weights(64, 3), list(FLAGS), path)
    with pytest.raises(BundleError, match="heads input size is 64, but the model's n_embd is 128"):
        Heads(path, FLAGS, 128)
    with pytest.raises(BundleError, match="flag_prob has 3 outputs but the manifest names 2 flags"):
        Heads(path, FLAGS[:2], 64)


def test_builder_refuses_bad_weights() -> None:
    w = onnx_builder.random_weights(8, 2)
    assert onnx_builder.build(w, ["a", "b"])
    with pytest.raises(ValueError, match="1 flag names for 2 flag head outputs"):
        onnx_builder.build(w, ["a"])
    bad = onnx_builder.HeadWeights(w.delta_w, w.delta_b, w.flag_w, w.flag_b, w.thr_w[:1], w.thr_b)
    with pytest.raises(ValueError, match=r"threshold_head\.weight: expected shape"):
        onnx_builder.build(bad, ["a", "b"])
