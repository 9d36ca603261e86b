"""Argument checks and conversions shared by the safety stage.

Every error names the function and the argument. torch is never imported here: a tensor can only
reach these functions if the caller already imported torch, so ``sys.modules`` tells whether an
argument may be one (this keeps ``hcrlhf.safety`` importable, e.g. by the ledger, without torch).
"""

from __future__ import annotations

import math
import numbers
import sys

import numpy as np

#: Methods whose bound holds at every finite n (given i.i.d. costs in the stated range).
EXACT_METHODS = ("hoeffding", "bernstein", "betting", "clopper_pearson")
#: All upper-bound methods; ``ttest`` (the paper's default) is only asymptotically valid.
METHODS = ("ttest",) + EXACT_METHODS
#: Exact methods that need a known cost range (Clopper–Pearson works on 0/1 costs by definition).
RANGE_METHODS = ("hoeffding", "bernstein", "betting")
#: The fewest costs (safety prompts, one response each) any method's bound is defined for: the t-test and
#: Bernstein divide by n − 1, and every bound is refused below n = 2 (:func:`as_cost_array`).
MIN_COSTS = 2


def is_tensor(x) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def validity(method: str) -> str:
    """ "exact" for the finite-sample methods, "asymptotic" for the t-test."""
    return "asymptotic" if method == "ttest" else "exact"


def check_method(fn: str, method) -> str:
    if method not in METHODS:
        raise ValueError(f"{fn}: method must be one of {METHODS}, got {method!r}")
    return method


def check_delta(fn: str, delta, name: str = "delta") -> float:
    if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0.0 < float(delta) < 1.0:
        raise ValueError(f"{fn}: {name} must be a number in the open interval (0, 1), got {delta!r}")
    return float(delta)


def check_real(fn: str, name: str, value, *, minimum: float | None = None, strict: bool = False) -> float:
    """A finite real number (a Python/numpy number or a one-element tensor), optionally bounded below."""
    if is_tensor(value):
        if value.numel() != 1:
            raise ValueError(f"{fn}: {name} must be a single number, got a tensor of shape {tuple(value.shape)}")
        value = value.detach().cpu().item()
    elif isinstance(value, np.ndarray) and value.size == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{fn}: {name} must be a finite real number, got {value!r}")
    value = float(value)
    if minimum is not None and (value < minimum or (strict and value == minimum)):
        relation = ">" if strict else ">="
        raise ValueError(f"{fn}: {name} must be {relation} {minimum}, got {value}")
    return value


def check_count(fn: str, name: str, value, minimum: int = 2) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{fn}: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_cost_range(fn: str, cost_range) -> tuple[float, float] | None:
    if cost_range is None:
        return None
    try:
        low, high = cost_range
    except (TypeError, ValueError):
        raise ValueError(f"{fn}: cost_range must be a pair (a, b) with a < b, got {cost_range!r}") from None
    for value in (low, high):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise ValueError(f"{fn}: cost_range must hold two finite numbers, got {cost_range!r}")
    if not low < high:
        raise ValueError(f"{fn}: cost_range must be (a, b) with a < b, got {cost_range!r}")
    return float(low), float(high)


def as_cost_array(fn: str, costs, name: str = "costs", *, ndim: int = 1, min_n: int = 2) -> np.ndarray:
    """Costs as a float64 numpy array of ``ndim`` dimensions (last axis = samples), checked finite.

    Accepts numpy arrays, (nested) lists and torch tensors of any real dtype (tensors are detached
    and copied to the host).
    """
    if is_tensor(costs):
        if costs.is_complex():
            raise ValueError(f"{fn}: {name} must be real, got a tensor of dtype {costs.dtype}")
        import torch

        costs = costs.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        array = np.asarray(costs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{fn}: {name} must be an array of numbers ({error})") from None
    if array.dtype == object or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ValueError(f"{fn}: {name} must be an array of real numbers, got dtype {array.dtype}")
    if np.iscomplexobj(array):
        raise ValueError(f"{fn}: {name} must be real, got dtype {array.dtype}")
    array = array.astype(np.float64, copy=False)
    if array.ndim != ndim:
        what = "a 1-D sequence" if ndim == 1 else f"a {ndim}-D array (trials, samples)"
        raise ValueError(f"{fn}: {name} must be {what}, got shape {array.shape}")
    if array.shape[-1] < min_n:
        raise ValueError(f"{fn}: {name} must hold at least {min_n} values (n >= {min_n}), got n = {array.shape[-1]}")
    if not np.all(np.isfinite(array)):
        bad = np.flatnonzero(~np.isfinite(array.reshape(-1)))[:5].tolist()
        raise ValueError(f"{fn}: {name} must be finite; NaN or inf at flat index {bad}")
    return array


def as_real_array(fn: str, values, name: str = "costs") -> np.ndarray:
    """Any-shape real numpy array (float dtypes kept, others made float64), checked finite."""
    if is_tensor(values):
        import torch

        if values.is_complex():
            raise ValueError(f"{fn}: {name} must be real, got a tensor of dtype {values.dtype}")
        values = values.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        array = np.asarray(values)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{fn}: {name} must be an array of numbers ({error})") from None
    if (
        array.dtype == object
        or np.iscomplexobj(array)
        or not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_)
    ):
        raise ValueError(f"{fn}: {name} must be real numbers, got dtype {array.dtype}")
    if not np.issubdtype(array.dtype, np.floating):
        array = array.astype(np.float64)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{fn}: {name} must be finite (no NaN or inf)")
    return array


def check_in_range(fn: str, costs: np.ndarray, cost_range: tuple[float, float], name: str = "costs") -> None:
    low, high = cost_range
    outside = (costs < low) | (costs > high)
    if np.any(outside):
        flat = np.flatnonzero(outside.reshape(-1))
        raise ValueError(
            f"{fn}: {name} must lie in cost_range [{low}, {high}]; {flat.size} value(s) outside, e.g. "
            f"{costs.reshape(-1)[flat[0]]!r} at flat index {int(flat[0])}"
        )


def check_binary(fn: str, costs: np.ndarray, name: str = "costs") -> None:
    not_binary = (costs != 0.0) & (costs != 1.0)
    if np.any(not_binary):
        flat = np.flatnonzero(not_binary.reshape(-1))
        raise ValueError(
            f"{fn}: clopper_pearson needs 0/1 {name} (the unsafe indicator); {flat.size} value(s) are "
            f"neither, e.g. {costs.reshape(-1)[flat[0]]!r} at flat index {int(flat[0])}"
        )


def check_method_range(fn: str, method: str, cost_range):
    """The cost range a method works with: required for hoeffding/bernstein/betting, (0, 1) for CP."""
    cost_range = check_cost_range(fn, cost_range)
    if method in RANGE_METHODS and cost_range is None:
        raise ValueError(
            f"{fn}: method {method!r} is exact only for costs in a known range; pass cost_range=(a, b) "
            "(map unbounded scores through a fixed monotone squashing chosen before seeing the safety data)"
        )
    if method == "clopper_pearson":
        if cost_range not in (None, (0.0, 1.0)):
            raise ValueError(
                f"{fn}: clopper_pearson works on 0/1 costs; cost_range must be None or (0, 1), got {cost_range!r}"
            )
        cost_range = (0.0, 1.0)
    return cost_range


def check_prompt_texts(fn: str, prompts, *, name: str = "prompts", source=None) -> list[str]:
    """The prompts as a list, every one a string with some text: an empty or whitespace-only prompt (or a
    non-string) is refused, naming its index (0-based) and ``source`` (the file it came from) when known."""
    if isinstance(prompts, (str, bytes)):
        raise TypeError(f"{fn}: {name} must be a collection of strings, not a single {type(prompts).__name__}")
    texts = list(prompts)
    where = f" of {source}" if source is not None else ""
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{fn}: {name}[{index}]{where} must be a str, got {type(text).__name__}")
        if not text.strip():
            raise ValueError(f"{fn}: {name}[{index}]{where} is empty{' (whitespace only)' if text else ''}: every "
                             "prompt needs text")
    return texts


def check_safety_set_size(fn: str, n: int, method: str, *, name: str = "the safety set") -> None:
    """Refuse a safety set too small for ``method``'s bound (:data:`MIN_COSTS`), before any sampling."""
    needed = MIN_COSTS
    if n < needed:
        raise ValueError(f"{fn}: {name} holds {n} distinct prompt{'' if n == 1 else 's'}; the safety test "
                         f"({method}) needs at least {needed} (one cost per prompt)")
