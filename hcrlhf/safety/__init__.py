"""The statistical safety stage of HC-RLHF (docs/method.md, candidate selection to the δ ledger).

* Confidence bounds (:mod:`hcrlhf.safety.bounds`): :func:`upper_bound` with methods ``ttest``
  (the paper's default, asymptotic), ``hoeffding``, ``bernstein``, ``betting`` and
  ``clopper_pearson`` (exact), and :func:`predicted_upper_bound` for candidate selection.
* Candidate selection (:mod:`hcrlhf.safety.candidate`): :func:`pessimistic_coefficient`,
  :func:`augmented_costs`, :class:`CostWindow`, the multiplier rules :class:`PIDLagrangeMultiplier`
  (default) and :class:`LagrangeMultiplier` (official), :func:`make_multiplier`.
* The safety test (:mod:`hcrlhf.safety.test`): :func:`safety_test` → :class:`SafetyTestResult`.
* Keeping D_s honest (:mod:`hcrlhf.safety.ledger`): :func:`fingerprint` (of prompts in the form
  :func:`canonical_prompt`), :func:`distinct_prompts`, :func:`assert_disjoint`, :class:`SafetyLedger` (by
  default the per-user :func:`default_ledger_path`, opened with :func:`open_ledger`).
* Guarantee validation on synthetic problems: :mod:`hcrlhf.safety.validate`.

torch is optional here: tensors are accepted wherever costs are, but nothing imports torch until
a tensor is asked for (:meth:`LagrangeMultiplier.tensor`).
"""

from hcrlhf.safety._checks import EXACT_METHODS, METHODS, validity
from hcrlhf.safety.bounds import predicted_upper_bound, predicted_upper_bounds, upper_bound, upper_bounds
from hcrlhf.safety.candidate import (
    MULTIPLIER_RULES,
    CostWindow,
    LagrangeMultiplier,
    PIDLagrangeMultiplier,
    augmented_costs,
    make_multiplier,
    pessimistic_coefficient,
)
from hcrlhf.safety.ledger import (
    OVERLAP_LIMIT,
    BudgetExceededError,
    OverlappingSafetySetError,
    SafetyLedger,
    assert_disjoint,
    canonical_prompt,
    default_ledger_path,
    distinct_prompts,
    fingerprint,
    open_ledger,
)
from hcrlhf.safety.test import NO_SOLUTION_FOUND, PASS, SafetyTestResult, safety_test

__all__ = [
    "METHODS",
    "EXACT_METHODS",
    "validity",
    "upper_bound",
    "upper_bounds",
    "predicted_upper_bound",
    "predicted_upper_bounds",
    "pessimistic_coefficient",
    "augmented_costs",
    "CostWindow",
    "LagrangeMultiplier",
    "PIDLagrangeMultiplier",
    "make_multiplier",
    "MULTIPLIER_RULES",
    "safety_test",
    "SafetyTestResult",
    "PASS",
    "NO_SOLUTION_FOUND",
    "fingerprint",
    "canonical_prompt",
    "assert_disjoint",
    "SafetyLedger",
    "BudgetExceededError",
    "OverlappingSafetySetError",
    "OVERLAP_LIMIT",
    "default_ledger_path",
    "open_ledger",
    "distinct_prompts",
]
