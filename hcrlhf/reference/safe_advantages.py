"""Reference KL-penalised reward − λ·cost advantages, Safe RLHF's PPO mode (docs/ops.md#safe_advantages)."""

from __future__ import annotations

from typing import NamedTuple

import torch

from hcrlhf.reference.gae import compute_dtype, gae

WHITEN_EPS = 1e-8
# k3 as verl's kl_penalty "low_var_kl": the log-ratio clamped to ±K3_LOG_RATIO_CLIP before exp,
# the estimate clamped to ±K3_CLIP after (docs/ops.md#kl-estimators). Keeps k3 finite (≤ 10) for
# any log-ratio, ±inf included; NaN still propagates.
K3_LOG_RATIO_CLIP = 20.0
K3_CLIP = 10.0


class SafeAdvantages(NamedTuple):
    """Outputs of ``safe_advantages``; each (B, T), zero on masked positions."""

    advantages: torch.Tensor
    reward_advantages: torch.Tensor
    cost_advantages: torch.Tensor
    reward_returns: torch.Tensor
    cost_returns: torch.Tensor
    kl: torch.Tensor


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token KL estimate with d = logprobs − ref_logprobs: k1 = d, k2 = d²/2, k3 = e^{−d} − 1 + d.

    k3 follows verl's "low_var_kl": d is clamped to [−20, 20] first and the estimate to [−10, 10]
    after (k3 ≥ 0, so it is at most 10), so it is finite for any d, ±inf included.
    """
    d = logprobs - ref_logprobs
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        d = d.clamp(-K3_LOG_RATIO_CLIP, K3_LOG_RATIO_CLIP)
        return (torch.exp(-d) - 1.0 + d).clamp(-K3_CLIP, K3_CLIP)
    raise ValueError(f"kl_estimator must be one of ('k1', 'k2', 'k3'), got {estimator!r}")


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


def masked_whiten(x: torch.Tensor, valid: torch.Tensor, eps: float = WHITEN_EPS) -> torch.Tensor:
    """(x − mean)·rsqrt(var + eps) with mean and unbiased variance over all valid entries.

    With fewer than two valid entries the variance is taken as 0. Masked entries become 0.
    """
    count = valid.sum()
    mean = torch.where(valid, x, 0.0).sum() / count.clamp(min=1)
    centred = torch.where(valid, x - mean, 0.0)
    var = (centred * centred).sum() / (count - 1).clamp(min=1)
    var = torch.where(count > 1, var, 0.0)
    return centred * torch.rsqrt(var + eps)


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
) -> SafeAdvantages:
    """Per-token advantages of reward − λ·cost with a KL penalty (shapes: see docs/ops.md#safe_advantages).

    λ is ``lagrange_multiplier``; ``gae_lambda`` is the GAE λ of both streams. With
    ``divide_by_one_plus_lambda`` the combination A_r − λ·A_c is divided by 1 + λ (Safe RLHF's
    scaling); ``whiten`` then whitens it over all valid tokens.
    """
    dtype = compute_dtype(logprobs, ref_logprobs, reward_scores, cost_scores, reward_values, cost_values)
    valid = mask != 0
    kl = torch.where(valid, kl_penalty(logprobs.to(dtype), ref_logprobs.to(dtype), kl_estimator), 0.0)
    end = last_valid_index(valid)
    is_end = torch.arange(valid.shape[-1], device=valid.device) == end[:, None]
    rewards = -kl_coef * kl + torch.where(is_end, reward_scores.to(dtype)[:, None], 0.0)
    costs = (kl_coef * kl if kl_in_cost else torch.zeros_like(kl)) + torch.where(
        is_end, cost_scores.to(dtype)[:, None], 0.0
    )
    if score_clip is not None:
        rewards = rewards.clamp(-score_clip, score_clip)
        costs = costs.clamp(-score_clip, score_clip)
    reward_advantages, reward_returns = gae(rewards, reward_values.to(dtype), valid, gamma, gae_lambda)
    cost_advantages, cost_returns = gae(costs, cost_values.to(dtype), valid, gamma, gae_lambda)
    multiplier = multiplier_tensor(lagrange_multiplier, dtype, valid.device)
    advantages = reward_advantages - multiplier * cost_advantages
    if divide_by_one_plus_lambda:
        advantages = advantages / (1.0 + multiplier)
    if whiten:
        advantages = masked_whiten(advantages, valid)
    advantages = torch.where(valid, advantages, 0.0)
    return SafeAdvantages(advantages, reward_advantages, cost_advantages, reward_returns, cost_returns, kl)
