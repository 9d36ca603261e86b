"""Reference KL-penalised reward − λ·cost advantages, Safe RLHF's PPO mode (docs/ops.md#safe_advantages)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from hcrlhf.reference.gae import WHITEN_EPS, WHITEN_VARIANCES, compute_dtype, gae, masked_whiten
from hcrlhf.reference.kl_penalty import K3_CLIP, K3_LOG_RATIO_CLIP, kl_penalty

__all__ = [
    "K3_CLIP", "K3_LOG_RATIO_CLIP", "WHITEN_EPS", "WHITEN_VARIANCES", "SafeAdvantages", "kl_penalty",
    "last_valid_index", "masked_whiten", "multiplier_tensor", "safe_advantages",
]


class SafeAdvantages(NamedTuple):
    """Outputs of ``safe_advantages``; each (B, T), zero on masked positions."""

    advantages: torch.Tensor
    reward_advantages: torch.Tensor
    cost_advantages: torch.Tensor
    reward_returns: torch.Tensor
    cost_returns: torch.Tensor
    kl: torch.Tensor


def last_valid_index(valid: torch.Tensor) -> torch.Tensor:
    """(B,) index of each row's last valid position (its end), −1 for a row with none."""
    if valid.shape[-1] == 0:  # amax over an empty dim would raise
        return torch.full(valid.shape[:-1], -1, dtype=torch.int64, device=valid.device)
    positions = torch.arange(valid.shape[-1], device=valid.device)
    return torch.where(valid, positions, -1).amax(dim=-1)


def multiplier_tensor(lagrange_multiplier, dtype, device) -> torch.Tensor:
    """λ as a 0-dim tensor; a negative or non-finite λ becomes NaN (visible, never silently used)."""
    multiplier = torch.as_tensor(lagrange_multiplier, dtype=dtype, device=device)
    return torch.where(torch.isfinite(multiplier) & (multiplier >= 0), multiplier, torch.nan)


def safe_advantages(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    reward_scores: torch.Tensor,
    cost_scores: torch.Tensor,
    reward_values: torch.Tensor,
    cost_values: torch.Tensor,
    *,
    kl_coef: float,
    lagrange_multiplier,
    gamma: float = 1.0,
    gae_lambda: float = 0.95,
    kl_estimator: str = "k1",
    score_clip: float | None = None,
    kl_in_cost: bool = True,
    divide_by_one_plus_lambda: bool = True,
    whiten: bool = False,
    clip_before_kl: bool = False,
    whiten_variance: str = "unbiased",
    whiten_shift_mean: bool = True,
) -> SafeAdvantages:
    """Per-token advantages of reward − λ·cost with a KL penalty (shapes: see docs/ops.md#safe_advantages).

    λ is ``lagrange_multiplier``; ``gae_lambda`` is the GAE λ of both streams. With
    ``divide_by_one_plus_lambda`` the combination A_r − λ·A_c is divided by 1 + λ (Safe RLHF's
    scaling); ``whiten`` then whitens it over all valid tokens (``masked_whiten`` with
    ``whiten_variance`` and ``whiten_shift_mean``). ``clip_before_kl``: ``score_clip`` clamps the
    raw scores before the KL term is added, instead of the per-token totals.
    """
    dtype = compute_dtype(logprobs, ref_logprobs, reward_scores, cost_scores, reward_values, cost_values)
    valid = mask != 0
    kl = torch.where(valid, kl_penalty(logprobs.to(dtype), ref_logprobs.to(dtype), kl_estimator), 0.0)
    end = last_valid_index(valid)
    is_end = torch.arange(valid.shape[-1], device=valid.device) == end[:, None]
    reward_scores, cost_scores = reward_scores.to(dtype), cost_scores.to(dtype)
    if score_clip is not None and clip_before_kl:
        # TRL / OpenRLHF: the raw scores are clamped; the KL term is added unclamped.
        reward_scores = reward_scores.clamp(-score_clip, score_clip)
        cost_scores = cost_scores.clamp(-score_clip, score_clip)
    rewards = -kl_coef * kl + torch.where(is_end, reward_scores[:, None], 0.0)
    costs = (kl_coef * kl if kl_in_cost else torch.zeros_like(kl)) + torch.where(
        is_end, cost_scores[:, None], 0.0
    )
    if score_clip is not None and not clip_before_kl:
        rewards = rewards.clamp(-score_clip, score_clip)
        costs = costs.clamp(-score_clip, score_clip)
    reward_advantages, reward_returns = gae(rewards, reward_values.to(dtype), valid, gamma, gae_lambda)
    cost_advantages, cost_returns = gae(costs, cost_values.to(dtype), valid, gamma, gae_lambda)
    multiplier = multiplier_tensor(lagrange_multiplier, dtype, valid.device)
    advantages = reward_advantages - multiplier * cost_advantages
    if divide_by_one_plus_lambda:
        advantages = advantages / (1.0 + multiplier)
    if whiten:
        advantages = masked_whiten(advantages, valid, variance=whiten_variance, shift_mean=whiten_shift_mean)
    advantages = torch.where(valid, advantages, 0.0)
    return SafeAdvantages(advantages, reward_advantages, cost_advantages, reward_returns, cost_returns, kl)
