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
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from hcrlhf._op_outputs import new_outputs


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
def _gae_kernel(
    rewards_ptr, values_ptr, mask_ptr, adv_ptr, ret_ptr,
    B, T,
    stride_rb, stride_rt, stride_vb, stride_vt, stride_mb, stride_mt,
    gamma, gamma_gae_lambda,
    ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)[:, None]
    carry_running = tl.zeros((ROWS,), tl.float32)
    carry_next = tl.zeros((ROWS,), tl.float32)
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


def block_t_for(length: int) -> int:
    """Chunk length along T: the whole row up to 1024 positions, then 1024-wide chunks.

    The CPU interpreter runs a scan element by element in Python, so there the chunks are short
    (64): small test shapes then still cross several chunks and exercise the carry.
    """
    cap = 64 if os.environ.get("TRITON_INTERPRET", "0") == "1" else 1024
    return max(16, min(triton.next_power_of_2(max(length, 1)), cap))


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, gae_lambda: float):
    """Launch the GAE scan. Inputs (B, T) on one device, any strides; returns float32 (adv, ret)."""
    batch, length = rewards.shape
    advantages, returns = new_outputs(2, (batch, length), torch.float32, rewards.device)
    if advantages.numel() == 0:
        return advantages, returns
    rows = 1  # rows per program: one keeps B programs in flight on a GPU
    _gae_kernel[(triton.cdiv(batch, rows),)](
        rewards, values, mask, advantages, returns, batch, length,
        rewards.stride(0), rewards.stride(1), values.stride(0), values.stride(1),
        mask.stride(0), mask.stride(1),
        float(gamma), float(gamma * gae_lambda),
        ROWS=rows, BLOCK_T=block_t_for(length),
    )
    return advantages, returns
