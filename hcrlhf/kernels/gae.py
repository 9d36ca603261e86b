"""Triton GAE as a parallel reverse scan along T (docs/ops.md#gae).

The masked GAE recursion is an affine map on the state s = (running, next_value) per position:

    valid t:   running' = γλ·running + γ·next_value + (r_t − v_t);   next_value' = v_t
    masked t:  identity (masked positions are transparent)

Affine maps compose associatively, so each chunk of T is one ``tl.associative_scan`` over the map
coefficients; the state after a chunk is carried into the next chunk on its left. Lanes hold the
chunk's positions in DESCENDING order (lane 0 = rightmost position), so a plain forward scan runs
right to left without ``reverse=True`` (not in every Triton 3.x, and a flip when it is).

The matrix of every composed map has the form [[p, q], [0, e]], so five numbers describe an
element: (p, q, e, a, b) with running' = p·running + q·next + a and next' = e·next + b.

Whitening (``whiten=True``) stays inside the one call: the scan kernel also keeps each row's
(count, mean, M2) of the advantages over its valid positions (Chan et al.'s pairwise update per
chunk) and writes them to a (B, 3) buffer; a second kernel combines the B row moments into the
batch mean and variance and rescales the advantages in place. The returns are never whitened.
Both kernels are shared with safe_advantages.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hcrlhf._op_outputs import new_outputs

# Variance codes of the whitening kernel (hcrlhf.reference.gae.WHITEN_VARIANCES).
WHITEN_VARIANCE_CODES = {"unbiased": 0, "population": 1, "none": 2}
WHITEN_EPS = 1e-8  # hcrlhf.reference.gae.WHITEN_EPS


@triton.jit
def affine_combine(p1, q1, e1, a1, b1, p2, q2, e2, a2, b2):
    # Lanes run right to left, so the first map is the one to the right (applied first) and the
    # second is applied after it: the result is map2 ∘ map1.
    return (
        p2 * p1,
        p2 * q1 + q2 * e1,
        e2 * e1,
        p2 * a1 + q2 * b1 + a2,
        e2 * b1 + b2,
    )


@triton.jit
def gae_chunk(rewards, values, valid, carry_running, carry_next, gamma, gamma_gae_lambda,
              BLOCK_T: tl.constexpr):
    """GAE over one [ROWS, BLOCK_T] chunk (lanes in descending position order) given the state
    from the chunk to its right.

    Returns (advantages, returns, carry_running, carry_next) with the carries for the next chunk
    to the left. Invalid lanes (masked or out of range) must have valid == False.
    """
    p = tl.where(valid, gamma_gae_lambda, 1.0)
    q = tl.where(valid, gamma, 0.0)
    e = tl.where(valid, 0.0, 1.0)
    a = tl.where(valid, rewards - values, 0.0)
    b = tl.where(valid, values, 0.0)
    p, q, e, a, b = tl.associative_scan((p, q, e, a, b), 1, affine_combine)
    running = p * carry_running[:, None] + q * carry_next[:, None] + a
    next_value = e * carry_next[:, None] + b
    leftmost = (tl.arange(0, BLOCK_T) == BLOCK_T - 1)[None, :]  # the last lane is the leftmost position
    carry_running = tl.sum(tl.where(leftmost, running, 0.0), axis=1)
    carry_next = tl.sum(tl.where(leftmost, next_value, 0.0), axis=1)
    advantages = tl.where(valid, running, 0.0)
    returns = tl.where(valid, running + values, 0.0)
    return advantages, returns, carry_running, carry_next


@triton.jit
def update_moments(x, valid, count, mean, m2):
    """Fold one [ROWS, BLOCK_T] chunk into each row's running (count, mean, M2) over valid lanes."""
    n_b = tl.sum(valid.to(tl.float32), axis=1)
    mean_b = tl.sum(tl.where(valid, x, 0.0), axis=1) / tl.maximum(n_b, 1.0)
    centred = tl.where(valid, x - mean_b[:, None], 0.0)
    m2_b = tl.sum(centred * centred, axis=1)
    total = count + n_b
    delta = mean_b - mean
    mean = mean + delta * n_b / tl.maximum(total, 1.0)
    m2 = m2 + m2_b + delta * delta * count * n_b / tl.maximum(total, 1.0)
    return total, mean, m2


@triton.jit
def _whiten_kernel(x_ptr, mask_ptr, stats_ptr, B, T, s_m_b, s_m_t, eps,
                   VARIANCE: tl.constexpr, SHIFT_MEAN: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_T: tl.constexpr):
    """x (B, T) contiguous ← (x − mean)·scale (+ mean without SHIFT_MEAN) on valid positions, 0 elsewhere.

    Every program combines all B row moments itself (3·B floats, no extra launch or host sync)
    and then whitens row blocks pid, pid + programs, … (the grid is capped, so the moments are
    read a bounded number of times).
    """
    total = tl.zeros((BLOCK_B,), tl.float32)
    weighted = tl.zeros((BLOCK_B,), tl.float32)
    for start in range(0, B, BLOCK_B):
        idx = start + tl.arange(0, BLOCK_B)
        n_i = tl.load(stats_ptr + idx * 3 + 0, mask=idx < B, other=0.0)
        mean_i = tl.load(stats_ptr + idx * 3 + 1, mask=idx < B, other=0.0)
        total += n_i
        weighted += n_i * mean_i
    n = tl.sum(total, axis=0)
    mean = tl.sum(weighted, axis=0) / tl.maximum(n, 1.0)
    if VARIANCE == 2:
        scale = 1.0
    else:
        spread = tl.zeros((BLOCK_B,), tl.float32)
        for start in range(0, B, BLOCK_B):
            idx = start + tl.arange(0, BLOCK_B)
            n_i = tl.load(stats_ptr + idx * 3 + 0, mask=idx < B, other=0.0)
            mean_i = tl.load(stats_ptr + idx * 3 + 1, mask=idx < B, other=0.0)
            m2_i = tl.load(stats_ptr + idx * 3 + 2, mask=idx < B, other=0.0)
            spread += m2_i + n_i * (mean_i - mean) * (mean_i - mean)
        m2 = tl.sum(spread, axis=0)
        if VARIANCE == 0:  # unbiased, rsqrt(var + eps) (verl)
            var = tl.where(n > 1.0, m2 / tl.maximum(n - 1.0, 1.0), 0.0)
            scale = 1.0 / tl.sqrt(var + eps)
        else:  # population, rsqrt(max(var, eps)) (OpenRLHF)
            var = m2 / tl.maximum(n, 1.0)
            scale = 1.0 / tl.sqrt(tl.maximum(var, eps))
    if SHIFT_MEAN:
        shift = 0.0
    else:
        shift = mean

    for first_row in range(tl.program_id(0) * ROWS, B, tl.num_programs(0) * ROWS):
        rows = first_row + tl.arange(0, ROWS)
        rows64 = rows.to(tl.int64)[:, None]
        for start in range(0, T, BLOCK_T):
            cols = start + tl.arange(0, BLOCK_T)
            inside = (rows < B)[:, None] & (cols < T)[None, :]
            cols64 = cols.to(tl.int64)[None, :]
            m = tl.load(mask_ptr + rows64 * s_m_b + cols64 * s_m_t, mask=inside, other=0)
            x = tl.load(x_ptr + rows64 * T + cols64, mask=inside, other=0.0)
            tl.store(x_ptr + rows64 * T + cols64, tl.where(m != 0, (x - mean) * scale + shift, 0.0), mask=inside)


def whiten_in_place(x: torch.Tensor, mask: torch.Tensor, stats: torch.Tensor, variance: str, shift_mean: bool,
                    block_t: int) -> None:
    """Launch the whitening pass over x (B, T) float32 contiguous given the (B, 3) row moments."""
    batch, length = x.shape
    rows = 4
    blocks = triton.cdiv(batch, rows)
    if x.device.type == "cuda":
        cap = 4 * torch.cuda.get_device_properties(x.device).multi_processor_count
    else:
        cap = 4
    _whiten_kernel[(max(1, min(blocks, cap)),)](
        x, mask, stats, batch, length, mask.stride(0), mask.stride(1), WHITEN_EPS,
        VARIANCE=WHITEN_VARIANCE_CODES[variance], SHIFT_MEAN=bool(shift_mean),
        ROWS=rows, BLOCK_B=min(1024, triton.next_power_of_2(batch)), BLOCK_T=min(block_t, 256),
    )


@triton.jit
def _gae_kernel(
    rewards_ptr, values_ptr, mask_ptr, adv_ptr, ret_ptr, stats_ptr,
    B, T,
    stride_rb, stride_rt, stride_vb, stride_vt, stride_mb, stride_mt,
    gamma, gamma_gae_lambda,
    WHITEN: tl.constexpr, ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)[:, None]
    carry_running = tl.zeros((ROWS,), tl.float32)
    carry_next = tl.zeros((ROWS,), tl.float32)
    count = tl.zeros((ROWS,), tl.float32)  # the row's moments of the advantages, for whitening
    mean = tl.zeros((ROWS,), tl.float32)
    m2 = tl.zeros((ROWS,), tl.float32)
    n_chunks = tl.cdiv(T, BLOCK_T)
    for k in range(0, n_chunks):
        cols = (n_chunks - k) * BLOCK_T - 1 - tl.arange(0, BLOCK_T)  # descending: right to left
        inside = row_ok[:, None] & (cols < T)[None, :]
        cols64 = cols.to(tl.int64)[None, :]
        r = tl.load(rewards_ptr + rows64 * stride_rb + cols64 * stride_rt, mask=inside, other=0.0).to(tl.float32)
        v = tl.load(values_ptr + rows64 * stride_vb + cols64 * stride_vt, mask=inside, other=0.0).to(tl.float32)
        m = tl.load(mask_ptr + rows64 * stride_mb + cols64 * stride_mt, mask=inside, other=0)
        valid = inside & (m != 0)
        adv, ret, carry_running, carry_next = gae_chunk(
            r, v, valid, carry_running, carry_next, gamma, gamma_gae_lambda, BLOCK_T
        )
        out = rows64 * T + cols64
        tl.store(adv_ptr + out, adv, mask=inside)
        tl.store(ret_ptr + out, ret, mask=inside)
        if WHITEN:
            count, mean, m2 = update_moments(adv, valid, count, mean, m2)
    if WHITEN:
        tl.store(stats_ptr + rows * 3 + 0, count, mask=row_ok)
        tl.store(stats_ptr + rows * 3 + 1, mean, mask=row_ok)
        tl.store(stats_ptr + rows * 3 + 2, m2, mask=row_ok)


def block_t_for(length: int) -> int:
    """Chunk length along T: the whole row up to 1024 positions, then 1024-wide chunks.

    The CPU interpreter runs a scan element by element in Python, so there the chunks are short
    (64): small test shapes then still cross several chunks and exercise the carry.
    """
    cap = 64 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 1024
    return max(16, min(triton.next_power_of_2(max(length, 1)), cap))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, gae_lambda: float, *,
        whiten: bool = False, whiten_variance: str = "unbiased", whiten_shift_mean: bool = True):
    """Launch the GAE scan (and the whitening pass). Inputs (B, T) on one device, any strides;
    returns float32 (adv, ret)."""
    batch, length = rewards.shape
    advantages, returns = new_outputs(2, (batch, length), torch.float32, rewards.device)
    if advantages.numel() == 0:
        return advantages, returns
    rows = 1  # rows per program: one keeps B programs in flight on a GPU
    block_t = block_t_for(length)
    stats = torch.empty(batch, 3, dtype=torch.float32, device=rewards.device) if whiten else advantages
    _gae_kernel[(triton.cdiv(batch, rows),)](
        rewards, values, mask, advantages, returns, stats, batch, length,
        rewards.stride(0), rewards.stride(1), values.stride(0), values.stride(1),
        mask.stride(0), mask.stride(1),
        float(gamma), float(gamma * gae_lambda),
        WHITEN=bool(whiten), ROWS=rows, BLOCK_T=block_t,
    )
    if whiten:
        whiten_in_place(advantages, mask, stats, whiten_variance, whiten_shift_mean, block_t)
    return advantages, returns
