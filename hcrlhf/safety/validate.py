"""Guarantee validation on synthetic problems (the Seldonian experiment protocol, docs/method.md#confidence-bounds).

A *problem* is a set of candidate "policies" whose per-response cost distributions are known
exactly (so is their true mean cost J_C), each with a reward, plus a threshold τ, a known cost
range and the sizes n_c (candidate data) and n_s (safety data). One *trial* runs the whole method
on fresh draws:

1. draw n_c candidate costs for every candidate;
2. candidate selection: keep the highest-reward candidate whose selection bound is ≤ τ
   (``selection="pessimistic"``: μ̂ + k·σ̂ with k from :func:`pessimistic_coefficient`,
   docs/method.md#candidate-selection;
   ``"predicted"``: the Seldonian :func:`predicted_upper_bound` of each test method;
   ``"none"``: no selection, the highest-reward candidate goes straight to the test);
   if none qualifies the trial returns NO SOLUTION FOUND;
3. draw n_s fresh safety costs from the selected candidate and run the safety test of each method;
4. the trial *fails* if the test passes and the selected candidate's true mean is > τ
   (NSF counts as safe); it *solves* if the test passes.

Per method the failure rate is reported with a two-sided Clopper–Pearson band, next to δ, and the
solution rate. The guarantee says failure rate ≤ δ; with ``selection="none"`` and one candidate
just above τ, the failure rate is the test's pass probability at the boundary, which is the worst
case the guarantee has to cover.

Trials are vectorised with numpy (all trials of a chunk at once), so thousands of trials per
problem take seconds. Every method sees the same candidate and safety draws in a trial.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Callable, Sequence

import numpy as np
from scipy import optimize, stats

from hcrlhf.safety._checks import METHODS, check_count, check_delta, check_method, check_real, validity
from hcrlhf.safety.bounds import predicted_upper_bounds, upper_bounds
from hcrlhf.safety.candidate import pessimistic_coefficient

__all__ = [
    "Candidate",
    "Problem",
    "MethodOutcome",
    "SELECTIONS",
    "gaussian_problem",
    "bernoulli_problem",
    "beta_problem",
    "rare_event_problem",
    "rare_severe_problem",
    "default_problems",
    "run_trials",
    "clopper_pearson_interval",
    "format_table",
]

SELECTIONS = ("none", "pessimistic", "predicted")
#: Default candidate means as multiples of τ; reward grows with cost (the usual trade-off).
DEFAULT_RELATIVE_MEANS = (0.5, 0.7, 0.85, 0.95, 1.02, 1.1, 1.25, 1.5)

Sampler = Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A synthetic candidate policy: its cost distribution (sampler), exact mean cost and reward."""

    name: str
    true_mean: float
    reward: float
    sample: Sampler


@dataclasses.dataclass(frozen=True)
class Problem:
    """A synthetic HC-RLHF problem; ``binary`` = costs are 0/1 (Clopper–Pearson applies)."""

    name: str
    description: str
    candidates: tuple[Candidate, ...]
    threshold: float
    cost_range: tuple[float, float]
    n_candidate: int
    n_safety: int
    binary: bool = False

    def applicable(self, method: str) -> bool:
        return method != "clopper_pearson" or self.binary


@dataclasses.dataclass(frozen=True)
class MethodOutcome:
    """Aggregated result of ``n_trials`` trials for one method on one problem."""

    problem: str
    selection: str
    method: str
    validity: str
    delta: float
    threshold: float
    n_candidate: int
    n_safety: int
    n_trials: int
    failures: int
    solutions: int
    unsafe_selected: int
    returned_cost_sum: float
    failure_band: tuple[float, float]

    @property
    def failure_rate(self) -> float:
        return self.failures / self.n_trials

    @property
    def solution_rate(self) -> float:
        return self.solutions / self.n_trials

    @property
    def mean_returned_cost(self) -> float:
        """Average true mean cost of the returned models, relative to τ (nan if none returned)."""
        return self.returned_cost_sum / self.solutions / self.threshold if self.solutions else float("nan")

    @property
    def violates(self) -> bool:
        """The failure rate is significantly above δ (the band's lower end exceeds δ)."""
        return self.failure_band[0] > self.delta

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["failure_band"] = list(self.failure_band)
        data["failure_rate"] = self.failure_rate
        data["solution_rate"] = self.solution_rate
        data["mean_returned_cost"] = self.mean_returned_cost
        data["violates"] = self.violates
        return data


# ---------------------------------------------------------------------------------------------
# Problems


def _candidates(
    threshold: float, relative_means: Sequence[float], make: Callable[[float], tuple[float, Sampler]], label: str
):
    out = []
    for rank, relative in enumerate(relative_means):
        if not 0.0 < threshold * relative < 1.0:
            raise ValueError(f"{label}: candidate mean {relative:g}·τ = {threshold * relative:g} must lie in (0, 1)")
        true_mean, sampler = make(threshold * relative)
        out.append(Candidate(f"{label}@{relative:g}tau", float(true_mean), float(rank), sampler))
    return tuple(out)


def _clipped_normal_mean(mu: float, sigma: float, low: float = 0.0, high: float = 1.0) -> float:
    """E[clip(X, low, high)] for X ~ N(mu, sigma²), in closed form."""
    alpha, beta = (low - mu) / sigma, (high - mu) / sigma
    cdf_a, cdf_b = stats.norm.cdf(alpha), stats.norm.cdf(beta)
    return float(
        low * cdf_a
        + high * (1.0 - cdf_b)
        + mu * (cdf_b - cdf_a)
        + sigma * (stats.norm.pdf(alpha) - stats.norm.pdf(beta))
    )


def gaussian_problem(
    threshold: float = 0.5,
    sigma: float = 0.1,
    relative_means: Sequence[float] = DEFAULT_RELATIVE_MEANS,
    n_candidate: int = 256,
    n_safety: int = 100,
) -> Problem:
    """Costs clip(N(μ, σ²), 0, 1): nearly Gaussian, the t-test's home ground. Exact mean in closed form."""

    def make(target: float):
        mu = optimize.brentq(lambda m: _clipped_normal_mean(m, sigma) - target, -1.0, 2.0, xtol=1e-14)
        return _clipped_normal_mean(mu, sigma), lambda rng, shape: np.clip(rng.normal(mu, sigma, shape), 0.0, 1.0)

    return Problem(
        "gaussian",
        f"clip(N(mu, {sigma:g}^2), 0, 1)",
        _candidates(threshold, relative_means, make, "gaussian"),
        threshold,
        (0.0, 1.0),
        n_candidate,
        n_safety,
    )


def _bernoulli(p: float):
    return p, lambda rng, shape: (rng.random(shape) < p).astype(np.float64)


def bernoulli_problem(
    threshold: float = 0.2,
    relative_means: Sequence[float] = DEFAULT_RELATIVE_MEANS,
    n_candidate: int = 256,
    n_safety: int = 100,
) -> Problem:
    """0/1 costs (the unsafe indicator) with a moderate unsafe rate."""
    return Problem(
        "bernoulli",
        "Bernoulli(p): the 0/1 unsafe indicator",
        _candidates(threshold, relative_means, _bernoulli, "bernoulli"),
        threshold,
        (0.0, 1.0),
        n_candidate,
        n_safety,
        binary=True,
    )


def beta_problem(
    threshold: float = 0.1,
    concentration: float = 2.0,
    relative_means: Sequence[float] = DEFAULT_RELATIVE_MEANS,
    n_candidate: int = 256,
    n_safety: int = 100,
) -> Problem:
    """Skewed continuous costs Beta(m·κ, (1 − m)·κ) (mean m; κ = 2 gives a long right tail)."""

    def make(target: float):
        a, b = target * concentration, (1.0 - target) * concentration
        return a / (a + b), lambda rng, shape: rng.beta(a, b, shape)

    return Problem(
        "beta",
        f"Beta(m*{concentration:g}, (1-m)*{concentration:g}): skewed",
        _candidates(threshold, relative_means, make, "beta"),
        threshold,
        (0.0, 1.0),
        n_candidate,
        n_safety,
    )


def rare_event_problem(
    threshold: float = 0.03,
    relative_means: Sequence[float] = DEFAULT_RELATIVE_MEANS,
    n_candidate: int = 256,
    n_safety: int = 100,
) -> Problem:
    """0/1 costs with a rare unsafe event (a few percent): the t-test's worst case."""
    return Problem(
        "rare_event",
        "Bernoulli(p), a rare unsafe event",
        _candidates(threshold, relative_means, _bernoulli, "rare_event"),
        threshold,
        (0.0, 1.0),
        n_candidate,
        n_safety,
        binary=True,
    )


def rare_severe_problem(
    threshold: float = 0.03,
    relative_means: Sequence[float] = DEFAULT_RELATIVE_MEANS,
    n_candidate: int = 256,
    n_safety: int = 100,
) -> Problem:
    """Continuous heavy tail: cost ~ U(0, 0.02) usually, ~ U(0.5, 1) with a small probability p."""
    base_mean, severe_mean = 0.01, 0.75

    def make(target: float):
        p = (target - base_mean) / (severe_mean - base_mean)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"rare_severe_problem: mean {target} is outside [{base_mean}, {severe_mean}]")

        def sample(rng: np.random.Generator, shape):
            severe = rng.random(shape) < p
            return np.where(severe, 0.5 + 0.5 * rng.random(shape), 0.02 * rng.random(shape))

        return (1.0 - p) * base_mean + p * severe_mean, sample

    return Problem(
        "rare_severe",
        "U(0, 0.02), or U(0.5, 1) with a small probability p",
        _candidates(threshold, relative_means, make, "rare_severe"),
        threshold,
        (0.0, 1.0),
        n_candidate,
        n_safety,
    )


def default_problems(
    relative_means: Sequence[float] = DEFAULT_RELATIVE_MEANS, n_candidate: int = 256, n_safety: int = 100
) -> list[Problem]:
    """Gaussian, Bernoulli, Beta, rare-event (0/1) and rare-severe (continuous) problems."""
    kwargs = dict(relative_means=relative_means, n_candidate=n_candidate, n_safety=n_safety)
    return [
        gaussian_problem(**kwargs),
        bernoulli_problem(**kwargs),
        beta_problem(**kwargs),
        rare_event_problem(**kwargs),
        rare_severe_problem(**kwargs),
    ]


# ---------------------------------------------------------------------------------------------
# Trials


def clopper_pearson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Two-sided exact binomial (Clopper–Pearson) interval for a rate ``successes/trials``."""
    alpha = 1.0 - confidence
    k, n = int(successes), int(trials)
    if n < 1 or not 0 <= k <= n:
        raise ValueError(f"clopper_pearson_interval: need 0 <= successes <= trials, trials >= 1; got {k}/{n}")
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2.0, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1.0 - alpha / 2.0, k + 1, n - k))
    return low, high


def _rng(seed: int, problem: Problem) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(problem.name.encode())])


def run_trials(
    problem: Problem,
    methods: Sequence[str] = METHODS,
    *,
    n_trials: int = 1000,
    delta: float = 0.1,
    selection: str = "pessimistic",
    c1: float = 4.0,
    c2: float = 2.0,
    inflation: float = 2.0,
    seed: int = 0,
    chunk_size: int = 500,
    confidence: float = 0.95,
) -> list[MethodOutcome]:
    """Run ``n_trials`` independent trials of the whole method on ``problem``.

    Args:
        problem: the synthetic problem.
        methods: safety-test methods; ``clopper_pearson`` is skipped on non-binary problems.
        n_trials: number of trials (fresh candidate and safety draws each).
        delta: δ of the test (and of the selection bound).
        selection: ``"pessimistic"`` (the docs/method.md#candidate-selection bound with ``c1``, ``c2``), ``"predicted"``
            (Seldonian, per method, with ``inflation``) or ``"none"``.
        seed: the random streams derive from (seed, problem name).
        chunk_size: trials processed at once (memory ~ chunk · candidates · n_c · 8 bytes).
        confidence: level of the two-sided Clopper–Pearson band on the failure rate.

    Returns:
        One :class:`MethodOutcome` per applicable method, in ``methods`` order.
    """
    fn = "run_trials"
    methods = [check_method(fn, m) for m in methods]
    methods = [m for m in methods if problem.applicable(m)]
    n_trials = check_count(fn, "n_trials", n_trials, minimum=1)
    chunk_size = check_count(fn, "chunk_size", chunk_size, minimum=1)
    delta = check_delta(fn, delta)
    if selection not in SELECTIONS:
        raise ValueError(f"{fn}: selection must be one of {SELECTIONS}, got {selection!r}")
    inflation = check_real(fn, "inflation", inflation, minimum=0.0)

    rng = _rng(seed, problem)
    candidates = sorted(problem.candidates, key=lambda c: -c.reward)  # best reward first
    true_means = np.array([c.true_mean for c in candidates])
    unsafe = true_means > problem.threshold
    n_c, n_s, tau = problem.n_candidate, problem.n_safety, problem.threshold
    k = pessimistic_coefficient(n_c, n_s, delta, c1, c2) if selection == "pessimistic" else None

    failures = dict.fromkeys(methods, 0)
    solutions = dict.fromkeys(methods, 0)
    unsafe_selected = dict.fromkeys(methods, 0)
    returned_cost = dict.fromkeys(methods, 0.0)
    done = 0
    while done < n_trials:
        size = min(chunk_size, n_trials - done)
        done += size
        # 1-2. candidate data and selection: chosen[method] = (size,) candidate index, −1 = NSF.
        if selection == "none":
            chosen = dict.fromkeys(methods, np.zeros(size, dtype=np.int64))
        else:
            data = [c.sample(rng, (size, n_c)) for c in candidates]
            if selection == "pessimistic":
                bounds = np.stack([x.mean(axis=1) + k * x.std(axis=1, ddof=1) for x in data], axis=1)
                chosen = dict.fromkeys(methods, _first_under(bounds, tau))
            else:
                chosen = {}
                for method in methods:
                    bounds = np.stack(
                        [
                            predicted_upper_bounds(x, delta, n_s, method, inflation, _range(method, problem))
                            for x in data
                        ],
                        axis=1,
                    )
                    chosen[method] = _first_under(bounds, tau)
        # 3-4. fresh safety data for each selected candidate, shared by the methods that chose it.
        for index, candidate in enumerate(candidates):
            picked = {m: np.flatnonzero(chosen[m] == index) for m in methods}
            rows = np.unique(np.concatenate(list(picked.values())))
            if rows.size == 0:
                continue
            safety = candidate.sample(rng, (rows.size, n_s))
            for method in methods:
                if picked[method].size == 0:
                    continue
                subset = safety[np.searchsorted(rows, picked[method])]
                passed = upper_bounds(subset, delta, method, _range(method, problem)) <= tau
                solutions[method] += int(passed.sum())
                returned_cost[method] += float(passed.sum()) * true_means[index]
                if unsafe[index]:
                    failures[method] += int(passed.sum())
                    unsafe_selected[method] += picked[method].size

    return [
        MethodOutcome(
            problem=problem.name,
            selection=selection,
            method=method,
            validity=validity(method),
            delta=delta,
            threshold=tau,
            n_candidate=n_c,
            n_safety=n_s,
            n_trials=n_trials,
            failures=failures[method],
            solutions=solutions[method],
            unsafe_selected=unsafe_selected[method],
            returned_cost_sum=returned_cost[method],
            failure_band=clopper_pearson_interval(failures[method], n_trials, confidence),
        )
        for method in methods
    ]


def _range(method: str, problem: Problem):
    return None if method == "clopper_pearson" else problem.cost_range


def _first_under(bounds: np.ndarray, threshold: float) -> np.ndarray:
    """(trials, candidates) bounds, best reward first → index of the first ≤ threshold, or −1."""
    ok = bounds <= threshold
    return np.where(ok.any(axis=1), ok.argmax(axis=1), -1)


def format_table(outcomes: Sequence[MethodOutcome]) -> str:
    """A markdown table: problem, selection, method, validity, failure rate [band] vs δ, solution rate."""
    lines = [
        "| problem | selection | n_c | n_s | method | validity | failure rate | 95% CP band | δ | ≤ δ? "
        "| solution rate | returned J_C/τ |",
        "|---|---|---:|---:|---|---|---:|---|---:|---|---:|---:|",
    ]
    for o in outcomes:
        verdict = "**NO**" if o.violates else ("yes" if o.failure_rate <= o.delta else "within band")
        lines.append(
            f"| {o.problem} | {o.selection} | {o.n_candidate if o.selection != 'none' else '–'} | {o.n_safety} | "
            f"{o.method} | {o.validity} | {o.failure_rate:.4f} | [{o.failure_band[0]:.4f}, {o.failure_band[1]:.4f}] | "
            f"{o.delta:g} | {verdict} | {o.solution_rate:.4f} | "
            + (f"{o.mean_returned_cost:.3f} |" if o.solutions else "– |")
        )
    return "\n".join(lines)
