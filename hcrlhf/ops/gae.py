"""``ops.gae``: generalised advantage estimation over the valid positions of each row."""

from __future__ import annotations

import torch

from hcrlhf import reference
from hcrlhf._op_outputs import new_outputs
from hcrlhf.ops import _checks
from hcrlhf.ops._cpp import as_numpy, mask_as_numpy
from hcrlhf.ops._dispatch import cpp_extension, resolve_impl
from hcrlhf.reference.gae import WHITEN_VARIANCES

OP = "gae"


def check_whiten(op: str, whiten_variance, whiten_shift_mean) -> None:
    """The whitening options shared by gae and safe_advantages (``whiten`` itself is taken as bool())."""
    if not isinstance(whiten_shift_mean, bool):
        raise TypeError(f"{op}: whiten_shift_mean must be a bool, got {type(whiten_shift_mean).__name__}")
    if whiten_variance not in WHITEN_VARIANCES:
        raise ValueError(f"{op}: whiten_variance must be one of {WHITEN_VARIANCES}, got {whiten_variance!r}")


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    gae_lambda: float = 0.95,
    impl: str = "auto",
    *,
    whiten: bool = False,
    whiten_variance: str = "unbiased",
    whiten_shift_mean: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, right to left over the valid positions of each row.

    Args:
        rewards: (B, T) float16/bfloat16/float32/float64 per-token rewards; any strides.
        values: (B, T) critic values, same shape.
        mask: (B, T) bool or 0/1 numbers; true on the positions whose actions are trained. Masked
            positions are transparent (holes are skipped); the bootstrap value after a row's last
            valid position is 0. Nonzero counts as valid.
        gamma: discount γ in [0, 1].
        gae_lambda: GAE λ in [0, 1] (the bias/variance trade-off: 0 = one-step TD, 1 = Monte Carlo).
        impl: "auto" | "triton" | "cpp" | "torch" (see ``hcrlhf.ops._dispatch``).
        whiten: whiten the advantages over all valid positions of the batch, inside the kernel
            (the returns are computed before and stay unwhitened, as in verl).
        whiten_variance: "unbiased" — (A − mean)·rsqrt(var + 1e-8), var with divisor n − 1 (verl's
            masked_whiten); "population" — (A − mean)·rsqrt(max(var, 1e-8)), divisor n (OpenRLHF);
            "none" — A − mean (OpenRLHF's no_std_norm).
        whiten_shift_mean: False adds the mean back after scaling (verl's shift_mean=False).

    Returns:
        (advantages, returns), each (B, T) float32, zero on masked positions; fp16/bf16 inputs
        are computed in fp32. Float64 inputs compute and return float64 (reference and C++ only).

    Equivalent naive code::

        next_value = running = 0
        for t in reversed(range(T)):
            if mask[b, t]:
                delta = rewards[b, t] + gamma * next_value - values[b, t]
                running = delta + gamma * gae_lambda * running
                advantages[b, t], returns[b, t] = running, running + values[b, t]
                next_value = values[b, t]
        if whiten:  # over the whole batch; see hcrlhf.reference.gae.masked_whiten
            advantages = masked_whiten(advantages, mask, variance=whiten_variance, shift_mean=whiten_shift_mean)
    """
    _checks.check_tensor(OP, "rewards", rewards, ndim=2)
    shape = tuple(rewards.shape)
    _checks.check_tensor(OP, "values", values, ndim=2)
    _checks.check_same_shape(OP, shape, values=values)
    _checks.check_mask(OP, mask, shape)
    device = _checks.check_same_device(OP, rewards=rewards, values=values, mask=mask)
    _checks.check_unit_interval(OP, "gamma", gamma)
    _checks.check_unit_interval(OP, "gae_lambda", gae_lambda)
    check_whiten(OP, whiten_variance, whiten_shift_mean)
    whiten = bool(whiten)
    dtype = _checks.result_dtype(rewards, values)
    chosen = resolve_impl(impl, device, op=OP, float64=dtype == torch.float64)

    with torch.no_grad():
        if chosen == "torch":
            return reference.gae(rewards, values, mask, gamma, gae_lambda, whiten=whiten,
                                 whiten_variance=whiten_variance, whiten_shift_mean=whiten_shift_mean)
        advantages, returns = torch.ops.hcrlhf.gae(rewards, values, mask, float(gamma), float(gae_lambda), chosen,
                                                   whiten, whiten_variance, whiten_shift_mean)
        return advantages, returns


# The kernel entry point as a torch.library custom op (docs/ops.md#torchcompile): opaque to
# torch.compile, shapes from the fake impl. Not differentiable (advantages are targets).
@torch.library.custom_op("hcrlhf::gae", mutates_args=())
def gae_op(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, gae_lambda: float,
           impl: str, whiten: bool = False, whiten_variance: str = "unbiased",
           whiten_shift_mean: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by the "triton" or "cpp" kernel; arguments already checked by ``gae``.

    The whitening options come after ``impl`` (with defaults) so the schema stays compatible."""
    if impl == "triton":
        from hcrlhf.kernels.gae import gae as gae_triton

        return gae_triton(rewards, values, mask, gamma, gae_lambda, whiten=whiten,
                          whiten_variance=whiten_variance, whiten_shift_mean=whiten_shift_mean)
    dtype = _checks.result_dtype(rewards, values)
    advantages, returns = new_outputs(2, tuple(rewards.shape), dtype, rewards.device)
    cpp_extension().gae(
        rewards=as_numpy(rewards, dtype), values=as_numpy(values, dtype), mask=mask_as_numpy(mask),
        advantages_out=advantages.numpy(), returns_out=returns.numpy(), gamma=gamma, gae_lambda=gae_lambda,
        whiten=whiten, whiten_variance=whiten_variance, whiten_shift_mean=whiten_shift_mean,
    )
    return advantages, returns


@gae_op.register_fake
def _(rewards, values, mask, gamma, gae_lambda, impl, *whiten_options):
    dtype = torch.float32 if impl == "triton" else _checks.result_dtype(rewards, values)
    return rewards.new_empty(rewards.shape, dtype=dtype), rewards.new_empty(rewards.shape, dtype=dtype)
