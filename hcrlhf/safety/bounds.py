"""One-sided (1 − δ) upper confidence bounds on a mean cost (docs/method.md#confidence-bounds), and the Seldonian
prediction of such a bound from candidate data (docs/method.md#candidate-selection).

Costs c_1..c_n are i.i.d. draws of the per-response cost of one model (one response per safety
prompt). Each method returns U with Pr(U < E[c]) ≤ δ — exactly at every n for the *exact* methods
(given costs in the stated range), only as n → ∞ for the t-test:

    ttest            mean + t(1−δ, n−1)·s/√n                                   asymptotic
    hoeffding        mean + (b−a)·√(ln(1/δ)/(2n))                              exact
    bernstein        mean + √(2·s²·ln(2/δ)/n) + 7(b−a)·ln(2/δ)/(3(n−1))        exact (Maurer–Pontil)
    betting          inverted betting martingale (Waudby-Smith & Ramdas)       exact
    clopper_pearson  Beta quantile q(1−δ; k+1, n−k), k = Σc, for 0/1 costs;    exact
                     1 when k = n

``s`` is the unbiased sample standard deviation. When ``cost_range=(a, b)`` is given every bound is
capped at b (the mean can never exceed b, so the cap keeps validity).

Betting bound. Costs are rescaled to x_i = (c_i − a)/(b − a) ∈ [0, 1]. For a candidate mean m the
"bet that the mean is below m" capital process is

    K_t(m) = Π_{i≤t} (1 − λ_i(m)·(x_i − m)),
    λ_i(m) = min( √(2·ln(1/δ) / (n·σ̂²_{i−1})),  c/(1 − m) ),      c = 3/4,
    μ̂_t = (1/2 + Σ_{i≤t} x_i)/(t + 1),   σ̂²_t = (1/4 + Σ_{i≤t} (x_i − μ̂_i)²)/(t + 1),

the one-sided half of Waudby-Smith & Ramdas' hedged capital process with their predictable
plug-in bets for a fixed-n interval. The bets λ_i use only x_1..x_{i−1}, so at the true mean μ the
factors have conditional mean 1 and K_t(μ) is a non-negative martingale; by Ville's inequality
Pr(max_{t≤n} K_t(μ) ≥ 1/δ) ≤ δ. Every factor is non-decreasing in m (also where the truncation
c/(1 − m) is active: ∂/∂m = c(1 − x)/(1 − m)² ≥ 0) and ≥ 1 − c > 0, so max_t K_t(m) is
non-decreasing in m and the confidence set {m : max_t K_t(m) < 1/δ} is an interval [0, U).
U is found by a bracketing root search (Illinois regula falsi, bisection fallback) that always
returns the upper end of its final bracket, so round-off can only make the bound larger.
The costs are used in the order given: pass them in drawing order, never sorted.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

from hcrlhf.safety._checks import (
    METHODS,
    as_cost_array,
    check_binary,
    check_count,
    check_delta,
    check_in_range,
    check_method,
    check_method_range,
    check_real,
    validity,
)

__all__ = [
    "METHODS",
    "upper_bound",
    "upper_bounds",
    "predicted_upper_bound",
    "predicted_upper_bounds",
    "validity",
]

#: Truncation of the betting fraction, λ ≤ c/(1 − m) (Waudby-Smith & Ramdas use 1/2 or 3/4).
BETTING_TRUNCATION = 0.75
#: Absolute precision (on the [0, 1] scale) of the betting bound's root search.
BETTING_TOL = 1e-12
_BETTING_MAX_ITER = 200  # with a bisection every 4th step: width ≤ 2^-50 long before


def upper_bound(costs, delta: float, method: str = "ttest", cost_range=None) -> float:
    """One-sided (1 − δ) upper confidence bound on the mean of ``costs``.

    Args:
        costs: (n,) per-response costs, n ≥ 2 — a numpy array, list or torch tensor.
        delta: allowed failure probability δ ∈ (0, 1).
        method: ``"ttest"``, ``"hoeffding"``, ``"bernstein"``, ``"betting"`` or ``"clopper_pearson"``
            (formulas in the module docstring).
        cost_range: ``(a, b)`` with every cost in [a, b]. Required by hoeffding, bernstein and
            betting; optional for ttest (then the bound is capped at b); clopper_pearson takes 0/1
            costs and accepts only None or (0, 1).

    Returns:
        The bound as a Python float.

    Raises:
        ValueError naming the argument: n < 2, δ outside (0, 1), NaN/inf costs, costs outside
        ``cost_range`` (or not 0/1 for clopper_pearson), unknown method, missing ``cost_range``.
    """
    fn = "upper_bound"
    method = check_method(fn, method)
    delta = check_delta(fn, delta)
    cost_range = check_method_range(fn, method, cost_range)
    x = as_cost_array(fn, costs)
    _check_values(fn, x, method, cost_range)
    return float(_upper_bounds(x[None, :], delta, method, cost_range)[0])


def upper_bounds(costs, delta: float, method: str = "ttest", cost_range=None) -> np.ndarray:
    """Batched :func:`upper_bound`: ``costs`` (trials, n) → (trials,) bounds, one per row.

    Same arguments, checks and results as :func:`upper_bound` row by row (vectorised numpy; used
    by the guarantee validation to run thousands of trials at once).
    """
    fn = "upper_bounds"
    method = check_method(fn, method)
    delta = check_delta(fn, delta)
    cost_range = check_method_range(fn, method, cost_range)
    x = as_cost_array(fn, costs, ndim=2)
    _check_values(fn, x, method, cost_range)
    return _upper_bounds(x, delta, method, cost_range)


def predicted_upper_bound(
    candidate_costs,
    delta: float,
    n_safety: int,
    method: str = "ttest",
    inflation: float = 2.0,
    cost_range=None,
) -> float:
    """Seldonian prediction, from candidate data, of the bound the safety test will compute.

    The candidate costs stand in for the future safety sample of size ``n_safety``; the bound's
    width (U − mean) at ``n_safety`` is multiplied by ``inflation`` (Thomas et al.'s factor 2) to
    guard against the candidate data looking better than the safety data will:

        ttest            mean + inflation · t(1−δ, n_s−1)·s/√n_s
        hoeffding        mean + inflation · (b−a)·√(ln(1/δ)/(2n_s))
        bernstein        mean + inflation · (√(2·s²·ln(2/δ)/n_s) + 7(b−a)·ln(2/δ)/(3(n_s−1)))
        clopper_pearson  p̂ + inflation · (q(1−δ; p̂·n_s + 1, n_s − p̂·n_s) − p̂)    (p̂ = mean, 0/1 costs)
        betting          mean + inflation · (U_bet(y) − mean(y)), y = n_s values at evenly spaced
                         quantiles of the candidate costs, in a fixed pseudo-random order

    With ``method="ttest"`` this equals μ̂ + k·σ̂ with ``k = pessimistic_coefficient(n_c, n_s, δ,
    c1=0, c2=inflation)`` (the Seldonian toolkit's form of the bound in docs/method.md#candidate-selection).
    The prediction is a selection heuristic, not a bound: only the safety test on fresh data carries the guarantee.

    Args:
        candidate_costs: (n_c,) costs of the candidate on candidate data, n_c ≥ 2.
        delta: δ ∈ (0, 1) that the safety test will use.
        n_safety: size n_s ≥ 2 of the future safety set.
        method, cost_range: as in :func:`upper_bound`.
        inflation: width multiplier ≥ 0.
    """
    fn = "predicted_upper_bound"
    method = check_method(fn, method)
    delta = check_delta(fn, delta)
    n_safety = check_count(fn, "n_safety", n_safety)
    inflation = check_real(fn, "inflation", inflation, minimum=0.0)
    cost_range = check_method_range(fn, method, cost_range)
    x = as_cost_array(fn, candidate_costs, "candidate_costs")
    _check_values(fn, x, method, cost_range, name="candidate_costs")
    return float(_predicted_upper_bounds(x[None, :], delta, n_safety, method, inflation, cost_range)[0])


def predicted_upper_bounds(
    candidate_costs,
    delta: float,
    n_safety: int,
    method: str = "ttest",
    inflation: float = 2.0,
    cost_range=None,
) -> np.ndarray:
    """Batched :func:`predicted_upper_bound`: ``candidate_costs`` (trials, n_c) → (trials,)."""
    fn = "predicted_upper_bounds"
    method = check_method(fn, method)
    delta = check_delta(fn, delta)
    n_safety = check_count(fn, "n_safety", n_safety)
    inflation = check_real(fn, "inflation", inflation, minimum=0.0)
    cost_range = check_method_range(fn, method, cost_range)
    x = as_cost_array(fn, candidate_costs, "candidate_costs", ndim=2)
    _check_values(fn, x, method, cost_range, name="candidate_costs")
    return _predicted_upper_bounds(x, delta, n_safety, method, inflation, cost_range)


# ---------------------------------------------------------------------------------------------
# Internals: validated float64 arrays (trials, n) in, (trials,) out.


def _check_values(fn: str, x: np.ndarray, method: str, cost_range, name: str = "costs") -> None:
    if method == "clopper_pearson":
        check_binary(fn, x, name)
    elif cost_range is not None:
        check_in_range(fn, x, cost_range, name)


def _mean_std(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(axis=1), x.std(axis=1, ddof=1)


def _upper_bounds(x: np.ndarray, delta: float, method: str, cost_range) -> np.ndarray:
    n = x.shape[1]
    mean, std = _mean_std(x)
    if method == "ttest":
        bound = mean + stats.t.ppf(1.0 - delta, n - 1) * std / math.sqrt(n)
    elif method == "hoeffding":
        low, high = cost_range
        bound = mean + (high - low) * math.sqrt(math.log(1.0 / delta) / (2.0 * n))
    elif method == "bernstein":
        low, high = cost_range
        log_term = math.log(2.0 / delta)
        bound = mean + np.sqrt(2.0 * std**2 * log_term / n) + 7.0 * (high - low) * log_term / (3.0 * (n - 1))
    elif method == "betting":
        low, high = cost_range
        unit = np.clip((x - low) / (high - low), 0.0, 1.0)
        bound = low + (high - low) * betting_upper_unit(unit, delta)
    elif method == "clopper_pearson":
        bound = _clopper_pearson_upper(np.rint(x.sum(axis=1)), n, delta)
    else:  # pragma: no cover - check_method guards this
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if cost_range is not None:
        bound = np.minimum(bound, cost_range[1])
    return np.asarray(bound, dtype=np.float64)


def _clopper_pearson_upper(k, n: float, delta: float) -> np.ndarray:
    """q(1 − δ; k + 1, n − k), the exact one-sided binomial upper bound; 1 where k = n (k may be real)."""
    k = np.asarray(k, dtype=np.float64)
    full = k >= n
    quantile = stats.beta.ppf(1.0 - delta, k + 1.0, np.where(full, 1.0, n - k))
    return np.where(full, 1.0, quantile)


def _predicted_upper_bounds(
    x: np.ndarray, delta: float, n_safety: int, method: str, inflation: float, cost_range
) -> np.ndarray:
    mean, std = _mean_std(x)
    n_s = n_safety
    if method == "ttest":
        width = stats.t.ppf(1.0 - delta, n_s - 1) * std / math.sqrt(n_s)
    elif method == "hoeffding":
        low, high = cost_range
        width = np.full_like(mean, (high - low) * math.sqrt(math.log(1.0 / delta) / (2.0 * n_s)))
    elif method == "bernstein":
        low, high = cost_range
        log_term = math.log(2.0 / delta)
        width = np.sqrt(2.0 * std**2 * log_term / n_s) + 7.0 * (high - low) * log_term / (3.0 * (n_s - 1))
    elif method == "clopper_pearson":
        width = _clopper_pearson_upper(mean * n_s, n_s, delta) - mean
    elif method == "betting":
        synthetic = _quantile_sample(x, n_s)
        low, high = cost_range
        unit = np.clip((synthetic - low) / (high - low), 0.0, 1.0)
        width = low + (high - low) * betting_upper_unit(unit, delta) - synthetic.mean(axis=1)
    else:  # pragma: no cover
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return mean + inflation * width


def _quantile_sample(x: np.ndarray, size: int) -> np.ndarray:
    """(trials, size) values at evenly spaced quantiles of each row, in one fixed shuffled order."""
    n = x.shape[1]
    positions = np.minimum(((np.arange(size) + 0.5) * n / size).astype(np.int64), n - 1)
    order = np.random.default_rng(0).permutation(size)
    return np.sort(x, axis=1)[:, positions[order]]


# ---------------------------------------------------------------------------------------------
# The betting bound on [0, 1].


def _betting_free_bets(x: np.ndarray, delta: float) -> np.ndarray:
    """Untruncated predictable plug-in bets √(2 ln(1/δ)/(n σ̂²_{t−1})), shape of ``x`` (trials, n)."""
    trials, n = x.shape
    count = np.arange(1, n + 1, dtype=np.float64)
    running_mean = (0.5 + np.cumsum(x, axis=1)) / (count + 1.0)
    running_var = (0.25 + np.cumsum((x - running_mean) ** 2, axis=1)) / (count + 1.0)
    previous_var = np.concatenate([np.full((trials, 1), 0.25), running_var[:, :-1]], axis=1)
    return np.sqrt(2.0 * math.log(1.0 / delta) / (n * previous_var))


def betting_log_capital(x: np.ndarray, m: np.ndarray, delta: float, free_bets: np.ndarray | None = None):
    """log max_{t≤n} K_t(m) for each row of ``x`` (trials, n) in [0, 1] and candidate means ``m`` (trials,).

    Exposed for tests (monotonicity in m, martingale property); see the module docstring.
    """
    if free_bets is None:
        free_bets = _betting_free_bets(x, delta)
    m = np.asarray(m, dtype=np.float64)
    cap = BETTING_TRUNCATION / np.maximum(1.0 - m, 1e-300)
    bets = np.minimum(free_bets, cap[:, None])
    log_capital = np.cumsum(np.log1p(-bets * (x - m[:, None])), axis=1)
    return np.maximum(log_capital.max(axis=1), 0.0)  # K_0 = 1


def betting_upper_unit(x: np.ndarray, delta: float) -> np.ndarray:
    """The betting upper bound for each row of ``x`` (trials, n), values in [0, 1]; returns (trials,)."""
    trials, n = x.shape
    threshold = math.log(1.0 / delta)
    free_bets = _betting_free_bets(x, delta)

    def excess(rows: np.ndarray, m: np.ndarray) -> np.ndarray:
        return betting_log_capital(x[rows], m, delta, free_bets[rows]) - threshold

    every = np.arange(trials)
    # Bracket [lo, hi] with excess(lo) < 0 <= excess(hi). At m = 0 every factor is 1 − λx ≤ 1, so
    # excess(0) = −ln(1/δ) < 0. Rows that cannot reject m = 1 get the trivial bound 1.
    lo = np.zeros(trials)
    excess_lo = np.full(trials, -threshold)
    hi = np.ones(trials)
    excess_hi = excess(every, hi)
    active = excess_hi >= 0.0
    # Cheap narrowing at the sample mean and at Hoeffding's bound (exact checks: excess is monotone).
    mean = x.mean(axis=1)
    for guess in (mean, np.minimum(1.0, mean + math.sqrt(threshold / (2.0 * n)))):
        value = excess(every, guess)
        upper = active & (value >= 0.0) & (guess < hi)
        lower = active & (value < 0.0) & (guess > lo)
        hi, excess_hi = np.where(upper, guess, hi), np.where(upper, value, excess_hi)
        lo, excess_lo = np.where(lower, guess, lo), np.where(lower, value, excess_lo)

    rows = np.flatnonzero(active & (hi - lo > BETTING_TOL))
    last_side = np.zeros(trials, dtype=np.int8)
    for iteration in range(_BETTING_MAX_ITER):
        if rows.size == 0:
            break
        low, high, excess_low, excess_high = lo[rows], hi[rows], excess_lo[rows], excess_hi[rows]
        with np.errstate(divide="ignore", invalid="ignore"):
            m = high - excess_high * (high - low) / (excess_high - excess_low)
        # Every 4th step bisects, so the bracket at least halves every 4 steps whatever the kinks.
        fallback = ~np.isfinite(m) | (m <= low) | (m >= high) | (iteration % 4 == 3)
        m = np.where(fallback, 0.5 * (low + high), m)
        value = excess(rows, m)
        rejected = value >= 0.0
        side = last_side[rows]
        # Illinois: halve the stale end's value when the same end moves twice in a row.
        hi[rows] = np.where(rejected, m, high)
        excess_hi[rows] = np.where(rejected, value, np.where(side == -1, 0.5 * excess_high, excess_high))
        lo[rows] = np.where(rejected, low, m)
        excess_lo[rows] = np.where(rejected, np.where(side == 1, 0.5 * excess_low, excess_low), value)
        last_side[rows] = np.where(rejected, 1, -1)
        rows = rows[hi[rows] - lo[rows] > BETTING_TOL]
    # hi always rejects (excess ≥ 0), so it is a valid bound even if a row had not converged.
    return np.where(active, hi, 1.0)
