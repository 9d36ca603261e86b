"""``ops.linear_logprobs``: token log-probs straight from hidden states and an lm_head, chunked so
that the (N, V) logits never exist."""

from __future__ import annotations

import torch

from hcrlhf.ops import _checks
from hcrlhf.ops._dispatch import resolve_impl
from hcrlhf.ops.token_logprobs import backward_rows, forward_rows, read_label_values

OP = "linear_logprobs"
IGNORE_INDEX = -100
# Default chunk budget: bytes of one (chunk, V) logits block. A GPU affords a larger block (bigger,
# more efficient matmuls); a CPU gains little beyond ~100 rows per matmul.
_CHUNK_BYTES = {"cuda": 512 * 2**20, "cpu": 64 * 2**20}


def default_chunk_size(n_tokens: int, vocab: int, itemsize: int, device: torch.device) -> int:
    """Tokens per chunk so that one chunk of logits takes about ``_CHUNK_BYTES`` (a multiple of 64)."""
    budget = _CHUNK_BYTES.get(device.type, _CHUNK_BYTES["cpu"])
    chunk = max(1, budget // max(1, vocab * itemsize))
    if chunk >= 64:
        chunk -= chunk % 64
    return max(1, min(chunk, n_tokens))


def _chunk_logits(hidden_chunk, weight, bias):
    if bias is None:
        return hidden_chunk @ weight.T
    return torch.addmm(bias, hidden_chunk, weight.T)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- custom ops (torch.library)
# The chunked forward and backward as torch.library custom ops (docs/ops.md#torchcompile), so that
# torch.compile(fullgraph=True) keeps them as two opaque nodes -- and the (chunk, V) memory bound --
# instead of tracing the chunk loop. ``hidden`` is (N, H), ``labels`` flat int64 (N,), ``impl`` the
# engine run on each chunk of logits ("triton" | "cpp" | "torch").
@torch.library.custom_op("hcrlhf::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        labels: torch.Tensor, inv_temp: float, with_entropy: bool, chunk: int, impl: str,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp (N,), stats (N, 2), entropy (N,) or (0,) without ``with_entropy``)."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    logp = torch.empty(n_tokens, dtype=_compute_dtype(hidden), device=hidden.device)
    stats = torch.empty(n_tokens, 2, dtype=logp.dtype, device=hidden.device)
    entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
    for start in range(0, n_tokens, chunk):
        stop = min(start + chunk, n_tokens)
        logits = _chunk_logits(hidden[start:stop], weight, bias)  # (chunk, V): the only big buffer
        out = forward_rows(impl, logits, (stop - start, stop - start, 0, vocab), labels[start:stop],
                           inv_temp, IGNORE_INDEX, with_entropy)
        logp[start:stop], stats[start:stop] = out[0], out[1]
        if with_entropy:
            entropy[start:stop] = out[2]
        del logits
    return logp, stats, entropy


@linear_logprobs_fwd.register_fake
def _(hidden, weight, bias, labels, inv_temp, with_entropy, chunk, impl):
    n_tokens, dtype = hidden.shape[0], _compute_dtype(hidden)
    logp = hidden.new_empty(n_tokens, dtype=dtype)
    entropy = hidden.new_empty(n_tokens if with_entropy else 0, dtype=dtype)
    return logp, hidden.new_empty(n_tokens, 2, dtype=dtype), entropy


@torch.library.custom_op("hcrlhf::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        labels: torch.Tensor, stats: torch.Tensor, entropy: torch.Tensor | None,
                        grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None, inv_temp: float,
                        chunk: int, impl: str, need_hidden: bool, need_weight: bool, need_bias: bool,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_weight, grad_bias); a gradient that is not needed is an empty (0,) tensor."""
    as_rows = lambda g: None if g is None else g.to(stats.dtype).contiguous()
    grad_logp, grad_entropy = as_rows(grad_logp), as_rows(grad_entropy)
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    need_bias = need_bias and bias is not None
    # Weight/bias gradients sum over all chunks: accumulate in fp32 for bf16/fp16 parameters.
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if need_bias else None
    for start in range(0, n_tokens, chunk):
        stop = min(start + chunk, n_tokens)
        hidden_chunk = hidden[start:stop]
        logits = _chunk_logits(hidden_chunk, weight, bias)  # recomputed: cheaper than storing N·V
        grad_logits = backward_rows(
            impl, logits, (stop - start, stop - start, 0, vocab), labels[start:stop], stats[start:stop],
            None if entropy is None else entropy[start:stop],
            None if grad_logp is None else grad_logp[start:stop],
            None if grad_entropy is None else grad_entropy[start:stop],
            inv_temp, IGNORE_INDEX, inplace=True,
        )
        if need_hidden:
            torch.mm(grad_logits, weight, out=grad_hidden[start:stop])
        if need_weight:
            if acc == weight.dtype:
                grad_weight.addmm_(grad_logits.T, hidden_chunk)
            else:
                grad_weight.add_(grad_logits.T @ hidden_chunk)
        if need_bias:
            grad_bias.add_(grad_logits.sum(0, dtype=acc))
        del logits, grad_logits
    empty = hidden.new_empty(0)
    return (
        empty if grad_hidden is None else grad_hidden,
        empty.clone() if grad_weight is None else grad_weight.to(weight.dtype),
        empty.clone() if grad_bias is None else grad_bias.to(bias.dtype),
    )


@linear_logprobs_bwd.register_fake
def _(hidden, weight, bias, labels, stats, entropy, grad_logp, grad_entropy, inv_temp, chunk, impl,
      need_hidden, need_weight, need_bias):
    need_bias = need_bias and bias is not None
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        weight.new_empty(weight.shape) if need_weight else hidden.new_empty(0),
        bias.new_empty(bias.shape[0]) if need_bias else hidden.new_empty(0),
    )


def _fwd_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, inv_temp, with_entropy, chunk, impl = inputs
    _, stats, entropy = output
    ctx.mark_non_differentiable(stats)
    if not with_entropy:
        ctx.mark_non_differentiable(entropy)
    ctx.save_for_backward(hidden, weight, bias, labels, stats, entropy if with_entropy else None)
    ctx.config = (inv_temp, with_entropy, chunk, impl)
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, grad_logp, grad_stats, grad_entropy):
    hidden, weight, bias, labels, stats, entropy = ctx.saved_tensors
    inv_temp, with_entropy, chunk, impl = ctx.config
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    if not with_entropy:
        grad_entropy = None
    if grad_logp is None and grad_entropy is None:
        return (None,) * 8
    grad_hidden, grad_weight, grad_bias = torch.ops.hcrlhf.linear_logprobs_bwd(
        hidden, weight, bias, labels, stats, entropy, grad_logp, grad_entropy, inv_temp, chunk, impl,
        need_hidden, need_weight, need_bias and bias is not None,
    )
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            grad_bias if need_bias and bias is not None else None) + (None,) * 5


linear_logprobs_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    impl: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``token_logprobs(hidden @ weight.T + bias, labels)`` without ever building the (N, V) logits.

    Args:
        hidden: (N, H) or (..., H) final hidden states, float32 / bfloat16 / float16 (float64 for
            verification); non-contiguous leading dims cost one copy of ``hidden`` (small).
        weight: (V, H) lm_head weight, same dtype and device as ``hidden``.
        labels: (N,) (the leading shape of ``hidden``) int64/int32 token ids in [0, V), or -100
            (ignored: log-prob and entropy 0, no gradient).
        bias: optional (V,) lm_head bias, same dtype.
        temperature: >= 1e-4 (``MIN_TEMPERATURE``, as for ``token_logprobs``); the logits are divided by it.
        return_entropy: also return the entropy of each position's distribution.
        chunk_size: tokens per chunk (default: about 512 MiB of logits per chunk on a GPU, 64 MiB
            on a CPU, in multiples of 64 tokens). See the trade-off below.
        impl: "auto" | "triton" | "cpp" | "torch": the engine applied to each chunk of logits
            ("torch" is a chunked pure-torch path, not the materialising reference
            :func:`hcrlhf.reference.linear_logprobs`). ``auto``: Triton on CUDA, the C++ kernel on
            CPU when built, otherwise the pure-torch chunks (the same memory bound).

    Returns:
        ``logp`` shaped like ``labels`` (float32; float64 for float64 inputs), or ``(logp,
        entropy)``. Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``, through both outputs.

    How it runs: forward, for each chunk of ``C`` tokens, one matmul ``(C, H) @ (H, V)`` then the
    one-pass log-prob/entropy kernel; only the per-token logsumexp (and entropy) is kept. Backward,
    per chunk: the chunk's logits are recomputed, the kernel overwrites them with ``d/dlogits``, and
    two matmuls give ``grad_hidden`` for the chunk and add into ``grad_weight`` (fp32 accumulator
    for bf16/fp16 weights) — so forward+backward costs four matmuls instead of three.

    Chunk-size trade-off: peak extra memory is about ``C·V·itemsize`` (plus a few fp32 blocks of the
    same size for impl="torch", and the ``V·H`` fp32 grad_weight accumulator in backward), against
    ``N·V`` for the unfused path. A smaller ``C`` lowers that peak but issues more, smaller matmuls:
    each one re-reads the whole ``V·H`` weight and a GPU needs roughly ≥ 1–2k tokens per matmul to
    fill its SMs, so very small chunks turn a compute-bound op into a weight-bandwidth-bound one.
    On a CPU ~100+ tokens per chunk already runs at full matmul speed.

    Equivalent naive code::

        logits = hidden @ weight.T + bias
        logp = ops.token_logprobs(logits, labels, temperature=temperature,
                                  return_entropy=return_entropy, ignore_index=-100)
    """
    _checks.check_tensor(OP, "hidden", hidden)
    _checks.check_tensor(OP, "weight", weight, ndim=2)
    if hidden.dim() < 1:
        raise ValueError(f"{OP}: hidden must have shape (N, H), got a 0-dim tensor")
    hidden_size = hidden.shape[-1]
    vocab = weight.shape[0]
    if weight.shape[1] != hidden_size:
        raise ValueError(f"{OP}: weight must have shape (V, H={hidden_size}) to match hidden (..., H), "
                         f"got {tuple(weight.shape)}")
    if vocab == 0:
        raise ValueError(f"{OP}: weight must have a non-empty vocabulary dim V, got shape {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{OP}: weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    tensors = {"hidden": hidden, "weight": weight, "labels": labels}
    if bias is not None:
        _checks.check_tensor(OP, "bias", bias, ndim=1)
        if bias.shape[0] != vocab:
            raise ValueError(f"{OP}: bias must have shape (V={vocab},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"{OP}: bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
        tensors["bias"] = bias
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{OP}: labels must be a torch.Tensor, got {type(labels).__name__}")
    device = _checks.check_same_device(OP, **tensors)
    _checks.check_labels(OP, labels, tuple(hidden.shape[:-1]), vocab, IGNORE_INDEX,
                         read_values=read_label_values(device))
    temperature = _checks.check_temperature(OP, temperature)
    float64 = hidden.dtype == torch.float64
    chosen = resolve_impl(impl, device, op=OP, float64=float64, float64_impls=("torch",))
    hidden_2d = hidden.reshape(-1, hidden_size)
    n_tokens = hidden_2d.shape[0]
    if chunk_size is None:
        chunk = default_chunk_size(n_tokens, vocab, hidden.element_size(), device)
    else:
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"{OP}: chunk_size must be None or an int >= 1, got {chunk_size!r}")
        chunk = min(chunk_size, max(n_tokens, 1))
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    logp, _, entropy = torch.ops.hcrlhf.linear_logprobs_fwd(
        hidden_2d, weight, bias, flat_labels, 1.0 / temperature, bool(return_entropy), chunk, chosen
    )
    if return_entropy:
        return logp.view(labels.shape), entropy.view(labels.shape)
    return logp.view(labels.shape)
