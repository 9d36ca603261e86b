"""Reference sequence-level RLOO advantages of reward − β·KL − λ·cost (docs/ops.md#rloo_advantages)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from hcrlhf.reference.gae import compute_dtype
from hcrlhf.reference.safe_advantages import kl_penalty, multiplier_tensor


class RLOOAdvantages(NamedTuple):
    """Outputs of ``rloo_advantages``; each (B,)."""

    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor


def rloo_advantages(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    reward_scores: torch.Tensor,
    cost_scores: torch.Tensor,
    *,
    group_size: int,
    kl_coef: float,
    lagrange_multiplier,
    kl_estimator: str = "k1",
    score_clip: float | None = None,
) -> RLOOAdvantages:
    """Leave-one-out advantages over contiguous groups of ``group_size`` samples per prompt.

    KL_i = Σ_t mask·kl_t; G_i = clamp(reward_i − β·KL_i, ±score_clip) − λ·cost_i;
    A_i = G_i − mean of G_j over the other members of i's group. Costs are not clipped.
    """
    dtype = compute_dtype(logprobs, ref_logprobs, reward_scores, cost_scores)
    valid = mask != 0
    kl = torch.where(valid, kl_penalty(logprobs.to(dtype), ref_logprobs.to(dtype), kl_estimator), 0.0)
    kl = kl.sum(dim=-1)
    returns = reward_scores.to(dtype) - kl_coef * kl
    if score_clip is not None:
        returns = returns.clamp(-score_clip, score_clip)
    returns = returns - multiplier_tensor(lagrange_multiplier, dtype, valid.device) * cost_scores.to(dtype)
    groups = returns.view(-1, group_size)
    others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    advantages = (groups - others_mean).reshape(-1)
    return RLOOAdvantages(advantages, returns, kl)
