"""Loss pieces of the Lagrangian RL trainer, as plain functions of tensors (easy to test in isolation).

Shapes: per-token tensors are (B, T) in *action* coordinates (column j is the action that produces
token j + 1 of the sequence; see :mod:`hcrlhf.train.rl_trainer`), ``mask`` is (B, T) bool and true on
the trained response tokens. Every ``denominator`` is a token (or row) count passed in as a 0-dim
tensor, so that a minibatch split into micro-batches sums to exactly its un-split loss and no count is
read on the host.

AMA (:func:`ama_mask`) is Equilibrate RLHF's adaptive message-wise alignment (docs/method.md#equilibrate-rlhf). It is
**experimental** here: the authors published no PPO/RLOO + AMA numbers, only a DPO-based variant.
"""

from __future__ import annotations

import torch

__all__ = [
    "masked_sum",
    "ppo_policy_loss",
    "reinforce_loss",
    "clipped_value_loss",
    "masked_entropy",
    "explained_variance",
    "ama_signal",
    "ama_mask",
]


def masked_sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ values over the true positions of ``mask`` (``where``, so a NaN outside the mask stays out)."""
    return torch.where(mask, values, torch.zeros_like(values)).sum()


def _count(mask: torch.Tensor, denominator):
    if denominator is None:
        return mask.sum().clamp(min=1).to(torch.float32)
    return denominator


def ppo_policy_loss(logprobs, old_logprobs, advantages, mask, clip_range: float, *, denominator=None):
    """PPO's clipped surrogate, averaged over the tokens of ``mask``.

    ``loss = mean_mask(−min(ρ·A, clip(ρ, 1 − ε, 1 + ε)·A))`` with ρ = exp(logprobs − old_logprobs).

    Returns:
        ``(loss, clipped_sum, approx_kl_sum)``: the loss, and over the masked tokens the number whose ratio
        was clipped and the sum of the k3 estimate (ρ − 1) − log ρ of KL(old ‖ new) (diagnostics, detached).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_range, 1.0 + clip_range) * advantages
    per_token = -torch.min(unclipped, clipped)
    loss = masked_sum(per_token, mask) / _count(mask, denominator)
    with torch.no_grad():
        clipped_count = masked_sum(((ratio - 1.0).abs() > clip_range).float(), mask)
        approx_kl = masked_sum((ratio - 1.0) - log_ratio, mask)
    return loss, clipped_count, approx_kl


def reinforce_loss(logprobs, advantages, mask, *, denominator=None):
    """``−mean_i A_i · Σ_t mask·log π(y_t)`` (HC-RLHF's RLOO update): ``advantages`` (B,), ``logprobs`` (B, T).

    ``denominator`` is the number of rows (default: B).
    """
    sequence_logprobs = torch.where(mask, logprobs, torch.zeros_like(logprobs)).sum(dim=1)
    rows = logprobs.new_tensor(float(logprobs.shape[0])) if denominator is None else denominator
    return -(advantages * sequence_logprobs).sum() / rows


def clipped_value_loss(values, old_values, returns, mask, clip_range: float, *, denominator=None):
    """Safe RLHF's clipped value loss ``0.5·mean_mask(max((V − R)², (V_clip − R)²))`` with
    ``V_clip = V_old + clamp(V − V_old, ±clip_range)``."""
    clipped = old_values + (values - old_values).clamp(-clip_range, clip_range)
    per_token = torch.max((values - returns) ** 2, (clipped - returns) ** 2)
    return 0.5 * masked_sum(per_token, mask) / _count(mask, denominator)


def masked_entropy(entropy, mask, *, denominator=None):
    """Mean entropy over the tokens of ``mask``."""
    return masked_sum(entropy, mask) / _count(mask, denominator)


@torch.no_grad()
def explained_variance(values, returns, mask) -> torch.Tensor:
    """``1 − Var(R − V)/Var(R)`` over the masked tokens (a 0-dim tensor; NaN when Var(R) = 0)."""
    m = mask.to(values.dtype)
    n = m.sum()

    def variance(x):
        mean = (x * m).sum() / n
        return (((x - mean) * m) ** 2).sum() / n

    return 1.0 - variance(returns - values) / variance(returns)


# ------------------------------------------------------------------------------------------- AMA


@torch.no_grad()
def ama_signal(token_scores: torch.Tensor, mask: torch.Tensor, *, mode: str, upper: float = 0.3,
               lower: float = -0.3) -> torch.Tensor:
    """The AMA signal z_t ∈ {+1, −1} (float, (B, T)) from token scores s_t (docs/method.md#equilibrate-rlhf).

    * ``"sign"``: z = +1 where s ≥ 0, else −1.
    * ``"hysteresis"``: z switches to +1 where s > ``upper`` and to −1 where s < ``lower``, and otherwise
      keeps its previous value along the row (only valid positions count). **[ours]** Before the first
      switch a row starts from the sign of its first valid score.

    Vectorised without a loop over T: z_t is the sign of the last "event" (a crossing) at or before t.
    """
    if mode == "sign":
        return torch.where(token_scores >= 0, 1.0, -1.0).to(torch.float32)
    if mode != "hysteresis":
        raise ValueError(f"ama_signal: mode must be 'sign' or 'hysteresis', got {mode!r}")
    width = token_scores.shape[1]
    positions = torch.arange(width, device=token_scores.device).expand_as(token_scores)
    events = torch.where(token_scores > upper, 1.0, torch.where(token_scores < lower, -1.0, 0.0))
    events = torch.where(mask, events, torch.zeros_like(events))
    last_event = torch.where(events != 0, positions, torch.full_like(positions, -1)).cummax(dim=1).values
    from_event = events.gather(1, last_event.clamp(min=0))
    # The start value: the sign of the row's first valid score.
    first_valid = torch.where(mask, positions, torch.full_like(positions, width)).amin(dim=1, keepdim=True)
    first_score = token_scores.gather(1, first_valid.clamp(max=width - 1))
    start = torch.where(first_score >= 0, 1.0, -1.0)
    return torch.where(last_event >= 0, from_event, start.expand_as(from_event)).to(torch.float32)


@torch.no_grad()
def ama_mask(advantages: torch.Tensor, token_scores: torch.Tensor, mask: torch.Tensor, *, mode: str,
             upper: float = 0.3, lower: float = -0.3, min_kept: int = 1) -> torch.Tensor:
    """The policy-loss mask under AMA: ``mask`` AND (z_t agrees with the sign of the advantage).

    EXPERIMENTAL (see the module docstring). ``advantages`` is (B,) (rloo: one sign per row) or (B, T)
    (ppo: one sign per token **[ours]**); A ≥ 0 counts as +1. Rows left with fewer than ``min_kept`` tokens
    fall back to their full mask. With ``mode="off"`` the input ``mask`` itself is returned, so the loss
    is exactly the plain loss. KL, entropy and critic losses should keep the full mask.
    """
    if mode == "off":
        return mask
    signal = ama_signal(token_scores, mask, mode=mode, upper=upper, lower=lower)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    advantage_sign = torch.where(advantages >= 0, 1.0, -1.0)
    kept = mask & (signal == advantage_sign)
    too_few = kept.sum(dim=1, keepdim=True) < min_kept
    return torch.where(too_few, mask, kept)
