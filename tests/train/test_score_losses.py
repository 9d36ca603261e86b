"""Reward / cost losses against a hand computation (docs/method.md#reward-and-cost-models)."""

import math

import pytest
import torch

from hcrlhf.train import cost_loss, reward_loss


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


BETTER = [1.5, -0.25, 0.0]
WORSE = [0.5, 0.75, -2.0]


def test_reward_loss_by_hand():
    expected = -sum(log_sigmoid(b - w) for b, w in zip(BETTER, WORSE)) / 3
    expected += 0.001 * sum(x * x for x in BETTER + WORSE) / 6
    got = reward_loss(torch.tensor(BETTER), torch.tensor(WORSE))
    assert got.dtype == torch.float32 and got.dim() == 0
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert reward_loss(torch.tensor(BETTER), torch.tensor(WORSE), regularization=0.5).item() == pytest.approx(
        expected - 0.001 * sum(x * x for x in BETTER + WORSE) / 6 + 0.5 * sum(x * x for x in BETTER + WORSE) / 6,
        rel=1e-6)


def test_cost_loss_bt_by_hand():
    safer, unsafer = [-1.0, 0.5, 2.0], [1.0, 0.25, -0.5]
    expected = -sum(log_sigmoid(u - s) for s, u in zip(safer, unsafer)) / 3
    expected += 0.001 * sum(x * x for x in safer + unsafer) / 6
    got = cost_loss(torch.tensor(safer), torch.tensor(unsafer), variant="bt")
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_cost_loss_bt_sign_by_hand():
    safer, unsafer = [-1.0, 0.5, 2.0], [1.0, 0.25, -0.5]
    safer_safe, unsafer_safe = [True, True, False], [False, True, False]
    sign = lambda safe: -1.0 if safe else 1.0  # s = +1 for unsafe, -1 for safe
    expected = 0.0
    for s, u, s_safe, u_safe in zip(safer, unsafer, safer_safe, unsafer_safe):
        expected += -log_sigmoid(u - s) - log_sigmoid(sign(u_safe) * u) - log_sigmoid(sign(s_safe) * s)
    expected = expected / 3 + 0.001 * sum(x * x for x in safer + unsafer) / 6
    got = cost_loss(torch.tensor(safer), torch.tensor(unsafer), safer_is_safe=torch.tensor(safer_safe),
                    unsafer_is_safe=torch.tensor(unsafer_safe), variant="bt_sign")
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_bt_sign_prefers_positive_costs_for_unsafe():
    # Same ordering, but costs on the right side of 0 give a lower bt_sign loss.
    labels = dict(safer_is_safe=torch.tensor([True]), unsafer_is_safe=torch.tensor([False]))
    right_side = cost_loss(torch.tensor([-1.0]), torch.tensor([1.0]), **labels)
    wrong_side = cost_loss(torch.tensor([1.0]), torch.tensor([3.0]), **labels)
    assert right_side < wrong_side
    plain = lambda s, u: cost_loss(torch.tensor([s]), torch.tensor([u]), variant="bt", regularization=0.0)
    assert plain(-1.0, 1.0).item() == pytest.approx(plain(1.0, 3.0).item())


def test_losses_have_gradients_and_check_arguments():
    better = torch.tensor(BETTER, requires_grad=True)
    reward_loss(better, torch.tensor(WORSE)).backward()
    assert better.grad is not None and (better.grad < 0).all()  # pushing the better score up lowers the loss
    with pytest.raises(ValueError, match=r"worse_scores must have shape \(3,\)"):
        reward_loss(torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"must have shape \(B,\)"):
        reward_loss(torch.zeros(3, 1), torch.zeros(3, 1))
    with pytest.raises(ValueError, match="needs safer_is_safe"):
        cost_loss(torch.zeros(2), torch.zeros(2), variant="bt_sign")
    with pytest.raises(ValueError, match="variant must be one of"):
        cost_loss(torch.zeros(2), torch.zeros(2), variant="hinge")
    with pytest.raises(TypeError, match="better_scores must be a torch.Tensor"):
        reward_loss([1.0], torch.zeros(1))
