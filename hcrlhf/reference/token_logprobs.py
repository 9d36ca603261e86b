"""Reference token log-probabilities and entropy from logits (docs/ops.md#token_logprobs)."""

from __future__ import annotations

import torch


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label under ``softmax(logits / temperature)``, and optionally entropy.

    logits: (..., V) float16/bfloat16/float32/float64; labels: (...) integers. Returns float32
    (float64 for float64 logits) tensors shaped like ``labels``; positions whose label equals
    ``ignore_index`` give 0 (log-prob and entropy) and a zero gradient, whatever their logits.
    Differentiable w.r.t. logits through torch autograd. This is the plain, memory-hungry spec: it
    materialises a full-size log-softmax.

    Non-finite logits: a -inf logit has probability 0 (a -inf label logit gives log-prob -inf and
    a finite gradient). A row whose softmax is undefined -- a NaN or +inf logit, or every logit
    -inf -- gives NaN log-prob, NaN entropy and a NaN gradient row.
    """
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    z = logits.to(dtype) / temperature
    ignored = labels == ignore_index
    # Ignored positions never read their logits (so even NaN logits give them a zero gradient).
    z = torch.where(ignored.unsqueeze(-1), torch.zeros_like(z), z)
    # NaN is added (not substituted) to undefined rows so that their gradient is NaN too.
    undefined = ~torch.isfinite(z.detach().amax(dim=-1, keepdim=True))
    z = z + torch.where(undefined, torch.nan, 0.0).to(dtype)
    safe_labels = torch.where(ignored, torch.zeros_like(labels), labels).long()
    log_probs = torch.log_softmax(z, dim=-1)
    logp = log_probs.gather(-1, safe_labels.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    if not return_entropy:
        return logp
    probs = log_probs.exp()
    # H = logsumexp(z) - Σ p·z = -Σ p·log p. A -inf logit has p = 0 and contributes 0: zero its
    # log p before the product so that neither the value nor the gradient becomes 0·inf = NaN.
    finite_log_probs = torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))
    entropy = -(probs * finite_log_probs).sum(-1)
    entropy = torch.where(ignored, torch.zeros_like(entropy), entropy)
    return logp, entropy
