"""Candidate selection pieces (docs/method.md#candidate-selection): k, augmented costs, the cost window,
the multiplier."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from hcrlhf.safety import CostWindow, LagrangeMultiplier, augmented_costs, pessimistic_coefficient

# --- pessimistic coefficient -------------------------------------------------------------------


def test_pessimistic_coefficient_formula():
    q = stats.t.ppf(0.9, 255) / 16.0, stats.t.ppf(0.9, 99) / 10.0
    assert pessimistic_coefficient(256, 100, 0.1) == pytest.approx(4 * q[0] + 2 * q[1], rel=1e-14)
    assert pessimistic_coefficient(256, 100, 0.1, c1=0.0, c2=2.0) == pytest.approx(2 * q[1], rel=1e-14)
    # Official constants at the official sizes: about 0.58 standard deviations of pessimism.
    assert 0.57 < pessimistic_coefficient(256, 100, 0.1) < 0.59
    assert pessimistic_coefficient(256, 100, 0.01) > pessimistic_coefficient(256, 100, 0.1)


@pytest.mark.parametrize(
    "args,name",
    [
        ((1, 100, 0.1), "n_candidate"),
        ((256, 1, 0.1), "n_safety"),
        ((256, 100, 1.0), "delta"),
        ((256, 100, 0.1, -1.0), "c1"),
    ],
)
def test_pessimistic_coefficient_bad_input(args, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        pessimistic_coefficient(*args)


# --- augmented costs -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("coefficient", [0.0, 0.58, 3.0])
def test_augmented_cost_score_function_gradient_is_grad_of_mean_plus_k_std(seed, coefficient):
    """On a softmax policy over 6 actions, E_π[c̃·∇log π] = ∇(μ + k·σ), exact expectation, float64."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, dtype=torch.float64, generator=generator, requires_grad=True)
    costs = torch.randn(6, dtype=torch.float64, generator=generator) * 2.0 + 0.5

    probs = torch.softmax(logits, dim=0)
    mean = (probs * costs).sum()
    std = torch.sqrt((probs * costs**2).sum() - mean**2)  # population std of the cost under π
    (target,) = torch.autograd.grad(mean + coefficient * std, logits)

    augmented = augmented_costs(costs, mean.detach(), std.detach(), coefficient)
    log_probs = torch.log_softmax(logits, dim=0)
    surrogate = (probs.detach() * augmented * log_probs).sum()  # Σ_a π_a·c̃_a·log π_a
    (score_function,) = torch.autograd.grad(surrogate, logits)

    torch.testing.assert_close(score_function, target, rtol=0, atol=1e-6)
    assert torch.allclose(score_function, target, rtol=0, atol=1e-12)
    if coefficient > 0:  # the plain costs follow ∇μ only, which is not the bound's gradient
        (plain,) = torch.autograd.grad((torch.softmax(logits, dim=0) * costs).sum(), logits)
        assert (plain - target).abs().max() > 1e-3


def test_augmented_costs_stay_near_the_costs_where_the_official_form_hits_the_clip():
    """A cost model centred far from 0 (μ̂ = −10, σ̂ = 0.5): the official form c + k·(c² − 2cμ̂)/(2σ̂) puts every
    row near −130, past the trainer's score clip of ±50, so the clipped costs are constant and the cost gradient
    vanishes; the centred form has the same gradient and stays within k·(c − μ̂)²/(2σ̂) of c."""
    rng = np.random.default_rng(0)
    costs = rng.normal(-10.0, 0.5, size=256)
    k, mean, std, clip = 1.2, float(costs.mean()), float(costs.std()), 50.0
    official = costs + k * (costs**2 - 2 * costs * mean) / (2 * std)
    assert np.all(np.abs(official) > clip)  # the old form: every row clipped
    centred = augmented_costs(costs, mean, std, k)
    assert np.all(np.abs(centred) < clip)
    assert np.max(np.abs(centred - costs)) <= k * np.max((costs - mean) ** 2 + std**2) / (2 * std) + 1e-12
    # What the trainer sees after the clip: a constant under the official form (no signal), varied costs here.
    assert np.ptp(np.clip(official, -clip, clip)) == 0.0 and np.ptp(np.clip(centred, -clip, clip)) > 1.0


def test_augmented_costs_formula_numpy_torch_and_types():
    costs = np.array([0.0, 0.5, -1.0, 2.0])
    # The centred form of docs/method.md#candidate-selection; the official c + k·(c² − 2cμ̂)/(2σ̂) is the same
    # up to a constant.
    expected = costs + 1.5 * ((costs - 0.3) ** 2 - 0.7**2) / (2 * 0.7)
    official = costs + 1.5 * (costs**2 - 2 * costs * 0.3) / (2 * 0.7)
    np.testing.assert_allclose(expected - official, 1.5 * (0.3**2 - 0.7**2) / (2 * 0.7), rtol=1e-12)
    np.testing.assert_allclose(augmented_costs(costs, 0.3, 0.7, 1.5), expected, rtol=1e-15)
    np.testing.assert_allclose(augmented_costs(costs.tolist(), 0.3, 0.7, 1.5), expected, rtol=1e-15)
    assert augmented_costs(costs.astype(np.float32), 0.3, 0.7, 1.5).dtype == np.float32
    for dtype in (torch.float64, torch.float32, torch.bfloat16):
        out = augmented_costs(torch.tensor(costs, dtype=dtype), torch.tensor(0.3), torch.tensor(0.7), 1.5)
        assert isinstance(out, torch.Tensor) and out.dtype == dtype
        low = dtype == torch.bfloat16  # float32 rounding of values of order 1: an absolute tolerance too
        np.testing.assert_allclose(out.double().numpy(), expected, rtol=1e-2 if low else 1e-6,
                                   atol=5e-2 if low else 1e-6)
    ints = augmented_costs(torch.tensor([0, 1, 2]), 1.0, 1.0, 1.0)
    assert ints.dtype == torch.float32
    grid = np.arange(6.0).reshape(2, 3)
    assert augmented_costs(grid, 1.0, 2.0, 0.0).shape == (2, 3)
    np.testing.assert_array_equal(augmented_costs(grid, 1.0, 2.0, 0.0), grid)


@pytest.mark.parametrize(
    "args,name",
    [
        (([0.1, 0.2], 0.1, 0.0, 1.0), "std"),
        (([0.1, 0.2], 0.1, -1.0, 1.0), "std"),
        (([0.1, 0.2], float("nan"), 1.0, 1.0), "mean"),
        (([0.1, 0.2], 0.1, 1.0, -0.5), "coefficient"),
        (([0.1, float("nan")], 0.1, 1.0, 1.0), "costs"),
        ((torch.tensor([0.1]), torch.tensor(0.1), torch.tensor(0.0), 1.0), "std"),
    ],
)
def test_augmented_costs_bad_input(args, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        augmented_costs(*args)


# --- cost window ------------------------------------------------------------------------------------


def test_cost_window_statistics_and_eviction():
    window = CostWindow(5)
    window.extend([1.0, 2.0]).extend(torch.tensor([3.0, 4.0])).extend(np.array([[5.0, 6.0]])).append(7.0)
    assert window.n == len(window) == 5
    np.testing.assert_array_equal(window.values(), [3.0, 4.0, 5.0, 6.0, 7.0])
    assert window.mean == pytest.approx(5.0)
    assert window.std == pytest.approx(np.std([3, 4, 5, 6, 7], ddof=1), rel=1e-15)
    k = pessimistic_coefficient(5, 100, 0.1)
    assert window.pessimistic_bound(k) == pytest.approx(5.0 + k * window.std)
    clone = CostWindow(1)
    clone.load_state_dict(window.state_dict())
    assert clone.size == 5 and np.array_equal(clone.values(), window.values())


def test_cost_window_refuses_too_few_and_bad_costs():
    window = CostWindow(4)
    with pytest.raises(ValueError, match="empty"):
        window.mean  # noqa: B018
    window.append(1.0)
    with pytest.raises(ValueError, match=r"n >= 2"):
        window.std  # noqa: B018
    with pytest.raises(ValueError, match=r"\bcosts\b"):
        window.extend([float("nan")])
    with pytest.raises(ValueError, match=r"\bsize\b"):
        CostWindow(0)


# --- Lagrange multiplier -----------------------------------------------------------------------------


def test_multiplier_rises_above_threshold_and_falls_below():
    multiplier = LagrangeMultiplier(init=1.0, lr=0.1)
    assert multiplier.step(bound=0.5, threshold=0.0) > 1.0
    assert multiplier.value == pytest.approx(math.exp(0.1 * 1.0 * 0.5), rel=1e-14)
    previous = multiplier.value
    multiplier.step(bound=-0.2, threshold=0.0)
    assert multiplier.log_value == pytest.approx(0.05 + 0.1 * previous * (-0.2), rel=1e-14)
    assert multiplier.value < previous
    unchanged = multiplier.value
    multiplier.step(0.3, 0.3)
    assert multiplier.value == unchanged
    for _ in range(1000):  # falls towards 0 but never below
        multiplier.step(-5.0, 0.0)
    assert 0.0 < multiplier.value < 0.05


def test_multiplier_respects_max_and_delay():
    multiplier = LagrangeMultiplier(init=1.0, lr=1.0, max_value=10.0)
    for _ in range(20):
        multiplier.step(5.0, 0.0)
    assert multiplier.value == pytest.approx(10.0, rel=1e-12)
    delayed = LagrangeMultiplier(init=2.0, lr=0.5, update_delay=3)
    for _ in range(3):
        assert delayed.step(1.0, 0.0) == 2.0
    assert delayed.step(1.0, 0.0) == pytest.approx(2.0 * math.exp(0.5 * 2.0), rel=1e-14)


def test_multiplier_state_round_trip_and_tensor():
    multiplier = LagrangeMultiplier(init=0.5, lr=0.05, max_value=100.0, update_delay=2)
    for bound in (0.3, 0.1, 0.7):
        multiplier.step(bound, 0.2)
    clone = LagrangeMultiplier()
    clone.load_state_dict(multiplier.state_dict())
    assert clone.state_dict() == multiplier.state_dict()
    for bound in (0.9, -0.4, 0.25):  # the clone continues exactly like the original
        assert clone.step(bound, 0.2) == multiplier.step(bound, 0.2)
    tensor = multiplier.tensor()
    assert tensor.dim() == 0 and tensor.dtype == torch.float32
    assert tensor.item() == pytest.approx(multiplier.value, rel=1e-6)
    assert multiplier.tensor(dtype=torch.float64).item() == multiplier.value
    assert multiplier.step(torch.tensor(1.0), torch.tensor(0.2)) > 0  # 0-dim tensors accepted


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(init=0.0), "init"),
        (dict(lr=-1.0), "lr"),
        (dict(max_value=0.5), "max_value"),
        (dict(update_delay=-1), "update_delay"),
    ],
)
def test_multiplier_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        LagrangeMultiplier(**kwargs)


def test_multiplier_step_bad_input():
    multiplier = LagrangeMultiplier()
    with pytest.raises(ValueError, match=r"\bbound\b"):
        multiplier.step(float("nan"), 0.0)
    with pytest.raises(ValueError, match=r"\bthreshold\b"):
        multiplier.step(0.0, float("inf"))
    assert multiplier.steps == 0
