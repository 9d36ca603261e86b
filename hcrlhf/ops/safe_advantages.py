"""``ops.safe_advantages``: KL-penalised reward − λ·cost advantages for PPO-Lagrangian (Safe RLHF)."""

from __future__ import annotations

import math

import torch

from hcrlhf import reference
from hcrlhf._op_outputs import new_outputs
from hcrlhf.ops import _checks
from hcrlhf.ops._cpp import as_numpy, mask_as_numpy
from hcrlhf.ops._dispatch import cpp_extension, resolve_impl
from hcrlhf.ops.gae import check_whiten
from hcrlhf.reference.safe_advantages import SafeAdvantages

OP = "safe_advantages"
__all__ = ["SafeAdvantages", "safe_advantages"]


def check_common(op, logprobs, ref_logprobs, mask, reward_scores, cost_scores, kl_coef,
                 lagrange_multiplier, kl_estimator, score_clip, *, clip_before_kl=False):
    """Checks shared by safe_advantages and rloo_advantages; returns (shape, device, λ).

    ``clip_before_kl`` must be a bool. (Ops that accept integer scores cast them first:
    ``hcrlhf.ops.group_advantages.float_scores``.)
    """
    _checks.check_tensor(op, "logprobs", logprobs, ndim=2)
    shape = tuple(logprobs.shape)
    _checks.check_tensor(op, "ref_logprobs", ref_logprobs, ndim=2)
    _checks.check_same_shape(op, shape, ref_logprobs=ref_logprobs)
    _checks.check_mask(op, mask, shape)
    for name, scores in (("reward_scores", reward_scores), ("cost_scores", cost_scores)):
        _checks.check_tensor(op, name, scores, ndim=1)
        _checks.check_same_shape(op, shape[:1], **{name: scores})
    if not isinstance(clip_before_kl, bool):
        raise TypeError(f"{op}: clip_before_kl must be a bool, got {type(clip_before_kl).__name__}")
    device = _checks.check_same_device(
        op, logprobs=logprobs, ref_logprobs=ref_logprobs, mask=mask,
        reward_scores=reward_scores, cost_scores=cost_scores,
    )
    _checks.check_nonneg_scalar(op, "kl_coef", kl_coef)
    _checks.check_kl_estimator(op, kl_estimator)
    _checks.check_score_clip(op, score_clip)
    multiplier = _checks.check_lagrange_multiplier(op, lagrange_multiplier, device)
    return shape, device, multiplier


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
    impl: str = "auto",
    clip_before_kl: bool = False,
    whiten_variance: str = "unbiased",
    whiten_shift_mean: bool = True,
) -> SafeAdvantages:
    """Per-token advantages of reward − λ·cost with a KL penalty, both GAE streams in one pass.

    Args:
        logprobs, ref_logprobs: (B, T) log-probs of the sampled tokens under the rollout policy and
            the reference model. reward_values, cost_values: (B, T) critic values.
            Per-token inputs may be float16/bfloat16/float32/float64 with any strides.
        mask: (B, T) bool or 0/1; true on the trained response tokens. A row's end is its last
            valid position; the scores are added there.
        reward_scores, cost_scores: (B,) sequence scores of the reward and cost models.
        kl_coef: β ≥ 0. lagrange_multiplier: λ ≥ 0, a float or a 0-dim tensor on the inputs'
            device (no host sync: a CUDA λ is not checked on the host; a negative or non-finite
            one gives NaN advantages).
        gamma: GAE discount γ in [0, 1]. gae_lambda: GAE λ in [0, 1] (not the Lagrange multiplier).
        kl_estimator: "k1" | "k2" | "k3" (d = logprobs − ref_logprobs: d, d²/2, e^{−d} − 1 + d).
        score_clip: None or c > 0: the shaped per-token rewards and costs (KL term plus, at the
            end, the score) are clamped to [−c, c] — not the raw model scores alone (Safe RLHF
            style; see clip_before_kl).
        kl_in_cost: add +β·KL to the cost stream too (Safe RLHF), so the combined advantage
            carries exactly −β·KL for every λ; False gives the TRL-style weight β/(1+λ).
        divide_by_one_plus_lambda: divide the combination A_r − λ·A_c by (1 + λ), λ the Lagrange
            multiplier, as Safe RLHF does (keeps the advantage scale bounded as λ grows); False
            leaves A_r − λ·A_c unscaled. This is not advantage whitening.
        whiten: whiten the combined advantages with the mean and variance over all valid tokens
            of the batch, after the combination (reward/cost advantages and returns stay as they are).
        impl: "auto" | "triton" | "cpp" | "torch".
        clip_before_kl: with score_clip, clamp the raw reward and cost scores to [−c, c] before
            they are added to the KL term (TRL / OpenRLHF reward clipping), instead of the totals.
        whiten_variance: "unbiased" (default; divisor n − 1, rsqrt(var + 1e-8): verl) |
            "population" (divisor n, rsqrt(max(var, 1e-8)): OpenRLHF) | "none" (centring only).
        whiten_shift_mean: False adds the mean back after scaling (verl's shift_mean=False).

    Returns:
        SafeAdvantages(advantages, reward_advantages, cost_advantages, reward_returns,
        cost_returns, kl), each (B, T) float32 (float64 for float64 inputs), zero on masked
        positions; a row with no valid position is all zeros.

    Equivalent naive code::

        kl = where(mask, kl_estimate(logprobs - ref_logprobs), 0)
        s_r, s_c = reward_scores, cost_scores     # .clamp(-score_clip, score_clip) if clip_before_kl
        r = -kl_coef * kl;  r[b, end_b] += s_r[b]
        c = kl_coef * kl if kl_in_cost else 0;  c[b, end_b] += s_c[b]
        r, c = r.clamp(-score_clip, score_clip), c.clamp(-score_clip, score_clip)   # unless clip_before_kl
        A_r, R_r = gae(r, reward_values, mask, gamma, gae_lambda)
        A_c, R_c = gae(c, cost_values, mask, gamma, gae_lambda)
        A = A_r - λ * A_c                      # λ = lagrange_multiplier
        A = A / (1 + λ) if divide_by_one_plus_lambda else A
        A = masked_whiten(A, mask, variance=whiten_variance, shift_mean=whiten_shift_mean) if whiten else A
    """
    shape, device, multiplier = check_common(
        OP, logprobs, ref_logprobs, mask, reward_scores, cost_scores, kl_coef,
        lagrange_multiplier, kl_estimator, score_clip, clip_before_kl=clip_before_kl,
    )
    check_whiten(OP, whiten_variance, whiten_shift_mean)
    whiten = bool(whiten)
    for name, values in (("reward_values", reward_values), ("cost_values", cost_values)):
        _checks.check_tensor(OP, name, values, ndim=2)
        _checks.check_same_shape(OP, shape, **{name: values})
    _checks.check_same_device(OP, logprobs=logprobs, reward_values=reward_values, cost_values=cost_values)
    _checks.check_unit_interval(OP, "gamma", gamma)
    _checks.check_unit_interval(OP, "gae_lambda", gae_lambda)
    inputs = (logprobs, ref_logprobs, reward_scores, cost_scores, reward_values, cost_values)
    dtype = _checks.result_dtype(*inputs)
    chosen = resolve_impl(impl, device, op=OP, float64=dtype == torch.float64)
    options = dict(
        kl_coef=float(kl_coef), lagrange_multiplier=multiplier, gamma=float(gamma), gae_lambda=float(gae_lambda),
        kl_estimator=kl_estimator, score_clip=score_clip, kl_in_cost=bool(kl_in_cost),
        divide_by_one_plus_lambda=bool(divide_by_one_plus_lambda), whiten=whiten, clip_before_kl=clip_before_kl,
        whiten_variance=whiten_variance, whiten_shift_mean=whiten_shift_mean,
    )

    with torch.no_grad():
        if chosen == "torch":
            return reference.safe_advantages(
                logprobs, ref_logprobs, mask, reward_scores, cost_scores, reward_values, cost_values, **options
            )
        multiplier_tensor, multiplier_value = split_multiplier(multiplier)
        return SafeAdvantages(*torch.ops.hcrlhf.safe_advantages(
            logprobs, ref_logprobs, mask, reward_scores, cost_scores, reward_values, cost_values,
            multiplier_tensor, multiplier_value, options["kl_coef"], options["gamma"], options["gae_lambda"],
            kl_estimator, None if score_clip is None else float(score_clip), options["kl_in_cost"],
            options["divide_by_one_plus_lambda"], whiten, chosen, clip_before_kl, whiten_variance, whiten_shift_mean,
        ))


def split_multiplier(multiplier) -> tuple[torch.Tensor | None, float]:
    """λ as the custom ops take it: (a 0-dim tensor or None, a float used when the tensor is None)."""
    if isinstance(multiplier, torch.Tensor):
        return multiplier, 0.0
    return None, float(multiplier)


def read_multiplier(op: str, multiplier_tensor: torch.Tensor | None, multiplier_value: float):
    """Inside a custom op: a CPU λ tensor (left unread while torch.compile traced) becomes a checked
    float, so a kernel never gets a host pointer; a device tensor stays a tensor (never read)."""
    if multiplier_tensor is None:
        return multiplier_value
    if multiplier_tensor.device.type == "cpu":
        return _checks.check_lagrange_multiplier(op, multiplier_tensor, multiplier_tensor.device)
    return multiplier_tensor


# The kernel entry point as a torch.library custom op (docs/ops.md#torchcompile): opaque to
# torch.compile, shapes from the fake impl. Not differentiable (advantages are targets).
@torch.library.custom_op("hcrlhf::safe_advantages", mutates_args=())
def safe_advantages_op(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, reward_scores: torch.Tensor,
    cost_scores: torch.Tensor, reward_values: torch.Tensor, cost_values: torch.Tensor,
    multiplier_tensor: torch.Tensor | None, multiplier_value: float, kl_coef: float, gamma: float,
    gae_lambda: float, kl_estimator: str, score_clip: float | None, kl_in_cost: bool,
    divide_by_one_plus_lambda: bool, whiten: bool, impl: str, clip_before_kl: bool = False,
    whiten_variance: str = "unbiased", whiten_shift_mean: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The six outputs of ``safe_advantages`` by the "triton" or "cpp" kernel (arguments already checked).

    The options added later come after ``impl``, with defaults, so the schema stays compatible."""
    multiplier = read_multiplier(OP, multiplier_tensor, multiplier_value)
    options = dict(
        kl_coef=kl_coef, lagrange_multiplier=multiplier, gamma=gamma, gae_lambda=gae_lambda,
        kl_estimator=kl_estimator, score_clip=score_clip, kl_in_cost=kl_in_cost,
        divide_by_one_plus_lambda=divide_by_one_plus_lambda, whiten=whiten, clip_before_kl=clip_before_kl,
        whiten_variance=whiten_variance, whiten_shift_mean=whiten_shift_mean,
    )
    if impl == "triton":
        from hcrlhf.kernels.safe_advantages import safe_advantages as safe_advantages_triton

        return tuple(safe_advantages_triton(
            logprobs, ref_logprobs, mask, reward_scores, cost_scores, reward_values, cost_values, **options
        ))
    inputs = (logprobs, ref_logprobs, reward_scores, cost_scores, reward_values, cost_values)
    dtype = _checks.result_dtype(*inputs)
    outputs = new_outputs(6, tuple(logprobs.shape), dtype, logprobs.device)
    advantages, reward_advantages, cost_advantages, reward_returns, cost_returns, kl = outputs
    cpp_extension().safe_advantages(
        logprobs=as_numpy(logprobs, dtype), ref_logprobs=as_numpy(ref_logprobs, dtype),
        mask=mask_as_numpy(mask),
        reward_scores=as_numpy(reward_scores, dtype), cost_scores=as_numpy(cost_scores, dtype),
        reward_values=as_numpy(reward_values, dtype), cost_values=as_numpy(cost_values, dtype),
        advantages=advantages.numpy(), reward_advantages=reward_advantages.numpy(),
        cost_advantages=cost_advantages.numpy(), reward_returns=reward_returns.numpy(),
        cost_returns=cost_returns.numpy(), kl=kl.numpy(),
        kl_coef=kl_coef, lagrange_multiplier=float(multiplier), gamma=gamma,
        gae_lambda=gae_lambda, kl_estimator=kl_estimator,
        score_clip=math.inf if score_clip is None else score_clip,
        kl_in_cost=kl_in_cost, divide_by_one_plus_lambda=divide_by_one_plus_lambda, whiten=whiten,
        clip_before_kl=clip_before_kl, whiten_variance=whiten_variance, whiten_shift_mean=whiten_shift_mean,
    )
    return tuple(outputs)


@safe_advantages_op.register_fake
def _(logprobs, ref_logprobs, mask, reward_scores, cost_scores, reward_values, cost_values, *args):
    impl = args[10]  # after multiplier_tensor … whiten; the later options follow it
    inputs = (logprobs, ref_logprobs, reward_scores, cost_scores, reward_values, cost_values)
    dtype = torch.float32 if impl == "triton" else _checks.result_dtype(*inputs)
    return tuple(logprobs.new_empty(logprobs.shape, dtype=dtype) for _ in range(6))
