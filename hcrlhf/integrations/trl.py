"""TRL integration: one call routes TRL's log-prob path through hcrlhf's fused ops (docs/integrations.md).

``apply_to_trl()`` replaces, in every loaded ``trl`` module that holds them by name, these TRL 1.16 symbols:

* ``ChunkedLogProbFunction`` (``trl.kernels``, ``trl.kernels.chunked_logprob``, and the alias
  ``trl.trainer.utils._ChunkedLogProbFunction`` that ``add_fused_lm_head`` calls): the fused LM head of
  the GRPO / RLOO / DPO / KTO / SFT trainers, now :func:`hcrlhf.ops.linear_logprobs`;
* ``selective_log_softmax``, ``entropy_from_logits`` and ``selective_log_softmax_and_entropy``
  (``trl.trainer.utils`` and the trainers that import them by name): now :func:`hcrlhf.ops.token_logprobs`.

Each replacement has the signature and the return conventions (shapes, dtypes, masking) of the TRL
function it replaces. A call that hcrlhf's ops cannot serve exactly (listed in docs/integrations.md, e.g.
logit soft-capping or the ``is_top1`` output) is handed to TRL's original, so patching never changes what
a trainer can do. ``revert_trl()`` puts the originals back; ``trl_patched()`` does both around a block.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import torch

from hcrlhf.integrations._patching import FLOAT_DTYPES, PeerPatch, engine, supported_version

__all__ = [
    "SUPPORTED_TRL_VERSIONS",
    "UnsupportedTRLVersionError",
    "apply_to_trl",
    "call_counts",
    "is_applied",
    "reset_call_counts",
    "revert_trl",
    "trl_patched",
]

logger = logging.getLogger(__name__)

# The TRL releases whose log-prob path this module was written against and tested with.
SUPPORTED_TRL_VERSIONS = ("1.16.0",)
PATCHED = ("ChunkedLogProbFunction", "selective_log_softmax", "entropy_from_logits",
           "selective_log_softmax_and_entropy")
# ChunkedLogProbFunction outputs that hcrlhf's ops do not compute: a call asking for one goes to TRL.
_TRL_ONLY_OUTPUTS = ("log_sum_sq_probs", "mean_logits", "is_top1")
# The label given to rows that ``row_mask`` turns off. Not -100: an index of -100 in a live row is an
# error for TRL's functions, and stays one (instead of silently scoring 0).
_NO_IGNORE_INDEX = -(2**31)  # below any int32 index TRL passes


class UnsupportedTRLVersionError(RuntimeError):
    """The installed TRL is not one whose internals ``apply_to_trl`` knows."""




# ------------------------------------------------------------------------------------------ public API
def apply_to_trl(*, impl: str = "auto") -> None:
    """Route TRL's log-prob functions through hcrlhf's ops (see the module docstring for what is patched).

    Args:
        impl: the hcrlhf engine, as for every op: "auto" (Triton on CUDA, C++ on CPU when built, else
            torch) | "triton" | "cpp" | "torch". float64 inputs always use "torch" (the float64 engine).

    Call it before creating the trainer or after, but before training; idempotent (a second call with
    another ``impl`` switches the engine). Only modules of the ``trl`` package are patched: code outside
    TRL that did ``from trl.trainer.utils import selective_log_softmax`` before the call keeps TRL's.

    Raises:
        UnsupportedTRLVersionError: the installed TRL is not one of ``SUPPORTED_TRL_VERSIONS``.
        ImportError: TRL is not installed (``pip install 'hcrlhf[integrations]'``).
        ValueError: unknown ``impl``.
    """
    _patch.apply(impl, "apply_to_trl")


def revert_trl() -> None:
    """Put TRL's own functions back wherever :func:`apply_to_trl` (or a module importing afterwards)
    placed hcrlhf's. A no-op when nothing is applied."""
    _patch.revert()


@contextlib.contextmanager
def trl_patched(*, impl: str = "auto") -> Iterator[None]:
    """``with trl_patched(): trainer.train()``: :func:`apply_to_trl` on entry, :func:`revert_trl` on exit
    (also on an exception). Not reentrant with a surrounding ``apply_to_trl``: the exit reverts it."""
    apply_to_trl(impl=impl)
    try:
        yield
    finally:
        revert_trl()


def is_applied() -> bool:
    """Whether hcrlhf's replacements are in place."""
    return _patch.applied is not None


def call_counts() -> dict[str, dict[str, int]]:
    """How many calls each patched symbol sent to hcrlhf and how many it handed to TRL's original
    (``{"ChunkedLogProbFunction": {"hcrlhf": 12, "trl": 0}, ...}``), since the last reset."""
    return _patch.call_counts()


def reset_call_counts() -> None:
    _patch.reset_call_counts()


# ------------------------------------------------------------------------------------------ patching
def _supported_version(version: str) -> bool:
    return supported_version(version, SUPPORTED_TRL_VERSIONS)  # a local build (+label) of a release counts


def _load_trl_originals() -> dict:
    try:
        import trl
    except ImportError as exc:
        raise ImportError(
            "hcrlhf.integrations.apply_to_trl needs TRL: pip install 'hcrlhf[integrations]' "
            f"(trl=={SUPPORTED_TRL_VERSIONS[-1]})"
        ) from exc
    version = getattr(trl, "__version__", "unknown")
    if not _supported_version(version):
        raise UnsupportedTRLVersionError(
            f"hcrlhf.integrations.apply_to_trl supports TRL {', '.join(SUPPORTED_TRL_VERSIONS)}, found TRL "
            f"{version}: it replaces TRL internals whose signatures change between releases. Install a supported "
            f"version (pip install 'trl=={SUPPORTED_TRL_VERSIONS[-1]}') or leave TRL unpatched."
        )
    import trl.kernels.chunked_logprob as chunked_logprob
    import trl.trainer.utils as trainer_utils

    return {
        "ChunkedLogProbFunction": chunked_logprob.ChunkedLogProbFunction,
        "selective_log_softmax": trainer_utils.selective_log_softmax,
        "entropy_from_logits": trainer_utils.entropy_from_logits,
        "selective_log_softmax_and_entropy": trainer_utils.selective_log_softmax_and_entropy,
        # Not replaced; read to reproduce TRL's output dtype (float32 where its Triton kernel runs).
        "_OPTIONAL_OUTPUTS": chunked_logprob.OPTIONAL_OUTPUTS,
        "_triton_kernel_runs": _trl_triton_kernel_predicate(trainer_utils),
    }


def _trl_triton_kernel_predicate(trainer_utils):
    supports = trainer_utils._supports_trl_loss_kernel
    triton = trainer_utils.is_triton_available()
    return lambda logits, index=None, row_mask=None: bool(triton and supports(logits, index, row_mask))


# ------------------------------------------------------------------------------------------ replacements
def _token_path_refusal(logits, index, row_mask, temperature, *, with_entropy: bool = False) -> str | None:
    """Why ``ops.token_logprobs`` cannot serve this TRL call exactly (None: it can)."""
    from hcrlhf.ops._checks import MIN_TEMPERATURE

    if not isinstance(logits, torch.Tensor) or logits.dtype not in FLOAT_DTYPES:
        return "logits are not a float16/bfloat16/float32/float64 tensor"
    if logits.dim() < 1 or logits.shape[-1] == 0:
        return "logits have no vocabulary dim"
    if index is not None:
        if not isinstance(index, torch.Tensor) or index.dtype not in (torch.int32, torch.int64):
            return "index is not an int32/int64 tensor"
        one_per_row = tuple(index.shape) == tuple(logits.shape[:-1])
        several_per_row = index.dim() == logits.dim() and tuple(index.shape[:-1]) == tuple(logits.shape[:-1])
        if not (one_per_row or several_per_row):
            return "index does not have the leading shape of logits, (...) or (..., K)"
        if several_per_row and with_entropy:
            return "index gathers several entries per row (shape (..., K)) beside the entropy"
        if index.device != logits.device:
            return "index is on another device"
    if row_mask is not None and (not isinstance(row_mask, torch.Tensor) or index is None
                                 or tuple(row_mask.shape) != tuple(index.shape)
                                 or row_mask.device != logits.device):
        return "row_mask does not have the shape and device of index"
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature >= MIN_TEMPERATURE):
        return f"temperature {temperature!r} is below hcrlhf's minimum {MIN_TEMPERATURE:g} or not a finite number"
    return None


def _token_logprobs(logits, index, row_mask, temperature, impl, with_entropy, out_dtype):
    from hcrlhf import ops

    # TRL masks where row_mask == 0 (any dtype); index values are never "ignored" (TRL has no ignore_index).
    return ops.token_logprobs(logits, index, float(temperature), return_entropy=with_entropy,
                              ignore_index=_NO_IGNORE_INDEX, out_dtype=out_dtype,
                              row_mask=None if row_mask is None else row_mask != 0, impl=engine(impl, logits.dtype))


def _make_replacements(originals: dict, impl: str, count) -> dict:
    trl_selective = originals["selective_log_softmax"]
    trl_entropy = originals["entropy_from_logits"]
    trl_both = originals["selective_log_softmax_and_entropy"]
    trl_chunked = originals["ChunkedLogProbFunction"]
    triton_kernel_runs = originals["_triton_kernel_runs"]
    optional_outputs = originals["_OPTIONAL_OUTPUTS"]

    def out_dtype(logits, index=None, row_mask=None):
        # TRL returns float32 where its Triton kernel runs (CUDA/XPU) and the logits' dtype elsewhere.
        return torch.float32 if triton_kernel_runs(logits, index, row_mask) else logits.dtype

    def selective_log_softmax(
        logits: torch.Tensor,
        index: torch.Tensor,
        temperature: float = 1.0,
        row_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        reason = _token_path_refusal(logits, index, row_mask, temperature)
        if reason is not None:
            count("selective_log_softmax", "trl", reason)
            return trl_selective(logits, index, temperature, row_mask)
        count("selective_log_softmax", "hcrlhf")
        return _token_logprobs(logits, index, row_mask, temperature, impl, with_entropy=False,
                               out_dtype=out_dtype(logits, index, row_mask))

    def entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
        reason = _token_path_refusal(logits, None, None, 1.0)
        if reason is not None:
            count("entropy_from_logits", "trl", reason)
            return trl_entropy(logits, chunk_size)
        count("entropy_from_logits", "hcrlhf")
        # One streaming pass over V per row: ``chunk_size`` (TRL's rows per step) has nothing to bound.
        return _token_logprobs(logits, None, None, 1.0, impl, with_entropy=True, out_dtype=out_dtype(logits))

    def selective_log_softmax_and_entropy(
        logits: torch.Tensor,
        index: torch.Tensor,
        entropy_requires_grad: bool = True,
        temperature: float = 1.0,
        row_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if temperature <= 0:
            raise ValueError("temperature must be positive")
        reason = _token_path_refusal(logits, index, row_mask, temperature, with_entropy=True)
        if reason is not None:
            count("selective_log_softmax_and_entropy", "trl", reason)
            return trl_both(logits, index, entropy_requires_grad, temperature, row_mask)
        count("selective_log_softmax_and_entropy", "hcrlhf")
        logp, entropy = _token_logprobs(logits, index, row_mask, temperature, impl, with_entropy=True,
                                        out_dtype=out_dtype(logits, index, row_mask))
        return logp, entropy if entropy_requires_grad else entropy.detach()

    class ChunkedLogProbFunction:
        """hcrlhf's stand-in for ``trl.kernels.ChunkedLogProbFunction`` (see hcrlhf.integrations.trl):
        ``apply`` takes TRL's nine arguments and returns its five outputs, computed by
        ``hcrlhf.ops.linear_logprobs`` (``chunk_size``, TRL's vocabulary tile width, is not used:
        hcrlhf picks its own token chunks and vocabulary tiles from the shapes, dtype and device)."""

        original = trl_chunked

        @staticmethod
        def apply(
            hidden: torch.Tensor,
            weight: torch.Tensor,
            bias: torch.Tensor | None,
            targets: torch.Tensor,
            temperature: float,
            chunk_size: int,
            final_logit_softcapping: float | None = None,
            logit_scale: float = 1.0,
            outputs: tuple[str, ...] = optional_outputs,
        ):
            name = "ChunkedLogProbFunction"
            reason = _chunked_refusal(hidden, weight, bias, targets, temperature, final_logit_softcapping,
                                      logit_scale, outputs)
            if reason is not None:
                count(name, "trl", reason)
                return trl_chunked.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                         final_logit_softcapping, logit_scale, outputs)
            count(name, "hcrlhf")
            return _chunked_logprobs(hidden, weight, bias, targets, temperature / logit_scale,
                                     "entropy" in outputs, impl)

    return {
        "ChunkedLogProbFunction": ChunkedLogProbFunction,
        "selective_log_softmax": selective_log_softmax,
        "entropy_from_logits": entropy_from_logits,
        "selective_log_softmax_and_entropy": selective_log_softmax_and_entropy,
    }


def _chunked_refusal(hidden, weight, bias, targets, temperature, softcap, logit_scale, outputs) -> str | None:
    """Why ``ops.linear_logprobs`` cannot serve this ChunkedLogProbFunction call exactly (None: it can)."""
    from hcrlhf.ops._checks import MIN_TEMPERATURE

    extra = [name for name in outputs if name in _TRL_ONLY_OUTPUTS]
    if extra:
        return f"outputs {tuple(extra)} are not computed by hcrlhf"
    if softcap is not None:
        return "final_logit_softcapping is not supported by hcrlhf"
    tensors = (hidden, weight, targets) + (() if bias is None else (bias,))
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "an argument is not a tensor"
    if hidden.dim() != 2 or weight.dim() != 2 or targets.dim() != 1 or hidden.dtype not in FLOAT_DTYPES:
        return "hidden / weight / targets are not (N, H) / (V, H) / (N,) with float hidden states"
    if targets.dtype not in (torch.int32, torch.int64):
        return "targets are not int32/int64"
    if not (isinstance(logit_scale, (int, float)) and math.isfinite(logit_scale) and logit_scale > 0):
        return f"logit_scale {logit_scale!r} is not a finite number > 0"
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature)
            and temperature / logit_scale >= MIN_TEMPERATURE):
        return f"temperature / logit_scale is below hcrlhf's minimum {MIN_TEMPERATURE:g} or not a finite number"
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if is_deepspeed_zero3_enabled():  # TRL's backward re-gathers the partitioned lm_head; hcrlhf's does not
        return "DeepSpeed ZeRO-3 is enabled"
    return None


def _chunked_logprobs(hidden, weight, bias, targets, temperature, with_entropy, impl):
    """TRL's ChunkedLogProbFunction conventions around ops.linear_logprobs: the projection runs in the
    autocast dtype when autocast is on (else the hidden states' dtype); outputs are float32 (TRL's
    accumulators), ``(log_probs, entropy or None, None, None, None)``; gradients reach hidden, weight and
    bias in their own dtypes."""
    from hcrlhf import ops

    device_type = hidden.device.type
    autocast_on = torch.is_autocast_enabled(device_type)
    dtype = torch.get_autocast_dtype(device_type) if autocast_on else hidden.dtype
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    bias = None if bias is None else bias.to(dtype)
    no_autocast = torch.autocast(device_type, enabled=False) if autocast_on else contextlib.nullcontext()
    with no_autocast:
        result = ops.linear_logprobs(hidden, weight, targets, bias=bias, temperature=float(temperature),
                                     return_entropy=with_entropy, impl=engine(impl, dtype))
    logp, entropy = result if with_entropy else (result, None)
    return logp.float(), None if entropy is None else entropy.float(), None, None, None


_patch = PeerPatch(peer="trl", packages=("trl",), patched=PATCHED, load=_load_trl_originals, make=_make_replacements,
                   containers=list, logger=logger)
