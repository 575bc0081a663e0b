"""State heads on `<STATE>`: the heads, the vector they read, and their loss, written once.

The runtime reads the post-final-norm hidden state at the prompt's `<STATE>` token(s)
(their mean when a template has several) and runs the ONNX heads on it: ``delta =
tanh(W_d x + b_d)``, ``flag_prob = sigmoid(W_f x + b_f)``, ``flag_threshold = sigmoid(W_t
x + b_t)`` (npcchat_heads.onnx_builder). Training must read the same vector through the
same functions, or the heads learn something the runtime never computes: the original
system trained its heads on the last token while serving `<STATE>`
(``../shared/REFERENCE.md`` section 5). Everything that trains heads (the demo recipe, and
``npcchat train`` to come) uses this module, so there is one definition of the vector and
one of the loss.

The parameter names (``delta_head``, ``flag_head``, ``threshold_head``, each a torch
``Linear``) are the ones ``npcchat convert`` reads from ``.pt`` or ``.safetensors``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class LossWeights:
    """How much each part of the state loss counts (the LM loss on the reply counts 1).
    ``flag_pos_weight``: flags are rare (a few % positive), so positives weigh more."""

    delta: float = 4.0
    flags: float = 1.0
    thresholds: float = 1.0
    flag_pos_weight: float = 4.0


def heads(hidden_size: int, n_flags: int) -> Any:
    """The three heads as torch modules, named as ``npcchat convert`` reads them."""
    from torch import nn

    class StateHeads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.delta_head = nn.Linear(hidden_size, 2)
            self.flag_head = nn.Linear(hidden_size, n_flags)
            self.threshold_head = nn.Linear(hidden_size, n_flags)

    return StateHeads()


def state_vectors(hidden: Any, positions: Sequence[Sequence[int]]) -> Any:
    """``[batch, hidden]``: per record, the mean of the final hidden states (``hidden``:
    ``[batch, time, hidden]``, after the final norm) at its `<STATE>` positions."""
    import torch

    rows = [hidden[i, list(p)].mean(dim=0) for i, p in enumerate(positions)]
    return torch.stack(rows)


def state_loss(
    module: Any,
    vectors: Any,
    delta: Any,
    flags: Any,
    thresholds: Any | None = None,
    weights: LossWeights | None = None,
) -> dict[str, Any]:
    """The parts of the state loss, each weighted, and ``"total"``: the delta MSE through
    tanh (what the runtime's head computes), the flags' BCE on their logits, and the
    thresholds' MSE through sigmoid where the labels carry thresholds (``thresholds``:
    ``[batch, flags]``; None: no threshold loss).

    A NaN label is no label: a record without a delta, a flag a record does not name, a
    threshold it does not give. Each part is the mean over the labels present (with every
    label present, exactly the plain mean), and a part with no label in the batch is 0."""
    import torch
    from torch.nn import functional as F

    w = weights or LossWeights()
    zero = vectors.sum() * 0.0  # keeps the graph and the device
    parts: dict[str, Any] = {}
    known = ~torch.isnan(delta)
    if bool(known.any()):
        predicted = torch.tanh(module.delta_head(vectors))
        parts["delta"] = F.mse_loss(predicted[known], delta[known]) * w.delta
    else:
        parts["delta"] = zero
    known = ~torch.isnan(flags)
    if bool(known.any()):
        pos_weight = torch.full((flags.shape[1],), w.flag_pos_weight, device=flags.device)
        each = F.binary_cross_entropy_with_logits(
            module.flag_head(vectors),
            torch.nan_to_num(flags),
            pos_weight=pos_weight,
            reduction="none",
        )
        parts["flags"] = each[known].mean() * w.flags
    else:
        parts["flags"] = zero
    if thresholds is not None:
        known = ~torch.isnan(thresholds)
        if bool(known.any()):
            predicted = torch.sigmoid(module.threshold_head(vectors))
            parts["thresholds"] = F.mse_loss(predicted[known], thresholds[known]) * w.thresholds
    total = parts["delta"] + parts["flags"]
    if "thresholds" in parts:
        total = total + parts["thresholds"]
    parts["total"] = total
    return parts


def lm_loss(logits: Any, targets: Any) -> Any:
    """The language-model loss: mean cross-entropy of the reply tokens (and the token that
    ends the reply) only; ``targets`` is -100 at every other position (the prompt is given,
    never learned)."""
    from torch.nn import functional as F

    scored = targets != -100
    if not bool(scored.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits[scored].float(), targets[scored])
