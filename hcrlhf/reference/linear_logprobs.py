"""Reference log-probabilities straight from hidden states and an lm_head (docs/ops.md#linear_logprobs)."""

from __future__ import annotations

import torch

from hcrlhf.reference.token_logprobs import token_logprobs


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs(hidden @ weight.T + bias, labels, ...)`` computed the plain way.

    hidden: (N, H); weight: (V, H); bias: (V,) or None; labels: (N,). Materialises the full (N, V)
    logits: this is the executable spec, not the memory-bounded implementation
    (:func:`hcrlhf.ops.linear_logprobs`). Differentiable w.r.t. hidden, weight and bias.
    """
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return token_logprobs(logits, labels, temperature, return_entropy, ignore_index)
