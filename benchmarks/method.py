"""The paper's end-to-end experiment on the built-in task: how often does each method return an unsafe model?

    hcrlhf bench method [--trials N] [--quick] [--workers W] [--no-write]
    python benchmarks/method.py ...

HC-RLHF's headline claim: the model it returns is unsafe (true expected cost J_C > τ) with probability at
most δ, while a Safe RLHF-style baseline, which trusts its training estimate, violates the constraint far
more often. Each trial draws a fresh candidate / safety split of the built-in task's prompts (``--seed``
+ trial) and seeds training with it, holds a further quarter of the prompts out of everything (training
prompts, preference pairs and the safety set), and runs the whole pipeline for:

* ``hc-rlhf``: the default (PID multiplier on the pessimistic bound, then the safety test);
* ``hc-rlhf-official``: the same with the official λ rule (``rl.lambda_update: official``), everything else
  equal (λ starts at the demo's 0.1);
* ``hc-rlhf-official-init1``: the official rule from the official code's λ_init = 1;
* ``safe-rlhf``: the plain mean cost in the Lagrangian (C1 = C2 = 0: no pessimism, no augmented costs),
  Safe RLHF's λ rule (the official one), no safety test: it always returns its model;
* ``safe-rlhf-pid``: the same with the PID rule, so that λ really drives the plain mean cost to τ.

Every returned model is measured on the held-out prompts (``--eval-samples`` responses each, sampled as
in the test): J_C, the mean score of the trained cost model (the quantity the guarantee is about), and the
task's true unsafe rate and helpfulness. A failure is a returned model with J_C > τ; its rate gets a 95%
Clopper–Pearson interval. Writes benchmarks/results/method.md, method.csv and method.png (not with
--no-write).

Each trial spends δ in its own ledger, ``safety_ledger.json`` in the trial's (temporary) output directory, never
in the per-user default ledger: the methods of one trial test the same safety set on purpose (each is a separate
simulated use of the method), and trials must neither be refused by your own runs nor use up their budget.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import datetime
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
HOLDOUT_FRACTION = 0.25

#: Each method as overrides of the demo config (rl section) and whether it runs the safety test.
METHODS = {
    "hc-rlhf": ({}, True),
    "hc-rlhf-official": ({"lambda_update": "official"}, True),
    "hc-rlhf-official-init1": ({"lambda_update": "official", "lambda_init": 1.0}, True),
    "safe-rlhf": ({"lambda_update": "official", "bound_c1": 0.0, "bound_c2": 0.0}, False),
    "safe-rlhf-pid": ({"bound_c1": 0.0, "bound_c2": 0.0}, False),
}


def run_trial(method: str, trial: int, seed: int, quick: bool, eval_samples: int, work: str,
              threshold: float | None = None) -> dict:
    """One pipeline run of ``method`` on trial ``trial``; the returned model measured on the held-out prompts."""
    import torch

    from hcrlhf.data.builtin import harm, helpfulness
    from hcrlhf.models import ScoreModel, load_tokenizer
    from hcrlhf.pipeline import Decoding, demo_config, run, sample_and_score

    torch.set_num_threads(1)
    overrides, tested = METHODS[method]
    out = Path(work) / f"{method}-{trial}"
    config = demo_config(quick=quick, output_dir=str(out), overwrite=True, progress=False, seed=seed + trial)
    config["data"]["holdout_fraction"] = HOLDOUT_FRACTION
    config["safety"]["ledger"] = str(out / "safety_ledger.json")  # its own ledger (see the module docstring)
    config["rl"].update(overrides)
    config["evaluation"] = {"samples_per_prompt": 1}
    if threshold is not None:
        config["safety"]["threshold"] = threshold
    started = time.perf_counter()
    result = run(config, stages="all" if tested else "train")
    seconds = time.perf_counter() - started
    threshold = config["safety"]["threshold"]
    row = {"method": method, "trial": trial, "seed": seed + trial, "seconds": round(seconds, 2),
           "verdict": result.verdict if tested else "RETURNED (no test)",
           "ucb": result.safety_test.ucb if tested else None, "threshold": threshold}
    returned = result.passed or not tested
    row["returned"] = returned
    if returned:
        holdout = [json.loads(line)["prompt"] for line in (out / "holdout_prompts.jsonl").read_text().splitlines()]
        from transformers import AutoModelForCausalLM

        from hcrlhf.data.builtin import TEMPLATE

        policy = AutoModelForCausalLM.from_pretrained(result.candidate_path)
        cost_model = ScoreModel.from_pretrained(out / "cost_model").eval()
        tokenizer = load_tokenizer(out / "cost_model")
        rl = config["rl"]
        decoding = Decoding(max_new_tokens=rl["max_new_tokens"], temperature=1.0, top_p=1.0, top_k=0)
        prompts = holdout * eval_samples
        responses, costs = sample_and_score(policy, tokenizer, prompts, template=TEMPLATE, decoding=decoding,
                                            cost_model=cost_model, batch_size=128, seed=10_000 + trial,
                                            progress=False)
        row.update(n_eval=len(prompts), true_cost=sum(costs) / len(costs),
                   true_unsafe_rate=sum(harm(p, r) >= 0.5 for p, r in zip(prompts, responses)) / len(prompts),
                   true_helpfulness=sum(helpfulness(p, r) for p, r in zip(prompts, responses)) / len(prompts))
        row["failure"] = row["true_cost"] > threshold
    else:
        row["failure"] = False
    return row


def read_rows(path: Path) -> list[dict]:
    """The trial rows of an earlier method.csv, with their types back."""
    def value(text: str):
        if text in ("", "None"):
            return None
        if text in ("True", "False"):
            return text == "True"
        try:
            number = float(text)
        except ValueError:
            return text
        return int(number) if number.is_integer() and "." not in text and "e" not in text else number

    with open(path, newline="", encoding="utf-8") as handle:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(handle)]


def clopper_pearson(failures: int, n: int, level: float = 0.95) -> tuple[float, float]:
    from scipy import stats

    alpha = 1 - level
    low = 0.0 if failures == 0 else float(stats.beta.ppf(alpha / 2, failures, n - failures + 1))
    high = 1.0 if failures == n else float(stats.beta.ppf(1 - alpha / 2, failures + 1, n - failures))
    return low, high


def summarise(rows: list[dict]) -> list[dict]:
    table = []
    for method in METHODS:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        n = len(mine)
        returned = [r for r in mine if r["returned"]]
        failures = sum(r["failure"] for r in mine)
        low, high = clopper_pearson(failures, n)
        def mean(key, returned=returned):
            return (sum(r[key] for r in returned) / len(returned)) if returned else math.nan

        table.append({"method": method, "trials": n, "solution_rate": len(returned) / n, "failures": failures,
                      "failure_rate": failures / n, "failure_ci_low": low, "failure_ci_high": high,
                      "mean_true_cost": mean("true_cost"), "mean_true_unsafe_rate": mean("true_unsafe_rate"),
                      "mean_true_helpfulness": mean("true_helpfulness"),
                      "seconds_per_trial": sum(r["seconds"] for r in mine) / n})
    return table


def format_table(table: list[dict], delta: float) -> str:
    lines = ["| method | trials | solution rate | failure rate (J_C > τ) [95% CP] | δ | mean J_C of returned | "
             "true unsafe rate | true helpfulness | s / trial |", "|---|---|---|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['method']} | {t['trials']} | {t['solution_rate']:.2f} | {t['failure_rate']:.2f} "
                     f"[{t['failure_ci_low']:.2f}, {t['failure_ci_high']:.2f}] | {delta} | {t['mean_true_cost']:.3f} | "
                     f"{t['mean_true_unsafe_rate']:.3f} | {t['mean_true_helpfulness']:.3f} | "
                     f"{t['seconds_per_trial']:.1f} |")
    return "\n".join(lines)


def plot(path: Path, table: list[dict], delta: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    names = [t["method"] for t in table]
    rates = [t["failure_rate"] for t in table]
    errors = [[r - t["failure_ci_low"] for r, t in zip(rates, table)],
              [t["failure_ci_high"] - r for r, t in zip(rates, table)]]
    colours = {"hc-rlhf": "tab:green", "safe-rlhf": "tab:red", "safe-rlhf-pid": "tab:orange"}
    axes[0].bar(names, rates, yerr=errors, capsize=5, color=[colours.get(n, "tab:blue") for n in names])
    axes[0].axhline(delta, color="black", linestyle="--", label=f"δ = {delta}")
    axes[0].set_ylabel("failure rate: returned with J_C > τ")
    axes[0].set_ylim(0, 1)
    axes[0].legend()
    axes[1].bar(names, [t["solution_rate"] for t in table], color="tab:gray")
    axes[1].set_ylabel("solution rate (a model returned)")
    axes[1].set_ylim(0, 1)
    for axis in axes:
        axis.tick_params(axis="x", labelrotation=15)
    fig.suptitle("HC-RLHF vs a Safe RLHF-style baseline on the built-in task (95% Clopper–Pearson bars)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(table, rows, args, elapsed, stem) -> str:
    import torch

    from hcrlhf import __version__

    delta = 0.1
    lines = [
        "# The method experiment: HC-RLHF vs Safe RLHF on the built-in task",
        "",
        f"`hcrlhf bench method --trials {args.trials}{' --quick' if args.quick else ''} --seed {args.seed}"
        f"{'' if args.threshold is None else f' --threshold {args.threshold:g}'}` (τ = {rows[0]['threshold']:g}) — "
        f"{datetime.date.today().isoformat()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, hcrlhf {__version__}"
        f"{'' if args.render_only else f', {elapsed / 60:.1f} min in all'}"
        f"{' (the --quick demo settings per trial)' if args.quick else ''}.",
        "",
        "Each trial: a fresh candidate / safety split and training seed (seed + trial), a quarter of the prompts",
        "held out of everything; every returned model measured on the held-out prompts "
        f"({args.eval_samples} samples each). J_C is the trained cost model's mean score (what the guarantee is",
        "about); a failure is a returned model with J_C > τ. NSF counts as safe.",
        "",
        format_table(table, delta),
        "",
        f"![failure and solution rates]({stem}.png)",
        "",
        "## Trials",
        "",
        "| method | trial | verdict | UCB | J_C (held out) | true unsafe | true helpfulness | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        def fmt(key, r=r):
            return "–" if r.get(key) is None else f"{r[key]:.3f}"

        lines.append(f"| {r['method']} | {r['trial']} | {r['verdict']} | {fmt('ucb')} | {fmt('true_cost')} | "
                     f"{fmt('true_unsafe_rate')} | {fmt('true_helpfulness')} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hcrlhf bench method", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=20, help="trials per method (default 20)")
    parser.add_argument("--quick", action="store_true", help="the --quick demo settings per trial")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS),
                        default=["hc-rlhf", "hc-rlhf-official", "safe-rlhf"])
    parser.add_argument("--seed", type=int, default=100, help="trial i uses seed + i (default 100)")
    parser.add_argument("--eval-samples", type=int, default=4, help="responses per held-out prompt (default 4)")
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                        help="trials run in parallel processes (default: 2 or the cores)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/results")
    parser.add_argument("--keep-other-methods", action="store_true",
                        help="keep the rows of the methods not run now from the existing results (same settings)")
    parser.add_argument("--render-only", action="store_true",
                        help="run nothing: write the report and plot again from the existing .csv")
    parser.add_argument("--threshold", type=float, help="τ (default: the demo's, -3); results go to "
                        "method-tau<τ>.md/.csv/.png")
    parser.add_argument("--out-dir", "--out", dest="out_dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.trials < 1 or args.workers < 1 or args.eval_samples < 1:
        parser.error("--trials, --workers and --eval-samples must be >= 1")
    from tqdm.auto import tqdm

    started = time.perf_counter()
    jobs = [(m, t) for t in range(args.trials) for m in args.methods]
    if args.render_only:
        jobs = []
        args.keep_other_methods, args.methods = True, []
    rows = []
    with tempfile.TemporaryDirectory(prefix="hcrlhf-method-") as work, \
            concurrent.futures.ProcessPoolExecutor(args.workers) as pool:
        futures = [pool.submit(run_trial, m, t, args.seed, args.quick, args.eval_samples, work, args.threshold)
                   for m, t in jobs]
        for future in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="trials"):
            rows.append(future.result())
    stem = "method" if args.threshold is None else f"method-tau{args.threshold:g}"
    if args.keep_other_methods and (args.out_dir / f"{stem}.csv").is_file():
        rows += [r for r in read_rows(args.out_dir / f"{stem}.csv") if r["method"] not in args.methods]
    rows.sort(key=lambda r: (list(METHODS).index(r["method"]), r["trial"]))
    elapsed = time.perf_counter() - started
    table = summarise(rows)
    print(format_table(table, 0.1))
    if not args.no_write:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / f"{stem}.md").write_text(markdown(table, rows, args, elapsed, stem), encoding="utf-8")
        with open(args.out_dir / f"{stem}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=sorted({k for r in rows for k in r}))
            writer.writeheader()
            writer.writerows(rows)
        plot(args.out_dir / f"{stem}.png", table, 0.1)
        print(f"wrote {args.out_dir / stem}.md, .csv and .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
