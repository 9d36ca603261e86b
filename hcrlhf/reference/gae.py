"""Reference GAE over the valid positions of each row (docs/ops.md#gae)."""

from __future__ import annotations

import torch

WHITEN_EPS = 1e-8
# Variance of masked_whiten: "unbiased" (divisor n − 1, scale rsqrt(var + eps): verl's masked_whiten),
# "population" (divisor n, scale rsqrt(max(var, eps)): OpenRLHF's advantage normalisation), "none"
# (centring only: OpenRLHF's no_std_norm).
WHITEN_VARIANCES = ("unbiased", "population", "none")


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (low-precision inputs are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    gae_lambda: float = 0.95,
    *,
    whiten: bool = False,
    whiten_variance: str = "unbiased",
    whiten_shift_mean: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, right to left, skipping masked positions.

    rewards, values: (B, T) floats; mask: (B, T) bool or 0/1; gamma: discount γ; gae_lambda: GAE λ
    (both in [0, 1]; the running advantage decays by γ·λ per valid position). Returns
    (advantages, returns), each (B, T), float32 (float64 when an input is float64), zero on masked
    positions. Masked positions are transparent: they neither contribute nor break the recursion,
    and the bootstrap value after a row's last valid position is 0. ``whiten``: the advantages
    (not the returns, which are computed first) go through ``masked_whiten`` over all valid
    positions of the batch, with ``whiten_variance`` and ``whiten_shift_mean``.
    """
    dtype = compute_dtype(rewards, values)
    rewards, values, valid = rewards.to(dtype), values.to(dtype), mask != 0
    batch, length = rewards.shape
    advantages = torch.zeros(batch, length, dtype=dtype, device=rewards.device)
    returns = torch.zeros_like(advantages)
    next_value = torch.zeros(batch, dtype=dtype, device=rewards.device)
    running = torch.zeros_like(next_value)
    for t in range(length - 1, -1, -1):
        m = valid[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = torch.where(m, delta + gamma * gae_lambda * running, running)
        next_value = torch.where(m, values[:, t], next_value)
        advantages[:, t] = torch.where(m, running, 0.0)
        returns[:, t] = torch.where(m, running + values[:, t], 0.0)
    if whiten:
        advantages = masked_whiten(advantages, valid, variance=whiten_variance, shift_mean=whiten_shift_mean)
    return advantages, returns


def masked_whiten(
    x: torch.Tensor,
    valid: torch.Tensor,
    eps: float = WHITEN_EPS,
    *,
    variance: str = "unbiased",
    shift_mean: bool = True,
) -> torch.Tensor:
    """Whiten x with the mean and variance over all valid entries; masked entries become 0.

    variance="unbiased": (x − mean)·rsqrt(var + eps), var with divisor n − 1 (taken as 0 when
    n < 2): verl's ``masked_whiten``. "population": (x − mean)·rsqrt(max(var, eps)), divisor n:
    OpenRLHF's normalisation. "none": x − mean. shift_mean=False adds the mean back afterwards
    (verl's ``shift_mean=False``): the scale changes, the mean does not.
    """
    if variance not in WHITEN_VARIANCES:
        raise ValueError(f"whiten_variance must be one of {WHITEN_VARIANCES}, got {variance!r}")
    count = valid.sum()
    mean = torch.where(valid, x, 0.0).sum() / count.clamp(min=1)
    centred = torch.where(valid, x - mean, 0.0)
    if variance == "unbiased":
        var = (centred * centred).sum() / (count - 1).clamp(min=1)
        var = torch.where(count > 1, var, 0.0)
        centred = centred * torch.rsqrt(var + eps)
    elif variance == "population":
        var = (centred * centred).sum() / count.clamp(min=1)
        centred = centred * torch.rsqrt(var.clamp(min=eps))
    if not shift_mean:
        centred = centred + mean
    return torch.where(valid, centred, 0.0)  # 0 on masked entries even when the statistics are NaN
