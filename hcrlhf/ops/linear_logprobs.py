"""``ops.linear_logprobs``: token log-probs straight from hidden states and an lm_head, tiled over
tokens and vocabulary so that the (N, V) logits never exist."""

from __future__ import annotations

import torch

from hcrlhf.ops import _checks
from hcrlhf.ops._dispatch import resolve_impl
from hcrlhf.ops.token_logprobs import backward_rows, forward_rows, read_label_values

OP = "linear_logprobs"
IGNORE_INDEX = -100
# Bytes of one (tokens × vocabulary tile) block of logits, the op's only large buffer. GPU: a
# block holds the whole vocabulary of as many tokens as fit (bigger matmuls fill more SMs). CPU:
# blocks of 2-32 MiB all run at the matmul's speed on one thread (within 3%, 2-core EPYC); on two
# threads sharing busy cores the larger blocks lose less to the kernel's short parallel regions
# (measured: docs/ops.md#linear_logprobs).
_BLOCK_BYTES = {"cuda": 512 * 2**20, "cpu": 32 * 2**20}
# Tokens per chunk on a CPU: each chunk re-reads the whole V·H weight, which dominates below a few
# hundred tokens (N 1024, H 896, V 151,936 fp32: 64-token chunks cost 1.9x the bare matmul).
_CPU_TOKENS = 1024
_VOCAB_ALIGN = 128  # default vocabulary tiles are multiples of this
# Elements before each row's logits in the block buffer: keeps the logits 64-byte aligned; the last
# one holds the sentinel column (see _block_buffer).
_PAD = 16
# torch.addmm(..., out_dtype=torch.float32) from bf16/fp16 operands (CUDA only)
_MM_OUT_DTYPE = torch.torch_version.TorchVersion(torch.__version__) >= "2.8"


def default_tiles(n_tokens: int, vocab: int, itemsize: int, device: torch.device,
                  chunk_size: int | None = None, vocab_chunk_size: int | None = None) -> tuple[int, int]:
    """``(C, Vt)``: tokens per chunk and vocabulary entries per tile of :func:`linear_logprobs`.

    An explicit ``chunk_size`` / ``vocab_chunk_size`` is kept (capped at N / V). Otherwise:

    * ``C``: on a CPU, N split into equal chunks of at most 1024 tokens; on a GPU, the largest
      multiple of 64 tokens whose block of ``min(Vt, V)`` (default V) logits fits ``_BLOCK_BYTES``
      (512 MiB), at least 1.
    * ``Vt``: the largest multiple of 128 with ``C·Vt·itemsize`` within ``_BLOCK_BYTES`` (8 MiB on a
      CPU), at least 128 and at most V. On a GPU with the default ``C`` that is the whole vocabulary.
    """
    n_tokens = max(n_tokens, 1)
    budget = _BLOCK_BYTES["cpu" if device.type == "cpu" else "cuda"]
    if chunk_size is not None:
        chunk = chunk_size
    elif device.type == "cpu":  # equal chunks of at most 1024 tokens: no small, weight-bound last chunk
        chunk = -(-n_tokens // -(-n_tokens // _CPU_TOKENS))
    else:
        chunk = budget // (min(vocab_chunk_size or vocab, vocab) * itemsize)
        chunk -= chunk % 64 if chunk >= 64 else 0
    chunk = max(1, min(chunk, n_tokens))
    if vocab_chunk_size is not None:
        tile = vocab_chunk_size
    else:
        tile = budget // (chunk * itemsize)
        tile = max(_VOCAB_ALIGN, tile - tile % _VOCAB_ALIGN)
    return chunk, max(1, min(tile, vocab))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- one block of logits
# A block holds C rows of ``_PAD + Vt`` elements: column ``_PAD - 1`` is a sentinel (the dtype's
# lowest finite value), the logits of the current vocabulary tile follow it. The token_logprobs
# engine runs on the view [sentinel, tile logits] of each row, so that
#  * a label outside the tile can point at the sentinel (forward: its log-prob is discarded;
#    backward: the engine's one-hot term lands there and is never used), and
#  * a row whose logits in this tile are all -inf still has a finite max (the sentinel) instead of
#    the engine's "undefined row" answer, and so contributes nothing rather than NaN.
# The sentinel adds exp((lowest - max)·inv_temp) to a tile's sum: nothing at float32 resolution
# unless the tile's largest logit lies within ~17·temperature of the dtype's lowest value -- never
# for float32 / bf16 (lowest -3.4e38), and for float16 (-65504) not at temperatures up to
# _FP16_TILED_MAX_TEMPERATURE; above it float16 runs whole-vocabulary blocks (one tile, no sentinel).
# With a single tile (tile == V) the engine's answer is used as it is, without sentinel or merge.
_FP16_TILED_MAX_TEMPERATURE = 1000.0
def _block_buffer(rows: int, tile: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    block = torch.empty(rows, _PAD + tile, dtype=dtype, device=device)
    block[:, _PAD - 1] = torch.finfo(dtype).min
    return block


def _logits_tile(block, hidden_chunk, weight, bias, v0: int, v1: int) -> torch.Tensor:
    """Writes ``hidden_chunk @ weight[v0:v1].T (+ bias[v0:v1])`` into ``block``; returns the
    ``(n, 1 + v1 - v0)`` view [sentinel, logits]."""
    n = hidden_chunk.shape[0]
    out = block[:n, _PAD:_PAD + v1 - v0]
    if bias is None:
        torch.mm(hidden_chunk, weight[v0:v1].T, out=out)
    else:
        torch.addmm(bias[v0:v1], hidden_chunk, weight[v0:v1].T, out=out)
    return block[:n, _PAD - 1:_PAD + v1 - v0]


def _layout(rows: torch.Tensor):
    return rows.shape[0], rows.shape[0], 0, rows.stride(0)


def _tile_labels(labels: torch.Tensor, v0: int, v1: int, ignored: int) -> torch.Tensor:
    """Each label's column in the [sentinel, tile] view: ``1 + label - v0`` inside the tile, else 0
    (the sentinel); ``ignored`` at an ignored position."""
    inside = (labels >= v0) & (labels < v1)
    columns = torch.where(inside, labels - (v0 - 1), 0)
    return columns if ignored == 0 else torch.where(labels == IGNORE_INDEX, ignored, columns)


def _merge_tiles(tile_logp, tile_stats, tile_entropy, labels, tile: int, sentinel: float, inv_temp: float):
    """Per-tile engine results (T, n) -> the whole row's (logp, stats, entropy or None), like the
    engine's own answer for the full (n, V) logits.

    A tile's stats ``(m_t, s_t)`` give ``log Σ_tile exp((x - M)·inv_temp) = (m_t - M)·inv_temp + s_t``
    for the row max M; their logsumexp is the row's log_sum, ``w_t = exp(that - log_sum)`` the tile's
    share of the probability mass, ``log p(label) = logp_t + log w_t`` and ``H = Σ_t w_t (H_t - log w_t)``.
    Done in float64 (T·n numbers).
    """
    wide = torch.float64
    tile_max, tile_log_sum = tile_stats[..., 0].to(wide), tile_stats[..., 1].to(wide)
    empty = tile_max <= sentinel  # only -inf logits in the tile (the sentinel is its max)
    row_max = tile_max.amax(0)
    # a NaN / +inf logit in some tile, or no finite logit at all: the engine's undefined row
    undefined = tile_log_sum.isnan().any(0) | (row_max <= sentinel)
    row_max = torch.where(undefined, 0.0, row_max)
    tile_log_sum = torch.where(empty, float("-inf"), (tile_max - row_max) * inv_temp + tile_log_sum)
    log_sum = torch.where(undefined, float("nan"), torch.logsumexp(tile_log_sum, 0))
    log_weight = tile_log_sum - log_sum
    ignored = labels == IGNORE_INDEX
    home = torch.where(ignored, 0, labels // tile)[None]  # the tile holding each label
    logp = tile_logp.to(wide).gather(0, home)[0] + log_weight.gather(0, home)[0]
    logp = torch.where(ignored, 0.0, logp)
    entropy = None
    if tile_entropy is not None:
        terms = torch.where(empty, 0.0, log_weight.exp() * (tile_entropy.to(wide) - log_weight))
        entropy = torch.where(ignored, 0.0, torch.where(undefined, float("nan"), terms.sum(0)))
    return logp, torch.stack([row_max, log_sum], dim=1), entropy


def _matmul(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """``out = a @ b`` or ``out += a @ b``. For float32 ``out`` and bf16/fp16 operands the products are
    summed in float32 (cuBLAS ``out_dtype``; elsewhere the caller passes float32 copies), never
    rounded to bf16 per tile."""
    if a.dtype != out.dtype:
        torch.addmm(out, a, b, beta=1 if accumulate else 0, out_dtype=out.dtype, out=out)
    elif accumulate:
        out.addmm_(a, b)
    else:
        torch.mm(a, b, out=out)


# ---------------------------------------------------------------- custom ops (torch.library)
# The tiled forward and backward as torch.library custom ops (docs/ops.md#torchcompile), so that
# torch.compile(fullgraph=True) keeps them as two opaque nodes -- and the block memory bound --
# instead of tracing the loops. ``hidden`` is (N, H), ``labels`` flat int64 (N,), ``impl`` the
# engine run on each block of logits ("triton" | "cpp" | "torch"), ``chunk`` the tokens per chunk
# and ``vocab_chunk`` the vocabulary entries per tile (0: all of V).
@torch.library.custom_op("hcrlhf::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        labels: torch.Tensor, inv_temp: float, with_entropy: bool, chunk: int, impl: str,
                        vocab_chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logp (N,), stats (N, 2), entropy (N,) or (0,) without ``with_entropy``)."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    tile = vocab if vocab_chunk <= 0 else min(vocab_chunk, vocab)
    logp = torch.empty(n_tokens, dtype=_compute_dtype(hidden), device=hidden.device)
    stats = torch.empty(n_tokens, 2, dtype=logp.dtype, device=hidden.device)
    entropy = torch.empty_like(logp) if with_entropy else logp.new_empty(0)
    if n_tokens == 0:
        return logp, stats, entropy
    block = _block_buffer(min(chunk, n_tokens), tile, hidden.dtype, hidden.device)
    sentinel = float(torch.finfo(hidden.dtype).min)
    for start in range(0, n_tokens, chunk):
        stop = min(start + chunk, n_tokens)
        hidden_chunk, chunk_labels = hidden[start:stop], labels[start:stop]
        if tile == vocab:  # one tile: the engine's answer is the row's, no sentinel and no merge
            rows = _logits_tile(block, hidden_chunk, weight, bias, 0, vocab)[:, 1:]
            out = forward_rows(impl, rows, _layout(rows), chunk_labels, inv_temp, IGNORE_INDEX, with_entropy)
            logp[start:stop], stats[start:stop] = out[0], out[1]
            if with_entropy:
                entropy[start:stop] = out[2]
            continue
        per_tile = []
        for v0 in range(0, vocab, tile):
            v1 = min(v0 + tile, vocab)
            rows = _logits_tile(block, hidden_chunk, weight, bias, v0, v1)
            # every row is live (its label's column or the sentinel's): each tile's stats and entropy
            # are needed for every row; ignored positions are zeroed on merge
            per_tile.append(forward_rows(impl, rows, _layout(rows), _tile_labels(chunk_labels, v0, v1, 0),
                                         inv_temp, IGNORE_INDEX, with_entropy))
        tile_logp, tile_stats = torch.stack([r[0] for r in per_tile]), torch.stack([r[1] for r in per_tile])
        tile_entropy = torch.stack([r[2] for r in per_tile]) if with_entropy else None
        chunk_logp, chunk_stats, chunk_entropy = _merge_tiles(tile_logp, tile_stats, tile_entropy, chunk_labels,
                                                              tile, sentinel, inv_temp)
        logp[start:stop], stats[start:stop] = chunk_logp, chunk_stats
        if with_entropy:
            entropy[start:stop] = chunk_entropy
    return logp, stats, entropy


@linear_logprobs_fwd.register_fake
def _(hidden, weight, bias, labels, inv_temp, with_entropy, chunk, impl, vocab_chunk=0):
    n_tokens, dtype = hidden.shape[0], _compute_dtype(hidden)
    logp = hidden.new_empty(n_tokens, dtype=dtype)
    entropy = hidden.new_empty(n_tokens if with_entropy else 0, dtype=dtype)
    return logp, hidden.new_empty(n_tokens, 2, dtype=dtype), entropy


@torch.library.custom_op("hcrlhf::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        labels: torch.Tensor, stats: torch.Tensor, entropy: torch.Tensor | None,
                        grad_logp: torch.Tensor | None, grad_entropy: torch.Tensor | None, inv_temp: float,
                        chunk: int, impl: str, need_hidden: bool, need_weight: bool, need_bias: bool,
                        vocab_chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden, grad_weight, grad_bias); a gradient that is not needed is an empty (0,) tensor."""
    as_rows = lambda g: None if g is None else g.to(stats.dtype).contiguous()
    grad_logp, grad_entropy = as_rows(grad_logp), as_rows(grad_entropy)
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    tile = vocab if vocab_chunk <= 0 else min(vocab_chunk, vocab)
    need_bias = need_bias and bias is not None
    # A gradient summed over several tiles (grad_hidden over vocabulary tiles, grad_weight / grad_bias
    # over token chunks) is accumulated in float32 for bf16/fp16 operands; a single product is
    # written straight in the operands' dtype (the matmul itself sums in float32).
    acc = _compute_dtype(weight)
    low = hidden.dtype != acc
    fused = low and hidden.device.type == "cuda" and _MM_OUT_DTYPE  # cuBLAS sums bf16 products into fp32
    as_acc = (lambda t: t.to(acc)) if low and not fused else (lambda t: t)
    sum_hidden, sum_weight = tile < vocab, chunk < n_tokens
    grad_hidden = torch.empty_like(hidden) if need_hidden else None
    grad_weight = None
    if need_weight:
        make = torch.zeros if n_tokens == 0 or (fused and sum_weight) else torch.empty
        grad_weight = make(weight.shape, dtype=acc if sum_weight else weight.dtype, device=weight.device)
    grad_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if need_bias else None
    block = _block_buffer(min(chunk, n_tokens), tile, hidden.dtype, hidden.device) if n_tokens else None
    for start in range(0, n_tokens, chunk):
        stop = min(start + chunk, n_tokens)
        hidden_chunk, chunk_labels = hidden[start:stop], labels[start:stop]
        row_args = (stats[start:stop], None if entropy is None else entropy[start:stop],
                    None if grad_logp is None else grad_logp[start:stop],
                    None if grad_entropy is None else grad_entropy[start:stop])
        chunk_grad_hidden = None
        if need_hidden:
            if not sum_hidden or not low:
                chunk_grad_hidden = grad_hidden[start:stop]
            else:
                chunk_grad_hidden = (torch.zeros if fused else torch.empty)(stop - start, hidden.shape[1],
                                                                            dtype=acc, device=hidden.device)
        hidden_operand = as_acc(hidden_chunk) if need_weight and sum_weight else hidden_chunk
        for v0 in range(0, vocab, tile):
            v1 = min(v0 + tile, vocab)
            rows = _logits_tile(block, hidden_chunk, weight, bias, v0, v1)  # recomputed: cheaper than storing N·V
            if tile == vocab:  # one tile: the labels as they are, no sentinel
                rows, tile_labels = rows[:, 1:], chunk_labels
            else:
                tile_labels = _tile_labels(chunk_labels, v0, v1, IGNORE_INDEX)
            backward_rows(impl, rows, _layout(rows), tile_labels, *row_args, inv_temp, IGNORE_INDEX, inplace=True)
            grad_logits = rows[:, -(v1 - v0):]  # d/dlogits of the tile (without the sentinel's column)
            summed = (need_hidden and sum_hidden) or (need_weight and sum_weight)
            grad_operand = as_acc(grad_logits) if summed else grad_logits
            if need_hidden:
                if sum_hidden:
                    _matmul(chunk_grad_hidden, grad_operand, as_acc(weight[v0:v1]), accumulate=v0 > 0)
                else:
                    torch.mm(grad_logits, weight[v0:v1], out=chunk_grad_hidden)
            if need_weight:
                if sum_weight:
                    _matmul(grad_weight[v0:v1], grad_operand.T, hidden_operand, accumulate=start > 0)
                else:
                    torch.mm(grad_logits.T, hidden_chunk, out=grad_weight[v0:v1])
            if need_bias:
                grad_bias[v0:v1] += grad_logits.sum(0, dtype=acc)
        if need_hidden and chunk_grad_hidden.dtype != hidden.dtype:
            grad_hidden[start:stop] = chunk_grad_hidden
    empty = hidden.new_empty(0)
    return (
        empty if grad_hidden is None else grad_hidden,
        empty.clone() if grad_weight is None else grad_weight.to(weight.dtype),
        empty.clone() if grad_bias is None else grad_bias.to(bias.dtype),
    )


@linear_logprobs_bwd.register_fake
def _(hidden, weight, bias, labels, stats, entropy, grad_logp, grad_entropy, inv_temp, chunk, impl,
      need_hidden, need_weight, need_bias, vocab_chunk=0):
    need_bias = need_bias and bias is not None
    return (
        torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
        weight.new_empty(weight.shape) if need_weight else hidden.new_empty(0),
        bias.new_empty(bias.shape[0]) if need_bias else hidden.new_empty(0),
    )


def _fwd_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, inv_temp, with_entropy, chunk, impl, vocab_chunk = inputs
    _, stats, entropy = output
    ctx.mark_non_differentiable(stats)
    if not with_entropy:
        ctx.mark_non_differentiable(entropy)
    ctx.save_for_backward(hidden, weight, bias, labels, stats, entropy if with_entropy else None)
    ctx.config = (inv_temp, with_entropy, chunk, impl, vocab_chunk)
    ctx.set_materialize_grads(False)


def _fwd_backward(ctx, grad_logp, grad_stats, grad_entropy):
    hidden, weight, bias, labels, stats, entropy = ctx.saved_tensors
    inv_temp, with_entropy, chunk, impl, vocab_chunk = ctx.config
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    if not with_entropy:
        grad_entropy = None
    if grad_logp is None and grad_entropy is None:
        return (None,) * 9
    grad_hidden, grad_weight, grad_bias = torch.ops.hcrlhf.linear_logprobs_bwd(
        hidden, weight, bias, labels, stats, entropy, grad_logp, grad_entropy, inv_temp, chunk, impl,
        need_hidden, need_weight, need_bias and bias is not None, vocab_chunk,
    )
    return (grad_hidden if need_hidden else None, grad_weight if need_weight else None,
            grad_bias if need_bias and bias is not None else None) + (None,) * 6


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
    vocab_chunk_size: int | None = None,
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
        chunk_size: tokens per chunk ``C`` (int >= 1). Default: ``min(N, 1024)`` on a CPU; on a GPU
            as many tokens (a multiple of 64) as fit 512 MiB of logits of one vocabulary tile.
        vocab_chunk_size: vocabulary entries per tile ``Vt`` (int >= 1). Default: the largest
            multiple of 128 with ``C·Vt·itemsize`` within 8 MiB on a CPU, 512 MiB on a GPU (there:
            the whole vocabulary, unless ``chunk_size`` is large). See :func:`default_tiles`.
            (float16 at temperature > 1000 always uses whole-vocabulary blocks.)
        impl: "auto" | "triton" | "cpp" | "torch": the engine applied to each block of logits
            ("torch" is a tiled pure-torch path, not the materialising reference
            :func:`hcrlhf.reference.linear_logprobs`). ``auto``: Triton on CUDA, the C++ kernel on
            CPU when built, otherwise the pure-torch blocks (the same memory bound).

    Returns:
        ``logp`` shaped like ``labels`` (float32; float64 for float64 inputs), or ``(logp,
        entropy)``. Differentiable w.r.t. ``hidden``, ``weight`` and ``bias``, through both outputs.

    How it runs: the (N, V) logits are visited one (C, Vt) block at a time, tokens outer,
    vocabulary inner. Forward: one matmul ``(C, H) @ (H, Vt)`` writes the block, the one-pass
    log-prob/entropy kernel of ``token_logprobs`` reduces it to per-token statistics of that tile,
    and the tiles of a chunk are merged in float64 (logsumexp over tiles; the label's log-prob from
    its tile plus ``log w_t``; entropy ``Σ_t w_t (H_t - log w_t)``, ``w_t`` the tile's probability
    mass); only the per-token logsumexp (and entropy) is kept. Backward, per block: the logits are
    recomputed, the kernel overwrites them with ``d/dlogits`` from the saved logsumexp, and two
    matmuls add into ``grad_hidden`` (over the vocabulary tiles) and ``grad_weight`` (over the
    token chunks) -- float32 accumulators where bf16/fp16 products are summed -- so
    forward+backward costs four matmuls instead of three.

    Memory: about ``C·(Vt + 16)·itemsize`` for the block (plus a few float32 blocks for
    impl="torch" or bf16/fp16 accumulation, and a ``V·H`` float32 grad_weight accumulator when
    several token chunks add into a bf16/fp16 weight), against ``N·V`` for the unfused path.

    Tile trade-off: each token chunk re-reads the whole ``V·H`` weight, so a small ``C`` turns a
    compute-bound op into a weight-bandwidth-bound one (on a 2-core CPU at N 1024, H 896, V 151,936
    fp32, 64-token chunks cost ~1.7-1.9x the bare matmul; 1024-token chunks of 8192-entry tiles
    match it); a GPU needs roughly >= 1-2k tokens per matmul to fill its SMs. Measurements:
    docs/ops.md#linear_logprobs.

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
    for name, value in (("chunk_size", chunk_size), ("vocab_chunk_size", vocab_chunk_size)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{OP}: {name} must be None or an int >= 1, got {value!r}")
    float64 = hidden.dtype == torch.float64
    chosen = resolve_impl(impl, device, op=OP, float64=float64, float64_impls=("torch",))
    hidden_2d = hidden.reshape(-1, hidden_size)
    if hidden.dtype == torch.float16 and temperature > _FP16_TILED_MAX_TEMPERATURE:
        vocab_chunk_size = vocab  # the float16 sentinel would carry weight (see _block_buffer)
    chunk, tile = default_tiles(hidden_2d.shape[0], vocab, hidden.element_size(), device, chunk_size,
                                vocab_chunk_size)
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    logp, _, entropy = torch.ops.hcrlhf.linear_logprobs_fwd(
        hidden_2d, weight, bias, flat_labels, 1.0 / temperature, bool(return_entropy), chunk, chosen, tile
    )
    if return_entropy:
        return logp.view(labels.shape), entropy.view(labels.shape)
    return logp.view(labels.shape)
