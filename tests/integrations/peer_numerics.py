"""Shared helpers of the verl / OpenRLHF integration tests: the accuracy rule of the TRL tests
(docs/ops.md#how-the-kernels-are-tested) with the peer's own function as the low-precision baseline,
and float64 truths computed from the very same (rounded) inputs."""

from __future__ import annotations

import sys

import torch

# (values, gradients) atol, as for the ops themselves.
TOKEN_ATOL = {torch.float32: (2e-5, 1e-6), torch.bfloat16: (2e-5, 1e-5), torch.float16: (2e-5, 1e-5),
              torch.float64: (1e-10, 1e-12)}


def assert_close(name, got, baseline, truth, atol):
    """max |hcrlhf − truth| ≤ 2 · max |peer − truth| + atol, plus the peer's shape and dtype."""
    assert got.shape == baseline.shape, f"{name}: shape {tuple(got.shape)} != the peer's {tuple(baseline.shape)}"
    assert got.dtype == baseline.dtype, f"{name}: dtype {got.dtype} != the peer's {baseline.dtype}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    if not got.numel():
        return
    err = (got.double() - truth).abs().max().item()
    ref_err = (baseline.double() - truth).abs().max().item()
    assert err <= 2 * ref_err + atol, f"{name}: max error {err:.3e} > 2 * the peer's {ref_err:.3e} + {atol:.1e}"


def grads_of(outputs, upstream, inputs):
    """d(Σ upstream_i · output_i)/d inputs, in float64."""
    loss = sum((out.double() * g).sum() for out, g in zip(outputs, upstream) if out is not None)
    return [g.double() for g in torch.autograd.grad(loss, inputs)]


def truth_logp_entropy(logits, labels, temperature=1.0):
    """float64 log-probs of ``labels`` and entropies of the (already rounded) logits."""
    log_p = (logits.double() / temperature).log_softmax(-1)
    logp = None if labels is None else log_p.gather(-1, labels[..., None]).squeeze(-1)
    return logp, -(log_p.exp() * log_p).sum(-1)


def random_logits(shape, vocab, dtype, generator, scale=3.0):
    logits = (torch.randn(*shape, vocab, generator=generator, dtype=torch.float64) * scale).to(dtype)
    return logits, torch.randint(0, vocab, shape, generator=generator)


def random_mask(batch, length, generator, density=0.7):
    """A (B, T) float 0/1 mask with holes, one row with a single valid token and one row empty."""
    mask = (torch.rand(batch, length, generator=generator) < density).float()
    mask[0] = 0.0
    mask[0, length // 2] = 1.0
    if batch > 2:
        mask[-1] = 0.0
    return mask


def attributes_holding(packages, objects):
    """(module, attribute) of every loaded module attribute of ``packages`` that *is* one of ``objects``."""
    found = []
    for name, module in list(sys.modules.items()):
        if module is None or not any(name == p or name.startswith(p + ".") for p in packages):
            continue
        try:
            items = list(vars(module).items())
        except TypeError:
            continue
        found += [(name, attr) for attr, value in items if any(value is o for o in objects)]
    return sorted(found)
