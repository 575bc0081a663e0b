"""Build the heads ONNX graph from plain numpy weights, without torch.

One file, input ``state[batch, hidden]`` and three outputs computed inside the graph:
``delta = tanh(x W_d^T + b_d)``, ``flag_prob = sigmoid(x W_f^T + b_f)``,
``flag_threshold = sigmoid(x W_t^T + b_t)``. Weights follow torch's Linear layout
(``weight[out, in]``). IR version and opset are pinned low enough for the onnxruntime
versions npcchat accepts (onnx's newest defaults can be newer than onnxruntime loads).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

IR_VERSION = 8
OPSET = 17


@dataclass(frozen=True)
class HeadWeights:
    delta_w: np.ndarray  # [2, hidden]
    delta_b: np.ndarray  # [2]
    flag_w: np.ndarray  # [F, hidden]
    flag_b: np.ndarray  # [F]
    thr_w: np.ndarray  # [F, hidden]
    thr_b: np.ndarray  # [F]

    @property
    def hidden(self) -> int:
        return int(self.delta_w.shape[1])

    @property
    def n_flags(self) -> int:
        return int(self.flag_w.shape[0])

    def check(self) -> None:
        h, f = self.hidden, self.n_flags
        want = {
            "delta_head.weight": (self.delta_w, (2, h)),
            "delta_head.bias": (self.delta_b, (2,)),
            "flag_head.weight": (self.flag_w, (f, h)),
            "flag_head.bias": (self.flag_b, (f,)),
            "threshold_head.weight": (self.thr_w, (f, h)),
            "threshold_head.bias": (self.thr_b, (f,)),
        }
        for name, (arr, shape) in want.items():
            if tuple(arr.shape) != shape:
                raise ValueError(f"{name}: expected shape {shape}, got {tuple(arr.shape)}")
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"{name}: holds non-finite values")


def reference(weights: HeadWeights, state: np.ndarray) -> tuple[np.ndarray, ...]:
    """Numpy oracle of the graph (float64), used by tests."""
    x = state.astype(np.float64)

    def lin(w: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.asarray(x @ w.astype(np.float64).T + b.astype(np.float64))

    return (
        np.tanh(lin(weights.delta_w, weights.delta_b)),
        _sigmoid(lin(weights.flag_w, weights.flag_b)),
        _sigmoid(lin(weights.thr_w, weights.thr_b)),
    )


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function through tanh: no overflow for large ``|z|``."""
    return np.asarray(0.5 * (1.0 + np.tanh(0.5 * z)))


def f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def build(weights: HeadWeights, flags: list[str]) -> bytes:
    """Serialize the heads graph; flag names go into the model's metadata too."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weights.check()
    if len(flags) != weights.n_flags:
        raise ValueError(f"{len(flags)} flag names for {weights.n_flags} flag head outputs")
    inits = [
        numpy_helper.from_array(f32(weights.delta_w.T), "delta_wt"),
        numpy_helper.from_array(f32(weights.delta_b), "delta_b"),
        numpy_helper.from_array(f32(weights.flag_w.T), "flag_wt"),
        numpy_helper.from_array(f32(weights.flag_b), "flag_b"),
        numpy_helper.from_array(f32(weights.thr_w.T), "thr_wt"),
        numpy_helper.from_array(f32(weights.thr_b), "thr_b"),
    ]
    nodes = [
        helper.make_node("Gemm", ["state", "delta_wt", "delta_b"], ["delta_lin"]),
        helper.make_node("Tanh", ["delta_lin"], ["delta"]),
        helper.make_node("Gemm", ["state", "flag_wt", "flag_b"], ["flag_lin"]),
        helper.make_node("Sigmoid", ["flag_lin"], ["flag_prob"]),
        helper.make_node("Gemm", ["state", "thr_wt", "thr_b"], ["thr_lin"]),
        helper.make_node("Sigmoid", ["thr_lin"], ["flag_threshold"]),
    ]
    h, f = weights.hidden, weights.n_flags
    graph = helper.make_graph(
        nodes,
        "npcchat_heads",
        [helper.make_tensor_value_info("state", TensorProto.FLOAT, ["batch", h])],
        [
            helper.make_tensor_value_info("delta", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("flag_prob", TensorProto.FLOAT, ["batch", f]),
            helper.make_tensor_value_info("flag_threshold", TensorProto.FLOAT, ["batch", f]),
        ],
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="npcchat"
    )
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"npcchat.flags": ",".join(flags)})
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())


def write(weights: HeadWeights, flags: list[str], path: Path) -> None:
    path.write_bytes(build(weights, flags))


def random_weights(hidden: int, n_flags: int, seed: int = 0, scale: float = 0.05) -> HeadWeights:
    """Random heads (for tests and benchmarks of untrained models)."""
    rng = np.random.default_rng(seed)

    def n(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return HeadWeights(
        n(2, hidden), n(2), n(n_flags, hidden), n(n_flags), n(n_flags, hidden), n(n_flags)
    )
