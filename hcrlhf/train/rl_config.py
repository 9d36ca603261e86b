"""Settings of the Lagrangian RL trainer (:class:`hcrlhf.train.SafeRLTrainer`).

:class:`SafeRLConfig` is a :class:`hcrlhf.config.Section`: a dataclass with one documented field per setting,
checked on creation (an invalid config never exists; every problem is reported at once, naming its key);
``SafeRLConfig.from_dict`` / ``from_yaml`` load it, refusing unknown keys and wrong types. Defaults follow the
official HC-RLHF code where it fixes a value (docs/method.md#candidate-selection: β = 0.1, reward clip ±50, λ_init 1,
η_λ 0.01, λ_max 1e6, window 256, actor lr 5e-6, C1 = 4, C2 = 2, δ = 0.1, n_s = 100, τ = 0, the actor's k
from the rows of one update) and Safe RLHF otherwise (clip ratio 0.2, value clip 5, GAE λ 0.95, γ = 1),
with one deliberate exception: λ moves by the "pid" rule by default, because the official rule blows
up and dies (``lambda_update: official`` restores it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from hcrlhf.config import Problems, Section

__all__ = ["SafeRLConfig", "ESTIMATORS", "AMA_MODES", "AMA_TOKEN_SCORES"]

ESTIMATORS = ("ppo", "rloo")
LAMBDA_UPDATES = ("pid", "official")
ACTOR_COEFFICIENTS = ("rollout", "window")
AMA_MODES = ("off", "sign", "hysteresis")
AMA_TOKEN_SCORES = ("score_models", "critics")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPLS = ("auto", "triton", "cpp", "torch")


@dataclass
class SafeRLConfig(Section):
    """Settings of :class:`hcrlhf.train.SafeRLTrainer` (docs/method.md#candidate-selection and
    docs/method.md#equilibrate-rlhf).

    Attributes:
        estimator: "ppo" (Safe RLHF: reward and cost critics, per-token GAE via
            ``ops.safe_advantages``, clipped surrogate) or "rloo" (the official HC-RLHF code: sequence
            level leave-one-out advantages via ``ops.rloo_advantages``, one REINFORCE step per
            rollout, no critics).
        total_steps: training iterations (rollout → update → multiplier) to run in total.
        prompts_per_step: prompts drawn per iteration (the rollout has prompts_per_step ·
            samples_per_prompt rows).
        samples_per_prompt: responses sampled per prompt; rows of one prompt are adjacent. rloo needs
            >= 2 (the official code uses 2).
        max_prompt_length: prompts longer than this many tokens keep their last tokens.
        max_new_tokens: cap on generated tokens per response.
        temperature: sampling temperature; the log-probs of the policy and the reference use it too,
            so that the importance ratios and the KL are those of the sampling distribution; >= 1e-4.
        top_p: nucleus sampling of the rollouts; must be 1.0 (off). The log-probs, importance ratios and KL
            are those of the full softmax(logits / temperature), so rollouts drawn from a truncated
            distribution would be off-policy by an amount nothing corrects; renormalising over the kept
            tokens would need the whole vocabulary's logits at every response position (a sort per
            position), which the fused log-prob op avoids. Deployment may still truncate: the pipeline's
            ``safety.top_p`` sets the safety test's decoding.
        top_k: top-k sampling of the rollouts; must be 0 (off), for the same reason (``safety.top_k``
            sets the deployment decoding).
        kl_coef: β, the weight of the KL penalty to the reference model.
        kl_estimator: "k1" | "k2" | "k3" (docs/ops.md#kl-estimators).
        score_clip: clamp of the reward- and cost-model scores to [−score_clip, +score_clip] (ppo: of the
            per-token rewards/costs; rloo: of reward − β·KL), the ``score_clip`` of ``hcrlhf.ops``; None: no
            clamp.
        cost_threshold: τ, the constraint threshold on the expected cost.
        delta: δ of the pessimistic coefficient k (and of the later safety test).
        safety_set_size: n_s, the size of the future safety set, in k.
        bound_c1, bound_c2: C1, C2 of k = C1·t/√n_c + C2·t/√n_s (official: 4, 2; Seldonian: 0, 2;
            both 0: optimise the plain mean cost).
        cost_window_size: how many recent per-response costs μ̂, σ̂ are computed from.
        actor_coefficient: the n_c of the actor's k (the k inside the augmented costs the policy
            follows): "rollout" (the official code: the rows of one update, prompts_per_step ·
            samples_per_prompt, e.g. 16 · 2 = 32 → k ≈ 1.18) or "window" (the costs in the window, e.g.
            256 → k ≈ 0.58, half the σ-penalty). The bound U that moves λ always uses the window's n_c.
        lambda_update: the rule that moves λ (docs/method.md#candidate-selection): "pid" (default: a PID
            controller on log λ with the error (U − τ)/σ̂ clipped to lambda_error_clip and an anti-windup
            integral, λ ∈ [lambda_min, lambda_max]; bounded steps, cannot blow up or die; see
            :class:`hcrlhf.safety.PIDLagrangeMultiplier`) or "official" (the official code's
            log λ ← min(log λ + lambda_lr·λ·(U − τ), log lambda_max): its step grows with λ and λ = 0 is
            absorbing; kept for fidelity and comparison).
        lambda_init: initial Lagrange multiplier λ > 0.
        lambda_lr: η_λ of the "official" rule (unused by "pid").
        lambda_ki, lambda_kp, lambda_kd: integral, proportional and derivative gains of the "pid" rule
            (in log λ per unit of the normalised error; unused by "official").
        lambda_min: the floor of λ under the "pid" rule (0 < lambda_min <= lambda_init).
        lambda_error_clip: [below, above]: the "pid" rule's error (U − τ)/σ̂ is clipped to [−below, +above].
            The default [0.25, 1] makes λ rise up to four times faster than it falls: a run that ends with
            U above τ costs the whole run (No Solution Found), one that ends a little too safe costs some
            helpfulness, and a policy that has just become safe tends to drift back once λ has fallen.
        lambda_max: cap on λ (None: no cap).
        lambda_update_delay: iterations before λ starts to move.
        actor_lr: AdamW learning rate of the policy.
        critic_lr: AdamW learning rate of the two critics (ppo).
        weight_decay: AdamW weight decay (both optimisers).
        max_grad_norm: gradient-norm clip, applied to the policy and to the critics separately
            (None: off).
        ppo_epochs: passes over each rollout (ppo).
        minibatch_size: rows per PPO minibatch (None: the whole rollout); must divide the rollout's
            rows.
        clip_range: ε of the clipped surrogate (ppo).
        value_clip_range: clip of the value updates around the rollout values (ppo).
        gamma: GAE discount (ppo).
        gae_lambda: GAE λ (ppo).
        kl_in_cost: Safe RLHF's KL placement (docs/ops.md#safe_advantages): the combined advantage carries exactly
            −β·KL for every λ.
        divide_by_one_plus_lambda: divide the combined advantage A_r − λ·A_c by 1 + λ (ppo; Safe RLHF's
            scaling, which keeps its size comparable as λ grows). Not whitening: see whiten_advantages.
        whiten_advantages: whiten the combined per-token advantages (ppo).
        entropy_coef: weight of the entropy bonus (0: off); the entropy is always logged.
        ptx_coef: weight of the pretraining-loss mix (Safe RLHF's PTX; the official HC-RLHF code's
            optional mix uses 8; 0: off). Each optimiser step of the policy (rloo: one per iteration; ppo:
            ppo_epochs × minibatches per iteration) draws ``ptx_batch_size`` rows of ``ptx_path`` and
            adds ``ptx_coef ·`` their language-modelling loss (mean negative log-likelihood per target
            token, temperature 1) to the policy loss before that single optimiser step; Safe RLHF instead
            takes a separate optimiser step on it. Logged as ``ptx_loss``.
        ptx_path: the PTX text (required when ptx_coef > 0, refused otherwise): a JSON Lines file
            (or a ``.json`` list) whose rows are all ``{"prompt", "response"}`` (SFT data, e.g. the
            built-in task's ``sft.jsonl``: the prompt is formatted with the trainer's template and is
            context only; the targets are the response tokens and an EOS) or all ``{"text"}`` (plain
            text: every token after the first, and an EOS, is a target). Rows are cut to
            max_prompt_length + max_new_tokens tokens. Rows are drawn without replacement in seeded
            per-epoch permutations, as a function of (seed, update step) only, so a resumed run draws
            the same batches; the checkpoint records the file's hash and resuming with a different
            file is refused.
        ptx_batch_size: PTX rows per policy update step (None: as many as the update's rollout rows,
            i.e. minibatch_size or the whole rollout, as Safe RLHF pairs them).
        lora_r: rank of LoRA adapters on the policy (0: off, full fine-tuning). With LoRA (needs peft:
            ``pip install 'hcrlhf[lora]'``) the policy passed to the trainer is wrapped in place with
            ``peft.get_peft_model``, only the adapter weights train, and the KL reference is the same
            model with its adapters disabled (no frozen copy). Checkpoints then hold the adapter weights
            only (a peft adapter directory, safetensors). LoRA has no dropout setting here: the trainer
            runs the policy in eval mode, so that sampling, old log-probs and the update see one function.
        lora_alpha: LoRA α (the adapter output is scaled by α / r).
        lora_target_modules: names (suffixes) of the linear modules that get adapters, e.g.
            ``["q_proj", "v_proj"]``, or "all-linear"; None: peft's default for the architecture. Must
            not include the LM head (``ops.linear_logprobs`` needs a plain linear head).
        ama: EXPERIMENTAL. Equilibrate RLHF's adaptive message-wise alignment mask (docs/method.md#equilibrate-rlhf):
            "off", "sign" or "hysteresis". The authors published no PPO/RLOO + AMA results (only a
            DPO-based variant); treat any effect as unvalidated.
        ama_token_scores: where the token scores s_t of AMA come from: "score_models" (the reward and
            cost models' per-prefix scores, (r_t − λ·c_t)/(1 + λ), from the scoring pass; both
            estimators) or "critics" (the rollout values (V_r − λ·V_c)/(1 + λ) of the state after
            each token; ppo only).
        ama_upper, ama_lower: τ+ and τ− of the hysteresis mode (τ− < τ+).
        ama_min_kept: rows with fewer kept tokens than this fall back to their full mask.
        micro_batch_tokens: token budget (rows × padded width) of one forward pass; larger batches
            are split and gradients accumulated (None: no split).
        bf16: "auto" (bf16 autocast on CUDA only), True (CUDA required) or False.
        gradient_checkpointing: recompute activations of the policy in backward (HF
            ``gradient_checkpointing_enable``), for memory on large models.
        impl: kernel implementation for the ``hcrlhf.ops`` calls ("auto" | "triton" | "cpp" | "torch").
        seed: the root of every draw: the prompt order, each response's sampling noise (seed, iteration,
            prompt, sample: the same responses on any number of processes), the PPO minibatch order (seed,
            iteration, epoch, rank); it also seeds torch, Python's ``random`` and numpy at construction (e.g. new
            value heads).
        output_dir: where metrics.jsonl and checkpoints go (None: nothing written).
        checkpoint_every: save a checkpoint every this many iterations (None: only at the end when
            output_dir is set).
        keep_checkpoints: how many recent good checkpoints to keep (None: all); the one a run resumed from
            is kept until this many newer ones exist.
        resume: continue from the newest checkpoint in output_dir that verifies against its manifest
            (sizes and sha256 of every file; a newer one that fails is renamed ``*.corrupt`` with a warning),
            exactly: weights, optimisers, multiplier, cost window, RNG states, step; a torn last line of
            metrics.jsonl is dropped.
        tensorboard: "auto" (log to TensorBoard when it is installed and output_dir is set), True
            (required) or False.
        progress: show a tqdm progress bar.
        sync_phase_timing: synchronise the device at phase boundaries so that the logged time split
            is exact on a GPU (costs a little speed; on a CPU it changes nothing).
        device: device to train on (None: the policy's). Under ``torchrun`` with CUDA, each rank's own GPU.
        sharding: under ``torchrun`` with several processes (docs/distributed.md), how the trained models (policy,
            critics) are spread: "fsdp" (FSDP2: weights, gradients and optimiser states sharded over ranks;
            bf16 parameters with fp32 gradient reduction when bf16 is on; the large-model path) or "replicate"
            (a full copy per rank and one gradient all-reduce per update; fine for small models and needed for
            LoRA). Ignored in one process.
        shard_frozen_models: with sharding="fsdp", also shard the reference, reward and cost models (less memory,
            one all-gather per forward) instead of a full copy per rank.
        debug_distributed: after every iteration, check that the cost window, k, U and λ are identical on every
            rank (one small collective); raise if not.
    """

    estimator: str = "ppo"
    total_steps: int = 100
    prompts_per_step: int = 8
    samples_per_prompt: int = 2
    max_prompt_length: int = 256
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    kl_coef: float = 0.1
    kl_estimator: str = "k1"
    score_clip: float | None = 50.0
    cost_threshold: float = 0.0
    delta: float = 0.1
    safety_set_size: int = 100
    bound_c1: float = 4.0
    bound_c2: float = 2.0
    cost_window_size: int = 256
    actor_coefficient: str = "rollout"
    lambda_update: str = "pid"
    lambda_init: float = 1.0
    lambda_lr: float = 0.01
    lambda_ki: float = 0.05
    lambda_kp: float = 0.5
    lambda_kd: float = 0.0
    lambda_min: float = 0.01
    lambda_error_clip: list[float] = dataclasses.field(default_factory=lambda: [0.25, 1.0])
    lambda_max: float | None = 1e6
    lambda_update_delay: int = 0
    actor_lr: float = 5e-6
    critic_lr: float = 5e-6
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    ppo_epochs: int = 1
    minibatch_size: int | None = None
    clip_range: float = 0.2
    value_clip_range: float = 5.0
    gamma: float = 1.0
    gae_lambda: float = 0.95
    kl_in_cost: bool = True
    divide_by_one_plus_lambda: bool = True
    whiten_advantages: bool = False
    entropy_coef: float = 0.0
    ptx_coef: float = 0.0
    ptx_path: str | None = None
    ptx_batch_size: int | None = None
    lora_r: int = 0
    lora_alpha: float = 16.0
    lora_target_modules: list[str] | str | None = None
    ama: str = "off"
    ama_token_scores: str = "score_models"
    ama_upper: float = 0.3
    ama_lower: float = -0.3
    ama_min_kept: int = 1
    micro_batch_tokens: int | None = None
    bf16: str | bool = "auto"
    gradient_checkpointing: bool = False
    impl: str = "auto"
    seed: int = 42
    output_dir: str | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int | None = 2
    resume: bool = False
    tensorboard: str | bool = "auto"
    progress: bool = True
    sync_phase_timing: bool = False
    device: str | None = None
    sharding: str = "fsdp"
    shard_frozen_models: bool = False
    debug_distributed: bool = False

    @property
    def rollout_rows(self) -> int:
        """Rows (sequences) of one rollout: prompts_per_step · samples_per_prompt."""
        return self.prompts_per_step * self.samples_per_prompt

    def check(self, problems: Problems) -> None:
        """Every bad value and combination, each naming its key (run on creation)."""
        problems.choice("estimator", self.estimator, ESTIMATORS)
        problems.choice("lambda_update", self.lambda_update, LAMBDA_UPDATES)
        problems.choice("actor_coefficient", self.actor_coefficient, ACTOR_COEFFICIENTS)
        problems.choice("kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        problems.choice("ama", self.ama, AMA_MODES)
        problems.choice("ama_token_scores", self.ama_token_scores, AMA_TOKEN_SCORES)
        problems.choice("impl", self.impl, IMPLS)
        problems.choice("bf16", self.bf16, ("auto", True, False))
        problems.choice("sharding", self.sharding, ("fsdp", "replicate"))
        problems.choice("tensorboard", self.tensorboard, ("auto", True, False))

        for name in ("total_steps", "prompts_per_step", "samples_per_prompt", "max_prompt_length",
                     "max_new_tokens", "ppo_epochs", "ama_min_kept", "minibatch_size", "micro_batch_tokens",
                     "checkpoint_every", "keep_checkpoints", "ptx_batch_size"):
            problems.at_least(name, getattr(self, name), 1)
        for name, minimum in (("top_k", 0), ("lambda_update_delay", 0), ("cost_window_size", 2),
                              ("safety_set_size", 2), ("lora_r", 0)):
            problems.at_least(name, getattr(self, name), minimum)
        for name in ("temperature", "actor_lr", "critic_lr", "lambda_init", "lambda_min", "clip_range",
                     "value_clip_range", "lora_alpha", "score_clip", "max_grad_norm", "lambda_max"):
            problems.positive(name, getattr(self, name))
        for name in ("kl_coef", "lambda_lr", "lambda_ki", "lambda_kp", "lambda_kd", "weight_decay", "entropy_coef",
                     "bound_c1", "bound_c2", "ptx_coef"):
            problems.nonnegative(name, getattr(self, name))
        from hcrlhf.ops._checks import MIN_TEMPERATURE

        if math.isfinite(self.temperature) and 0 < self.temperature < MIN_TEMPERATURE:
            problems.add("temperature", f"must be >= {MIN_TEMPERATURE:g} (the log-probs' gradient scales as 1/T and "
                                        f"overflows below it), got {self.temperature!r}")
        clip = self.lambda_error_clip
        if len(clip) != 2 or not all(math.isfinite(v) and v > 0 for v in clip):
            problems.add("lambda_error_clip", f"must be a pair [below, above] of finite numbers > 0, got {clip!r}")
        for name in ("cost_threshold", "ama_upper", "ama_lower"):
            problems.finite(name, getattr(self, name))
        if not 0.0 < self.top_p <= 1.0:
            problems.add("top_p", f"must be in (0, 1], got {self.top_p!r}")
        problems.open_unit("delta", self.delta)
        problems.between("gamma", self.gamma, 0.0, 1.0)
        problems.between("gae_lambda", self.gae_lambda, 0.0, 1.0)
        if problems:  # the combinations below assume sane single values
            return

        for name, on in (("top_p", self.top_p < 1.0), ("top_k", self.top_k > 0)):
            if on:  # docs/method.md#candidate-selection: the rollout decoding is the distribution trained on
                problems.add(name, f"({getattr(self, name)!r}) truncates the rollout sampling, but the trainer's "
                                   "log-probs, importance ratios and KL are those of the full softmax(logits / "
                                   "temperature), so training would be off-policy by an uncorrected amount; leave "
                                   f"{name} at {1.0 if name == 'top_p' else 0} (truncated decoding is for deployment: "
                                   f"the pipeline's safety.{name} sets the safety test's)")
        if self.lambda_max is not None and not self.lambda_max >= self.lambda_init:
            problems.add("lambda_max", f"({self.lambda_max}) must be >= lambda_init ({self.lambda_init}), or null")
        if self.lambda_update == "pid" and not self.lambda_min <= self.lambda_init:
            problems.add("lambda_min", f"({self.lambda_min}) must be <= lambda_init ({self.lambda_init})")
        if self.rollout_rows < 2:
            problems.add("samples_per_prompt", "prompts_per_step · samples_per_prompt must be >= 2 (the cost window "
                                               "needs two costs for σ̂)")
        if self.estimator == "rloo":
            if self.samples_per_prompt < 2:
                problems.add("samples_per_prompt", f"estimator='rloo' needs samples_per_prompt >= 2 (a leave-one-out "
                                                   f"baseline), got {self.samples_per_prompt}")
            if self.ama_token_scores == "critics" and self.ama != "off":
                problems.add("ama_token_scores", "'critics' needs estimator='ppo' (rloo has no critics); use "
                                                 "ama_token_scores='score_models'")
            if self.ppo_epochs != 1 or self.minibatch_size is not None:
                problems.add("ppo_epochs" if self.ppo_epochs != 1 else "minibatch_size",
                             "estimator='rloo' does one update per rollout; ppo_epochs and minibatch_size are PPO "
                             "settings (leave them at 1 and null)")
        if self.minibatch_size is not None and self.rollout_rows % self.minibatch_size:
            problems.add("minibatch_size", f"({self.minibatch_size}) must divide the rollout's rows "
                                           f"prompts_per_step · samples_per_prompt = {self.rollout_rows}")
        if self.ama == "hysteresis" and not self.ama_lower < self.ama_upper:
            problems.add("ama_lower", f"ama='hysteresis' needs ama_lower < ama_upper, got {self.ama_lower} and "
                                      f"{self.ama_upper}")
        for name, on in (("resume", self.resume), ("checkpoint_every", self.checkpoint_every is not None),
                         ("tensorboard", self.tensorboard is True)):
            if on and self.output_dir is None:
                problems.add(name, f"{name}={getattr(self, name)!r} needs output_dir (where the run is written)")
        if self.ptx_coef > 0 and not self.ptx_path:
            problems.add("ptx_path", f"is required with ptx_coef={self.ptx_coef} (the pretraining/SFT text of the "
                                     "PTX loss: JSON Lines of {'prompt', 'response'} or {'text'} rows)")
        if self.ptx_coef == 0:
            for name in ("ptx_path", "ptx_batch_size"):
                if getattr(self, name) is not None:
                    problems.add(name, "is set but ptx_coef is 0 (the PTX loss is off); set ptx_coef > 0 or leave "
                                       f"{name} at null")
        if self.lora_target_modules is not None:
            if self.lora_r == 0:
                problems.add("lora_target_modules", "is set but lora_r is 0 (LoRA is off); set lora_r >= 1 or leave "
                                                    "lora_target_modules at null")
            names = ([self.lora_target_modules] if isinstance(self.lora_target_modules, str)
                     else self.lora_target_modules)
            if not names or not all(names):
                problems.add("lora_target_modules", f"must name at least one module (non-empty strings), got "
                                                    f"{self.lora_target_modules!r}")
