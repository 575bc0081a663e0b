"""Fit the three heads on `<STATE>` vectors with numpy only (seconds on a laptop).

* delta: ridge regression through tanh — start from ridge on ``atanh(target)``, then a few
  Gauss-Newton steps on the squared error of ``tanh(x W + b)`` itself;
* flags: L2-regularized logistic regression per flag (Newton's method);
* thresholds: ridge on ``logit(threshold)`` when the data labels thresholds, else the
  F1-optimal threshold per flag on a validation split (a constant head: zero weights,
  ``bias = logit(t)``).

Inputs are standardized internally and the result is folded back into plain Linear
weights, so the ONNX graph stays ``tanh/sigmoid(x W^T + b)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .onnx_builder import HeadWeights, f32

EPS = 1e-4


@dataclass(frozen=True)
class Standardizer:
    mean: np.ndarray
    scale: np.ndarray

    @classmethod
    def of(cls, x: np.ndarray) -> Standardizer:
        return cls(x.mean(axis=0), x.std(axis=0) + 1e-6)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.asarray((x - self.mean) / self.scale)

    def fold(self, w: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Weights on standardized inputs -> weights on raw inputs."""
        w_raw = w / self.scale
        return w_raw, b - w_raw @ self.mean


def _ridge(
    x: np.ndarray, y: np.ndarray, l2: float, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Weighted ridge with an unpenalized intercept; y may have several columns."""
    n, d = x.shape
    sw = np.ones(n) if weights is None else weights
    xa = np.hstack([x, np.ones((n, 1))])
    reg = l2 * np.eye(d + 1)
    reg[-1, -1] = 0.0
    a = xa.T @ (xa * sw[:, None]) + reg
    coef = np.linalg.solve(a, xa.T @ (y * sw[:, None] if y.ndim == 2 else y * sw))
    return coef[:-1].T, coef[-1]


def fit_delta(
    x: np.ndarray, y: np.ndarray, l2: float = 1.0, steps: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """W [2, d], b [2] with ``tanh(x W^T + b) ~ y`` (y in [-1, 1])."""
    z = np.arctanh(np.clip(y, -0.995, 0.995))
    w, b = _ridge(x, z, l2)
    for _ in range(steps):  # Gauss-Newton on the tanh output, one output at a time
        for k in range(y.shape[1]):
            pred = np.tanh(x @ w[k] + b[k])
            g = 1.0 - pred**2
            # linearize: tanh(z + dz) ~ pred + g dz  ->  ridge for the new z with weights g^2
            target = x @ w[k] + b[k] + (y[:, k] - pred) / np.maximum(g, 1e-3)
            w[k], b[k] = _ridge(x, target, l2, weights=g**2 + 1e-6)
    return w, b


def fit_logistic(
    x: np.ndarray, y: np.ndarray, l2: float = 1.0, iters: int = 30
) -> tuple[np.ndarray, float]:
    """w [d], b with ``sigmoid(x w + b) ~ P(y)``; Newton's method with an L2 penalty."""
    n, d = x.shape
    rate = (y.sum() + 0.5) / (n + 1.0)
    w, b = np.zeros(d), float(np.log(rate / (1 - rate)))
    if y.min() == y.max():
        return w, b  # one class only: a calibrated constant
    xa = np.hstack([x, np.ones((n, 1))])
    theta = np.append(w, b)
    reg = l2 * np.eye(d + 1)
    reg[-1, -1] = 1e-8
    for _ in range(iters):
        p = 0.5 * (1.0 + np.tanh(0.5 * (xa @ theta)))  # sigmoid without overflow
        grad = xa.T @ (p - y) + reg @ theta
        hess = xa.T @ (xa * (p * (1 - p))[:, None]) + reg
        step = np.linalg.solve(hess, grad)
        theta -= step
        if np.max(np.abs(step)) < 1e-8:
            break
    return theta[:-1], float(theta[-1])


def logit(p: np.ndarray | float) -> np.ndarray:
    q = np.clip(p, 0.01, 0.99)
    return np.asarray(np.log(q / (1 - q)))


def f1_threshold(probs: np.ndarray, y: np.ndarray) -> float:
    """F1-optimal threshold on a validation split (fire when prob >= t)."""
    from npcchat.eval.metrics import best_threshold

    t, _ = best_threshold(list(map(float, probs)), list(map(bool, y)))
    return float(min(max(t, 0.01), 0.99))


@dataclass(frozen=True)
class FitData:
    x: np.ndarray  # [n, d] state vectors
    delta: np.ndarray  # [n, 2], NaN where unlabelled
    flags: np.ndarray  # [n, F], NaN where unlabelled
    thresholds: np.ndarray  # [n, F], NaN where unlabelled


def fit_heads(
    train: FitData, val: FitData, l2: float = 1.0
) -> tuple[HeadWeights, dict[str, object]]:
    """All three heads; returns the weights and how each threshold was chosen."""
    std = Standardizer.of(train.x)
    xs, xv = std(train.x), std(val.x)
    d = train.x.shape[1]
    n_flags = train.flags.shape[1]
    have_delta = ~np.isnan(train.delta).any(axis=1)
    if have_delta.sum() >= 2:
        dw, db = fit_delta(xs[have_delta], train.delta[have_delta], l2)
    else:
        dw, db = np.zeros((2, d)), np.zeros(2)
    fw, fb = np.zeros((n_flags, d)), np.zeros(n_flags)
    tw, tb = np.zeros((n_flags, d)), np.zeros(n_flags)
    how: dict[str, object] = {}
    for k in range(n_flags):
        m = ~np.isnan(train.flags[:, k])
        if m.sum():
            fw[k], fb[k] = fit_logistic(xs[m], train.flags[m, k], l2)
        mt = ~np.isnan(train.thresholds[:, k])
        if mt.sum() >= 5:
            w, b = _ridge(xs[mt], logit(train.thresholds[mt, k]), l2)
            tw[k], tb[k] = w, b
            how[str(k)] = "regressed on labelled thresholds"
            continue
        mv = ~np.isnan(val.flags[:, k])
        probs = 0.5 * (1.0 + np.tanh(0.5 * (xv[mv] @ fw[k] + fb[k])))
        t = f1_threshold(probs, val.flags[mv, k]) if mv.sum() else 0.5
        tb[k] = float(logit(t))
        how[str(k)] = f"F1-optimal on validation: {t:.3f}"
    dw, db = std.fold(dw, db)
    fw, fb = std.fold(fw, fb)
    tw, tb = std.fold(tw, tb)
    return HeadWeights(f32(dw), f32(db), f32(fw), f32(fb), f32(tw), f32(tb)), how
