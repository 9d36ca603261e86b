"""Sampling responses with deployment decoding and scoring them, exactly as the RL trainer scores its
rollouts: prompt (left padded) + response up to and including the first EOS, the cost read at the last
non-pad token. Used by the safety test and by the ground-truth evaluation. Each prompt is sampled with its own
seed (from the run's seed and its index in the prompt list), so the responses do not depend on the batch size
or on how the prompts are split over processes."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hcrlhf.data.templates import tokenize_prompts
from hcrlhf.models.generation import generate, generation_config, row_seeds

__all__ = ["Decoding", "sample_and_score", "sample_and_score_on_ranks", "cost_transform"]


@dataclass(frozen=True)
class Decoding:
    """Deployment decoding settings (docs/method.md#the-problem: the guarantee is about responses decoded this way).

    Every other setting of Hugging Face ``generate`` is neutral: :func:`hcrlhf.models.generation.generation_config`
    turns these four into the one explicit ``GenerationConfig`` that samples them."""

    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@torch.no_grad()
def sample_and_score(policy, tokenizer, prompts, *, template, decoding: Decoding, cost_model=None,
                     batch_size: int = 64, seed: int = 0, prompt_indices=None, max_prompt_length: int | None = None,
                     progress: bool = False, desc: str = "sampling") -> tuple[list[str], list[float] | None]:
    """One sampled response per prompt (in order) and, with ``cost_model``, its cost.

    Sampling is exactly ``decoding`` (:func:`hcrlhf.models.generation.generation_config`: every other setting
    neutral, pad / EOS from the tokenizer), with nothing inherited from the policy's own generation config
    (:func:`hcrlhf.models.generation.generate`). Prompt i is sampled with the row seed
    ``row_seeds(seed, [("sample", prompt_indices[i])])`` (:func:`hcrlhf.models.generation.row_seeds`), and
    torch's global generator is neither used nor touched: the responses do not depend on ``batch_size``, on the
    order of the prompts or on how a prompt list is split over processes (up to floating-point ties).

    Args:
        prompt_indices: each prompt's index in the full prompt list, when ``prompts`` is a shard of it (a
            process's share): ``sample_and_score(prompts[k:], prompt_indices=range(k, n), ...)`` gives the
            responses of rows k: of the whole list's run. Default ``range(len(prompts))``.

    Returns:
        ``(responses, costs)``: decoded response texts (special tokens removed) and float costs (None
        without a cost model).
    """
    from tqdm.auto import tqdm

    prompts = list(prompts)
    indices = range(len(prompts)) if prompt_indices is None else list(prompt_indices)
    if len(indices) != len(prompts):
        raise ValueError(f"sample_and_score: prompt_indices has {len(indices)} entries for {len(prompts)} prompts")
    seeds = row_seeds(seed, [("sample", index) for index in indices])
    device = next(policy.parameters()).device
    was_training = policy.training
    policy.eval()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    # One explicit GenerationConfig, and nothing inherited from the policy's own generation config.
    config = generation_config(decoding, tokenizer)
    responses, costs = [], [] if cost_model is not None else None
    try:
        for start in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, dynamic_ncols=True):
            chunk = prompts[start:start + batch_size]
            batch = tokenize_prompts(tokenizer, chunk, template=template, max_length=max_prompt_length)
            prompt_ids, prompt_mask = batch.input_ids.to(device), batch.attention_mask.to(device)
            output = generate(policy, prompt_ids, prompt_mask, config, row_seeds=seeds[start:start + batch_size])
            response = output[:, prompt_ids.shape[1]:]
            if eos is not None:  # valid: up to and including the first EOS (as in SafeRLTrainer.rollout)
                is_eos = (response == eos).long()
                valid = (is_eos.cumsum(dim=1) - is_eos) == 0
            else:
                valid = torch.ones_like(response, dtype=torch.bool)
            response = response.masked_fill(~valid, pad)
            responses += tokenizer.batch_decode(response, skip_special_tokens=True)
            if cost_model is not None:
                input_ids = torch.cat([prompt_ids, response], dim=1)
                attention_mask = torch.cat([prompt_mask.long(), valid.long()], dim=1)
                costs += cost_model(input_ids, attention_mask).end_scores.float().cpu().tolist()
    finally:
        policy.train(was_training)
    return [r.strip() for r in responses], costs


def sample_and_score_on_ranks(policy, tokenizer, prompts, *, progress: bool = False, **kwargs):
    """:func:`sample_and_score` spread over the ranks under ``torchrun``: each rank samples one block of the
    prompts (with their indices in the whole list, so the responses are those one process would sample) and every
    rank gets all responses and costs back, in order. One process: :func:`sample_and_score` itself."""
    from hcrlhf import distributed

    prompts = list(prompts)
    first, last = distributed.shard_bounds(len(prompts))
    responses, costs = sample_and_score(policy, tokenizer, prompts[first:last], prompt_indices=range(first, last),
                                        progress=progress and distributed.is_main(), **kwargs)
    return (distributed.all_gather_objects(responses),
            None if costs is None else distributed.all_gather_objects(costs))


def cost_transform(costs, transform: str, *, sigmoid_scale: float = 1.0, unsafe_above: float = 0.0) -> list[float]:
    """The safety test's costs from raw cost-model scores: "none", "sigmoid" or "unsafe_indicator"."""
    import math

    if transform == "none":
        return [float(c) for c in costs]
    if transform == "sigmoid":
        return [1.0 / (1.0 + math.exp(-max(min(c / sigmoid_scale, 700.0), -700.0))) for c in costs]
    if transform == "unsafe_indicator":
        return [1.0 if c > unsafe_above else 0.0 for c in costs]
    raise ValueError(f"cost_transform: unknown transform {transform!r}")


