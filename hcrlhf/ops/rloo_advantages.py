"""``ops.rloo_advantages``: sequence-level leave-one-out advantages of reward − β·KL − λ·cost."""

from __future__ import annotations

import math

import torch

from hcrlhf import reference
from hcrlhf._op_outputs import new_outputs
from hcrlhf.ops._checks import result_dtype
from hcrlhf.ops._cpp import as_numpy, mask_as_numpy
from hcrlhf.ops._dispatch import cpp_extension, resolve_impl
from hcrlhf.ops.group_advantages import check_flag, check_grouping, float_scores, run_grouped_op
from hcrlhf.ops.safe_advantages import check_common, read_multiplier, split_multiplier
from hcrlhf.reference.rloo_advantages import RLOOAdvantages

OP = "rloo_advantages"
__all__ = ["RLOOAdvantages", "rloo_advantages"]


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
    impl: str = "auto",
) -> RLOOAdvantages:
    """REINFORCE leave-one-out advantages per sequence (HC-RLHF's own estimator).

    Args:
        logprobs, ref_logprobs: (B, T) token log-probs under the policy and the reference;
            float16/bfloat16/float32/float64, any strides. mask: (B, T) bool or 0/1.
        reward_scores, cost_scores: (B,) float, or int32/int64 (converted; bool is refused). Pass
            the augmented costs (``hcrlhf.safety``) as cost_scores to optimise the bound μ + k·σ.
        group_size / group_index: exactly one. group_size: k ≥ 2 samples per prompt; rows of one
            prompt are adjacent and k divides B. group_index: (B,) int32/int64; rows with equal ids
            form a group (any order, uneven sizes). A row with no other (scorable) member in its
            group has baseline 0, so A_i = G_i (verl's rule for a size-1 group).
        kl_coef: β ≥ 0. lagrange_multiplier: λ ≥ 0, float or 0-dim tensor (see safe_advantages).
        kl_estimator: "k1" | "k2" | "k3". score_clip: None or c > 0: clamps reward − β·KL, or with
            ``clip_before_kl=True`` the raw reward before β·KL is subtracted (TRL / OpenRLHF).
        mask_nan_rewards: a row whose reward or cost score is NaN gets A_i = 0 and is left out of
            the baselines of its group (TRL's unscorable completions); its returns keep the NaN.
        per_token: return (B, T) tensors: A and G broadcast over each row's valid positions, the
            per-token kl; zero on masked positions (the (B, T) form verl and OpenRLHF use).
        impl: "auto" | "triton" | "cpp" | "torch".

    Returns:
        RLOOAdvantages(advantages, returns, kl), each (B,) (or (B, T) with per_token) float32
        (float64 for float64 inputs).

    Equivalent naive code (group_size, defaults)::

        kl = (mask * kl_estimate(logprobs - ref_logprobs)).sum(-1)
        G = (reward_scores - kl_coef * kl).clamp(-score_clip, score_clip) - λ * cost_scores
        G = G.view(-1, k);  A = G - (G.sum(1, keepdim=True) - G) / (k - 1)
    """
    reward_scores, cost_scores = float_scores(OP, reward_scores, cost_scores, logprobs, ref_logprobs)
    shape, device, multiplier = check_common(
        OP, logprobs, ref_logprobs, mask, reward_scores, cost_scores, kl_coef,
        lagrange_multiplier, kl_estimator, score_clip, clip_before_kl=clip_before_kl,
    )
    check_grouping(OP, shape[0], device, group_size, group_index, min_group_size=2)
    mask_nan_rewards = check_flag(OP, "mask_nan_rewards", mask_nan_rewards)
    per_token = check_flag(OP, "per_token", per_token)
    inputs = (logprobs, ref_logprobs, reward_scores, cost_scores)
    dtype = result_dtype(*inputs)
    chosen = resolve_impl(impl, device, op=OP, float64=dtype == torch.float64)
    group_size = None if group_size is None else int(group_size)
    options = dict(
        kl_coef=float(kl_coef), lagrange_multiplier=multiplier, kl_estimator=kl_estimator, score_clip=score_clip,
    )
    opt_in = dict(clip_before_kl=clip_before_kl, mask_nan_rewards=mask_nan_rewards)

    with torch.no_grad():
        if chosen == "torch":
            return reference.rloo_advantages(logprobs, ref_logprobs, mask, reward_scores, cost_scores,
                                             group_size=group_size, group_index=group_index, per_token=per_token,
                                             **options, **opt_in)
        if group_index is not None or clip_before_kl or mask_nan_rewards or per_token:
            # The opt-in options run on the grouped kernels of group_advantages (estimator "rloo");
            # the default (contiguous groups) keeps its one-launch kernel below.
            return RLOOAdvantages(*run_grouped_op(
                logprobs, ref_logprobs, mask, reward_scores, cost_scores, estimator="rloo", group_size=group_size,
                group_index=group_index, eps=0.0, population=False, per_token=per_token, impl=chosen,
                **options, **opt_in,
            ))
        multiplier_tensor, multiplier_value = split_multiplier(multiplier)
        return RLOOAdvantages(*torch.ops.hcrlhf.rloo_advantages(
            logprobs, ref_logprobs, mask, reward_scores, cost_scores, multiplier_tensor, multiplier_value,
            group_size, options["kl_coef"], kl_estimator,
            None if score_clip is None else float(score_clip), chosen,
        ))


# The kernel entry point as a torch.library custom op (docs/ops.md#torchcompile): opaque to
# torch.compile, shapes from the fake impl. Not differentiable (advantages are targets).
@torch.library.custom_op("hcrlhf::rloo_advantages", mutates_args=())
def rloo_advantages_op(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, reward_scores: torch.Tensor,
    cost_scores: torch.Tensor, multiplier_tensor: torch.Tensor | None, multiplier_value: float,
    group_size: int, kl_coef: float, kl_estimator: str, score_clip: float | None, impl: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, returns, kl) of ``rloo_advantages`` by the "triton" or "cpp" kernel (arguments checked)."""
    multiplier = read_multiplier(OP, multiplier_tensor, multiplier_value)
    if impl == "triton":
        from hcrlhf.kernels.rloo_advantages import rloo_advantages as rloo_advantages_triton

        return tuple(rloo_advantages_triton(
            logprobs, ref_logprobs, mask, reward_scores, cost_scores, group_size=group_size, kl_coef=kl_coef,
            lagrange_multiplier=multiplier, kl_estimator=kl_estimator, score_clip=score_clip,
        ))
    dtype = result_dtype(logprobs, ref_logprobs, reward_scores, cost_scores)
    outputs = new_outputs(3, tuple(logprobs.shape[:1]), dtype, logprobs.device)
    advantages, returns, kl = outputs
    cpp_extension().rloo_advantages(
        logprobs=as_numpy(logprobs, dtype), ref_logprobs=as_numpy(ref_logprobs, dtype),
        mask=mask_as_numpy(mask),
        reward_scores=as_numpy(reward_scores, dtype), cost_scores=as_numpy(cost_scores, dtype),
        advantages=advantages.numpy(), returns=returns.numpy(), kl=kl.numpy(),
        group_size=group_size, kl_coef=kl_coef, lagrange_multiplier=float(multiplier),
        kl_estimator=kl_estimator, score_clip=math.inf if score_clip is None else score_clip,
    )
    return tuple(outputs)


@rloo_advantages_op.register_fake
def _(logprobs, ref_logprobs, mask, reward_scores, cost_scores, *args):
    impl = args[-1]
    dtype = torch.float32 if impl == "triton" else result_dtype(logprobs, ref_logprobs, reward_scores, cost_scores)
    return tuple(logprobs.new_empty(logprobs.shape[:1], dtype=dtype) for _ in range(3))
