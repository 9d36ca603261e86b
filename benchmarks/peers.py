"""Peer-style baselines, written the way the field's RLHF code does it today (Safe RLHF, OpenRLHF, TRL).

These are the "before" side of every benchmark. Advantages: a reverse Python loop over T with
small tensor ops per step, a per-row ``nonzero()`` for each row's end (a host sync per row),
``scatter_add`` for the scores and a clamp — Safe RLHF's PPO-Lagrangian path, run twice (reward
and cost). Log-probs: a full log_softmax then gather (Safe RLHF), an fp32 upcast of the whole
logits first (OpenRLHF), a per-row loop (TRL), and the unfused lm_head.
"""

from __future__ import annotations

import torch


def python_loop_gae(rewards, values, mask, gamma, gae_lambda):
    """TRL / Safe RLHF style GAE: zero rewards and values with the mask, one loop over T."""
    mask = mask.to(rewards.dtype)
    values = values * mask
    rewards = rewards * mask
    last = 0.0
    reversed_advantages = []
    length = rewards.size(-1)
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * gae_lambda * last
        reversed_advantages.append(last)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages, advantages + values


def safe_rlhf_advantages(logprobs, ref_logprobs, mask, reward_scores, cost_scores, reward_values, cost_values,
                         *, kl_coef, lagrange_multiplier, gamma=1.0, gae_lambda=0.95, score_clip=50.0):
    """Safe RLHF's reward/cost shaping and two GAE loops, then the λ-combination."""
    end_index = torch.cat([row.nonzero()[-1] for row in mask])  # one host sync per row
    kl_divergence = -kl_coef * (logprobs - ref_logprobs)
    rewards = 0.5 * kl_divergence
    costs = -0.5 * kl_divergence
    reward_clip = torch.clamp(reward_scores, min=-score_clip, max=score_clip)
    cost_clip = torch.clamp(cost_scores, min=-score_clip, max=score_clip)
    rewards = torch.scatter_add(rewards, dim=-1, index=end_index.unsqueeze(-1), src=reward_clip.unsqueeze(-1))
    costs = torch.scatter_add(costs, dim=-1, index=end_index.unsqueeze(-1), src=cost_clip.unsqueeze(-1))
    reward_advantages, reward_returns = python_loop_gae(rewards, reward_values, mask, gamma, gae_lambda)
    cost_advantages, cost_returns = python_loop_gae(costs, cost_values, mask, gamma, gae_lambda)
    advantages = (reward_advantages - lagrange_multiplier * cost_advantages) / (1 + lagrange_multiplier)
    return advantages, reward_advantages, cost_advantages, reward_returns, cost_returns


def rloo_python(logprobs, ref_logprobs, mask, reward_scores, cost_scores, *, group_size, kl_coef,
                lagrange_multiplier, score_clip=50.0):
    """HC-RLHF-code style RLOO: masked KL sum, clamp, per-group leave-one-out baseline."""
    kl = ((logprobs - ref_logprobs) * mask).sum(-1)
    returns = torch.clamp(reward_scores - kl_coef * kl, -score_clip, score_clip) - lagrange_multiplier * cost_scores
    grouped = returns.view(-1, group_size)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).view(-1), returns, kl


# Log-probs
def safe_rlhf_logprobs(logits, labels):
    """Safe RLHF's gather_log_probabilities: a full log_softmax in the logits' dtype, then gather."""
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def fp32_upcast_logprobs(logits, labels):
    """OpenRLHF-style: upcast the whole logits tensor to fp32 first, then log_softmax + gather."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def per_row_logprobs(logits, labels):
    """TRL's selective_log_softmax: fp32 -> gather minus a per-row logsumexp loop; else a per-row
    log_softmax loop."""
    if logits.dtype in (torch.float32, torch.float64):
        selected = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
        return selected - torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
    rows = [torch.log_softmax(row, dim=-1).gather(-1, lab.unsqueeze(-1)).squeeze(-1)
            for row, lab in zip(logits, labels, strict=True)]
    return torch.stack(rows)


def unfused_linear_logprobs(hidden, weight, labels):
    return safe_rlhf_logprobs(hidden @ weight.T, labels)


def bare_lm_head(hidden, weight, labels):
    """The lm_head matmul alone (its gradient flows from a dummy sum): the compute floor."""
    return (hidden @ weight.T).sum(-1)
