"""The lean Lagrangian RL trainer of HC-RLHF's candidate selection (docs/method.md#candidate-selection).

Each iteration of :meth:`SafeRLTrainer.step` reads top to bottom in numbered phases:

1. **rollout** — ``samples_per_prompt`` responses per prompt with HF ``generate``; rows of one prompt are
   adjacent (the layout ``ops.rloo_advantages`` expects);
2. **score** — reward and cost models at each row's end token; the cost window's μ̂, σ̂, the pessimistic
   coefficients k (of the bound, from the window's n_c; of the actor, from the rollout's rows by default, as
   in the official code) and the augmented costs c̃ = c + k_actor·((c − μ̂)² − σ̂²)/(2σ̂);
3. **log-probs** — the rollout policy and the reference, no grad, with ``ops.linear_logprobs`` applied to
   the hidden states of response positions only (the LM head never sees a prompt position);
4. **advantages** — ``ppo``: reward and cost critics + ``ops.safe_advantages`` (c̃ as the cost scores);
   ``rloo``: ``ops.rloo_advantages``;
5. **update** — ``rloo``: one REINFORCE step on A·Σ log π; ``ppo``: epochs × minibatches of the clipped
   surrogate and clipped value losses for both critics; optional entropy bonus, gradient clipping,
   pretraining-loss mix (PTX: ``ptx_coef`` · the LM loss of a batch of ``ptx_path`` rows, added to the
   policy loss of every optimiser step) and (experimental) AMA mask;
6. **multiplier** — ``multiplier.step(U = μ̂ + k·σ̂, τ, scale=σ̂)`` on the host (the PID rule by default,
   the official rule with ``lambda_update="official"``);
7. **log** — JSON Lines (and TensorBoard when installed), progress bar, checkpoint.

Coordinates. A sequence is ``prompt (left padded) + response (right padded)``, width T. Per-token
quantities live on the **action grid** (B, T − 1): column j is the action that produced token j + 1,
its log-prob is read from the hidden state at position j and its state value is the critic's output at
position j (the prefix through token j). ``action_mask`` is true on response tokens up to and including
the first EOS.

Memory. The KL reference is a frozen copy of the policy or, with LoRA (``lora_r > 0``, peft), the policy
itself with its adapters disabled: one base model serves both, and only the adapter weights train.

Several processes (``torchrun``, docs/distributed.md). Each rank rolls out its own block of the iteration's
prompts (an RLOO group stays on one rank); the costs of all ranks are gathered, so the cost window, μ̂, σ̂, k, U
and λ are the same on every rank; every denominator of a loss is the global one, and gradients are averaged
over ranks (FSDP2 for ``sharding="fsdp"``, one all-reduce for ``"replicate"``), so the update is the one a single
process would make on the whole batch. Sampling draws per-row noise from (seed, iteration, prompt, sample), so
a run on N ranks samples the same responses as a run on one. Rank 0 alone logs, shows progress and seals
checkpoints.

Host syncs. HF ``generate`` synchronises by itself (it checks for EOS every token); right after it the
action mask is copied to the host once, so that every later gather index is built on the host. After
that, phases 2–5 run without reading the device: λ reaches the kernels as a 0-dim device tensor, μ̂ and
σ̂ are computed on the device from the window plus the new costs, and token counts stay tensors. The
only read-back is in phases 6–7: the new costs (for the host-side cost window and the multiplier) and
the logged metrics, in two transfers. NaN/Inf checks happen there too, so a diverged step raises
:class:`TrainingDivergedError` before it can be checkpointed; the last good checkpoint is kept.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import hcrlhf.train.rl_checkpoint as rl_checkpoint
from hcrlhf import distributed, ops
from hcrlhf.data.lm_rows import read_lm_rows
from hcrlhf.data.templates import get_template, tokenize_prompts
from hcrlhf.models.generation import generate, generation_config, row_seeds
from hcrlhf.models.loading import save_tokenizer
from hcrlhf.models.logprobs import (
    decoder_and_head,
    is_peft_model,
    lm_loss_backward,
    micro_batches,
    response_logprobs,
    shard_for_logprobs,
    tokenize_lm_rows,
)
from hcrlhf.safety import CostWindow, assert_disjoint, augmented_costs, make_multiplier, pessimistic_coefficient
from hcrlhf.train.rl_config import SafeRLConfig
from hcrlhf.train.rl_losses import (
    ama_mask,
    clipped_value_loss,
    explained_variance,
    masked_entropy,
    masked_sum,
    ppo_policy_loss,
    reinforce_loss,
)

__all__ = ["SafeRLTrainer", "TrainingDivergedError", "Rollout"]

# Settings that may change between a run and its resumption (they do not change the trajectory).
RESUMABLE_CHANGES = frozenset({"total_steps", "checkpoint_every", "keep_checkpoints", "resume", "progress",
                               "tensorboard", "output_dir", "sync_phase_timing", "device", "debug_distributed"})
# Update statistics that are per-rank shares of a global mean (summed over ranks); the rest (gradient norms) are
# global already.
_SUMMED_STATS = frozenset({"policy_loss", "value_loss/reward", "value_loss/cost", "ptx_loss", "entropy/updated"})
# σ̂ floor for the augmented costs: a window of identical costs would otherwise divide by zero.
_STD_FLOOR = 1e-6


class TrainingDivergedError(RuntimeError):
    """A loss, a gradient norm, a score, the cost bound or λ became NaN/Inf; training stopped."""


@dataclass
class Rollout:
    """One batch of sampled sequences.

    Attributes:
        prompts: the B prompt texts (each repeated ``samples_per_prompt`` times, adjacent).
        input_ids: (B, T) prompt (left padded) + response (right padded).
        attention_mask: (B, T) int64.
        action_mask: (B, T − 1) bool on the device: response tokens up to and including the first EOS.
        action_mask_host: the same on the CPU (gather indices are built from it without device syncs).
        prompt_width: P, the padded prompt width (the response starts at column P of ``input_ids``).
    """

    prompts: list
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    action_mask: torch.Tensor
    action_mask_host: torch.Tensor
    prompt_width: int

    @property
    def rows(self) -> int:
        return self.input_ids.shape[0]

    @property
    def width(self) -> int:
        return self.input_ids.shape[1]


class SafeRLTrainer:
    """PPO-/RLOO-Lagrangian training of a policy against a reward model under a pessimistic cost bound.

    Args:
        config: :class:`SafeRLConfig`.
        policy: the causal LM to train (usually the SFT model); trained in place.
        tokenizer: its tokenizer (the reward and cost models must share it).
        reward_model, cost_model: :class:`hcrlhf.models.ScoreModel` s (frozen here).
        train_prompts: the candidate prompts (texts) to train on.
        safety_prompts: the safety set D_s, to refuse any overlap: a :class:`hcrlhf.data.PromptSplit`, the
            safety prompt texts, or their :func:`hcrlhf.safety.fingerprint`. Pass ``None`` explicitly to
            skip the check (a warning says so).
        reference_model: the KL reference (default: a frozen copy of ``policy`` as passed in; with LoRA it
            must be None: the reference is the policy with its adapters disabled).
        reward_critic, cost_critic: ppo critics (default: ``ValueModel`` copies of the reward / cost
            model, as Safe RLHF initialises them).
        template: prompt template (see :func:`hcrlhf.data.get_template`).

    On ``resume=True`` pass the same initial policy (and reference) as the first run: the reference
    defaults to a copy of the policy *before* the checkpoint's weights are loaded into it.

    With LoRA (``config.lora_r > 0``) pass the base model (without adapters): it is wrapped in place with
    ``peft.get_peft_model`` and ``self.policy`` is the wrapper; ``self.reference`` is None.
    """

    def __init__(self, config: SafeRLConfig, *, policy, tokenizer, reward_model, cost_model, train_prompts,
                 safety_prompts, reference_model=None, reward_critic=None, cost_critic=None, template=None):
        if not isinstance(config, SafeRLConfig):
            raise TypeError(f"SafeRLTrainer: config must be a SafeRLConfig, got {type(config).__name__}")
        config.validate()
        self.config = config
        # Several processes: this rank's place, and the splits it needs to be even (docs/distributed.md).
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.is_main = self.rank == 0
        _check_world_size(config, self.world)
        self.sharded = self.world > 1 and config.sharding == "fsdp"
        if self.sharded and config.lora_r > 0:
            raise NotImplementedError("SafeRLTrainer: LoRA (lora_r > 0) with sharding='fsdp' is not supported yet; "
                                      "use sharding='replicate' (only the adapters' gradients are then all-reduced)")
        self.train_prompts = _check_prompts(train_prompts)
        _refuse_safety_overlap(self.train_prompts, safety_prompts)
        self.tokenizer = tokenizer
        self.template = get_template(template, tokenizer)
        if tokenizer.pad_token_id is None:
            raise ValueError("SafeRLTrainer: the tokenizer has no pad token; set tokenizer.pad_token")
        # Fail fast, before any model work: the PTX text and peft.
        self.ptx_rows, self.ptx_kind, self.ptx_fingerprint = [], None, None
        if config.ptx_coef > 0:
            self.ptx_rows, self.ptx_kind, self.ptx_fingerprint = read_lm_rows(config.ptx_path,
                                                                               name="SafeRLConfig: ptx_path")
            if self.ptx_kind == "text" and tokenizer.eos_token_id is None:
                raise ValueError("SafeRLTrainer: plain-text PTX rows end with an EOS target, but the tokenizer has "
                                 "no eos_token")
        self.lora = config.lora_r > 0
        if self.lora:
            peft = rl_checkpoint.import_peft()
            if reference_model is not None:
                raise ValueError("SafeRLTrainer: with LoRA (lora_r > 0) the KL reference is the policy with its "
                                 "adapters disabled; do not pass reference_model")
            if is_peft_model(policy) or any(isinstance(m, peft.tuners.lora.LoraLayer) for m in policy.modules()):
                raise ValueError("SafeRLTrainer: with lora_r > 0 pass the base model without adapters (the trainer "
                                 "adds them; a policy wrapped by an earlier trainer cannot be reused)")

        self.device = torch.device(config.device) if config.device is not None else next(policy.parameters()).device
        if self.world > 1 and self.device.type == "cuda":
            self.device = distributed.default_device()  # this rank's GPU (LOCAL_RANK)
        if config.bf16 is True and self.device.type != "cuda":
            raise ValueError(f"SafeRLConfig: bf16=True needs a CUDA device; training is on {self.device}")
        self.use_bf16 = (self.device.type == "cuda" and config.bf16 in (True, "auto")
                         and torch.cuda.is_bf16_supported())
        _seed_everything(config.seed)

        # Models. The reference is copied before any checkpoint is loaded into the policy; with LoRA it is
        # the policy with its adapters disabled (no copy).
        decoder_and_head(policy)
        policy = policy.to(self.device)
        if self.lora:
            policy = _add_lora(policy, config)
            self.reference = None
        else:
            self.reference = reference_model if reference_model is not None else copy.deepcopy(policy)
        self.policy = policy
        self.reward_model, self.cost_model = reward_model, cost_model
        for frozen in (self.reference, self.reward_model, self.cost_model):
            if frozen is not None:
                frozen.to(self.device).eval().requires_grad_(False)
        self.policy.eval()  # dropout off: rollout, old log-probs and update see the same function
        if config.gradient_checkpointing:
            if hasattr(self.policy, "activation_checkpointing_enable"):  # transformers >= 5
                self.policy.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if not self.lora:  # with LoRA peft has frozen the base weights and left the adapters trainable
            self.policy.requires_grad_(True)
        if self.sharded:  # before the optimisers: FSDP2 replaces the parameters by sharded ones
            self.policy = shard_for_logprobs(self.policy, mixed_precision=self.use_bf16)
            if config.shard_frozen_models:
                if self.reference is not None:
                    self.reference = shard_for_logprobs(self.reference, mixed_precision=self.use_bf16)
                for model in (self.reward_model, self.cost_model):
                    distributed.shard_model(model, mixed_precision=self.use_bf16)
        self.actor_parameters = [p for p in self.policy.parameters() if p.requires_grad]
        self.critics = {}
        if config.estimator == "ppo":
            from hcrlhf.models import ValueModel

            if reward_critic is None:
                reward_critic = ValueModel.from_score_model(reward_model)
            if cost_critic is None:
                cost_critic = ValueModel.from_score_model(cost_model)
            self.critics = {"reward_critic": reward_critic, "cost_critic": cost_critic}
            for critic in self.critics.values():
                critic.to(self.device).eval().requires_grad_(True)
                if self.sharded:
                    distributed.shard_model(critic, mixed_precision=self.use_bf16)

        self.actor_optimizer = torch.optim.AdamW(self.actor_parameters, lr=config.actor_lr,
                                                 weight_decay=config.weight_decay)
        self.critic_optimizer = None
        if self.critics:
            critic_parameters = [p for critic in self.critics.values() for p in critic.parameters()]
            self.critic_optimizer = torch.optim.AdamW(critic_parameters, lr=config.critic_lr,
                                                      weight_decay=config.weight_decay)
        self.multiplier = make_multiplier(
            config.lambda_update, init=config.lambda_init, lr=config.lambda_lr, ki=config.lambda_ki,
            kp=config.lambda_kp, kd=config.lambda_kd, min_value=config.lambda_min, max_value=config.lambda_max,
            error_clip=tuple(config.lambda_error_clip), update_delay=config.lambda_update_delay)
        self.cost_window = CostWindow(config.cost_window_size)
        self.global_step = 0  # completed iterations
        self.history: list[dict] = []
        self.last_checkpoint: Path | None = None
        self._permutations: dict[int, list[int]] = {}
        self._ptx_permutations: dict[int, list[int]] = {}

        self.output_dir = Path(config.output_dir) if config.output_dir is not None else None
        self._writer = None
        if self.output_dir is not None:
            if self.is_main:
                self.output_dir.mkdir(parents=True, exist_ok=True)
                self._writer = _tensorboard_writer(config.tensorboard, self.output_dir)
            distributed.barrier()
            if config.resume:
                self._resume()
            elif self.is_main:
                (self.output_dir / "metrics.jsonl").write_text("", encoding="utf-8")
            if self.is_main:
                (self.output_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1),
                                                             encoding="utf-8")

    # ------------------------------------------------------------------------------- training

    def train(self) -> list[dict]:
        """Run iterations until ``total_steps``; returns the metrics of the iterations run now."""
        from tqdm.auto import tqdm

        config = self.config
        ran = []
        bar = tqdm(total=config.total_steps, initial=self.global_step, disable=not (config.progress and self.is_main),
                   desc="safe-rl", dynamic_ncols=True)
        try:
            while self.global_step < config.total_steps:
                metrics = self.step()
                ran.append(metrics)
                bar.update(1)
                bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", cost=f"{metrics['cost/mean']:.3f}",
                                bound=f"{metrics['cost/bound']:.3f}", **{"λ": f"{metrics['lambda']:.3g}"})
                last = self.global_step == config.total_steps
                every = config.checkpoint_every
                if self.output_dir is not None and ((every is not None and self.global_step % every == 0) or last):
                    self.save_checkpoint()
        finally:
            bar.close()
            if self._writer is not None:
                self._writer.flush()
        return ran

    def step(self) -> dict:
        """One iteration (phases 1–7 of the module docstring); returns its metrics."""
        config = self.config
        timer = _PhaseTimer(self.device, config.sync_phase_timing)
        # λ of this iteration, as a device tensor: the kernels read it without a host sync.
        lagrange_multiplier = self.multiplier.tensor(device=self.device)
        lagrange_multiplier_value = self.multiplier.value

        # 1. rollout (this rank's block of the iteration's prompts) ---------------------------
        with timer("generation"):
            step_prompts = self._next_prompts()
            first, last = distributed.shard_bounds(len(step_prompts))
            rollout = self.rollout(step_prompts[first:last], first_prompt=first)
        rows, action_mask = rollout.rows, rollout.action_mask
        global_rows = rows * self.world  # every rank has as many rows (prompts_per_step % world == 0)
        chunks = self._chunks(rollout, list(range(rows)))

        # 2. score -----------------------------------------------------------------------------
        with timer("scoring"), torch.no_grad(), self._autocast():
            reward_out = [self.reward_model(rollout.input_ids[r], rollout.attention_mask[r]) for r, _ in chunks]
            cost_out = [self.cost_model(rollout.input_ids[r], rollout.attention_mask[r]) for r, _ in chunks]
            reward_scores = torch.cat([o.end_scores for o in reward_out]).float()
            costs = torch.cat([o.end_scores for o in cost_out]).float()
            # Every rank's costs, in global row order: the window below is the same on every rank.
            all_costs = distributed.all_gather_rows(costs)
            # μ̂, σ̂ of the window *with* this rollout's costs, on the device (the host window is
            # extended in phase 6, after the single read-back).
            previous = torch.as_tensor(self.cost_window.values(), dtype=torch.float64).to(self.device)
            window = torch.cat([previous, all_costs.double()])[-config.cost_window_size:]
            n_costs = min(self.cost_window.n + global_rows, config.cost_window_size)
            cost_mean, cost_std = window.mean(), window.std()
            coefficient = self.pessimistic_coefficient(n_costs)  # k of the bound U that moves λ
            # The actor's k: the official code counts the rows of one update, not the window.
            actor_coefficient = self.pessimistic_coefficient(global_rows if config.actor_coefficient == "rollout"
                                                             else n_costs)
            cost_scores = augmented_costs(costs, cost_mean, cost_std.clamp(min=_STD_FLOOR), actor_coefficient)
            bound_device = cost_mean + coefficient * cost_std

        # 3. log-probs (rollout policy and reference; LM head on response positions only) -------
        with timer("logprobs"), torch.no_grad(), self._autocast():
            old_logprobs, old_entropy = self._grid_logprobs(self.policy, rollout, chunks, entropy=True)
            ref_logprobs = self.reference_logprobs(rollout, chunks)

        # 4. advantages ------------------------------------------------------------------------
        with timer("advantages"), torch.no_grad():
            if config.estimator == "ppo":
                with self._autocast():
                    full_values = {name: torch.cat([critic(rollout.input_ids[r], rollout.attention_mask[r])
                                                    for r, _ in chunks]).float()
                                   for name, critic in self.critics.items()}
                # The value of action j's state is the critic's output at position j (prefix through j).
                reward_values = full_values["reward_critic"][:, :-1]
                cost_values = full_values["cost_critic"][:, :-1]
                result = ops.safe_advantages(
                    old_logprobs, ref_logprobs, action_mask, reward_scores, cost_scores, reward_values, cost_values,
                    kl_coef=config.kl_coef, lagrange_multiplier=lagrange_multiplier, gamma=config.gamma,
                    gae_lambda=config.gae_lambda, kl_estimator=config.kl_estimator, score_clip=config.score_clip,
                    kl_in_cost=config.kl_in_cost, divide_by_one_plus_lambda=config.divide_by_one_plus_lambda,
                    whiten=config.whiten_advantages and self.world == 1, impl=config.impl)
                advantages = result.advantages
                if config.whiten_advantages and self.world > 1:  # over the tokens of all ranks
                    advantages = _whiten_across_ranks(advantages, action_mask)
                sequence_kl = result.kl.sum(dim=1)
            else:
                result = ops.rloo_advantages(
                    old_logprobs, ref_logprobs, action_mask, reward_scores, cost_scores,
                    group_size=config.samples_per_prompt, kl_coef=config.kl_coef,
                    lagrange_multiplier=lagrange_multiplier, kl_estimator=config.kl_estimator,
                    score_clip=config.score_clip, impl=config.impl)
                advantages = result.advantages
                sequence_kl = result.kl
            policy_mask = action_mask
            if config.ama != "off":  # EXPERIMENTAL (docs/method.md#equilibrate-rlhf)
                if config.ama_token_scores == "critics":
                    # The state *after* token j + 1: the critics' outputs at position j + 1.
                    after = {name: values[:, 1:] for name, values in full_values.items()}
                    token_scores = after["reward_critic"] - lagrange_multiplier * after["cost_critic"]
                else:
                    token_scores = (torch.cat([o.scores for o in reward_out]).float()[:, 1:]
                                    - lagrange_multiplier * torch.cat([o.scores for o in cost_out]).float()[:, 1:])
                token_scores = token_scores / (1.0 + lagrange_multiplier)
                policy_mask = ama_mask(advantages, token_scores, action_mask, mode=config.ama, upper=config.ama_upper,
                                       lower=config.ama_lower, min_kept=config.ama_min_kept)

        # 5. update ----------------------------------------------------------------------------
        with timer("update"):
            if config.estimator == "ppo":
                update_stats = self._update_ppo(rollout, old_logprobs, advantages, policy_mask, reward_values,
                                                cost_values, result.reward_returns, result.cost_returns)
            else:
                update_stats = self._update_rloo(rollout, advantages, policy_mask)

        # 6. multiplier (host) -----------------------------------------------------------------
        with timer("multiplier"):
            # Metrics of the whole batch (all ranks): per-row values gathered, token sums reduced.
            gather, reduce = distributed.all_gather_rows, distributed.all_reduce_sum
            token_sums = reduce(torch.stack([action_mask.sum().float(), masked_sum(old_entropy, action_mask),
                                             policy_mask.sum().float(),
                                             advantages.sum() if advantages.dim() == 1 else
                                             masked_sum(advantages, action_mask)]))
            token_count, entropy_sum, kept, advantage_sum = token_sums.unbind()
            # One gather for every per-row value (one process: the tensors themselves).
            all_rewards, all_cost_scores, all_kl, all_lengths = gather(torch.stack([
                reward_scores, cost_scores, sequence_kl, action_mask.sum(dim=1)], dim=1).double()).unbind(1)
            device_metrics = {
                "reward/mean": all_rewards.mean(), "reward/std": all_rewards.std(),
                "cost/mean": all_costs.mean(), "cost/std": all_costs.std(),
                "cost/augmented_mean": all_cost_scores.mean(),
                "cost/bound_device": bound_device, "kl": all_kl.mean(),
                "entropy": entropy_sum / token_count.clamp(min=1),
                "advantages/mean": advantage_sum / (global_rows if advantages.dim() == 1 else token_count.clamp(min=1)),
                "response_length/mean": all_lengths.mean(),
                "tokens": token_count,
                "ama/kept_fraction": kept / token_count.clamp(min=1),
                **{name: reduce(value) if name in _SUMMED_STATS else value for name, value in update_stats.items()},
            }
            if config.estimator == "ppo":
                device_metrics["explained_variance/reward"] = _explained_variance_across_ranks(
                    reward_values, result.reward_returns, action_mask)
                device_metrics["explained_variance/cost"] = _explained_variance_across_ranks(
                    cost_values, result.cost_returns, action_mask)
            names = list(device_metrics)
            values = torch.stack([device_metrics[n].detach().float().reshape(()) for n in names]).cpu().tolist()
            metrics = dict(zip(names, values))
            host_costs = all_costs.double().cpu()
            self._check_finite(metrics, ("policy_loss", "value_loss/reward", "value_loss/cost", "grad_norm/actor",
                                         "grad_norm/critics", "reward/mean", "cost/mean"))
            self.cost_window.extend(host_costs)
            bound = self.cost_window.pessimistic_bound(coefficient)
            if not math.isfinite(bound):
                self._diverged("the pessimistic cost bound", bound)
            # The PID rule measures U − τ in units of the window's σ̂ (the official rule ignores it).
            self.multiplier.step(bound, config.cost_threshold, scale=self.cost_window.std)
            if not math.isfinite(self.multiplier.value):
                self._diverged("the Lagrange multiplier λ", self.multiplier.value)
            if config.debug_distributed:
                distributed.check_same("the cost window (n, μ̂, σ̂), k, U and λ", [
                    self.cost_window.n, self.cost_window.mean, self.cost_window.std, coefficient, bound,
                    self.multiplier.value])

        # 7. log -------------------------------------------------------------------------------
        self.global_step += 1
        total = timer.total()
        metrics.update({
            "step": self.global_step, "lambda": lagrange_multiplier_value, "lambda_next": self.multiplier.value,
            "cost/bound": bound, "cost/threshold": config.cost_threshold, "cost/coefficient_k": coefficient,
            "cost/actor_coefficient_k": actor_coefficient,
            "cost/window_mean": self.cost_window.mean, "cost/window_std": self.cost_window.std,
            "cost/window_n": self.cost_window.n, "tokens_per_s": metrics["tokens"] / max(total, 1e-9),
            **{f"time/{name}": seconds for name, seconds in timer.seconds.items()}, "time/total": total,
        })
        metrics.pop("cost/bound_device")
        self._log(metrics)
        return metrics

    def pessimistic_coefficient(self, n_candidate: int) -> float:
        """k of docs/method.md#candidate-selection for ``n_candidate`` costs, with this config's δ, n_s, C1 and C2."""
        config = self.config
        return pessimistic_coefficient(n_candidate, config.safety_set_size, config.delta, config.bound_c1,
                                       config.bound_c2)

    # ------------------------------------------------------------------------------- phases

    @torch.no_grad()
    def rollout(self, prompts: list[str], *, first_prompt: int = 0) -> Rollout:
        """Phase 1: sample ``samples_per_prompt`` responses per prompt (rows of one prompt adjacent).

        Sample ``s`` of the prompt at position ``first_prompt + i`` of this iteration draws its noise from the
        seed (config.seed, "rollout", iteration, first_prompt + i, s): the same response whatever the batch
        and whichever rank samples it."""
        config, tokenizer = self.config, self.tokenizer
        batch = tokenize_prompts(tokenizer, prompts, template=self.template, max_length=config.max_prompt_length)
        repeat = config.samples_per_prompt
        prompt_ids = batch.input_ids.repeat_interleave(repeat, dim=0).to(self.device)
        prompt_mask = batch.attention_mask.repeat_interleave(repeat, dim=0).to(self.device)
        eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
        seeds = row_seeds(config.seed, [("rollout", self.global_step, first_prompt + i, s)
                                        for i in range(len(prompts)) for s in range(repeat)])
        with self._autocast(), distributed.gathered_for_generation(self.policy):
            # Exactly the configured decoding: nothing inherited from the policy's own generation config.
            output = generate(self.policy, prompt_ids, prompt_mask, self.generation_config(),
                              row_seeds=seeds.to(self.device))
        width = prompt_ids.shape[1]
        response = output[:, width:]
        if eos is not None:
            # Valid: up to and including the first EOS (cumsum, so a pad id equal to EOS is fine).
            is_eos = (response == eos).long()
            valid = (is_eos.cumsum(dim=1) - is_eos) == 0
        else:
            valid = torch.ones_like(response, dtype=torch.bool)
        response = response.masked_fill(~valid, pad)
        input_ids = torch.cat([prompt_ids, response], dim=1)
        attention_mask = torch.cat([prompt_mask.long(), valid.long()], dim=1)
        # Action j produces token j + 1; response token i sits at column width + i, i.e. action width − 1 + i.
        action_mask = torch.zeros(input_ids.shape[0], input_ids.shape[1] - 1, dtype=torch.bool, device=self.device)
        action_mask[:, width - 1:] = valid
        texts = [p for p in prompts for _ in range(repeat)]
        return Rollout(texts, input_ids, attention_mask, action_mask, action_mask.cpu(), width)

    @torch.no_grad()
    def reference_logprobs(self, rollout: Rollout, chunks=None) -> torch.Tensor:
        """The reference model's log-probs of ``rollout`` on the action grid (B, T − 1), 0 off the actions.

        With LoRA: the policy with its adapters disabled (the base model)."""
        if chunks is None:
            chunks = self._chunks(rollout, list(range(rollout.rows)))
        if self.reference is not None:
            return self._grid_logprobs(self.reference, rollout, chunks)
        with self.policy.disable_adapter():
            return self._grid_logprobs(self.policy, rollout, chunks)

    def _grid_logprobs(self, model, rollout: Rollout, chunks, *, entropy: bool = False):
        outputs = [response_logprobs(model, rollout.input_ids[r], rollout.attention_mask[r], index,
                                     temperature=self.config.temperature, return_entropy=entropy,
                                     impl=self.config.impl) for r, index in chunks]
        if entropy:
            return torch.cat([o[0] for o in outputs]), torch.cat([o[1] for o in outputs])
        return torch.cat(outputs)

    def _update_rloo(self, rollout: Rollout, advantages, policy_mask) -> dict:
        """Phase 5, rloo: one REINFORCE step on −mean_i A_i·Σ_t log π(y_t) (+ entropy bonus)."""
        config = self.config
        optimizer = self.actor_optimizer
        optimizer.zero_grad(set_to_none=True)
        rows = rollout.rows
        # Global denominators: each rank's loss is its share of the loss of the whole batch.
        row_count = torch.tensor(float(rows * self.world), device=self.device)
        token_count = distributed.all_reduce_sum(rollout.action_mask.sum()).clamp(min=1).float()
        policy_loss_sum = torch.zeros((), device=self.device)
        entropy_sum = torch.zeros((), device=self.device)
        self._train_mode(True)
        try:
            for r, index in self._chunks(rollout, list(range(rows))):
                with self._autocast():
                    out = response_logprobs(self.policy, rollout.input_ids[r], rollout.attention_mask[r], index,
                                            temperature=config.temperature, return_entropy=config.entropy_coef > 0,
                                            impl=config.impl)
                logprobs, entropy = out if config.entropy_coef > 0 else (out, None)
                loss = reinforce_loss(logprobs, advantages[r], policy_mask[r], denominator=row_count)
                policy_loss_sum = policy_loss_sum + loss.detach()
                if entropy is not None:
                    bonus = masked_entropy(entropy, rollout.action_mask[r], denominator=token_count)
                    entropy_sum = entropy_sum + bonus.detach()
                    loss = loss - config.entropy_coef * bonus
                self._backward(loss)
            if config.ptx_coef > 0:  # + ptx_coef · LM loss, accumulated into the same gradients
                ptx_loss = self._ptx_backward(self.global_step)
        finally:
            self._train_mode(False)
        self._average_gradients(self.actor_parameters)
        grad_norm = _clip(self.actor_parameters, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stats = {"policy_loss": policy_loss_sum, "grad_norm/actor": grad_norm}
        if config.entropy_coef > 0:
            stats["entropy/updated"] = entropy_sum
        if config.ptx_coef > 0:
            stats["ptx_loss"] = ptx_loss
        return stats

    def _update_ppo(self, rollout: Rollout, old_logprobs, advantages, policy_mask, reward_values, cost_values,
                    reward_returns, cost_returns) -> dict:
        """Phase 5, ppo: epochs × minibatches of the clipped surrogate and the two clipped value losses."""
        config = self.config
        rows = rollout.rows
        minibatch = config.minibatch_size // self.world if config.minibatch_size else rows  # rows of this rank
        zero = lambda: torch.zeros((), device=self.device)  # noqa: E731
        sums = {"policy_loss": zero(), "value_loss/reward": zero(), "value_loss/cost": zero(),
                "grad_norm/actor": zero(), "grad_norm/critics": zero()}
        if config.ptx_coef > 0:
            sums["ptx_loss"] = zero()
        updates_per_iteration = config.ppo_epochs * (rows // minibatch)
        clipped, approx_kl, policy_tokens, entropy_sum = zero(), zero(), zero(), zero()
        updates = 0
        critic_parameters = [p for critic in self.critics.values() for p in critic.parameters()]
        reward_critic, cost_critic = self.critics["reward_critic"], self.critics["cost_critic"]
        self._train_mode(True)
        try:
            for epoch in range(config.ppo_epochs):
                # Seeded by (seed, iteration, epoch, rank): a resumed run draws the same minibatches.
                seed = int(row_seeds(config.seed, [("minibatches", self.global_step, epoch, self.rank)])[0])
                order = torch.randperm(rows, generator=torch.Generator().manual_seed(seed)).tolist()
                for start in range(0, rows, minibatch):
                    members = order[start:start + minibatch]
                    member_index = torch.tensor(members, device=self.device)
                    # Denominators of the whole minibatch (on all ranks), as device tensors (micro-batches sum
                    # to it).
                    n_policy, n_tokens = distributed.all_reduce_sum(torch.stack([
                        policy_mask.index_select(0, member_index).sum(),
                        rollout.action_mask.index_select(0, member_index).sum()]).float()).clamp(min=1).unbind()
                    for micro_rows, index in self._chunks(rollout, members):
                        pick = lambda x: x[micro_rows]  # noqa: E731, B023
                        input_ids, attention_mask = pick(rollout.input_ids), pick(rollout.attention_mask)
                        mask = pick(rollout.action_mask)
                        with self._autocast():
                            out = response_logprobs(self.policy, input_ids, attention_mask, index,
                                                    temperature=config.temperature,
                                                    return_entropy=config.entropy_coef > 0, impl=config.impl)
                            new_reward_values = reward_critic(input_ids, attention_mask)[:, :-1].float()
                            new_cost_values = cost_critic(input_ids, attention_mask)[:, :-1].float()
                        logprobs, entropy = out if config.entropy_coef > 0 else (out, None)
                        policy_loss, n_clipped, kl_sum = ppo_policy_loss(
                            logprobs, pick(old_logprobs), pick(advantages), pick(policy_mask), config.clip_range,
                            denominator=n_policy)
                        reward_value_loss = clipped_value_loss(new_reward_values, pick(reward_values),
                                                               pick(reward_returns), mask, config.value_clip_range,
                                                               denominator=n_tokens)
                        cost_value_loss = clipped_value_loss(new_cost_values, pick(cost_values), pick(cost_returns),
                                                             mask, config.value_clip_range, denominator=n_tokens)
                        loss = policy_loss + reward_value_loss + cost_value_loss  # disjoint parameters
                        if entropy is not None:
                            bonus = masked_entropy(entropy, mask, denominator=n_tokens)
                            entropy_sum = entropy_sum + bonus.detach()
                            loss = loss - config.entropy_coef * bonus
                        self._backward(loss)
                        sums["policy_loss"] += policy_loss.detach()
                        sums["value_loss/reward"] += reward_value_loss.detach()
                        sums["value_loss/cost"] += cost_value_loss.detach()
                        clipped, approx_kl = clipped + n_clipped, approx_kl + kl_sum
                        policy_tokens = policy_tokens + masked_sum(torch.ones_like(logprobs), pick(policy_mask))
                    if config.ptx_coef > 0:  # + ptx_coef · LM loss of this update step's PTX batch
                        sums["ptx_loss"] += self._ptx_backward(self.global_step * updates_per_iteration + updates)
                    self._average_gradients(self.actor_parameters)
                    self._average_gradients(critic_parameters)
                    sums["grad_norm/actor"] += _clip(self.actor_parameters, config.max_grad_norm)
                    sums["grad_norm/critics"] += _clip(critic_parameters, config.max_grad_norm)
                    self.actor_optimizer.step()
                    self.critic_optimizer.step()
                    self.actor_optimizer.zero_grad(set_to_none=True)
                    self.critic_optimizer.zero_grad(set_to_none=True)
                    updates += 1
        finally:
            self._train_mode(False)
        stats = {name: total / updates for name, total in sums.items()}
        clipped, approx_kl, policy_tokens = distributed.all_reduce_sum(torch.stack([clipped, approx_kl,
                                                                                   policy_tokens])).unbind()
        stats["clip_fraction"] = clipped / policy_tokens.clamp(min=1)
        stats["approx_kl"] = approx_kl / policy_tokens.clamp(min=1)
        if config.entropy_coef > 0:
            stats["entropy/updated"] = entropy_sum / updates
        return stats

    # ------------------------------------------------------------------------ checkpoints

    def _modules(self) -> dict:
        """Modules saved whole (with LoRA the policy is saved by its adapters only, see ``_adapters``)."""
        return self.critics if self.lora else {"policy": self.policy, **self.critics}

    def _adapters(self) -> dict:
        return {"policy": self.policy} if self.lora else {}

    def _optimizers(self) -> dict:
        optimizers = {"actor_optimizer": self.actor_optimizer}
        if self.critic_optimizer is not None:
            optimizers["critic_optimizer"] = self.critic_optimizer
        return optimizers

    def save_checkpoint(self) -> Path:
        """Save an atomic checkpoint of the current state under ``output_dir/checkpoints`` (every rank calls it:
        sharded models write their shards in parallel, replicated ones are written by rank 0)."""
        if self.output_dir is None:
            raise ValueError("SafeRLTrainer.save_checkpoint: config.output_dir is None")
        state = {"config": self.config.to_dict(), "multiplier": self.multiplier.state_dict(),
                 "cost_window": self.cost_window.state_dict(), "ptx_fingerprint": self.ptx_fingerprint,
                 "world_size": self.world}
        # The metrics of the iterations a checkpoint covers are on disk before it is.
        if self.is_main:
            rl_checkpoint.fsync_file(self.output_dir / "metrics.jsonl")
        if self.sharded:
            self.last_checkpoint = rl_checkpoint.save_sharded_checkpoint(
                self.output_dir, self.global_step, modules=self._modules(), optimizers=self._optimizers(),
                state=state, keep=self.config.keep_checkpoints)
            return self.last_checkpoint
        self.last_checkpoint = distributed.on_main(
            rl_checkpoint.save_checkpoint, self.output_dir, self.global_step, modules=self._modules(),
            optimizers=self._optimizers(), state=state, keep=self.config.keep_checkpoints, adapters=self._adapters())
        return self.last_checkpoint

    def _resume(self) -> None:
        """Resume from the newest checkpoint that verifies against its manifest (newer ones that do not are
        renamed aside with a warning; none verifying is an error, see ``rl_checkpoint.select_checkpoint``),
        and trim metrics.jsonl to the iterations up to it."""
        point = None
        if self.is_main:  # one rank verifies, sets corrupt checkpoints aside and tells the others
            rl_checkpoint.remove_stale_temporaries(self.output_dir)
            try:
                point = rl_checkpoint.select_checkpoint(self.output_dir)
            except rl_checkpoint.CheckpointError as error:
                point = error
        point = distributed.broadcast_object(point)
        if isinstance(point, rl_checkpoint.CheckpointError):
            raise rl_checkpoint.CheckpointError(f"SafeRLTrainer: {point}") from None
        path = point.path
        for bad, aside, reason in point.rejected if self.is_main else ():
            warnings.warn(f"SafeRLTrainer: checkpoint {bad} failed verification: {reason}. Renamed it to "
                          f"{aside.name} (not deleted); resuming from {path.name} instead", stacklevel=3)
        metrics_path = self.output_dir / "metrics.jsonl"
        if path is None:
            aside = (f" (only directories set aside as corrupt: {', '.join(point.set_aside_before)})"
                     if point.set_aside_before else "")
            if self.is_main:
                warnings.warn(f"SafeRLTrainer: resume=True but {self.output_dir} has no checkpoint{aside}; "
                              "starting from step 0")
                metrics_path.write_text("", encoding="utf-8")
            return
        if point.legacy and self.is_main:
            warnings.warn(f"SafeRLTrainer: checkpoint {path} has no manifest.json (written by an older hcrlhf): "
                          "its files cannot be verified, only checked for truncation; resuming from it",
                          stacklevel=3)
        saved_state = json.loads((path / rl_checkpoint.STATE_NAME).read_text(encoding="utf-8"))
        saved = saved_state["config"]
        current = self.config.to_dict()
        changed = sorted(k for k in current if k not in RESUMABLE_CHANGES and saved.get(k) != current[k])
        if changed:
            details = ", ".join(f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in changed)
            raise ValueError(f"SafeRLTrainer: cannot resume from {path}: the config differs in {details}")
        if saved_state.get("ptx_fingerprint") != self.ptx_fingerprint:
            raise ValueError(f"SafeRLTrainer: cannot resume from {path}: the PTX text in ptx_path="
                             f"{self.config.ptx_path!r} differs from the one the checkpoint was trained on "
                             f"(sha256 {saved_state.get('ptx_fingerprint')} -> {self.ptx_fingerprint})")
        saved_sharded = bool(saved_state.get("sharded", False))
        if saved_sharded != self.sharded:
            raise ValueError(f"SafeRLTrainer: cannot resume from {path}: it holds "
                             f"{'sharded' if saved_sharded else 'whole'} model states, and this run "
                             f"{'shards' if self.sharded else 'does not shard'} its models (sharding="
                             f"{self.config.sharding!r} on {self.world} process(es)); resume with the setting "
                             "that wrote it (docs/distributed.md#checkpoints)")
        saved_world = int(saved_state.get("world_size", 1))
        if saved_world != self.world and self.is_main:
            warnings.warn(f"SafeRLTrainer: resuming a checkpoint written by {saved_world} process(es) on {self.world}:"
                          " the states are re-sharded and the prompt stream continues, but PPO minibatches are drawn"
                          " per rank, so the run is not step-for-step the one it would have been "
                          "(docs/distributed.md#checkpoints)", stacklevel=3)
        if self.sharded:
            state = rl_checkpoint.load_sharded_checkpoint(path, modules=self._modules(),
                                                          optimizers=self._optimizers())
        else:
            state = rl_checkpoint.load_checkpoint(path, modules=self._modules(), optimizers=self._optimizers(),
                                                  adapters=self._adapters())
        self.multiplier.load_state_dict(state["multiplier"])
        self.cost_window.load_state_dict(state["cost_window"])
        self.global_step = int(state["step"])
        self.last_checkpoint = path
        # Drop metrics of iterations after the checkpoint (a killed run logged them; they are re-run) and a
        # torn last line (the run died while appending it).
        if self.is_main:
            for note in rl_checkpoint.trim_metrics_log(metrics_path, self.global_step):
                warnings.warn(f"SafeRLTrainer: {metrics_path}: {note}", stacklevel=3)
        distributed.barrier()  # no rank appends to metrics.jsonl before rank 0 has trimmed it

    def generation_config(self):
        """The rollout decoding as one explicit ``transformers.GenerationConfig``
        (:func:`hcrlhf.models.generation.generation_config`: every other setting neutral, pad / EOS from the
        tokenizer)."""
        return generation_config(self.config, self.tokenizer)

    def save_pretrained(self, path, *, merge_lora: bool = True, generation_config=None) -> None:
        """The trained policy (and tokenizer) as a Hugging Face directory, safetensors.

        With LoRA: by default the adapters merged into a copy of the base model (a plain causal LM
        directory); ``merge_lora=False`` saves the peft adapter directory only. The tokenizer is saved with
        :func:`hcrlhf.models.save_tokenizer` (``AutoTokenizer`` loads it back as trained), and
        ``generation_config.json`` is ``generation_config`` (default: the rollout decoding,
        :meth:`generation_config`), so that a plain ``generate()`` on the directory samples that way."""
        if self.sharded:  # every rank takes part in gathering the weights; rank 0 writes one ordinary model
            state_dict = distributed.full_state_dict(self.policy)
            # A tied LM head is saved once, as save_pretrained does for the model itself.
            for tied in getattr(self.policy, "all_tied_weights_keys", None) or {}:
                state_dict.pop(tied, None)
            if self.is_main:
                self.policy.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
        elif self.is_main:
            if self.lora and merge_lora:
                copy.deepcopy(self.policy).merge_and_unload().save_pretrained(path, safe_serialization=True)
            else:
                self.policy.save_pretrained(path, safe_serialization=True)
        if self.is_main:
            save_tokenizer(self.tokenizer, path)
            (generation_config if generation_config is not None else self.generation_config()).save_pretrained(path)
        distributed.barrier()

    # ------------------------------------------------------------------------------ helpers

    def _next_prompts(self) -> list[str]:
        """The prompts of iteration ``global_step``: a stream of seeded per-epoch permutations, so that
        the order depends only on (seed, step) and a resumed run draws the same prompts."""
        n, per_step = len(self.train_prompts), self.config.prompts_per_step
        picked = []
        for position in range(self.global_step * per_step, (self.global_step + 1) * per_step):
            epoch, offset = divmod(position, n)
            if epoch not in self._permutations:
                order = list(range(n))
                random.Random(f"{self.config.seed}-prompts-{epoch}").shuffle(order)
                self._permutations = {epoch: order}
            picked.append(self.train_prompts[self._permutations[epoch][offset]])
        return picked

    def _chunks(self, rollout: Rollout, members: list[int]):
        """Micro-batches of ``members`` within the token budget: ``(rows, action_index)`` pairs, where
        ``rows`` is a slice (contiguous rows) or a device index tensor, and ``action_index`` the flat
        response positions of those rows on the (rows, T − 1) grid, built from the host copy of the mask."""
        budget = self.config.micro_batch_tokens
        per_chunk = len(members) if budget is None else max(1, budget // rollout.width)
        out = []
        contiguous = members == list(range(members[0], members[0] + len(members))) if members else True
        # Sharded models gather their weights in every forward: every rank runs as many micro-batches.
        for part_slice in micro_batches(len(members), -(-len(members) // per_chunk), agree=self.sharded):
            part = members[part_slice]
            host_rows = torch.tensor(part)
            index = rollout.action_mask_host.index_select(0, host_rows).reshape(-1).nonzero().squeeze(1)
            index = index.to(self.device, non_blocking=True)
            rows = slice(part[0], part[-1] + 1) if contiguous else host_rows.to(self.device, non_blocking=True)
            out.append((rows, index))
        return out

    def ptx_batch(self, update_number: int) -> list[dict]:
        """The PTX rows of policy update step ``update_number`` (counted over the whole run): a stream of
        seeded per-epoch permutations of the PTX rows, a function of (seed, update_number) only. Under several
        processes, this rank's block of it."""
        n = len(self.ptx_rows)
        size = self.config.ptx_batch_size or self.config.minibatch_size or self.config.rollout_rows
        picked = []
        for position in range(update_number * size, (update_number + 1) * size):
            epoch, offset = divmod(position, n)
            if epoch not in self._ptx_permutations:
                order = list(range(n))
                random.Random(f"{self.config.seed}-ptx-{epoch}").shuffle(order)
                self._ptx_permutations = {epoch: order}
            picked.append(self.ptx_rows[self._ptx_permutations[epoch][offset]])
        first, last = distributed.shard_bounds(len(picked))  # this rank's share of the batch
        return picked[first:last]

    def tokenize_ptx(self, rows: list[dict]):
        """``(input_ids, attention_mask, target_mask)`` on the CPU, right padded; ``target_mask`` (B, T − 1)
        marks the actions whose token is an LM target (pairs: the response and its EOS; text: every token
        after the first, and an EOS)."""
        config = self.config
        return tokenize_lm_rows(self.tokenizer, rows, self.ptx_kind, template=self.template,
                                max_length=config.max_prompt_length + config.max_new_tokens)

    def _ptx_backward(self, update_number: int) -> torch.Tensor:
        """Backpropagate ``ptx_coef ·`` the LM loss (mean NLL per target token, temperature 1) of update step
        ``update_number``'s PTX batch, in micro-batches within the token budget; returns the LM loss
        (detached). The log-probs come from ``ops.linear_logprobs`` on the target positions only."""
        config = self.config
        input_ids, attention_mask, targets = self.tokenize_ptx(self.ptx_batch(update_number))
        return lm_loss_backward(self.policy, input_ids, attention_mask, targets, coef=config.ptx_coef,
                                device=self.device, micro_batch_tokens=config.micro_batch_tokens,
                                impl=config.impl, autocast=self._autocast)

    def _backward(self, loss: torch.Tensor) -> None:
        """Backpropagate this rank's share of the global loss. The ranks average their gradients, so the share is
        scaled by the world size to make the average the gradient of the whole batch's loss."""
        (loss * self.world if self.world > 1 else loss).backward()

    def _average_gradients(self, parameters) -> None:
        """Replicated models average their gradients here (FSDP2 does it for sharded ones in the backward)."""
        if self.world > 1 and not self.sharded:
            distributed.average_gradients(parameters)

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def _train_mode(self, on: bool) -> None:
        # Gradient checkpointing in HF models only runs in train mode; otherwise stay in eval (no dropout).
        if self.config.gradient_checkpointing:
            self.policy.train(on)

    def _check_finite(self, metrics: dict, names) -> None:
        for name in names:
            if name in metrics and not math.isfinite(metrics[name]):
                self._diverged(name, metrics[name])

    def _diverged(self, what: str, value) -> None:
        where = (f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint is not None
                 else "no checkpoint was saved yet")
        raise TrainingDivergedError(
            f"SafeRLTrainer: {what} is {value} at iteration {self.global_step + 1}; training stopped and this "
            f"iteration was not checkpointed ({where}). Lower the learning rates, check the reward/cost models "
            "for NaN scores, or set score_clip / lambda_max.")

    def _log(self, metrics: dict) -> None:
        self.history.append(metrics)
        if self.output_dir is not None and self.is_main:
            with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(metrics, sort_keys=True) + "\n")
        if self._writer is not None:
            for name, value in metrics.items():
                if name != "step" and isinstance(value, (int, float)):
                    self._writer.add_scalar(name, value, metrics["step"])


# ---------------------------------------------------------------------------------- helpers


class _PhaseTimer:
    """Wall-clock seconds per phase (device-synchronised at the boundaries when asked)."""

    def __init__(self, device: torch.device, synchronize: bool):
        self.device, self.synchronize = device, synchronize and device.type == "cuda"
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        if self.synchronize:
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.synchronize:
                torch.cuda.synchronize(self.device)
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start

    def total(self) -> float:
        return sum(self.seconds.values())


def _add_lora(policy, config: SafeRLConfig):
    """Wrap ``policy`` in LoRA adapters (peft); the LM head must stay a plain linear layer."""
    peft = rl_checkpoint.import_peft()
    target = config.lora_target_modules
    lora_config = peft.LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0, bias="none",
                                  target_modules=list(target) if isinstance(target, list) else target,
                                  task_type="CAUSAL_LM")
    try:
        wrapped = peft.get_peft_model(policy, lora_config)
    except ValueError as error:
        raise ValueError(f"SafeRLTrainer: peft could not add LoRA adapters (lora_target_modules={target!r}): "
                         f"{error}") from error
    head = wrapped.get_base_model().get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"SafeRLTrainer: lora_target_modules={target!r} put an adapter on the LM head; "
                         "ops.linear_logprobs needs a plain linear head, so leave the head out")
    return wrapped


def _check_world_size(config: SafeRLConfig, world: int) -> None:
    """The batch splits evenly over ``world`` ranks: whole prompts (and their RLOO groups) per rank, and PPO
    minibatches / PTX batches of equal size on every rank."""
    if world == 1:
        return
    if config.prompts_per_step % world:
        raise ValueError(f"SafeRLConfig: prompts_per_step={config.prompts_per_step} must be a multiple of the "
                         f"number of processes ({world}): each rank rolls out as many prompts")
    for name in ("minibatch_size", "ptx_batch_size"):
        value = getattr(config, name)
        if value is not None and value % world:
            raise ValueError(f"SafeRLConfig: {name}={value} must be a multiple of the number of processes ({world}):"
                             " each rank takes an equal share")


def _masked_moments_across_ranks(x: torch.Tensor, valid: torch.Tensor):
    """``(count, mean, Σ(x − mean)² over valid entries)`` over the valid entries of every rank (two all-reduces;
    the same two-pass formula as one process on the whole batch)."""
    count, total = distributed.all_reduce_sum(torch.stack([valid.sum().to(x.dtype), torch.where(valid, x, 0).sum()]))
    mean = total / count.clamp(min=1)
    centred = torch.where(valid, x - mean, 0.0)
    return count, mean, distributed.all_reduce_sum((centred * centred).sum())


def _whiten_across_ranks(advantages: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``ops.safe_advantages(whiten=True)``'s whitening (mean and unbiased variance over all valid tokens, the
    reference's ``masked_whiten``), with the statistics of every rank's tokens."""
    from hcrlhf.reference.gae import WHITEN_EPS

    count, mean, squares = _masked_moments_across_ranks(advantages, valid)
    variance = torch.where(count > 1, squares / (count - 1).clamp(min=1), 0.0)
    return torch.where(valid, (advantages - mean) * torch.rsqrt(variance + WHITEN_EPS), 0.0)


def _explained_variance_across_ranks(values, returns, mask) -> torch.Tensor:
    """:func:`explained_variance` over the masked tokens of every rank."""
    if distributed.world_size() == 1:
        return explained_variance(values, returns, mask)
    count, _, residual = _masked_moments_across_ranks(returns - values, mask)
    _, _, spread = _masked_moments_across_ranks(returns, mask)
    return 1.0 - (residual / count) / (spread / count)


def _clip(parameters, max_norm: float | None) -> torch.Tensor:
    """Clip the gradient norm (or only measure it when ``max_norm`` is None); a device tensor, no sync."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), math.inf if max_norm is None else max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # sharded parameters: a DTensor


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the legacy global generator, as third-party code uses
    torch.manual_seed(seed)


def _check_prompts(prompts) -> list[str]:
    if isinstance(prompts, (str, bytes)):
        raise TypeError("SafeRLTrainer: train_prompts must be a collection of prompt strings, not one string")
    texts = list(prompts)
    if not texts:
        raise ValueError("SafeRLTrainer: train_prompts must not be empty")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"SafeRLTrainer: train_prompts[{index}] must be a str, got {type(text).__name__}")
    return texts


def _refuse_safety_overlap(train_prompts: list[str], safety_prompts) -> None:
    """Nothing in training may read D_s (docs/method.md#data-split) — refuse overlapping prompt sets up front."""
    if safety_prompts is None:
        warnings.warn("SafeRLTrainer: safety_prompts=None, so the training prompts are not checked against the "
                      "safety set; pass the PromptSplit (or the safety prompts / fingerprint) to enforce the split "
                      "(docs/method.md#data-split)")
        return
    if hasattr(safety_prompts, "safety") and hasattr(safety_prompts, "safety_fingerprint"):  # a PromptSplit
        assert_disjoint(train_prompts, list(safety_prompts.safety))
    elif isinstance(safety_prompts, str):
        assert_disjoint(train_prompts, safety_prompts)
    else:
        assert_disjoint(train_prompts, list(safety_prompts))


def _tensorboard_writer(setting, output_dir: Path):
    if setting is False:
        return None
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        if setting is True:
            raise ImportError("SafeRLConfig: tensorboard=True but TensorBoard is not installed "
                              "(pip install tensorboard), or set tensorboard='auto' / False") from error
        return None
    return SummaryWriter(log_dir=str(output_dir / "tensorboard"))
