"""Upper confidence bounds (docs/method.md#confidence-bounds): closed forms vs scipy, betting-bound properties, seeded
coverage simulations, predicted bounds, and bad input."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from hcrlhf.safety import (
    EXACT_METHODS,
    METHODS,
    pessimistic_coefficient,
    predicted_upper_bound,
    predicted_upper_bounds,
    upper_bound,
    upper_bounds,
)
from hcrlhf.safety.bounds import betting_log_capital, betting_upper_unit


def _range(method, cost_range=(0.0, 1.0)):
    return None if method == "clopper_pearson" else cost_range


# --- closed forms ------------------------------------------------------------------------------


def test_ttest_is_the_one_sided_t_test_boundary():
    x = np.random.default_rng(1).normal(0.3, 0.2, 37)
    for delta in (0.01, 0.05, 0.2):
        bound = upper_bound(x, delta, "ttest")
        # The bound is the m at which the one-sided t-test of "mean < m" has p-value exactly δ ...
        assert stats.ttest_1samp(x, bound, alternative="less").pvalue == pytest.approx(delta, rel=1e-9)
        # ... and the upper end of scipy's two-sided (1 − 2δ) t interval.
        high = stats.t.interval(1 - 2 * delta, len(x) - 1, loc=x.mean(), scale=stats.sem(x))[1]
        assert bound == pytest.approx(high, rel=1e-12)


def test_hoeffding_closed_form_and_range_scaling():
    x = np.array([0.0, 1.0] * 5)
    assert upper_bound(x, 0.1, "hoeffding", (0, 1)) == pytest.approx(0.5 + math.sqrt(math.log(10) / 20), rel=1e-14)
    # Costs in [-1, 3]: the width scales with b − a = 4.
    y = -1.0 + 4.0 * np.random.default_rng(2).random(50) * 0.1
    expected = y.mean() + 4.0 * math.sqrt(math.log(1 / 0.05) / 100)
    assert upper_bound(y, 0.05, "hoeffding", (-1, 3)) == pytest.approx(expected, rel=1e-14)


def test_bernstein_closed_form_maurer_pontil():
    x = np.random.default_rng(3).beta(2, 5, 400)
    n, delta = len(x), 0.05
    expected = (
        x.mean() + math.sqrt(2 * np.var(x, ddof=1) * math.log(2 / delta) / n) + 7 * math.log(2 / delta) / (3 * (n - 1))
    )
    assert upper_bound(x, delta, "bernstein", (0, 1)) == pytest.approx(expected, rel=1e-14)
    # Range (0, 10) with the same relative data: every term scales by 10.
    assert upper_bound(10 * x, delta, "bernstein", (0, 10)) == pytest.approx(10 * expected, rel=1e-12)


def test_bernstein_beats_hoeffding_on_low_variance_data():
    x = np.random.default_rng(4).beta(1, 50, 5000)
    assert upper_bound(x, 0.1, "bernstein", (0, 1)) < upper_bound(x, 0.1, "hoeffding", (0, 1)) - 0.01


@pytest.mark.parametrize("k,n", [(0, 30), (1, 30), (7, 30), (29, 30), (30, 30), (3, 500)])
def test_clopper_pearson_matches_scipy(k, n):
    x = np.zeros(n)
    x[:k] = 1.0
    for delta in (0.05, 0.1):
        # One-sided (1 − δ) upper bound = upper end of the two-sided exact (1 − 2δ) interval.
        high = stats.binomtest(k, n).proportion_ci(confidence_level=1 - 2 * delta, method="exact").high
        assert upper_bound(x, delta, "clopper_pearson") == pytest.approx(high, rel=1e-10, abs=1e-14)
    if k == 0:
        assert upper_bound(x, 0.1, "clopper_pearson") == pytest.approx(1 - 0.1 ** (1 / n), rel=1e-12)


def test_bounds_are_capped_at_the_range_top():
    x = np.array([0.9, 1.0, 0.95, 1.0])
    for method in ("ttest", "hoeffding", "bernstein", "betting"):
        assert upper_bound(x, 0.1, method, (0, 1)) <= 1.0
    assert upper_bound(x, 0.1, "hoeffding", (0, 1)) == 1.0
    assert upper_bound(x, 0.1, "ttest") > 1.0  # uncapped without a range


# --- the betting bound --------------------------------------------------------------------------


def test_betting_capital_is_monotone_in_m_and_inverted_at_its_root():
    rng = np.random.default_rng(5)
    x = np.stack([rng.beta(0.5, 3, 80), (rng.random(80) < 0.2).astype(float), rng.random(80)])
    delta = 0.1
    grid = np.linspace(0.0, 1.0, 401)
    capital = np.stack([betting_log_capital(x, np.full(3, m), delta) for m in grid], axis=1)
    assert np.all(np.diff(capital, axis=1) >= -1e-12)
    bound = betting_upper_unit(x, delta)
    threshold = math.log(1 / delta)
    assert np.all(betting_log_capital(x, bound, delta) >= threshold)  # U rejects
    assert np.all(betting_log_capital(x, bound - 1e-9, delta) < threshold)  # just below U does not
    assert np.all(bound > x.mean(axis=1)) and np.all(bound < 1.0)


def test_betting_capital_is_a_martingale_at_the_true_mean():
    # E[K_n(μ)] = 1 exactly for a martingale; a biased bet would drift. Bernoulli(0.3), n = 20.
    rng = np.random.default_rng(6)
    x = (rng.random((200_000, 20)) < 0.3).astype(float)
    from hcrlhf.safety.bounds import BETTING_TRUNCATION, _betting_free_bets

    bets = np.minimum(_betting_free_bets(x, 0.1), BETTING_TRUNCATION / 0.7)
    final = np.prod(1 - bets * (x - 0.3), axis=1)
    assert final.mean() == pytest.approx(1.0, abs=4 * final.std() / math.sqrt(len(final)))


def test_betting_is_much_tighter_than_hoeffding():
    rng = np.random.default_rng(7)
    for sample in (
        lambda size: (rng.random(size) < 0.05).astype(float),
        lambda size: rng.beta(0.2, 1.8, size),
        lambda size: np.clip(rng.normal(0.5, 0.1, size), 0, 1),
    ):
        x = sample((300, 200))
        width_betting = upper_bounds(x, 0.1, "betting", (0, 1)) - x.mean(axis=1)
        width_hoeffding = math.sqrt(math.log(10) / 400)
        assert width_betting.mean() < 0.6 * width_hoeffding


def test_betting_equivariant_under_affine_maps_of_the_range():
    x = np.random.default_rng(8).beta(0.7, 2.0, 120)
    base = upper_bound(x, 0.1, "betting", (0, 1))
    assert upper_bound(3.0 * x - 2.0, 0.1, "betting", (-2.0, 1.0)) == pytest.approx(3.0 * base - 2.0, abs=1e-10)


def test_betting_edge_cases():
    assert upper_bound(np.ones(50), 0.1, "betting", (0, 1)) == 1.0
    zeros = upper_bound(np.zeros(50), 0.1, "betting", (0, 1))
    assert 0.0 < zeros < upper_bound(np.zeros(50), 0.1, "hoeffding", (0, 1))
    assert upper_bound(np.zeros(500), 0.1, "betting", (0, 1)) < zeros  # more data, tighter


def test_smaller_delta_gives_larger_bounds():
    rng = np.random.default_rng(9)
    x = rng.beta(0.5, 4.0, (50, 60))
    for method in METHODS:
        data = (x > 0.2).astype(float) if method == "clopper_pearson" else x
        loose, tight = (upper_bounds(data, d, method, _range(method)) for d in (0.01, 0.2))
        assert np.all(loose > tight), method


# --- seeded coverage simulations ------------------------------------------------------------------


def _miss_band(bounds, true_mean, confidence=0.999):
    misses = int(np.sum(bounds < true_mean))
    low = stats.binomtest(misses, len(bounds)).proportion_ci(confidence_level=confidence, method="exact").low
    return misses / len(bounds), low


COVERAGE_CASES = {
    "bernoulli_0.05_n50": (lambda rng, s: (rng.random(s) < 0.05).astype(float), 0.05, 50, True),
    "bernoulli_0.3_n40": (lambda rng, s: (rng.random(s) < 0.3).astype(float), 0.3, 40, True),
    "beta_skewed_n60": (lambda rng, s: rng.beta(0.2, 1.8, s), 0.1, 60, False),
    "uniform_n30": (lambda rng, s: rng.random(s), 0.5, 30, False),
}


@pytest.mark.parametrize(
    "method,case",
    [
        (method, case)
        for case, (*_, binary) in sorted(COVERAGE_CASES.items())
        for method in EXACT_METHODS
        if binary or method != "clopper_pearson"  # clopper_pearson needs 0/1 costs
    ],
)
def test_exact_methods_cover(method, case):
    sample, true_mean, n, _ = COVERAGE_CASES[case]
    delta, trials = 0.1, 3000
    x = sample(np.random.default_rng(10), (trials, n))
    rate, band_low = _miss_band(upper_bounds(x, delta, method, _range(method)), true_mean)
    # Not significantly above δ (99.9% exact band); the t-test control below shows this can fail.
    assert band_low <= delta, f"{method} on {case}: miss rate {rate:.4f}"


def test_ttest_undercovers_on_rare_events_control():
    sample, true_mean, n, _ = COVERAGE_CASES["bernoulli_0.05_n50"]
    x = sample(np.random.default_rng(10), (3000, n))
    rate, band_low = _miss_band(upper_bounds(x, 0.1, "ttest"), true_mean)
    assert band_low > 0.1, f"t-test miss rate {rate:.4f} was expected to exceed δ = 0.1 significantly"


def test_clopper_pearson_coverage_is_not_trivially_conservative():
    # At p = 0.3, n = 40 the exact binomial miss probability of the CP bound is known exactly.
    n, p, delta = 40, 0.3, 0.1
    bounds = np.array([upper_bound(np.r_[np.ones(k), np.zeros(n - k)], delta, "clopper_pearson") for k in range(n + 1)])
    exact_miss = stats.binom.pmf(np.arange(n + 1), n, p)[bounds < p].sum()
    assert 0.05 < exact_miss <= delta


# --- batched == scalar, input types -----------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_batched_equals_scalar(method):
    rng = np.random.default_rng(11)
    x = rng.beta(0.5, 2.0, (6, 25))
    if method == "clopper_pearson":
        x = (x > 0.3).astype(float)
    batched = upper_bounds(x, 0.1, method, _range(method))
    for row, value in zip(x, batched, strict=True):
        assert upper_bound(row, 0.1, method, _range(method)) == value


def test_accepts_lists_arrays_and_tensors():
    values = [0.1, 0.4, 0.35, 0.8, 0.0, 0.2]
    expected = upper_bound(np.array(values), 0.1, "betting", (0, 1))
    assert upper_bound(values, 0.1, "betting", (0, 1)) == expected
    assert upper_bound(torch.tensor(values, dtype=torch.float64), 0.1, "betting", (0, 1)) == expected
    as_float32 = np.array(values, dtype=np.float32).astype(np.float64)
    assert upper_bound(torch.tensor(values), 0.1, "betting", (0, 1)) == upper_bound(as_float32, 0.1, "betting", (0, 1))
    assert upper_bound(torch.tensor(values, dtype=torch.bfloat16), 0.1, "ttest") > 0
    assert upper_bound([0, 1, 1, 0], 0.1, "clopper_pearson") == upper_bound(
        np.array([0.0, 1, 1, 0]), 0.1, "clopper_pearson"
    )
    assert upper_bound(torch.tensor([True, False, False]), 0.1, "clopper_pearson") > 1 / 3


# --- predicted bounds ------------------------------------------------------------------------------


def test_predicted_ttest_is_the_seldonian_pessimistic_bound():
    x = np.random.default_rng(12).normal(0.2, 0.1, 256)
    for inflation in (1.0, 2.0, 3.5):
        k = pessimistic_coefficient(256, 100, 0.1, c1=0.0, c2=inflation)
        expected = x.mean() + k * x.std(ddof=1)
        assert predicted_upper_bound(x, 0.1, 100, "ttest", inflation) == pytest.approx(expected, rel=1e-13)


@pytest.mark.parametrize("method", ["ttest", "hoeffding", "bernstein"])
def test_predicted_with_no_inflation_at_the_same_n_is_the_bound(method):
    x = np.random.default_rng(13).beta(2, 8, 300)
    predicted = predicted_upper_bound(x, 0.1, 300, method, inflation=1.0, cost_range=(0, 1))
    assert predicted == pytest.approx(upper_bound(x, 0.1, method, (0, 1)), rel=1e-13)


def test_predicted_clopper_pearson_at_an_integer_count():
    x = np.r_[np.ones(10), np.zeros(90)]  # p̂ = 0.1; at n_s = 200, k̂ = 20
    cp = stats.beta.ppf(0.9, 21, 180)
    assert predicted_upper_bound(x, 0.1, 200, "clopper_pearson", 2.0) == pytest.approx(0.1 + 2 * (cp - 0.1), rel=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_predicted_bound_shrinks_with_n_safety_and_inflation_zero_gives_mean(method):
    rng = np.random.default_rng(14)
    x = (rng.random(400) < 0.2).astype(float) if method == "clopper_pearson" else rng.beta(0.5, 2, 400)
    widths = [predicted_upper_bound(x, 0.1, n_s, method, 2.0, _range(method)) - x.mean() for n_s in (50, 200, 2000)]
    assert widths[0] > widths[1] > widths[2] > 0
    assert predicted_upper_bound(x, 0.1, 100, method, 0.0, _range(method)) == pytest.approx(x.mean(), rel=1e-14)


def test_predicted_betting_tracks_the_betting_bound_at_the_same_n():
    rng = np.random.default_rng(15)
    x = rng.beta(0.5, 3.0, (200, 300))
    predicted = predicted_upper_bounds(x, 0.1, 300, "betting", 1.0, (0, 1))
    actual = upper_bounds(x, 0.1, "betting", (0, 1))
    widths = predicted - x.mean(axis=1), actual - x.mean(axis=1)
    assert np.mean(widths[0]) == pytest.approx(np.mean(widths[1]), rel=0.15)


# --- bad input --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(costs=[0.5]), "costs"),
        (dict(costs=[]), "costs"),
        (dict(costs=[[0.1, 0.2], [0.3, 0.4]]), "costs"),
        (dict(costs=[0.1, float("nan"), 0.2]), "costs"),
        (dict(costs=[0.1, float("inf"), 0.2]), "costs"),
        (dict(costs=["a", "b"]), "costs"),
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(delta=-0.1), "delta"),
        (dict(delta=float("nan")), "delta"),
        (dict(delta=True), "delta"),
        (dict(method="wald"), "method"),
        (dict(method="hoeffding", cost_range=None), "cost_range"),
        (dict(method="bernstein", cost_range=None), "cost_range"),
        (dict(method="betting", cost_range=None), "cost_range"),
        (dict(method="betting", cost_range=(1, 0)), "cost_range"),
        (dict(method="betting", cost_range=(0, float("inf"))), "cost_range"),
        (dict(method="betting", cost_range=(0, 0.5)), "cost_range"),  # 0.7 outside
        (dict(method="ttest", cost_range=(0.2, 1)), "cost_range"),  # 0.1 outside
        (dict(method="clopper_pearson"), "costs"),  # not 0/1
        (dict(method="clopper_pearson", costs=[0, 1, 1], cost_range=(0, 2)), "cost_range"),
    ],
)
def test_bad_input_names_the_argument(kwargs, name):
    args = dict(costs=[0.1, 0.7, 0.3], delta=0.1, method="ttest", cost_range=None) | kwargs
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        upper_bound(**args)


def test_bad_input_predicted():
    with pytest.raises(ValueError, match=r"\bn_safety\b"):
        predicted_upper_bound([0.1, 0.2, 0.3], 0.1, 1)
    with pytest.raises(ValueError, match=r"\binflation\b"):
        predicted_upper_bound([0.1, 0.2, 0.3], 0.1, 100, inflation=-1.0)
    with pytest.raises(ValueError, match=r"\bcandidate_costs\b"):
        predicted_upper_bound([0.1], 0.1, 100)
    with pytest.raises(ValueError, match=r"\bcandidate_costs\b"):
        predicted_upper_bound([0.1, 2.0], 0.1, 100, "betting", cost_range=(0, 1))
