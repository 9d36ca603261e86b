"""Reference per-token KL estimators (docs/ops.md#kl-estimators), differentiable.

One definition serves both uses: the advantage ops call it under ``torch.no_grad()`` with
"k1" | "k2" | "k3" (the KL penalty folded into the rewards), and ``ops.kl_penalty`` calls it with
autograd on for KL-as-loss.
"""

from __future__ import annotations

import torch

# k3 as verl's kl_penalty "low_var_kl": the log-ratio clamped to ±K3_LOG_RATIO_CLIP before exp,
# the estimate clamped to ±K3_CLIP after. Keeps k3 finite (≤ 10) for any log-ratio, ±inf
# included; NaN still propagates. OpenRLHF's k3 (log-ratio clamped below at −10, estimate to
# ±10) gives the same values and gradients: wherever the two log-ratio clamps differ, the
# estimate is already capped at 10 (zero gradient).
K3_LOG_RATIO_CLIP = 20.0
K3_CLIP = 10.0
# OpenRLHF's KL_IS_WEIGHT_CLIP: the importance weight π/π_old of the straight-through gradient
# is capped at this value.
IS_WEIGHT_CLIP = 10.0
BASE_ESTIMATORS = ("k1", "k2", "k3", "abs")
# A "+" suffix: the value of the estimator, the gradient of k2 (straight-through), as verl's "k3+".
ESTIMATORS = BASE_ESTIMATORS + tuple(name + "+" for name in BASE_ESTIMATORS)


def kl_estimate(d: torch.Tensor, estimator: str) -> torch.Tensor:
    """The estimator's value (and pathwise gradient) at the log-ratio d = log π − log π_ref."""
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    if estimator == "k3":
        c = d.clamp(-K3_LOG_RATIO_CLIP, K3_LOG_RATIO_CLIP)
        return (torch.exp(-c) - 1.0 + c).clamp(-K3_CLIP, K3_CLIP)
    if estimator == "abs":
        return d.abs()
    raise ValueError(f"kl_estimator must be one of {BASE_ESTIMATORS}, got {estimator!r}")


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str = "k1",
    *,
    mask: torch.Tensor | None = None,
    clamp: float | None = None,
    old_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) from d = logprobs − ref_logprobs (same shape).

    k1 = d, k2 = d²/2, k3 = e^{−d} − 1 + d (with verl's "low_var_kl" clamps, see K3_*),
    abs = |d|. ``estimator + "+"``: the same value, the gradient of k2 (w·d²/2 with
    w = min(e^{logprobs − old_logprobs}, 10) detached when ``old_logprobs`` is given, else 1).
    ``clamp``: the value is clamped to [−clamp, clamp] (OpenRLHF clamps every estimator to ±10).
    ``mask``: zero (value and gradient) where mask is 0. Computed in float32, or float64 when an
    input is float64; differentiable w.r.t. logprobs and ref_logprobs.
    """
    straight_through = estimator.endswith("+")
    base = estimator[:-1] if straight_through else estimator
    if base not in BASE_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {ESTIMATORS}, got {estimator!r}")
    dtype = torch.promote_types(torch.promote_types(logprobs.dtype, ref_logprobs.dtype), torch.float32)
    d = logprobs.to(dtype) - ref_logprobs.to(dtype)
    if mask is not None:
        # Masked log-ratios become 0 before the estimator, so a non-finite one there cannot turn
        # a zero upstream gradient into NaN (0·inf) on the way back.
        d = torch.where(mask != 0, d, 0.0)
    value = kl_estimate(d, base)
    if clamp is not None:
        value = value.clamp(-clamp, clamp)
    if straight_through:
        surrogate = 0.5 * d * d
        if old_logprobs is not None:
            log_weight = (logprobs.to(dtype) - old_logprobs.to(dtype)).detach()
            weight = torch.exp(log_weight).clamp(max=IS_WEIGHT_CLIP)
            surrogate = weight * surrogate
        value = value.detach() + (surrogate - surrogate.detach())
    if mask is not None:
        value = torch.where(mask != 0, value, 0.0)
    return value
