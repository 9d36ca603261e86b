"""Candidate selection under a pessimistic cost bound (docs/method.md#candidate-selection).

During training the policy is optimised against the *pessimistic* bound

    U = μ̂ + k·σ̂,    k = C1·t(1−δ, n_c−1)/√n_c + C2·t(1−δ, n_s−1)/√n_s,

where μ̂, σ̂ are the mean and unbiased std of a window of recent per-response costs and n_s is the size
of the future safety set. n_c is the number of costs behind the estimate: the window's size for the
bound that moves λ; for the actor's k the official code uses the rows of one update (the trainer's
``actor_coefficient`` setting). The pieces here:

* :func:`pessimistic_coefficient` — k.
* :func:`augmented_costs` — c̃ = c + k·((c − μ̂)² − σ̂²)/(2·σ̂): with μ̂, σ̂ held fixed at the policy's
  mean and std, E[c̃·∇log π] = ∇(μ + k·σ), so a score-function (REINFORCE/RLOO/PPO) estimator fed
  c̃ follows the gradient of the whole bound, σ included. (∇σ = ∇(E[c²] − μ²)/(2σ)
  = E[(c² − 2μc)·∇log π]/(2σ); the centred form differs from the official c + k·(c² − 2cμ̂)/(2σ̂) by
  the constant k·(μ̂² − σ̂²)/(2σ̂), so it has the same gradient, and it stays near c, so that a score
  clip does not erase it when μ̂ is far from 0.)
* :class:`CostWindow` — the window of recent costs behind μ̂, σ̂.
* The multiplier λ, by one of two rules (:func:`make_multiplier`):
  :class:`PIDLagrangeMultiplier` (the default: a PID controller on log λ, bounded steps, λ ∈
  [λ_min, λ_max]) and :class:`LagrangeMultiplier` (the official rule
  log λ ← min(log λ + η·λ·(U − τ), log λ_max), which blows up and can die at exactly 0).
"""

from __future__ import annotations

import collections
import math

import numpy as np
from scipy import stats

from hcrlhf.safety._checks import as_real_array, check_count, check_delta, check_real, is_tensor

__all__ = ["pessimistic_coefficient", "augmented_costs", "CostWindow", "LagrangeMultiplier", "PIDLagrangeMultiplier",
           "make_multiplier", "MULTIPLIER_RULES"]

MULTIPLIER_RULES = ("pid", "official")


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
    """Augmented costs c̃ = c + k·((c − μ̂)² − σ̂²)/(2·σ̂), elementwise, any shape.

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
    centred = costs - mean
    return costs + coefficient * (centred * centred - std * std) / (2.0 * std)


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
    """The ``size`` most recent per-response costs (a FIFO window: the buffer of docs/method.md#candidate-selection).

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


class _LogSpaceMultiplier:
    """What both multiplier rules share: λ = exp(log λ) > 0, a start delay, a 0-dim tensor view, and state."""

    rule = ""

    def __init__(self, init: float, max_value: float | None, update_delay: int):
        fn = type(self).__name__
        self.init = check_real(fn, "init", init, minimum=0.0, strict=True)
        if max_value is not None:
            max_value = check_real(fn, "max_value", max_value, minimum=self.init)
        self.max_value = max_value
        self.update_delay = check_count(fn, "update_delay", update_delay, minimum=0)
        self.log_value = math.log(self.init)
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

    def _begin_step(self, bound, threshold, scale) -> tuple[float, float, float | None] | None:
        """Checked (bound, threshold, scale), or None while the start delay lasts."""
        fn = f"{type(self).__name__}.step"
        bound = check_real(fn, "bound", bound)
        threshold = check_real(fn, "threshold", threshold)
        if scale is not None:
            scale = check_real(fn, "scale", scale, minimum=0.0)
        self.steps += 1
        if self.steps <= self.update_delay:
            return None
        return bound, threshold, scale

    def state_dict(self) -> dict:
        return {"rule": self.rule, "log_value": self.log_value, "init": self.init, "max_value": self.max_value,
                "update_delay": self.update_delay, "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        fn = f"{type(self).__name__}.load_state_dict"
        if state.get("rule", self.rule) != self.rule:
            raise ValueError(f"{fn}: the state is of the {state['rule']!r} rule, this multiplier is {self.rule!r}")
        self.log_value = check_real(fn, "state['log_value']", state["log_value"])
        self.init = check_real(fn, "state['init']", state.get("init", self.init), minimum=0.0, strict=True)
        max_value = state["max_value"]
        self.max_value = (
            None if max_value is None else check_real(fn, "state['max_value']", max_value, minimum=0.0, strict=True)
        )
        self.update_delay = check_count(fn, "state['update_delay']", state["update_delay"], minimum=0)
        self.steps = check_count(fn, "state['steps']", state["steps"], minimum=0)


class LagrangeMultiplier(_LogSpaceMultiplier):
    """λ ≥ 0 by the official HC-RLHF / Safe RLHF rule (docs/method.md#candidate-selection): plain SGD on log λ.

    ``step(bound, threshold)`` does, after the first ``update_delay`` calls (which change nothing):

        log λ ← min(log λ + lr·λ·(U − τ), log λ_max)

    i.e. the gradient λ·(U − τ) of λ·(U − τ) with respect to log λ: λ rises while the (pessimistic) bound
    U exceeds the threshold τ and falls otherwise. Kept for fidelity and comparison; its step grows with λ
    (dλ/dt ∝ λ², so λ reaches λ_max within a few steps once λ ≫ 1/(lr·(U − τ))) and one step of
    −lr·λ_max·(U − τ) underflows exp to exactly 0, where it stays (λ = 0 is absorbing).
    :class:`PIDLagrangeMultiplier` is the default of the trainer.

    Args:
        init: initial λ > 0 (official code: 1).
        lr: learning rate η ≥ 0 (official code: 0.01).
        max_value: cap λ_max ≥ init, or None for no cap (official code: 1e6).
        update_delay: number of initial ``step`` calls that do not update λ.
    """

    rule = "official"

    def __init__(self, init: float = 1.0, lr: float = 0.01, max_value: float | None = None, update_delay: int = 0):
        super().__init__(init, max_value, update_delay)
        self.lr = check_real("LagrangeMultiplier", "lr", lr, minimum=0.0)

    def step(self, bound, threshold, scale=None) -> float:
        """One update from the current bound U and the threshold τ; returns the new λ. (``scale`` is
        accepted for a common interface with :class:`PIDLagrangeMultiplier` and ignored.)"""
        checked = self._begin_step(bound, threshold, scale)
        if checked is None:
            return self.value
        bound, threshold, _ = checked
        log_value = self.log_value + self.lr * self.value * (bound - threshold)
        if self.max_value is not None:
            log_value = min(log_value, math.log(self.max_value))
        self.log_value = log_value
        return self.value

    def state_dict(self) -> dict:
        return {**super().state_dict(), "lr": self.lr}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.lr = check_real("LagrangeMultiplier.load_state_dict", "state['lr']", state["lr"], minimum=0.0)

    def __repr__(self) -> str:
        return (f"LagrangeMultiplier(value={self.value:.6g}, lr={self.lr}, max_value={self.max_value}, "
                f"steps={self.steps})")


class PIDLagrangeMultiplier(_LogSpaceMultiplier):
    """λ > 0 by a PID controller on log λ with a normalised, clipped error (the default rule).

    After Stooke, Achiam & Abbeel (2020), *Responsive Safety in Reinforcement Learning by PID Lagrangian
    Methods*, run in log space so that λ stays in [λ_min, λ_max] and the gains do not depend on λ's scale.
    With the error of step t

        e_t = clip((U_t − τ) / s_t, −below, +above)        s_t = ``scale`` (e.g. σ̂ of the window)

    (U − τ in units of the cost's spread: the same gains work for any cost model's scale), the update is

        I_t     = clip(I_{t−1} + ki·e_t,  log λ_min − log λ_0,  log λ_max − log λ_0)     # anti-windup
        log λ_t = clip(log λ_0 + I_t + kp·e_t + kd·(e_t − e_{t−1}),  log λ_min,  log λ_max)

    Why this rule (measured on the built-in demo, see the README): the official step λ·η·(U − τ) grows
    with λ and dies at 0; here one step moves log λ by at most ki·above + (kp + 2·kd)·(below + above),
    whatever λ is, so λ cannot blow up in a few steps, never reaches 0, and never exceeds λ_max. The integral is clamped
    to the range λ can take, so it holds no hidden "debt": when U crosses τ, the very next step moves
    λ the other way (the integral term at once; the proportional term adds the size of the change of e).
    With kp = kd = 0 it is a bounded exponentiated-gradient step on log λ with a floor.

    Args:
        init: λ_0 > 0, the initial λ.
        ki: integral gain ≥ 0 (log λ per step at an error of one unit).
        kp: proportional gain ≥ 0.
        kd: derivative gain ≥ 0 (on the change of e; 0: off).
        min_value: floor λ_min, 0 < λ_min ≤ init.
        max_value: cap λ_max ≥ init (None: no cap).
        error_clip: the error is clipped to [−below, +above] given as a pair (below, above), or ±x given as
            one number x (all > 0). The default (0.25, 1) lets λ rise four times faster than it falls.
        update_delay: number of initial ``step`` calls that do not update λ.
    """

    rule = "pid"

    def __init__(self, init: float = 1.0, *, ki: float = 0.05, kp: float = 0.5, kd: float = 0.0,
                 min_value: float = 0.01, max_value: float | None = 1e6, error_clip=(0.25, 1.0),
                 update_delay: int = 0):
        fn = "PIDLagrangeMultiplier"
        super().__init__(init, max_value, update_delay)
        self.ki = check_real(fn, "ki", ki, minimum=0.0)
        self.kp = check_real(fn, "kp", kp, minimum=0.0)
        self.kd = check_real(fn, "kd", kd, minimum=0.0)
        self.min_value = check_real(fn, "min_value", min_value, minimum=0.0, strict=True)
        if self.min_value > self.init:
            raise ValueError(f"{fn}: min_value ({self.min_value}) must be <= init ({self.init})")
        self.error_clip = _error_clip(fn, error_clip)
        self.integral = 0.0
        self.last_error = 0.0

    def _log_bounds(self) -> tuple[float, float]:
        return math.log(self.min_value), (math.inf if self.max_value is None else math.log(self.max_value))

    def error(self, bound: float, threshold: float, scale: float | None) -> float:
        """e = clip((U − τ)/s, −below, +above); s = 1 when ``scale`` is None, floored at 1e-8."""
        scale = 1.0 if scale is None else max(scale, 1e-8)
        below, above = self.error_clip
        return min(max((bound - threshold) / scale, -below), above)

    def step(self, bound, threshold, scale=None) -> float:
        """One update from the bound U, the threshold τ and the error scale s (e.g. σ̂ of the window; None:
        1, i.e. U − τ in cost units); returns the new λ."""
        checked = self._begin_step(bound, threshold, scale)
        if checked is None:
            return self.value
        error = self.error(*checked)
        low, high = self._log_bounds()
        log_init = math.log(self.init)
        self.integral = min(max(self.integral + self.ki * error, low - log_init), high - log_init)
        log_value = log_init + self.integral + self.kp * error + self.kd * (error - self.last_error)
        self.log_value = min(max(log_value, low), high)
        self.last_error = error
        return self.value

    def state_dict(self) -> dict:
        return {**super().state_dict(), "ki": self.ki, "kp": self.kp, "kd": self.kd, "min_value": self.min_value,
                "error_clip": list(self.error_clip), "integral": self.integral, "last_error": self.last_error}

    def load_state_dict(self, state: dict) -> None:
        fn = "PIDLagrangeMultiplier.load_state_dict"
        super().load_state_dict(state)
        for name in ("ki", "kp", "kd"):
            setattr(self, name, check_real(fn, f"state[{name!r}]", state[name], minimum=0.0))
        self.min_value = check_real(fn, "state['min_value']", state["min_value"], minimum=0.0, strict=True)
        self.error_clip = _error_clip(fn, state["error_clip"])
        self.integral = check_real(fn, "state['integral']", state["integral"])
        self.last_error = check_real(fn, "state['last_error']", state["last_error"])

    def __repr__(self) -> str:
        return (f"PIDLagrangeMultiplier(value={self.value:.6g}, ki={self.ki}, kp={self.kp}, kd={self.kd}, "
                f"min_value={self.min_value}, max_value={self.max_value}, steps={self.steps})")


def _error_clip(fn: str, value) -> tuple[float, float]:
    """(below, above) from a number (symmetric) or a pair; both > 0."""
    if isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise ValueError(f"{fn}: error_clip must be a number or a pair (below, above), got {value!r}")
        below, above = value
    else:
        below = above = value
    return (check_real(fn, "error_clip", below, minimum=0.0, strict=True),
            check_real(fn, "error_clip", above, minimum=0.0, strict=True))


def make_multiplier(rule: str = "pid", *, init: float = 1.0, lr: float = 0.01, ki: float = 0.05, kp: float = 0.5,
                    kd: float = 0.0, min_value: float = 0.01, max_value: float | None = 1e6,
                    error_clip=(0.25, 1.0), update_delay: int = 0):
    """The multiplier of ``rule``: "pid" → :class:`PIDLagrangeMultiplier` (``ki``, ``kp``, ``kd``,
    ``min_value``), "official" → :class:`LagrangeMultiplier` (``lr``). Settings of the other rule are
    ignored."""
    if rule == "pid":
        return PIDLagrangeMultiplier(init, ki=ki, kp=kp, kd=kd, min_value=min_value, max_value=max_value,
                                     error_clip=error_clip, update_delay=update_delay)
    if rule == "official":
        return LagrangeMultiplier(init, lr=lr, max_value=max_value, update_delay=update_delay)
    raise ValueError(f"make_multiplier: rule must be one of {MULTIPLIER_RULES}, got {rule!r}")
