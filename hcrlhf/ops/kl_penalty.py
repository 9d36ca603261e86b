"""``ops.kl_penalty``: differentiable per-token KL estimates for a KL loss (docs/ops.md#kl-estimators)."""

from __future__ import annotations

import numbers

import torch

from hcrlhf.ops import _checks
from hcrlhf.reference.kl_penalty import ESTIMATORS
from hcrlhf.reference.kl_penalty import kl_penalty as reference_kl_penalty

OP = "kl_penalty"
__all__ = ["ESTIMATORS", "kl_penalty"]


def kl_penalty(
    logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    estimator: str = "k1",
    *,
    mask: torch.Tensor | None = None,
    clamp: float | None = None,
    old_logprobs: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-token estimate of KL(π ‖ π_ref) for tokens sampled from π, differentiable (KL as a loss).

    Plain torch (elementwise; ``torch.compile`` fuses it), so it works on any device and dtype
    and autograd differentiates it w.r.t. ``logprobs`` (and ``ref_logprobs`` if it requires grad).

    Args:
        logprobs: (...) float16/bfloat16/float32/float64 log π(y_t) of the sampled tokens.
        ref_logprobs: (...) log π_ref(y_t), same shape and device.
        estimator: with d = logprobs − ref_logprobs:
            "k1" — d (verl "kl"/"k1", OpenRLHF "k1");
            "k2" — d²/2 (verl "mse"/"k2", OpenRLHF "k2");
            "k3" — e^{−d} − 1 + d with d clamped to [−20, 20] and the result to [−10, 10]
            (verl "low_var_kl"/"k3"; the same values and gradients as OpenRLHF "k3");
            "abs" — |d| (verl "abs").
            A "+" suffix ("k1+", "k3+", …): the value of that estimator, the gradient of k2,
            d·∇d — straight-through, whose expectation under π is ∇KL(π ‖ π_ref) (verl's "k3+";
            OpenRLHF's ``unbiased_gradient=True``).
        mask: optional (...) bool or 0/1; the estimate (and its gradient) is 0 where mask is 0.
        clamp: None or c > 0: the value is clamped to [−c, c] (OpenRLHF clamps every estimator to
            ±10: ``clamp=10.0``); the gradient is 0 where the clamp binds (except with "+").
        old_logprobs: only with a "+" estimator: log π_old(y_t) of the rollout policy; the k2
            gradient is weighted by w = min(e^{logprobs − old_logprobs}, 10), detached
            (OpenRLHF's off-policy correction).

    Returns:
        (...) float32 (float64 if an input is float64).

    Equivalent naive code::

        d = logprobs.float() - ref_logprobs.float()
        value = {"k1": d, "k2": d**2 / 2, "abs": d.abs(),
                 "k3": (torch.exp(-d.clamp(-20, 20)) - 1 + d.clamp(-20, 20)).clamp(-10, 10)}[name]
        value = value.clamp(-clamp, clamp) if clamp is not None else value
        if estimator.endswith("+"):
            surrogate = w * d**2 / 2
            value = value.detach() + surrogate - surrogate.detach()
        value = torch.where(mask != 0, value, 0.0) if mask is not None else value
    """
    _checks.check_tensor(OP, "logprobs", logprobs)
    shape = tuple(logprobs.shape)
    _checks.check_tensor(OP, "ref_logprobs", ref_logprobs)
    _checks.check_same_shape(OP, shape, ref_logprobs=ref_logprobs)
    tensors = dict(logprobs=logprobs, ref_logprobs=ref_logprobs)
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(f"{OP}: estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if mask is not None:
        _checks.check_mask(OP, mask, shape)
        tensors["mask"] = mask
    if old_logprobs is not None:
        if not estimator.endswith("+"):
            raise ValueError(f"{OP}: old_logprobs weights the straight-through gradient and needs a '+' "
                             f"estimator (e.g. {estimator + '+'!r}), got estimator={estimator!r}")
        _checks.check_tensor(OP, "old_logprobs", old_logprobs)
        _checks.check_same_shape(OP, shape, old_logprobs=old_logprobs)
        tensors["old_logprobs"] = old_logprobs
    _checks.check_same_device(OP, **tensors)
    if clamp is not None:
        if isinstance(clamp, bool) or not isinstance(clamp, numbers.Real) or not (
            _checks._finite(clamp) and clamp > 0
        ):
            raise ValueError(f"{OP}: clamp must be None or a finite number > 0, got {clamp!r}")
        clamp = float(clamp)
    return reference_kl_penalty(logprobs, ref_logprobs, estimator, mask=mask, clamp=clamp,
                                old_logprobs=old_logprobs)
