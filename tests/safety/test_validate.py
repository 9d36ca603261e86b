"""Guarantee validation (the protocol of docs/method.md#confidence-bounds): problem definitions and a few
quick trial runs."""

import dataclasses
import math

import numpy as np
import pytest
from scipy import integrate, stats

from hcrlhf.safety import validate


def test_clopper_pearson_interval_matches_scipy():
    for k, n in [(0, 50), (3, 50), (50, 50), (120, 2000)]:
        expected = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="exact")
        assert validate.clopper_pearson_interval(k, n) == pytest.approx(
            (expected.low, expected.high), rel=1e-10, abs=1e-15
        )
    with pytest.raises(ValueError):
        validate.clopper_pearson_interval(5, 3)


def test_clipped_normal_mean_closed_form():
    for mu, sigma in [(0.5, 0.1), (0.05, 0.2), (0.97, 0.3)]:
        dist = stats.norm(mu, sigma)
        numeric = integrate.quad(lambda x, d=dist: x * d.pdf(x), 0, 1)[0] + dist.sf(1.0)
        assert validate._clipped_normal_mean(mu, sigma) == pytest.approx(numeric, rel=1e-9)


@pytest.mark.parametrize("problem", validate.default_problems(), ids=lambda p: p.name)
def test_problem_true_means_match_monte_carlo(problem):
    rng = np.random.default_rng(0)
    assert problem.candidates and all(c.true_mean > 0 for c in problem.candidates)
    low, high = problem.cost_range
    for candidate in problem.candidates:
        draws = candidate.sample(rng, (200_000,))
        assert np.all((draws >= low) & (draws <= high))
        if problem.binary:
            assert set(np.unique(draws)) <= {0.0, 1.0}
        standard_error = draws.std() / math.sqrt(draws.size)
        assert abs(draws.mean() - candidate.true_mean) < 5 * standard_error + 1e-12, candidate.name
    # Candidates straddle τ, and a higher reward comes with a higher cost.
    means = [c.true_mean for c in sorted(problem.candidates, key=lambda c: c.reward)]
    assert means == sorted(means) and means[0] < problem.threshold < means[-1]


@pytest.mark.parametrize("selection", validate.SELECTIONS)
def test_run_trials_smoke(selection):
    problem = validate.bernoulli_problem(n_candidate=60, n_safety=40)
    outcomes = validate.run_trials(problem, n_trials=30, selection=selection, seed=3, chunk_size=13)
    assert [o.method for o in outcomes] == list(validate.METHODS)
    for o in outcomes:
        assert o.n_trials == 30 and 0 <= o.failures <= o.solutions <= 30 and o.failures <= o.unsafe_selected
        assert o.failure_band[0] <= o.failure_rate <= o.failure_band[1]
        assert o.validity == ("asymptotic" if o.method == "ttest" else "exact")
    again = validate.run_trials(problem, n_trials=30, selection=selection, seed=3, chunk_size=13)
    assert again == outcomes  # seeded
    table = validate.format_table(outcomes)
    assert table.count("\n") == len(outcomes) + 1 and "clopper_pearson" in table


def test_clopper_pearson_is_skipped_on_continuous_costs():
    outcomes = validate.run_trials(validate.beta_problem(), n_trials=5, selection="none")
    assert "clopper_pearson" not in [o.method for o in outcomes]


def test_safe_candidates_never_count_as_failures_and_unsafe_ones_can():
    # One clearly safe candidate: solved often, never a failure.
    safe = validate.gaussian_problem(relative_means=(0.8,), n_safety=100)
    for o in validate.run_trials(safe, ["ttest", "betting"], n_trials=200, selection="none"):
        assert o.failures == 0 and o.solution_rate > 0.9
    # The rare-event boundary (J_C = 1.001 τ): the t-test passes an unsafe model far more often than δ
    # (about 20% in benchmarks/results/guarantee.md), Clopper–Pearson stays within δ.
    boundary = validate.rare_event_problem(relative_means=(1.001,), n_safety=100)
    ttest, cp = validate.run_trials(boundary, ["ttest", "clopper_pearson"], n_trials=400, selection="none", seed=1)
    assert ttest.failure_band[0] > 0.1 and ttest.violates
    assert cp.failure_rate <= 0.1 and not cp.violates


def test_selection_prefers_reward_under_the_bound():
    problem = validate.gaussian_problem(relative_means=(0.2, 0.6, 1.8), n_candidate=200, n_safety=200)
    # Naive selection (c1 = c2 = 0) keeps the best candidate whose candidate mean is ≤ τ: 0.6 τ.
    (o,) = validate.run_trials(problem, ["betting"], n_trials=100, selection="pessimistic", c1=0.0, c2=0.0)
    assert o.solution_rate > 0.95 and o.mean_returned_cost == pytest.approx(0.6, rel=1e-9)
    # "none" sends the highest-reward (unsafe, 1.8 τ) candidate straight to the test, which refuses it.
    (o,) = validate.run_trials(problem, ["betting"], n_trials=100, selection="none")
    assert o.solutions == 0 and math.isnan(o.mean_returned_cost)


def test_run_trials_bad_input():
    problem = validate.bernoulli_problem()
    with pytest.raises(ValueError, match="selection"):
        validate.run_trials(problem, n_trials=5, selection="greedy")
    with pytest.raises(ValueError, match="method"):
        validate.run_trials(problem, ["wald"], n_trials=5)
    with pytest.raises(ValueError, match="n_trials"):
        validate.run_trials(problem, n_trials=0)
    with pytest.raises(ValueError, match="delta"):
        validate.run_trials(dataclasses.replace(problem), n_trials=5, delta=0.0)
    with pytest.raises(ValueError, match="must lie in"):
        validate.gaussian_problem(relative_means=(3.0,))
