"""DPO and ADPO (Equilibrate RLHF's adaptive message-wise DPO) on preference pairs, as a lean trainer.

**DPO** (Rafailov et al., 2023). For a prompt x with a chosen response y_w and a rejected one y_l, each
log π(y | x) is the **sum** of the response's token log-probs, and with the frozen reference π_ref::

    L = −log σ( β · [ (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x)) ] )

averaged over the pairs (:func:`dpo_loss`). The implicit rewards are β·(log π − log π_ref) of each side.

**ADPO** (Tan et al., 2025, "Equilibrate RLHF", arXiv 2502.11555) replaces each sum by a **masked** sum
(:func:`masked_sequence_logps`) over the tokens that the AMA mask (:func:`ama_mask`) keeps: the chosen
response trains only on the tokens where a token-level score signal is +1, the rejected one only where it
is −1, so that the good parts of a rejected answer are not pushed down nor the bad parts of a chosen
answer pushed up. The signal comes from a score model evaluated at every prefix of the response
(:class:`hcrlhf.models.ScoreModel` returns one score per position).

What the paper fixes and what is ours. The paper (and its ICLR 2025 submission "Truly Safe & Truly
Helpful") defines the mask only as M(x, y): keep a chosen response's part whose reward is *above a
baseline* and a rejected response's part whose reward is *below* it, applied as gradient masking; the
masked loss itself is not written out, and the released ADPO trainer files do not parse. The authors' companion paper on
adaptive segment-level reward (Li, ..., Tan, ..., Zheng; arXiv 2411.00809) segments a response at
"pivot" tokens where the token-level reward changes sign and back-propagates only through segments whose
sign agrees with the sequence label. The choices below are ours **[ours]**, made to fit that description:

* **scores**: the score model's raw per-prefix score of each response token (the prefix through that
  token), compared with the baseline 0 — not standardised per response and not differenced. The
  paper compares a *level* with a baseline; per-response standardisation would split every response into
  "good" and "bad" halves whatever its quality (a uniformly good chosen response would lose about half its
  tokens); first differences s_t − s_{t−1} are the token-level noise the companion paper argues against,
  and hysteresis on them has no lasting state. 0 is a meaningful baseline for hcrlhf's score models: their
  Bradley–Terry loss is shift-invariant and the mean-squared-score regulariser centres the scores on 0
  (docs/method.md#reward-and-cost-models). With ``ama_score_model="cost"`` (a cost model, C > 0 means
  unsafe) the scores are −C, so +1 means safe.
* **signal**: hysteresis (:func:`hcrlhf.train.rl_losses.ama_signal`, shared with the RL trainer's ``rl.ama``):
  z switches to +1 where s > ``upper`` (0.3), to −1 where s < ``lower`` (−0.3, a *signed* threshold, as
  ``rl.ama_lower``), and otherwise keeps its value; a response starts from the sign of its first score
  (+1 if s ≥ 0). The thresholds stop a score that wanders around 0 from cutting the response into
  one-token pieces.
* **empty masks**: a response with no kept token falls back to its full response mask (``empty_mask:
  "full"``, the default: such a pair trains as plain DPO) or contributes nothing (``"skip"``: its masked
  sum is empty, so its log-ratio is 0 and only the other response of the pair trains; a pair with both
  sides empty adds the constant log 2 and no gradient).
* ``mask: "none"`` is exactly DPO: the masked sum over the full response mask is the plain sum.

Why not TRL's ``DPOTrainer``: the AMA mask has to enter the *sum* of token log-probs of each side, and
``DPOTrainer`` computes those sums inside its ``concatenated_forward`` without a hook for a per-token mask
(only a loss-type switch), so it would have to be forked; and hcrlhf already has a fused log-prob op,
:func:`hcrlhf.ops.linear_logprobs`, which applies the LM head to response positions only
(:func:`hcrlhf.models.response_logprobs`) instead of building (B, T, V) logits.

Coordinates: a pair batch is (2B, T), the B chosen rows then the B rejected rows (prompt + response,
right padded, an EOS after each response: :func:`hcrlhf.data.tokenize_pairs`). Per-token quantities live on
the **action grid** (2B, T − 1): column j is the action that produced token j + 1, its log-prob is read from
the hidden state at j and its AMA score is the score model's output at position j + 1.

The reference is a frozen copy of the policy, or, for a peft (LoRA) policy, the policy with its adapters
disabled. Keeping safety-set prompts out of the pairs is the caller's job (pass ``safety_split`` to have it
checked, docs/method.md#data-split).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from hcrlhf.config import Problems, Section
from hcrlhf.data.templates import get_template, tokenize_pairs
from hcrlhf.models.logprobs import decoder_and_head, is_peft_model, response_logprobs
from hcrlhf.ops._dispatch import IMPLS
from hcrlhf.train.rl_losses import ama_signal

__all__ = [
    "DPOConfig",
    "DPOResult",
    "PreferenceLogps",
    "ama_mask",
    "masked_sequence_logps",
    "dpo_loss",
    "preference_logps",
    "train_dpo",
]

MASKS = ("none", "ama")
EMPTY_MASKS = ("full", "skip")
PREFERENCES = ("better", "safer")
AMA_SCORE_MODELS = ("reward", "cost")
KEEPS = ("positive", "negative")


@dataclass
class DPOConfig(Section):
    """Settings of :func:`train_dpo` (a :class:`hcrlhf.config.Section`: checked on creation).

    Attributes:
        beta: β of DPO, the strength of the implicit KL penalty to the reference (0.1).
        preference: which label picks the chosen response of a pair: "better" (``better_response_id``,
            helpfulness) or "safer" (``safer_response_id``).
        learning_rate: AdamW's (constant) learning rate.
        weight_decay: AdamW's weight decay.
        batch_size: preference pairs per optimiser step (2·batch_size sequences through the policy and the
            reference).
        micro_batch_pairs: pairs per forward/backward pass, the gradients of a step accumulating over them
            (None: the whole batch at once). Does not change the loss.
        epochs: passes over the pairs (may be fractional); a step takes the next ``batch_size`` pairs of a
            stream of seeded per-epoch permutations.
        max_steps: optional cap on optimiser steps (overrides ``epochs`` when smaller).
        max_length: token cap per sequence (the prompt is cut from its left first).
        max_grad_norm: gradient-norm clipping (None: off).
        seed: the seed of the pair order and of torch during training.
        mask: "none" (plain DPO: every response token) or "ama" (ADPO: the AMA mask of a score model, see the
            module docstring; needs ``score_model``).
        ama_upper, ama_lower: the hysteresis thresholds of the AMA signal on the raw per-prefix scores: z
            switches to +1 above ``ama_upper`` and to −1 below ``ama_lower`` (signed, as ``rl.ama_lower``;
            ama_lower < ama_upper).
        ama_score_model: what ``score_model`` scores: "reward" (higher is better) or "cost" (hcrlhf's cost
            models, C > 0 unsafe: the signal reads −C).
        empty_mask: a response whose AMA mask keeps no token: "full" (use its whole response mask) or "skip"
            (it contributes nothing; the other response of the pair still trains).
        impl: kernel implementation of ``ops.linear_logprobs`` ("auto" | "triton" | "cpp" | "torch").
        output_dir: where to save the trained policy and tokenizer (a Hugging Face directory; None: no saving).
        progress: show a tqdm progress bar.
        device: device to train on (None: the policy's).
    """

    beta: float = 0.1
    preference: str = "better"
    learning_rate: float = 1e-6
    weight_decay: float = 0.0
    batch_size: int = 8
    micro_batch_pairs: int | None = None
    epochs: float = 1.0
    max_steps: int | None = None
    max_length: int = 512
    max_grad_norm: float | None = 1.0
    seed: int = 0
    mask: str = "none"
    ama_upper: float = 0.3
    ama_lower: float = -0.3
    ama_score_model: str = "reward"
    empty_mask: str = "full"
    impl: str = "auto"
    output_dir: str | None = None
    progress: bool = True
    device: str | None = None

    def check(self, problems: Problems) -> None:
        problems.choice("preference", self.preference, PREFERENCES)
        problems.choice("mask", self.mask, MASKS)
        problems.choice("ama_score_model", self.ama_score_model, AMA_SCORE_MODELS)
        problems.choice("empty_mask", self.empty_mask, EMPTY_MASKS)
        problems.choice("impl", self.impl, IMPLS)
        for name in ("beta", "learning_rate", "epochs"):
            problems.positive(name, getattr(self, name))
        problems.positive("max_grad_norm", self.max_grad_norm)
        problems.nonnegative("weight_decay", self.weight_decay)
        for name in ("batch_size", "micro_batch_pairs", "max_steps"):
            problems.at_least(name, getattr(self, name), 1)
        problems.at_least("max_length", self.max_length, 2)  # a prompt token and the response's EOS
        problems.finite("ama_upper", self.ama_upper)
        problems.finite("ama_lower", self.ama_lower)
        if math.isfinite(self.ama_upper) and math.isfinite(self.ama_lower) and not self.ama_lower < self.ama_upper:
            problems.add("ama_lower", f"must be < ama_upper ({self.ama_upper}), got {self.ama_lower}")


@dataclass
class DPOResult:
    """Attributes:
    history: one dict per optimiser step, measured on the step's batch before its update: ``step``, ``loss``,
        ``accuracy`` (pairs whose implicit chosen reward beats the rejected one; a tie counts as wrong),
        ``margin`` (mean chosen − rejected implicit reward), ``reward_chosen``, ``reward_rejected``,
        ``kept_fraction`` (response tokens in the loss / response tokens: 1 with ``mask="none"``; the masked
        fraction is 1 − it), ``empty_responses`` (responses whose AMA mask kept nothing), ``grad_norm`` (before
        clipping) and ``lr``.
    steps: optimiser steps taken.
    kept_fraction: response tokens in the loss / response tokens, over the whole run.
    saved_path: the saved Hugging Face directory (None without ``output_dir``).
    seconds: wall time of the training loop.
    """

    history: list = field(default_factory=list)
    steps: int = 0
    kept_fraction: float = 1.0
    saved_path: Path | None = None
    seconds: float = 0.0


@dataclass
class PreferenceLogps:
    """Masked sequence log-probs of a batch of B pairs (:func:`preference_logps`).

    Attributes:
        policy_chosen, policy_rejected: (B,) Σ over the kept tokens of log π (differentiable w.r.t. the
            policy's parameters when computed with grad enabled).
        ref_chosen, ref_rejected: (B,) the same sums under the reference (no grad).
        kept_tokens: 0-dim, response tokens kept in the sums (both sides).
        response_tokens: 0-dim, response tokens (both sides).
        empty_responses: 0-dim, responses whose AMA mask kept nothing (before the ``empty_mask`` fallback;
            0 with ``mask="none"``).
        nonfinite_scores: 0-dim, response tokens whose AMA score is NaN/Inf (0 with ``mask="none"``); the
            trainer refuses a step with any, since the mask would then be arbitrary.
    """

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    kept_tokens: torch.Tensor
    response_tokens: torch.Tensor
    empty_responses: torch.Tensor
    nonfinite_scores: torch.Tensor


# ------------------------------------------------------------------------------------ the pieces


def _check_grid(fn: str, name: str, tensor, *, floating: bool) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dim() != 2:
        raise ValueError(f"{fn}: {name} must have shape (B, T), got {tuple(tensor.shape)}")
    if floating and not tensor.is_floating_point():
        raise TypeError(f"{fn}: {name} must be a floating-point tensor, got {tensor.dtype}")
    if not floating and tensor.dtype != torch.bool:
        raise TypeError(f"{fn}: {name} must be a bool tensor, got {tensor.dtype}")


def ama_mask(scores: torch.Tensor, response_mask: torch.Tensor, *, upper: float = 0.3, lower: float = -0.3,
             keep: str = "positive", empty: str = "full") -> torch.Tensor:
    """The AMA mask of one side of ADPO: the response tokens whose hysteresis signal z_t is ``keep``.

    z_t ∈ {+1, −1} (:func:`hcrlhf.train.rl_losses.ama_signal`, mode "hysteresis") walks along each row's
    response tokens: it switches to +1 where s_t > ``upper``, to −1 where s_t < ``lower``, and otherwise keeps
    its previous value; before the first switch it is the sign of the row's first response score (+1 if
    s ≥ 0). Scores outside ``response_mask`` are ignored (they may be anything, NaN included). Vectorised
    over T, no host sync.

    Args:
        scores: (B, T) float token scores on the same grid as ``response_mask`` (for ADPO: the score model's
            per-prefix score of each response token, see the module docstring).
        response_mask: (B, T) bool, true on the response tokens.
        upper, lower: the thresholds, finite, ``lower < upper`` (``lower`` is signed: −0.3 means "below −0.3").
        keep: "positive" (a chosen response: keep z = +1) or "negative" (a rejected one: keep z = −1).
        empty: a row left with no token: "full" (its whole ``response_mask`` row) or "skip" (stays empty).

    Returns:
        (B, T) bool, a subset of ``response_mask``.
    """
    fn = "ama_mask"
    _check_grid(fn, "scores", scores, floating=True)
    _check_grid(fn, "response_mask", response_mask, floating=False)
    if scores.shape != response_mask.shape:
        raise ValueError(f"{fn}: scores {tuple(scores.shape)} and response_mask {tuple(response_mask.shape)} must "
                         "have the same shape")
    if scores.device != response_mask.device:
        raise ValueError(f"{fn}: scores are on {scores.device}, response_mask on {response_mask.device}")
    if keep not in KEEPS:
        raise ValueError(f"{fn}: keep must be one of {KEEPS}, got {keep!r}")
    if empty not in EMPTY_MASKS:
        raise ValueError(f"{fn}: empty must be one of {EMPTY_MASKS}, got {empty!r}")
    for name, value in (("upper", upper), ("lower", lower)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{fn}: {name} must be a finite number, got {value!r}")
    if not lower < upper:
        raise ValueError(f"{fn}: lower must be < upper (lower is signed, e.g. -0.3), got lower={lower}, upper={upper}")
    if scores.shape[1] == 0:
        return response_mask.clone()
    signal = ama_signal(scores.detach(), response_mask, mode="hysteresis", upper=float(upper), lower=float(lower))
    kept = response_mask & (signal == (1.0 if keep == "positive" else -1.0))
    if empty == "full":
        nothing = ~kept.any(dim=1, keepdim=True)
        kept = torch.where(nothing, response_mask, kept)
    return kept


def masked_sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_t over the true positions of ``mask`` of ``token_logps``: (B, T), (B, T) bool → (B,).

    ``where``, not a product: a value outside the mask (a NaN or −inf log-prob of a padded position) stays out,
    and the gradient w.r.t. a masked-out position is exactly 0. Keeps the dtype (float64 works).
    """
    fn = "masked_sequence_logps"
    _check_grid(fn, "token_logps", token_logps, floating=True)
    _check_grid(fn, "mask", mask, floating=False)
    if token_logps.shape != mask.shape:
        raise ValueError(f"{fn}: token_logps {tuple(token_logps.shape)} and mask {tuple(mask.shape)} must have the "
                         "same shape")
    return torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum(dim=1)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float):
    """The DPO loss of B pairs from their sequence log-probs, and its metrics.

    ``loss = mean_i −log σ(β·[(π_c − ρ_c) − (π_r − ρ_r)])`` with π = log π(y|x), ρ = log π_ref(y|x) (sums, or
    masked sums for ADPO). The reference terms are constants of the objective (detached).

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: (B,) floating, same
            shape, dtype and device (float64 for verification).
        beta: β > 0, finite.

    Returns:
        ``(loss, metrics)``: the 0-dim loss (in the inputs' dtype) and 0-dim detached tensors (no host sync)
        ``reward_chosen`` = mean β·(π_c − ρ_c), ``reward_rejected`` = mean β·(π_r − ρ_r), ``accuracy`` = the
        fraction of pairs with reward_chosen > reward_rejected (a tie counts as wrong), ``margin`` = mean
        (reward_chosen − reward_rejected).
    """
    fn = "dpo_loss"
    inputs = {"policy_chosen_logps": policy_chosen_logps, "policy_rejected_logps": policy_rejected_logps,
              "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    for name, tensor in inputs.items():
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 1 or not tensor.is_floating_point():
            raise ValueError(f"{fn}: {name} must be a (B,) floating tensor, got shape {tuple(tensor.shape)} and "
                             f"dtype {tensor.dtype}")
        if (tensor.shape, tensor.dtype, tensor.device) != (policy_chosen_logps.shape, policy_chosen_logps.dtype,
                                                           policy_chosen_logps.device):
            raise ValueError(f"{fn}: {name} {tuple(tensor.shape)} {tensor.dtype} on {tensor.device} must match "
                             f"policy_chosen_logps {tuple(policy_chosen_logps.shape)} {policy_chosen_logps.dtype} "
                             f"on {policy_chosen_logps.device}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"{fn}: beta must be a finite number > 0, got {beta!r}")
    chosen_rewards = beta * (policy_chosen_logps - ref_chosen_logps.detach())
    rejected_rewards = beta * (policy_rejected_logps - ref_rejected_logps.detach())
    logits = chosen_rewards - rejected_rewards
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        metrics = {
            "reward_chosen": chosen_rewards.mean(),
            "reward_rejected": rejected_rewards.mean(),
            "accuracy": (chosen_rewards > rejected_rewards).to(logits.dtype).mean(),
            "margin": logits.mean(),
        }
    return loss, metrics


# ----------------------------------------------------------------------------- batches of pairs


def _rows(dataset, preference: str, fn: str) -> list[dict]:
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    if not rows:
        raise ValueError(f"{fn}: the preference dataset is empty")
    key = f"{preference}_response_id"
    for index, row in enumerate(rows):
        missing = [c for c in ("prompt", "response_0", "response_1", key) if c not in row]
        if missing:
            raise ValueError(f"{fn}: preference row {index} lacks {missing} (PKU-SafeRLHF schema; load it with "
                             "hcrlhf.data.load_preferences)")
        if row[key] not in (0, 1) or isinstance(row[key], bool):
            raise ValueError(f"{fn}: preference row {index} has {key}={row[key]!r}; it must be 0 or 1")
    return rows


def _chosen_rejected(rows: list[dict], preference: str):
    key = f"{preference}_response_id"
    prompts = [row["prompt"] for row in rows]
    chosen = [row[f"response_{int(row[key])}"] for row in rows]
    rejected = [row[f"response_{1 - int(row[key])}"] for row in rows]
    return prompts, chosen, rejected


def _reference_context(policy, reference):
    """The model that computes the reference log-probs, and the context to compute them in."""
    if reference is not None:
        return reference, contextlib.nullcontext()
    return policy, policy.disable_adapter()  # LoRA: the base model is the reference


def preference_logps(policy, reference, tokenizer, rows, *, config: DPOConfig, score_model=None, template=None,
                     device=None) -> PreferenceLogps:
    """Masked sequence log-probs of B preference pairs under the policy and the reference.

    The 2B sequences (chosen rows, then rejected rows) are tokenized right padded, cut to ``config.max_length``
    (:func:`hcrlhf.data.tokenize_pairs`, an EOS after each response); token log-probs come from
    :func:`hcrlhf.models.response_logprobs` (``ops.linear_logprobs`` on response positions only), the policy's
    with grad as the caller has it enabled, the reference's without. With ``config.mask == "ama"`` the score
    model scores the same 2B sequences (no grad) and :func:`ama_mask` keeps the chosen rows' +1 tokens and
    the rejected rows' −1 tokens.

    Args:
        policy: a Hugging Face causal LM, or a peft wrapper around one.
        reference: the frozen reference LM, or None for a peft ``policy`` (its adapters disabled).
        tokenizer: the tokenizer of the policy (and of the score model).
        rows: B preference rows (PKU-SafeRLHF schema); ``config.preference`` picks the chosen response.
        config: :class:`DPOConfig` (``preference``, ``max_length``, ``mask``, ``ama_*``, ``empty_mask``, ``impl``).
        score_model: a :class:`hcrlhf.models.ScoreModel` (or any module returning ``.scores`` (2B, T) per
            position) sharing the tokenizer; needed for ``mask="ama"``.
        template: prompt template (see :func:`hcrlhf.data.get_template`).
        device: where the models run (default: the policy's device).

    Returns:
        :class:`PreferenceLogps`.
    """
    fn = "preference_logps"
    if reference is None and not is_peft_model(policy):
        raise ValueError(f"{fn}: reference is None but the policy is not a peft model; pass the frozen reference "
                         "(only a LoRA policy can serve as its own reference, with its adapters disabled)")
    if config.mask == "ama" and score_model is None:
        raise ValueError(f"{fn}: config.mask='ama' needs score_model (the per-prefix token scores)")
    rows = _rows(rows, config.preference, fn)
    template = get_template(template, tokenizer)
    device = torch.device(device) if device is not None else next(policy.parameters()).device
    prompts, chosen, rejected = _chosen_rejected(rows, config.preference)
    n = len(rows)
    batch = tokenize_pairs(tokenizer, prompts + prompts, chosen + rejected, template=template,
                           max_length=config.max_length, padding_side="right")
    # Action j produced token j + 1: a response token other than a (cut-prompt) first token of its row.
    action_mask_host = batch.response_mask[:, 1:]
    index = action_mask_host.reshape(-1).nonzero().squeeze(1).to(device, non_blocking=True)  # host mask: no sync
    input_ids = batch.input_ids.to(device, non_blocking=True)
    attention_mask = batch.attention_mask.to(device, non_blocking=True)
    action_mask = action_mask_host.to(device, non_blocking=True)

    policy_grid = response_logprobs(policy, input_ids, attention_mask, index, impl=config.impl)
    ref_model, ref_context = _reference_context(policy, reference)
    with torch.no_grad(), ref_context:
        ref_grid = response_logprobs(ref_model, input_ids, attention_mask, index, impl=config.impl)

    mask = action_mask
    empty = nonfinite = torch.zeros((), dtype=torch.long, device=device)
    if config.mask == "ama":
        with torch.no_grad():
            scores = score_model(input_ids, attention_mask).scores.float()[:, 1:]  # the prefix through token j + 1
        if config.ama_score_model == "cost":
            scores = -scores  # C > 0 means unsafe: the signal reads "safe" as positive
        nonfinite = (action_mask & ~torch.isfinite(scores)).sum()
        settings = dict(upper=config.ama_upper, lower=config.ama_lower, empty="skip")
        kept = torch.cat([ama_mask(scores[:n], action_mask[:n], keep="positive", **settings),
                          ama_mask(scores[n:], action_mask[n:], keep="negative", **settings)])
        nothing = action_mask.any(dim=1) & ~kept.any(dim=1)
        empty = nothing.sum()
        if config.empty_mask == "full":
            kept = torch.where(nothing.unsqueeze(1), action_mask, kept)
        mask = kept

    policy_sums = masked_sequence_logps(policy_grid, mask)
    ref_sums = masked_sequence_logps(ref_grid, mask)
    return PreferenceLogps(policy_chosen=policy_sums[:n], policy_rejected=policy_sums[n:], ref_chosen=ref_sums[:n],
                           ref_rejected=ref_sums[n:], kept_tokens=mask.sum(), response_tokens=action_mask.sum(),
                           empty_responses=empty, nonfinite_scores=nonfinite)


# --------------------------------------------------------------------------------------- training


def _nonfinite_parameters(model) -> list[str]:
    """Names of the floating-point parameters holding a NaN or an infinity (one host sync when all are finite)."""
    named = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
    if not named:
        return []
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named])
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(named, finite.tolist()) if not ok]


def _diverged(what: str, step: int, total_steps: int,
              hint: str = "Lower the learning rate (dpo.learning_rate)") -> FloatingPointError:
    return FloatingPointError(f"train_dpo: the {what} at step {step} of {total_steps}; training stopped and no model "
                              f"was saved. {hint}")


def _save(policy, tokenizer, directory: Path, state: dict) -> Path:
    from hcrlhf.models.loading import save_tokenizer

    directory.mkdir(parents=True, exist_ok=True)
    if is_peft_model(policy):  # an ordinary causal-LM directory: the adapters merged into a copy of the base
        copy.deepcopy(policy).merge_and_unload().save_pretrained(directory, safe_serialization=True)
    else:
        policy.save_pretrained(directory, safe_serialization=True)
    save_tokenizer(tokenizer, directory)
    (directory / "dpo_training.json").write_text(json.dumps(state, indent=1, sort_keys=True, default=str) + "\n",
                                                 encoding="utf-8")
    return directory


def train_dpo(policy, reference, tokenizer, preference_dataset, *, config: DPOConfig | None = None,
              score_model=None, template=None, safety_split=None) -> DPOResult:
    """Train ``policy`` in place with DPO (``config.mask="none"``) or ADPO (``"ama"``) on preference pairs.

    Each optimiser step takes the next ``batch_size`` pairs of a stream of seeded per-epoch permutations (a
    function of ``seed`` and the step only), computes their masked sequence log-probs under the policy and the
    reference (:func:`preference_logps`, in micro-batches of ``micro_batch_pairs``), backpropagates the mean DPO
    loss (:func:`dpo_loss`), clips the gradient norm and takes an AdamW step. The policy runs in eval mode
    (dropout off), so that before the first update it equals the reference and the loss is log 2. Torch's global
    generator is seeded with ``seed`` for the run and restored afterwards.

    Args:
        policy: a Hugging Face causal LM (decoder + linear lm_head; all its parameters are trained), or a peft
            wrapper (only its trainable adapters are trained).
        reference: the frozen reference LM; None: a frozen copy of ``policy`` as passed in, or, for a peft policy,
            the policy with its adapters disabled (no copy). Never ``policy`` itself.
        tokenizer: the policy's tokenizer (pad and EOS tokens set; the score model must share it).
        preference_dataset: pairs in the PKU-SafeRLHF schema (a ``datasets.Dataset`` or a list of dicts).
        config: :class:`DPOConfig` (validated again here: it may have been changed in place).
        score_model: for ``mask="ama"``, the :class:`hcrlhf.models.ScoreModel` whose per-prefix scores drive
            the AMA mask (frozen here); ``config.ama_score_model`` says whether it is a reward or a cost model.
        template: prompt template (see :func:`hcrlhf.data.get_template`).
        safety_split: a :class:`hcrlhf.data.PromptSplit`; if given, training refuses any prompt of its safety
            set (docs/method.md#data-split).

    Returns:
        :class:`DPOResult`. With ``config.output_dir``, the policy (LoRA adapters merged into a copy) and the
        tokenizer are saved there as a Hugging Face directory (safetensors), with ``dpo_training.json`` (the
        config, steps and history).

    Raises:
        ConfigError: a bad setting (e.g. a non-finite learning rate), before any work.
        ValueError: a bad argument (a missing score model, a reference that is the policy, a pair on a safety
            prompt, a malformed row), before any work.
        FloatingPointError: the loss, the gradient norm or the AMA scores became NaN/Inf (the step is not
            taken), or the weights after the last update are not finite; the message names the step and nothing
            is saved.
    """
    from tqdm.auto import tqdm

    fn = "train_dpo"
    config = config if config is not None else DPOConfig()
    if not isinstance(config, DPOConfig):
        raise TypeError(f"{fn}: config must be a DPOConfig, got {type(config).__name__}")
    config.validate()
    if reference is policy:
        raise ValueError(f"{fn}: reference is the policy itself, so it would move with training; pass None (a frozen "
                         "copy, or the adapters disabled for a peft policy) or a separate model")
    if config.mask == "ama" and score_model is None:
        raise ValueError(f"{fn}: config.mask='ama' needs score_model (the per-prefix token scores of the AMA mask)")
    if config.mask == "none" and score_model is not None:
        warnings.warn(f"{fn}: score_model is ignored with config.mask='none'", stacklevel=2)
        score_model = None
    rows = _rows(preference_dataset, config.preference, fn)
    if safety_split is not None:
        safety_split.check_training([row["prompt"] for row in rows])
    if tokenizer.pad_token_id is None or tokenizer.eos_token_id is None:
        raise ValueError(f"{fn}: the tokenizer needs a pad and an EOS token")
    template = get_template(template, tokenizer)
    decoder_and_head(policy)  # fail fast: the fused log-prob path needs a decoder and a linear head

    device = torch.device(config.device) if config.device is not None else next(policy.parameters()).device
    policy.to(device)
    if reference is None and not is_peft_model(policy):
        reference = copy.deepcopy(policy)  # before any update
    for frozen in (reference, score_model):
        if frozen is not None:
            frozen.to(device).eval().requires_grad_(False)
    if not is_peft_model(policy):  # peft has frozen the base weights and left the adapters trainable
        policy.requires_grad_(True)
    parameters = [p for p in policy.parameters() if p.requires_grad]
    if not parameters:
        raise ValueError(f"{fn}: the policy has no trainable parameter")

    steps_per_epoch = math.ceil(len(rows) / config.batch_size)
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    per_pass = config.micro_batch_pairs or config.batch_size
    output_dir = Path(config.output_dir) if config.output_dir is not None else None
    result = DPOResult()
    kept_total, response_total = 0.0, 0.0
    permutations: dict[int, list[int]] = {}

    def batch_rows(step: int) -> list[dict]:
        picked = []
        for position in range(step * config.batch_size, (step + 1) * config.batch_size):
            epoch, offset = divmod(position, len(rows))
            if epoch not in permutations:
                order = list(range(len(rows)))
                random.Random(f"{config.seed}-dpo-{epoch}").shuffle(order)
                permutations.clear()
                permutations[epoch] = order
            picked.append(rows[permutations[epoch][offset]])
        return picked

    started = time.perf_counter()
    bar = tqdm(total=total_steps, disable=not config.progress, desc="dpo" if config.mask == "none" else "adpo",
               unit="step", dynamic_ncols=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
        policy.eval()  # dropout off: before the first update the policy equals the reference (loss = log 2)
        try:
            for step in range(1, total_steps + 1):
                batch = batch_rows(step - 1)
                optimizer.zero_grad(set_to_none=True)
                parts = []
                for start in range(0, len(batch), per_pass):
                    micro = batch[start:start + per_pass]
                    logps = preference_logps(policy, reference, tokenizer, micro, config=config,
                                             score_model=score_model, template=template, device=device)
                    loss, _ = dpo_loss(logps.policy_chosen, logps.policy_rejected, logps.ref_chosen,
                                       logps.ref_rejected, config.beta)
                    # Weight each micro-batch by its share of the step's pairs: the step's loss is the mean
                    # over all its pairs however they are split.
                    (loss * (len(micro) / len(batch))).backward()
                    parts.append(logps)
                # The step's metrics from all its pairs; one read-back with the gradient norm.
                loss, metrics = dpo_loss(*(torch.cat([getattr(p, name).detach() for p in parts]) for name in
                                           ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")),
                                         config.beta)
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    parameters, config.max_grad_norm if config.max_grad_norm is not None else float("inf"))
                kept = sum(p.kept_tokens for p in parts)
                response = sum(p.response_tokens for p in parts)
                empty = sum(p.empty_responses for p in parts)
                nonfinite = sum(p.nonfinite_scores for p in parts)
                values = torch.stack([loss.double(), grad_norm.double(), *(m.double() for m in metrics.values()),
                                      torch.as_tensor(kept, dtype=torch.float64, device=device),
                                      torch.as_tensor(response, dtype=torch.float64, device=device),
                                      torch.as_tensor(empty, dtype=torch.float64, device=device),
                                      torch.as_tensor(nonfinite, dtype=torch.float64, device=device)]).tolist()
                loss_value, norm_value = values[0], values[1]
                if values[9]:
                    raise _diverged(f"AMA scores are not finite ({int(values[9])} response tokens)", step,
                                    total_steps, "Check the score model (its outputs are NaN/Inf)")
                if not math.isfinite(loss_value):
                    raise _diverged(f"DPO loss is {loss_value}", step, total_steps)
                if not math.isfinite(norm_value):
                    raise _diverged(f"gradient norm is {norm_value}", step, total_steps)
                optimizer.step()
                record = {"step": step, "loss": loss_value, **dict(zip(metrics, values[2:6])),
                          "kept_fraction": values[6] / max(values[7], 1.0), "empty_responses": int(values[8]),
                          "grad_norm": norm_value, "lr": optimizer.param_groups[0]["lr"]}
                kept_total += values[6]
                response_total += values[7]
                result.history.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", acc=f"{record['accuracy']:.2f}")
            # The last update may break the weights with a finite loss: checked once before anything is saved.
            bad = _nonfinite_parameters(policy)
            if bad:
                raise _diverged(f"weights are not finite ({len(bad)} tensors, e.g. {bad[0]}) after the update",
                                total_steps, total_steps)
        finally:
            bar.close()
    result.steps = total_steps
    result.kept_fraction = kept_total / max(response_total, 1.0)
    result.seconds = time.perf_counter() - started
    if output_dir is not None:
        state = {"config": config.to_dict(), "steps": total_steps, "n_pairs": len(rows),
                 "kept_fraction": result.kept_fraction, "history": result.history}
        result.saved_path = _save(policy, tokenizer, output_dir, state)
    return result
