"""Cheap argument checks shared by the ops: every error names the argument and what was expected.

None of these reads tensor values on a device, so none of them synchronises with one. The two that
read CPU values (label ranges, a CPU λ tensor) become runtime asserts (``torch._assert_async``)
while torch.compile traces, so that they do not break the graph (docs/ops.md#torchcompile).
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
KL_ESTIMATORS = ("k1", "k2", "k3")
# Smallest temperature the log-prob ops accept (docs/ops.md#token_logprobs): the gradient w.r.t.
# the logits scales as 1/T and overflows float16 (max 65504) below ~1.5e-5 for a unit upstream
# gradient, and below ~1e-4 softmax(logits / T) of bf16 logits is already one-hot in float32 (the
# bf16 spacing 2^-7 of logits in [1, 2) over T exceeds 87.3, where float32 exp underflows).
MIN_TEMPERATURE = 1e-4


def _finite(value) -> bool:
    """math.isfinite by comparisons, which torch.compile also evaluates for a symbolic (dynamic)
    float; NaN compares false."""
    return -math.inf < value < math.inf


def check_tensor(op: str, name: str, x, *, ndim: int | None = None, floating: bool = True) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    return x


def check_mask(op: str, mask, shape: tuple[int, ...]) -> torch.Tensor:
    check_tensor(op, "mask", mask, ndim=len(shape), floating=False)
    if mask.dtype.is_complex:
        raise TypeError(f"{op}: mask must be bool or 0/1 numbers, got {mask.dtype}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{op}: mask must have shape {shape} (like the per-token inputs), got {tuple(mask.shape)}")
    return mask


def check_same_shape(op: str, shape: tuple[int, ...], **tensors: torch.Tensor) -> None:
    for name, x in tensors.items():
        if tuple(x.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(x.shape)}")


def check_same_device(op: str, **tensors: torch.Tensor) -> torch.device:
    devices = {name: x.device for name, x in tensors.items()}
    first = next(iter(devices.values()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{op}: all tensors must be on one device; {name} is on {device}, not {first}")
    return first


def check_nonneg_scalar(op: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    if not _finite(value) or value < 0:
        raise ValueError(f"{op}: {name} must be finite and >= 0, got {value}")


def check_unit_interval(op: str, name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{op}: {name} must be a number in [0, 1], got {value!r}")


def check_kl_estimator(op: str, kl_estimator) -> None:
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"{op}: kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")


def check_score_clip(op: str, score_clip) -> None:
    if score_clip is None:
        return
    if isinstance(score_clip, bool) or not isinstance(score_clip, numbers.Real) or not (
        _finite(score_clip) and score_clip > 0
    ):
        raise ValueError(f"{op}: score_clip must be None or a finite number > 0, got {score_clip!r}")


def check_lagrange_multiplier(op: str, value, device: torch.device):
    """λ may be a Python number or a 0-dim tensor (on the CPU or on the inputs' device).

    A CPU tensor is read and checked (that costs no device sync) and returned as a float, so a
    kernel never gets a host pointer; a CUDA tensor is not read on the host — the kernels turn a
    negative or non-finite CUDA λ into NaN outputs instead. While torch.compile traces, a CPU
    tensor is checked by a runtime assert in the graph and returned as it is (the custom ops read
    it when they run).
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(
                f"{op}: lagrange_multiplier must be a float or a 0-dim tensor, got shape {tuple(value.shape)}"
            )
        if not value.dtype.is_floating_point:
            raise TypeError(f"{op}: lagrange_multiplier tensor must be floating point, got {value.dtype}")
        if value.device.type == "cpu":
            if torch.compiler.is_compiling():
                # no host read inside a graph: a runtime assert (RuntimeError, same text); the
                # tensor goes on to the op, which reads it when it runs
                torch._assert_async(torch.isfinite(value) & (value >= 0),
                                    f"{op}: lagrange_multiplier must be finite and >= 0")
                return value
            value = float(value)
            check_nonneg_scalar(op, "lagrange_multiplier", value)
            return value
        if value.device != device:
            raise ValueError(
                f"{op}: lagrange_multiplier is on {value.device} but the inputs are on {device}"
            )
        return value
    check_nonneg_scalar(op, "lagrange_multiplier", value)
    return float(value)


def result_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any floating input is float64 (the reference's verification mode), else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def check_positive_scalar(op: str, name: str, value) -> float:
    """A finite real number > 0 (e.g. a temperature); returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{op}: {name} must be a real number, got {type(value).__name__}")
    if not _finite(value) or value <= 0:
        raise ValueError(f"{op}: {name} must be finite and > 0, got {value}")
    return float(value)


def check_temperature(op: str, temperature) -> float:
    """A real number >= MIN_TEMPERATURE (ValueError naming ``temperature`` below it); returns it as a float."""
    temperature = check_positive_scalar(op, "temperature", temperature)
    if temperature < MIN_TEMPERATURE:
        raise ValueError(
            f"{op}: temperature must be >= {MIN_TEMPERATURE:g}, got {temperature:g}: below that the gradient "
            "(which scales as 1/temperature) overflows float16 and the distribution is one-hot in float32 for "
            "bf16 logits; for greedy decoding score the argmax token directly (its log-prob is 0)"
        )
    return temperature


def has_internal_overlap(x: torch.Tensor) -> bool:
    """True when two elements of x may share memory: a stride-0 (expanded) dim, or strides that
    interleave. Conservative: sorted by stride, each dim must step past everything the smaller
    dims reach; layouts that fail this are reported as overlapping even if they happen not to."""
    reach = 0
    for stride, size in sorted((abs(st), n) for n, st in zip(x.shape, x.stride()) if n > 1):
        if stride <= reach:
            return True
        reach += stride * (size - 1)
    return False


def check_inplace_target(op: str, name: str, x: torch.Tensor) -> None:
    """The tensor an ``inplace_backward`` may overwrite with its gradient: not a leaf that requires
    grad (nor a view of one), and no memory shared between its elements."""
    if not x.requires_grad:
        return  # no backward will run
    base = x._base
    if x.is_leaf or (base is not None and base.is_leaf and base.requires_grad):
        what = "is a leaf tensor that requires grad" if x.is_leaf else "is a view of a leaf tensor that requires grad"
        raise ValueError(
            f"{op}: inplace_backward=True would overwrite the data of {name}, which {what}; "
            "pass inplace_backward=False (or a non-leaf copy such as logits * 1)"
        )
    if has_internal_overlap(x):
        raise ValueError(
            f"{op}: inplace_backward=True needs {name} whose elements do not share memory, got strides "
            f"{tuple(x.stride())} for shape {tuple(x.shape)} (an expanded / stride-0 or overlapping view: the "
            "gradients of the aliased rows would overwrite each other); pass inplace_backward=False"
        )


def check_labels(op: str, labels, shape: tuple[int, ...], vocab: int, ignore_index: int, *,
                 read_values: bool) -> torch.Tensor:
    """Integer class labels of `shape`, each in [0, vocab) or equal to `ignore_index`.

    The range check reads the values, so callers pass ``read_values=False`` for CUDA tensors unless
    asked to (it would synchronise with the device); kernels then turn a bad label into NaN.
    """
    check_tensor(op, "labels", labels, floating=False)
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{op}: labels must be int64 (or int32), got {labels.dtype}")
    if tuple(labels.shape) != tuple(shape):
        raise ValueError(f"{op}: labels must have shape {tuple(shape)} (the leading dims of the logits), "
                         f"got {tuple(labels.shape)}")
    if read_values and labels.numel():
        bad = ((labels < 0) | (labels >= vocab)) & (labels != ignore_index)
        if torch.compiler.is_compiling():
            # no host read inside a graph: a runtime assert (RuntimeError). Its text is a constant,
            # without V, ignore_index or the position, which may be symbolic while tracing.
            torch._assert_async(~bad.any(), f"{op}: labels must lie in [0, V) or equal ignore_index")
        elif bool(bad.any()):
            index = tuple(int(i) for i in bad.nonzero()[0])
            raise ValueError(f"{op}: labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}; "
                             f"labels{list(index)} = {int(labels[index])}")
    return labels
