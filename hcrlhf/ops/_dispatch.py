"""Choosing the implementation of an op: ``impl="auto" | "triton" | "cpp" | "torch"``.

``auto`` picks Triton for CUDA tensors, the C++ extension for CPU tensors when it is built, and
the pure-torch reference otherwise. The environment variable ``HCRLHF_IMPL`` replaces ``auto``
(an explicit ``impl=`` argument in code always wins). An impl that was asked for explicitly and
cannot run raises :class:`ImplUnavailableError` naming the alternatives; ``auto`` never falls
back silently to something that computes a different result.
"""

from __future__ import annotations

import os

import torch

IMPLS = ("auto", "triton", "cpp", "torch")


class ImplUnavailableError(RuntimeError):
    """An explicitly requested implementation cannot run for these inputs on this machine."""


def triton_interpreted() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), e.g. on a CPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# What the two probes found, filled on first use. A plain memo rather than functools.cache:
# torch.compile traces straight through it (no lru_cache warning) and guards on what it holds.
_PROBES: dict = {}


def _triton_import_error() -> str | None:
    if "triton" not in _PROBES:
        try:
            import triton  # noqa: F401
        except Exception as exc:  # pragma: no cover - depends on the platform
            _PROBES["triton"] = f"{type(exc).__name__}: {exc}"
        else:
            _PROBES["triton"] = None
    return _PROBES["triton"]


def triton_available() -> bool:
    return _triton_import_error() is None


def _load_cpp():
    if "cpp" not in _PROBES:
        try:
            from hcrlhf import _C
        except ImportError as exc:
            _PROBES["cpp"] = (None, f"{exc}")
        else:
            _PROBES["cpp"] = (_C, None)
    return _PROBES["cpp"]


def cpp_extension():
    """The compiled ``hcrlhf._C`` module; raises :class:`ImplUnavailableError` when it is not built."""
    module, error = _load_cpp()
    if module is None:
        raise ImplUnavailableError(
            "impl='cpp' needs the C++ extension hcrlhf._C, which is not built "
            f"({error}). Build it with a C++17 compiler: `pip install -e .` from the repository "
            "(without HCRLHF_SKIP_EXT=1). Alternatives: impl='torch' (reference) or impl='auto'."
        )
    return module


def cpp_available() -> bool:
    return _load_cpp()[0] is not None


def resolve_impl(impl: str, device: torch.device, *, op: str, float64: bool = False,
                 float64_impls: tuple[str, ...] = ("torch", "cpp")) -> str:
    """Return the concrete impl ("triton" | "cpp" | "torch") to run `op` on `device`.

    ``float64`` marks float64 inputs and ``float64_impls`` names the impls of `op` that compute in
    float64 (always the reference): ``auto`` routes float64 inputs to one of them, and an explicit
    request for another raises TypeError.
    """
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl must be one of {IMPLS}, got {impl!r}")
    source = "impl"
    if impl == "auto":
        env = os.environ.get("HCRLHF_IMPL", "").strip().lower()
        if env and env != "auto":
            if env not in IMPLS:
                raise ValueError(f"{op}: environment variable HCRLHF_IMPL must be one of {IMPLS}, got {env!r}")
            impl, source = env, "HCRLHF_IMPL"
    if impl == "auto":
        if device.type == "cuda" and triton_available() and not (float64 and "triton" not in float64_impls):
            return "triton"
        if device.type == "cpu" and cpp_available() and not (float64 and "cpp" not in float64_impls):
            return "cpp"
        return "torch"
    if float64 and impl not in float64_impls:
        raise TypeError(
            f"{op}: {source}={impl!r} computes in float32 and does not take float64 inputs; use "
            f"{' or '.join(repr(i) for i in float64_impls)} (float64), impl='auto', or float32/bf16/fp16 inputs"
        )
    if impl == "triton":
        if not triton_available():
            raise ImplUnavailableError(
                f"{op}: {source}='triton' but triton cannot be imported ({_triton_import_error()}); "
                "use impl='torch' or impl='auto'"
            )
        if device.type != "cuda" and not triton_interpreted():
            raise ImplUnavailableError(
                f"{op}: {source}='triton' needs CUDA tensors (got device {device}); on a CPU set "
                "TRITON_INTERPRET=1 before importing triton to use the (slow) interpreter, or use "
                "impl='cpp' / 'torch' / 'auto'"
            )
        return "triton"
    if impl == "cpp":
        if device.type != "cpu":
            raise ImplUnavailableError(
                f"{op}: {source}='cpp' runs on CPU tensors only (got device {device}); "
                "use impl='triton' or impl='auto' for CUDA tensors"
            )
        cpp_extension()  # raises with build instructions when missing
        return "cpp"
    return "torch"
