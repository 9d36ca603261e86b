"""Training reward and cost models on preference pairs (docs/method.md#reward-and-cost-models).

One loop for both, in numbered phases: (1) check and prepare the data, (2) set up the optimiser,
schedule and precision, (3) train with gradient accumulation, evaluating held-out pair accuracy and
saving safetensors checkpoints, (4) final evaluation and save.

* reward model: Bradley–Terry on ``better_response_id`` (:func:`hcrlhf.train.losses.reward_loss`);
  held-out metric: pair accuracy, Pr(r_better > r_worse).
* cost model: Bradley–Terry on ``safer_response_id``, variant ``bt`` or ``bt_sign``
  (:func:`hcrlhf.train.losses.cost_loss`); held-out metrics: pair accuracy Pr(c_unsafer > c_safer) and
  sign accuracy Pr(sign(c) matches the is_safe label: c > 0 ⇔ unsafe) over all responses.

bf16 autocast is used only on a CUDA device (``bf16="auto"``); on the CPU everything runs in float32.

Under ``torchrun`` (docs/distributed.md) the model is replicated: each rank scores its block of every
micro-batch, the gradients are averaged over ranks, and rank 0 writes the checkpoints.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from hcrlhf.config import Problems, Section
from hcrlhf.data.preferences import PREFERENCE_COLUMNS
from hcrlhf.data.templates import get_template, tokenize_pairs
from hcrlhf.train.losses import COST_LOSSES, cost_loss, reward_loss

__all__ = [
    "ScoreTrainingConfig",
    "ScoreTrainingResult",
    "train_score_model",
    "train_reward_model",
    "train_cost_model",
    "evaluate_score_model",
]

KINDS = ("reward", "cost")
SCHEDULES = ("cosine", "linear", "constant")


@dataclass
class ScoreTrainingConfig(Section):
    """Settings of :func:`train_score_model` (a :class:`hcrlhf.config.Section`: checked on creation).

    Attributes:
        kind: "reward" (learns ``better_response_id``) or "cost" (learns ``safer_response_id``).
        cost_loss: for ``kind="cost"``: "bt" (HC-RLHF) or "bt_sign" (Safe RLHF, c > 0 means unsafe).
        regularization: weight of the mean squared score (0.001).
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        epochs: passes over the training pairs (may be fractional).
        max_steps: optional cap on optimiser steps (overrides ``epochs`` when smaller).
        batch_size: pairs per micro-batch (2·batch_size sequences per forward).
        gradient_accumulation_steps: micro-batches per optimiser step.
        max_length: token cap per sequence (prompt truncated first).
        lr_schedule: "cosine" (to 0), "linear" (to 0) or "constant", after warmup.
        warmup_ratio: fraction of the steps with linear warmup.
        max_grad_norm: gradient clipping (None: off).
        bf16: "auto" (bf16 autocast on CUDA only), True (CUDA required) or False.
        seed: seed of the data order.
        eval_batch_size: pairs per evaluation batch.
        eval_every: evaluate on the held-out pairs every this many optimiser steps (None: start and end).
        output_dir: where to save (None: no saving).
        save_every: also save ``checkpoint-<step>`` every this many optimiser steps (None: only the end).
        progress: show a tqdm progress bar.
        device: device to train on (None: the model's).
    """

    kind: str = "reward"
    cost_loss: str = "bt_sign"
    regularization: float = 0.001
    learning_rate: float = 2e-5
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int | None = None
    batch_size: int = 16
    gradient_accumulation_steps: int = 1
    max_length: int = 512
    lr_schedule: str = "cosine"
    warmup_ratio: float = 0.03
    max_grad_norm: float | None = 1.0
    bf16: str | bool = "auto"
    seed: int = 42
    eval_batch_size: int = 64
    eval_every: int | None = None
    output_dir: str | None = None
    save_every: int | None = None
    progress: bool = True
    device: str | None = None

    def check(self, problems: Problems) -> None:
        problems.choice("kind", self.kind, KINDS)
        problems.choice("cost_loss", self.cost_loss, COST_LOSSES)
        problems.choice("lr_schedule", self.lr_schedule, SCHEDULES)
        problems.choice("bf16", self.bf16, ("auto", True, False))
        for name in ("batch_size", "gradient_accumulation_steps", "eval_batch_size", "max_length", "max_steps",
                     "eval_every", "save_every"):
            problems.at_least(name, getattr(self, name), 1)
        for name in ("epochs", "learning_rate"):
            problems.positive(name, getattr(self, name))
        problems.nonnegative("regularization", self.regularization)
        problems.nonnegative("weight_decay", self.weight_decay)
        problems.positive("max_grad_norm", self.max_grad_norm)
        if not 0 <= self.warmup_ratio < 1:
            problems.add("warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio!r}")


@dataclass
class ScoreTrainingResult:
    """Attributes:
    model: the trained score model (same object as passed in).
    initial_eval, final_eval: held-out metrics before and after training (empty without eval data).
    history: one dict per optimiser step (loss, batch accuracy, lr) and per evaluation.
    checkpoints: directories saved.
    steps: optimiser steps taken.
    seconds: wall time of the training loop.
    """

    model: object
    initial_eval: dict
    final_eval: dict
    history: list = field(default_factory=list)
    checkpoints: list = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def _rows(dataset, fn: str) -> list[dict]:
    rows = dataset.to_list() if hasattr(dataset, "to_list") else list(dataset)
    if not rows:
        raise ValueError(f"{fn}: the dataset is empty")
    missing = [c for c in PREFERENCE_COLUMNS if c not in rows[0]]
    if missing:
        raise ValueError(f"{fn}: the dataset lacks columns {missing}; load it with hcrlhf.data.load_preferences")
    return rows


def _pair_texts(rows: list[dict], kind: str):
    """``(prompts, higher, lower, higher_is_safe, lower_is_safe)``: ``higher`` is the better response
    (reward) or the *unsafer* one (cost), i.e. the one whose score the loss pushes up."""
    prompts, higher, lower, higher_safe, lower_safe = [], [], [], [], []
    for row in rows:
        key = "better_response_id" if kind == "reward" else "safer_response_id"
        chosen = int(row[key])
        up = chosen if kind == "reward" else 1 - chosen
        prompts.append(row["prompt"])
        higher.append(row[f"response_{up}"])
        lower.append(row[f"response_{1 - up}"])
        higher_safe.append(bool(row[f"is_response_{up}_safe"]))
        lower_safe.append(bool(row[f"is_response_{1 - up}_safe"]))
    return prompts, higher, lower, higher_safe, lower_safe


def _score_pairs(model, tokenizer, prompts, higher, lower, *, template, max_length, device, autocast):
    """Scores (B,) of the higher and lower responses, one forward over 2B right-padded sequences."""
    batch = tokenize_pairs(tokenizer, prompts + prompts, higher + lower, template=template, max_length=max_length)
    with autocast():
        end_scores = model(batch.input_ids.to(device), batch.attention_mask.to(device)).end_scores.float()
    n = len(prompts)
    return end_scores[:n], end_scores[n:]


def _autocast_factory(device: torch.device, bf16):
    if bf16 is True and device.type != "cuda":
        raise ValueError(f"ScoreTrainingConfig: bf16=True needs a CUDA device; training is on {device}. "
                         "Use bf16='auto' or False.")
    use = device.type == "cuda" and bf16 in (True, "auto") and torch.cuda.is_bf16_supported()
    return lambda: torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=use), use


@torch.no_grad()
def evaluate_score_model(model, tokenizer, dataset, *, kind: str = "reward", template=None, batch_size: int = 64,
                         max_length: int = 512, device=None, bf16="auto") -> dict:
    """Held-out metrics of a score model on preference pairs.

    Returns:
        ``{"n_pairs", "accuracy", "mean_margin"}``; for ``kind="cost"`` also ``"sign_accuracy"`` (over all
        2·n responses: cost > 0 ⇔ labelled unsafe), ``"mean_cost_safe"``, ``"mean_cost_unsafe"``; when
        the rows have a ``category``, the same metrics per category under ``"by_category"``. A tie counts
        as wrong, so a constant model scores 0.
    """
    if kind not in KINDS:
        raise ValueError(f"evaluate_score_model: kind must be one of {KINDS}, got {kind!r}")
    rows = _rows(dataset, "evaluate_score_model")
    template = get_template(template, tokenizer)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    autocast, _ = _autocast_factory(device, bf16)
    was_training = model.training
    model.eval()
    highs, lows, high_safe_all, low_safe_all = [], [], [], []
    try:
        for start in range(0, len(rows), batch_size):
            prompts, higher, lower, high_safe, low_safe = _pair_texts(rows[start:start + batch_size], kind)
            high, low = _score_pairs(model, tokenizer, prompts, higher, lower, template=template,
                                     max_length=max_length, device=device, autocast=autocast)
            highs.append(high.cpu())
            lows.append(low.cpu())
            high_safe_all += high_safe
            low_safe_all += low_safe
    finally:
        model.train(was_training)
    high, low = torch.cat(highs), torch.cat(lows)
    metrics = _pair_metrics(kind, high, low, torch.tensor(high_safe_all), torch.tensor(low_safe_all))
    categories = [r.get("category") for r in rows]
    if any(c is not None for c in categories):  # FDC: metrics per prompt category (docs/method.md#equilibrate-rlhf)
        metrics["by_category"] = {}
        for category in sorted({c for c in categories if c is not None}):
            index = torch.tensor([c == category for c in categories])
            metrics["by_category"][category] = _pair_metrics(
                kind, high[index], low[index], torch.tensor(high_safe_all)[index], torch.tensor(low_safe_all)[index])
    return metrics


def _pair_metrics(kind: str, high: torch.Tensor, low: torch.Tensor, high_safe: torch.Tensor,
                  low_safe: torch.Tensor) -> dict:
    metrics = {"n_pairs": int(high.numel()), "accuracy": float((high > low).float().mean()),
               "mean_margin": float((high - low).mean())}
    if kind == "cost":
        costs = torch.cat([high, low])
        safe = torch.cat([high_safe, low_safe])
        metrics["sign_accuracy"] = float(((costs > 0) == ~safe).float().mean())
        metrics["mean_cost_safe"] = float(costs[safe].mean()) if bool(safe.any()) else float("nan")
        metrics["mean_cost_unsafe"] = float(costs[~safe].mean()) if bool((~safe).any()) else float("nan")
    return metrics


def _lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _save(model, directory: Path, state: dict, pad_token_id=None) -> Path:
    from hcrlhf.models.score_model import ScoreModel, training_record

    if isinstance(model, ScoreModel):  # config.json records the tokenizer's pad id and what trained the head
        model.save_pretrained(directory, pad_token_id=pad_token_id, training=training_record(
            state["config"], state["step"], state["total_steps"], state["n_train_pairs"]))
    else:
        model.save_pretrained(directory)
    (directory / "training_state.json").write_text(json.dumps(state, indent=1, sort_keys=True, default=str) + "\n",
                                                   encoding="utf-8")
    return directory


def _nonfinite_parameters(model) -> list[str]:
    """Names of the parameters and floating-point buffers holding a NaN or an infinity (one host sync when
    all are finite)."""
    tensors = [(n, t) for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_floating_point()]
    if not tensors:
        return []
    finite = torch.stack([torch.isfinite(t.detach()).all() for _, t in tensors])
    if bool(finite.all()):
        return []
    return [name for (name, _), ok in zip(tensors, finite.tolist()) if not ok]


def _diverged(kind: str, what: str, step: int, total_steps: int) -> FloatingPointError:
    return FloatingPointError(
        f"train_score_model: the {kind} model's {what} at step {step} of {total_steps}; training stopped and no model "
        f"was saved. Lower the learning rate ({kind}.learning_rate)")


def train_score_model(model, tokenizer, train_dataset, *, config: ScoreTrainingConfig | None = None,
                      eval_dataset=None, template=None, safety_split=None) -> ScoreTrainingResult:
    """Train a reward or cost :class:`hcrlhf.models.ScoreModel` on preference pairs.

    Args:
        model: the score model (trained in place).
        tokenizer: its tokenizer (needs a pad and an EOS token).
        train_dataset: preference pairs (PKU-SafeRLHF schema, e.g. from ``load_preferences``).
        config: :class:`ScoreTrainingConfig` (``kind`` picks reward or cost).
        eval_dataset: held-out pairs; evaluated before training, every ``eval_every`` steps and at the end.
        template: prompt template (see :func:`hcrlhf.data.get_template`).
        safety_split: a :class:`hcrlhf.data.PromptSplit`; if given, training refuses any prompt of its
            safety set (docs/method.md#data-split).

    Returns:
        :class:`ScoreTrainingResult`.

    Raises:
        FloatingPointError: the loss (checked every step) or a weight (checked before every save and at the end)
            became NaN or infinite, naming the step. Nothing is saved then: checkpoints this call wrote are
            removed, and ``output_dir`` too when this call created it.
    """
    import shutil

    from tqdm.auto import tqdm

    from hcrlhf import distributed

    fn = "train_score_model"
    config = config or ScoreTrainingConfig()
    config.validate()
    # ---- 1. data --------------------------------------------------------------------------------
    rows = _rows(train_dataset, fn)
    eval_rows = _rows(eval_dataset, fn) if eval_dataset is not None else None
    if safety_split is not None:
        safety_split.check_training([r["prompt"] for r in rows] + [r["prompt"] for r in (eval_rows or [])])
    template = get_template(template, tokenizer)
    device = torch.device(config.device) if config.device is not None else next(model.parameters()).device
    model.to(device)
    autocast, use_bf16 = _autocast_factory(device, config.bf16)
    pairs_per_step = config.batch_size * config.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(rows) / pairs_per_step)
    total_steps = max(1, math.ceil(config.epochs * steps_per_epoch))
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    generator = torch.Generator().manual_seed(config.seed)

    def micro_batches():
        while True:  # epochs of a seeded permutation; the last partial batch of an epoch is kept
            order = torch.randperm(len(rows), generator=generator).tolist()
            for start in range(0, len(order), config.batch_size):
                yield [rows[i] for i in order[start:start + config.batch_size]]

    # ---- 2. optimiser, schedule ---------------------------------------------------------------------
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.learning_rate, weight_decay=config.weight_decay)
    warmup = int(config.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: _lr_factor(config.lr_schedule, s, total_steps, warmup))

    def evaluate():
        if eval_rows is None:
            return {}
        return evaluate_score_model(model, tokenizer, eval_rows, kind=config.kind, template=template,
                                    batch_size=config.eval_batch_size, max_length=config.max_length, device=device,
                                    bf16=config.bf16)

    result = ScoreTrainingResult(model=model, initial_eval=evaluate(), final_eval={})
    if result.initial_eval:
        result.history.append({"step": 0, "eval": result.initial_eval})
    output_dir = Path(config.output_dir) if config.output_dir is not None else None
    created_output_dir = output_dir is not None and not output_dir.exists()
    state = {"config": asdict(config), "bf16": use_bf16, "total_steps": total_steps, "n_train_pairs": len(rows)}

    # ---- 3. train ------------------------------------------------------------------------------------
    model.train()
    batches = micro_batches()
    started = time.perf_counter()
    bar = tqdm(total=total_steps, desc=f"{config.kind} model", disable=not (config.progress and distributed.is_main()),
               dynamic_ncols=True)
    try:
        for step in range(1, total_steps + 1):
            optimizer.zero_grad(set_to_none=True)
            step_loss, correct, seen = 0.0, 0, 0
            micro = [next(batches) for _ in range(config.gradient_accumulation_steps)]
            n_pairs = sum(len(b) for b in micro)
            for batch_rows in micro:
                # Several processes: each rank scores its block of the micro-batch (the model is replicated;
                # gradients are averaged below, so the step is the one a single process takes on all of it).
                first, last = distributed.shard_bounds(len(batch_rows))
                weight = (last - first) / n_pairs * distributed.world_size()
                batch_rows = batch_rows[first:last]
                if not batch_rows:  # a short last batch of an epoch: fewer pairs than ranks
                    continue
                prompts, higher, lower, higher_safe, lower_safe = _pair_texts(batch_rows, config.kind)
                high, low = _score_pairs(model, tokenizer, prompts, higher, lower, template=template,
                                         max_length=config.max_length, device=device, autocast=autocast)
                if config.kind == "reward":
                    loss = reward_loss(high, low, regularization=config.regularization)
                else:
                    loss = cost_loss(low, high, safer_is_safe=torch.tensor(lower_safe, device=device),
                                     unsafer_is_safe=torch.tensor(higher_safe, device=device),
                                     variant=config.cost_loss, regularization=config.regularization)
                # Weight each micro-batch by its share of the step's pairs, so that accumulation gives the
                # mean over the step's pairs even when the last micro-batch of an epoch is short.
                (loss * weight).backward()
                step_loss += float(loss.detach()) * len(batch_rows) / n_pairs
                correct += int((high.detach() > low.detach()).sum())
                seen += len(batch_rows)
            if distributed.is_distributed():
                distributed.average_gradients(parameters)
                totals = distributed.all_reduce_sum(torch.tensor([step_loss, correct, seen], dtype=torch.float64))
                step_loss, correct, seen = float(totals[0]), int(totals[1]), int(totals[2])
            if not math.isfinite(step_loss):  # (the loss is on the host already: no extra sync)
                raise _diverged(config.kind, f"loss is {step_loss}", step, total_steps)
            if config.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            record = {"step": step, "loss": step_loss, "accuracy": correct / seen,
                      "lr": optimizer.param_groups[0]["lr"]}
            result.history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{step_loss:.4f}", acc=f"{correct / seen:.3f}")
            if config.eval_every is not None and step % config.eval_every == 0 and step < total_steps:
                result.history.append({"step": step, "eval": evaluate()})
                model.train()
            if output_dir is not None and config.save_every is not None and step % config.save_every == 0 \
                    and step < total_steps:
                bad = _nonfinite_parameters(model)
                if bad:
                    raise _diverged(config.kind, f"weights are not finite ({len(bad)} tensors, e.g. {bad[0]}) "
                                                 "after the update", step, total_steps)
                result.checkpoints.append(distributed.on_main(
                    _save, model, output_dir / f"checkpoint-{step}", {**state, "step": step}, tokenizer.pad_token_id))
        # The last update may break the weights with a finite loss: checked once before anything uses them.
        bad = _nonfinite_parameters(model)
        if bad:
            raise _diverged(config.kind, f"weights are not finite ({len(bad)} tensors, e.g. {bad[0]}) after the "
                                         "update", total_steps, total_steps)
    except FloatingPointError:
        # Save nothing: the checkpoints of this call go, and the output directory when this call created it.
        for checkpoint in result.checkpoints:
            shutil.rmtree(checkpoint, ignore_errors=True)
        result.checkpoints.clear()
        if created_output_dir and output_dir.is_dir() and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise
    finally:
        bar.close()
    result.steps = total_steps
    result.seconds = time.perf_counter() - started

    # ---- 4. final evaluation and save -------------------------------------------------------------------
    result.final_eval = evaluate()
    if result.final_eval:
        result.history.append({"step": total_steps, "eval": result.final_eval})
    model.train()
    if output_dir is not None:
        final_state = {**state, "step": total_steps, "initial_eval": result.initial_eval,
                       "final_eval": result.final_eval}
        result.checkpoints.append(distributed.on_main(_save, model, output_dir, final_state, tokenizer.pad_token_id))
    return result


def train_reward_model(model, tokenizer, train_dataset, *, config: ScoreTrainingConfig | None = None, **kwargs):
    """:func:`train_score_model` with ``kind="reward"``."""
    config = replace(config or ScoreTrainingConfig(), kind="reward")
    return train_score_model(model, tokenizer, train_dataset, config=config, **kwargs)


def train_cost_model(model, tokenizer, train_dataset, *, config: ScoreTrainingConfig | None = None, **kwargs):
    """:func:`train_score_model` with ``kind="cost"`` (``config.cost_loss``: "bt" or "bt_sign")."""
    config = replace(config or ScoreTrainingConfig(), kind="cost")
    return train_score_model(model, tokenizer, train_dataset, config=config, **kwargs)
