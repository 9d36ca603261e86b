"""Supervised fine-tuning (SFT) of a causal LM on LM rows: prompt/response pairs or plain text.

The loss is the mean NLL per target token (temperature 1), computed with ``ops.linear_logprobs`` on the
target positions only (:func:`hcrlhf.models.lm_loss_backward`, the same code as the RL trainer's PTX loss).
Rows come from :func:`hcrlhf.data.lm_rows.read_lm_rows`; keeping safety-set prompts out of them is the
caller's job (the pipeline removes them, docs/method.md#data-split).
"""

from __future__ import annotations

import math
import random

import torch

from hcrlhf.models.logprobs import lm_loss_backward, tokenize_lm_rows

__all__ = ["train_sft"]


def train_sft(policy, tokenizer, rows: list[dict], *, kind: str, template, steps: int, batch_size: int,
              learning_rate: float, weight_decay: float = 0.0, max_grad_norm: float | None = 1.0, max_length: int,
              micro_batch_tokens: int | None = None, seed: int = 0, device=None, impl: str = "auto",
              progress: bool = False) -> list[dict]:
    """Fine-tune ``policy`` in place on ``rows`` with AdamW; returns the NLL curve.

    Each of the ``steps`` optimiser steps takes the next ``batch_size`` rows of a stream of seeded per-epoch
    permutations of ``rows`` (a function of ``seed`` and the step only), tokenizes them (right padded, cut to
    ``max_length`` tokens: a (B, T) batch with a (B, T − 1) target mask, see
    :func:`hcrlhf.models.tokenize_lm_rows`), backpropagates the mean NLL per target token in micro-batches of
    at most ``micro_batch_tokens`` tokens, clips the gradient norm and steps. Torch's global generator is
    seeded with ``seed`` for the run and restored afterwards (CPU; dropout, if the model has any).

    Args:
        policy: a Hugging Face causal LM (decoder + linear lm_head); all its parameters are trained. It is in
            train mode during SFT and left in eval mode.
        tokenizer: its tokenizer (pad token set; an EOS token for ``kind="text"``).
        rows: the LM rows, all ``{"prompt", "response"}`` or all ``{"text"}``.
        kind: "pairs" (the prompt, formatted with ``template``, is context; the targets are the response tokens
            and an EOS) or "text" (every token after the first, and an EOS).
        template: the prompt template of ``kind="pairs"`` (see :func:`hcrlhf.data.get_template`).
        steps: optimiser steps (≥ 1).
        batch_size: rows per step.
        learning_rate, weight_decay: AdamW's (constant learning rate).
        max_grad_norm: gradient-norm clipping (None: off).
        max_length: tokens per row; longer rows are cut.
        micro_batch_tokens: token budget of one forward/backward pass (None: the whole batch at once).
        seed: the seed of the row order and of torch during SFT.
        device: where the policy runs (default: the device of its first parameter).
        impl: kernel implementation of ``ops.linear_logprobs``.
        progress: show a progress bar.

    Returns:
        ``[{"step": 1, "nll": float}, ...]``: the NLL per target token of each step's batch (before its update).

    Raises:
        FloatingPointError: the NLL became NaN/Inf (the step is not taken).
    """
    from tqdm.auto import tqdm

    from hcrlhf import distributed

    if not rows:
        raise ValueError("train_sft: rows must not be empty")
    device = torch.device(device) if device is not None else next(policy.parameters()).device
    curve: list[dict] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        policy.requires_grad_(True)
        policy.train()
        parameters = [p for p in policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay)
        permutations: dict[int, list[int]] = {}
        bar = tqdm(total=steps, disable=not (progress and distributed.is_main()), desc="sft", unit="step",
                   dynamic_ncols=True)
        try:
            for step in range(steps):
                batch = []
                for position in range(step * batch_size, (step + 1) * batch_size):
                    epoch, offset = divmod(position, len(rows))
                    if epoch not in permutations:
                        order = list(range(len(rows)))
                        random.Random(f"{seed}-sft-{epoch}").shuffle(order)
                        permutations = {epoch: order}
                    batch.append(rows[permutations[epoch][offset]])
                # Several processes: this rank's block of the batch; the loss is the mean over the whole batch
                # and the gradients are averaged over ranks (lm_loss_backward scales for it).
                first, last = distributed.shard_bounds(len(batch))
                batch = batch[first:last]
                input_ids, attention_mask, targets = tokenize_lm_rows(tokenizer, batch, kind, template=template,
                                                                      max_length=max_length)
                optimizer.zero_grad(set_to_none=True)
                nll = float(distributed.all_reduce_sum(lm_loss_backward(
                    policy, input_ids, attention_mask, targets, device=device, micro_batch_tokens=micro_batch_tokens,
                    impl=impl)))
                distributed.average_gradients(parameters)
                if not math.isfinite(nll):
                    raise FloatingPointError(f"sft: the NLL is {nll} at step {step + 1}; lower sft.learning_rate")
                if max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
                optimizer.step()
                curve.append({"step": step + 1, "nll": nll})
                bar.update(1)
                bar.set_postfix(nll=f"{nll:.3f}")
        finally:
            bar.close()
            policy.eval()
    return curve
