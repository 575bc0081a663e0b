"""Heads runtime: the only module that imports onnxruntime.

The graph already applies tanh and sigmoid; this module only checks shapes, runs it, and
turns the arrays into named results. A flag fires when probability >= threshold: no jitter,
no randomness (the original added noise to flag decisions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from npcchat.errors import BundleError
from npcchat.types import DELTA_NAMES, FlagResult, HeadsOutput

OUTPUTS = ("delta", "flag_prob", "flag_threshold")


class Heads:
    """An onnxruntime session over one heads file, checked against the bundle."""

    def __init__(self, path: Path, flags: tuple[str, ...], hidden: int) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        # Three tiny GEMMs: thread-pool hand-offs would cost more than the math.
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            self._sess: Any = ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:
            raise BundleError(f"{path}: onnxruntime cannot load the heads ({e})") from None
        self.path = path
        self.flags = flags
        self.hidden = hidden
        self._check(path)
        self._input = self._sess.get_inputs()[0].name

    def _check(self, path: Path) -> None:
        inputs = self._sess.get_inputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 2:
            raise BundleError(f"{path}: heads must take one input state[batch, hidden]")
        width = inputs[0].shape[1]
        if width != self.hidden:
            raise BundleError(
                f"{path}: heads input size is {width}, but the model's n_embd is {self.hidden}"
            )
        outs = {o.name: o.shape for o in self._sess.get_outputs()}
        missing = [o for o in OUTPUTS if o not in outs]
        if missing:
            raise BundleError(f"{path}: heads lack output(s) {', '.join(missing)}")
        if outs["delta"][1] != len(DELTA_NAMES):
            raise BundleError(f"{path}: delta output has {outs['delta'][1]} values, expected 2")
        for name in ("flag_prob", "flag_threshold"):
            if outs[name][1] != len(self.flags):
                raise BundleError(
                    f"{path}: {name} has {outs[name][1]} outputs but the manifest names "
                    f"{len(self.flags)} flags"
                )

    def run_batch(self, states: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Raw head outputs for ``states[batch, hidden]``."""
        x = np.ascontiguousarray(states, dtype=np.float32)
        delta, prob, thr = self._sess.run(list(OUTPUTS), {self._input: x})
        return delta, prob, thr

    def run(self, state: np.ndarray) -> HeadsOutput:
        """Named outputs for one `<STATE>` vector. A NaN or infinity anywhere (broken heads,
        or a model whose hidden state overflowed) refuses the turn: it must never become a
        silent 0.0 in the game's state, nor bare NaN in JSON."""
        delta, prob, thr = self.run_batch(state.reshape(1, -1))
        if not (np.isfinite(delta).all() and np.isfinite(prob).all() and np.isfinite(thr).all()):
            what = "the <STATE> vector" if not np.isfinite(state).all() else "the heads"
            raise BundleError(
                f"{self.path}: the heads gave NaN or infinity for this turn ({what} is not finite)",
                hint="refit the heads (npcchat heads fit) or check the model with npcchat convert",
            )
        return decide(self.flags, delta[0], prob[0], thr[0])


def decide(
    flags: tuple[str, ...], delta: np.ndarray, prob: np.ndarray, thr: np.ndarray
) -> HeadsOutput:
    """Name the outputs; a flag fires when its probability reaches its threshold."""
    deltas = {name: float(np.clip(delta[i], -1.0, 1.0)) for i, name in enumerate(DELTA_NAMES)}
    results = {
        name: FlagResult(float(prob[i]), float(thr[i]), bool(prob[i] >= thr[i]))
        for i, name in enumerate(flags)
    }
    return HeadsOutput(deltas=deltas, flags=results)


def runtime_info() -> dict[str, Any]:
    """onnxruntime's version and the execution providers this install offers."""
    import onnxruntime as ort

    return {"version": ort.__version__, "providers": list(ort.get_available_providers())}
