"""Reference GAE over the valid positions of each row (docs/ops.md#gae)."""

from __future__ import annotations

import torch


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (low-precision inputs are upcast)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    gae_lambda: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation, right to left, skipping masked positions.

    rewards, values: (B, T) floats; mask: (B, T) bool or 0/1; gamma: discount γ; gae_lambda: GAE λ
    (both in [0, 1]; the running advantage decays by γ·λ per valid position). Returns
    (advantages, returns), each (B, T), float32 (float64 when an input is float64), zero on masked
    positions. Masked positions are transparent: they neither contribute nor break the recursion,
    and the bootstrap value after a row's last valid position is 0.
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
    return advantages, returns
