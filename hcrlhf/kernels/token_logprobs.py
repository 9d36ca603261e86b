"""Triton kernels for token log-probabilities and entropy from logits (docs/ops.md#token_logprobs).

Forward: one program per row streams the V logits once in blocks of ``BLOCK_V`` with an online
max / sum in fp32, and gathers the label's logit with one scalar load; the entropy comes from the
same pass. It saves the row's stats (max x, log Σ exp((x - max x)·inv_temp)) for the logits x,
i.e. the logsumexp of z = x·inv_temp split in two, so that log p = (x - max x)·inv_temp - log_sum
keeps full fp32 precision near the mode; the difference is taken before scaling, so tiny
temperatures lose nothing either. Backward: one program per row recomputes the softmax from those
stats in a single pass and writes the gradient (into a new buffer, or over the logits).

A row is live unless its label equals ``ignore_index`` or its row-mask entry is False; without
labels (``HAS_LABELS`` off: entropy only, or several labels per row gathered by the caller) only
the row mask decides. A dead row is never read: its loop runs zero blocks (forward) and its loads
are masked off (backward, which writes zeros).

A row whose softmax is undefined -- a NaN or +inf logit, or every logit -inf -- gets log_sum =
NaN, hence NaN log-prob, entropy and gradient (docs/ops.md#token_logprobs). NaN is mapped to +inf
for the max, so the rule holds whatever NaN semantics the GPU's max/min have.

Rows are addressed as ``base + (row // inner) * stride_outer + (row % inner) * stride_inner`` in
int64, so (B, T, V) views such as ``logits[:, :-1]`` are read in place and N·V may exceed 2^31.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# exp(x) underflows to 0 below about -87.3 in fp32; clamping there keeps exp(d)·d finite (not
# NaN) for a -inf logit and changes nothing at fp32 resolution. Matches csrc/logprobs.cpp.
# (A constexpr: compiled Triton rejects plain-float globals inside @triton.jit functions.)
MIN_EXP_ARG = tl.constexpr(-87.3)

_GPU_BLOCK_V = 4096
_INTERPRETER_BLOCK_V = 16384  # fewer, larger blocks: the interpreter's cost is per block


@triton.jit
def _row_base(ptr, row, inner, stride_outer, stride_inner):
    return ptr + (row // inner) * stride_outer + (row % inner) * stride_inner


@triton.jit
def _row_is_live(labels_ptr, row_mask_ptr, row, ignore_index, HAS_LABELS: tl.constexpr, HAS_ROW_MASK: tl.constexpr):
    live = row >= 0  # a scalar True
    if HAS_LABELS:
        live = live & (tl.load(labels_ptr + row) != ignore_index)
    if HAS_ROW_MASK:
        live = live & (tl.load(row_mask_ptr + row) != 0)
    return live


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr, labels_ptr, row_mask_ptr, logp_ptr, stats_ptr, entropy_ptr,
    V, inner, stride_outer, stride_inner, inv_temp, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_ROW_MASK: tl.constexpr, HAS_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = _row_base(logits_ptr, row, inner, stride_outer, stride_inner)
    live = _row_is_live(labels_ptr, row_mask_ptr, row, ignore_index, HAS_LABELS, HAS_ROW_MASK)
    # A dead row runs no block: it is never read (and m stays -inf).
    v_live = tl.where(live, V, 0)
    # Running stats relative to the running max logit m, with d = (x - m)·inv_temp:
    # s = Σ exp(d), t = Σ exp(d)·d. Keeping t relative to m (not Σ p·z) avoids cancellation in
    # H = log s - t/s for large logits.
    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    for start in range(0, v_live, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        # NaN counts as +inf for the max: either makes m = +inf, i.e. the row undefined.
        m_new = tl.maximum(m, tl.max(tl.where(x == x, x, float("inf")), axis=0))
        # While every logit so far is -inf, shift by 0 instead of -inf (which would give NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        # Rescale the running sums to the new max; while m is -inf they hold only exp(-inf) = 0
        # terms (clamped to tiny values), which are dropped rather than multiplied by inf.
        m_was_inf = m == float("-inf")
        shift = tl.where(m_was_inf, 0.0, (m - m_safe) * inv_temp)
        alpha = tl.where(m_was_inf, 0.0, tl.exp(shift))
        d = tl.maximum((x - m_safe) * inv_temp, MIN_EXP_ARG)
        e = tl.where(cols < V, tl.exp(d), 0.0)
        if HAS_ENTROPY:
            t = alpha * (t + shift * s) + tl.sum(e * d, axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    undefined = (m == float("inf")) | (m == float("-inf"))  # a NaN / +inf logit, or only -inf logits
    m_out = tl.where(undefined, 0.0, m)
    s = tl.where(undefined, 1.0, s)  # s = 0 without a finite logit (a dead row too): no log(0), no 0/0
    log_s = tl.where(undefined, float("nan"), tl.log(s))
    log_s = tl.where(live, log_s, 0.0)  # a dead row's stats (0, 0) are never used
    tl.store(stats_ptr + 2 * row, m_out)
    tl.store(stats_ptr + 2 * row + 1, log_s)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
        in_range = (label >= 0) & (label < V)
        label_logit = tl.load(base + tl.where(in_range, label, 0), mask=live, other=0.0).to(tl.float32)
        # An out-of-range label (unchecked on GPU unless HCRLHF_CHECK_LABELS=1) gives NaN, never a bad read.
        logp = tl.where(in_range, (label_logit - m_out) * inv_temp - log_s, float("nan"))
        tl.store(logp_ptr + row, tl.where(live, logp, 0.0))
    if HAS_ENTROPY:
        entropy = tl.where(undefined, float("nan"), log_s - t / s)
        tl.store(entropy_ptr + row, tl.where(live, entropy, 0.0))


@triton.jit
def _token_logprobs_bwd_kernel(
    logits_ptr, grad_ptr, labels_ptr, row_mask_ptr, stats_ptr, entropy_ptr, grad_logp_ptr, grad_entropy_ptr,
    V, inner, stride_outer, stride_inner, grad_stride_outer, grad_stride_inner, inv_temp, ignore_index,
    HAS_LABELS: tl.constexpr, HAS_ROW_MASK: tl.constexpr, HAS_GRAD_LOGP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, ROUND_BF16_BY_HAND: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = _row_base(logits_ptr, row, inner, stride_outer, stride_inner)
    grad_base = _row_base(grad_ptr, row, inner, grad_stride_outer, grad_stride_inner)
    # a dead row (ignored label, masked-out row) has constant outputs: zero gradient, logits not read
    live = _row_is_live(labels_ptr, row_mask_ptr, row, ignore_index, HAS_LABELS, HAS_ROW_MASK)
    v_live = tl.where(live, V, 0)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row)
    row_max = tl.load(stats_ptr + 2 * row)
    log_sum = tl.load(stats_ptr + 2 * row + 1)
    g_lp = tl.zeros((), tl.float32)
    g_h = tl.zeros((), tl.float32)
    entropy = tl.zeros((), tl.float32)
    if HAS_GRAD_LOGP:
        g_lp = tl.load(grad_logp_ptr + row)
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + row)
        entropy = tl.load(entropy_ptr + row)
    g_lp = tl.where(live, g_lp, 0.0)
    g_h = tl.where(live, g_h, 0.0)
    # NaN gradient for a bad label and for an undefined row (log_sum NaN); zero for a dead row.
    bad = live & (log_sum != log_sum)
    if HAS_LABELS:
        bad = bad | (live & ((label < 0) | (label >= V)))
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        x = tl.load(base + cols, mask=cols < v_live, other=0.0).to(tl.float32)  # a dead row: no read
        log_p = tl.maximum((x - row_max) * inv_temp - log_sum, MIN_EXP_ARG)
        p = tl.exp(log_p)
        # d logp / dz = onehot - p;  d H / dz = -p·(log p + H)
        grad = -p * (g_lp + g_h * (log_p + entropy))
        if HAS_LABELS:  # without labels, g_lp is the row's total and the caller adds the one-hot terms
            grad += tl.where(cols == label, g_lp, 0.0)
        grad = tl.where(bad, float("nan"), tl.where(live, grad * inv_temp, 0.0))
        # Each block is loaded before it is stored, so the gradient may overwrite the logits.
        if ROUND_BF16_BY_HAND:
            # The interpreter truncates fp32 -> bf16; the GPU rounds to nearest even. Do it by hand.
            bits = grad.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            tl.store(grad_base + cols, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=cols < V)
        else:
            tl.store(grad_base + cols, grad.to(grad_ptr.dtype.element_ty), mask=cols < V)


def _block_v(V: int, block_v: int | None) -> int:
    if block_v is not None:
        return block_v
    cap = _INTERPRETER_BLOCK_V if _interpreted() else _GPU_BLOCK_V
    return min(cap, triton.next_power_of_2(V))


def _interpreted() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _or(x: torch.Tensor | None, placeholder: torch.Tensor) -> torch.Tensor:
    """A pointer argument the kernel does not read (its HAS_* flag is off)."""
    return placeholder if x is None else x


def token_logprobs_forward(logits: torch.Tensor, layout: tuple[int, int, int, int], labels: torch.Tensor | None,
                           inv_temp: float, ignore_index: int, with_entropy: bool,
                           block_v: int | None = None, row_mask: torch.Tensor | None = None):
    """Launch the forward kernel; `layout` = (rows, inner, stride_outer, stride_inner) in elements.

    ``labels`` (rows,) int64 or None (no log-prob); ``row_mask`` (rows,) bool or None (all rows live).
    Returns fp32 (logp (rows,) or None, stats (rows, 2) = [max x, log Σ exp((x - max)·inv_temp)],
    entropy (rows,) or None).
    """
    rows, inner, stride_outer, stride_inner = layout
    V = logits.shape[-1]
    stats = torch.empty(rows, 2, dtype=torch.float32, device=logits.device)
    logp = torch.empty(rows, dtype=torch.float32, device=logits.device) if labels is not None else None
    entropy = torch.empty(rows, dtype=torch.float32, device=logits.device) if with_entropy else None
    if rows == 0:
        return logp, stats, entropy
    block = _block_v(V, block_v)
    _token_logprobs_fwd_kernel[(rows,)](
        logits, _or(labels, stats), _or(row_mask, stats), _or(logp, stats), stats, _or(entropy, stats),
        V, inner, stride_outer, stride_inner, float(inv_temp), int(ignore_index),
        HAS_LABELS=labels is not None, HAS_ROW_MASK=row_mask is not None, HAS_ENTROPY=with_entropy,
        BLOCK_V=block, num_warps=8 if block >= 4096 else 4,
    )
    return logp, stats, entropy


def token_logprobs_backward(logits: torch.Tensor, layout: tuple[int, int, int, int], labels: torch.Tensor | None,
                            stats: torch.Tensor, entropy: torch.Tensor | None, grad_logp: torch.Tensor | None,
                            grad_entropy: torch.Tensor | None, inv_temp: float, ignore_index: int,
                            grad: torch.Tensor, grad_strides: tuple[int, int], block_v: int | None = None,
                            row_mask: torch.Tensor | None = None):
    """Write the gradient w.r.t. the logits into `grad` (which may be `logits` itself).

    Without ``labels`` there is no one-hot term: ``grad_logp`` is then each row's total upstream
    gradient Σ_k g_k, and the caller adds g_k at its label columns."""
    rows, inner, stride_outer, stride_inner = layout
    if rows == 0:
        return grad
    V = logits.shape[-1]
    block = _block_v(V, block_v)
    _token_logprobs_bwd_kernel[(rows,)](
        logits, grad, _or(labels, stats), _or(row_mask, stats), stats, _or(entropy, stats),
        _or(grad_logp, stats), _or(grad_entropy, stats),
        V, inner, stride_outer, stride_inner, grad_strides[0], grad_strides[1], float(inv_temp),
        int(ignore_index), HAS_LABELS=labels is not None, HAS_ROW_MASK=row_mask is not None,
        HAS_GRAD_LOGP=grad_logp is not None, HAS_GRAD_ENTROPY=grad_entropy is not None,
        BLOCK_V=block, ROUND_BF16_BY_HAND=_interpreted() and grad.dtype == torch.bfloat16,
        num_warps=8 if block >= 4096 else 4,
    )
    return grad
