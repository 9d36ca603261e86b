"""Triton rloo_advantages: per-row KL sums, G = clamp(reward − β·KL) − λ·cost, and the
leave-one-out baseline inside each group, in one launch (docs/ops.md#rloo_advantages). One program per group."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hcrlhf._op_outputs import new_outputs
from hcrlhf.kernels.safe_advantages import KL_ESTIMATOR_CODES, kl_estimate, load_multiplier


@triton.jit
def _rloo_kernel(
    lp_ptr, ref_ptr, mask_ptr, rscore_ptr, cscore_ptr, multiplier_ptr, adv_ptr, ret_ptr, kl_ptr,
    T, group_size,
    s_lp_b, s_lp_t, s_ref_b, s_ref_t, s_m_b, s_m_t, s_rs, s_cs,
    kl_coef, multiplier_value, score_clip,
    KL_ESTIMATOR: tl.constexpr, MULTIPLIER_IS_TENSOR: tl.constexpr, GROUP: tl.constexpr, BLOCK_T: tl.constexpr,
):
    member = tl.arange(0, GROUP)
    in_group = member < group_size
    rows64 = (tl.program_id(0).to(tl.int64) * group_size + member)
    kl_sum = tl.zeros((GROUP,), tl.float32)
    for start in range(0, T, BLOCK_T):
        cols = start + tl.arange(0, BLOCK_T)
        inside = in_group[:, None] & (cols < T)[None, :]
        cols64 = cols.to(tl.int64)[None, :]
        m = tl.load(mask_ptr + rows64[:, None] * s_m_b + cols64 * s_m_t, mask=inside, other=0)
        lp = tl.load(lp_ptr + rows64[:, None] * s_lp_b + cols64 * s_lp_t, mask=inside, other=0.0).to(tl.float32)
        ref = tl.load(ref_ptr + rows64[:, None] * s_ref_b + cols64 * s_ref_t, mask=inside, other=0.0).to(tl.float32)
        kl_sum += tl.sum(tl.where(inside & (m != 0), kl_estimate(lp, ref, KL_ESTIMATOR), 0.0), axis=1)

    reward = tl.load(rscore_ptr + rows64 * s_rs, mask=in_group, other=0.0).to(tl.float32)
    cost = tl.load(cscore_ptr + rows64 * s_cs, mask=in_group, other=0.0).to(tl.float32)
    multiplier = load_multiplier(multiplier_ptr, multiplier_value, MULTIPLIER_IS_TENSOR)
    returns = tl.minimum(tl.maximum(reward - kl_coef * kl_sum, -score_clip), score_clip) - multiplier * cost
    group_total = tl.sum(tl.where(in_group, returns, 0.0), axis=0)
    advantages = returns - (group_total - returns) / (group_size - 1)
    tl.store(adv_ptr + rows64, advantages, mask=in_group)
    tl.store(ret_ptr + rows64, returns, mask=in_group)
    tl.store(kl_ptr + rows64, kl_sum, mask=in_group)


def rloo_advantages(logprobs, ref_logprobs, mask, reward_scores, cost_scores, *, group_size, kl_coef,
                    lagrange_multiplier, kl_estimator, score_clip):
    """Launch one program per group; arguments are checked by hcrlhf.ops. Returns three (B,) float32."""
    batch, length = logprobs.shape
    outputs = new_outputs(3, (batch,), torch.float32, logprobs.device)
    if batch == 0:
        return tuple(outputs)
    group = triton.next_power_of_2(group_size)
    block_t = max(16, min(triton.next_power_of_2(max(length, 1)), max(16, 4096 // group)))
    multiplier_is_tensor = isinstance(lagrange_multiplier, torch.Tensor)
    _rloo_kernel[(batch // group_size,)](
        logprobs, ref_logprobs, mask, reward_scores, cost_scores,
        lagrange_multiplier if multiplier_is_tensor else reward_scores, *outputs,
        length, group_size,
        logprobs.stride(0), logprobs.stride(1), ref_logprobs.stride(0), ref_logprobs.stride(1),
        mask.stride(0), mask.stride(1), reward_scores.stride(0), cost_scores.stride(0),
        float(kl_coef), 0.0 if multiplier_is_tensor else float(lagrange_multiplier),
        math.inf if score_clip is None else float(score_clip),
        KL_ESTIMATOR=KL_ESTIMATOR_CODES[kl_estimator], MULTIPLIER_IS_TENSOR=multiplier_is_tensor,
        GROUP=group, BLOCK_T=block_t,
    )
    return tuple(outputs)
