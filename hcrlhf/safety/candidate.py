"""Candidate selection under a pessimistic cost bound (SPEC.md §2.3).

During training the policy is optimised against the *pessimistic* bound

    U = μ̂ + k·σ̂,    k = C1·t(1−δ, n_c−1)/√n_c + C2·t(1−δ, n_s−1)/√n_s,

where μ̂, σ̂ are the mean and unbiased std of a window of recent per-response costs (n_c of them)
and n_s is the size of the future safety set. The pieces here:

* :func:`pessimistic_coefficient` — k.
* :func:`augmented_costs` — c̃ = c + k·(c² − 2·c·μ̂)/(2·σ̂): with μ̂, σ̂ held fixed at the policy's
  mean and std, E[c̃·∇log π] = ∇(μ + k·σ), so a score-function (REINFORCE/RLOO/PPO) estimator fed
  c̃ follows the gradient of the whole bound, σ included. (∇σ = ∇(E[c²] − μ²)/(2σ)
  = E[(c² − 2μc)·∇log π]/(2σ).)
* :class:`CostWindow` — the window of recent costs behind μ̂, σ̂.
* :class:`LagrangeMultiplier` — λ ≥ 0, updated in log space:
  log λ ← min(log λ + η·λ·(U − τ), log λ_max), after ``update_delay`` steps without update.
"""

from __future__ import annotations

import collections
import math

import numpy as np
from scipy import stats

from hcrlhf.safety._checks import as_real_array, check_count, check_delta, check_real, is_tensor

__all__ = ["pessimistic_coefficient", "augmented_costs", "CostWindow", "LagrangeMultiplier"]


def pessimistic_coefficient(n_candidate: int, n_safety: int, delta: float, c1: float = 4.0, c2: float = 2.0) -> float:
    """k = c1·t(1−δ, n_c−1)/√n_c + c2·t(1−δ, n_s−1)/√n_s (t(q, ν): Student-t quantile).

    The official HC-RLHF code uses c1 = 4, c2 = 2; the Seldonian toolkit's equivalent is c1 = 0,
    c2 = 2 (its "inflation factor"). ``n_candidate`` = n_c, the number of costs behind μ̂, σ̂;
    ``n_safety`` = n_s, the size of the future safety set; both ≥ 2.
    """
    fn = "pessimistic_coefficient"
    n_c = check_count(fn, "n_candidate", n_candidate)
    n_s = check_count(fn, "n_safety", n_safety)
    delta = check_delta(fn, delta)
    c1 = check_real(fn, "c1", c1, minimum=0.0)
    c2 = check_real(fn, "c2", c2, minimum=0.0)
    q = 1.0 - delta
    return float(c1 * stats.t.ppf(q, n_c - 1) / math.sqrt(n_c) + c2 * stats.t.ppf(q, n_s - 1) / math.sqrt(n_s))


def augmented_costs(costs, mean, std, coefficient):
    """Augmented costs c̃ = c + k·(c² − 2·c·μ̂)/(2·σ̂), elementwise, any shape.

    Args:
        costs: per-response costs (numpy array, list or torch tensor; any shape).
        mean: μ̂, held fixed (a number or a 0-dim tensor).
        std: σ̂ > 0, held fixed (a number or a 0-dim tensor).
        coefficient: k ≥ 0 (:func:`pessimistic_coefficient`).

    Returns:
        Same type as ``costs``: a tensor keeps its device and floating dtype (integer tensors become
        float32); numpy/list input gives a float64 array (float32 stays float32). No gradient is
        meant to flow through μ̂, σ̂: pass detached values.

    A numeric or CPU ``mean``/``std`` is checked (finite; std > 0); a CUDA tensor is used as is,
    without a host sync.
    """
    fn = "augmented_costs"
    coefficient = check_real(fn, "coefficient", coefficient, minimum=0.0)
    mean = _check_statistic(fn, "mean", mean)
    std = _check_statistic(fn, "std", std, positive=True)
    if is_tensor(costs):
        import torch

        if costs.is_complex():
            raise ValueError(f"{fn}: costs must be real, got dtype {costs.dtype}")
        if not costs.is_floating_point():
            costs = costs.to(torch.float32)
        if is_tensor(mean):
            mean = mean.to(device=costs.device, dtype=costs.dtype)
        if is_tensor(std):
            std = std.to(device=costs.device, dtype=costs.dtype)
    else:
        costs = as_real_array(fn, costs)
        mean = float(mean) if is_tensor(mean) else mean
        std = float(std) if is_tensor(std) else std
    return costs + coefficient * (costs * costs - 2.0 * costs * mean) / (2.0 * std)


def _check_statistic(fn: str, name: str, value, positive: bool = False):
    if is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"{fn}: {name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        if value.device.type != "cpu":
            return value.reshape(())  # checking would cost a device sync
        checked = value.detach().item()
    else:
        checked = value
    checked = check_real(fn, name, checked, minimum=0.0 if positive else None, strict=positive)
    return value.reshape(()) if is_tensor(value) else checked


class CostWindow:
    """The ``size`` most recent per-response costs (a FIFO window, SPEC §2.3's buffer).

    ``mean`` and ``std`` (unbiased, ddof = 1) are the μ̂, σ̂ of the pessimistic bound; ``n`` is
    the number of costs held, the n_c of :func:`pessimistic_coefficient`. Costs are stored on the
    host as float64.
    """

    def __init__(self, size: int):
        self.size = check_count("CostWindow", "size", size, minimum=1)
        self._values: collections.deque[float] = collections.deque(maxlen=self.size)

    def extend(self, costs) -> CostWindow:
        """Append costs (a number, a sequence, an array or a tensor of any shape), oldest first."""
        array = as_real_array("CostWindow.extend", costs)
        self._values.extend(array.astype(np.float64).reshape(-1).tolist())
        return self

    append = extend

    @property
    def n(self) -> int:
        return len(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def values(self) -> np.ndarray:
        """The costs held, oldest first, as a float64 array (a copy)."""
        return np.array(self._values, dtype=np.float64)

    @property
    def mean(self) -> float:
        if self.n < 1:
            raise ValueError("CostWindow.mean: the window is empty")
        return float(np.mean(self.values()))

    @property
    def std(self) -> float:
        """Unbiased standard deviation; needs n ≥ 2."""
        if self.n < 2:
            raise ValueError(f"CostWindow.std: needs at least 2 costs (n >= 2), has n = {self.n}")
        return float(np.std(self.values(), ddof=1))

    def pessimistic_bound(self, coefficient: float) -> float:
        """U = μ̂ + k·σ̂ for k = ``coefficient``."""
        coefficient = check_real("CostWindow.pessimistic_bound", "coefficient", coefficient, minimum=0.0)
        return self.mean + coefficient * self.std

    def state_dict(self) -> dict:
        return {"size": self.size, "values": list(self._values)}

    def load_state_dict(self, state: dict) -> None:
        self.size = check_count("CostWindow.load_state_dict", "size", state["size"], minimum=1)
        self._values = collections.deque(maxlen=self.size)
        if state["values"]:
            self.extend(state["values"])

    def __repr__(self) -> str:
        return f"CostWindow(size={self.size}, n={self.n})"


class LagrangeMultiplier:
    """λ ≥ 0 for the cost constraint, learned in log space (SPEC §2.3).

    ``step(bound, threshold)`` does, after the first ``update_delay`` calls (which change nothing):

        log λ ← min(log λ + lr·λ·(U − τ), log λ_max)

    i.e. plain SGD on log λ with the gradient λ·(U − τ) of λ·(U − τ): λ rises while the
    (pessimistic) bound U exceeds the threshold τ and falls otherwise, never below 0.

    Args:
        init: initial λ > 0 (official code: 1).
        lr: learning rate η ≥ 0 (official code: 0.01).
        max_value: cap λ_max ≥ init, or None for no cap (official code: 1e6).
        update_delay: number of initial ``step`` calls that do not update λ.
    """

    def __init__(self, init: float = 1.0, lr: float = 0.01, max_value: float | None = None, update_delay: int = 0):
        fn = "LagrangeMultiplier"
        init = check_real(fn, "init", init, minimum=0.0, strict=True)
        self.lr = check_real(fn, "lr", lr, minimum=0.0)
        if max_value is not None:
            max_value = check_real(fn, "max_value", max_value, minimum=init)
        self.max_value = max_value
        self.update_delay = check_count(fn, "update_delay", update_delay, minimum=0)
        self.log_value = math.log(init)
        self.steps = 0

    @property
    def value(self) -> float:
        """λ as a Python float."""
        try:
            return math.exp(self.log_value)
        except OverflowError:
            return math.inf

    def tensor(self, device=None, dtype=None):
        """λ as a 0-dim tensor (default dtype float32), e.g. for ``ops.safe_advantages`` without a host sync."""
        import torch

        return torch.tensor(self.value, dtype=dtype or torch.float32, device=device)

    def step(self, bound, threshold) -> float:
        """One update from the current bound U and the threshold τ; returns the new λ."""
        bound = check_real("LagrangeMultiplier.step", "bound", bound)
        threshold = check_real("LagrangeMultiplier.step", "threshold", threshold)
        self.steps += 1
        if self.steps <= self.update_delay:
            return self.value
        log_value = self.log_value + self.lr * self.value * (bound - threshold)
        if self.max_value is not None:
            log_value = min(log_value, math.log(self.max_value))
        self.log_value = log_value
        return self.value

    def state_dict(self) -> dict:
        return {
            "log_value": self.log_value,
            "lr": self.lr,
            "max_value": self.max_value,
            "update_delay": self.update_delay,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        fn = "LagrangeMultiplier.load_state_dict"
        self.log_value = check_real(fn, "state['log_value']", state["log_value"])
        self.lr = check_real(fn, "state['lr']", state["lr"], minimum=0.0)
        max_value = state["max_value"]
        self.max_value = (
            None if max_value is None else check_real(fn, "state['max_value']", max_value, minimum=0.0, strict=True)
        )
        self.update_delay = check_count(fn, "state['update_delay']", state["update_delay"], minimum=0)
        self.steps = check_count(fn, "state['steps']", state["steps"], minimum=0)

    def __repr__(self) -> str:
        return (
            f"LagrangeMultiplier(value={self.value:.6g}, lr={self.lr}, max_value={self.max_value}, steps={self.steps})"
        )
