"""Reference sequence-level RLOO advantages of reward − β·KL − λ·cost (docs/ops.md#rloo_advantages)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from hcrlhf.reference.group_advantages import (
    broadcast,
    dense_group_ids,
    group_sum,
    scorable_rows,
    sequence_kl_and_returns,
)


class RLOOAdvantages(NamedTuple):
    """Outputs of ``rloo_advantages``; each (B,), or (B, T) with ``per_token=True``."""

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
    group_size: int | None = None,
    group_index: torch.Tensor | None = None,
    kl_coef: float,
    lagrange_multiplier,
    kl_estimator: str = "k1",
    score_clip: float | None = None,
    clip_before_kl: bool = False,
    mask_nan_rewards: bool = False,
    per_token: bool = False,
) -> RLOOAdvantages:
    """Leave-one-out advantages over groups of samples of one prompt.

    Groups: contiguous runs of ``group_size`` rows, or the rows with equal ``group_index``.
    KL_i = Σ_t mask·kl_t; G_i = clamp(reward_i − β·KL_i, ±score_clip) − λ·cost_i (with
    ``clip_before_kl`` the raw reward is clamped instead); A_i = G_i − mean of G_j over the other
    (scorable) members of i's group, or G_i when it has none (verl's size-1 rule). Costs are not
    clipped. With ``mask_nan_rewards`` a row with a NaN reward or cost score gets A_i = 0 and is
    left out of the others' baselines (TRL's unscorable completions).
    """
    kl_tokens, kl, returns = sequence_kl_and_returns(
        logprobs, ref_logprobs, mask, reward_scores, cost_scores, kl_coef=kl_coef,
        lagrange_multiplier=lagrange_multiplier, kl_estimator=kl_estimator, score_clip=score_clip,
        clip_before_kl=clip_before_kl)
    scorable = scorable_rows(reward_scores, cost_scores, mask_nan_rewards)
    ids = dense_group_ids(returns.shape[0], group_size, group_index, returns.device)
    total = group_sum(torch.where(scorable, returns, 0.0), ids, group_size)
    others = group_sum(scorable.to(returns.dtype), ids, group_size) - 1
    others_mean = torch.where(others > 0, (total - returns) / others.clamp(min=1), 0.0)
    advantages = torch.where(scorable, returns - others_mean, 0.0)
    if per_token:
        return RLOOAdvantages(broadcast(advantages, mask), broadcast(returns, mask), kl_tokens)
    return RLOOAdvantages(advantages, returns, kl)
