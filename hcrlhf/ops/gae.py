"""``ops.gae``: generalised advantage estimation over the valid positions of each row."""

from __future__ import annotations

import torch

from hcrlhf import reference
from hcrlhf._op_outputs import new_outputs
from hcrlhf.ops import _checks
from hcrlhf.ops._cpp import as_numpy, mask_as_numpy
from hcrlhf.ops._dispatch import cpp_extension, resolve_impl

OP = "gae"


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    gae_lambda: float = 0.95,
    impl: str = "auto",
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
    """
    _checks.check_tensor(OP, "rewards", rewards, ndim=2)
    shape = tuple(rewards.shape)
    _checks.check_tensor(OP, "values", values, ndim=2)
    _checks.check_same_shape(OP, shape, values=values)
    _checks.check_mask(OP, mask, shape)
    device = _checks.check_same_device(OP, rewards=rewards, values=values, mask=mask)
    _checks.check_unit_interval(OP, "gamma", gamma)
    _checks.check_unit_interval(OP, "gae_lambda", gae_lambda)
    dtype = _checks.result_dtype(rewards, values)
    chosen = resolve_impl(impl, device, op=OP, float64=dtype == torch.float64)

    with torch.no_grad():
        if chosen == "torch":
            return reference.gae(rewards, values, mask, gamma, gae_lambda)
        advantages, returns = torch.ops.hcrlhf.gae(rewards, values, mask, float(gamma), float(gae_lambda), chosen)
        return advantages, returns


# The kernel entry point as a torch.library custom op (docs/ops.md#torchcompile): opaque to
# torch.compile, shapes from the fake impl. Not differentiable (advantages are targets).
@torch.library.custom_op("hcrlhf::gae", mutates_args=())
def gae_op(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, gae_lambda: float,
           impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) by the "triton" or "cpp" kernel; arguments already checked by ``gae``."""
    if impl == "triton":
        from hcrlhf.kernels.gae import gae as gae_triton

        return gae_triton(rewards, values, mask, gamma, gae_lambda)
    dtype = _checks.result_dtype(rewards, values)
    advantages, returns = new_outputs(2, tuple(rewards.shape), dtype, rewards.device)
    cpp_extension().gae(
        rewards=as_numpy(rewards, dtype), values=as_numpy(values, dtype), mask=mask_as_numpy(mask),
        advantages_out=advantages.numpy(), returns_out=returns.numpy(), gamma=gamma, gae_lambda=gae_lambda,
    )
    return advantages, returns


@gae_op.register_fake
def _(rewards, values, mask, gamma, gae_lambda, impl):
    dtype = torch.float32 if impl == "triton" else _checks.result_dtype(rewards, values)
    return rewards.new_empty(rewards.shape, dtype=dtype), rewards.new_empty(rewards.shape, dtype=dtype)
