"""The RL trainer's loss pieces: AMA off is exactly the plain loss, AMA on zeroes the gradients of the tokens
whose signal disagrees with the advantage (autograd), the hysteresis signal, the min-kept fallback, and
micro-batch denominators that add up to the un-split loss."""

import pytest
import torch

from hcrlhf.train.rl_losses import (
    ama_mask,
    ama_signal,
    clipped_value_loss,
    ppo_policy_loss,
    reinforce_loss,
)


def _batch(generator, rows=5, width=9):
    logprobs = -torch.rand(rows, width, generator=generator) * 3
    old = logprobs + 0.3 * torch.randn(rows, width, generator=generator)
    advantages = torch.randn(rows, width, generator=generator)
    scores = torch.randn(rows, width, generator=generator)
    mask = torch.rand(rows, width, generator=generator) > 0.25
    mask[:, 0] = True
    return logprobs, old, advantages, scores, mask


def plain_ppo_loss(logprobs, old, advantages, mask, eps):
    # Written out independently of the trainer's code, the textbook way.
    ratio = torch.exp(logprobs - old)
    per_token = -torch.min(ratio * advantages, ratio.clamp(1 - eps, 1 + eps) * advantages)
    m = mask.float()
    return (per_token * m).sum() / m.sum()


def test_ama_off_is_exactly_the_plain_loss(generator):
    logprobs, old, advantages, scores, mask = _batch(generator)
    kept = ama_mask(advantages, scores, mask, mode="off")
    assert kept is mask
    loss, _, _ = ppo_policy_loss(logprobs, old, advantages, kept, 0.2)
    assert torch.equal(loss, plain_ppo_loss(logprobs, old, advantages, mask, 0.2))
    # rloo: per-row advantages, REINFORCE loss.
    row_advantages = advantages[:, 0]
    expected = -(row_advantages * (logprobs * mask).sum(1)).sum() / logprobs.shape[0]
    assert torch.allclose(reinforce_loss(logprobs, row_advantages, ama_mask(row_advantages, scores, mask, mode="off")),
                          expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["sign", "hysteresis"])
@pytest.mark.parametrize("estimator", ["ppo", "rloo"])
def test_ama_on_zeroes_gradients_of_disagreeing_tokens(generator, mode, estimator):
    logprobs, old, advantages, scores, mask = _batch(generator, rows=6, width=12)
    if estimator == "rloo":
        advantages = advantages[:, 0]  # one advantage per row
    old = logprobs + 0.01 * torch.randn(logprobs.shape, generator=generator)  # inside the clip range
    kept = ama_mask(advantages, scores, mask, mode=mode, upper=0.3, lower=-0.3, min_kept=1)
    signal = ama_signal(scores, mask, mode=mode, upper=0.3, lower=-0.3)
    sign = torch.where(advantages >= 0, 1.0, -1.0)
    agrees = signal == (sign.unsqueeze(1) if estimator == "rloo" else sign)
    leaf = logprobs.clone().requires_grad_(True)
    if estimator == "ppo":
        loss, _, _ = ppo_policy_loss(leaf, old, advantages, kept, 0.2)
    else:
        loss = reinforce_loss(leaf, advantages, kept)
    loss.backward()
    grad = leaf.grad
    # Rows that fell back to the full mask (fewer than min_kept agreeing tokens) are exempt.
    fallback = (mask & agrees).sum(1) < 1
    disagreeing = mask & ~agrees & ~fallback.unsqueeze(1)
    assert disagreeing.any(), "the draw should contain disagreeing tokens"
    assert torch.all(grad[disagreeing] == 0)
    assert torch.all(grad[~mask] == 0)
    assert torch.all(grad[mask & agrees] != 0)  # the kept tokens still learn


def test_hysteresis_keeps_its_state_between_thresholds():
    scores = torch.tensor([[0.1, 0.5, 0.2, -0.1, -0.5, 0.0, 0.31],
                           [-0.1, 0.2, 0.29, 9.0, 9.0, -0.31, 0.0]])
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask[1, 0] = False  # the second row starts at column 1 (sign of 0.2: +1)
    z = ama_signal(scores, mask, mode="hysteresis", upper=0.3, lower=-0.3)
    assert z[0].tolist() == [1, 1, 1, 1, -1, -1, 1]
    assert z[1, 1:].tolist() == [1, 1, 1, 1, -1, -1]
    assert ama_signal(scores, mask, mode="sign").tolist()[0] == [1, 1, 1, -1, -1, 1, 1]


def test_min_kept_falls_back_to_the_full_mask():
    scores = torch.tensor([[1.0, 1.0, -1.0, 1.0], [-1.0, -1.0, -1.0, 1.0]])
    advantages = torch.tensor([-1.0, -1.0])  # row 0 agrees on 1 token, row 1 on 3
    mask = torch.ones_like(scores, dtype=torch.bool)
    kept = ama_mask(advantages, scores, mask, mode="sign", min_kept=2)
    assert kept[0].all()  # 1 < min_kept: full mask
    assert kept[1].tolist() == [True, True, True, False]


def test_micro_batches_sum_to_the_whole_minibatch_loss(generator):
    logprobs, old, advantages, _, mask = _batch(generator, rows=6)
    values, old_values, returns = (torch.randn(6, 9, generator=generator) for _ in range(3))
    whole, _, _ = ppo_policy_loss(logprobs, old, advantages, mask, 0.2)
    whole_value = clipped_value_loss(values, old_values, returns, mask, 0.5)
    n = mask.sum().float()
    parts = [ppo_policy_loss(logprobs[s], old[s], advantages[s], mask[s], 0.2, denominator=n)[0]
             for s in (slice(0, 2), slice(2, 6))]
    value_parts = [clipped_value_loss(values[s], old_values[s], returns[s], mask[s], 0.5, denominator=n)
                   for s in (slice(0, 2), slice(2, 6))]
    assert torch.allclose(sum(parts), whole, atol=1e-6)
    assert torch.allclose(sum(value_parts), whole_value, atol=1e-6)
    # The clipped value loss: moving more than the clip range from the old value is not rewarded.
    v_old = torch.zeros(1, 1)
    target = torch.full((1, 1), 10.0)
    ones = torch.ones(1, 1, dtype=torch.bool)
    far = clipped_value_loss(torch.full((1, 1), 9.0), v_old, target, ones, 1.0)
    assert far.item() == pytest.approx(0.5 * 81.0)  # max((9-10)², (1-10)²)
