"""Log-probs of response tokens from a Hugging Face causal LM, with the LM head on those tokens only.

The glue between a ``transformers`` model and the fused kernel :func:`hcrlhf.ops.linear_logprobs`:

* :func:`decoder_and_head` — the model's decoder (last hidden states) and its linear LM head;
* :func:`response_logprobs` — log-probs (and entropies) of chosen tokens on the action grid;
* :func:`tokenize_lm_rows` — LM rows (prompt/response pairs or plain text) as right-padded tensors and a
  target mask;
* :func:`lm_loss_backward` — backpropagate the mean NLL per target token of such a batch, micro-batched.

Coordinates. A batch of sequences is (B, T). The **action grid** is (B, T − 1): column j is the action
that produced token j + 1; its log-prob is read from the hidden state at position j.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from hcrlhf import ops
from hcrlhf.data.templates import pad_sequences, tokenize_pairs

__all__ = ["decoder_and_head", "is_peft_model", "response_logprobs", "shard_for_logprobs", "tokenize_lm_rows",
           "lm_loss_backward"]

# The method FSDP2 gathers a sharded model's root weights for (see shard_for_logprobs).
SHARDED_LOGPROBS_METHOD = "hcrlhf_response_logprobs"
# Config attributes of models whose logits are not plain ``hidden @ lm_head.T (+ bias)``.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def is_peft_model(model) -> bool:
    """True when ``model`` is a peft wrapper (e.g. LoRA adapters around a base model)."""
    return type(model).__module__.split(".")[0] == "peft" and hasattr(model, "get_base_model")


def decoder_and_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """The model's decoder and its LM head, for the fused log-prob path.

    Args:
        model: a Hugging Face causal LM (or a peft wrapper around one: the adapters live inside the base
            model's modules, so the base model's decoder and head are returned).

    Returns:
        ``(decoder, head)``: ``decoder(input_ids, attention_mask, position_ids)`` gives the last hidden
        states (B, T, H); ``head`` is the ``nn.Linear`` with weight (V, H) (and optional bias (V,)).

    Raises:
        ValueError: the model exposes no decoder (``base_model_prefix``) or no linear head
            (``get_output_embeddings``).
        NotImplementedError: the model transforms its logits (soft-capping, scaling): the fused path
            computes plain ``hidden @ head.T`` logits.
    """
    if is_peft_model(model):  # LoRA: the adapters live inside the base model's modules
        model = model.get_base_model()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    prefix = getattr(model, "base_model_prefix", "")
    decoder = getattr(model, prefix, None) if prefix else None
    if not isinstance(head, nn.Linear) or not isinstance(decoder, nn.Module) or decoder is model:
        raise ValueError(f"decoder_and_head: {type(model).__name__} does not expose a decoder and a linear lm_head "
                         "(get_output_embeddings / base_model_prefix); the fused log-prob path needs both")
    config = getattr(model, "config", None)
    for attribute in _LOGIT_TRANSFORMS:
        if getattr(config, attribute, None) not in (None, 1, 1.0):
            raise NotImplementedError(f"decoder_and_head: {type(model).__name__} transforms its logits "
                                      f"({attribute}={getattr(config, attribute)!r}); ops.linear_logprobs computes "
                                      "plain hidden @ lm_head.T logits")
    return decoder, head


def response_logprobs(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      action_index: torch.Tensor, *, temperature: float = 1.0, return_entropy: bool = False,
                      impl: str = "auto"):
    """Log-probs (and entropies) of the response tokens on the action grid, LM head on those tokens only.

    Args:
        model: a Hugging Face causal LM (decoder + linear lm_head, see :func:`decoder_and_head`).
        input_ids, attention_mask: (B, T); left or right padding (positions count real tokens).
        action_index: (N,) int64 flat indices into the (B, T − 1) action grid of the tokens to score
            (e.g. ``action_mask.flatten().nonzero()``); index ``b·(T−1) + j`` is token ``j + 1`` of row b.
        temperature: logits are divided by it (the sampling temperature).
        return_entropy: also return the per-token entropy.
        impl: kernel implementation of ``ops.linear_logprobs``.

    Returns:
        (B, T − 1) float32 log-probs, 0 off ``action_index`` (and the (B, T − 1) entropies likewise).
        Differentiable w.r.t. the model's parameters when called with grad enabled.

    A model sharded with FSDP2 (:func:`shard_for_logprobs`) runs this through a method registered with FSDP, so
    that its root weights (embeddings, final norm, LM head) are gathered for the call and their gradients
    reduced after it, although the head is used here as a bare weight, not through its ``forward``.
    """
    sharded_method = getattr(model, SHARDED_LOGPROBS_METHOD, None)
    if sharded_method is not None:
        return sharded_method(input_ids, attention_mask, action_index, temperature=temperature,
                              return_entropy=return_entropy, impl=impl)
    return _response_logprobs(model, input_ids, attention_mask, action_index, temperature=temperature,
                              return_entropy=return_entropy, impl=impl)


def shard_for_logprobs(model: nn.Module, *, mixed_precision: bool = False) -> nn.Module:
    """Shard a causal LM with FSDP2 (:func:`hcrlhf.distributed.shard_model`) so that :func:`response_logprobs`
    still works on it; a no-op in one process."""
    from hcrlhf import distributed

    if not distributed.is_distributed():
        return model
    distributed.add_forward_method(model, SHARDED_LOGPROBS_METHOD, _response_logprobs)
    return distributed.shard_model(model, mixed_precision=mixed_precision, forward_methods=[SHARDED_LOGPROBS_METHOD])


def _response_logprobs(model, input_ids, attention_mask, action_index, *, temperature, return_entropy, impl):
    decoder, head = decoder_and_head(model)
    batch, width = input_ids.shape
    position_ids = (attention_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    output = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)
    hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state  # (B, T, H)
    # Action (b, j) predicts token j + 1 from the hidden state at j: grid index b·(T−1) + j maps to the
    # hidden row b·T + j and to the label at b·T + j + 1. Only these N rows meet the LM head.
    row = torch.div(action_index, width - 1, rounding_mode="floor")
    hidden_index = action_index + row
    selected = hidden.reshape(batch * width, -1).index_select(0, hidden_index)
    labels = input_ids.reshape(-1).index_select(0, hidden_index + 1)
    weight, bias = head.weight, head.bias
    with torch.autocast(device_type=selected.device.type, enabled=False):  # the head stays in fp32 under bf16
        out = ops.linear_logprobs(selected.to(weight.dtype), weight, labels, bias=bias, temperature=temperature,
                                  return_entropy=return_entropy, impl=impl)
    logp, entropy = out if return_entropy else (out, None)

    def to_grid(values):
        grid = torch.zeros(batch * (width - 1), dtype=values.dtype, device=values.device)
        return grid.index_copy(0, action_index, values).view(batch, width - 1)

    return (to_grid(logp), to_grid(entropy)) if return_entropy else to_grid(logp)


def tokenize_lm_rows(tokenizer, rows: list[dict], kind: str, *, template, max_length: int):
    """LM rows as a right-padded batch, cut to ``max_length`` tokens, on the CPU.

    Args:
        tokenizer: a Hugging Face tokenizer (pad token set; an EOS token for ``kind="text"``).
        rows: B rows as :func:`hcrlhf.data.lm_rows.read_lm_rows` returns them: all ``{"prompt", "response"}``
            or all ``{"text"}``.
        kind: "pairs" (the prompt is formatted with ``template`` and is context only) or "text".
        template: the prompt template of ``kind="pairs"`` (see :func:`hcrlhf.data.get_template`).
        max_length: tokens per row.

    Returns:
        ``(input_ids, attention_mask, target_mask)``: (B, T) int64, (B, T) int64 and (B, T − 1) bool on the
        action grid, true where the action's token is an LM target (pairs: the response and its EOS; text:
        every token after the first, and an EOS).
    """
    if kind == "pairs":
        batch = tokenize_pairs(tokenizer, [r["prompt"] for r in rows], [r["response"] for r in rows],
                               template=template, max_length=max_length, padding_side="right")
        return batch.input_ids, batch.attention_mask, batch.response_mask[:, 1:]
    encoded = tokenizer([r["text"] for r in rows], add_special_tokens=True)["input_ids"]
    sequences = [(list(ids) + [tokenizer.eos_token_id])[:max_length] for ids in encoded]
    input_ids, attention_mask, _ = pad_sequences(sequences, tokenizer.pad_token_id, padding_side="right")
    return input_ids, attention_mask, attention_mask[:, 1:].bool()


def lm_loss_backward(model, input_ids, attention_mask, targets, *, coef: float = 1.0, device=None,
                     micro_batch_tokens: int | None = None, impl: str = "auto", autocast=None) -> torch.Tensor:
    """Backpropagate ``coef ·`` the LM loss of one batch, in micro-batches; returns the LM loss (detached).

    The LM loss is the mean NLL per target token at temperature 1; the log-probs come from
    ``ops.linear_logprobs`` on the target positions only (:func:`response_logprobs`). Gradients accumulate
    into ``model``'s parameters (the caller zeroes them and steps the optimiser).

    Args:
        model: a Hugging Face causal LM.
        input_ids, attention_mask: (B, T), e.g. from :func:`tokenize_lm_rows`; moved to ``device`` per
            micro-batch.
        targets: (B, T − 1) bool target mask on the action grid.
        coef: the loss is scaled by it before ``backward``.
        device: where the model runs (default: the device of its first parameter).
        micro_batch_tokens: at most this many tokens (rows × T) per forward/backward (None: one pass).
        impl: kernel implementation of ``ops.linear_logprobs``.
        autocast: a zero-argument callable returning a context manager to run the forward passes in (e.g.
            bf16 autocast), or None.

    Returns:
        The 0-dim LM loss (unscaled by ``coef``) on ``device``.

    Under several processes each rank passes its own rows: the loss is the mean over the targets of *all*
    ranks (this function returns this rank's share of it; the shares sum to the loss), and the backward is
    scaled by the world size, because the ranks average their gradients. Every rank runs the same number of
    micro-batches (a sharded model gathers its weights in each).
    """
    from hcrlhf import distributed

    device = torch.device(device) if device is not None else next(model.parameters()).device
    rows, width = input_ids.shape
    n_targets = distributed.all_reduce_sum(torch.tensor(float(targets.sum()), device=device)).clamp(min=1)
    coef = coef * distributed.world_size()
    per_chunk = rows if micro_batch_tokens is None else max(1, micro_batch_tokens // width)
    total = torch.zeros((), device=device)
    if rows == 0:  # this rank has no rows (fewer rows than ranks): nothing to add; a replicated model only
        return total
    for part in micro_batches(rows, -(-rows // per_chunk), agree=distributed.is_sharded(model)):
        index = targets[part].reshape(-1).nonzero().squeeze(1).to(device, non_blocking=True)
        with autocast() if autocast is not None else contextlib.nullcontext():
            logprobs = response_logprobs(model, input_ids[part].to(device), attention_mask[part].to(device), index,
                                         temperature=1.0, impl=impl)
        lm_loss = -logprobs.sum() / n_targets  # 0 off the targets
        (coef * lm_loss).backward()
        total = total + lm_loss.detach()
    return total


def micro_batches(rows: int, count: int, *, agree: bool = False) -> list[slice]:
    """``count`` contiguous, near-equal slices of ``rows`` rows (``agree``: the largest ``count`` over ranks,
    so that every rank of a sharded model runs as many forwards; at most ``rows`` slices, none empty)."""
    from hcrlhf import distributed

    if agree:
        count = distributed.agree_max(count)
    count = max(1, min(count, rows))
    bounds = [distributed.shard_bounds(rows, of=count, index=i) for i in range(count)]
    return [slice(start, stop) for start, stop in bounds]
