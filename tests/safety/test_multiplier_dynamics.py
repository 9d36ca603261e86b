"""The λ update rules on a synthetic closed loop (docs/method.md#candidate-selection), and the PID rule's arithmetic.

The loop stands in for a policy under training: the pessimistic bound U moves towards a level that falls
as λ rises, with a lag (a policy takes several updates to respond), an upward drift of the uncontrolled
cost over time (the reward pulls the policy towards harm) and noise. The official rule must reproduce the
collapse measured on the built-in demo (λ rides the cap, then drops to exactly 0 and stays there while U
climbs far above τ); the PID rule must keep λ in (0, ∞), respond the step after U crosses τ either way,
never stay at the cap, and settle U near τ.
"""

import math

import numpy as np
import pytest

from hcrlhf.safety import LagrangeMultiplier, PIDLagrangeMultiplier, make_multiplier

THRESHOLD = -3.0


def closed_loop(multiplier, steps=400, *, seed=0, lag=0.15, sensitivity=1.5, drift=0.01, noise=0.15,
                start=2.0, shock_at=None, shock_until=None, shock=0.0, scale=1.0):
    """Run ``multiplier`` against the synthetic loop; returns (bounds U_t, multipliers λ_t used at step t)."""
    rng = np.random.default_rng(seed)
    bound, bounds, lambdas = start, [], []
    for t in range(steps):
        value = multiplier.value
        lambdas.append(value)
        # The level the policy would settle at under λ: uncontrolled level minus the effect of λ (saturating
        # in log λ), plus a slow upward drift and an optional sudden shift (a new prompt mix, say).
        shocked = shock_at is not None and shock_at <= t < (shock_until or steps)
        uncontrolled = 2.0 + drift * t + (shock if shocked else 0.0)
        level = uncontrolled - sensitivity * math.log1p(value)
        bound += lag * (level - bound) + noise * rng.standard_normal()
        bounds.append(bound)
        multiplier.step(bound, THRESHOLD, scale=scale)
    return np.array(bounds), np.array(lambdas)


def test_official_rule_reproduces_the_collapse():
    """The demo's failure, on the loop: λ reaches the cap within a few steps, then becomes exactly 0 at the
    first U < τ and never moves again, while U climbs far above τ."""
    multiplier = LagrangeMultiplier(init=1.0, lr=0.01, max_value=1e6)
    bounds, lambdas = closed_loop(multiplier, steps=300, drift=0.02, lag=0.05)  # a slowly responding policy
    at_cap = lambdas >= 1e6 * (1 - 1e-9)
    first_cap = int(np.argmax(at_cap))
    assert at_cap.any() and 0 < first_cap < 40
    zero = int(np.argmax(lambdas == 0.0))
    assert zero > first_cap and (lambdas[zero:] == 0.0).all(), "λ = 0 is absorbing under the official rule"
    assert bounds[-20:].mean() > THRESHOLD + 3.0, "with λ dead the bound runs away"


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("drift", [0.0, 0.01, 0.03])
def test_pid_rule_settles_near_threshold_and_stays_in_bounds(seed, drift):
    multiplier = make_multiplier("pid", init=1.0, min_value=1e-3, max_value=1e6)
    bounds, lambdas = closed_loop(multiplier, steps=400, seed=seed, drift=drift)
    assert (lambdas > 0).all() and np.isfinite(lambdas).all()
    assert (lambdas >= 1e-3 * (1 - 1e-12)).all() and (lambdas <= 1e6 * (1 + 1e-12)).all()
    assert not (lambdas >= 1e6 * (1 - 1e-9)).any(), "a feasible loop must never reach the cap"
    # Settling: over the last 150 steps the bound averages within 0.5 of τ and exceeds τ + 1 rarely.
    tail = bounds[-150:]
    assert abs(tail.mean() - THRESHOLD) < 0.5, tail.mean()
    assert (tail > THRESHOLD + 1.0).mean() < 0.05


def test_pid_rule_recovers_after_crossing_both_ways():
    """The loop settles at τ, a sudden upward shift of the cost at step 150 (a new prompt mix, say) sends U
    above τ, and its removal at step 300 sends U far below τ: λ turns the right way the step after each
    crossing, U is back at τ within a bounded time after the shift, and the loop settles at τ again after
    the removal (more slowly: by default λ falls at a quarter of the rate it rises)."""
    multiplier = make_multiplier("pid", init=1.0)
    bounds, lambdas = closed_loop(multiplier, steps=800, drift=0.0, noise=0.02, shock_at=150, shock_until=300,
                                  shock=4.0)
    crossings_up = [t for t in range(1, len(bounds)) if bounds[t - 1] <= THRESHOLD < bounds[t]]
    crossings_down = [t for t in range(1, len(bounds)) if bounds[t - 1] > THRESHOLD >= bounds[t]]
    assert crossings_up and crossings_down
    # λ_{t+1} is the multiplier after step t's update: it must move the right way at once.
    for t in crossings_up:
        assert lambdas[t + 1] > lambdas[t], f"λ did not rise the step after U crossed τ upwards at {t}"
    for t in crossings_down:
        if lambdas[t] > multiplier.min_value * 1.0000001:
            assert lambdas[t + 1] < lambdas[t], f"λ did not fall the step after U crossed τ downwards at {t}"
    assert any(150 <= t < 160 for t in crossings_up) and any(300 <= t < 310 for t in crossings_down)
    assert (bounds[160:240] <= THRESHOLD + 0.05).any(), "U did not come back to τ after the shift"
    assert abs(bounds[280:300].mean() - THRESHOLD) < 0.1
    assert abs(bounds[-50:].mean() - THRESHOLD) < 0.3


def test_pid_rule_steps_are_bounded_whatever_lambda_is():
    """One step moves log λ by at most ki·clip_above + kp·(clip_below + clip_above) (kd = 0), at any λ —
    the property the official rule lacks (its step is lr·λ·(U − τ))."""
    multiplier = PIDLagrangeMultiplier(init=1.0, ki=0.1, kp=0.5, error_clip=(0.25, 1.0), max_value=1e6)
    limit = 0.1 * 1.0 + 0.5 * (0.25 + 1.0)
    rng = np.random.default_rng(0)
    previous = multiplier.log_value
    for _ in range(2000):
        multiplier.step(rng.normal(0.0, 50.0), 0.0, scale=rng.uniform(0.1, 10.0))
        assert abs(multiplier.log_value - previous) <= limit + 1e-12
        previous = multiplier.log_value
    official = LagrangeMultiplier(init=100.0, lr=0.01)
    before = official.log_value
    official.step(10.0, 0.0)
    assert official.log_value - before == pytest.approx(0.01 * 100.0 * 10.0)  # 10 in log space: λ × e^10


def test_pid_update_by_hand():
    """Three steps against arithmetic done independently of the class."""
    ki, kp, kd, lo, hi = 0.2, 0.7, 0.3, 0.5, 2.0
    multiplier = PIDLagrangeMultiplier(init=2.0, ki=ki, kp=kp, kd=kd, min_value=0.01, max_value=50.0,
                                       error_clip=(lo, hi))
    integral, last = 0.0, 0.0
    for bound, threshold, scale in ((4.0, 1.0, 2.0), (0.5, 1.0, 0.25), (1.3, 1.0, 1.0)):
        error = min(max((bound - threshold) / scale, -lo), hi)  # 1.5, then -2 → -0.5, then 0.3
        integral = min(max(integral + ki * error, math.log(0.01 / 2.0)), math.log(50.0 / 2.0))
        expected = math.log(2.0) + integral + kp * error + kd * (error - last)
        last = error
        assert multiplier.step(bound, threshold, scale=scale) == pytest.approx(math.exp(expected), rel=1e-13)
    assert multiplier.integral == pytest.approx(0.2 * (1.5 - 0.5 + 0.3), rel=1e-13)


def test_pid_anti_windup_and_floor():
    """Long saturation does not wind the integral beyond λ's range: after 1000 steps at the cap, the first
    step below τ already lowers λ; after 1000 steps at the floor, λ sits exactly at λ_min, never 0."""
    multiplier = PIDLagrangeMultiplier(init=1.0, ki=0.5, kp=0.0, min_value=1e-2, max_value=10.0, error_clip=1.0)
    for _ in range(1000):
        multiplier.step(10.0, 0.0, scale=1.0)
    assert multiplier.value == pytest.approx(10.0)
    multiplier.step(-1.0, 0.0, scale=1.0)
    assert multiplier.value == pytest.approx(10.0 * math.exp(-0.5))
    for _ in range(1000):
        multiplier.step(-10.0, 0.0, scale=1.0)
    assert multiplier.value == pytest.approx(1e-2) and multiplier.value > 0
    multiplier.step(1.0, 0.0, scale=1.0)
    assert multiplier.value == pytest.approx(1e-2 * math.exp(0.5))


def test_pid_state_round_trip_continues_exactly():
    multiplier = PIDLagrangeMultiplier(init=0.5, ki=0.3, kp=0.2, kd=0.1, min_value=0.1, error_clip=(0.5, 2.0),
                                       update_delay=1)
    for bound in (0.3, 1.1, -0.7):
        multiplier.step(bound, 0.2, scale=0.5)
    clone = PIDLagrangeMultiplier()
    clone.load_state_dict(multiplier.state_dict())
    assert clone.state_dict() == multiplier.state_dict()
    for bound in (0.9, -0.4, 0.25, 3.0):
        assert clone.step(bound, 0.2, scale=0.5) == multiplier.step(bound, 0.2, scale=0.5)
    with pytest.raises(ValueError, match="rule"):
        LagrangeMultiplier().load_state_dict(multiplier.state_dict())


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(ki=-0.1), "ki"),
        (dict(kp=float("nan")), "kp"),
        (dict(min_value=0.0), "min_value"),
        (dict(min_value=2.0), "min_value"),
        (dict(max_value=0.5), "max_value"),
        (dict(error_clip=0.0), "error_clip"),
        (dict(error_clip=(1.0, 2.0, 3.0)), "error_clip"),
    ],
)
def test_pid_bad_input(kwargs, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        PIDLagrangeMultiplier(**kwargs)


def test_make_multiplier_rules():
    assert isinstance(make_multiplier("official", lr=0.05), LagrangeMultiplier)
    assert isinstance(make_multiplier("pid"), PIDLagrangeMultiplier)
    with pytest.raises(ValueError, match="rule"):
        make_multiplier("adam")
