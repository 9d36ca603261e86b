"""Reference token log-probabilities and entropy from logits (docs/ops.md#token_logprobs)."""

from __future__ import annotations

import torch


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    *,
    out_dtype: torch.dtype | None = None,
    row_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of each label under ``softmax(logits / temperature)``, and optionally entropy.

    logits: (..., V) float16/bfloat16/float32/float64. labels: (...) integers (one label per
    position), (..., K) (``labels.dim() == logits.dim()``: K labels per position), or None (the
    entropy alone; needs ``return_entropy``). row_mask: None, or bool / integer (0 = masked out)
    of the leading shape (...) -- or, with K labels, of the labels' shape (one entry per label).

    A label equal to ``ignore_index`` (or masked out by a per-label ``row_mask``) gives log-prob 0
    and no gradient. A position is *dead* when its ``row_mask`` entry is False or when it has
    labels and every one of them is ignored: log-prob 0, entropy 0 and a zero gradient, whatever
    its logits hold (they are never read). With one label per position this is the familiar
    ``ignore_index`` rule.

    Returns float32 (float64 for float64 logits) tensors, or ``out_dtype`` when given: the
    log-probs shaped like ``labels`` and the entropy of the leading shape; ``(logp, entropy)``
    with ``return_entropy``, the entropy alone without labels. Differentiable w.r.t. logits
    through torch autograd. This is the plain, memory-hungry spec: it materialises a full-size
    log-softmax.

    Non-finite logits: a -inf logit has probability 0 (a -inf label logit gives log-prob -inf and
    a finite gradient). A row whose softmax is undefined -- a NaN or +inf logit, or every logit
    -inf -- gives NaN log-prob, NaN entropy and a NaN gradient row.
    """
    if labels is None and not return_entropy:
        raise ValueError("token_logprobs: labels=None computes the entropy alone and needs return_entropy=True")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    lead = logits.shape[:-1]
    many = labels is not None and labels.dim() == logits.dim()
    # Every case as a (..., K) grid of labels: K labels, one label (K = 1), no label (K = 0).
    if labels is None:
        grid = torch.zeros(*lead, 0, dtype=torch.long, device=logits.device)
    else:
        grid = labels if many else labels.unsqueeze(-1)
    label_live = grid != ignore_index
    keep = None if row_mask is None else row_mask != 0
    if keep is not None and keep.dim() == grid.dim():  # one entry per label: like ignore_index
        label_live = label_live & keep
        keep = None
    row_live = label_live.any(-1) if labels is not None else torch.ones(lead, dtype=torch.bool, device=logits.device)
    if keep is not None:
        row_live = row_live & keep
        label_live = label_live & keep.unsqueeze(-1)

    z = logits.to(dtype) / temperature
    # Dead rows never read their logits (so even NaN logits give them a zero gradient).
    z = torch.where(row_live.unsqueeze(-1), z, torch.zeros_like(z))
    # NaN is added (not substituted) to undefined rows so that their gradient is NaN too.
    undefined = ~torch.isfinite(z.detach().amax(dim=-1, keepdim=True))
    z = z + torch.where(undefined, torch.nan, 0.0).to(dtype)
    log_probs = torch.log_softmax(z, dim=-1)
    safe = torch.where(label_live, grid, torch.zeros_like(grid)).long()
    logp = log_probs.gather(-1, safe)
    logp = torch.where(label_live, logp, torch.zeros_like(logp))
    if not many:
        logp = logp.squeeze(-1)
    cast = (lambda x: x) if out_dtype is None else (lambda x: x.to(out_dtype))
    if not return_entropy:
        return cast(logp)
    probs = log_probs.exp()
    # H = logsumexp(z) - Σ p·z = -Σ p·log p. A -inf logit has p = 0 and contributes 0: zero its
    # log p before the product so that neither the value nor the gradient becomes 0·inf = NaN.
    finite_log_probs = torch.where(probs > 0, log_probs, torch.zeros_like(log_probs))
    entropy = -(probs * finite_log_probs).sum(-1)
    entropy = torch.where(row_live, entropy, torch.zeros_like(entropy))
    if labels is None:
        return cast(entropy)
    return cast(logp), cast(entropy)
