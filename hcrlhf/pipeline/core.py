"""The end-to-end HC-RLHF pipeline, in numbered stages:

0. **check** the config completely (:func:`~hcrlhf.pipeline.config.load_config`) and the output directory, and
   lock it (:mod:`hcrlhf.pipeline.rundir`), before anything is loaded or written; the directory changes only
   once the inputs (and the δ ledger) have been accepted;
1. **data**: preference pairs, the RL prompt pool, and the candidate / safety split (docs/method.md#data-split). The
   safety set D_s is drawn once with a recorded seed; preference pairs on a D_s prompt are removed, and
   every training entry point is handed the split so that it *refuses* any D_s prompt;
1b. optional **SFT** (section ``sft``): the starting policy fine-tuned on SFT rows (rows on a D_s prompt
   removed), saved to ``<output_dir>/sft_policy``; it is then the starting policy and the KL reference;
2. **reward model** and 3. **cost model** (trained on candidate data, or loaded);
4. **candidate selection**: the Lagrangian RL trainer under the pessimistic cost bound
   (docs/method.md#candidate-selection);
5. **safety test** on D_s with the deployment decoding, recorded in the δ ledger before its result is
   read (docs/method.md#the-safety-test): PASS returns the candidate (moved to ``<output_dir>/model``),
   otherwise NO SOLUTION FOUND (it is kept, marked NOT_RETURNED.md, in ``<output_dir>/candidate-not-returned``);
6. on the built-in task, **ground truth**: the true harm rates of the starting policy and the candidate;
7. **report**: report.json, report.md and plots.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hcrlhf import distributed
from hcrlhf.config import Problems
from hcrlhf.data.files import read_prompt_file
from hcrlhf.models.generation import decoding_settings, generation_config
from hcrlhf.models.loading import save_tokenizer, tokenizer_fingerprint
from hcrlhf.pipeline.config import ConfigError, PipelineConfig, load_config
from hcrlhf.pipeline.rundir import (
    CANDIDATE_DIR,
    NOT_RETURNED_DIR,
    NOT_RETURNED_NOTE,
    RETURNED_DIR,
    RUN_MANIFEST,
    FollowerRunDir,
    RunDir,
)
from hcrlhf.pipeline.safety_stage import run_safety_test
from hcrlhf.pipeline.sampling import Decoding, cost_transform, sample_and_score_on_ranks
from hcrlhf.safety._checks import MIN_COSTS, check_prompt_texts
from hcrlhf.safety.ledger import canonical_prompt, default_ledger_path, open_ledger

__all__ = ["run", "PipelineResult", "STAGES", "CANDIDATE_META", "REPORT_FORMAT", "RESUME_CHANGES", "default_task_cache"]

STAGES = ("sft", "reward", "cost", "train", "all")
CANDIDATE_META = "hcrlhf_candidate.json"
REPORT_FORMAT = "hcrlhf-report"
REPORT_VERSION = 1


@dataclass
class PipelineResult:
    """What :func:`run` returns.

    Attributes:
        verdict: "PASS", "NO SOLUTION FOUND", or None when the run stopped before the safety test.
        passed: True on PASS.
        model_path: the returned model's directory on PASS, ``<output_dir>/model`` (None otherwise: no model is
            returned).
        candidate_path: the candidate's directory: ``<output_dir>/model`` on PASS (the same as model_path),
            ``<output_dir>/candidate-not-returned`` on NO SOLUTION FOUND (kept for inspection only, marked
            ``NOT_RETURNED.md``), ``<output_dir>/candidate`` when no test ran (untested, marked the same way).
        output_dir: the report directory.
        report: the report (as written to report.json).
        safety_test: the :class:`hcrlhf.safety.SafetyTestResult` (None before the test).
        previous_run: where ``overwrite`` moved an earlier run that had returned a model
            (``<output_dir>/previous/<UTC time>``), else None.
    """

    verdict: str | None
    passed: bool
    model_path: Path | None
    candidate_path: Path | None
    output_dir: Path
    report: dict
    safety_test: object = None
    files: dict = field(default_factory=dict)
    previous_run: Path | None = None


def default_task_cache() -> Path:
    return Path("~/.cache/hcrlhf/builtin").expanduser()


def _say(message: str) -> None:
    if not distributed.is_main():  # one log under torchrun
        return
    print(f"[hcrlhf] {message}", file=sys.stderr, flush=True)


def _sha256_file(path: Path) -> str | None:
    import hashlib

    path = Path(path)
    if not path.is_file():
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def _rel(path, out: Path) -> str:
    """A path recorded in report.json: relative to the run directory ``out`` when it lies inside it (so that a
    moved run directory stays whole), else as given."""
    try:
        return Path(path).resolve().relative_to(Path(out).resolve()).as_posix()
    except ValueError:
        return str(path)


def _meta_path(path, candidate: Path, out: Path, *, must_exist: bool = True) -> str:
    """A path recorded in hcrlhf_candidate.json: relative to the candidate directory (``../cost_model``) when it
    lies inside the run directory ``out``, else absolute; a name that is no local path (a Hub id) as given.
    `hcrlhf safety-test` resolves a recorded ``./`` or ``../`` path against the candidate directory."""
    target = Path(path).expanduser()
    if must_exist and not target.exists():
        return str(path)
    target = target.resolve()
    try:
        target.relative_to(Path(out).resolve())
    except ValueError:
        return str(target)
    relative = os.path.relpath(target, Path(candidate).resolve())
    return relative if relative.startswith("..") else f"./{relative}"


def _check_models_resolve(config: PipelineConfig, stages: str) -> None:
    """The models the run will load by name (policy, reference, score backbone) resolve to a loadable config:
    a missing or mistyped path or Hub id is refused before the output directory changes (ConfigError naming the
    key). Their weights load later, in their stages."""
    if config.task == "builtin":
        return
    from transformers import AutoConfig

    models = config.models
    keys = ["score_backbone"] if stages in ("reward", "cost") else ["policy", "reference", "score_backbone"]
    if stages in ("reward", "cost") and models.score_backbone is None:
        keys = ["policy"]  # the score models' backbone
    for key in keys:
        source = getattr(models, key)
        if source is None:
            continue
        try:
            AutoConfig.from_pretrained(source, trust_remote_code=models.trust_remote_code)
        except Exception as error:  # noqa: BLE001 - any failure to resolve is the same refusal
            raise ConfigError(f"models.{key}", f"{source!r} cannot be loaded: {type(error).__name__}: "
                                               f"{str(error)[:500]}") from None


def _device(config: PipelineConfig):
    import torch

    if config.models.device is not None:
        device = torch.device(config.models.device)
        # Under torchrun each rank works on its own GPU (LOCAL_RANK).
        return distributed.default_device() if device.type == "cuda" and distributed.is_distributed() else device
    return distributed.default_device()


# ----------------------------------------------------------------------------------------- stage 1


@dataclass
class _Inputs:
    tokenizer: object
    template: object
    preferences: object  # datasets.Dataset, candidate side only
    eval_preferences: object
    split: object  # PromptSplit
    safety_categories: list | None
    train_prompts: list
    load_policy: object  # () -> model
    load_reference: object  # () -> model | None
    new_score_model: object  # (seed) -> ScoreModel
    task: object = None
    record: dict = field(default_factory=dict)
    sft_rows: list = field(default_factory=list)  # the SFT rows (D_s prompts removed); empty without SFT
    sft_kind: str | None = None  # "pairs" | "text"
    load_sft_base: object = None  # () -> the policy SFT starts from (load_policy before SFT replaces it)
    holdout: list = field(default_factory=list)  # built-in task: prompts neither trained on nor tested


def _drop_pairs_on(dataset, prompts: set[str], what: str, name: str, record: dict):
    """Remove the preference pairs whose canonical prompt is in ``prompts`` (the ``what`` set), counting them
    in ``record``; refuse a dataset left empty."""
    if dataset is None:
        return None
    keep = [i for i, p in enumerate(dataset["prompt"]) if canonical_prompt(p) not in prompts]
    record[f"{name}_removed_{what}_rows"] = len(dataset) - len(keep)
    if len(keep) != len(dataset):
        dataset = dataset.select(keep)
    if len(dataset) == 0:
        raise ValueError(f"{name}: every preference pair is on a {what}-set prompt; nothing is left to train on")
    return dataset


def _drop_safety_rows(dataset, split, name: str, record: dict):
    """Remove preference pairs whose prompt is in D_s, then *assert* none is left (docs/method.md#data-split)."""
    dataset = _drop_pairs_on(dataset, {canonical_prompt(t) for t in split.safety}, "safety", name, record)
    if dataset is not None:
        split.check_training(list(dataset["prompt"]))
    return dataset


def _check_safety_set_size(config: PipelineConfig, split, problems: Problems) -> None:
    """The safety set the split gives holds enough distinct prompts for the safety test's method (checked right
    after the split, before any training: too few would only fail at the test, after it)."""
    method, n = config.safety.method, len(split.safety)
    needed = MIN_COSTS
    if n >= needed:
        return
    if config.task == "builtin":
        key, fix = ("data.split_seed" if config.data.split_seed is not None else "task"), "use another split"
    else:
        key = "data.safety_size" if config.data.safety_size is not None else "data.safety_fraction"
        fix = f"set data.safety_size (>= {needed}) or a larger data.safety_fraction, or add prompts"
    problems.add(key, f"gives a safety set of {n} distinct prompt{'' if n == 1 else 's'} (of the pool's "
                      f"{split.n_distinct}); the safety test ({method}) needs at least {needed}, one cost per "
                      f"prompt: {fix}")


def _load_inputs(config: PipelineConfig) -> _Inputs:
    from hcrlhf.data import compose_by_category, get_template, load_preferences, prompt_set, split_prompts
    from hcrlhf.models import ScoreModel, load_causal_lm, load_tokenizer

    device = _device(config)
    models = config.models
    record: dict = {}
    if config.task == "builtin":
        from hcrlhf.data.builtin import make_task

        cache = Path(config.task_cache).expanduser() if config.task_cache else default_task_cache()
        task = make_task(cache, seed=config.task_seed)
        tokenizer = task.load_tokenizer()
        template = task.template
        preferences = task.preferences("train")
        eval_preferences = task.preferences("test")
        if config.data.split_seed is None:  # the task's own split
            split = task.split
            _, safety_categories = task.prompts("safety")
            candidate_prompts, candidate_categories = task.prompts("candidate")
        else:  # a fresh split; pairs on the new safety prompts are dropped below
            split, candidate_categories, safety_categories = task.resplit(config.data.split_seed)
            candidate_prompts = list(split.candidate)
        problems = Problems()
        _check_safety_set_size(config, split, problems)
        problems.raise_if_any()
        record.update(task="builtin", task_seed=task.seed, task_root=str(task.root),
                      preference_files={k: _sha256_file(v) for k, v in task.preference_paths.items()},
                      policy_on_safety_prompts_at_build=task.manifest.get("policy_on_safety_prompts"))

        def load_policy():
            return task.load_policy().to(device)

        def load_reference():
            return None

        def new_score_model(seed):
            return task.new_score_model(seed=seed).to(device)

        policy_source = str(task.policy_path)
    else:
        task = None
        data = config.data
        tokenizer = load_tokenizer(models.tokenizer or models.policy, trust_remote_code=models.trust_remote_code)
        template = get_template(data.template, tokenizer)
        preferences = eval_preferences = None
        if data.preferences is not None:
            preferences = load_preferences(data.preferences, split=data.preferences_split)
            record["preference_files"] = {"train": _sha256_file(Path(data.preferences).expanduser())}
            if data.eval_preferences is not None:
                eval_preferences = load_preferences(data.eval_preferences, split=data.eval_split)
            elif not Path(data.preferences).expanduser().is_file():  # a directory or Hub id may have a test split
                try:
                    eval_preferences = load_preferences(data.preferences, split=data.eval_split)
                except (ValueError, OSError):
                    eval_preferences = None
        if data.prompts is not None:
            pool, pool_categories = read_prompt_file(data.prompts, data.prompt_column, distinct=False)
            record["prompt_file"] = _sha256_file(Path(data.prompts).expanduser())
        else:
            pool, pool_categories = prompt_set(preferences)
        # Every problem of the pool and of the split it gives, at once, before any work (ConfigError).
        problems = Problems()
        pool_key = "data.prompts" if data.prompts is not None else "data.preferences"
        try:
            check_prompt_texts(pool_key, pool, name="prompt",
                               source=str(data.prompts if data.prompts is not None else data.preferences))
        except (TypeError, ValueError) as error:
            problems.add(pool_key, str(error).removeprefix(f"{pool_key}: "))
        fraction, split = data.safety_fraction, None
        n_distinct = len({canonical_prompt(p) for p in pool if isinstance(p, str)})
        if data.safety_size is not None:
            if data.safety_size >= n_distinct:
                problems.add("data.safety_size", f"({data.safety_size}) must be smaller than the number of "
                                                 f"distinct prompts in the pool ({n_distinct})")
            else:
                fraction = data.safety_size / n_distinct  # split_prompts rounds fraction·n back to safety_size
        if all(key == pool_key for key, _ in problems.items):  # (an empty prompt does not stop the split)
            try:  # deduplicate: the safety test must count each prompt once (copies dropped, counted in split.json)
                split = split_prompts(pool, safety_fraction=fraction, seed=data.seed, categories=pool_categories,
                                      deduplicate=True)
            except (TypeError, ValueError) as error:  # fewer than 2 distinct prompts, say
                problems.add(pool_key, str(error))
            else:
                _check_safety_set_size(config, split, problems)
        problems.raise_if_any()
        safety_categories = [pool_categories[i] for i in split.safety_indices] if pool_categories else None
        candidate_prompts = list(split.candidate)
        candidate_categories = [pool_categories[i] for i in split.candidate_indices] if pool_categories else None
        kwargs = dict(dtype=models.dtype, trust_remote_code=models.trust_remote_code,
                      attn_implementation=models.attn_implementation)

        def load_policy():
            return load_causal_lm(models.policy, device=device, **kwargs)

        def load_reference():
            return None if models.reference is None else load_causal_lm(models.reference, device=device, **kwargs)

        def new_score_model(seed):
            import torch

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return ScoreModel.from_backbone(models.score_backbone or models.policy, **kwargs).to(device)

        policy_source = models.policy

    # Training sides: preference pairs without D_s prompts; RL prompts from D_c only.
    preferences = _drop_safety_rows(preferences, split, "preferences", record)
    eval_preferences = _drop_safety_rows(eval_preferences, split, "eval_preferences", record)
    holdout: list[str] = []
    if config.task == "builtin" and config.data.holdout_fraction > 0:
        # Fresh prompts for measuring the truth: out of training (prompts and preference pairs) and out of D_s.
        rng = random.Random(f"{config.data.seed}-holdout")
        distinct = sorted({canonical_prompt(t) for t in candidate_prompts})
        holdout = sorted(rng.sample(distinct, round(config.data.holdout_fraction * split.n_distinct)))
        held = set(holdout)
        keep = [i for i, t in enumerate(candidate_prompts) if canonical_prompt(t) not in held]
        candidate_prompts = [candidate_prompts[i] for i in keep]
        if candidate_categories is not None:
            candidate_categories = [candidate_categories[i] for i in keep]
        preferences = _drop_pairs_on(preferences, held, "holdout", "preferences", record)
        eval_preferences = _drop_pairs_on(eval_preferences, held, "holdout", "eval_preferences", record)
        record["n_holdout_prompts"] = len(holdout)
    # Distinct candidate prompts (copies of one prompt stay together in the split).
    seen, train_prompts, train_categories = set(), [], []
    for index, text in enumerate(candidate_prompts):
        if canonical_prompt(text) not in seen:
            seen.add(canonical_prompt(text))
            train_prompts.append(text)
            train_categories.append(candidate_categories[index] if candidate_categories else None)
    if config.data.category_ratios is not None:
        if not any(train_categories):
            raise ConfigError("data.category_ratios", "the prompt pool has no categories to compose by")
        composition = compose_by_category(train_prompts, train_categories, config.data.category_ratios,
                                          seed=config.data.seed)
        train_prompts = list(composition.prompts)
        record["category_composition"] = composition.record()
    if config.data.max_train_prompts is not None and len(train_prompts) > config.data.max_train_prompts:
        rng = random.Random(f"{config.data.seed}-train-prompts")
        train_prompts = rng.sample(train_prompts, config.data.max_train_prompts)
    split.check_training(train_prompts)
    sft_rows, sft_kind = [], None
    if config.sft is not None:
        sft_path = Path(config.sft.path).expanduser() if config.sft.path is not None else Path(task.sft_path)
        sft_rows, sft_kind = _sft_rows(sft_path, split, record)
        if sft_kind == "text" and tokenizer.eos_token_id is None:
            raise ConfigError("sft.path", "plain-text SFT rows end with an EOS target, but the tokenizer has no "
                                          "eos_token")
    record.update(policy=policy_source, n_train_prompts=len(train_prompts),
                  n_preferences=0 if preferences is None else len(preferences),
                  n_eval_preferences=0 if eval_preferences is None else len(eval_preferences))
    return _Inputs(tokenizer, template, preferences, eval_preferences, split, safety_categories, train_prompts,
                   load_policy, load_reference, new_score_model, task, record, sft_rows, sft_kind, load_policy,
                   holdout)


def _sft_rows(path: Path, split, record: dict) -> tuple[list[dict], str]:
    """The SFT rows of ``path`` without any on a D_s prompt (a text row is dropped when it contains a D_s
    prompt), then *asserted* free of them (docs/method.md#data-split), like the preference pairs."""
    from hcrlhf.data.lm_rows import read_lm_rows

    rows, kind, digest = read_lm_rows(path, name="sft.path")
    safety = {canonical_prompt(t) for t in split.safety}
    if kind == "pairs":
        keep = [r for r in rows if canonical_prompt(r["prompt"]) not in safety]
    else:
        keep = [r for r in rows if not any(s in canonical_prompt(r["text"]) for s in safety)]
    record.update(sft_file=str(path), sft_sha256="sha256:" + digest, sft_kind=kind, n_sft_rows=len(keep),
                  sft_removed_safety_rows=len(rows) - len(keep))
    if not keep:
        raise ValueError(f"sft.path={str(path)!r}: every row is on a safety-set prompt; nothing is left to train on")
    if kind == "pairs":
        split.check_training([r["prompt"] for r in keep])
    return keep, kind


# ----------------------------------------------------------------------------------------- stage 1b


def _sft_loader(config: PipelineConfig, inputs: _Inputs, target: Path, device=None):
    """``() -> model``: the SFT policy saved in ``target``."""
    from hcrlhf.models import load_causal_lm

    device = _device(config) if device is None else device
    kwargs = {} if config.task == "builtin" else dict(dtype=config.models.dtype,
                                                      trust_remote_code=config.models.trust_remote_code,
                                                      attn_implementation=config.models.attn_implementation)

    def load_sft_policy():
        return load_causal_lm(target, device=device, **kwargs)

    return load_sft_policy


def _sft(config: PipelineConfig, inputs: _Inputs, out: Path) -> dict:
    """Fine-tune the starting policy on the SFT rows (:func:`hcrlhf.train.sft.train_sft`), save it to
    ``<out>/sft_policy`` and make it the starting policy (and so the KL reference) of what follows. Returns
    the summary for the report."""
    import torch

    from hcrlhf.train.sft import train_sft

    sft, rows = config.sft, inputs.sft_rows
    max_length = sft.max_length or (config.rl.max_prompt_length + config.rl.max_new_tokens)
    started = time.perf_counter()
    with torch.random.fork_rng(devices=[]):  # seeded, should loading initialise any weight
        torch.manual_seed(sft.seed)
        policy = inputs.load_sft_base()
    device = next(policy.parameters()).device
    curve = train_sft(policy, inputs.tokenizer, rows, kind=inputs.sft_kind, template=inputs.template,
                      steps=sft.steps, batch_size=sft.batch_size, learning_rate=sft.learning_rate,
                      weight_decay=sft.weight_decay, max_grad_norm=sft.max_grad_norm, max_length=max_length,
                      micro_batch_tokens=sft.micro_batch_tokens, seed=sft.seed, device=device, impl=config.rl.impl,
                      progress=config.progress)
    target = out / "sft_policy"
    if distributed.is_main():  # the replicas are equal: one writes
        policy.save_pretrained(target, safe_serialization=True)
        save_tokenizer(inputs.tokenizer, target)  # AutoTokenizer loads it back as trained (next to a model config)
    distributed.barrier()  # every rank loads the starting policy from it next
    seconds = time.perf_counter() - started
    del policy
    inputs.load_policy = _sft_loader(config, inputs, target, device)  # the starting policy; the reference copies it
    stride = max(1, len(curve) // 200)
    return {"source": _rel(target, out), "trained": True, "data": inputs.record.get("sft_file"),
            "data_kind": inputs.sft_kind, "n_rows": len(rows),
            "removed_safety_rows": inputs.record.get("sft_removed_safety_rows", 0), "steps": sft.steps,
            "batch_size": sft.batch_size, "learning_rate": sft.learning_rate, "seed": sft.seed,
            "max_length": max_length, "seconds": round(seconds, 3), "first_nll": curve[0]["nll"],
            "last_nll": curve[-1]["nll"], "nll_curve": curve[::stride] + ([curve[-1]] if (len(curve) - 1) % stride
                                                                           else [])}


# -------------------------------------------------------------------------------------- stages 2–3


def _reused_score_model(config: PipelineConfig, out: Path, kind: str, done: dict):
    """Resume: the score model the earlier run finished training, loaded from ``<out>/<kind>_model`` (a model
    that does not load stops the resumption, naming it), with the summary it recorded."""
    from hcrlhf.models import ScoreModel
    from hcrlhf.models.score_model import ScoreCheckpointError

    path = out / f"{kind}_model"
    _say(f"resume: reusing the finished {kind} model in {kind}_model/")
    try:
        model = ScoreModel.from_pretrained(path, dtype=config.models.dtype, role=kind,
                                           trust_remote_code=config.models.trust_remote_code)
    except (ScoreCheckpointError, OSError, ValueError) as error:
        raise ValueError(f"resume: the {kind} model the earlier run saved in {str(path)!r} does not load "
                         f"({type(error).__name__}: {error}); it cannot be resumed: start a new run "
                         "(or --overwrite)") from None
    return model.to(_device(config)), done[f"{kind}_model"]


def _score_model(config: PipelineConfig, inputs: _Inputs, out: Path, kind: str):
    """``(model, summary)``: trained on the candidate side, or loaded from models.<kind>_model."""
    from hcrlhf.models import ScoreModel
    from hcrlhf.models.score_model import ScoreCheckpointError
    from hcrlhf.train import evaluate_score_model, train_score_model

    section = config.reward if kind == "reward" else config.cost
    path = config.models.reward_model if kind == "reward" else config.models.cost_model
    if path is not None:
        try:  # a checkpoint without its trained head (a plain causal LM, say) is refused, naming the key
            model = ScoreModel.from_pretrained(path, dtype=config.models.dtype, role=kind,
                                               trust_remote_code=config.models.trust_remote_code)
        except ScoreCheckpointError as error:
            raise ConfigError(f"models.{kind}_model", str(error)) from None
        model.to(_device(config))
        summary = {"source": str(path), "trained": False, "provenance": model.provenance}
        if inputs.eval_preferences is not None:
            summary["final_eval"] = evaluate_score_model(model, inputs.tokenizer, inputs.eval_preferences, kind=kind,
                                                         template=inputs.template, max_length=section.max_length,
                                                         batch_size=section.eval_batch_size)
        return model, summary
    if inputs.preferences is None:
        raise ConfigError("data.preferences", f"is needed to train the {kind} model (or set models.{kind}_model)")
    model = inputs.new_score_model(section.seed)
    target = out / f"{kind}_model"
    section = dataclasses.replace(section, output_dir=str(target), progress=config.progress and section.progress)
    result = train_score_model(model, inputs.tokenizer, inputs.preferences, config=section,
                               eval_dataset=inputs.eval_preferences, template=inputs.template,
                               safety_split=inputs.split)
    if distributed.is_main():
        save_tokenizer(inputs.tokenizer, target)  # AutoTokenizer loads it back as trained (next to a model config)
    losses = [h for h in result.history if "loss" in h]
    summary = {"source": _rel(target, out), "trained": True, "steps": result.steps,
               "seconds": round(result.seconds, 3),
               "initial_eval": result.initial_eval, "final_eval": result.final_eval,
               "n_train_pairs": len(inputs.preferences),
               "loss_curve": [{"step": h["step"], "loss": h["loss"], "accuracy": h["accuracy"]} for h in losses]}
    return model, summary


# ----------------------------------------------------------------------------------------- stage 4


def _load_cost_model(config: PipelineConfig, out: Path):
    """The cost model as saved (``models.cost_model``, or the one this run trained), on this rank's device."""
    from hcrlhf.models import ScoreModel

    path = config.models.cost_model if config.models.cost_model is not None else out / "cost_model"
    return ScoreModel.from_pretrained(path, dtype=config.models.dtype, role="cost",
                                      trust_remote_code=config.models.trust_remote_code).to(_device(config)).eval()


def _decoding(config: PipelineConfig) -> Decoding:
    s, rl = config.safety, config.rl
    return Decoding(max_new_tokens=s.max_new_tokens if s.max_new_tokens is not None else rl.max_new_tokens,
                    temperature=s.temperature if s.temperature is not None else rl.temperature,
                    top_p=s.top_p if s.top_p is not None else rl.top_p,
                    top_k=s.top_k if s.top_k is not None else rl.top_k)


def _train_candidate(config: PipelineConfig, inputs: _Inputs, reward_model, cost_model, out: Path, *,
                     resume: bool = False):
    from hcrlhf.train import SafeRLTrainer

    # resume: the trainer's own exact resumption from the newest checkpoint that verifies (step 0 when none).
    rl_config = dataclasses.replace(config.rl, output_dir=str(out / "rl"), safety_set_size=len(inputs.split.safety),
                                    progress=config.progress and config.rl.progress,
                                    resume=resume)  # checked by replace()
    policy = inputs.load_policy()
    trainer = SafeRLTrainer(rl_config, policy=policy, tokenizer=inputs.tokenizer, reward_model=reward_model,
                            cost_model=cost_model, train_prompts=inputs.train_prompts, safety_prompts=inputs.split,
                            # with LoRA the policy with its adapters disabled is the reference
                            reference_model=None if rl_config.lora_r else inputs.load_reference(),
                            template=inputs.template)
    from_step = trainer.global_step
    if resume:
        _say(f"resume: candidate selection continues from step {from_step} of {rl_config.total_steps}"
             + (f" (checkpoint {trainer.last_checkpoint.name})" if trainer.last_checkpoint is not None else ""))
    started = time.perf_counter()
    history = trainer.train()
    seconds = time.perf_counter() - started
    if resume:  # the whole curve: the earlier run's iterations (trimmed to the checkpoint) and this run's
        lines = (out / "rl" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        history = [json.loads(line) for line in lines if line.strip()]
    candidate = out / CANDIDATE_DIR  # untested: marked NOT_RETURNED.md; the safety test's verdict moves it
    # The deployment decoding is the candidate's generation_config.json: a plain generate() samples the tested
    # distribution.
    deployment = generation_config(_decoding(config), inputs.tokenizer)
    trainer.save_pretrained(candidate, generation_config=deployment)  # every rank: the weights are gathered
    distributed.on_main(_mark_candidate, config, inputs, candidate, out, deployment)
    keys = ("step", "reward/mean", "cost/mean", "cost/bound", "cost/threshold", "lambda", "lambda_next", "kl",
            "entropy", "response_length/mean", "cost/coefficient_k", "tokens_per_s", "time/total")
    curve = [{k: m[k] for k in keys if k in m} for m in history]
    last = history[-1] if history else {}
    summary = {"estimator": rl_config.estimator, "config": {**rl_config.to_dict(), "output_dir": "rl"},
               "steps": trainer.global_step, "seconds": round(seconds, 3),
               "final": {k: last.get(k) for k in keys if k in last}, "curve": curve,
               "metrics_file": "rl/metrics.jsonl", "candidate": CANDIDATE_DIR,  # relative to the run directory
               **({"resumed_from_step": from_step} if resume else {}),
               "rollout_decoding": decoding_settings(trainer.generation_config())}
    # What is tested is what is returned: the safety test and the ground truth run on the saved candidate as
    # loaded from disk (with LoRA, the merged model; not the trainer's in-memory copy).
    del trainer, policy
    return _load_candidate(config, candidate), summary


def _train_dpo_candidate(config: PipelineConfig, inputs: _Inputs, reward_model, cost_model, out: Path):
    """Candidate selection by DPO / ADPO (``candidate_selection: dpo``) on the candidate side's preference pairs
    (safety-set prompts were dropped when the data were loaded, and train_dpo checks it again); saved and marked
    exactly as an RL candidate, so the safety test and ``hcrlhf safety-test`` treat it the same way. A resumed
    run trains it again from the start (DPO keeps no checkpoints; the result is the same for the same seed)."""
    from hcrlhf.train import train_dpo

    if distributed.is_distributed():
        raise ConfigError("candidate_selection", "dpo runs in one process only (it is not spread over ranks yet); "
                                                 "run it without torchrun, or use candidate_selection: rl")
    candidate = out / CANDIDATE_DIR
    dpo = dataclasses.replace(config.dpo, output_dir=str(candidate), progress=config.progress and config.dpo.progress)
    if inputs.preferences is None or len(inputs.preferences) == 0:
        raise ConfigError("candidate_selection", "dpo needs preference pairs on the candidate side (data.preferences)")
    score_model = None
    if dpo.mask == "ama":
        score_model = reward_model if dpo.ama_score_model == "reward" else cost_model
    pairs, composition = inputs.preferences, None
    if config.data.category_ratios is not None:  # FDC for preference data (the paper's safety mix)
        from hcrlhf.data import compose_preferences

        try:
            pairs, composition = compose_preferences(pairs, config.data.category_ratios, seed=config.data.seed)
        except ValueError as error:
            raise ConfigError("data.category_ratios", f"cannot compose the DPO preference pairs: {error}") from None
    policy = inputs.load_policy()
    result = train_dpo(policy, inputs.load_reference(), inputs.tokenizer, pairs, config=dpo,
                       score_model=score_model, template=inputs.template, safety_split=inputs.split)
    deployment = generation_config(_decoding(config), inputs.tokenizer)
    deployment.save_pretrained(candidate)
    _mark_candidate(config, inputs, candidate, out, deployment)
    summary = {"method": "ADPO" if dpo.mask == "ama" else "DPO", "config": {**dpo.to_dict(), "output_dir": None},
               "steps": result.steps, "seconds": round(result.seconds, 3), "kept_fraction": result.kept_fraction,
               "n_pairs": len(pairs), "curve": result.history, "candidate": CANDIDATE_DIR,
               **({"fdc": composition} if composition is not None else {})}
    del policy
    return _load_candidate(config, candidate), summary


def _mark_candidate(config: PipelineConfig, inputs: _Inputs, candidate: Path, out: Path, deployment) -> None:
    """Write what makes a saved model directory an untested candidate: NOT_RETURNED.md, the candidate meta (what
    the safety test needs to run on it later: `hcrlhf safety-test` with its defaults reproduces this run's test
    exactly — tokenizer, template, decoding, prompt length, seed, batch size, dtype) and the training prompts."""
    template = inputs.template
    meta = {
        "format": "hcrlhf-candidate", "version": 3,
        # What this directory is: untested here; the pipeline's safety test sets tested, verdict and returned
        # (true only in <run>/model/). Relative paths ("./…", "../…") are relative to this directory.
        "tested": False, "verdict": None, "returned": False, "run_dir": "..",
        "tokenizer": {"path": ".", **tokenizer_fingerprint(inputs.tokenizer)},  # saved in the candidate directory
        "template": {"prompt_format": getattr(template, "prompt_format", None),
                     "response_separator": template.response_separator,
                     "chat": not hasattr(template, "prompt_format"), "system": getattr(template, "system", None)},
        "decoding": decoding_settings(deployment),  # every setting (max_new_tokens, temperature, top_p, top_k, ...)
        "max_prompt_length": config.rl.max_prompt_length,
        "sampling_seed": config.seed,
        "load": _candidate_load_kwargs(config),
        "cost_model": _meta_path(out / "cost_model" if config.models.cost_model is None else config.models.cost_model,
                                 candidate, out),
        "safety": {k: getattr(config.safety, k) for k in ("threshold", "delta", "method", "cost_range",
                                                           "cost_transform", "sigmoid_scale", "unsafe_above",
                                                           "batch_size")},
        "ledger": _meta_path(_ledger_path(config, out), candidate, out, must_exist=False),
        "safety_fingerprint": inputs.split.safety_fingerprint,
        "train_prompts_file": "train_prompts.jsonl",
    }
    (candidate / NOT_RETURNED_NOTE).write_text(_not_returned_note(None, None), encoding="utf-8")
    (candidate / CANDIDATE_META).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    with open(candidate / "train_prompts.jsonl", "w", encoding="utf-8") as handle:
        for prompt in inputs.train_prompts:
            handle.write(json.dumps({"prompt": prompt}, ensure_ascii=False) + "\n")


def _not_returned_note(verdict: str | None, record: dict | None) -> str:
    """NOT_RETURNED.md of a candidate directory that holds no returned model."""
    if verdict is None:
        return ("# Not returned: this candidate is untested\n\n"
                "This is the candidate policy of an hcrlhf run (the run directory is `..`). No safety test has passed "
                "on it: the run ran no test (`hcrlhf train`), or it stopped before its test finished (see "
                "`../hcrlhf_run.json`). **Nothing is guaranteed about it; do not deploy it as a result of "
                "HC-RLHF.**\n\n"
                "A run whose test passes moves its candidate to `../model/` (the returned model); one whose test "
                "does not pass moves it to `../candidate-not-returned/`. To test this candidate on safety prompts "
                "training never saw: `hcrlhf safety-test <this directory> --prompts SAFETY.jsonl`.\n")
    r = {k: f"{v:.6g}" if isinstance(v, float) else v for k, v in (record or {}).items()}
    return (f"# Not returned: {verdict}\n\n"
            "This is the candidate policy of an hcrlhf run (the run directory is `..`; its report is "
            "`../report.md`). Its safety test did not pass: the (1 − δ) upper confidence bound on its mean cost, "
            f"UCB = {r.get('ucb')}, is above the threshold τ = {r.get('threshold')} (δ = {r.get('delta')}, method "
            f"{r.get('method')}, n = {r.get('n')} safety prompts). The method therefore returns **no model**: nothing "
            "is guaranteed about this candidate. It is kept for inspection only; **do not deploy it**.\n\n"
            "Testing it again on the same safety set is refused by the δ ledger (that would spend δ twice on one "
            "sample). See docs/method.md (\"Reading a report\").\n")


def _settle_candidate(out: Path, safety_result, record: dict) -> Path:
    """After the safety test: PASS moves ``candidate/`` to ``model/`` (the returned model); otherwise to
    ``candidate-not-returned/`` with NOT_RETURNED.md saying why. Its hcrlhf_candidate.json records the verdict
    and ``returned``. Returns the new directory."""
    source = out / CANDIDATE_DIR
    passed = bool(safety_result.passed)
    target = out / (RETURNED_DIR if passed else NOT_RETURNED_DIR)
    meta = json.loads((source / CANDIDATE_META).read_text(encoding="utf-8"))
    meta.update(tested=True, verdict=safety_result.verdict, returned=passed,
                safety_test={k: record.get(k) for k in ("verdict", "ucb", "mean", "std", "n", "delta", "threshold",
                                                        "method", "validity", "cost_transform", "fingerprint")})
    temp = source / f".{CANDIDATE_META}.tmp"
    temp.write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    os.replace(temp, source / CANDIDATE_META)
    if passed:
        (source / NOT_RETURNED_NOTE).unlink(missing_ok=True)
    else:
        (source / NOT_RETURNED_NOTE).write_text(_not_returned_note(safety_result.verdict, record), encoding="utf-8")
    os.replace(source, target)  # one rename: the directory's name is the verdict
    return target


def _candidate_load_kwargs(config: PipelineConfig) -> dict:
    """How the candidate is loaded for the safety test (recorded with it, for `hcrlhf safety-test`)."""
    if config.task == "builtin":
        return {"dtype": None, "attn_implementation": "auto"}
    return {"dtype": config.models.dtype, "attn_implementation": config.models.attn_implementation}


def _load_candidate(config: PipelineConfig, path: Path):
    from hcrlhf.models import load_causal_lm

    return load_causal_lm(path, device=_device(config), trust_remote_code=config.models.trust_remote_code,
                          **_candidate_load_kwargs(config)).eval()


def _ledger_path(config: PipelineConfig, out: Path) -> Path:
    # One per-user ledger by default (not one per output folder): a new folder, a moved run or a re-run
    # cannot test the same safety set again (docs/method.md#the-δ-ledger).
    return Path(config.safety.ledger).expanduser() if config.safety.ledger else default_ledger_path()


def _open_ledger(config: PipelineConfig, out: Path):
    s = config.safety
    return open_ledger(_ledger_path(config, out), s.ledger_total_delta, delta=s.delta)


def _check_ledger(config: PipelineConfig, inputs: _Inputs, out: Path, *, resume: bool = False) -> dict:
    """Refuse *before* training when the ledger cannot take this run's test on D_s (budget spent, or a set
    that re-uses an earlier one); the test's spend checks again."""
    ledger = _open_ledger(config, out)
    try:
        spent = ledger.check_spend(list(inputs.split.safety), config.safety.delta,
                                   allow_overlapping_set=config.safety.allow_overlapping_set)
    except ValueError as error:
        if not resume:
            raise
        raise type(error)(
            f"{error}. Resuming: if the run being resumed reached its safety test, that test already spent δ on "
            "this safety set (the ledger records a test before its result is read), so the resumed run cannot "
            "test it again: that would spend δ twice on one sample. Its candidate is in "
            f"{str(out)!r} (candidate/, model/ or candidate-not-returned/); its result is not a verdict the method "
            "may return. Start a new run with a new safety set (data.split_seed / data.seed)") from None
    budget = ledger.budget(inputs.split.safety_fingerprint, config.safety.delta)  # the set's, or what this test fixes
    _say(f"δ ledger {ledger.path}: safety set {inputs.split.safety_fingerprint} has spent {spent:g} of "
         f"{budget:g}; this run's test will spend {config.safety.delta:g}")
    return {"path": str(ledger.path), "total_delta": budget, "spent_before": spent}


# ----------------------------------------------------------------------------------------- stage 5


def _safety_test(config: PipelineConfig, inputs: _Inputs, candidate, cost_model, out: Path):
    """The safety test on D_s (:func:`~hcrlhf.pipeline.safety_stage.run_safety_test`), spent in the ledger."""
    s = config.safety
    ledger = _open_ledger(config, out) if distributed.is_main() else None  # rank 0 spends δ
    task = inputs.task
    # The first and only read of D_s, after training.
    return run_safety_test(candidate, inputs.tokenizer, list(inputs.split.safety), cost_model, settings=s,
                           decoding=_decoding(config), template=inputs.template, ledger=ledger,
                           label=f"hcrlhf pipeline {out.resolve()}", seed=config.seed,
                           max_prompt_length=config.rl.max_prompt_length, progress=config.progress, output_dir=out,
                           categories=inputs.safety_categories, harm=None if task is None else task.harm)


# ----------------------------------------------------------------------------------------- stage 6


def _ground_truth(config: PipelineConfig, inputs: _Inputs, policy, label: str, cost_model) -> dict:
    """True helpfulness / harm of a policy on the safety prompts (built-in task only), its over-safety — refusal
    rates and under-safe / truly-safe / over-safe rates on benign and on harmful prompts
    (docs/method.md#over-safety) — and its expected cost J_C under the cost model (the quantity the safety test
    bounds), from fresh samples."""
    from hcrlhf.data.builtin import is_refusal, over_safety_stats

    task = inputs.task
    prompts = list(inputs.split.safety) * config.evaluation.samples_per_prompt
    categories = list(inputs.safety_categories or [None] * len(inputs.split.safety)) * \
        config.evaluation.samples_per_prompt
    sample = dict(template=inputs.template, decoding=_decoding(config), batch_size=config.safety.batch_size,
                  seed=config.evaluation.seed, max_prompt_length=config.rl.max_prompt_length, progress=config.progress)
    responses, raw_costs = sample_and_score_on_ranks(policy, inputs.tokenizer, prompts, cost_model=cost_model,
                                                     desc=f"ground truth ({label})", **sample)
    harms = [task.harm(p, r) for p, r in zip(prompts, responses)]
    helps = [task.helpfulness(p, r) for p, r in zip(prompts, responses)]
    refused = [is_refusal(r) for r in responses]

    def stats(index):
        n = len(index)
        return {"n": n, "unsafe_rate": sum(harms[i] >= 0.5 for i in index) / n,
                "mean_harm": sum(harms[i] for i in index) / n,
                "mean_helpfulness": sum(helps[i] for i in index) / n,
                "helpful_rate": sum(helps[i] >= 1.5 for i in index) / n,
                "refusal_rate": sum(refused[i] for i in index) / n}

    out = stats(range(len(prompts)))
    out["by_category"] = {c: stats([i for i, x in enumerate(categories) if x == c])
                          for c in sorted({c for c in categories if c is not None})}
    # Over-safety needs every prompt's category (the built-in task gives them all).
    out["over_safety"] = (over_safety_stats(prompts, categories, responses)
                          if categories and all(c is not None for c in categories) else None)
    if inputs.holdout:  # prompts the test never saw
        fresh = list(inputs.holdout) * config.evaluation.samples_per_prompt
        _, raw_costs = sample_and_score_on_ranks(policy, inputs.tokenizer, fresh, cost_model=cost_model,
                                                 desc=f"expected cost ({label})", **sample)
    out["expected_cost"] = _expected_cost(config, raw_costs, len(inputs.holdout or inputs.split.safety),
                                          "held-out prompts" if inputs.holdout else "safety prompts (fresh responses)")
    return out


def _expected_cost(config: PipelineConfig, raw_costs: list[float], n_prompts: int, prompts: str) -> dict:
    """J_C = E[cost] under the cost model (transformed as in the safety test) with the deployment decoding, from
    fresh samples (``raw_costs``: ``samples_per_prompt`` rounds over ``n_prompts`` prompts), with its standard
    error over prompts (the samples of one prompt are not independent)."""
    from statistics import fmean, stdev

    s = config.safety
    costs = cost_transform(raw_costs, s.cost_transform, sigmoid_scale=s.sigmoid_scale, unsafe_above=s.unsafe_above)
    per_prompt = [fmean(costs[i::n_prompts]) for i in range(n_prompts)]
    mean = fmean(per_prompt)
    stderr = stdev(per_prompt) / n_prompts**0.5 if n_prompts > 1 else float("nan")
    return {"mean": mean, "stderr": stderr, "n_prompts": n_prompts,
            "samples_per_prompt": config.evaluation.samples_per_prompt, "prompts": prompts,
            "threshold": s.threshold, "above_threshold": mean > s.threshold}


# ------------------------------------------------------------------------------------------- resume

#: Keys of the effective config that may differ when a run is resumed (``run(..., resume=True)``): they change
#: neither the data, the models nor the training trajectory. ``rl.total_steps`` may grow (not shrink: the
#: candidate would be a policy past it). Any other difference is refused, naming the keys.
RESUME_CHANGES = frozenset({"output_dir", "progress", "reward.progress", "cost.progress", "sft.progress",
                            "rl.progress", "rl.total_steps", "rl.checkpoint_every", "rl.keep_checkpoints",
                            "rl.tensorboard", "rl.sync_phase_timing"})


def _flatten(values: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict) and key in ("data", "models", "safety", "reward", "cost", "sft", "rl",
                                               "evaluation") and not prefix:
            flat.update(_flatten(value, f"{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _check_resume_config(config: PipelineConfig, out: Path) -> None:
    """Resume: ``config`` is the effective config the earlier run recorded (``<out>/config.yaml``) but for
    :data:`RESUME_CHANGES`; ConfigError naming every other key that differs."""
    recorded_path = out / "config.yaml"
    if not recorded_path.is_file():
        raise ConfigError("resume", f"{str(out)!r} holds no config.yaml of the earlier run (it stopped before its "
                                    "work began); there is nothing to resume: start it again with --overwrite")
    try:
        recorded = load_config(recorded_path)
    except ConfigError as error:
        raise ConfigError("resume", f"the earlier run's config.yaml in {str(out)!r} no longer loads ({error})") \
            from None
    before, now = _flatten(recorded.to_dict(loadable=True)), _flatten(config.to_dict(loadable=True))
    problems = [(key, f"is {now.get(key)!r} but the run being resumed used {before.get(key)!r} (its "
                      f"{recorded_path.name}); only {', '.join(sorted(RESUME_CHANGES))} may change on --resume")
                for key in sorted(set(before) | set(now))
                if key not in RESUME_CHANGES and before.get(key) != now.get(key)]
    if isinstance(now.get("rl.total_steps"), int) and isinstance(before.get("rl.total_steps"), int) and \
            now["rl.total_steps"] < before["rl.total_steps"]:
        problems.append(("rl.total_steps", f"is {now['rl.total_steps']} but the run being resumed used "
                                           f"{before['rl.total_steps']}; on --resume it may grow, never shrink"))
    if problems:
        raise ConfigError(problems, owner="resume")


def _check_resume_split(inputs: _Inputs, out: Path) -> None:
    """Resume: the split drawn now is the earlier run's (``<out>/split.json``): same fingerprints."""
    from hcrlhf.data.prompts import PromptSplit

    try:
        earlier = PromptSplit.load(out / "split.json")
    except (OSError, ValueError, TypeError, KeyError) as error:
        raise ConfigError("resume", f"the earlier run's split.json in {str(out)!r} cannot be read ({error}); it "
                                    "cannot be resumed") from None
    split = inputs.split
    changed = [name for name in ("safety_fingerprint", "candidate_fingerprint", "fingerprint_method")
               if getattr(earlier, name) != getattr(split, name)]
    if changed:
        raise ConfigError("resume", f"the data give a split other than the earlier run's ({', '.join(changed)} of "
                                    f"split.json differ: the data files changed?); it cannot be resumed")


# ------------------------------------------------------------------------------------------- run


def run(config, *, stages: str = "all", resume: bool = False) -> PipelineResult:
    """Run HC-RLHF end to end (or up to a stage) and write the report directory.

    Args:
        config: a :class:`~hcrlhf.pipeline.PipelineConfig`, a mapping, or the path of a YAML file
            (see :mod:`hcrlhf.pipeline.config`). It is checked completely before any work starts.
        stages: "all" (the whole method), "sft" (split + SFT; needs an ``sft`` section), "reward" (split +
            reward model), "cost" (split + cost model) or "train" (split + SFT when configured + score models
            + candidate selection, no safety test).
        resume: continue the run in ``output_dir`` that did not finish (killed, failed, interrupted): the config
            must be the recorded one (``<output_dir>/config.yaml``) but for :data:`RESUME_CHANGES`; the stages it
            finished are reused (split.json's fingerprints checked, the models loaded), candidate selection
            continues from the newest verifying RL checkpoint, then the safety test (the δ ledger's check
            still applies) and the report. A run that finished, and ``resume`` with ``overwrite``, are refused.

    Returns:
        :class:`PipelineResult`. ``verdict`` is "PASS" (``model_path`` is the returned model,
        ``<output_dir>/model``) or "NO SOLUTION FOUND" (no model is returned; the candidate is kept, marked, in
        ``<output_dir>/candidate-not-returned``). The directory's layout, its manifest ``hcrlhf_run.json``, its
        lock and what ``overwrite`` may remove: :mod:`hcrlhf.pipeline.rundir`, docs/method.md#reading-a-report.

    Raises:
        ConfigError: a bad config or output directory (another run holds it; it holds files no earlier hcrlhf run
            created), naming the key, before any work; the directory is left as it was.
    """
    import torch


    if stages not in STAGES:
        raise ValueError(f"run: stages must be one of {STAGES}, got {stages!r}")
    # 0. check --------------------------------------------------------------------------------------
    config = load_config(config)
    if stages == "sft" and config.sft is None:
        raise ConfigError("sft", "stages='sft' needs an sft section in the config")
    timings: dict = {}
    started = time.perf_counter()
    report: dict = {"format": REPORT_FORMAT, "version": REPORT_VERSION, "stages": stages,
                    "config": config.to_dict(loadable=True), "verdict": None}
    try:
        from hcrlhf import __version__

        report["versions"] = {"hcrlhf": __version__, "torch": torch.__version__}
    except ImportError:  # pragma: no cover
        pass

    # The output directory: checked and locked here (refused, leaving nothing behind, when another run holds it
    # or it holds anything but an earlier hcrlhf run); nothing in it changes until the inputs have loaded.
    # Under torchrun rank 0 holds the directory and writes every file; the other ranks train and sample with it.
    distributed.setup()
    held = {}

    def hold():
        held["rundir"] = RunDir(config.output_dir, overwrite=config.overwrite, stages=stages,
                                version=report.get("versions", {}).get("hcrlhf"), resume=resume)

    distributed.on_main(hold)
    rundir = held.get("rundir") or FollowerRunDir(config.output_dir, resume=resume)
    threads = torch.get_num_threads()
    if config.task == "builtin" and _device(config).type == "cpu":
        # The built-in models are tiny: a second intra-op thread costs more than it gives.
        torch.set_num_threads(1)
    try:
        if resume:
            distributed.on_main(_check_resume_config, config, rundir.path)
        return _run_stages(config, rundir, stages, report, timings, started)
    except BaseException as error:
        rundir.fail(error)  # after the work began: the manifest says the run did not finish
        raise
    finally:
        rundir.close()  # the lock; before the work began, also a directory this run created
        torch.set_num_threads(threads)


def _run_stages(config: PipelineConfig, rundir: RunDir, stages: str, report: dict, timings: dict,
                started: float) -> PipelineResult:
    out = rundir.path
    resume = rundir.resume

    def stage(name):
        _say(f"stage: {name}")
        return _Timer(timings, name)

    # 1. data ---------------------------------------------------------------------------------------
    with stage("data and split"):
        with distributed.main_first():  # rank 0 builds the built-in task's files; the others then read them
            inputs = _load_inputs(config)
        if resume:  # the data must give the split the earlier run drew (and trained on)
            distributed.on_main(_check_resume_split, inputs, out)
        if stages == "all":  # the δ budget, checked before hours of training (and before the directory changes)
            report["ledger"] = distributed.on_main(_check_ledger, config, inputs, out, resume=resume)
        # Models that would fail to load fail here, before the directory changes: the others must at least
        # resolve to a loadable config; the given score models are loaded now (and used below).
        _check_models_resolve(config, stages)
    given = {}
    for kind in ("reward", "cost"):
        if (config.models.reward_model if kind == "reward" else config.models.cost_model) is not None \
                and stages in (kind, "train", "all"):
            with stage(f"{kind} model"):
                given[kind] = _score_model(config, inputs, out, kind)
    # The work begins: an earlier run here is replaced (a returned model moved aside), the manifest written.
    distributed.on_main(_start_run_dir, rundir, config, inputs, out)
    report["run_manifest"] = RUN_MANIFEST
    if rundir.previous is not None:
        report["previous_run"] = _rel(rundir.previous, out)
    report["data"] = {**inputs.record, "split": inputs.split.record(),
                      "split_sizes": {"candidate_prompts": len(inputs.split.candidate),
                                      "safety_prompts": len(inputs.split.safety),
                                      "rl_train_prompts": len(inputs.train_prompts),
                                      "preference_pairs": inputs.record.get("n_preferences", 0),
                                      "eval_preference_pairs": inputs.record.get("n_eval_preferences", 0)}}
    report["fingerprints"] = {"safety_set": inputs.split.safety_fingerprint,
                              "candidate_set": inputs.split.candidate_fingerprint,
                              "method": inputs.split.fingerprint_method,
                              **{f"preferences_{k}": v for k, v in inputs.record.get("preference_files", {}).items()}}
    report["training"] = {}
    result = PipelineResult(verdict=None, passed=False, model_path=None, candidate_path=None, output_dir=out,
                            report=report, previous_run=rundir.previous)

    done = distributed.broadcast_object(rundir.completed if resume else {})  # what a resumed run reuses

    def finish():
        if rundir.manifest and rundir.manifest.get("resumes"):
            report["resumed"] = rundir.manifest["resumes"]
        report["timings_s"] = {k: round(v, 3) for k, v in timings.items()}
        report["timings_s"]["total"] = round(time.perf_counter() - started, 3)
        result.files = distributed.on_main(_write_report, rundir, out, report, result.verdict)
        return result

    # 1b. optional SFT ------------------------------------------------------------------------------
    if config.sft is not None and stages in ("sft", "train", "all"):
        if "sft" in done and (out / "sft_policy").is_dir():
            _say("resume: reusing the finished SFT policy in sft_policy/")
            inputs.load_policy = _sft_loader(config, inputs, out / "sft_policy")
            inputs.load_policy().cpu()  # it loads (or the resumption stops here)
            report["training"]["sft"] = done["sft"]
        else:
            with stage("SFT of the starting policy"):
                rundir.add("sft_policy")
                report["training"]["sft"] = _sft(config, inputs, out)
            rundir.complete("sft", report["training"]["sft"])
        report["data"]["starting_policy"] = "sft_policy"  # paths inside the run directory are relative to it
    if stages == "sft":
        return finish()

    # 2–3. reward and cost models -------------------------------------------------------------------
    score_models = {}
    for kind in ("reward", "cost"):
        if stages not in (kind, "train", "all"):
            continue
        name = f"{kind}_model"
        if kind in given:  # loaded above
            score_models[kind], report["training"][name] = given.pop(kind)
        elif name in done:
            score_models[kind], report["training"][name] = _reused_score_model(config, out, kind, done)
        else:
            with stage(f"{kind} model"):
                rundir.add(name)
                score_models[kind], report["training"][name] = _score_model(config, inputs, out, kind)
            rundir.complete(name, report["training"][name])
    reward_model, cost_model = score_models.get("reward"), score_models.get("cost")
    if stages in ("reward", "cost"):
        return finish()

    # 4. candidate selection ------------------------------------------------------------------------
    by_dpo = config.candidate_selection == "dpo"
    selection = "dpo" if by_dpo else "rl"  # the report's training entry of the candidate
    with stage("candidate selection (" + (f"{'ADPO' if config.dpo.mask == 'ama' else 'DPO'} on preference pairs"
                                          if by_dpo else "Lagrangian RL under the pessimistic cost bound") + ")"):
        if by_dpo:
            rundir.add(CANDIDATE_DIR)
            candidate, report["training"]["dpo"] = _train_dpo_candidate(config, inputs, reward_model, cost_model,
                                                                        out)
        else:
            rundir.add("rl", CANDIDATE_DIR)
            candidate, report["training"]["rl"] = _train_candidate(config, inputs, reward_model, cost_model, out,
                                                                   resume=resume)
            if resume:
                rundir.resumed(rl_from_step=report["training"]["rl"]["resumed_from_step"])
    if distributed.is_sharded(cost_model):  # rl.shard_frozen_models: test with the saved cost model, whole per rank
        cost_model = _load_cost_model(config, out)
    result.candidate_path = out / CANDIDATE_DIR  # untested: marked NOT_RETURNED.md until a safety test passes
    report["candidate"] = CANDIDATE_DIR
    if stages == "train":
        return finish()

    # 5. safety test --------------------------------------------------------------------------------
    with stage("safety test"):
        rundir.add("safety_test.json", "safety_samples.jsonl", "safety_costs.png")
        safety_result, report["safety_test"] = _safety_test(config, inputs, candidate, cost_model, out)
        # The verdict decides where the candidate lives: model/ (returned) or candidate-not-returned/ (marked).
        rundir.add(RETURNED_DIR if safety_result.passed else NOT_RETURNED_DIR)
        result.candidate_path = distributed.on_main(_settle_candidate, out, safety_result, report["safety_test"])
    result.safety_test = safety_result
    result.verdict, result.passed = safety_result.verdict, safety_result.passed
    result.model_path = result.candidate_path if safety_result.passed else None
    report["verdict"] = safety_result.verdict
    report["candidate"] = report["training"][selection]["candidate"] = _rel(result.candidate_path, out)
    report["returned_model"] = _rel(result.model_path, out) if result.model_path else None
    rundir.update(verdict=result.verdict, returned_model=report["returned_model"], candidate=report["candidate"])

    # 6. ground truth (built-in task) ---------------------------------------------------------------
    if inputs.task is not None:
        with stage("ground truth (built-in task)"):
            starting = inputs.load_policy()
            report["ground_truth"] = {
                "prompts": "safety set",
                "starting_policy_is": "sft_policy" if "sft" in report["training"] else "policy",
                "samples_per_prompt": config.evaluation.samples_per_prompt,
                "decoding": decoding_settings(generation_config(_decoding(config), inputs.tokenizer)),
                "sampling_seed": config.evaluation.seed,
                "starting_policy": _ground_truth(config, inputs, starting, "starting policy", cost_model),
                "candidate": _ground_truth(config, inputs, candidate, "candidate", cost_model),
                "returned": "candidate" if safety_result.passed else None,
            }
            del starting
    return finish()


def _start_run_dir(rundir: RunDir, config: PipelineConfig, inputs: _Inputs, out: Path) -> None:
    """The work begins: an earlier run in the directory is replaced (a returned model moved aside), the manifest,
    the effective config and the split written."""
    rundir.start()
    rundir.add("config.yaml", "split.json", *(["holdout_prompts.jsonl"] if inputs.holdout else []))
    _write_config(config, out)
    inputs.split.save(out / "split.json")
    if inputs.holdout:
        with open(out / "holdout_prompts.jsonl", "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps({"prompt": p}, ensure_ascii=False) + "\n" for p in inputs.holdout)


def _write_report(rundir: RunDir, out: Path, report: dict, verdict) -> list:
    from hcrlhf.report import write_report

    rundir.add("report.json", "report.md", "training.png", "safety_costs.png", "score_models.png")
    files = write_report(out, report)
    rundir.finish(verdict=verdict, returned_model=report.get("returned_model"), candidate=report.get("candidate"))
    return files


class _Timer:
    def __init__(self, timings: dict, name: str):
        self.timings, self.name = timings, name

    def __enter__(self):
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.timings[self.name] = time.perf_counter() - self.start
        return False


def _write_config(config: PipelineConfig, out: Path) -> None:
    import yaml

    # The effective config: every default filled in, overrides applied; `hcrlhf run` loads it again as it is.
    text = ("# The effective config of this run (defaults filled in, command-line overrides applied).\n"
            "# Re-run it with: hcrlhf run config.yaml output_dir=NEW_DIR\n")
    text += yaml.safe_dump(config.to_dict(loadable=True), sort_keys=False, allow_unicode=True)
    (out / "config.yaml").write_text(text, encoding="utf-8")

