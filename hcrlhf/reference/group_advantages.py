"""Reference group-baseline advantages: GRPO, Dr. GRPO and REINFORCE++ of reward − β·KL − λ·cost
(docs/ops.md#group_advantages), and the grouping helpers shared with ``rloo_advantages``."""

from __future__ import annotations

from typing import NamedTuple

import torch

from hcrlhf.reference.gae import compute_dtype, masked_whiten
from hcrlhf.reference.safe_advantages import kl_penalty, last_valid_index, multiplier_tensor

ESTIMATORS = ("grpo", "dr_grpo", "reinforce_pp")
WHITEN_VARIANCES = ("unbiased", "population")
# The peers' defaults: verl's GRPO epsilon (std + eps) and verl's masked_whiten (rsqrt(var + eps)).
DEFAULT_EPS = {"grpo": 1e-6, "dr_grpo": 1e-6, "reinforce_pp": 1e-8}


class GroupAdvantages(NamedTuple):
    """Outputs of ``group_advantages``; each (B,) or (B, T) (see docs/ops.md#group_advantages)."""

    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor


def dense_group_ids(batch: int, group_size: int | None, group_index: torch.Tensor | None,
                    device: torch.device) -> torch.Tensor:
    """(B,) int64 group ids in [0, B): rows with equal ``group_index`` share an id.

    ``group_size`` k gives the contiguous layout (row i in group i // k). An arbitrary ``group_index``
    is densified by a stable sort: a new id starts wherever the sorted values change. No host read
    and no data-dependent shape (unlike torch.unique), so it runs under torch.compile and on CUDA
    without a synchronisation; at most B ids are used.
    """
    if group_index is None:
        return torch.arange(batch, device=device) // group_size
    values, order = torch.sort(group_index.to(torch.int64), stable=True)
    starts = torch.ones_like(values, dtype=torch.bool)
    starts[1:] = values[1:] != values[:-1]
    ids = torch.empty_like(order)
    ids[order] = torch.cumsum(starts.to(torch.int64), 0) - 1
    return ids


def group_sum(x: torch.Tensor, ids: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """Σ of x over each row's group, gathered back to the rows: (B,)."""
    if group_size is not None:  # contiguous groups: today's exact summation order
        return x.view(-1, group_size).sum(dim=1, keepdim=True).expand(-1, group_size).reshape(-1)
    return torch.zeros_like(x).index_add_(0, ids, x)[ids]


def sequence_kl_and_returns(logprobs, ref_logprobs, mask, reward_scores, cost_scores, *, kl_coef,
                            lagrange_multiplier, kl_estimator, score_clip, clip_before_kl):
    """Per-token kl (B, T), its row sums KL (B,) and G = shaped reward − λ·cost (B,), in the compute dtype.

    clip_before_kl=False: G = clamp(reward − β·KL, ±c) − λ·cost (HC-RLHF's default);
    clip_before_kl=True:  G = clamp(reward, ±c) − β·KL − λ·cost (TRL / OpenRLHF clip the raw score).
    """
    dtype = compute_dtype(logprobs, ref_logprobs, reward_scores, cost_scores)
    valid = mask != 0
    kl_tokens = torch.where(valid, kl_penalty(logprobs.to(dtype), ref_logprobs.to(dtype), kl_estimator), 0.0)
    kl = kl_tokens.sum(dim=-1)
    reward = reward_scores.to(dtype)
    if clip_before_kl:
        if score_clip is not None:
            reward = reward.clamp(-score_clip, score_clip)
        shaped = reward - kl_coef * kl
    else:
        shaped = reward - kl_coef * kl
        if score_clip is not None:
            shaped = shaped.clamp(-score_clip, score_clip)
    returns = shaped - multiplier_tensor(lagrange_multiplier, dtype, valid.device) * cost_scores.to(dtype)
    return kl_tokens, kl, returns


def scorable_rows(reward_scores, cost_scores, mask_nan_rewards: bool) -> torch.Tensor:
    """(B,) bool: rows that take part in the baselines (all rows unless mask_nan_rewards)."""
    if not mask_nan_rewards:
        return torch.ones(reward_scores.shape, dtype=torch.bool, device=reward_scores.device)
    return ~(torch.isnan(reward_scores.to(torch.float64)) | torch.isnan(cost_scores.to(torch.float64)))


def broadcast(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, T): each row's value on its valid positions, 0 elsewhere."""
    return torch.where(mask != 0, values[:, None], 0.0)


def group_advantages(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    mask: torch.Tensor,
    reward_scores: torch.Tensor,
    cost_scores: torch.Tensor,
    *,
    estimator: str,
    group_size: int | None = None,
    group_index: torch.Tensor | None = None,
    kl_coef: float,
    lagrange_multiplier,
    kl_estimator: str = "k1",
    score_clip: float | None = None,
    clip_before_kl: bool = False,
    mask_nan_rewards: bool = False,
    eps: float | None = None,
    whiten_variance: str = "unbiased",
    per_token: bool | None = None,
) -> GroupAdvantages:
    """GRPO / Dr. GRPO / REINFORCE++ advantages (semantics: docs/ops.md#group_advantages).

    grpo:    A_i = (G_i − mean_g) / (std_g + eps), std unbiased (torch.std, as verl);
    dr_grpo: A_i = G_i − mean_g;
    a row alone in its group (after NaN masking) gets mean 0, std 1 (verl's size-1 rule).
    reinforce_pp: per-token rewards r_t = −β·kl_t (+ score at the end, − λ·cost), returns
    R_t = Σ_{s ≥ t valid} r_s (γ = 1), advantages = R whitened over all valid tokens of the batch
    (``masked_whiten``: "unbiased" rsqrt(var + eps) as verl, "population" rsqrt(max(var, eps)) as OpenRLHF).
    """
    eps = DEFAULT_EPS[estimator] if eps is None else eps
    per_token = estimator == "reinforce_pp" if per_token is None else per_token
    scorable = scorable_rows(reward_scores, cost_scores, mask_nan_rewards)
    if estimator == "reinforce_pp":
        return _reinforce_pp(logprobs, ref_logprobs, mask, reward_scores, cost_scores, scorable, kl_coef=kl_coef,
                             lagrange_multiplier=lagrange_multiplier, kl_estimator=kl_estimator,
                             score_clip=score_clip, clip_before_kl=clip_before_kl, eps=eps,
                             whiten_variance=whiten_variance)
    kl_tokens, kl, returns = sequence_kl_and_returns(
        logprobs, ref_logprobs, mask, reward_scores, cost_scores, kl_coef=kl_coef,
        lagrange_multiplier=lagrange_multiplier, kl_estimator=kl_estimator, score_clip=score_clip,
        clip_before_kl=clip_before_kl)
    ids = dense_group_ids(returns.shape[0], group_size, group_index, returns.device)
    counted = torch.where(scorable, returns, 0.0)
    count = group_sum(scorable.to(returns.dtype), ids, group_size)
    alone = count < 2
    mean = torch.where(alone, 0.0, group_sum(counted, ids, group_size) / count.clamp(min=1))
    centred = returns - mean
    if estimator == "grpo":
        squares = group_sum(torch.where(scorable, centred * centred, 0.0), ids, group_size)
        std = torch.where(alone, 1.0, torch.sqrt(squares / (count - 1).clamp(min=1)))
        advantages = centred / (std + eps)
    else:
        advantages = centred
    advantages = torch.where(scorable, advantages, 0.0)
    if per_token:
        return GroupAdvantages(broadcast(advantages, mask), broadcast(returns, mask), kl_tokens)
    return GroupAdvantages(advantages, returns, kl)


def _reinforce_pp(logprobs, ref_logprobs, mask, reward_scores, cost_scores, scorable, *, kl_coef,
                  lagrange_multiplier, kl_estimator, score_clip, clip_before_kl, eps, whiten_variance):
    dtype = compute_dtype(logprobs, ref_logprobs, reward_scores, cost_scores)
    valid = mask != 0
    kl = torch.where(valid, kl_penalty(logprobs.to(dtype), ref_logprobs.to(dtype), kl_estimator), 0.0)
    end = last_valid_index(valid)
    at_end = torch.arange(valid.shape[-1], device=valid.device)[None, :] == end[:, None]
    reward = reward_scores.to(dtype)
    if clip_before_kl and score_clip is not None:
        reward = reward.clamp(-score_clip, score_clip)
    rewards = -kl_coef * kl + torch.where(at_end, reward[:, None], 0.0)
    if not clip_before_kl and score_clip is not None:  # per token, like safe_advantages
        rewards = rewards.clamp(-score_clip, score_clip)
    multiplier = multiplier_tensor(lagrange_multiplier, dtype, valid.device)
    rewards = torch.where(at_end, rewards - multiplier * cost_scores.to(dtype)[:, None], rewards)
    rewards = torch.where(valid, rewards, 0.0)
    # R_t = Σ_{s ≥ t} r_s (γ = 1); holes carry the running return through (their reward is 0)
    returns = torch.where(valid, rewards.flip(-1).cumsum(-1).flip(-1), 0.0)
    # whitened over the valid tokens of the scorable rows (verl's / OpenRLHF's batch whitening)
    advantages = masked_whiten(returns, valid & scorable[:, None], eps, variance=whiten_variance)
    return GroupAdvantages(advantages, returns, kl)
