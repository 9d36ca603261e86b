"""``ops.group_advantages``: GRPO, Dr. GRPO and REINFORCE++ advantages of reward − β·KL − λ·cost.

Also the grouped kernel entry point (``torch.ops.hcrlhf.group_advantages``) that ``rloo_advantages``
uses for its opt-in options (``group_index``, ``mask_nan_rewards``, ``per_token``, ``clip_before_kl``).
"""

from __future__ import annotations

import math
import numbers

import torch

from hcrlhf import reference
from hcrlhf._op_outputs import new_outputs
from hcrlhf.ops import _checks
from hcrlhf.ops._cpp import as_numpy, mask_as_numpy
from hcrlhf.ops._dispatch import cpp_extension, resolve_impl
from hcrlhf.ops.safe_advantages import check_common, read_multiplier, split_multiplier
from hcrlhf.reference.group_advantages import (
    DEFAULT_EPS,
    ESTIMATORS,
    WHITEN_VARIANCES,
    GroupAdvantages,
    dense_group_ids,
)

OP = "group_advantages"
__all__ = ["GroupAdvantages", "group_advantages"]
INTEGER_SCORE_DTYPES = (torch.int32, torch.int64)


def float_scores(op: str, reward_scores, cost_scores, *float_inputs):
    """Integer (int32/int64) reward/cost scores as floats of the inputs' compute dtype (e.g. 0/1
    verifier rewards); bool is refused, since True/False scores are almost always a mask passed by mistake."""
    dtype = _checks.result_dtype(*(x for x in (reward_scores, cost_scores, *float_inputs)
                                   if isinstance(x, torch.Tensor)))
    converted = []
    for name, scores in (("reward_scores", reward_scores), ("cost_scores", cost_scores)):
        if isinstance(scores, torch.Tensor):
            if scores.dtype == torch.bool:
                raise TypeError(f"{op}: {name} must be float16, bfloat16, float32, float64, int32 or int64 "
                                f"scores, got torch.bool (convert a 0/1 mask with .float() if that is meant)")
            if scores.dtype in INTEGER_SCORE_DTYPES:
                scores = scores.to(dtype)
        converted.append(scores)
    return converted


def check_grouping(op: str, batch: int, device, group_size, group_index, *, min_group_size: int):
    """Exactly one of group_size (an integer dividing B) and group_index ((B,) int32/int64)."""
    if (group_size is None) == (group_index is None):
        raise ValueError(f"{op}: pass exactly one of group_size (contiguous groups) and group_index "
                         f"((B,) group ids), got group_size={group_size!r} and "
                         f"group_index={'None' if group_index is None else 'a tensor'}")
    if group_index is not None:
        _checks.check_tensor(op, "group_index", group_index, ndim=1, floating=False)
        if group_index.dtype not in INTEGER_SCORE_DTYPES:
            raise TypeError(f"{op}: group_index must be an int64 (or int32) tensor of group ids, "
                            f"got {group_index.dtype}")
        _checks.check_same_shape(op, (batch,), group_index=group_index)
        if group_index.device != device:
            raise ValueError(f"{op}: group_index is on {group_index.device} but the inputs are on {device}")
        return
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < min_group_size:
        raise ValueError(f"{op}: group_size must be an integer >= {min_group_size}, got {group_size!r}")
    if batch % group_size:
        raise ValueError(f"{op}: group_size={group_size} must divide the batch size B={batch}")


def check_flag(op: str, name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(value).__name__}")
    return value


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
    impl: str = "auto",
) -> GroupAdvantages:
    """Critic-free advantages of G = shaped reward − λ·cost: GRPO, Dr. GRPO or REINFORCE++.

    Args:
        logprobs, ref_logprobs: (B, T) token log-probs under the rollout policy and the reference;
            float16/bfloat16/float32/float64, any strides. mask: (B, T) bool or 0/1.
        reward_scores, cost_scores: (B,) float or int32/int64 scores (bool is refused).
        estimator: "grpo" (group mean and unbiased std, as verl's GRPO / OpenRLHF's group_norm),
            "dr_grpo" (group mean only; Dr. GRPO's other change, no length normalisation, is a
            loss convention and not part of the advantages), or "reinforce_pp" (REINFORCE++: the
            per-token KL penalty as per-token reward, γ = 1 returns, whitened over the batch).
        group_size / group_index: exactly one for "grpo"/"dr_grpo", neither for "reinforce_pp".
            group_size k ≥ 1 divides B (rows g·k … g·k + k − 1 form group g); group_index (B,)
            int32/int64: rows with equal ids form a group (any order, uneven sizes). A row alone in
            its group gets mean 0 and std 1 (verl's rule), so A = G / (1 + eps) or G.
        kl_coef: β ≥ 0; kl_coef=0 reproduces the peers' GRPO, whose KL is a loss term
            (``ops.kl_penalty``). lagrange_multiplier: λ ≥ 0, float or 0-dim tensor.
        kl_estimator: "k1" | "k2" | "k3". score_clip: None or c > 0: for grpo/dr_grpo clamps
            reward − β·KL (or, with ``clip_before_kl``, the raw reward); for reinforce_pp clamps
            each per-token reward (or, with ``clip_before_kl``, the raw reward). Costs are never clipped.
        mask_nan_rewards: a row whose reward or cost score is NaN gets advantage 0 and is left out
            of its group's mean/std (of the whitening statistics for reinforce_pp), as TRL does
            with unscorable completions; its returns keep the NaN.
        eps: None (the peers' default: 1e-6 for grpo as verl; 1e-8 for reinforce_pp as verl's
            masked_whiten) or ≥ 0. grpo divides by std + eps; reinforce_pp multiplies by rsqrt(var + eps).
        whiten_variance: reinforce_pp only: "unbiased" (verl) or "population" (OpenRLHF).
        per_token: None = False for grpo/dr_grpo, True for reinforce_pp (which has no (B,) form).
        impl: "auto" | "triton" | "cpp" | "torch".

    Returns:
        GroupAdvantages(advantages, returns, kl), float32 (float64 for float64 inputs).
        per_token=False: each (B,): A_i, G_i and KL_i = Σ_t mask·kl_t.
        per_token=True: each (B, T), zero on masked positions: A and G broadcast over the row's
        valid positions (reinforce_pp: the whitened advantages and the unwhitened returns R_t),
        and the per-token kl (its row sums are the (B,) KL).

    Equivalent naive code (grpo/dr_grpo)::

        kl = (mask * kl_estimate(logprobs - ref_logprobs)).sum(-1)
        G = (reward_scores - kl_coef * kl).clamp(-score_clip, score_clip) - λ * cost_scores
        for each group g:  A[g] = (G[g] - G[g].mean()) / (G[g].std() + eps)   # dr_grpo: G[g] - G[g].mean()

    reinforce_pp::

        r = where(mask, -kl_coef * kl_estimate(logprobs - ref_logprobs), 0);  r[b, end_b] += reward_scores[b]
        r = r.clamp(-score_clip, score_clip);  r[b, end_b] -= λ * cost_scores[b]
        R = r.flip(-1).cumsum(-1).flip(-1) * mask;  A = masked_whiten(R, mask, eps)
    """
    reward_scores, cost_scores = float_scores(OP, reward_scores, cost_scores, logprobs, ref_logprobs)
    shape, device, multiplier = check_common(
        OP, logprobs, ref_logprobs, mask, reward_scores, cost_scores, kl_coef,
        lagrange_multiplier, kl_estimator, score_clip, clip_before_kl=clip_before_kl,
    )
    if estimator not in ESTIMATORS:
        raise ValueError(f"{OP}: estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if estimator == "reinforce_pp":
        if group_size is not None or group_index is not None:
            raise ValueError(f"{OP}: estimator='reinforce_pp' has no groups (it whitens over the batch); "
                             "pass neither group_size nor group_index")
        if per_token is False:
            raise ValueError(f"{OP}: estimator='reinforce_pp' returns per-token advantages; per_token must be "
                             "None or True")
    else:
        check_grouping(OP, shape[0], device, group_size, group_index, min_group_size=1)
    mask_nan_rewards = check_flag(OP, "mask_nan_rewards", mask_nan_rewards)
    per_token = estimator == "reinforce_pp" if per_token is None else check_flag(OP, "per_token", per_token)
    if eps is None:
        eps = DEFAULT_EPS[estimator]
    _checks.check_nonneg_scalar(OP, "eps", eps)
    if whiten_variance not in WHITEN_VARIANCES:
        raise ValueError(f"{OP}: whiten_variance must be one of {WHITEN_VARIANCES}, got {whiten_variance!r}")
    dtype = _checks.result_dtype(logprobs, ref_logprobs, reward_scores, cost_scores)
    chosen = resolve_impl(impl, device, op=OP, float64=dtype == torch.float64)
    options = dict(
        kl_coef=float(kl_coef), lagrange_multiplier=multiplier, kl_estimator=kl_estimator, score_clip=score_clip,
        clip_before_kl=clip_before_kl, mask_nan_rewards=mask_nan_rewards,
    )

    with torch.no_grad():
        if chosen == "torch":
            return reference.group_advantages(
                logprobs, ref_logprobs, mask, reward_scores, cost_scores, estimator=estimator,
                group_size=group_size, group_index=group_index, eps=float(eps), whiten_variance=whiten_variance,
                per_token=per_token, **options,
            )
        return GroupAdvantages(*run_grouped_op(
            logprobs, ref_logprobs, mask, reward_scores, cost_scores, estimator=estimator, group_size=group_size,
            group_index=group_index, eps=float(eps), population=whiten_variance == "population",
            per_token=per_token, impl=chosen, **options,
        ))


def run_grouped_op(logprobs, ref_logprobs, mask, reward_scores, cost_scores, *, estimator, group_size, group_index,
                   kl_coef, lagrange_multiplier, kl_estimator, score_clip, clip_before_kl, mask_nan_rewards, eps,
                   population, per_token, impl):
    """Checked arguments -> ``torch.ops.hcrlhf.group_advantages`` (also rloo_advantages' opt-in path)."""
    group_ids = None
    if estimator != "reinforce_pp":
        group_ids = dense_group_ids(logprobs.shape[0], group_size, group_index, logprobs.device)
    multiplier_tensor, multiplier_value = split_multiplier(lagrange_multiplier)
    return torch.ops.hcrlhf.group_advantages(
        logprobs, ref_logprobs, mask, reward_scores, cost_scores, group_ids, multiplier_tensor, multiplier_value,
        estimator, kl_coef, kl_estimator, None if score_clip is None else float(score_clip), clip_before_kl,
        mask_nan_rewards, eps, population, per_token, impl,
    )


# The kernel entry point as a torch.library custom op (docs/ops.md#torchcompile): opaque to
# torch.compile, shapes from the fake impl. Not differentiable (advantages are targets).
# estimator: "rloo" | "grpo" | "dr_grpo" | "reinforce_pp"; group_ids: (B,) int64 dense ids in [0, B)
# (None for reinforce_pp).
@torch.library.custom_op("hcrlhf::group_advantages", mutates_args=())
def group_advantages_op(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, reward_scores: torch.Tensor,
    cost_scores: torch.Tensor, group_ids: torch.Tensor | None, multiplier_tensor: torch.Tensor | None,
    multiplier_value: float, estimator: str, kl_coef: float, kl_estimator: str, score_clip: float | None,
    clip_before_kl: bool, mask_nan_rewards: bool, eps: float, population: bool, per_token: bool, impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, returns, kl) of ``group_advantages`` / ``rloo_advantages`` by the "triton" or "cpp" kernel."""
    multiplier = read_multiplier(OP, multiplier_tensor, multiplier_value)
    options = dict(
        estimator=estimator, kl_coef=kl_coef, lagrange_multiplier=multiplier, kl_estimator=kl_estimator,
        score_clip=score_clip, clip_before_kl=clip_before_kl, mask_nan_rewards=mask_nan_rewards, eps=eps,
        population=population, per_token=per_token,
    )
    if impl == "triton":
        from hcrlhf.kernels.group_advantages import group_advantages as group_advantages_triton

        return tuple(group_advantages_triton(logprobs, ref_logprobs, mask, reward_scores, cost_scores, group_ids,
                                             **options))
    dtype = _checks.result_dtype(logprobs, ref_logprobs, reward_scores, cost_scores)
    shape = tuple(logprobs.shape) if per_token else tuple(logprobs.shape[:1])
    advantages, returns, kl = new_outputs(3, shape, dtype, logprobs.device)
    ids = torch.zeros(0, dtype=torch.int64) if group_ids is None else group_ids.to(torch.int64)
    cpp_extension().group_advantages(
        logprobs=as_numpy(logprobs, dtype), ref_logprobs=as_numpy(ref_logprobs, dtype), mask=mask_as_numpy(mask),
        reward_scores=as_numpy(reward_scores, dtype), cost_scores=as_numpy(cost_scores, dtype),
        group_ids=ids.numpy(), advantages=advantages.numpy(), returns=returns.numpy(), kl=kl.numpy(),
        estimator=estimator, kl_coef=kl_coef, lagrange_multiplier=float(multiplier), kl_estimator=kl_estimator,
        score_clip=math.inf if score_clip is None else score_clip, clip_before_kl=clip_before_kl,
        mask_nan_rewards=mask_nan_rewards, eps=eps, population=population, per_token=per_token,
    )
    return advantages, returns, kl


@group_advantages_op.register_fake
def _(logprobs, ref_logprobs, mask, reward_scores, cost_scores, *args):
    per_token, impl = args[-2], args[-1]
    dtype = torch.float32 if impl == "triton" else _checks.result_dtype(logprobs, ref_logprobs, reward_scores,
                                                                         cost_scores)
    shape = logprobs.shape if per_token else logprobs.shape[:1]
    return tuple(logprobs.new_empty(shape, dtype=dtype) for _ in range(3))
