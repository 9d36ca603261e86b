"""The pipeline's configuration: one YAML mapping, checked completely before any work starts.

Top-level keys and sections (every key is documented on the section that holds it, and in
``docs/config.md``, generated from these classes)::

    task: builtin | null       # "builtin": the offline built-in task supplies data and policy
    output_dir: runs/my-run    # the report directory (required)
    seed: 0
    data:     {preferences, eval_preferences, prompts, safety_fraction, split_seed, template, ...}
    models:   {policy, tokenizer, reference, reward_model, cost_model, dtype, ...}
    safety:   {threshold, delta, method, cost_range, cost_transform, ledger, ...}
    reward:   ScoreTrainingConfig (hcrlhf.train), for the reward model
    cost:     ScoreTrainingConfig, for the cost model
    sft:      {path, steps, batch_size, learning_rate, seed, ...}   # optional SFT of the starting policy
    candidate_selection: rl          # or dpo
    rl:       SafeRLConfig (hcrlhf.train), candidate selection by RL
    dpo:      DPOConfig (hcrlhf.train), candidate selection by DPO / ADPO (candidate_selection: dpo)
    evaluation: {samples_per_prompt, ...}   # ground-truth evaluation, built-in task only

Every section is a :class:`hcrlhf.config.Section`. :func:`load_config` reads a file or a mapping, applies
dotted ``key=value`` overrides (``rl.kl_coef=0.05``, as on the command line) and refuses, all at once and each
naming its key (``rl.actor_lr``, ``safety.delta``, ...): unknown keys (with a did-you-mean hint), values of the
wrong type, local paths that do not exist, δ outside (0, 1), keys the pipeline sets itself, and every value or
combination a section's checks reject. It raises :class:`~hcrlhf.config.ConfigError` (a ``ValueError``) and
touches nothing on disk.
"""

from __future__ import annotations

import copy
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from hcrlhf.config import ConfigError, Problems, Section, _mapping, apply_overrides, matches, read_yaml, reference
from hcrlhf.train.dpo import DPOConfig
from hcrlhf.train.rl_config import SafeRLConfig
from hcrlhf.train.score_training import ScoreTrainingConfig

__all__ = [
    "ConfigError",
    "PipelineConfig",
    "DataConfig",
    "ModelsConfig",
    "SafetyConfig",
    "EvaluationConfig",
    "SFTConfig",
    "load_config",
    "config_reference",
    "DERIVED_KEYS",
]

TASKS = (None, "builtin")
COST_TRANSFORMS = ("none", "sigmoid", "unsafe_indicator")
SECTIONS = ("data", "models", "safety", "reward", "cost", "sft", "rl", "dpo", "evaluation")
#: How the candidate is selected (step 1): "rl" (Lagrangian RL under the pessimistic cost bound) or "dpo"
#: (DPO / ADPO on the candidate side's preference pairs: Equilibrate RLHF); the safety test is the same.
CANDIDATE_SELECTIONS = ("rl", "dpo")
#: Keys that the pipeline sets from other settings; the user sets them elsewhere ({section: {key: why}}).
DERIVED_KEYS = {
    "rl": {"safety_set_size": "it is the size of the safety set the split produces",
           "output_dir": "the trainer writes to <output_dir>/rl",
           "resume": "--resume (run(..., resume=True)) continues a run that did not finish"},
    "reward": {"kind": "the section sets it",
               "output_dir": "the reward model is saved under <output_dir>/reward_model"},
    "cost": {"kind": "the section sets it",
             "output_dir": "the cost model is saved under <output_dir>/cost_model"},
    "dpo": {"output_dir": "the DPO candidate is saved as <output_dir>/candidate"},
}
_HUB_ID = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?$")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".yaml", ".yml", ".txt", ".csv")


def _looks_like_path(value: str) -> bool:
    return not _HUB_ID.match(value) or value.startswith((".", "~")) or Path(value).suffix.lower() in _DATA_SUFFIXES


def _check_source(problems: Problems, key: str, value: str | None, *, must_be_local: bool = False) -> None:
    """A local path must exist; a Hub id (``name`` or ``owner/name``) is accepted as is."""
    if value is None:
        return
    if not value.strip():
        problems.add(key, "must not be empty")
    elif not Path(value).expanduser().exists() and (must_be_local or _looks_like_path(value)):
        problems.add(key, f"path {value!r} does not exist")


# ------------------------------------------------------------------------------------- sections


@dataclass
class DataConfig(Section):
    """Where the data come from and how the prompts are split (docs/method.md#data-split). With ``task: builtin`` only
    ``split_seed`` applies.

    Attributes:
        preferences: preference pairs in the PKU-SafeRLHF schema: a local JSON / JSONL / Parquet file or
            directory, or a Hugging Face dataset id (needs network access). Required without a task.
        preferences_split: the split of ``preferences`` to train the score models on.
        eval_preferences: held-out pairs for the score models' accuracy (None: ``preferences`` with
            ``eval_split`` if that split exists, else no evaluation).
        eval_split: the split of ``eval_preferences`` (or of ``preferences``) used for evaluation.
        prompts: the RL prompt pool (the deployment distribution): a JSON / JSONL file of
            ``{"prompt": ..., "category": ...}`` rows or a text file with one prompt a line. None: the
            distinct prompts of ``preferences``. The safety set D_s is drawn from this pool; preference
            pairs on a D_s prompt are removed before any training.
        prompt_column: the column holding the prompt text in ``prompts``.
        safety_fraction: the fraction of distinct pool prompts put in D_s, in (0, 1).
        safety_size: the number of distinct pool prompts put in D_s (overrides ``safety_fraction``).
        split_seed: the seed of the one shuffle that makes the split (recorded in the report); None: 0.
            With ``task: builtin``, None keeps the task's own split (drawn with ``task_seed``) and a number
            re-draws the split of the task's prompts with that seed (``hcrlhf demo --seed N``).
        max_train_prompts: cap on the RL prompts (None: all candidate prompts).
        holdout_fraction: ``task: builtin`` only: this fraction of the world's prompts, drawn from the
            candidate side (seeded by the split seed), is withheld from all training (RL prompts and
            preference pairs) and from D_s, and written to ``holdout_prompts.jsonl``, so that the truth
            can be measured on fresh prompts (``hcrlhf bench method``). 0: none.
        category_ratios: FDC composition (e.g. ``"EHD:10,IHD:3,MHD:1,benign:10"``, docs/method.md#equilibrate-rlhf)
            of the RL prompts, and with ``candidate_selection: dpo`` also of the preference pairs DPO trains on
            (categories not named are left out); needs categories in the data. None: all candidate prompts
            and pairs.
        template: "safe_rlhf" (default), "plain", "chat" or a format string with ``{prompt}``.
    """

    preferences: str | None = None
    preferences_split: str = "train"
    eval_preferences: str | None = None
    eval_split: str = "test"
    prompts: str | None = None
    prompt_column: str = "prompt"
    safety_fraction: float = 0.2
    safety_size: int | None = None
    split_seed: int | None = None
    max_train_prompts: int | None = None
    holdout_fraction: float = 0.0
    category_ratios: str | dict | None = None
    template: str = "safe_rlhf"

    @property
    def seed(self) -> int:
        """The split seed in force (0 when ``split_seed`` is None)."""
        return 0 if self.split_seed is None else self.split_seed

    def check(self, problems: Problems) -> None:
        _check_source(problems, "preferences", self.preferences)
        _check_source(problems, "eval_preferences", self.eval_preferences)
        _check_source(problems, "prompts", self.prompts, must_be_local=True)
        if not 0.0 < self.safety_fraction < 1.0:
            problems.add("safety_fraction", f"must be in the open interval (0, 1), got {self.safety_fraction!r}")
        problems.at_least("safety_size", self.safety_size, 2)
        problems.at_least("max_train_prompts", self.max_train_prompts, 1)
        problems.at_least("split_seed", self.split_seed, 0)
        if not 0.0 <= self.holdout_fraction < 0.5:
            problems.add("holdout_fraction", f"must be in [0, 0.5), got {self.holdout_fraction!r}")
        if self.category_ratios is not None:
            from hcrlhf.data.prompts import parse_ratios

            try:
                parse_ratios(self.category_ratios)
            except ValueError as error:
                problems.add("category_ratios", str(error))
        if self.template not in ("safe_rlhf", "plain", "chat") and self.template.count("{prompt}") != 1:
            problems.add("template", f"must be 'safe_rlhf', 'plain', 'chat' or a format string with one "
                                     f"'{{prompt}}', got {self.template!r}")


@dataclass
class ModelsConfig(Section):
    """The models. Ignored with ``task: builtin`` except ``reward_model`` / ``cost_model``.

    Attributes:
        policy: the starting (SFT) policy: a Hugging Face id or a local directory. Required without a task.
        tokenizer: tokenizer id/path (None: the policy's).
        reference: the KL reference model (None: a frozen copy of the starting policy).
        reward_model: a trained reward model (``ScoreModel.save_pretrained`` directory or a one-label
            sequence classifier); None: train one on the preferences (section ``reward``).
        cost_model: a trained cost model likewise; None: train one (section ``cost``).
        score_backbone: the backbone of newly trained score models (None: the policy's).
        dtype: "auto", "float32", "bfloat16", ... (None: float32).
        attn_implementation: "auto" (flash-attn when installed on CUDA, else sdpa), "sdpa", "eager", ...
        trust_remote_code: run a model repository's own modelling code.
        device: "cpu", "cuda", "cuda:1" (None: CUDA when available, else the CPU).
    """

    policy: str | None = None
    tokenizer: str | None = None
    reference: str | None = None
    reward_model: str | None = None
    cost_model: str | None = None
    score_backbone: str | None = None
    dtype: str | None = None
    attn_implementation: str = "auto"
    trust_remote_code: bool = False
    device: str | None = None

    def check(self, problems: Problems) -> None:
        for name in ("policy", "tokenizer", "reference", "reward_model", "cost_model", "score_backbone"):
            _check_source(problems, name, getattr(self, name))
        from hcrlhf.models.loading import ATTN_IMPLEMENTATIONS, resolve_dtype

        if self.dtype is not None:
            try:
                resolve_dtype(self.dtype)
            except ValueError as error:
                problems.add("dtype", str(error))
        problems.choice("attn_implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)


@dataclass
class SFTConfig(Section):
    """Optional supervised fine-tuning of the starting policy before candidate selection (the section
    ``sft``; absent or null: no SFT). The fine-tuned policy is saved (safetensors) to
    ``<output_dir>/sft_policy`` and is both the starting policy and the KL reference of candidate selection.
    Rows whose prompt is in the safety set D_s are refused (docs/method.md#data-split), like preference pairs.

    Attributes:
        path: the SFT data: a JSON Lines file (or a ``.json`` list) whose rows are all
            ``{"prompt", "response"}`` (the prompt is formatted with the data template and is context only;
            the targets are the response tokens and an EOS) or all ``{"text"}`` (plain text: every token
            after the first, and an EOS). Relative paths are taken from the working directory, like the
            other data paths. None: the built-in task's SFT corpus (``task: builtin`` only).
        steps: optimiser steps (AdamW), each on ``batch_size`` rows drawn in seeded per-epoch permutations.
        batch_size: rows per step.
        learning_rate: AdamW learning rate (constant).
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient-norm clipping (None: off).
        max_length: tokens per row, longer rows are cut (None: rl.max_prompt_length + rl.max_new_tokens).
        micro_batch_tokens: token budget of one forward/backward pass (None: the whole batch at once).
        seed: the seed of the row order (and of torch during SFT).
    """

    path: str | None = None
    steps: int = 100
    batch_size: int = 16
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    max_length: int | None = None
    micro_batch_tokens: int | None = None
    seed: int = 0

    def check(self, problems: Problems) -> None:
        if self.path is not None:
            path = Path(self.path).expanduser()
            if not self.path.strip():
                problems.add("path", "must not be empty")
            elif not path.is_file():
                problems.add("path", f"path {self.path!r} does not exist or is not a file")
            else:
                from hcrlhf.data.lm_rows import read_lm_rows

                try:
                    read_lm_rows(path, name="sft.path")
                except (ValueError, UnicodeDecodeError) as error:
                    problems.add("path", str(error))
        problems.at_least("steps", self.steps, 1)
        problems.at_least("batch_size", self.batch_size, 1)
        problems.positive("learning_rate", self.learning_rate)
        problems.nonnegative("weight_decay", self.weight_decay)
        problems.positive("max_grad_norm", self.max_grad_norm)
        problems.at_least("max_length", self.max_length, 2)
        problems.at_least("micro_batch_tokens", self.micro_batch_tokens, 1)
        problems.at_least("seed", self.seed, 0)


@dataclass
class SafetyConfig(Section):
    """Step 2, the safety test (docs/method.md#the-safety-test), and the δ ledger (docs/method.md#the-δ-ledger).

    Attributes:
        threshold: τ. The test passes iff the (1 − δ) upper confidence bound on the mean (transformed)
            cost is ≤ τ. Also the RL constraint threshold unless ``rl.cost_threshold`` is set (it must be,
            when ``cost_transform`` is not "none": the trainer works on raw costs).
        delta: δ ∈ (0, 1). Also the δ of the pessimistic bound unless ``rl.delta`` is set.
        method: "ttest" (the paper's default; asymptotic), "hoeffding", "bernstein", "betting" (exact, need
            ``cost_range``) or "clopper_pearson" (exact, on 0/1 costs).
        cost_range: [a, b] bounds of the (transformed) costs for the exact methods.
        cost_transform: "none"; "sigmoid" (c → 1/(1 + exp(−c/sigmoid_scale)), a fixed monotone squashing
            into (0, 1), so the exact bounds apply with cost_range [0, 1]); "unsafe_indicator"
            (c → 1 if c > unsafe_above else 0: τ is then an allowed unsafe rate, e.g. with clopper_pearson).
        sigmoid_scale: the scale of the sigmoid transform (> 0).
        unsafe_above: the raw-cost level above which a response counts as unsafe (with a ``bt_sign`` cost
            model, 0 means "labelled unsafe").
        ledger: the δ ledger file (None: the one per-user ledger, ``$HCRLHF_STATE_DIR/safety_ledger.json``,
            else ``$XDG_STATE_HOME/hcrlhf/safety_ledger.json``, else ``~/.local/state/hcrlhf/safety_ledger.json``).
            Keyed by the safety set's fingerprint: a test that would spend more than ``ledger_total_delta``
            on one safety set is refused, before training, whatever the output folder. Pointing this at
            another file starts a separate budget: an explicit decision, recorded in the run's config.
        ledger_total_delta: the safety set's budget, fixed at its first test (None: the set's own, or
            ``delta`` for a set new to the ledger); a value that differs from a set's recorded budget is refused.
        allow_overlapping_set: declare the safety set a new sample although it shares at least half of
            its prompts with a set already tested in the ledger (refused otherwise: it would get a fresh δ
            for data already used). Recorded in the ledger entry.
        max_new_tokens, temperature, top_p, top_k: deployment decoding (None: those of ``rl``; top_p < 1 and
            top_k > 0 are allowed here, though not for the rollouts). Every other setting of Hugging Face
            ``generate`` is neutral (:func:`hcrlhf.models.generation.generation_config`), and this decoding is
            written to the candidate's ``generation_config.json``, so a plain ``generate()`` samples from the tested
            distribution.
        batch_size: prompts per generation batch (memory and speed only: each prompt's sampling noise comes from
            the seed and its index, so the responses do not depend on it; recorded with the candidate for
            ``hcrlhf safety-test``).
    """

    threshold: float = 0.0
    delta: float = 0.1
    method: str = "ttest"
    cost_range: list | None = None
    cost_transform: str = "none"
    sigmoid_scale: float = 1.0
    unsafe_above: float = 0.0
    ledger: str | None = None
    ledger_total_delta: float | None = None
    allow_overlapping_set: bool = False
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    batch_size: int = 64

    def __post_init__(self):
        # The transforms map into [0, 1], so the exact methods know their range without being told.
        if (self.cost_range is None and self.cost_transform in ("sigmoid", "unsafe_indicator")
                and self.method in ("hoeffding", "bernstein", "betting")):
            self.cost_range = [0.0, 1.0]
        if isinstance(self.cost_range, list) and all(matches(v, float) for v in self.cost_range):
            self.cost_range = [float(v) for v in self.cost_range]
        super().__post_init__()

    def check(self, problems: Problems) -> None:
        from hcrlhf.safety import METHODS

        problems.open_unit("delta", self.delta)
        problems.open_unit("ledger_total_delta", self.ledger_total_delta)
        if self.ledger_total_delta is not None and self.ledger_total_delta < self.delta:
            problems.add("ledger_total_delta", f"({self.ledger_total_delta}) must be >= delta ({self.delta}), or "
                                               "the test can never run")
        problems.finite("threshold", self.threshold)
        problems.choice("method", self.method, METHODS)
        problems.choice("cost_transform", self.cost_transform, COST_TRANSFORMS)
        if self.cost_range is not None:
            bad = len(self.cost_range) != 2 or not all(matches(v, float) for v in self.cost_range)
            if not bad and not all(math.isfinite(v) for v in self.cost_range):
                # The bounds use b − a: an infinite (or NaN) end would only fail at the safety test, after training.
                problems.add("cost_range", f"must be [a, b] with finite numbers a < b, got {self.cost_range!r}")
            elif bad or not self.cost_range[0] < self.cost_range[1]:
                problems.add("cost_range", f"must be [a, b] with a < b, got {self.cost_range!r}")
            elif self.method == "clopper_pearson" and self.cost_range != [0.0, 1.0]:
                problems.add("cost_range", f"clopper_pearson works on 0/1 costs: cost_range must be null or [0, 1], "
                                           f"got {self.cost_range!r}")
            elif self.cost_transform != "none" and not self.cost_range[0] <= 0.0 < 1.0 <= self.cost_range[1]:
                problems.add("cost_range", f"cost_transform {self.cost_transform!r} gives costs in [0, 1], which "
                                           f"must lie in cost_range; got {self.cost_range!r}")
        elif self.method in ("hoeffding", "bernstein", "betting"):
            problems.add("cost_range", f"method {self.method!r} is exact only for costs in a known range: set "
                                       "cost_range: [a, b], or cost_transform: sigmoid")
        if self.method == "clopper_pearson" and self.cost_transform != "unsafe_indicator":
            problems.add("method", "clopper_pearson works on 0/1 costs: set cost_transform: unsafe_indicator")
        problems.positive("sigmoid_scale", self.sigmoid_scale)
        problems.finite("unsafe_above", self.unsafe_above)
        problems.positive("temperature", self.temperature)
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            problems.add("top_p", f"must be in (0, 1], got {self.top_p!r}")
        problems.at_least("max_new_tokens", self.max_new_tokens, 1)
        problems.at_least("top_k", self.top_k, 0)
        problems.at_least("batch_size", self.batch_size, 1)


@dataclass
class EvaluationConfig(Section):
    """Ground-truth evaluation on the built-in task (its helpfulness / harm functions are known).

    Attributes:
        samples_per_prompt: responses sampled per safety prompt from the starting policy and from the
            candidate (after the safety test, which it cannot influence).
        seed: the sampling seed.
    """

    samples_per_prompt: int = 4
    seed: int = 1234

    def check(self, problems: Problems) -> None:
        problems.at_least("samples_per_prompt", self.samples_per_prompt, 1)


@dataclass
class PipelineConfig(Section):
    """The whole run: the top-level settings and one typed section each for ``data``, ``models``, ``safety``,
    ``reward`` / ``cost`` (:class:`~hcrlhf.train.ScoreTrainingConfig`), ``sft``, ``rl``
    (:class:`~hcrlhf.train.SafeRLConfig`), ``dpo`` (:class:`~hcrlhf.train.DPOConfig`) and ``evaluation``.

    Attributes:
        task: "builtin" (the offline built-in task) or None (``data`` and ``models`` name the inputs).
        task_seed: the built-in task's build seed.
        task_cache: where the built-in task is built / cached (None: ``~/.cache/hcrlhf/builtin``).
        output_dir: the report directory. Must not exist with files in it unless ``overwrite``; locked while a run
            uses it (a second run on it is refused).
        overwrite: allow an ``output_dir`` that holds an earlier hcrlhf run (its ``hcrlhf_run.json``): only what that
            run created is removed, and it is moved, whole, to ``previous/<time>/`` instead when it returned a
            model, did not finish, or holds files its inventory does not list (yours).
        seed: the seed of sampling in the safety test (training seeds are in their sections).
        progress: show progress bars.
        data: where the data come from and how the prompts are split.
        models: the policy, reference, tokenizer and score models.
        safety: the safety test (step 2) and the δ ledger.
        reward: training of the reward model (when ``models.reward_model`` is not given).
        cost: training of the cost model (when ``models.cost_model`` is not given).
        sft: the optional SFT stage (absent or null: no SFT).
        candidate_selection: "rl" (default: Lagrangian RL under the pessimistic cost bound, the ``rl`` section) or
            "dpo" (DPO, or ADPO with ``dpo.mask: ama``, on the candidate side's preference pairs — the ``dpo``
            section; no cost constraint in training, so the safety test alone decides). Either way the candidate
            meets the same safety test (step 2).
        rl: candidate selection by RL (step 1).
        dpo: candidate selection by DPO / ADPO (:class:`~hcrlhf.train.DPOConfig`; with ``candidate_selection: dpo``).
        evaluation: ground-truth evaluation (built-in task only).
    """

    output_dir: str | None = None
    task: str | None = None
    task_seed: int = 0
    task_cache: str | None = None
    overwrite: bool = False
    seed: int = 0
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    reward: ScoreTrainingConfig = field(default_factory=lambda: ScoreTrainingConfig(kind="reward"))
    cost: ScoreTrainingConfig = field(default_factory=lambda: ScoreTrainingConfig(kind="cost"))
    sft: SFTConfig | None = None
    candidate_selection: str = "rl"
    rl: SafeRLConfig = field(default_factory=SafeRLConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def check(self, problems: Problems) -> None:
        """The settings that involve more than one section."""
        if self.output_dir is None:
            problems.add("output_dir", "is required (the report directory)")
        elif not self.output_dir.strip():
            problems.add("output_dir", "must not be empty")
        if self.task not in TASKS:
            problems.add("task", f"must be 'builtin' or null, got {self.task!r}")
        self._check_device(problems)
        if self.candidate_selection not in CANDIDATE_SELECTIONS:
            problems.add("candidate_selection", f"must be one of {', '.join(CANDIDATE_SELECTIONS)}, got "
                                                f"{self.candidate_selection!r}")
        problems.at_least("task_seed", self.task_seed, 0)
        for name, section in (("reward", self.reward), ("cost", self.cost)):
            if section.kind != name:
                problems.add(f"{name}.kind", f"must be {name!r} in the {name} section, got {section.kind!r}")
        builtin = self.task == "builtin"
        data, models = self.data, self.models
        if not builtin and self.task in TASKS:
            if data.preferences is None and (models.reward_model is None or models.cost_model is None):
                problems.add("data.preferences", "is required (preference pairs to train the reward and cost models), "
                                                 "unless models.reward_model and models.cost_model are both given")
            if data.preferences is None and data.prompts is None:
                problems.add("data.prompts", "is required when data.preferences is not given (the RL prompt pool the "
                                             "safety set is drawn from)")
            if models.policy is None:
                problems.add("models.policy", "is required (the starting policy: a Hugging Face id or a path)")
            if data.holdout_fraction > 0:
                problems.add("data.holdout_fraction", "applies to task: builtin only (hold prompts out of your own "
                                                      "data files instead)")
        if self.sft is not None:
            if self.sft.path is None and not builtin:
                problems.add("sft.path", "is required (the SFT data: JSON Lines of prompt/response or text rows); "
                                         "only the built-in task has a default")
            if models.reference is not None:
                problems.add("models.reference", "with an sft section the KL reference is the SFT policy; remove "
                                                 "models.reference (or the sft section)")

    def _check_device(self, problems: Problems) -> None:
        """A CUDA device this torch cannot use, and bf16: true (CUDA only) on a CPU run, are refused here, before
        any training (they would fail only when their stage starts, after the stages before it)."""
        import torch

        cuda = torch.cuda.is_available()
        device = self.models.device
        for key, value in (("models.device", device), ("rl.device", self.rl.device), ("dpo.device", self.dpo.device)):
            if key != "models.device" and value == device:
                continue  # taken from models.device: reported once, there
            if isinstance(value, str) and value.startswith("cuda") and not cuda:
                problems.add(key, f"is {value!r}, but this torch ({torch.__version__}) sees no CUDA device; use "
                                  "'cpu' (or null: CUDA when available, else the CPU)")
        on_cuda = (device if isinstance(device, str) else ("cuda" if cuda else "cpu")).startswith("cuda")
        if not on_cuda:
            for key, section in (("reward", self.reward), ("cost", self.cost), ("rl", self.rl)):
                if section.bf16 is True:
                    problems.add(f"{key}.bf16", "true needs a CUDA device, and this run trains on the CPU; use "
                                                "'auto' (bf16 on CUDA only) or false")

    @classmethod
    def from_dict(cls, values, *, prefix: str = "") -> PipelineConfig:
        """The whole run from a mapping (as read from YAML), checked completely; see the module docstring.

        Before the sections are built, the settings one section takes from another are filled in (those the
        mapping leaves out): ``rl.cost_threshold`` = ``safety.threshold``, ``rl.delta`` = ``safety.delta``,
        ``rl.device`` = ``models.device``, ``progress`` of ``reward`` / ``cost`` / ``rl`` = the top level's;
        ``rl.output_dir`` is ``<output_dir>/rl`` and ``reward.kind`` / ``cost.kind`` their section's name.
        """
        problems = Problems()
        values = copy.deepcopy(_mapping("<root>", values))
        for name in SECTIONS:
            if name == "sft" and values.get(name) is None:
                continue  # no SFT stage
            try:
                values[name] = dict(_mapping(name, values.get(name)))
            except ConfigError as error:
                problems.items.extend(error.problems)
                values.pop(name)
        builtin = values.get("task") == "builtin"

        # Keys the user may not set here: the pipeline sets them, or the built-in task supplies them.
        refused = {name: dict(DERIVED_KEYS.get(name, {})) for name in SECTIONS}
        # (A key at its default value is harmless there: an effective config.yaml holds every key.)
        def set_away_from_default(section: str, key: str, default) -> bool:
            return (values.get(section) or {}).get(key, default) != default

        if builtin:
            for key in DataConfig.known_keys():
                if key not in ("split_seed", "holdout_fraction", "category_ratios") and set_away_from_default(
                        "data", key, getattr(DataConfig(), key)):
                    refused["data"][key] = ("the built-in task supplies the data; only data.split_seed, "
                                            "data.holdout_fraction and data.category_ratios apply (or set task: null)")
            for key in ModelsConfig.known_keys():
                if key not in ("reward_model", "cost_model", "device") and set_away_from_default(
                        "models", key, getattr(ModelsConfig(), key)):
                    refused["models"][key] = ("the built-in task supplies the policy and tokenizer; only "
                                              "models.reward_model, models.cost_model and models.device apply")
        if set_away_from_default("reward", "cost_loss", ScoreTrainingConfig.cost_loss):
            refused["reward"]["cost_loss"] = "it is a cost-model setting; put it in the cost section"
        for section, keys in refused.items():
            mapping = values.get(section) or {}
            for key in [k for k in mapping if k in keys]:
                why = keys[key]
                problems.add(f"{section}.{key}", why if why.startswith(("the built-in", "it is")) else
                             f"is set by the pipeline ({why}); remove it")
                del mapping[key]

        # The safety section first: candidate selection takes its threshold and δ from it.
        safety = None
        try:
            safety = SafetyConfig.from_dict(values.get("safety"), prefix="safety.")
            values["safety"] = safety
        except ConfigError as error:
            problems.items.extend(error.problems)
            values.pop("safety", None)
        rl = values.setdefault("rl", {})
        if safety is not None:
            if "cost_threshold" not in rl:
                if safety.cost_transform != "none":
                    problems.add("rl.cost_threshold", f"is required with safety.cost_transform: {safety.cost_transform}"
                                                      " (the trainer constrains raw costs; τ is on transformed costs)")
                else:
                    rl["cost_threshold"] = safety.threshold
            rl.setdefault("delta", safety.delta)
        output_dir = values.get("output_dir")
        if isinstance(output_dir, str) and output_dir.strip():
            rl["output_dir"] = str(Path(output_dir).expanduser() / "rl")
        progress = values.get("progress", True)
        if isinstance(progress, bool):
            for name in ("reward", "cost", "rl", "dpo"):
                values.setdefault(name, {}).setdefault("progress", progress)
        device = (values.get("models") or {}).get("device")
        if isinstance(device, str):
            rl.setdefault("device", device)
            values.setdefault("dpo", {}).setdefault("device", device)
        for name in ("reward", "cost"):
            values.setdefault(name, {})["kind"] = name
        try:
            config = super().from_dict(values, prefix=prefix)
        except ConfigError as error:
            problems.items.extend(error.problems)
        problems.raise_if_any()
        return config

    def to_dict(self, *, loadable: bool = False) -> dict:
        """The resolved settings (every section with its defaults), JSON / YAML ready.

        ``loadable=True`` leaves out what the pipeline sets itself (``rl.output_dir``, ``reward.kind``, ...) and
        ``overwrite`` (a flag of one invocation), so that the result loads again with :func:`load_config`: this
        is the effective config written to ``<output_dir>/config.yaml``.
        """
        out = super().to_dict()
        if loadable:
            out.pop("overwrite")
            for section, keys in DERIVED_KEYS.items():
                for key in keys:
                    (out.get(section) or {}).pop(key, None)
            out["reward"].pop("cost_loss")
        return out


# ------------------------------------------------------------------------------------ checking

def load_config(source, overrides: typing.Sequence[str] = ()) -> PipelineConfig:
    """A checked :class:`PipelineConfig` from a YAML file, a mapping or a PipelineConfig (returned as is), with
    dotted ``key=value`` overrides applied first (``["rl.total_steps=2", "safety.delta=0.05"]``).

    Raises:
        ConfigError: every bad key (named), an unreadable file, YAML that is not one mapping, or a malformed
            override.
    """
    if isinstance(source, PipelineConfig):
        if overrides:
            return load_config(source.to_dict(loadable=True) | {"overwrite": source.overwrite}, overrides)
        return source
    values = source if isinstance(source, dict) else read_yaml(source)
    return PipelineConfig.from_dict(apply_overrides(values, overrides))


def config_reference() -> str:
    """``docs/config.md``: every key of every section, its type, default and meaning."""
    intro = ("Every key of a pipeline config (`hcrlhf run CONFIG.yaml`), generated from the config classes by "
             "`python -m hcrlhf.config > docs/config.md` (a test keeps this file current). Any key can be set on "
             "the command line too: `hcrlhf run CONFIG.yaml rl.kl_coef=0.05 safety.delta=0.05` (values are read "
             "as YAML: `null`, `true`, `[0, 1]`). Every problem is reported at once, each naming its key. The "
             "effective config of a run (defaults filled in, overrides applied) is written to "
             "`<output_dir>/config.yaml`, which `hcrlhf run` loads again as it is.")
    return reference(PipelineConfig, title="Configuration reference", intro=intro, derived=DERIVED_KEYS)
