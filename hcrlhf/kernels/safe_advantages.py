"""Triton safe_advantages: KL shaping, end-token scores, clipping, both GAE streams and the
λ-combination in ONE launch (docs/ops.md#safe_advantages); whitening adds one pass
(hcrlhf.kernels.gae.whiten_in_place).

One program owns ROWS rows and sweeps them right to left in BLOCK_T chunks. The row's end (its
last valid position) is found on the way: the first chunk (from the right) holding a valid
position fixes it. λ may be a device tensor: it is read inside the kernel, never on the host.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from hcrlhf._op_outputs import new_outputs
from hcrlhf.kernels.gae import block_t_for, gae_chunk, update_moments, whiten_in_place

KL_ESTIMATOR_CODES = {"k1": 0, "k2": 1, "k3": 2}
# k3 as verl's "low_var_kl" (hcrlhf.reference.kl_penalty.K3_LOG_RATIO_CLIP / K3_CLIP);
# constexprs, since compiled Triton rejects plain-float globals inside @triton.jit functions.
K3_LOG_RATIO_CLIP = tl.constexpr(20.0)
K3_CLIP = tl.constexpr(10.0)


@triton.jit
def _clamp_keep_nan(x, lo, hi):
    # torch.clamp semantics: a NaN stays NaN (a GPU's plain min/max would return the bound).
    x = tl.maximum(x, lo, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(x, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def kl_estimate(logprobs, ref_logprobs, KL_ESTIMATOR: tl.constexpr):
    d = logprobs - ref_logprobs
    if KL_ESTIMATOR == 0:
        kl = d
    elif KL_ESTIMATOR == 1:
        kl = 0.5 * d * d
    else:
        d = _clamp_keep_nan(d, -K3_LOG_RATIO_CLIP, K3_LOG_RATIO_CLIP)
        kl = _clamp_keep_nan(tl.exp(-d) - 1.0 + d, -K3_CLIP, K3_CLIP)
    return kl


@triton.jit
def load_multiplier(multiplier_ptr, multiplier_value, MULTIPLIER_IS_TENSOR: tl.constexpr):
    """λ from a device tensor or a host float; negative or non-finite λ becomes NaN."""
    if MULTIPLIER_IS_TENSOR:
        multiplier = tl.load(multiplier_ptr).to(tl.float32)
    else:
        multiplier = multiplier_value
    return tl.where((multiplier >= 0.0) & (multiplier < float("inf")), multiplier, float("nan"))


@triton.jit
def _safe_advantages_kernel(
    lp_ptr, ref_ptr, mask_ptr, rscore_ptr, cscore_ptr, rval_ptr, cval_ptr, multiplier_ptr,
    adv_ptr, radv_ptr, cadv_ptr, rret_ptr, cret_ptr, kl_ptr, stats_ptr,
    B, T,
    s_lp_b, s_lp_t, s_ref_b, s_ref_t, s_m_b, s_m_t, s_rs, s_cs, s_rv_b, s_rv_t, s_cv_b, s_cv_t,
    kl_coef, multiplier_value, gamma, gamma_gae_lambda, score_clip,
    CLIP_BEFORE_KL: tl.constexpr, KL_ESTIMATOR: tl.constexpr, KL_IN_COST: tl.constexpr,
    DIVIDE_BY_ONE_PLUS_LAMBDA: tl.constexpr,
    WHITEN: tl.constexpr, MULTIPLIER_IS_TENSOR: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    reward_score = tl.load(rscore_ptr + rows64 * s_rs, mask=row_ok, other=0.0).to(tl.float32)
    cost_score = tl.load(cscore_ptr + rows64 * s_cs, mask=row_ok, other=0.0).to(tl.float32)
    if CLIP_BEFORE_KL:  # TRL / OpenRLHF: the raw scores are clamped, the KL term is not
        reward_score = _clamp_keep_nan(reward_score, -score_clip, score_clip)
        cost_score = _clamp_keep_nan(cost_score, -score_clip, score_clip)
    multiplier = load_multiplier(multiplier_ptr, multiplier_value, MULTIPLIER_IS_TENSOR)
    rows64 = rows64[:, None]

    end = tl.full((ROWS,), -1, tl.int32)
    r_running = tl.zeros((ROWS,), tl.float32)
    r_next = tl.zeros((ROWS,), tl.float32)
    c_running = tl.zeros((ROWS,), tl.float32)
    c_next = tl.zeros((ROWS,), tl.float32)
    # Running (count, mean, M2) of the combined advantages per row, for whitening (Chan et al.).
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
        rv = tl.load(rval_ptr + rows64 * s_rv_b + cols64 * s_rv_t, mask=inside, other=0.0).to(tl.float32)
        cv = tl.load(cval_ptr + rows64 * s_cv_b + cols64 * s_cv_t, mask=inside, other=0.0).to(tl.float32)

        kl = tl.where(valid, kl_estimate(lp, ref, KL_ESTIMATOR), 0.0)
        # The end is the rightmost valid position: fixed by the first chunk (from the right) that has one.
        chunk_last = tl.max(tl.where(valid, cols[None, :], -1), axis=1)
        end = tl.where(end >= 0, end, chunk_last)
        is_end = cols[None, :] == end[:, None]
        rewards = -kl_coef * kl + tl.where(is_end, reward_score[:, None], 0.0)
        if KL_IN_COST:
            costs = kl_coef * kl + tl.where(is_end, cost_score[:, None], 0.0)
        else:
            costs = tl.where(is_end, cost_score[:, None], 0.0)
        if not CLIP_BEFORE_KL:
            rewards = _clamp_keep_nan(rewards, -score_clip, score_clip)
            costs = _clamp_keep_nan(costs, -score_clip, score_clip)

        r_adv, r_ret, r_running, r_next = gae_chunk(
            rewards, rv, valid, r_running, r_next, gamma, gamma_gae_lambda, BLOCK_T)
        c_adv, c_ret, c_running, c_next = gae_chunk(
            costs, cv, valid, c_running, c_next, gamma, gamma_gae_lambda, BLOCK_T)
        adv = r_adv - multiplier * c_adv
        if DIVIDE_BY_ONE_PLUS_LAMBDA:
            adv = adv / (1.0 + multiplier)
        adv = tl.where(valid, adv, 0.0)

        out = rows64 * T + cols64
        tl.store(adv_ptr + out, adv, mask=inside)
        tl.store(radv_ptr + out, r_adv, mask=inside)
        tl.store(cadv_ptr + out, c_adv, mask=inside)
        tl.store(rret_ptr + out, r_ret, mask=inside)
        tl.store(cret_ptr + out, c_ret, mask=inside)
        tl.store(kl_ptr + out, kl, mask=inside)
        if WHITEN:
            count, mean, m2 = update_moments(adv, valid, count, mean, m2)
    if WHITEN:
        tl.store(stats_ptr + rows * 3 + 0, count, mask=row_ok)
        tl.store(stats_ptr + rows * 3 + 1, mean, mask=row_ok)
        tl.store(stats_ptr + rows * 3 + 2, m2, mask=row_ok)


def safe_advantages(logprobs, ref_logprobs, mask, reward_scores, cost_scores, reward_values, cost_values, *,
                    kl_coef, lagrange_multiplier, gamma, gae_lambda, kl_estimator, score_clip, kl_in_cost,
                    divide_by_one_plus_lambda, whiten, clip_before_kl=False, whiten_variance="unbiased",
                    whiten_shift_mean=True):
    """Launch the fused kernel; arguments are checked by hcrlhf.ops. Returns six (B, T) float32 tensors.

    ``gae_lambda`` is the GAE λ; ``lagrange_multiplier`` the λ of reward − λ·cost (a float or a 0-dim
    device tensor, read in the kernel); ``divide_by_one_plus_lambda`` divides A_r − λ·A_c by 1 + λ.
    """
    batch, length = logprobs.shape
    outputs = new_outputs(6, (batch, length), torch.float32, logprobs.device)
    if batch * length == 0:
        return tuple(out.zero_() for out in outputs)
    multiplier_is_tensor = isinstance(lagrange_multiplier, torch.Tensor)
    rows, block_t = 1, block_t_for(length)
    stats = torch.empty(batch, 3, dtype=torch.float32, device=logprobs.device) if whiten else outputs[0]
    _safe_advantages_kernel[(triton.cdiv(batch, rows),)](
        logprobs, ref_logprobs, mask, reward_scores, cost_scores, reward_values, cost_values,
        lagrange_multiplier if multiplier_is_tensor else reward_scores,
        *outputs, stats,
        batch, length,
        logprobs.stride(0), logprobs.stride(1), ref_logprobs.stride(0), ref_logprobs.stride(1),
        mask.stride(0), mask.stride(1), reward_scores.stride(0), cost_scores.stride(0),
        reward_values.stride(0), reward_values.stride(1), cost_values.stride(0), cost_values.stride(1),
        float(kl_coef), 0.0 if multiplier_is_tensor else float(lagrange_multiplier), float(gamma),
        float(gamma * gae_lambda), math.inf if score_clip is None else float(score_clip),
        CLIP_BEFORE_KL=bool(clip_before_kl), KL_ESTIMATOR=KL_ESTIMATOR_CODES[kl_estimator],
        KL_IN_COST=bool(kl_in_cost),
        DIVIDE_BY_ONE_PLUS_LAMBDA=bool(divide_by_one_plus_lambda), WHITEN=bool(whiten),
        MULTIPLIER_IS_TENSOR=multiplier_is_tensor,
        ROWS=rows, BLOCK_T=block_t,
    )
    if whiten:
        whiten_in_place(outputs[0], mask, stats, whiten_variance, whiten_shift_mean, block_t)
    return tuple(outputs)
