"""The advantage references against hand computation and against Safe RLHF's own formulation."""

import pytest
import torch

from hcrlhf import reference


def test_gae_three_token_hand_example():
    # One row, three valid tokens, γ = 0.9, λ = 0.5.
    rewards = torch.tensor([[1.0, 0.0, 2.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 1.0, 1.5]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    advantages, returns = reference.gae(rewards, values, mask, gamma=0.9, gae_lambda=0.5)
    d2 = 2.0 + 0.9 * 0.0 - 1.5  # bootstrap after the end is 0
    d1 = 0.0 + 0.9 * 1.5 - 1.0
    d0 = 1.0 + 0.9 * 1.0 - 0.5
    a2 = d2
    a1 = d1 + 0.45 * a2
    a0 = d0 + 0.45 * a1
    torch.testing.assert_close(advantages, torch.tensor([[a0, a1, a2]], dtype=torch.float64))
    torch.testing.assert_close(returns, advantages + values)


def test_gae_skips_holes_and_zeroes_masked_positions():
    # A hole at t=1 must be transparent: same result as the row with that position removed.
    rewards = torch.tensor([[1.0, 7.0, 2.0, 3.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 9.0, 1.5, -1.0]], dtype=torch.float64)
    mask = torch.tensor([[True, False, True, True]])
    advantages, returns = reference.gae(rewards, values, mask, gamma=0.95, gae_lambda=0.9)
    dense_adv, dense_ret = reference.gae(rewards[:, [0, 2, 3]], values[:, [0, 2, 3]],
                                         torch.ones(1, 3, dtype=torch.bool), gamma=0.95, gae_lambda=0.9)
    torch.testing.assert_close(advantages[:, [0, 2, 3]], dense_adv)
    torch.testing.assert_close(returns[:, [0, 2, 3]], dense_ret)
    assert advantages[0, 1] == 0 and returns[0, 1] == 0


def test_safe_advantages_three_token_hand_example():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    ref_logprobs = torch.tensor([[-1.5, -1.0, -0.5]], dtype=torch.float64)
    mask = torch.tensor([[True, True, False]])  # the end is t = 1
    values = torch.tensor([[0.2, 0.4, 9.0]], dtype=torch.float64)
    beta, multiplier = 0.1, 3.0
    out = reference.safe_advantages(
        logprobs, ref_logprobs, mask, torch.tensor([2.0], dtype=torch.float64),
        torch.tensor([1.0], dtype=torch.float64), values, values, kl_coef=beta,
        lagrange_multiplier=multiplier, gamma=1.0, gae_lambda=1.0,
    )
    kl = [0.5, -1.0]
    r = [-beta * kl[0], -beta * kl[1] + 2.0]
    c = [beta * kl[0], beta * kl[1] + 1.0]
    # γ = λ = 1: the advantage is the reward-to-go minus the value.
    a_r = [r[0] + r[1] - 0.2, r[1] - 0.4]
    a_c = [c[0] + c[1] - 0.2, c[1] - 0.4]
    expected = [(a_r[t] - multiplier * a_c[t]) / (1 + multiplier) for t in range(2)] + [0.0]
    torch.testing.assert_close(out.advantages, torch.tensor([expected], dtype=torch.float64))
    torch.testing.assert_close(out.kl, torch.tensor([kl + [0.0]], dtype=torch.float64))


def safe_rlhf_gae(rewards, values, sequence_mask, start, gamma, gae_lambda):
    """Safe RLHF's formulation (its PPO-Lagrangian trainer): zero rewards and values with the
    mask, then a plain reverse loop from `start` with no skipping."""
    values = values * sequence_mask
    rewards = rewards * sequence_mask
    last = 0.0
    reversed_adv = []
    length = rewards.size(-1)
    for t in reversed(range(start, length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * gae_lambda * last
        reversed_adv.append(last)
    advantages = torch.stack(reversed_adv[::-1], dim=1)
    return advantages, advantages + values[:, start:]


@pytest.mark.parametrize("kl_in_cost", [True, False])
def test_safe_advantages_equals_safe_rlhf_on_contiguous_masks(kl_in_cost):
    gen = torch.Generator().manual_seed(3)
    batch, length, start = 5, 24, 6  # the prompt is the first `start` positions
    lengths = torch.randint(1, length - start + 1, (batch,), generator=gen)
    positions = torch.arange(length)
    mask = (positions >= start) & (positions < (start + lengths)[:, None])
    logprobs, ref = (torch.randn(batch, length, generator=gen, dtype=torch.float64) for _ in range(2))
    reward_values, cost_values = (torch.randn(batch, length, generator=gen, dtype=torch.float64) for _ in range(2))
    reward_scores, cost_scores = (torch.randn(batch, generator=gen, dtype=torch.float64) for _ in range(2))
    beta, clip, multiplier = 0.05, 5.0, 0.7

    # Safe RLHF's pipeline: a per-row nonzero() for the end index, scores added there, clamp, then
    # two plain GAE loops over mask-zeroed rewards and values. The shaping follows docs/ops.md#safe_advantages (full β
    # in each stream, clamp after adding); Safe RLHF itself puts β/2 in each stream.
    kl_divergence = -beta * (logprobs - ref)
    rewards, costs = kl_divergence.clone(), (-kl_divergence if kl_in_cost else torch.zeros_like(kl_divergence))
    for b in range(batch):
        end = int(mask[b].nonzero()[-1])
        rewards[b, end] += reward_scores[b]
        costs[b, end] += cost_scores[b]
    rewards, costs = rewards.clamp(-clip, clip), costs.clamp(-clip, clip)
    sequence_mask = mask.to(torch.float64)
    adv_r, ret_r = safe_rlhf_gae(rewards, reward_values, sequence_mask, start, 1.0, 0.95)
    adv_c, ret_c = safe_rlhf_gae(costs, cost_values, sequence_mask, start, 1.0, 0.95)
    combined = (adv_r - multiplier * adv_c) / (1 + multiplier)

    out = reference.safe_advantages(logprobs, ref, mask, reward_scores, cost_scores, reward_values, cost_values,
                                    kl_coef=beta, lagrange_multiplier=multiplier, score_clip=clip,
                                    kl_in_cost=kl_in_cost)
    valid = mask[:, start:]
    for ours, theirs in ((out.advantages, combined), (out.reward_advantages, adv_r), (out.cost_advantages, adv_c),
                         (out.reward_returns, ret_r), (out.cost_returns, ret_c)):
        torch.testing.assert_close(ours[:, start:][valid], theirs[valid])


def test_masked_whiten_uses_unbiased_variance():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -7.0]], dtype=torch.float64)
    valid = torch.tensor([[True, True, False], [True, True, False]])
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    expected = (values - values.mean()) / torch.sqrt(values.var(unbiased=True) + 1e-8)
    out = reference.masked_whiten(x, valid)
    torch.testing.assert_close(out[valid], expected)
    assert (out[~valid] == 0).all()


def test_k3_is_clamped_like_verl_low_var_kl():
    """k3 = clamp(e^{−c} − 1 + c, ±10) with c = clamp(d, ±20), d = logprobs − ref_logprobs
    (docs/ops.md#kl-estimators): finite for any d, NaN only for NaN."""
    inf, nan = float("inf"), float("nan")
    d = torch.tensor([-inf, -100.0, -20.0, -3.0, -2.6, -0.5, 0.0, 0.5, 10.0, 10.9, 11.5, 100.0, inf, nan],
                     dtype=torch.float64)
    got = reference.kl_penalty(d, torch.zeros_like(d), "k3")
    unclamped = torch.exp(-d) - 1 + d
    expected = torch.where(unclamped > 10, 10.0, unclamped)
    expected[[0, -3]] = 10.0  # ±inf: the log-ratio clamp keeps exp finite (no inf − inf)
    torch.testing.assert_close(got[:-1], expected[:-1], atol=0, rtol=0)
    assert torch.isnan(got[-1])
    assert got[4] < 10 and got[3] == 10  # the cap binds between d = −2.6 and −3 (at −2.611)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # no overflow in low precision either
        low = reference.kl_penalty(d[:-1].to(dtype), torch.zeros(13, dtype=dtype), "k3")
        assert torch.isfinite(low).all() and low.max() <= 10

