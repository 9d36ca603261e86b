"""``ops.token_logprobs``: per-token log-probabilities (and entropy) from logits, in one pass over V.

The pieces here are also the per-chunk engine of :func:`hcrlhf.ops.linear_logprobs`:
``forward_rows`` / ``backward_rows`` run one backend ("triton" | "cpp" | "torch") on rows of logits
without autograd.
"""

from __future__ import annotations

import math
import os

import torch

from hcrlhf import reference
from hcrlhf.ops import _checks
from hcrlhf.ops._dispatch import cpp_extension, resolve_impl

OP = "token_logprobs"
LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_CPP_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# exp underflows below this in fp32: the kernels clamp log-probabilities here (see csrc/logprobs.cpp)
_MIN_EXP_ARG = -87.3

Layout = tuple[int, int, int, int]  # rows, inner, stride_outer, stride_inner (elements)


def check_labels_on_device() -> bool:
    """Whether to range-check CUDA labels on the host (a device sync): env ``HCRLHF_CHECK_LABELS=1``."""
    return os.environ.get("HCRLHF_CHECK_LABELS", "0").strip().lower() in ("1", "true", "yes")


def read_label_values(device: torch.device) -> bool:
    """Whether ``check_labels`` range-checks the label values: always on the CPU; on CUDA only with
    ``HCRLHF_CHECK_LABELS=1`` and never while torch.compile traces (it would be a device-side assert)."""
    if device.type == "cpu":
        return True
    return check_labels_on_device() and not torch.compiler.is_compiling()


def row_layout(x: torch.Tensor) -> Layout | None:
    """Address the rows of x (..., V) as ``(row // inner) * stride_outer + (row % inner) * stride_inner``.

    Leading dims that are laid out one after the other are merged; returns None when more than two
    independent leading strides remain (the caller then copies). The last dim must have stride 1.
    """
    dims = [(size, stride) for size, stride in zip(x.shape[:-1], x.stride()[:-1], strict=True) if size != 1]
    merged: list[list[int]] = []
    for size, stride in dims:
        if merged and merged[-1][1] == stride * size:
            merged[-1] = [merged[-1][0] * size, stride]
        else:
            merged.append([size, stride])
    rows = 1
    for size, _ in merged:
        rows *= size
    if not merged:
        return rows, 1, 0, 0
    if len(merged) == 1:
        return rows, rows, 0, merged[0][1]
    if len(merged) == 2:
        return rows, merged[1][0], merged[0][1], merged[1][1]
    return None


def _cpp_view(x: torch.Tensor):
    x = x.detach()
    return (x if x.dtype == torch.float32 else x.view(torch.int16)).numpy()


# ---------------------------------------------------------------- backends without autograd
def forward_rows(impl: str, logits: torch.Tensor, layout: Layout, labels: torch.Tensor | None, inv_temp: float,
                 ignore_index: int, with_entropy: bool, row_mask: torch.Tensor | None = None):
    """(logp (rows,) | None, stats (rows, 2), entropy (rows,) | None), float32 (float64: torch backend only).

    ``stats[r] = (max x, log Σ exp((x - max x) * inv_temp))`` for the row's logits x: the logsumexp
    of ``z = x * inv_temp`` split in two, so that the backward's ``log p = (x - max x) * inv_temp -
    log_sum`` keeps full precision near the mode and at tiny temperatures. A row whose softmax is
    undefined (a NaN or +inf logit, or only -inf logits) has ``log_sum = NaN``: NaN log-prob,
    entropy and gradient.

    ``labels`` (rows,) int64, or None: no label is gathered (``logp`` is None). A row is dead when
    its label equals ``ignore_index`` or ``row_mask`` (rows,) bool is False there: the backends do
    not read it; its log-prob and entropy are 0 and its stats (0, 0) are never used.
    """
    rows = layout[0]
    if impl == "triton":
        from hcrlhf.kernels.token_logprobs import token_logprobs_forward

        return token_logprobs_forward(logits, layout, labels, inv_temp, ignore_index, with_entropy,
                                      row_mask=row_mask)
    if impl == "cpp":
        logp = torch.empty(rows, dtype=torch.float32) if labels is not None else None
        stats = torch.empty(rows, 2, dtype=torch.float32)
        entropy = torch.empty(rows, dtype=torch.float32) if with_entropy else None
        if rows:
            _, inner, stride_outer, stride_inner = layout
            cpp_extension().token_logprobs_forward(
                logits=_cpp_view(logits), kind=_CPP_KIND[logits.dtype], rows=rows, inner=inner,
                stride_outer=stride_outer, stride_inner=stride_inner, vocab=logits.shape[-1],
                labels=_numpy_or_none(labels), inv_temp=float(inv_temp), ignore_index=int(ignore_index),
                logp=_numpy_or_none(logp), stats=stats.numpy(), entropy=_numpy_or_none(entropy),
                row_mask=_cpp_mask(row_mask),
            )
        return logp, stats, entropy
    return _torch_forward_rows(logits.reshape(rows, logits.shape[-1]), labels, inv_temp, ignore_index,
                               with_entropy, row_mask)


def backward_rows(impl: str, logits: torch.Tensor, layout: Layout, labels: torch.Tensor | None,
                  stats: torch.Tensor, entropy: torch.Tensor | None, grad_logp: torch.Tensor | None,
                  grad_entropy: torch.Tensor | None, inv_temp: float, ignore_index: int,
                  inplace: bool, row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient w.r.t. logits of Σ grad_logp·logp + grad_entropy·entropy, in the logits' dtype.

    With ``inplace`` the gradient overwrites ``logits`` (same strides) and that tensor is returned.
    Dead rows (see ``forward_rows``) get a zero gradient without being read. Without ``labels``
    there is no one-hot term: ``grad_logp`` is then each row's total upstream gradient Σ_k g_k
    and the caller adds g_k at its label columns (``_multi_label_backward``).
    """
    rows, _, _, _ = layout
    V = logits.shape[-1]
    if inplace:
        grad, grad_strides = logits.detach(), layout[2:]
    else:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
        inner = layout[1]
        grad_strides = (inner * V, V)
    if impl == "triton":
        from hcrlhf.kernels.token_logprobs import token_logprobs_backward

        return token_logprobs_backward(logits, layout, labels, stats, entropy, grad_logp, grad_entropy,
                                       inv_temp, ignore_index, grad, grad_strides, row_mask=row_mask)
    if impl == "cpp":
        if rows:
            _, inner, stride_outer, stride_inner = layout
            cpp_extension().token_logprobs_backward(
                logits=_cpp_view(logits), kind=_CPP_KIND[logits.dtype], rows=rows, inner=inner,
                stride_outer=stride_outer, stride_inner=stride_inner, vocab=V, labels=_numpy_or_none(labels),
                stats=stats.numpy(), entropy=_numpy_or_none(entropy), grad_logp=_numpy_or_none(grad_logp),
                grad_entropy=_numpy_or_none(grad_entropy), inv_temp=float(inv_temp),
                ignore_index=int(ignore_index), grad=_cpp_view(grad), grad_stride_outer=grad_strides[0],
                grad_stride_inner=grad_strides[1], row_mask=_cpp_mask(row_mask),
            )
        return grad
    result = _torch_backward_rows(logits.reshape(rows, V), labels, stats, entropy, grad_logp, grad_entropy,
                                  inv_temp, ignore_index, row_mask)
    grad.copy_(result.view(logits.shape))
    return grad


def _contiguous(x: torch.Tensor | None) -> torch.Tensor | None:
    return None if x is None else x.contiguous()


def _numpy_or_none(x: torch.Tensor | None):
    return None if x is None else x.numpy()


def _cpp_mask(row_mask: torch.Tensor | None):
    return None if row_mask is None else row_mask.contiguous().view(torch.uint8).numpy()


def _live_rows(labels: torch.Tensor | None, row_mask: torch.Tensor | None, ignore_index: int,
               rows: int, device: torch.device) -> torch.Tensor:
    """(rows,) bool: the rows the backends read (label not ignored, row mask True)."""
    live = torch.ones(rows, dtype=torch.bool, device=device) if labels is None else labels != ignore_index
    return live if row_mask is None else live & row_mask


def _torch_forward_rows(logits: torch.Tensor, labels: torch.Tensor | None, inv_temp: float, ignore_index: int,
                        with_entropy: bool, row_mask: torch.Tensor | None = None):
    """Pure-torch rows (R, V): a few (R, V) float32 temporaries, so callers keep R small (a chunk).

    Same numerics as the kernels: the row max is subtracted in the logits' units before scaling by
    ``inv_temp``, and a row with a NaN / +inf logit or only -inf logits gets ``log_sum = NaN``.
    Every output of a dead row is zeroed per row afterwards, so whatever its logits hold stays in that row
    (no (R, V) pass to blank them first).
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    live = _live_rows(labels, row_mask, ignore_index, logits.shape[0], logits.device)
    x = logits.to(dtype)
    row_max = x.amax(-1)  # NaN propagates
    undefined = ~torch.isfinite(row_max)
    row_max = torch.where(undefined, 0.0, row_max)
    z = (x - row_max[:, None]).mul_(inv_temp)
    log_sum = torch.where(undefined, torch.nan, z.exp().sum(-1).log_())
    # a dead row's stats are (0, 0) and never used
    row_max, log_sum = torch.where(live, row_max, 0.0), torch.where(live, log_sum, 0.0)
    logp = entropy = None
    if labels is not None:
        safe = torch.where(live, labels, 0).long()
        logp = torch.where(live, z.gather(-1, safe[:, None]).squeeze(-1) - log_sum, 0.0)
    if with_entropy:
        log_p = (z - log_sum[:, None]).clamp_(min=_MIN_EXP_ARG)
        entropy = torch.where(live, -(log_p.exp() * log_p).sum(-1), 0.0)
    return logp, torch.stack([row_max, log_sum], dim=1), entropy


def _torch_backward_rows(logits, labels, stats, entropy, grad_logp, grad_entropy, inv_temp, ignore_index,
                         row_mask=None):
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    live = _live_rows(labels, row_mask, ignore_index, logits.shape[0], logits.device)
    stats = stats.to(dtype)
    x = logits.to(dtype)  # a dead row's NaN / inf stays in its row: its gradient is zeroed below
    log_p = ((x - stats[:, :1]) * inv_temp - stats[:, 1:]).clamp_(min=_MIN_EXP_ARG)
    p = log_p.exp()
    g_lp = torch.zeros_like(stats[:, 0]) if grad_logp is None else torch.where(live, grad_logp.to(dtype), 0.0)
    coef = g_lp[:, None].expand_as(p)
    if grad_entropy is not None:
        g_h = torch.where(live, grad_entropy.to(dtype), 0.0)
        coef = coef + g_h[:, None] * (log_p + entropy.to(dtype)[:, None])
    grad = (p * coef).neg_()
    if labels is not None:  # without labels g_lp is the row's total: the caller adds the one-hot terms
        safe = torch.where(live, labels, 0).long()
        grad.scatter_add_(1, safe[:, None], g_lp[:, None])
    # dead rows: zero, even when undefined; an undefined row's NaN log_sum already makes its grad NaN
    return torch.where(live[:, None], grad * inv_temp, 0.0).to(logits.dtype)


# ---------------------------------------------------------------- several labels per row
# Labels (rows, K): one streaming pass (forward_rows without labels) gives each row's stats, then the
# K label logits are gathered: log p_k = (x_k - max)·inv_temp - log_sum, exactly the kernels'
# formula. The backward runs the kernel with grad_logp = Σ_k g_k and no one-hot term, then writes
# the label columns again in float32: g(label) - p·(Σ_k g_k + g_H·(log p + H)), times inv_temp, with
# g(label) the sum of g_k over the (possibly repeated) label — one rounding, like the one-label path.
def _multi_label_liveness(labels: torch.Tensor, ignore_index: int, row_mask: torch.Tensor | None):
    """(label_live (rows, K), row_live (rows,)): a row is read only when some label of it counts."""
    label_live = labels != ignore_index
    if row_mask is not None:
        label_live = label_live & row_mask[:, None]
    return label_live, label_live.any(-1)


def _label_logits(logits: torch.Tensor, safe: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """logits[row, safe[row, k]] as (rows, K) ``dtype``, read in place through the logits' own strides."""
    rows, k = safe.shape
    return logits.gather(-1, safe.view(*logits.shape[:-1], k)).reshape(rows, k).to(dtype)


def _multi_label_forward(impl, logits, layout, labels, inv_temp, ignore_index, with_entropy, row_mask):
    label_live, row_live = _multi_label_liveness(labels, ignore_index, row_mask)
    _, stats, entropy = forward_rows(impl, logits, layout, None, inv_temp, ignore_index, with_entropy, row_live)
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    x = _label_logits(logits, torch.where(in_range, labels, 0), stats.dtype)
    logp = (x - stats[:, :1]) * inv_temp - stats[:, 1:]
    # an out-of-range label (unchecked on GPU unless HCRLHF_CHECK_LABELS=1) gives NaN, never a bad read
    logp = torch.where(in_range, logp, torch.nan)
    return torch.where(label_live, logp, 0.0), stats, entropy


def _sum_over_equal_labels(index: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """out[r, k] = Σ_j g[r, j] over the j with index[r, j] == index[r, k] (a label repeated in a row)."""
    if index.shape[-1] <= 1:
        return g
    sorted_index, order = index.sort(-1)
    g_sorted = g.gather(-1, order)
    starts = torch.ones_like(sorted_index, dtype=torch.bool)
    starts[:, 1:] = sorted_index[:, 1:] != sorted_index[:, :-1]
    run = starts.long().cumsum(-1) - 1
    run_sums = torch.zeros_like(g_sorted).scatter_add_(-1, run, g_sorted)
    return torch.zeros_like(g).scatter_(-1, order, run_sums.gather(-1, run))


def _multi_label_backward(impl, logits, layout, labels, stats, entropy, grad_logp, grad_entropy, inv_temp,
                          ignore_index, inplace, row_mask):
    dtype = stats.dtype
    label_live, row_live = _multi_label_liveness(labels, ignore_index, row_mask)
    in_range = (labels >= 0) & (labels < logits.shape[-1])
    # ignored / out-of-range entries point at column 0 with weight 0: their write there is column 0's own value
    safe = torch.where(label_live & in_range, labels, 0)
    x = _label_logits(logits, safe, dtype)  # read before an in-place backward overwrites the logits
    g = torch.zeros(labels.shape, dtype=dtype, device=labels.device) if grad_logp is None else \
        torch.where(label_live, grad_logp.to(dtype), 0.0)
    total = g.sum(-1)
    # a bad label makes its whole row's gradient NaN, as on the one-label path
    total = torch.where((label_live & ~in_range).any(-1), torch.nan, total)
    grad = backward_rows(impl, logits, layout, None, stats, entropy, total, grad_entropy, inv_temp, ignore_index,
                         inplace, row_live)
    log_p = ((x - stats[:, :1]) * inv_temp - stats[:, 1:]).clamp(min=_MIN_EXP_ARG)
    coef = total[:, None]
    if grad_entropy is not None:
        g_h = torch.where(row_live, grad_entropy.to(dtype), 0.0)
        coef = coef + g_h[:, None] * (log_p + entropy.to(dtype)[:, None])
    column = (_sum_over_equal_labels(safe, g) - log_p.exp() * coef) * inv_temp
    column = torch.where(row_live[:, None], column, 0.0)
    grad.scatter_(-1, safe.view(*logits.shape[:-1], -1), column.view(*logits.shape[:-1], -1).to(grad.dtype))
    return grad


def _forward(impl, logits, layout, labels, inv_temp, ignore_index, with_entropy, row_mask):
    """Dispatch on the labels: None, one per row (rows,) or several per row (rows, K)."""
    labels, row_mask = _contiguous(labels), _contiguous(row_mask)  # the kernels index them as flat arrays
    if labels is not None and labels.dim() == 2:
        return _multi_label_forward(impl, logits, layout, labels, inv_temp, ignore_index, with_entropy, row_mask)
    return forward_rows(impl, logits, layout, labels, inv_temp, ignore_index, with_entropy, row_mask)


def _backward(impl, logits, layout, labels, stats, entropy, grad_logp, grad_entropy, inv_temp, ignore_index,
              inplace, row_mask):
    labels, row_mask = _contiguous(labels), _contiguous(row_mask)
    if labels is not None and labels.dim() == 2:
        return _multi_label_backward(impl, logits, layout, labels, stats, entropy, grad_logp, grad_entropy,
                                     inv_temp, ignore_index, inplace, row_mask)
    return backward_rows(impl, logits, layout, labels, stats, entropy, grad_logp, grad_entropy, inv_temp,
                         ignore_index, inplace, row_mask)


def addressable_rows(logits: torch.Tensor) -> tuple[torch.Tensor, Layout]:
    """``logits`` (one contiguous copy when its rows cannot be addressed in place) and its row layout."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    layout = row_layout(logits)
    if layout is None:  # more than two independent leading strides: one copy
        logits = logits.contiguous()
        layout = row_layout(logits)
    return logits, layout


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _as_rows(g: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if g is None else g.to(dtype).contiguous()


# ---------------------------------------------------------------- custom ops (torch.library)
# The kernel entry points are torch.library custom ops, so that torch.compile(fullgraph=True)
# sees them as opaque graph nodes (shapes from register_fake, gradients from register_autograd)
# instead of breaking the graph on numpy buffers / Triton launches. ``labels`` is flat int64:
# (rows,) for one label per row, (rows, K) for K labels per row, or None (entropy only);
# ``row_mask`` is None or (rows,) bool; ``impl`` the concrete engine ("triton" | "cpp" | "torch").
# The op itself addresses the rows of ``logits`` in place (views) or copies them once
# (addressable_rows).
@torch.library.custom_op("hcrlhf::token_logprobs_fwd", mutates_args=())
def token_logprobs_fwd(logits: torch.Tensor, labels: torch.Tensor | None, inv_temp: float, ignore_index: int,
                       with_entropy: bool, inplace_backward: bool, impl: str, row_mask: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp shaped like ``labels`` or (0,) without labels, stats (rows, 2), entropy (rows,) or (0,)
    without ``with_entropy``).

    ``inplace_backward`` is not used by the forward: it tells the autograd formula which backward
    op to run (hcrlhf::token_logprobs_bwd_ overwrites the logits with their gradient).
    """
    logits, layout = addressable_rows(logits)
    logp, stats, entropy = _forward(impl, logits, layout, labels, inv_temp, ignore_index, with_entropy, row_mask)
    return (stats.new_empty(0) if logp is None else logp), stats, (entropy if with_entropy else stats.new_empty(0))


@token_logprobs_fwd.register_fake
def _(logits, labels, inv_temp, ignore_index, with_entropy, inplace_backward, impl, row_mask=None):
    rows = math.prod(logits.shape[:-1])
    dtype = _compute_dtype(logits)
    logp = logits.new_empty(labels.shape if labels is not None else (0,), dtype=dtype)
    entropy = logits.new_empty(rows if with_entropy else 0, dtype=dtype)
    return logp, logits.new_empty(rows, 2, dtype=dtype), entropy


@torch.library.custom_op("hcrlhf::token_logprobs_bwd", mutates_args=())
def token_logprobs_bwd(logits: torch.Tensor, labels: torch.Tensor | None, stats: torch.Tensor,
                       entropy: torch.Tensor | None, grad_logp: torch.Tensor | None,
                       grad_entropy: torch.Tensor | None, inv_temp: float, ignore_index: int,
                       impl: str, row_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient w.r.t. ``logits`` (a new contiguous tensor of the logits' shape and dtype)."""
    logits, layout = addressable_rows(logits)
    return _backward(impl, logits, layout, labels, stats, entropy, _as_rows(grad_logp, stats.dtype),
                     _as_rows(grad_entropy, stats.dtype), inv_temp, ignore_index, False, row_mask)


@token_logprobs_bwd.register_fake
def _(logits, labels, stats, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, impl, row_mask=None):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("hcrlhf::token_logprobs_bwd_", mutates_args=("logits",))
def token_logprobs_bwd_(logits: torch.Tensor, labels: torch.Tensor | None, stats: torch.Tensor,
                        entropy: torch.Tensor | None, grad_logp: torch.Tensor | None,
                        grad_entropy: torch.Tensor | None, inv_temp: float, ignore_index: int,
                        impl: str, row_mask: torch.Tensor | None = None) -> None:
    """``inplace_backward``: overwrite ``logits`` with their gradient (no logits-sized buffer when
    its rows are addressable in place, as ops.token_logprobs arranges)."""
    rows, layout = addressable_rows(logits)
    args = (labels, stats, entropy, _as_rows(grad_logp, stats.dtype), _as_rows(grad_entropy, stats.dtype),
            inv_temp, ignore_index)
    if rows is logits:
        _backward(impl, logits, layout, *args, True, row_mask)
    else:  # not addressable in place (only a caller other than ops.token_logprobs passes such logits)
        logits.copy_(_backward(impl, rows, layout, *args, False, row_mask))


@token_logprobs_bwd_.register_fake
def _(logits, labels, stats, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, impl, row_mask=None):
    return None


def _fwd_setup_context(ctx, inputs, output):
    logits, labels, inv_temp, ignore_index, with_entropy, inplace_backward, impl, row_mask = inputs
    logp, stats, entropy = output
    ctx.mark_non_differentiable(stats)
    if labels is None:
        ctx.mark_non_differentiable(logp)
    if not with_entropy:
        ctx.mark_non_differentiable(entropy)
    ctx.save_for_backward(logits, labels, stats, entropy if with_entropy else None, row_mask)
    ctx.config = (inv_temp, ignore_index, with_entropy, inplace_backward, impl)
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, grad_logp, grad_stats, grad_entropy):
    logits, labels, stats, entropy, row_mask = ctx.saved_tensors
    inv_temp, ignore_index, with_entropy, inplace, impl = ctx.config
    if not with_entropy:
        grad_entropy = None
    if labels is None:
        grad_logp = None
    if grad_logp is None and grad_entropy is None:
        return (None,) * 8
    args = (labels, stats, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, impl, row_mask)
    if inplace:
        torch.ops.hcrlhf.token_logprobs_bwd_(logits, *args)
        grad = logits  # now holds its own gradient
    else:
        grad = torch.ops.hcrlhf.token_logprobs_bwd(logits, *args)
    return (grad,) + (None,) * 7


token_logprobs_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def _check_row_mask(row_mask, lead: tuple[int, ...], labels: torch.Tensor | None, multi: bool,
                    device: torch.device) -> torch.Tensor:
    if not isinstance(row_mask, torch.Tensor):
        raise TypeError(f"{OP}: row_mask must be None or a torch.Tensor, got {type(row_mask).__name__}")
    if row_mask.dtype.is_floating_point or row_mask.dtype.is_complex:
        raise TypeError(f"{OP}: row_mask must be bool (or integer, 0 = masked out), got {row_mask.dtype}")
    shapes = [lead] + ([tuple(labels.shape)] if multi else [])
    if tuple(row_mask.shape) not in shapes:
        expected = " or ".join(str(shape) for shape in shapes)
        raise ValueError(f"{OP}: row_mask must have shape {expected} (the leading dims of the logits"
                         f"{', or the shape of labels' if multi else ''}), got {tuple(row_mask.shape)}")
    if row_mask.device != device:
        raise ValueError(f"{OP}: all tensors must be on one device; row_mask is on {row_mask.device}, not {device}")
    return row_mask if row_mask.dtype == torch.bool else row_mask != 0


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    *,
    return_entropy: bool = False,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    out_dtype: torch.dtype | None = None,
    row_mask: torch.Tensor | None = None,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label under ``softmax(logits / temperature)``; optionally the entropy.

    Args:
        logits: (..., V) float32 / bfloat16 / float16 (float64 runs the reference). Any leading
            shape; the last dim should be contiguous (a stride != 1 costs one copy); other strides
            are arbitrary, so ``logits[:, :-1]`` is read in place without a copy.
        labels: (...) int64 (or int32), the leading shape of ``logits``: one label per position;
            or (..., K) (``labels.dim() == logits.dim()``, K >= 1): K log-probs per position (e.g.
            the top-K tokens; repeats allowed); or None: the entropy alone (needs
            ``return_entropy=True``). Each label in [0, V) or equal to ``ignore_index``. CPU labels
            are range-checked (ValueError); CUDA labels only when the environment sets
            ``HCRLHF_CHECK_LABELS=1`` (a host sync) — otherwise a bad label gives NaN, never an
            out-of-bounds read.
        temperature: >= ``MIN_TEMPERATURE`` (1e-4; ValueError below it); the logits are divided by it
            (sampling temperature). May be passed positionally, as the peers' ``temperature``.
            Exact to float32 relative precision down to the floor: the kernels scale
            ``logits - max`` rather than the logits themselves.
        return_entropy: also return the entropy of each position's distribution (one per position,
            also with K labels).
        ignore_index: a label equal to it gives log-prob 0 and no gradient, whatever the logits
            hold. One label per position: the position also gets entropy 0 and is not read. K labels:
            it applies per label; a position whose K labels are all ignored is dead like a
            ``row_mask`` False position.
        inplace_backward: let the backward write the gradient into the logits' own memory
            instead of a new (..., V) buffer (saves one logits-sized allocation). Only use it when
            nothing else reads the logits afterwards (another op's backward, a second backward with
            ``retain_graph``, or your own code): their values are overwritten. Logits that require
            grad and are a leaf (or a view of one), or whose elements share memory (an expanded,
            stride-0 view), are refused with a ValueError on every impl; the "torch" impl otherwise
            ignores the flag. Supported under torch.compile (the backward op declares the
            mutation; docs/ops.md#torchcompile).
        out_dtype: None keeps float32 results (float64 for float64 logits — more accurate than the
            peers, which return the logits' dtype); a floating dtype (e.g. ``logits.dtype``) casts
            the log-probs and entropy to it, differentiably (the gradient w.r.t. the logits keeps
            the logits' dtype).
        row_mask: None, or a bool (or integer, 0 = masked out) tensor of the leading shape (...):
            positions where it is False give log-prob 0 (all K), entropy 0 and a zero gradient,
            like ``ignore_index``; the kernels do not read them. With K labels it may instead have
            the labels' shape (..., K) and mask single labels (TRL's ``row_mask`` has the shape of
            its index).
        impl: "auto" | "triton" | "cpp" | "torch" (see ``hcrlhf.ops._dispatch``).

    Returns:
        ``logp`` shaped like ``labels``, float32 (float64 for float64 logits; ``out_dtype`` if
        given); with ``return_entropy`` the tuple ``(logp, entropy)``, entropy of the leading shape;
        with ``labels=None`` the entropy alone. Differentiable w.r.t. ``logits`` through every
        output (any upstream gradients); the gradient has the logits' dtype.

    Equivalent naive code (which materialises a full-size fp32 log-softmax; the kernels instead
    stream each row once with an online max/sum in fp32 and keep only its logsumexp)::

        z = logits.float() / temperature
        log_probs = z.log_softmax(-1)
        many = labels.dim() == logits.dim()                       # K labels per position
        grid = labels if many else labels[..., None]               # (..., K)
        keep = torch.ones_like(grid, dtype=torch.bool) if row_mask is None else row_mask != 0
        live = (grid != ignore_index) & (keep if keep.dim() == grid.dim() else keep[..., None])
        logp = torch.where(live, log_probs.gather(-1, torch.where(live, grid, 0)), 0.0)
        logp = logp if many else logp[..., 0]
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        entropy = torch.where(live.any(-1), entropy, 0.0)        # dead positions: 0
        # (labels=None: the entropy alone, live wherever row_mask is not 0)
        logp, entropy = logp.to(out_dtype or logp.dtype), entropy.to(out_dtype or entropy.dtype)

    Backward: ``d logp_k/dz = onehot(label_k) - p`` and ``d H/dz = -p·(log p + H)``, recomputed in
    one pass from the saved per-row max and log-sum (the logsumexp), scaled by ``1/temperature``;
    with K labels the kernel subtracts ``p·Σ_k g_k`` in that pass and the K label columns are
    written once more with their one-hot terms.

    Non-finite logits (one answer on every impl, docs/ops.md#token_logprobs): a -inf logit has
    p = 0 (a -inf label logit gives logp = -inf with a finite gradient); a row with a NaN or +inf
    logit, or with every logit -inf, gives NaN log-prob, entropy and gradient; a dead position
    (ignored label, masked row) gives 0, 0 and a zero gradient whatever its logits.
    """
    _checks.check_tensor(OP, "logits", logits)
    if logits.dim() < 1:
        raise ValueError(f"{OP}: logits must have shape (..., V), got a 0-dim tensor")
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError(f"{OP}: logits must have a non-empty last dim V, got shape {tuple(logits.shape)}")
    device = logits.device
    lead = tuple(logits.shape[:-1])
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
    multi = False
    if labels is None:
        if not return_entropy:
            raise ValueError(
                f"{OP}: labels=None computes the entropy alone and needs return_entropy=True; for log-probs pass "
                f"labels of shape {lead} (one per position) or {lead + ('K',)} (K per position)"
            )
    else:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"{OP}: labels must be a torch.Tensor or None, got {type(labels).__name__}")
        _checks.check_same_device(OP, logits=logits, labels=labels)
        multi = labels.dim() == logits.dim()
        if multi and (tuple(labels.shape[:-1]) != lead or labels.shape[-1] == 0):
            raise ValueError(f"{OP}: labels must have shape {lead} (one label per position) or {lead + ('K',)} "
                             f"with K >= 1 (K labels per position), got {tuple(labels.shape)}")
        _checks.check_labels(OP, labels, tuple(labels.shape) if multi else lead, vocab, ignore_index,
                             read_values=read_label_values(device))
    if row_mask is not None:
        row_mask = _check_row_mask(row_mask, lead, labels, multi, device)
    if out_dtype is not None and out_dtype not in _checks.FLOAT_DTYPES:
        raise TypeError(f"{OP}: out_dtype must be None or one of {_checks.FLOAT_DTYPES}, got {out_dtype!r}")
    temperature = _checks.check_temperature(OP, temperature)
    if inplace_backward:
        _checks.check_inplace_target(OP, "logits", logits)
    float64 = logits.dtype == torch.float64
    chosen = resolve_impl(impl, device, op=OP, float64=float64, float64_impls=("torch",))
    if chosen == "torch":
        return reference.token_logprobs(logits, labels, temperature, return_entropy, ignore_index,
                                        out_dtype=out_dtype, row_mask=row_mask)

    logits, _ = addressable_rows(logits)
    flat_labels = flat_mask = None
    if labels is not None:
        flat_labels = (labels.reshape(-1, labels.shape[-1]) if multi else labels.reshape(-1)).to(torch.int64)
        flat_labels = flat_labels.contiguous()
    if row_mask is not None:
        if multi and row_mask.dim() == labels.dim():  # one mask entry per label: that label is ignored
            flat_labels = torch.where(row_mask.reshape(flat_labels.shape), flat_labels, ignore_index)
        else:
            flat_mask = row_mask.reshape(-1).contiguous()
    logp, _, entropy = torch.ops.hcrlhf.token_logprobs_fwd(
        logits, flat_labels, 1.0 / temperature, ignore_index, bool(return_entropy), bool(inplace_backward), chosen,
        flat_mask,
    )
    cast = (lambda x: x) if out_dtype is None else (lambda x: x.to(out_dtype))
    if labels is None:
        return cast(entropy.view(lead))
    logp = cast(logp.view(labels.shape))
    return (logp, cast(entropy.view(lead))) if return_entropy else logp
