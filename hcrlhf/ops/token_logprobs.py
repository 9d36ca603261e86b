"""``ops.token_logprobs``: per-token log-probabilities (and entropy) from logits, in one pass over V.

The pieces here are also the per-chunk engine of :func:`hcrlhf.ops.linear_logprobs`:
``forward_rows`` / ``backward_rows`` run one backend ("triton" | "cpp" | "torch") on rows of logits
without autograd.
"""

from __future__ import annotations

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
def forward_rows(impl: str, logits: torch.Tensor, layout: Layout, labels: torch.Tensor, inv_temp: float,
                 ignore_index: int, with_entropy: bool):
    """(logp (rows,), stats (rows, 2), entropy (rows,) | None), float32 (float64: torch backend only).

    ``stats[r] = (max x, log Σ exp((x - max x) * inv_temp))`` for the row's logits x: the logsumexp
    of ``z = x * inv_temp`` split in two, so that the backward's ``log p = (x - max x) * inv_temp -
    log_sum`` keeps full precision near the mode and at tiny temperatures. A row whose softmax is
    undefined (a NaN or +inf logit, or only -inf logits) has ``log_sum = NaN``: NaN log-prob,
    entropy and gradient.
    """
    rows = layout[0]
    if impl == "triton":
        from hcrlhf.kernels.token_logprobs import token_logprobs_forward

        return token_logprobs_forward(logits, layout, labels, inv_temp, ignore_index, with_entropy)
    if impl == "cpp":
        logp = torch.empty(rows, dtype=torch.float32)
        stats = torch.empty(rows, 2, dtype=torch.float32)
        entropy = torch.empty(rows, dtype=torch.float32) if with_entropy else None
        if rows:
            _, inner, stride_outer, stride_inner = layout
            cpp_extension().token_logprobs_forward(
                logits=_cpp_view(logits), kind=_CPP_KIND[logits.dtype], rows=rows, inner=inner,
                stride_outer=stride_outer, stride_inner=stride_inner, vocab=logits.shape[-1],
                labels=labels.numpy(), inv_temp=float(inv_temp), ignore_index=int(ignore_index),
                logp=logp.numpy(), stats=stats.numpy(), entropy=entropy.numpy() if with_entropy else None,
            )
        return logp, stats, entropy
    return _torch_forward_rows(logits.reshape(rows, logits.shape[-1]), labels, inv_temp, ignore_index,
                               with_entropy)


def backward_rows(impl: str, logits: torch.Tensor, layout: Layout, labels: torch.Tensor, stats: torch.Tensor,
                  entropy: torch.Tensor | None, grad_logp: torch.Tensor | None,
                  grad_entropy: torch.Tensor | None, inv_temp: float, ignore_index: int,
                  inplace: bool) -> torch.Tensor:
    """Gradient w.r.t. logits of Σ grad_logp·logp + grad_entropy·entropy, in the logits' dtype.

    With ``inplace`` the gradient overwrites ``logits`` (same strides) and that tensor is returned.
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
                                       inv_temp, ignore_index, grad, grad_strides)
    if impl == "cpp":
        if rows:
            _, inner, stride_outer, stride_inner = layout
            cpp_extension().token_logprobs_backward(
                logits=_cpp_view(logits), kind=_CPP_KIND[logits.dtype], rows=rows, inner=inner,
                stride_outer=stride_outer, stride_inner=stride_inner, vocab=V, labels=labels.numpy(),
                stats=stats.numpy(), entropy=None if entropy is None else entropy.numpy(),
                grad_logp=None if grad_logp is None else grad_logp.numpy(),
                grad_entropy=None if grad_entropy is None else grad_entropy.numpy(),
                inv_temp=float(inv_temp), ignore_index=int(ignore_index), grad=_cpp_view(grad),
                grad_stride_outer=grad_strides[0], grad_stride_inner=grad_strides[1],
            )
        return grad
    result = _torch_backward_rows(logits.reshape(rows, V), labels, stats, entropy, grad_logp, grad_entropy,
                                  inv_temp, ignore_index)
    grad.copy_(result.view(logits.shape))
    return grad


def _torch_forward_rows(logits: torch.Tensor, labels: torch.Tensor, inv_temp: float, ignore_index: int,
                        with_entropy: bool):
    """Pure-torch rows (R, V): a few (R, V) float32 temporaries, so callers keep R small (a chunk).

    Same numerics as the kernels: the row max is subtracted in the logits' units before scaling by
    ``inv_temp``, and a row with a NaN / +inf logit or only -inf logits gets ``log_sum = NaN``.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    x = logits.to(dtype)
    row_max = x.amax(-1)  # NaN propagates
    undefined = ~torch.isfinite(row_max)
    row_max = torch.where(undefined, 0.0, row_max)
    z = (x - row_max[:, None]).mul_(inv_temp)
    log_sum = torch.where(undefined, torch.nan, z.exp().sum(-1).log_())
    ignored = labels == ignore_index
    safe = torch.where(ignored, 0, labels).long()
    logp = torch.where(ignored, 0.0, z.gather(-1, safe[:, None]).squeeze(-1) - log_sum)
    entropy = None
    if with_entropy:
        log_p = (z - log_sum[:, None]).clamp_(min=_MIN_EXP_ARG)
        entropy = torch.where(ignored, 0.0, -(log_p.exp() * log_p).sum(-1))
    return logp, torch.stack([row_max, log_sum], dim=1), entropy


def _torch_backward_rows(logits, labels, stats, entropy, grad_logp, grad_entropy, inv_temp, ignore_index):
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    live = labels != ignore_index
    stats = stats.to(dtype)
    log_p = ((logits.to(dtype) - stats[:, :1]) * inv_temp - stats[:, 1:]).clamp_(min=_MIN_EXP_ARG)
    p = log_p.exp()
    g_lp = torch.zeros_like(stats[:, 0]) if grad_logp is None else torch.where(live, grad_logp.to(dtype), 0.0)
    coef = g_lp[:, None].expand_as(p)
    if grad_entropy is not None:
        g_h = torch.where(live, grad_entropy.to(dtype), 0.0)
        coef = coef + g_h[:, None] * (log_p + entropy.to(dtype)[:, None])
    grad = (p * coef).neg_()
    safe = torch.where(live, labels, 0).long()
    grad.scatter_add_(1, safe[:, None], g_lp[:, None])
    # ignored rows: zero, even when undefined; an undefined row's NaN log_sum already makes its grad NaN
    return torch.where(live[:, None], grad * inv_temp, 0.0).to(logits.dtype)


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
# instead of breaking the graph on numpy buffers / Triton launches. ``labels`` is flat int64
# (rows,), ``impl`` the concrete engine ("triton" | "cpp" | "torch"); the op itself addresses the
# rows of ``logits`` in place (views) or copies them once (addressable_rows).
@torch.library.custom_op("hcrlhf::token_logprobs_fwd", mutates_args=())
def token_logprobs_fwd(logits: torch.Tensor, labels: torch.Tensor, inv_temp: float, ignore_index: int,
                       with_entropy: bool, inplace_backward: bool, impl: str,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp (rows,), stats (rows, 2), entropy (rows,) or (0,) without ``with_entropy``).

    ``inplace_backward`` is not used by the forward: it tells the autograd formula which backward
    op to run (hcrlhf::token_logprobs_bwd_ overwrites the logits with their gradient).
    """
    logits, layout = addressable_rows(logits)
    logp, stats, entropy = forward_rows(impl, logits, layout, labels, inv_temp, ignore_index, with_entropy)
    return logp, stats, entropy if with_entropy else logp.new_empty(0)


@token_logprobs_fwd.register_fake
def _(logits, labels, inv_temp, ignore_index, with_entropy, inplace_backward, impl):
    rows = labels.shape[0]
    dtype = _compute_dtype(logits)
    logp = logits.new_empty(rows, dtype=dtype)
    entropy = logits.new_empty(rows if with_entropy else 0, dtype=dtype)
    return logp, logits.new_empty(rows, 2, dtype=dtype), entropy


@torch.library.custom_op("hcrlhf::token_logprobs_bwd", mutates_args=())
def token_logprobs_bwd(logits: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor,
                       entropy: torch.Tensor | None, grad_logp: torch.Tensor | None,
                       grad_entropy: torch.Tensor | None, inv_temp: float, ignore_index: int,
                       impl: str) -> torch.Tensor:
    """Gradient w.r.t. ``logits`` (a new contiguous tensor of the logits' shape and dtype)."""
    logits, layout = addressable_rows(logits)
    return backward_rows(impl, logits, layout, labels, stats, entropy, _as_rows(grad_logp, stats.dtype),
                         _as_rows(grad_entropy, stats.dtype), inv_temp, ignore_index, inplace=False)


@token_logprobs_bwd.register_fake
def _(logits, labels, stats, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, impl):
    return logits.new_empty(logits.shape)


@torch.library.custom_op("hcrlhf::token_logprobs_bwd_", mutates_args=("logits",))
def token_logprobs_bwd_(logits: torch.Tensor, labels: torch.Tensor, stats: torch.Tensor,
                        entropy: torch.Tensor | None, grad_logp: torch.Tensor | None,
                        grad_entropy: torch.Tensor | None, inv_temp: float, ignore_index: int,
                        impl: str) -> None:
    """``inplace_backward``: overwrite ``logits`` with their gradient (no logits-sized buffer when
    its rows are addressable in place, as ops.token_logprobs arranges)."""
    rows, layout = addressable_rows(logits)
    args = (labels, stats, entropy, _as_rows(grad_logp, stats.dtype), _as_rows(grad_entropy, stats.dtype),
            inv_temp, ignore_index)
    if rows is logits:
        backward_rows(impl, logits, layout, *args, inplace=True)
    else:  # not addressable in place (only a caller other than ops.token_logprobs passes such logits)
        logits.copy_(backward_rows(impl, rows, layout, *args, inplace=False))


@token_logprobs_bwd_.register_fake
def _(logits, labels, stats, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, impl):
    return None


def _fwd_setup_context(ctx, inputs, output):
    logits, labels, inv_temp, ignore_index, with_entropy, inplace_backward, impl = inputs
    _, stats, entropy = output
    ctx.mark_non_differentiable(stats)
    if not with_entropy:
        ctx.mark_non_differentiable(entropy)
    ctx.save_for_backward(logits, labels, stats, entropy if with_entropy else None)
    ctx.config = (inv_temp, ignore_index, with_entropy, inplace_backward, impl)
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, grad_logp, grad_stats, grad_entropy):
    logits, labels, stats, entropy = ctx.saved_tensors
    inv_temp, ignore_index, with_entropy, inplace, impl = ctx.config
    if not with_entropy:
        grad_entropy = None
    if grad_logp is None and grad_entropy is None:
        return (None,) * 7
    args = (labels, stats, entropy, grad_logp, grad_entropy, inv_temp, ignore_index, impl)
    if inplace:
        torch.ops.hcrlhf.token_logprobs_bwd_(logits, *args)
        grad = logits  # now holds its own gradient
    else:
        grad = torch.ops.hcrlhf.token_logprobs_bwd(logits, *args)
    return (grad,) + (None,) * 6


token_logprobs_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    inplace_backward: bool = False,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label under ``softmax(logits / temperature)``; optionally the entropy.

    Args:
        logits: (..., V) float32 / bfloat16 / float16 (float64 runs the reference). Any leading
            shape; the last dim should be contiguous (a stride != 1 costs one copy); other strides
            are arbitrary, so ``logits[:, :-1]`` is read in place without a copy.
        labels: (...) int64 (or int32), the leading shape of ``logits``; each in [0, V) or equal to
            ``ignore_index``. CPU labels are range-checked (ValueError); CUDA labels only when the
            environment sets ``HCRLHF_CHECK_LABELS=1`` (a host sync) — otherwise a bad label gives
            NaN, never an out-of-bounds read.
        temperature: >= ``MIN_TEMPERATURE`` (1e-4; ValueError below it); the logits are divided by it
            (sampling temperature). Exact to float32 relative precision down to the floor: the
            kernels scale ``logits - max`` rather than the logits themselves.
        return_entropy: also return the entropy of each position's distribution.
        ignore_index: positions with this label give 0 log-prob, 0 entropy and zero gradient,
            whatever their logits hold.
        inplace_backward: let the backward write the gradient into the logits' own memory
            instead of a new (..., V) buffer (saves one logits-sized allocation). Only use it when
            nothing else reads the logits afterwards (another op's backward, a second backward with
            ``retain_graph``, or your own code): their values are overwritten. Logits that require
            grad and are a leaf (or a view of one), or whose elements share memory (an expanded,
            stride-0 view), are refused with a ValueError on every impl; the "torch" impl otherwise
            ignores the flag. Supported under torch.compile (the backward op declares the
            mutation; docs/ops.md#torchcompile).
        impl: "auto" | "triton" | "cpp" | "torch" (see ``hcrlhf.ops._dispatch``).

    Returns:
        ``logp`` shaped like ``labels``, float32 (float64 for float64 logits); with
        ``return_entropy`` the tuple ``(logp, entropy)``. Differentiable w.r.t. ``logits`` through
        both outputs (any upstream gradients); the gradient has the logits' dtype.

    Equivalent naive code (which materialises a full-size fp32 log-softmax; the kernels instead
    stream each row once with an online max/sum in fp32 and keep only its logsumexp)::

        z = logits.float() / temperature
        log_probs = z.log_softmax(-1)
        logp = log_probs.gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        entropy = -(log_probs.exp() * log_probs).sum(-1)
        logp, entropy = (torch.where(labels == ignore_index, 0.0, x) for x in (logp, entropy))

    Backward: ``d logp/dz = onehot(label) - p`` and ``d H/dz = -p·(log p + H)``, recomputed in one
    pass from the saved per-row max and log-sum (the logsumexp), scaled by ``1/temperature``.

    Non-finite logits (one answer on every impl, docs/ops.md#token_logprobs): a -inf logit has
    p = 0 (a -inf label logit gives logp = -inf with a finite gradient); a row with a NaN or +inf
    logit, or with every logit -inf, gives NaN log-prob, entropy and gradient; an ignored position
    gives 0, 0 and a zero gradient whatever its logits.
    """
    _checks.check_tensor(OP, "logits", logits)
    if logits.dim() < 1:
        raise ValueError(f"{OP}: logits must have shape (..., V), got a 0-dim tensor")
    vocab = logits.shape[-1]
    if vocab == 0:
        raise ValueError(f"{OP}: logits must have a non-empty last dim V, got shape {tuple(logits.shape)}")
    device = logits.device
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{OP}: labels must be a torch.Tensor, got {type(labels).__name__}")
    _checks.check_same_device(OP, logits=logits, labels=labels)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"{OP}: ignore_index must be an int, got {type(ignore_index).__name__}")
    _checks.check_labels(OP, labels, tuple(logits.shape[:-1]), vocab, ignore_index,
                         read_values=read_label_values(device))
    temperature = _checks.check_temperature(OP, temperature)
    if inplace_backward:
        _checks.check_inplace_target(OP, "logits", logits)
    float64 = logits.dtype == torch.float64
    chosen = resolve_impl(impl, device, op=OP, float64=float64, float64_impls=("torch",))
    if chosen == "torch":
        return reference.token_logprobs(logits, labels, temperature, return_entropy, ignore_index)

    logits, _ = addressable_rows(logits)
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    logp, _, entropy = torch.ops.hcrlhf.token_logprobs_fwd(
        logits, flat_labels, 1.0 / temperature, ignore_index, bool(return_entropy), bool(inplace_backward), chosen
    )
    if return_entropy:
        return logp.view(labels.shape), entropy.view(labels.shape)
    return logp.view(labels.shape)
