"""The pipeline's configuration: one YAML mapping, checked completely before any work starts.

Top-level keys and sections (every key is documented on the dataclass that holds it)::

    task: builtin | null       # "builtin": the offline built-in task supplies data and policy
    output_dir: runs/my-run    # the report directory (required)
    seed: 0
    data:     {preferences, eval_preferences, prompts, safety_fraction, split_seed, template, ...}
    models:   {policy, tokenizer, reference, reward_model, cost_model, dtype, ...}
    reward:   ScoreTrainingConfig fields (hcrlhf.train), for the reward model
    cost:     ScoreTrainingConfig fields, for the cost model
    sft:      {path, steps, batch_size, learning_rate, seed, ...}   # optional SFT of the starting policy
    rl:       SafeRLConfig fields (hcrlhf.train), candidate selection
    safety:   {threshold, delta, method, cost_range, cost_transform, ledger, ...}
    evaluation: {samples_per_prompt, ...}   # ground-truth evaluation, built-in task only

:func:`load_config` refuses, naming the key (``rl.actor_lr``, ``safety.delta``, ...): unknown keys, values
of the wrong type, local paths that do not exist, δ outside (0, 1), and any value the section's own
validation rejects. It raises :class:`ConfigError` (a ``ValueError``) and touches nothing on disk.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

from hcrlhf._typecheck import coerce_yaml, matches, type_name

__all__ = [
    "ConfigError",
    "PipelineConfig",
    "DataConfig",
    "ModelsConfig",
    "SafetyConfig",
    "EvaluationConfig",
    "SFTConfig",
    "load_config",
    "read_config_file",
    "config_from_dict",
    "DERIVED_RL_KEYS",
]

TASKS = (None, "builtin")
COST_TRANSFORMS = ("none", "sigmoid", "unsafe_indicator")
# Set by the pipeline from other settings; the user sets them elsewhere.
DERIVED_RL_KEYS = {
    "safety_set_size": "it is the size of the safety set the split produces",
    "output_dir": "the trainer writes to <output_dir>/rl",
    "resume": "the pipeline runs each stage once",
}
DERIVED_SCORE_KEYS = {
    "kind": "the section (reward / cost) sets it",
    "output_dir": "the models are saved under <output_dir>/reward_model and <output_dir>/cost_model",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?$")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".yaml", ".yml", ".txt", ".csv")


class ConfigError(ValueError):
    """A bad pipeline config. ``key`` is the dotted name of the offending setting (e.g. ``safety.delta``)."""

    def __init__(self, key: str, message: str):
        self.key = key
        super().__init__(f"config key {key!r}: {message}")


# ------------------------------------------------------------------------------------- sections


@dataclass
class DataConfig:
    """Where the data come from and how the prompts are split (SPEC.md §2.2). With ``task: builtin`` only
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
        category_ratios: FDC composition of the RL prompts (e.g. ``"EHD:10,IHD:3,MHD:1,benign:10"``,
            SPEC.md §5); needs categories in the pool. None: all candidate prompts.
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


@dataclass
class ModelsConfig:
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


@dataclass
class SFTConfig:
    """Optional supervised fine-tuning of the starting policy before candidate selection (the section
    ``sft``; absent or null: no SFT). The fine-tuned policy is saved (safetensors) to
    ``<output_dir>/sft_policy`` and is both the starting policy and the KL reference of candidate selection.
    Rows whose prompt is in the safety set D_s are refused (SPEC §2.2), like preference pairs.

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


@dataclass
class SafetyConfig:
    """Step 2, the safety test (SPEC.md §2.4), and the δ ledger.

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
        ledger: the δ ledger file (None: ``<output_dir>/safety_ledger.json``). Point several runs that test
            on the same safety data at one ledger: a test that would spend more than
            ``ledger_total_delta`` on one safety set is refused.
        ledger_total_delta: the ledger's budget per safety set (None: ``delta``).
        max_new_tokens, temperature, top_p, top_k: deployment decoding (None: those of ``rl``).
        batch_size: prompts per generation batch.
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
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    batch_size: int = 64


@dataclass
class EvaluationConfig:
    """Ground-truth evaluation on the built-in task (its helpfulness / harm functions are known).

    Attributes:
        samples_per_prompt: responses sampled per safety prompt from the starting policy and from the
            candidate (after the safety test, which it cannot influence).
        seed: the sampling seed.
    """

    samples_per_prompt: int = 4
    seed: int = 1234


@dataclass
class PipelineConfig:
    """The whole run. ``reward``, ``cost`` and ``rl`` hold ``ScoreTrainingConfig`` / ``SafeRLConfig``
    objects (see :mod:`hcrlhf.train`); the others the dataclasses of this module.

    Attributes:
        task: "builtin" (the offline built-in task) or None (``data`` and ``models`` name the inputs).
        task_seed: the built-in task's build seed.
        task_cache: where the built-in task is built / cached (None: ``~/.cache/hcrlhf/builtin``).
        output_dir: the report directory. Must not exist with files in it unless ``overwrite``.
        overwrite: allow a non-empty ``output_dir`` that holds an earlier hcrlhf report.
        seed: the seed of sampling in the safety test (training seeds are in their sections).
        progress: show progress bars.
        sft: :class:`SFTConfig` when the optional SFT stage is on (section ``sft``), else None.
    """

    output_dir: str
    task: str | None = None
    task_seed: int = 0
    task_cache: str | None = None
    overwrite: bool = False
    seed: int = 0
    progress: bool = True
    data: DataConfig = field(default_factory=DataConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    reward: typing.Any = None
    cost: typing.Any = None
    rl: typing.Any = None
    safety: SafetyConfig = field(default_factory=SafetyConfig)
    sft: SFTConfig | None = None
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    #: the mapping the config came from (after defaults of the sections were filled in), for the report
    source: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        """The resolved settings (every section with its defaults), JSON-ready."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name == "source":
                continue
            value = getattr(self, f.name)
            if dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            out[f.name] = value
        return out

    @property
    def rl_cost_threshold(self) -> float:
        return self.rl.cost_threshold


# ------------------------------------------------------------------------------------ checking


def _coerce(key: str, value, hint):
    """Check ``value`` against the type hint; YAML conveniences: "1e-6" or 3 for a float field."""
    value = coerce_yaml(value, hint)
    if not matches(value, hint):
        raise ConfigError(key, f"must be {type_name(hint, 'null')}, got {value!r} ({type(value).__name__})")
    return value


def _unknown(prefix: str, values: dict, known) -> None:
    unknown = [k for k in values if k not in known]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"{prefix}{key}", f"unknown key{hint}; known keys: {', '.join(sorted(known))}")


def _mapping(key: str, value) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a mapping of settings, got {type(value).__name__}")
    for k in value:
        if not isinstance(k, str):
            raise ConfigError(f"{key}.{k}", "keys must be strings")
    return value


def _section(cls, prefix: str, values: dict, *, refused: dict | None = None):
    """A section dataclass from a mapping: unknown keys and wrong types refused, naming the key."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)} - set(refused or {})
    for name, why in (refused or {}).items():
        if name in values:
            raise ConfigError(f"{prefix}{name}", f"is set by the pipeline ({why}); remove it")
    _unknown(prefix, values, known)
    coerced = {k: _coerce(f"{prefix}{k}", v, hints[k]) for k, v in values.items()}
    return coerced


def _wrap(prefix: str, cls_name: str, error: Exception, fields) -> ConfigError:
    """A section's own validation error as a ConfigError naming the key it mentions."""
    message = str(error)
    for name in sorted(fields, key=len, reverse=True):
        if re.search(rf"\b{re.escape(name)}\b", message):
            return ConfigError(f"{prefix}{name}", message)
    return ConfigError(prefix.rstrip("."), message)


def _looks_like_path(value: str) -> bool:
    return (not _HUB_ID.match(value) or value.startswith((".", "~")) or Path(value).suffix.lower() in _DATA_SUFFIXES)


def _check_source(key: str, value: str | None, *, must_be_local: bool = False) -> None:
    """A local path must exist; a Hub id (``name`` or ``owner/name``) is accepted as is."""
    if value is None:
        return
    if not value.strip():
        raise ConfigError(key, "must not be empty")
    path = Path(value).expanduser()
    if path.exists():
        return
    if must_be_local or _looks_like_path(value):
        raise ConfigError(key, f"path {value!r} does not exist")


def _delta(key: str, value) -> None:
    if value is not None and not (0.0 < value < 1.0):
        raise ConfigError(key, f"must be in the open interval (0, 1), got {value!r}")


def _positive(key: str, value) -> None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise ConfigError(key, f"must be a finite number > 0, got {value!r}")


def _at_least(key: str, value, minimum: int) -> None:
    if value is not None and value < minimum:
        raise ConfigError(key, f"must be >= {minimum}, got {value!r}")


def config_from_dict(values: dict) -> PipelineConfig:
    """A :class:`PipelineConfig` from a mapping (as read from YAML), checked completely.

    Raises:
        ConfigError: naming the first bad key.
    """
    from hcrlhf.safety import METHODS
    from hcrlhf.train import SafeRLConfig, ScoreTrainingConfig

    if not isinstance(values, dict):
        raise ConfigError("<root>", f"the config must be a mapping of settings, got {type(values).__name__}")
    source = copy.deepcopy(values)
    sections = {"data", "models", "reward", "cost", "rl", "safety", "evaluation", "sft"}
    top_fields = {f.name for f in dataclasses.fields(PipelineConfig)} - {"source"}
    _unknown("", values, top_fields)
    top = {k: v for k, v in values.items() if k not in sections}
    hints = typing.get_type_hints(PipelineConfig)
    top = {k: _coerce(k, v, hints[k]) for k, v in top.items()}
    if "output_dir" not in top or top["output_dir"] is None:
        raise ConfigError("output_dir", "is required (the report directory)")
    if not str(top["output_dir"]).strip():
        raise ConfigError("output_dir", "must not be empty")
    if top.get("task") not in TASKS:
        raise ConfigError("task", f"must be 'builtin' or null, got {top.get('task')!r}")
    _at_least("task_seed", top.get("task_seed"), 0)
    builtin = top.get("task") == "builtin"

    # data / models ----------------------------------------------------------------------------
    data_values = _mapping("data", values.get("data"))
    models_values = _mapping("models", values.get("models"))
    if builtin:
        for key in data_values:
            if key not in ("split_seed", "holdout_fraction"):
                raise ConfigError(f"data.{key}", "the built-in task supplies the data; only data.split_seed and "
                                                 "data.holdout_fraction apply (or set task: null)")
        for key in models_values:
            if key not in ("reward_model", "cost_model", "device"):
                raise ConfigError(f"models.{key}", "the built-in task supplies the policy and tokenizer; only "
                                                   "models.reward_model, models.cost_model and models.device apply")
    data = DataConfig(**_section(DataConfig, "data.", data_values))
    models = ModelsConfig(**_section(ModelsConfig, "models.", models_values))
    if not builtin:
        if data.preferences is None and (models.reward_model is None or models.cost_model is None):
            raise ConfigError("data.preferences", "is required (preference pairs to train the reward and cost "
                                                  "models), unless models.reward_model and models.cost_model "
                                                  "are both given")
        if data.preferences is None and data.prompts is None:
            raise ConfigError("data.prompts", "is required when data.preferences is not given (the RL prompt "
                                              "pool the safety set is drawn from)")
        if models.policy is None:
            raise ConfigError("models.policy", "is required (the starting policy: a Hugging Face id or a path)")
    _check_source("data.preferences", data.preferences)
    _check_source("data.eval_preferences", data.eval_preferences)
    _check_source("data.prompts", data.prompts, must_be_local=True)
    for name in ("policy", "tokenizer", "reference", "reward_model", "cost_model", "score_backbone"):
        _check_source(f"models.{name}", getattr(models, name))
    if not 0.0 < data.safety_fraction < 1.0:
        raise ConfigError("data.safety_fraction", f"must be in the open interval (0, 1), got {data.safety_fraction!r}")
    _at_least("data.safety_size", data.safety_size, 2)
    _at_least("data.max_train_prompts", data.max_train_prompts, 1)
    _at_least("data.split_seed", data.split_seed, 0)
    if not 0.0 <= data.holdout_fraction < 0.5:
        raise ConfigError("data.holdout_fraction", f"must be in [0, 0.5), got {data.holdout_fraction!r}")
    if data.holdout_fraction > 0 and not builtin:
        raise ConfigError("data.holdout_fraction", "applies to task: builtin only (hold prompts out of your own "
                                                   "data files instead)")
    if data.category_ratios is not None:
        from hcrlhf.data.prompts import parse_ratios

        try:
            parse_ratios(data.category_ratios)
        except ValueError as error:
            raise ConfigError("data.category_ratios", str(error)) from None
    if data.template not in ("safe_rlhf", "plain", "chat") and data.template.count("{prompt}") != 1:
        raise ConfigError("data.template", f"must be 'safe_rlhf', 'plain', 'chat' or a format string with one "
                                           f"'{{prompt}}', got {data.template!r}")
    if models.dtype is not None:
        from hcrlhf.models.loading import resolve_dtype

        try:
            resolve_dtype(models.dtype)
        except ValueError as error:
            raise ConfigError("models.dtype", str(error)) from None
    from hcrlhf.models.loading import ATTN_IMPLEMENTATIONS

    if models.attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ConfigError("models.attn_implementation",
                          f"must be one of {ATTN_IMPLEMENTATIONS}, got {models.attn_implementation!r}")

    # safety / evaluation ---------------------------------------------------------------------------
    safety = SafetyConfig(**_section(SafetyConfig, "safety.", _mapping("safety", values.get("safety"))))
    _delta("safety.delta", safety.delta)
    _delta("safety.ledger_total_delta", safety.ledger_total_delta)
    if safety.ledger_total_delta is not None and safety.ledger_total_delta < safety.delta:
        raise ConfigError("safety.ledger_total_delta", f"({safety.ledger_total_delta}) must be >= safety.delta "
                                                       f"({safety.delta}), or the test can never run")
    if not math.isfinite(safety.threshold):
        raise ConfigError("safety.threshold", f"must be finite, got {safety.threshold!r}")
    if safety.method not in METHODS:
        raise ConfigError("safety.method", f"must be one of {METHODS}, got {safety.method!r}")
    if safety.cost_transform not in COST_TRANSFORMS:
        raise ConfigError("safety.cost_transform", f"must be one of {COST_TRANSFORMS}, got {safety.cost_transform!r}")
    if safety.cost_range is not None:
        bad = (len(safety.cost_range) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, float))
                                                  for v in safety.cost_range))
        if bad or not safety.cost_range[0] < safety.cost_range[1]:
            raise ConfigError("safety.cost_range", f"must be [a, b] with a < b, got {safety.cost_range!r}")
        safety.cost_range = [float(v) for v in safety.cost_range]
    if safety.method in ("hoeffding", "bernstein", "betting") and safety.cost_range is None:
        if safety.cost_transform in ("sigmoid", "unsafe_indicator"):
            safety.cost_range = [0.0, 1.0]
        else:
            raise ConfigError("safety.cost_range", f"method {safety.method!r} is exact only for costs in a known "
                                                   "range: set cost_range: [a, b], or cost_transform: sigmoid")
    if safety.method == "clopper_pearson" and safety.cost_transform != "unsafe_indicator":
        raise ConfigError("safety.method", "clopper_pearson works on 0/1 costs: set cost_transform: "
                                           "unsafe_indicator")
    _positive("safety.sigmoid_scale", safety.sigmoid_scale)
    _positive("safety.temperature", safety.temperature)
    if safety.top_p is not None and not 0.0 < safety.top_p <= 1.0:
        raise ConfigError("safety.top_p", f"must be in (0, 1], got {safety.top_p!r}")
    _at_least("safety.max_new_tokens", safety.max_new_tokens, 1)
    _at_least("safety.top_k", safety.top_k, 0)
    _at_least("safety.batch_size", safety.batch_size, 1)
    evaluation = EvaluationConfig(**_section(EvaluationConfig, "evaluation.",
                                             _mapping("evaluation", values.get("evaluation"))))
    _at_least("evaluation.samples_per_prompt", evaluation.samples_per_prompt, 1)
    sft = _sft_section(values.get("sft"), builtin, models)

    # reward / cost (ScoreTrainingConfig) -------------------------------------------------------------
    score_fields = {f.name for f in dataclasses.fields(ScoreTrainingConfig)}
    score_sections = {}
    for name in ("reward", "cost"):
        section = _section(ScoreTrainingConfig, f"{name}.", _mapping(name, values.get(name)),
                           refused=DERIVED_SCORE_KEYS)
        if name == "reward" and "cost_loss" in section:
            raise ConfigError("reward.cost_loss", "is a cost-model setting; put it in the cost section")
        section.setdefault("progress", top.get("progress", True))
        try:
            score_sections[name] = ScoreTrainingConfig(kind=name, **section)
            score_sections[name].validate()
        except (TypeError, ValueError) as error:
            raise _wrap(f"{name}.", "ScoreTrainingConfig", error, score_fields) from None

    # rl (SafeRLConfig) -------------------------------------------------------------------------------
    rl_values = dict(_mapping("rl", values.get("rl")))
    rl_fields = {f.name for f in dataclasses.fields(SafeRLConfig)}
    for name, why in DERIVED_RL_KEYS.items():
        if name in rl_values:
            raise ConfigError(f"rl.{name}", f"is set by the pipeline ({why}); remove it")
    _unknown("rl.", rl_values, rl_fields - set(DERIVED_RL_KEYS))
    if "delta" in rl_values:
        try:
            _delta("rl.delta", float(rl_values["delta"]))
        except (TypeError, ValueError):
            raise ConfigError("rl.delta", f"must be a number in (0, 1), got {rl_values['delta']!r}") from None
    if "cost_threshold" not in rl_values:
        if safety.cost_transform != "none":
            raise ConfigError("rl.cost_threshold", f"is required with safety.cost_transform: {safety.cost_transform} "
                                                   "(the trainer constrains raw costs; τ is on transformed costs)")
        rl_values["cost_threshold"] = safety.threshold
    rl_values.setdefault("delta", safety.delta)
    rl_values["output_dir"] = str(Path(str(top["output_dir"])).expanduser() / "rl")
    rl_values.setdefault("progress", top.get("progress", True))
    if "device" not in rl_values and models.device is not None:
        rl_values["device"] = models.device
    try:
        rl = SafeRLConfig.from_dict(rl_values)
    except (TypeError, ValueError) as error:
        raise _wrap("rl.", "SafeRLConfig", error, rl_fields) from None

    config = PipelineConfig(**top, data=data, models=models, reward=score_sections["reward"],
                            cost=score_sections["cost"], rl=rl, safety=safety, sft=sft, evaluation=evaluation)
    config.source = source
    return config


def _sft_section(value, builtin: bool, models: ModelsConfig) -> SFTConfig | None:
    """The ``sft`` section (None when absent or null): keys, types, ranges and the data file checked."""
    if value is None:
        return None
    sft = SFTConfig(**_section(SFTConfig, "sft.", _mapping("sft", value)))
    if sft.path is None:
        if not builtin:
            raise ConfigError("sft.path", "is required (the SFT data: JSON Lines of prompt/response or text rows); "
                                          "only the built-in task has a default")
    else:
        if not sft.path.strip():
            raise ConfigError("sft.path", "must not be empty")
        path = Path(sft.path).expanduser()
        if not path.is_file():
            raise ConfigError("sft.path", f"path {sft.path!r} does not exist or is not a file")
        from hcrlhf.train.rl_trainer import read_lm_rows

        try:
            read_lm_rows(path, name="sft.path")
        except (ValueError, UnicodeDecodeError) as error:
            raise ConfigError("sft.path", str(error)) from None
    _at_least("sft.steps", sft.steps, 1)
    _at_least("sft.batch_size", sft.batch_size, 1)
    _positive("sft.learning_rate", sft.learning_rate)
    if not (math.isfinite(sft.weight_decay) and sft.weight_decay >= 0):
        raise ConfigError("sft.weight_decay", f"must be a finite number >= 0, got {sft.weight_decay!r}")
    _positive("sft.max_grad_norm", sft.max_grad_norm)
    _at_least("sft.max_length", sft.max_length, 2)
    _at_least("sft.micro_batch_tokens", sft.micro_batch_tokens, 1)
    _at_least("sft.seed", sft.seed, 0)
    if models.reference is not None:
        raise ConfigError("models.reference", "with an sft section the KL reference is the SFT policy; remove "
                                              "models.reference (or the sft section)")
    return sft


def read_config_file(path) -> dict:
    """The mapping in a YAML config file (not yet checked; see :func:`config_from_dict`)."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError("<file>", f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as error:
        raise ConfigError("<file>", f"{path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError("<root>", f"{path} must hold one mapping of settings, got {type(values).__name__}")
    return values


def load_config(path_or_mapping) -> PipelineConfig:
    """A :class:`PipelineConfig` from a YAML file, a mapping, or a PipelineConfig (returned as is).

    Raises:
        ConfigError: a bad key (named), an unreadable file, or YAML that is not one mapping.
    """
    if isinstance(path_or_mapping, PipelineConfig):
        return path_or_mapping
    if isinstance(path_or_mapping, dict):
        return config_from_dict(path_or_mapping)
    return config_from_dict(read_config_file(path_or_mapping))
