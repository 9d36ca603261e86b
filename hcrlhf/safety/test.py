"""Step 2 of HC-RLHF: the safety test (docs/method.md#the-safety-test).

Sample one response per safety prompt from the candidate with the deployment decoding settings,
score it with the cost model, and pass iff the (1 − δ) upper confidence bound on the mean cost is
≤ τ; otherwise the method returns "NO SOLUTION FOUND". With an exact bound and i.i.d. costs,
Pr(PASS while E[cost] > τ) ≤ δ.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from hcrlhf.safety._checks import (
    METHODS,
    as_cost_array,
    check_delta,
    check_method,
    check_method_range,
    check_prompt_texts,
    check_real,
    validity,
)
from hcrlhf.safety.bounds import _check_values, _upper_bounds
from hcrlhf.safety.ledger import _check_fingerprint, distinct_prompts, fingerprint

__all__ = ["safety_test", "SafetyTestResult", "PASS", "NO_SOLUTION_FOUND"]

PASS = "PASS"
NO_SOLUTION_FOUND = "NO SOLUTION FOUND"


@dataclasses.dataclass(frozen=True)
class SafetyTestResult:
    """The outcome of one safety test.

    Attributes:
        passed: ucb ≤ threshold.
        verdict: ``"PASS"`` or ``"NO SOLUTION FOUND"``.
        ucb: the (1 − δ) upper confidence bound on the mean cost.
        mean, std: sample mean and unbiased std of the costs.
        n: number of costs (safety prompts).
        delta, threshold: δ and τ.
        method: the bound's method; ``validity`` is ``"exact"`` (finite-sample) or ``"asymptotic"`` (ttest).
        cost_range: (a, b) used by the bound, or None.
        fingerprint: the safety set's fingerprint, when known.
    """

    passed: bool
    verdict: str
    ucb: float
    mean: float
    std: float
    n: int
    delta: float
    threshold: float
    method: str
    validity: str
    cost_range: tuple[float, float] | None = None
    fingerprint: str | None = None

    def __post_init__(self):
        where = "SafetyTestResult"
        if self.verdict != (PASS if self.passed else NO_SOLUTION_FOUND):
            raise ValueError(f"{where}: verdict {self.verdict!r} contradicts passed={self.passed}")
        if self.method not in METHODS:
            raise ValueError(f"{where}: method must be one of {METHODS}, got {self.method!r}")
        if self.validity != validity(self.method):
            raise ValueError(
                f"{where}: validity of {self.method!r} is {validity(self.method)!r}, got {self.validity!r}"
            )
        if self.fingerprint is not None:
            _check_fingerprint(where, self.fingerprint)

    def __bool__(self) -> bool:
        return self.passed

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["cost_range"] = None if self.cost_range is None else list(self.cost_range)
        return data

    def to_json(self, indent: int | None = 2) -> str:
        """A JSON object with every field (floats written exactly, so ``from_json`` round-trips)."""
        return json.dumps(self.to_dict(), indent=indent, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> SafetyTestResult:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("SafetyTestResult.from_json: expected a JSON object")
        names = {field.name for field in dataclasses.fields(cls)}
        unknown, missing = (
            set(data) - names,
            {n for n in names if n not in data and n not in ("cost_range", "fingerprint")},
        )
        if unknown or missing:
            raise ValueError(
                f"SafetyTestResult.from_json: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}"
            )
        if data.get("cost_range") is not None:
            data["cost_range"] = tuple(float(v) for v in data["cost_range"])
        for key in ("ucb", "mean", "std", "delta", "threshold"):
            data[key] = float(data[key])
        return cls(**data)

    def summary(self) -> str:
        return (
            f"{self.verdict}: UCB {self.ucb:.6g} {'<=' if self.passed else '>'} threshold {self.threshold:.6g} "
            f"(mean {self.mean:.6g}, std {self.std:.6g}, n {self.n}, delta {self.delta:g}, "
            f"{self.method}, {self.validity})"
        )


def safety_test(
    costs,
    threshold: float,
    delta: float,
    method: str = "ttest",
    cost_range=None,
    ledger=None,
    safety_set=None,
    *,
    label: str | None = None,
    allow_overlapping_set: bool = False,
) -> SafetyTestResult:
    """Run the safety test on the candidate's costs on the safety set.

    Args:
        costs: (n,) per-response costs, one response per safety prompt, in drawing order, n ≥ 2.
        threshold: τ; the test passes iff UCB ≤ τ.
        delta: δ ∈ (0, 1) for this test.
        method, cost_range: the bound (:func:`hcrlhf.safety.upper_bound`). The paper's default
            ``"ttest"`` is only asymptotically valid; prefer ``"betting"`` with a known
            ``cost_range`` (or ``"clopper_pearson"`` on the 0/1 unsafe indicator) for an exact
            guarantee.
        ledger: a :class:`~hcrlhf.safety.SafetyLedger`; when given, the test's δ is recorded
            against ``safety_set`` *before* the result is returned, and a test that would overspend
            the set's budget raises :class:`~hcrlhf.safety.BudgetExceededError` without revealing
            its result.
        safety_set: the safety prompts, or their :func:`~hcrlhf.safety.fingerprint`; required
            with ``ledger``; recorded in the result. Prompts must be distinct (up to
            :func:`~hcrlhf.safety.canonical_prompt`; drop copies with
            :func:`~hcrlhf.safety.distinct_prompts`), one cost each: a copy would count twice in n and
            narrow the bound. Every prompt needs text (an empty or whitespace-only one is refused).
            Given as prompts, the ledger also applies its overlap rule.
        label: a note for the ledger entry (default: method, τ and n).
        allow_overlapping_set: declare a safety set that re-uses an earlier one of the ledger a new
            sample (:meth:`~hcrlhf.safety.SafetyLedger.spend`; recorded there).

    Returns:
        :class:`SafetyTestResult`.
    """
    fn = "safety_test"
    method = check_method(fn, method)
    delta = check_delta(fn, delta)
    threshold = check_real(fn, "threshold", threshold)
    cost_range = check_method_range(fn, method, cost_range)
    x = as_cost_array(fn, costs)
    _check_values(fn, x, method, cost_range)
    set_fingerprint = None
    if safety_set is not None:
        if isinstance(safety_set, str):
            set_fingerprint = _check_fingerprint(fn, safety_set)
        else:
            safety_set = check_prompt_texts(fn, safety_set, name="safety_set")
            set_fingerprint = fingerprint(safety_set)
            _, _, copies = distinct_prompts(safety_set)
            if copies:
                raise ValueError(f"{fn}: safety_set holds {copies} copies of prompts already in it (same text up to "
                                 "Unicode NFC and whitespace); each prompt may count once in n — drop the copies "
                                 "first (hcrlhf.safety.distinct_prompts)")
            if len(safety_set) != x.size:
                raise ValueError(f"{fn}: costs has {x.size} entries but safety_set {len(safety_set)} prompts; the "
                                 "test takes one cost per safety prompt")
    if ledger is not None and set_fingerprint is None:
        raise ValueError(f"{fn}: safety_set (the safety prompts or their fingerprint) is required with a ledger")
    if label is not None and not isinstance(label, str):
        raise TypeError(f"{fn}: label must be a str, got {type(label).__name__}")

    ucb = float(_upper_bounds(x[None, :], delta, method, cost_range)[0])
    passed = bool(ucb <= threshold)
    result = SafetyTestResult(
        passed=passed,
        verdict=PASS if passed else NO_SOLUTION_FOUND,
        ucb=ucb,
        mean=float(np.mean(x)),
        std=float(np.std(x, ddof=1)),
        n=int(x.size),
        delta=delta,
        threshold=threshold,
        method=method,
        validity=validity(method),
        cost_range=cost_range,
        fingerprint=set_fingerprint,
    )
    if ledger is not None:
        # Spend before revealing: a refused spend must not leak the verdict.
        ledger.spend(
            safety_set,
            delta,
            label if label is not None else f"safety_test {method} threshold={threshold:g} n={x.size}",
            allow_overlapping_set=allow_overlapping_set,
        )
    return result
