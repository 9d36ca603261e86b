"""The safety test (docs/method.md#the-safety-test): verdicts, the result's JSON round trip, and the ledger hook."""

import json

import numpy as np
import pytest

from hcrlhf.safety import (
    METHODS,
    NO_SOLUTION_FOUND,
    PASS,
    BudgetExceededError,
    SafetyLedger,
    SafetyTestResult,
    fingerprint,
    safety_test,
    upper_bound,
)

SAFETY_PROMPTS = [f"safety prompt {i}" for i in range(40)]


def _costs(method, n=40, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.random(n) < 0.1).astype(float) if method == "clopper_pearson" else rng.beta(1, 8, n)


def _range(method):
    return None if method == "clopper_pearson" else (0.0, 1.0)


@pytest.mark.parametrize("method", METHODS)
def test_verdict_is_ucb_at_most_threshold(method):
    costs = _costs(method)
    ucb = upper_bound(costs, 0.1, method, _range(method))
    passed = safety_test(costs, threshold=ucb, delta=0.1, method=method, cost_range=_range(method))
    assert passed.passed and passed.verdict == PASS and bool(passed)
    assert passed.ucb == ucb and passed.n == 40
    assert passed.mean == pytest.approx(costs.mean()) and passed.std == pytest.approx(costs.std(ddof=1))
    assert passed.validity == ("asymptotic" if method == "ttest" else "exact")
    failed = safety_test(costs, threshold=np.nextafter(ucb, -1.0), delta=0.1, method=method, cost_range=_range(method))
    assert not failed.passed and failed.verdict == NO_SOLUTION_FOUND and not bool(failed)


@pytest.mark.parametrize("method", METHODS)
def test_result_json_round_trip(method):
    result = safety_test(_costs(method), 0.2, 0.05, method, _range(method), safety_set=SAFETY_PROMPTS)
    text = result.to_json()
    data = json.loads(text)
    assert data["verdict"] in (PASS, NO_SOLUTION_FOUND) and data["fingerprint"] == fingerprint(SAFETY_PROMPTS)
    restored = SafetyTestResult.from_json(text)
    assert restored == result and restored.ucb == result.ucb  # floats exact
    assert SafetyTestResult.from_json(result.to_json(indent=None)) == result


def test_result_from_json_rejects_inconsistent_or_unknown_fields():
    result = safety_test(_costs("ttest"), 0.5, 0.1)
    data = json.loads(result.to_json())
    tampered = dict(data, verdict=NO_SOLUTION_FOUND if result.passed else PASS)
    with pytest.raises(ValueError, match="verdict"):
        SafetyTestResult.from_json(json.dumps(tampered))
    with pytest.raises(ValueError, match="validity"):
        SafetyTestResult.from_json(json.dumps(dict(data, validity="exact")))
    with pytest.raises(ValueError, match="unknown keys"):
        SafetyTestResult.from_json(json.dumps(dict(data, extra=1)))
    with pytest.raises(ValueError, match="missing keys"):
        SafetyTestResult.from_json(json.dumps({k: v for k, v in data.items() if k != "ucb"}))


def test_safety_test_spends_delta_in_the_ledger(tmp_path):
    ledger = SafetyLedger(tmp_path / "ledger.json", total_delta=0.1)
    costs = _costs("betting")
    first = safety_test(costs, 0.3, 0.05, "betting", (0, 1), ledger=ledger, safety_set=SAFETY_PROMPTS)
    assert first.fingerprint == fingerprint(SAFETY_PROMPTS)
    assert ledger.spent(first.fingerprint) == pytest.approx(0.05)
    # The same set by fingerprint; Bonferroni: a second candidate gets the remaining 0.05.
    safety_test(costs, 0.3, 0.05, "betting", (0, 1), ledger=ledger, safety_set=first.fingerprint, label="candidate 2")
    assert [t["label"] for t in ledger.tests(first.fingerprint)][-1] == "candidate 2"
    with pytest.raises(BudgetExceededError):
        safety_test(costs, 0.3, 0.01, "betting", (0, 1), ledger=ledger, safety_set=SAFETY_PROMPTS)
    assert len(ledger.tests(first.fingerprint)) == 2
    with pytest.raises(ValueError, match=r"\bsafety_set\b"):
        safety_test(costs, 0.3, 0.01, "betting", (0, 1), ledger=ledger)


def test_bad_input_is_refused_before_spending(tmp_path):
    ledger = SafetyLedger(tmp_path / "ledger.json", total_delta=0.1)
    with pytest.raises(ValueError, match=r"\bcosts\b"):
        safety_test([0.1, 1.5], 0.3, 0.05, "betting", (0, 1), ledger=ledger, safety_set=SAFETY_PROMPTS)
    assert ledger.spent(fingerprint(SAFETY_PROMPTS)) == 0.0


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(costs=[0.2]), "costs"),
        (dict(costs=[0.2, float("nan")]), "costs"),
        (dict(threshold=float("nan")), "threshold"),
        (dict(delta=1.2), "delta"),
        (dict(method="normal"), "method"),
        (dict(method="betting"), "cost_range"),
        (dict(safety_set="not a fingerprint"), "fingerprint"),
    ],
)
def test_safety_test_bad_input(kwargs, name):
    args = dict(costs=[0.1, 0.3, 0.2], threshold=0.5, delta=0.1) | kwargs
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        safety_test(**args)


def test_a_safety_set_with_copies_is_refused_before_spending(tmp_path):
    """A copy of a prompt would count twice in n (and narrow the bound): refused, nothing spent."""
    ledger = SafetyLedger(tmp_path / "ledger.json", total_delta=0.1)
    copies = SAFETY_PROMPTS[:10] * 4
    costs = [0.1 * (i % 5) for i in range(len(copies))]
    with pytest.raises(ValueError, match="copies"):
        safety_test(costs, 0.3, 0.05, "betting", (0, 1), ledger=ledger, safety_set=copies)
    with pytest.raises(ValueError, match="one cost per safety prompt"):
        safety_test(costs, 0.3, 0.05, "betting", (0, 1), ledger=ledger, safety_set=SAFETY_PROMPTS[:10])
    assert not (tmp_path / "ledger.json").exists()
