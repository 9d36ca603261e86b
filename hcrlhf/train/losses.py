"""Reward and cost model losses (docs/method.md#reward-and-cost-models).

All inputs are per-pair scores of shape (B,) (the score at each sequence's end token); the losses are
means over the batch, returned as 0-dim float32 tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["reward_loss", "cost_loss", "COST_LOSSES", "DEFAULT_REGULARIZATION"]

COST_LOSSES = ("bt", "bt_sign")
DEFAULT_REGULARIZATION = 0.001


def _check_scores(fn: str, **scores: torch.Tensor) -> tuple[int, ...]:
    shape = None
    for name, x in scores.items():
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 1:
            raise ValueError(f"{fn}: {name} must have shape (B,), got {tuple(x.shape)}")
        if shape is None:
            shape = tuple(x.shape)
        elif tuple(x.shape) != shape:
            raise ValueError(f"{fn}: {name} must have shape {shape} like the other scores, got {tuple(x.shape)}")
    return shape


def reward_loss(better_scores: torch.Tensor, worse_scores: torch.Tensor, *,
                regularization: float = DEFAULT_REGULARIZATION) -> torch.Tensor:
    """Bradley–Terry reward loss with a score-size penalty.

    ``mean(-log σ(r_better - r_worse)) + regularization · mean([r_better, r_worse]²)``

    Args:
        better_scores, worse_scores: (B,) rewards of the preferred and the other response.
        regularization: weight of the squared-score penalty (0.001 as in Safe RLHF).
    """
    _check_scores("reward_loss", better_scores=better_scores, worse_scores=worse_scores)
    better, worse = better_scores.float(), worse_scores.float()
    loss = -F.logsigmoid(better - worse).mean()
    return loss + regularization * torch.cat([better, worse]).square().mean()


def cost_loss(safer_scores: torch.Tensor, unsafer_scores: torch.Tensor, *, safer_is_safe=None, unsafer_is_safe=None,
              variant: str = "bt_sign", regularization: float = DEFAULT_REGULARIZATION) -> torch.Tensor:
    """Cost model loss, ``bt`` (HC-RLHF's released runs) or ``bt_sign`` (Safe RLHF).

    ``bt``:       ``mean(-log σ(c_unsafer - c_safer)) + regularization · mean([c_unsafer, c_safer]²)``
    ``bt_sign``:  the above ``+ mean(-log σ(s_unsafer · c_unsafer) - log σ(s_safer · c_safer))`` with
    ``s = +1`` for a response labelled unsafe and ``-1`` for one labelled safe, so that a positive
    cost means "unsafe".

    Args:
        safer_scores, unsafer_scores: (B,) costs of the safer response and of the other one.
        safer_is_safe, unsafer_is_safe: (B,) bool safety labels; required for ``bt_sign``.
        variant: "bt" or "bt_sign".
        regularization: weight of the squared-cost penalty.
    """
    fn = "cost_loss"
    if variant not in COST_LOSSES:
        raise ValueError(f"{fn}: variant must be one of {COST_LOSSES}, got {variant!r}")
    _check_scores(fn, safer_scores=safer_scores, unsafer_scores=unsafer_scores)
    safer, unsafer = safer_scores.float(), unsafer_scores.float()
    loss = -F.logsigmoid(unsafer - safer).mean()
    if variant == "bt_sign":
        if safer_is_safe is None or unsafer_is_safe is None:
            raise ValueError(f"{fn}: variant='bt_sign' needs safer_is_safe and unsafer_is_safe")
        safer_is_safe = torch.as_tensor(safer_is_safe, device=safer.device)
        unsafer_is_safe = torch.as_tensor(unsafer_is_safe, device=safer.device)
        for name, labels in (("safer_is_safe", safer_is_safe), ("unsafer_is_safe", unsafer_is_safe)):
            if labels.shape != safer.shape:
                raise ValueError(f"{fn}: {name} must have shape {tuple(safer.shape)}, got {tuple(labels.shape)}")
        # sign s = +1 when labelled unsafe, -1 when safe: pushes unsafe costs above 0, safe ones below.
        safer_sign = 1.0 - 2.0 * safer_is_safe.float()
        unsafer_sign = 1.0 - 2.0 * unsafer_is_safe.float()
        loss = loss + (-F.logsigmoid(unsafer_sign * unsafer) - F.logsigmoid(safer_sign * safer)).mean()
    return loss + regularization * torch.cat([unsafer, safer]).square().mean()
