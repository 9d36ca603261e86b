"""End-to-end race: hcrlhf's RL trainer vs TRL's RLOOTrainer and GRPOTrainer, one training step at a time.

    hcrlhf bench race_trl [--quick] [--steps 5] [--warmup 1] [--rounds 2] [--threads 2] [--jobs 1] [--sides ...]
                          [--out FILE] [--no-write]
    python -m hcrlhf.benchmarks.bench_race_trl ...

Every side trains the same policy with the same work per step, each in a fresh process:

* **hcrlhf** — :class:`hcrlhf.train.SafeRLTrainer`, ``estimator="rloo"`` (reward *and* cost model, a
  frozen reference copy, ``ops.linear_logprobs`` on response positions, ``ops.rloo_advantages``);
* **TRL RLOO** — ``trl.RLOOTrainer`` with the reward model as its one ``reward_funcs`` entry;
* **TRL GRPO** — ``trl.GRPOTrainer``, the same;
* **TRL RLOO + hcrlhf kernels** — the TRL RLOO row after :func:`hcrlhf.integrations.apply_to_trl`.

What is equal (built once in a temporary directory and loaded by every side): a random-init Qwen2 policy
(``save_pretrained``), a one-label ``Qwen2ForSequenceClassification`` reward model (hcrlhf loads it with
``ScoreModel.from_pretrained``, TRL with ``from_pretrained`` as a ``reward_funcs`` model), the built-in task's
candidate prompts in its prompt template, prompts per step, samples per prompt (the group), new tokens, one
optimizer step per rollout (``num_iterations=1``), AdamW (same lr, no weight decay, constant lr, grad clip
1.0), the KL coefficient (β > 0 on every side, so every side runs its reference model), temperature 1 with
no top-k / top-p, float32 (bf16 off), no gradient checkpointing, dropout off, CPU, the same torch threads.

Equal response lengths: neither trainer is told a minimum length (hcrlhf's rollout has no ``min_new_tokens``
knob), so instead the EOS token cannot be sampled: the word-level tokenizer is the built-in one with its
vocabulary padded with filler words to the model's vocabulary size and ``<eos>`` moved to the id just past it.
Every response is then exactly ``max_new_tokens`` long on every side (checked from each side's own counts).

What is not equal, by design of each library (reported, not hidden): hcrlhf also runs a **cost model** (the
safety constraint; a second score model of the reward model's shape, one extra forward per step that TRL does
not do; λ only scales advantages, it changes no work); hcrlhf scores token ids directly while TRL decodes the
completions and re-tokenises prompt + completion for its reward model; TRL GRPO skips the rollout policy's
log-prob pass when ``num_iterations=1`` (its ratio is 1 by construction) while RLOO (both libraries) runs it;
hcrlhf also computes the rollout entropy; prompts are drawn in each library's own shuffled order (the same
set, similar lengths: prompt tokens per step are reported).

Measured per side: wall time per training step (median of ``--steps`` after one warm-up step), the generation
part of it (hcrlhf: its ``time/generation`` phase; TRL: the trainer's ``_generate``, wrapped with a clock; a TRL
step is timed from ``on_step_begin`` to ``on_step_end``),
generated tokens per second (response tokens / step time), trained tokens per second (prompt + response
tokens through the training forward and backward / step time), and peak memory: the peak RSS growth of the
measured steps (VmHWM reset to the current RSS after the warm-up step, as ``bench_train_step`` does); the
absolute VmHWM is reported too (it includes each library's imports). Ratios are hcrlhf / TRL.

On a shared machine the load drifts during a run: by default every side runs twice (two rounds, the order
reversed in the second) and the measured steps are pooled, so a drift falls on every side alike. ``--quick``
(a tiny model, 1 thread, 1 round, two sides at a time) is a smoke run of the plumbing, not a comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

SECTION = "race_trl"
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "race-trl.md"

SHAPES = {
    # the model of bench_train_step's "cpu" shape; 8 prompts x 2 samples x 48 new tokens
    "cpu": dict(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, prompts_per_step=8, samples_per_prompt=2, max_new_tokens=48),
    # plumbing and a smoke number in well under a minute (the test runs it)
    "quick": dict(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=1, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=6),
}
SIDES = {
    "hcrlhf": "hcrlhf SafeRLTrainer (rloo)",
    "trl-rloo": "TRL RLOOTrainer",
    "trl-grpo": "TRL GRPOTrainer",
    "trl-rloo-kernels": "TRL RLOOTrainer + hcrlhf kernels",
}
TRL_BASELINES = ("trl-rloo", "trl-grpo")
LEARNING_RATE = 1e-6
KL_COEF = 0.05  # TRL RLOO's default β; GRPO's default (0) would skip the reference model
MAX_GRAD_NORM = 1.0
HCRLHF_PHASES = ("generation", "scoring", "logprobs", "advantages", "update", "multiplier")


# --------------------------------------------------------------------------------------- shared inputs


def prepare(directory: Path, shape: dict, task_root: str) -> None:
    """Write the shared tokenizer, policy, reward and cost models under ``directory``."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    from hcrlhf.data.builtin import make_task

    task = make_task(task_root, seed=0)
    vocab_size = shape["vocab_size"]
    spec = json.loads(Path(task.tokenizer_path, "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    eos = "<eos>"
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the built-in tokenizer's {len(vocab)} words")
    # <eos> moves to id vocab_size, just past the model's logits: no side can sample it, so every response
    # runs to max_new_tokens. Its old id and the ids up to vocab_size get filler words (plain WordLevel
    # entries, so tokenising and decoding cost what a real vocabulary of this size costs).
    free = [vocab.pop(eos)] + list(range(len(vocab) + 1, vocab_size))
    for number, index in enumerate(free):
        vocab[f"zz{number}"] = index
    vocab[eos] = vocab_size
    for token in spec["added_tokens"]:
        if token["content"] == eos:
            token["id"] = vocab_size
    tokenizer_dir = directory / "tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    Tokenizer.from_str(json.dumps(spec)).save(str(tokenizer_dir / "tokenizer.json"))
    settings = json.loads(Path(task.tokenizer_path, "tokenizer_config.json").read_text())
    settings["model_max_length"] = 4096
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps(settings, indent=1))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.eos_token_id == vocab_size and len(tokenizer) == vocab_size + 1, "tokenizer rebuild went wrong"

    config = Qwen2Config(vocab_size=vocab_size, hidden_size=shape["hidden_size"],
                         intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_hidden_layers"],
                         num_attention_heads=shape["num_attention_heads"],
                         num_key_value_heads=shape["num_key_value_heads"], max_position_embeddings=1024,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=None, bos_token_id=None, use_sliding_window=False)
    torch.manual_seed(0)
    Qwen2ForCausalLM(config).save_pretrained(directory / "policy")
    tokenizer.save_pretrained(directory / "policy")
    score_config = Qwen2Config(**{k: v for k, v in config.to_dict().items() if k not in ("id2label", "label2id")},
                               num_labels=1)
    for seed, name in ((1, "reward"), (2, "cost")):
        torch.manual_seed(seed)
        Qwen2ForSequenceClassification(score_config).save_pretrained(directory / name)
        tokenizer.save_pretrained(directory / name)


def formatted_prompts(task_root: str) -> tuple[list[str], object]:
    """The built-in task's candidate prompts and its split (hcrlhf refuses training on safety prompts)."""
    from hcrlhf.data.builtin import make_task

    task = make_task(task_root, seed=0)
    return task.prompts("candidate")[0], task


# ------------------------------------------------------------------------------------------ one side


def _status_kib(key: str) -> int | None:
    from hcrlhf.benchmarks.bench_train_step import _status_kib as read

    return read(key)


class _Memory:
    """Peak RSS growth from a reset point (VmHWM reset to the current RSS, as bench_train_step does)."""

    def reset(self) -> None:
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        self.base = _status_kib("VmRSS")

    def peak_growth_bytes(self) -> int | None:
        high = _status_kib("VmHWM")
        return None if high is None or self.base is None else (high - self.base) * 1024


def run_hcrlhf(spec: dict) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hcrlhf.data.builtin import TEMPLATE
    from hcrlhf.models import ScoreModel
    from hcrlhf.train import SafeRLConfig, SafeRLTrainer

    directory, shape = Path(spec["dir"]), spec["shape"]
    prompts, task = formatted_prompts(spec["task_root"])
    tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")
    policy = AutoModelForCausalLM.from_pretrained(directory / "policy")
    reward_model = ScoreModel.from_pretrained(directory / "reward")
    cost_model = ScoreModel.from_pretrained(directory / "cost")
    config = SafeRLConfig(estimator="rloo", total_steps=10**6, prompts_per_step=shape["prompts_per_step"],
                          samples_per_prompt=shape["samples_per_prompt"], max_new_tokens=shape["max_new_tokens"],
                          temperature=1.0, kl_coef=KL_COEF, actor_lr=LEARNING_RATE, weight_decay=0.0,
                          max_grad_norm=MAX_GRAD_NORM, bf16=False, progress=False, tensorboard=False,
                          sync_phase_timing=True, device="cpu", seed=0)
    trainer = SafeRLTrainer(config, policy=policy, tokenizer=tokenizer, reward_model=reward_model,
                            cost_model=cost_model, train_prompts=prompts, safety_prompts=task.split,
                            template=TEMPLATE)
    sequence_tokens = []
    rollout = trainer.rollout

    def counted_rollout(batch, **kwargs):
        out = rollout(batch, **kwargs)
        sequence_tokens.append(int(out.attention_mask.sum()))  # after generate: no extra sync inside a phase
        return out

    trainer.rollout = counted_rollout
    memory = _Memory()
    steps = []
    for index in range(spec["warmup"] + spec["steps"]):
        if index == spec["warmup"]:
            memory.reset()
        start = time.perf_counter()
        metrics = trainer.step()
        seconds = time.perf_counter() - start
        steps.append({"seconds": seconds, "generation": metrics["time/generation"],
                      "generated_tokens": metrics["tokens"], "trained_tokens": sequence_tokens[-1],
                      "phases": {p: metrics[f"time/{p}"] for p in HCRLHF_PHASES if f"time/{p}" in metrics}})
    return {"steps": steps[spec["warmup"]:], "peak_growth_bytes": memory.peak_growth_bytes(),
            "vmhwm_bytes": _vmhwm_bytes(), "threads": torch.get_num_threads()}


def run_trl(spec: dict) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    from hcrlhf.data.builtin import TEMPLATE

    side, directory, shape = spec["side"], Path(spec["dir"]), spec["shape"]
    kernels = side.endswith("-kernels")
    if kernels:
        from hcrlhf.integrations import apply_to_trl

        apply_to_trl()  # before the trainer exists, as documented
    if side.startswith("trl-grpo"):
        from trl import GRPOConfig as Config
        from trl import GRPOTrainer as Trainer
    else:
        from trl import RLOOConfig as Config
        from trl import RLOOTrainer as Trainer

    prompts, _ = formatted_prompts(spec["task_root"])
    dataset = Dataset.from_dict({"prompt": [TEMPLATE.format_prompt(p) for p in prompts]})
    rows = shape["prompts_per_step"] * shape["samples_per_prompt"]
    config = Config(
        output_dir=str(Path(spec["scratch"]) / side), max_steps=spec["warmup"] + spec["steps"],
        per_device_train_batch_size=rows, gradient_accumulation_steps=1, num_generations=shape["samples_per_prompt"],
        max_completion_length=shape["max_new_tokens"], num_iterations=1, beta=KL_COEF, temperature=1.0, top_p=1.0,
        top_k=0, learning_rate=LEARNING_RATE, optim="adamw_torch", weight_decay=0.0, lr_scheduler_type="constant",
        max_grad_norm=MAX_GRAD_NORM, gradient_checkpointing=False, bf16=False, use_cpu=True, disable_dropout=True,
        use_vllm=False, logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0,
    )
    tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer", padding_side="left")
    policy = AutoModelForCausalLM.from_pretrained(directory / "policy")
    reward_model = AutoModelForSequenceClassification.from_pretrained(directory / "reward", num_labels=1)
    memory = _Memory()
    marks: list[list[float]] = []
    generation: list[float] = []

    class Clock(TrainerCallback):
        # on_step_begin .. on_step_end holds the whole step: the generation (inside training_step), scoring,
        # log-probs, loss, backward and the optimizer step; TRL's logging of a step runs after on_step_end.
        def on_step_begin(self, args, state, control, **kwargs):
            marks.append([time.perf_counter()])

        def on_step_end(self, args, state, control, **kwargs):
            marks[-1].append(time.perf_counter())
            if state.global_step == spec["warmup"]:
                memory.reset()

    trainer = Trainer(model=policy, reward_funcs=[reward_model], args=config, train_dataset=dataset,
                      processing_class=tokenizer, reward_processing_classes=[tokenizer], callbacks=[Clock()])
    generate = trainer._generate

    def timed_generate(*args, **kwargs):
        start = time.perf_counter()
        out = generate(*args, **kwargs)
        generation.append(time.perf_counter() - start)
        return out

    trainer._generate = timed_generate
    torch.set_num_threads(spec["threads"])  # in case the trainer's set-up changed it
    trainer.train()
    peak = memory.peak_growth_bytes()
    logs = [entry for entry in trainer.state.log_history if "num_tokens" in entry]
    total = spec["warmup"] + spec["steps"]
    if not len(logs) == len(generation) == len(marks) == total:
        raise RuntimeError(f"{side}: expected {total} logged, generated and timed steps, got {len(logs)}, "
                           f"{len(generation)} and {len(marks)}")
    steps, seen = [], 0.0
    for index, entry in enumerate(logs):
        generated = entry["completions/mean_length"] * rows
        trained = entry["num_tokens"] - seen  # TRL counts prompt + completion tokens (attention mask), cumulative
        seen = entry["num_tokens"]
        steps.append({"seconds": marks[index][1] - marks[index][0], "generation": generation[index],
                      "generated_tokens": generated, "trained_tokens": trained,
                      "completion_length": [entry["completions/min_length"], entry["completions/max_length"]]})
    out = {"steps": steps[spec["warmup"]:], "peak_growth_bytes": peak, "vmhwm_bytes": _vmhwm_bytes(),
           "threads": torch.get_num_threads()}
    if kernels:
        from hcrlhf.integrations.trl import call_counts

        out["kernel_calls"] = {name: dict(counts) for name, counts in call_counts().items()}
    return out


def _vmhwm_bytes() -> int | None:
    high = _status_kib("VmHWM")  # since the reset: the measured steps' peak, imports and models included
    return None if high is None else high * 1024


def run_child(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    return run_hcrlhf(spec) if spec["side"] == "hcrlhf" else run_trl(spec)


def measure(spec: dict) -> dict:
    """One side in a fresh interpreter (nothing imported or allocated by another side)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", MALLOC_TRIM_THRESHOLD_="0", TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-m", "hcrlhf.benchmarks.bench_race_trl", "--child", json.dumps(spec)]
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"bench_race_trl child failed for side {spec['side']}:\n{out.stderr[-6000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------- table


def merge_rounds(runs: list[dict]) -> dict:
    """One side's rounds as one result: the measured steps pooled, the memory figures' median over rounds."""
    merged = dict(runs[0], steps=[step for run in runs for step in run["steps"]])
    for key in ("peak_growth_bytes", "vmhwm_bytes"):
        values = [run[key] for run in runs]
        merged[key] = None if None in values else statistics.median(values)
    return merged


def summarise(result: dict) -> dict:
    """Medians over the measured steps."""
    steps = result["steps"]
    median = lambda key: statistics.median(s[key] for s in steps)  # noqa: E731
    seconds = median("seconds")
    summary = {
        "step_s": seconds, "step_min_s": min(s["seconds"] for s in steps),
        "step_max_s": max(s["seconds"] for s in steps), "generation_s": median("generation"),
        "generated_tokens": median("generated_tokens"), "trained_tokens": median("trained_tokens"),
        "generated_per_s": statistics.median(s["generated_tokens"] / s["seconds"] for s in steps),
        "trained_per_s": statistics.median(s["trained_tokens"] / s["seconds"] for s in steps),
        "peak_growth_bytes": result["peak_growth_bytes"], "vmhwm_bytes": result["vmhwm_bytes"],
    }
    if "phases" in steps[0]:
        summary["phases"] = {p: statistics.median(s["phases"][p] for s in steps) for p in steps[0]["phases"]}
    return summary


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def table_rows(summaries: dict[str, dict]) -> list[dict]:
    rows = []
    for side, s in summaries.items():
        rows.append({
            "side": SIDES[side], "step ms (median)": f"{s['step_s'] * 1e3:.1f}",
            "step ms [min, max]": f"[{s['step_min_s'] * 1e3:.1f}, {s['step_max_s'] * 1e3:.1f}]",
            "generation ms": f"{s['generation_s'] * 1e3:.1f}",
            "generation share": f"{s['generation_s'] / s['step_s']:.0%}",
            "generated tok/step": f"{s['generated_tokens']:.0f}",
            "generated tok/s": f"{s['generated_per_s']:.1f}",
            "trained tok/step": f"{s['trained_tokens']:.0f}",
            "trained tok/s": f"{s['trained_per_s']:.1f}",
            "peak RSS growth MiB": _mib(s["peak_growth_bytes"]),
            "VmHWM MiB": _mib(s["vmhwm_bytes"]),
        })
    return rows


def ratio_rows(summaries: dict[str, dict]) -> list[dict]:
    """hcrlhf / each TRL row: throughput (higher is better for hcrlhf) and peak memory (lower is better)."""
    ours = summaries.get("hcrlhf")
    rows = []
    if ours is None:
        return rows
    for side, theirs in summaries.items():
        if side == "hcrlhf":
            continue
        speed = ours["generated_per_s"] / theirs["generated_per_s"]
        trained = ours["trained_per_s"] / theirs["trained_per_s"]
        both = ours["peak_growth_bytes"], theirs["peak_growth_bytes"]
        memory = both[0] / both[1] if all(both) else None
        rows.append({
            "hcrlhf / ...": SIDES[side], "generated tok/s": f"{speed:.2f}x", "trained tok/s": f"{trained:.2f}x",
            "step time": f"{ours['step_s'] / theirs['step_s']:.2f}x",
            "peak RSS growth": "n/a" if memory is None else f"{memory:.2f}x",
            "VmHWM": f"{ours['vmhwm_bytes'] / theirs['vmhwm_bytes']:.2f}x" if ours["vmhwm_bytes"] and theirs[
                "vmhwm_bytes"] else "n/a",
            "target >= 1.5x tok/s": "met" if speed >= 1.5 else "not met",
            "target <= 0.5x memory": "n/a" if memory is None else ("met" if memory <= 0.5 else "not met"),
        })
    return rows


def phase_row(summary: dict) -> dict:
    phases = summary["phases"]
    total = summary["step_s"]
    row = {f"{p} ms": f"{v * 1e3:.1f} ({v / total:.0%})" for p, v in phases.items()}
    row["step ms"] = f"{total * 1e3:.1f}"
    return row


def versions() -> dict[str, str]:
    from importlib import metadata

    from hcrlhf.benchmarks import harness

    found = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("transformers", "trl", "accelerate", "datasets"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    import hcrlhf

    found["hcrlhf"] = f"{hcrlhf.__version__} ({harness.git_commit()})"
    found["machine"] = harness.device_name(torch.device("cpu"))
    return found


def csv_table(summaries: dict[str, dict], shape_name: str) -> list[dict]:
    """One machine-readable row per side: plain numbers, and the hcrlhf / this-side ratios."""
    ours = summaries.get("hcrlhf")
    out = []
    mib = lambda value: None if value is None else round(value / 2**20, 2)  # noqa: E731
    for side, s in summaries.items():
        row = {"side": side, "label": SIDES[side], "shape": shape_name, "step_ms_median": round(s["step_s"] * 1e3, 2),
               "step_ms_min": round(s["step_min_s"] * 1e3, 2), "step_ms_max": round(s["step_max_s"] * 1e3, 2),
               "generation_ms": round(s["generation_s"] * 1e3, 2),
               "generated_tokens_per_step": s["generated_tokens"],
               "generated_tokens_per_s": round(s["generated_per_s"], 2),
               "trained_tokens_per_step": s["trained_tokens"], "trained_tokens_per_s": round(s["trained_per_s"], 2),
               "peak_rss_growth_mib": mib(s["peak_growth_bytes"]), "vmhwm_mib": mib(s["vmhwm_bytes"])}
        if ours is not None:
            row["hcrlhf_over_this_generated_tokens_per_s"] = round(ours["generated_per_s"] / s["generated_per_s"], 3)
            row["hcrlhf_over_this_trained_tokens_per_s"] = round(ours["trained_per_s"] / s["trained_per_s"], 3)
            both = ours["peak_growth_bytes"], s["peak_growth_bytes"]
            # hcrlhf may grow by nothing at all (ratio 0); only a side that grew by nothing has no ratio.
            row["hcrlhf_over_this_peak_rss_growth"] = (round(both[0] / both[1], 3)
                                                       if both[0] is not None and both[1] else None)
        out.append(row)
    return out


def write(path: Path, text: str, csv_rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    csv_path = path.with_suffix(".csv")
    columns = list(dict.fromkeys(key for row in csv_rows for key in row))
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(csv_rows)
    return csv_path


def report(summaries: dict[str, dict], results: dict[str, dict], shape_name: str, args, load: str) -> str:
    from hcrlhf.benchmarks import harness

    shape = SHAPES[shape_name]
    env = versions()
    env.update({"threads": str(args.threads), "load average (1/5/15 min)": load,
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())})
    rows, ratios = table_rows(summaries), ratio_rows(summaries)
    lines = [f"# hcrlhf vs TRL: end-to-end RL training step ({shape_name})", "",
             " · ".join(f"{k}: {v}" for k, v in env.items()), "",
             f"Command: `{args.command_line}`", "",
             f"Model: random-init Qwen2, vocab {shape['vocab_size']}, hidden {shape['hidden_size']}, "
             f"intermediate {shape['intermediate_size']}, {shape['num_hidden_layers']} layers, "
             f"{shape['num_attention_heads']}/{shape['num_key_value_heads']} heads, tied embeddings; reward (and "
             "hcrlhf's cost) model: a one-label Qwen2ForSequenceClassification of the same shape. "
             f"Per step: {shape['prompts_per_step']} prompts x {shape['samples_per_prompt']} samples "
             f"(group size), {shape['max_new_tokens']} new tokens per response (EOS unsampleable: every response has "
             f"exactly this length), one optimizer step (num_iterations 1), AdamW lr {LEARNING_RATE:g}, KL coef "
             f"{KL_COEF:g}, grad clip {MAX_GRAD_NORM:g}, float32, CPU, {args.threads} torch threads. Median of "
             f"{args.steps} measured steps after {args.warmup} warm-up step(s) x {args.rounds} round(s) (steps "
             "pooled), each side in a fresh process per round"
             + (" (one side at a time)." if args.jobs == 1 else f", {args.jobs} sides at a time: the processes "
                "competed for the cores, so these are smoke numbers, not a comparison."), "",
             harness.markdown_table(rows),
             "Ratios (hcrlhf / TRL; the issue's targets: >= 1.5x TRL's throughput at <= 0.5x its peak memory):", "",
             harness.markdown_table(ratios)]
    if "hcrlhf" in summaries:
        lines += ["hcrlhf's own phase breakdown (median ms per step, share of the step):", "",
                  harness.markdown_table([phase_row(summaries["hcrlhf"])])]
    kernel_calls = results.get("trl-rloo-kernels", {}).get("kernel_calls")
    if kernel_calls:
        served = {name: counts for name, counts in kernel_calls.items() if sum(counts.values())}
        lines += [f"TRL + hcrlhf kernels: calls served (hcrlhf / TRL fallback): {json.dumps(served)}", ""]
    lines += ["Definitions. step ms: wall time of one whole training step (hcrlhf: `SafeRLTrainer.step()`; TRL: "
              "from `on_step_begin` to `on_step_end`, which holds generation, scoring, log-probs, loss, backward and "
              "the optimizer step; TRL's per-step logging, which runs after `on_step_end`, is left out). "
              "generation ms: hcrlhf's `time/generation` phase (tokenise prompts + `generate` + masks); TRL's "
              "`_generate` (tokenise prompts + `generate` + decode completions). "
              "generated tok/s: response tokens per step / step time. trained tok/s: prompt + response tokens of the "
              "rows that go through the training forward and backward, per step / step time. peak RSS growth: "
              "VmHWM at the end minus VmRSS after the warm-up step (VmHWM reset there). VmHWM: the process's peak "
              "RSS after the reset (includes each library's imports and models).", "",
              "Equal on every side: the policy weights, the reward model weights, the tokenizer, the prompt set and "
              "template, prompts per step, group size, response length, optimizer and its settings, one update per "
              "rollout, a reference model (KL coef > 0), sampling settings, float32, threads.", "",
              "Not equal, by each library's design: hcrlhf also runs a cost model (one more score-model forward per "
              "step, the safe-RL constraint; λ scales the advantages only and changes no work) and the rollout "
              "entropy; TRL decodes completions and re-tokenises prompt + completion for the reward model; TRL GRPO "
              "skips the rollout-policy log-prob pass when num_iterations is 1 (RLOO in both libraries runs it); "
              "each library draws prompts in its own shuffled order (the trained tok/step column shows the prompt "
              "lengths are alike); TRL logs every step (logging_steps 1, needed for its token counts; outside the "
              "timed step)."]
    return "\n".join(lines).rstrip("\n") + "\n"


# ------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hcrlhf bench race_trl", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", "--tiny", action="store_true", dest="quick",
                        help="a tiny model and rollout (well under a minute; a smoke run)")
    parser.add_argument("--steps", type=int, default=None,
                        help="measured training steps per side (default 5; --quick: 3)")
    parser.add_argument("--warmup", type=int, default=1, help="warm-up steps per side, not measured")
    parser.add_argument("--rounds", type=int, default=None,
                        help="run every side this many times, each in a fresh process, the order reversed every "
                             "other round, and pool the measured steps (the memory figures: median over rounds); "
                             "default 2, --quick: 1")
    parser.add_argument("--jobs", type=int, default=None,
                        help="sides run at once (default 1: one at a time, the only setting whose timings compare; "
                             "--quick: 2, a smoke run)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads in every side's process (default 2; --quick: 1, since on "
                             "a tiny model a second thread only adds waiting)")
    parser.add_argument("--sides", nargs="+", choices=tuple(SIDES), default=list(SIDES))
    parser.add_argument("--task-root", default=str(Path(tempfile.gettempdir()) / "hcrlhf-bench-task"))
    parser.add_argument("--out", help="markdown file to write (default benchmarks/results/race-trl.md; the CSV goes "
                                      "beside it with the .csv suffix); with --quick, results are written only when "
                                      "--out is given")
    parser.add_argument("--no-write", action="store_true", help="print only; write no results file")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 3 if args.quick else 5
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    if args.threads is None:
        args.threads = 1 if args.quick else 2
    if args.jobs is None:
        args.jobs = 2 if args.quick else 1
    for name, minimum in (("steps", 1), ("warmup", 1), ("threads", 1), ("jobs", 1), ("rounds", 1)):
        if getattr(args, name) < minimum:
            parser.error(f"--{name} must be >= {minimum}, got {getattr(args, name)}")
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return 0

    shape_name = "quick" if args.quick else "cpu"
    shape = SHAPES[shape_name]
    loads = [" ".join(f"{x:.2f}" for x in os.getloadavg())]
    args.command_line = " ".join(["hcrlhf bench race_trl", *(argv if argv is not None else sys.argv[1:])])
    per_side: dict[str, list[dict]] = {side: [] for side in args.sides}
    with tempfile.TemporaryDirectory(prefix="hcrlhf-race-") as scratch:
        prepare(Path(scratch) / "models", shape, args.task_root)

        def run(job):
            side, round_number = job
            spec = dict(side=side, dir=str(Path(scratch) / "models"), scratch=scratch, shape=shape,
                        steps=args.steps, warmup=args.warmup, threads=args.threads, task_root=args.task_root)
            started = time.perf_counter()
            result = measure(spec)
            summary = summarise(result)
            print(json.dumps({"side": side, "round": round_number, "seconds": round(time.perf_counter() - started, 1),
                              **{k: v for k, v in summary.items() if k != "phases"}}), flush=True)
            return side, result

        # Rounds: every side once per round, the order reversed every other round, so that a load that drifts
        # during the run (a shared machine) falls on every side alike.
        jobs = [(side, number) for number in range(args.rounds)
                for side in (args.sides if number % 2 == 0 else args.sides[::-1])]
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for side, result in pool.map(run, jobs):
                per_side[side].append(result)
                loads.append(" ".join(f"{x:.2f}" for x in os.getloadavg()))
    results = {side: merge_rounds(runs) for side, runs in per_side.items()}
    summaries = {side: summarise(result) for side, result in results.items()}
    load = f"{loads[0]} at the start; 1-min load after each side: {', '.join(x.split()[0] for x in loads[1:])}"
    text = report(summaries, results, shape_name, args, load)
    csv_rows = csv_table(summaries, shape_name)
    print(text)
    if not args.no_write and (args.out or not args.quick):
        path = Path(args.out) if args.out else DEFAULT_OUT
        csv_path = write(path, text, csv_rows)
        print(f"wrote {path} and {csv_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
