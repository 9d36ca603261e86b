"""Triton group_advantages (docs/ops.md#group_advantages), and rloo_advantages' opt-in options.

rloo / grpo / dr_grpo: one launch computes each row's KL sum (and the per-token kl when asked) and
G = shaped reward − λ·cost; the group statistics are then O(B) segment sums (``index_add``) on the
dense group ids the op layer made by a stable sort. Why not one program per group as in
kernels/rloo_advantages.py: with a ``group_index`` the group sizes are data, and sizing a per-group
block from them would need a host read (a synchronisation); the segment sums need none, and they
are B-sized work next to the B×T pass that reads the log-probs.

reinforce_pp: one launch sweeps each row right to left in BLOCK_T chunks (lanes in descending
position order, so a cumulative sum over the lanes is the return R_t = Σ_{s ≥ t} r_s), stores the
per-token kl and returns and each row's moments of R (count, mean, M2); the batch mean and variance
are combined from the B row moments (Chan et al.) and one elementwise pass whitens.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hcrlhf._op_outputs import new_outputs
from hcrlhf.kernels.gae import block_t_for, update_moments
from hcrlhf.kernels.safe_advantages import KL_ESTIMATOR_CODES, _clamp_keep_nan, kl_estimate, load_multiplier


@triton.jit
def _sequence_kernel(
    lp_ptr, ref_ptr, mask_ptr, rscore_ptr, cscore_ptr, multiplier_ptr, returns_ptr, kl_sum_ptr, kl_ptr,
    B, T,
    s_lp_b, s_lp_t, s_ref_b, s_ref_t, s_m_b, s_m_t, s_rs, s_cs,
    kl_coef, multiplier_value, score_clip,
    KL_ESTIMATOR: tl.constexpr, MULTIPLIER_IS_TENSOR: tl.constexpr, CLIP_BEFORE_KL: tl.constexpr,
    PER_TOKEN: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    kl_sum = tl.zeros((ROWS,), tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        inside = row_ok[:, None] & (cols < T)[None, :]
        cols64 = cols.to(tl.int64)[None, :]
        m = tl.load(mask_ptr + rows64[:, None] * s_m_b + cols64 * s_m_t, mask=inside, other=0)
        lp = tl.load(lp_ptr + rows64[:, None] * s_lp_b + cols64 * s_lp_t, mask=inside, other=0.0).to(tl.float32)
        ref = tl.load(ref_ptr + rows64[:, None] * s_ref_b + cols64 * s_ref_t, mask=inside, other=0.0).to(tl.float32)
        kl = tl.where(inside & (m != 0), kl_estimate(lp, ref, KL_ESTIMATOR), 0.0)
        kl_sum += tl.sum(kl, axis=1)
        if PER_TOKEN:
            tl.store(kl_ptr + rows64[:, None] * T + cols64, kl, mask=inside)

    reward = tl.load(rscore_ptr + rows64 * s_rs, mask=row_ok, other=0.0).to(tl.float32)
    cost = tl.load(cscore_ptr + rows64 * s_cs, mask=row_ok, other=0.0).to(tl.float32)
    multiplier = load_multiplier(multiplier_ptr, multiplier_value, MULTIPLIER_IS_TENSOR)
    if CLIP_BEFORE_KL:
        shaped = _clamp_keep_nan(reward, -score_clip, score_clip) - kl_coef * kl_sum
    else:
        shaped = _clamp_keep_nan(reward - kl_coef * kl_sum, -score_clip, score_clip)
    tl.store(returns_ptr + rows64, shaped - multiplier * cost, mask=row_ok)
    tl.store(kl_sum_ptr + rows64, kl_sum, mask=row_ok)


@triton.jit
def _reinforce_pp_kernel(
    lp_ptr, ref_ptr, mask_ptr, rscore_ptr, cscore_ptr, multiplier_ptr, ret_ptr, kl_ptr, stats_ptr,
    B, T,
    s_lp_b, s_lp_t, s_ref_b, s_ref_t, s_m_b, s_m_t, s_rs, s_cs,
    kl_coef, multiplier_value, score_clip,
    KL_ESTIMATOR: tl.constexpr, MULTIPLIER_IS_TENSOR: tl.constexpr, CLIP_BEFORE_KL: tl.constexpr,
    MASK_NAN: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    reward = tl.load(rscore_ptr + rows64 * s_rs, mask=row_ok, other=0.0).to(tl.float32)
    cost = tl.load(cscore_ptr + rows64 * s_cs, mask=row_ok, other=0.0).to(tl.float32)
    multiplier = load_multiplier(multiplier_ptr, multiplier_value, MULTIPLIER_IS_TENSOR)
    counted = row_ok
    if MASK_NAN:  # a NaN score leaves the row out of the whitening statistics
        counted = counted & (reward == reward) & (cost == cost)
    if CLIP_BEFORE_KL:
        reward = _clamp_keep_nan(reward, -score_clip, score_clip)
    cost = multiplier * cost
    rows64 = rows64[:, None]

    end = tl.full((ROWS,), -1, tl.int32)
    running = tl.zeros((ROWS,), tl.float32)
    count = tl.zeros((ROWS,), tl.float32)
    mean = tl.zeros((ROWS,), tl.float32)
    m2 = tl.zeros((ROWS,), tl.float32)
    n_chunks = tl.cdiv(T, BLOCK_T)
    for k in range(0, n_chunks):
        cols = (n_chunks - k) * BLOCK_T - 1 - tl.arange(0, BLOCK_T)  # descending: right to left
        inside = row_ok[:, None] & (cols < T)[None, :]
        cols64 = cols.to(tl.int64)[None, :]
        m = tl.load(mask_ptr + rows64 * s_m_b + cols64 * s_m_t, mask=inside, other=0)
        valid = inside & (m != 0)
        lp = tl.load(lp_ptr + rows64 * s_lp_b + cols64 * s_lp_t, mask=inside, other=0.0).to(tl.float32)
        ref = tl.load(ref_ptr + rows64 * s_ref_b + cols64 * s_ref_t, mask=inside, other=0.0).to(tl.float32)
        kl = tl.where(valid, kl_estimate(lp, ref, KL_ESTIMATOR), 0.0)
        # The end is the rightmost valid position: fixed by the first chunk (from the right) that has one.
        chunk_last = tl.max(tl.where(valid, cols[None, :], -1), axis=1)
        end = tl.where(end >= 0, end, chunk_last)
        is_end = cols[None, :] == end[:, None]
        rewards = -kl_coef * kl + tl.where(is_end, reward[:, None], 0.0)
        if not CLIP_BEFORE_KL:  # per token, like safe_advantages
            rewards = _clamp_keep_nan(rewards, -score_clip, score_clip)
        rewards = tl.where(valid, rewards - tl.where(is_end, cost[:, None], 0.0), 0.0)
        returns = running[:, None] + tl.cumsum(rewards, axis=1)
        running += tl.sum(rewards, axis=1)
        returns = tl.where(valid, returns, 0.0)
        out = rows64 * T + cols64
        tl.store(ret_ptr + out, returns, mask=inside)
        tl.store(kl_ptr + out, kl, mask=inside)
        count, mean, m2 = update_moments(returns, valid & counted[:, None], count, mean, m2)
    tl.store(stats_ptr + rows * 3 + 0, count, mask=row_ok)
    tl.store(stats_ptr + rows * 3 + 1, mean, mask=row_ok)
    tl.store(stats_ptr + rows * 3 + 2, m2, mask=row_ok)


def _launch_args(logprobs, ref_logprobs, mask, reward_scores, cost_scores, lagrange_multiplier):
    multiplier_is_tensor = isinstance(lagrange_multiplier, torch.Tensor)
    pointers = (logprobs, ref_logprobs, mask, reward_scores, cost_scores,
                lagrange_multiplier if multiplier_is_tensor else reward_scores)
    strides = (logprobs.stride(0), logprobs.stride(1), ref_logprobs.stride(0), ref_logprobs.stride(1),
               mask.stride(0), mask.stride(1), reward_scores.stride(0), cost_scores.stride(0))
    multiplier_value = 0.0 if multiplier_is_tensor else float(lagrange_multiplier)
    return pointers, strides, multiplier_value, multiplier_is_tensor


def group_advantages(logprobs, ref_logprobs, mask, reward_scores, cost_scores, group_ids, *, estimator, kl_coef,
                     lagrange_multiplier, kl_estimator, score_clip, clip_before_kl, mask_nan_rewards, eps, population,
                     per_token):
    """Launch for checked arguments; group_ids (B,) dense int64 ids (None for reinforce_pp).
    Returns three float32 tensors, (B,) or (B, T) as in hcrlhf.ops.group_advantages."""
    batch, length = logprobs.shape
    pointers, strides, multiplier_value, multiplier_is_tensor = _launch_args(
        logprobs, ref_logprobs, mask, reward_scores, cost_scores, lagrange_multiplier)
    clip = math.inf if score_clip is None else float(score_clip)
    flags = dict(KL_ESTIMATOR=KL_ESTIMATOR_CODES[kl_estimator], MULTIPLIER_IS_TENSOR=multiplier_is_tensor,
                 CLIP_BEFORE_KL=bool(clip_before_kl))
    block_t = block_t_for(length)
    scorable = None
    if mask_nan_rewards:
        scorable = ~(torch.isnan(reward_scores.float()) | torch.isnan(cost_scores.float()))

    if estimator == "reinforce_pp":
        advantages, returns, kl = new_outputs(3, (batch, length), torch.float32, logprobs.device)
        if advantages.numel() == 0:
            return advantages, returns, kl
        stats = torch.empty(batch, 3, dtype=torch.float32, device=logprobs.device)
        _reinforce_pp_kernel[(batch,)](
            *pointers, returns, kl, stats, batch, length, *strides, float(kl_coef), multiplier_value, clip,
            MASK_NAN=bool(mask_nan_rewards), ROWS=1, BLOCK_T=block_t, **flags,
        )
        # Chan et al.: batch moments from the B row moments, no host read
        n_i, mean_i, m2_i = stats.unbind(1)
        n = n_i.sum()
        mean = (n_i * mean_i).sum() / n.clamp(min=1.0)
        m2 = (m2_i + n_i * (mean_i - mean) ** 2).sum()
        if population:  # OpenRLHF: rsqrt(max(var, eps))
            scale = torch.rsqrt((m2 / n.clamp(min=1.0)).clamp(min=eps))
        else:  # verl: rsqrt(var + eps), var unbiased (0 below two tokens)
            scale = torch.rsqrt(torch.where(n > 1, m2 / (n - 1).clamp(min=1.0), 0.0) + eps)
        counted = mask != 0 if scorable is None else (mask != 0) & scorable[:, None]
        advantages.copy_(torch.where(counted, (returns - mean) * scale, 0.0))
        return advantages, returns, kl

    returns, kl_sum = new_outputs(2, (batch,), torch.float32, logprobs.device)
    kl = new_outputs(1, (batch, length), torch.float32, logprobs.device)[0] if per_token else kl_sum
    if batch:
        rows = 4
        _sequence_kernel[(triton.cdiv(batch, rows),)](
            *pointers, returns, kl_sum, kl, batch, length, *strides, float(kl_coef), multiplier_value, clip,
            PER_TOKEN=bool(per_token), ROWS=rows, BLOCK_T=max(16, min(block_t, 1024 // rows)), **flags,
        )
    advantages = group_baselines(returns, scorable, group_ids, estimator, eps)
    if per_token:
        valid = mask != 0
        return torch.where(valid, advantages[:, None], 0.0), torch.where(valid, returns[:, None], 0.0), kl
    return advantages, returns, kl_sum


def group_baselines(returns, scorable, group_ids, estimator, eps):
    """(B,) advantages from G by O(B) segment sums over the dense group ids (no host read)."""
    weight = torch.ones_like(returns) if scorable is None else scorable.to(returns.dtype)
    counted = returns if scorable is None else torch.where(scorable, returns, 0.0)
    count = torch.zeros_like(returns).index_add_(0, group_ids, weight)[group_ids]
    total = torch.zeros_like(returns).index_add_(0, group_ids, counted)[group_ids]
    if estimator == "rloo":  # no other member: baseline 0 (verl's size-1 rule)
        others = count - 1
        advantages = returns - torch.where(others > 0, (total - returns) / others.clamp(min=1), 0.0)
    else:
        mean = torch.where(count < 2, 0.0, total / count.clamp(min=1))
        advantages = returns - mean
        if estimator == "grpo":
            squares = advantages * advantages if scorable is None else torch.where(scorable, advantages ** 2, 0.0)
            squares = torch.zeros_like(returns).index_add_(0, group_ids, squares)[group_ids]
            std = torch.where(count < 2, 1.0, torch.sqrt(squares / (count - 1).clamp(min=1)))
            advantages = advantages / (std + eps)
    return advantages if scorable is None else torch.where(scorable, advantages, 0.0)
