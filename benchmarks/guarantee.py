"""Validate the high-confidence guarantee on synthetic problems (the protocol of docs/method.md#confidence-bounds).

    hcrlhf bench guarantee [--trials N] [--delta D] [--quick] [--no-write]
    python benchmarks/guarantee.py ...

For five cost settings (clipped Gaussian, Bernoulli, skewed Beta, a rare 0/1 event, rare severe
continuous costs) and four regimes of candidate selection, runs N independent trials of the whole
method (fresh candidate and safety draws each) with every bound, and reports per method the
failure rate (a model with true J_C > τ returned) with a 95% Clopper–Pearson band against δ, and the
solution rate. Prints the table and writes benchmarks/results/guarantee.md, guarantee.csv and
guarantee.png (not with --quick or --no-write).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import scipy

from hcrlhf import __version__
from hcrlhf.safety import METHODS
from hcrlhf.safety import validate as v

RESULTS_DIR = Path(__file__).resolve().parent / "results"
#: Candidates crowded around τ, the highest rewards on the unsafe side: what a training run that
#: drives the cost onto the threshold leaves for selection.
NEAR_THRESHOLD = (0.5, 0.8, 0.9, 0.95, 0.98, 1.005, 1.01, 1.02)


@dataclasses.dataclass(frozen=True)
class Regime:
    name: str
    title: str
    description: str
    selection: str
    relative_means: tuple[float, ...]
    n_candidate: int
    n_safety: int
    c1: float = 4.0
    c2: float = 2.0


REGIMES = (
    Regime(
        "boundary",
        "A. The test alone at the boundary",
        "One candidate with true J_C = 1.001·τ (unsafe by a hair) goes straight to the safety test "
        '(`selection="none"`), n_s = 100 as in the official code. The failure rate is the test\'s pass '
        "probability at the boundary: the worst case the guarantee must cover, so it must be ≤ δ.",
        "none",
        (1.001,),
        256,
        100,
    ),
    Regime(
        "naive",
        "B. Naive selection near the threshold",
        "Eight candidates with J_C/τ ∈ {0.5, 0.8, 0.9, 0.95, 0.98, 1.005, 1.01, 1.02}, reward rising with "
        "cost; selection keeps the best candidate whose candidate mean is ≤ τ (pessimistic bound with "
        "c1 = c2 = 0), n_c = 256, n_s = 100. Stands in for a training run that pushes the cost onto τ.",
        "pessimistic",
        NEAR_THRESHOLD,
        256,
        100,
        c1=0.0,
        c2=0.0,
    ),
    Regime(
        "hc-rlhf",
        "C. HC-RLHF's pessimistic selection",
        "Eight candidates with J_C/τ ∈ {0.5, 0.7, 0.85, 0.95, 1.02, 1.1, 1.25, 1.5}; selection by "
        "U = μ̂ + k·σ̂ with the official c1 = 4, c2 = 2 (docs/method.md#candidate-selection), "
        "n_c = 256 (the official buffer), n_s = 1000.",
        "pessimistic",
        v.DEFAULT_RELATIVE_MEANS,
        256,
        1000,
    ),
    Regime(
        "seldonian",
        "D. Seldonian selection (each method predicts its own test)",
        "Same candidates; selection by `predicted_upper_bound` of the method that will run the test, "
        "inflation 2, n_c = 256, n_s = 1000.",
        "predicted",
        v.DEFAULT_RELATIVE_MEANS,
        256,
        1000,
    ),
)

COLORS = {
    "ttest": "#d62728",
    "hoeffding": "#7f7f7f",
    "bernstein": "#8c564b",
    "betting": "#1f77b4",
    "clopper_pearson": "#2ca02c",
}


def run(regimes, n_trials: int, delta: float, seed: int) -> list[tuple[Regime, list[v.MethodOutcome]]]:
    results = []
    for regime in regimes:
        started = time.perf_counter()
        outcomes = []
        for problem in v.default_problems(regime.relative_means, regime.n_candidate, regime.n_safety):
            outcomes += v.run_trials(
                problem,
                METHODS,
                n_trials=n_trials,
                delta=delta,
                selection=regime.selection,
                c1=regime.c1,
                c2=regime.c2,
                seed=seed,
            )
        print(f"[{regime.name}] {len(outcomes)} settings x {n_trials} trials in {time.perf_counter() - started:.1f} s")
        results.append((regime, outcomes))
    return results


def findings(results, delta: float) -> list[str]:
    """Plain statements computed from the numbers (nothing here is hard-coded)."""
    lines = []
    for regime, outcomes in results:
        exact = [o for o in outcomes if o.validity == "exact"]
        worst = max(exact, key=lambda o: o.failure_rate)
        ttest = [o for o in outcomes if o.method == "ttest"]
        over = [o for o in ttest if o.violates]
        highest = (
            f"highest failure rate {worst.failure_rate:.4f} ({worst.method} on {worst.problem})"
            if worst.failures
            else "no failure in any trial"
        )
        text = f"**{regime.title}.** Exact methods: {highest}; " + (
            "all ≤ δ."
            if all(o.failure_rate <= delta for o in exact)
            else (
                "some point estimates exceed δ, "
                + ("none significantly." if not any(o.violates for o in exact) else "**some significantly**.")
            )
        )
        if over:
            text += " The t-test's failure rate is significantly above δ = {:g} on {}.".format(
                delta, ", ".join(f"{o.problem} ({o.failure_rate:.3f}, band [{o.failure_band[0]:.3f}, …])" for o in over)
            )
        else:
            text += f" The t-test stays within δ here (max {max(o.failure_rate for o in ttest):.4f})."
        if regime.selection != "none":
            by_method = {
                m: np.mean([o.solution_rate for o in outcomes if o.method == m])
                for m in METHODS
                if any(o.method == m for o in outcomes)
            }
            text += " Mean solution rate over the problems: " + ", ".join(
                f"{m} {rate:.3f}" for m, rate in by_method.items()
            )
            text += " (clopper_pearson: 0/1 problems only)."
        lines.append(text)
    return lines


def markdown(results, args, elapsed: float) -> str:
    out = [
        "# Guarantee validation",
        "",
        f"Generated by `python benchmarks/guarantee.py --trials {args.trials} --delta {args.delta:g} "
        f"--seed {args.seed}` on {datetime.date.today().isoformat()} in {elapsed:.0f} s "
        f"(hcrlhf {__version__}, numpy {np.__version__}, scipy {scipy.__version__}, Python "
        f"{platform.python_version()}, {platform.machine()}).",
        "",
        "## Protocol",
        "",
        "Each problem has candidate policies whose per-response cost distributions, and so true mean costs "
        "J_C, are known exactly. One trial: draw n_c candidate costs per candidate, select a candidate "
        "(regime below; no candidate qualifying = NO SOLUTION FOUND), draw n_s fresh safety costs from it, "
        "run the safety test (UCB ≤ τ) with each method. A trial **fails** if the test passes a candidate "
        "with J_C > τ (NSF counts as safe) and **solves** if the test passes. Every method sees the same "
        f"draws. {args.trials} trials per (regime, problem); δ = {args.delta:g}; failure rates with a "
        "two-sided 95% Clopper–Pearson band; `≤ δ?` is **NO** when the band lies entirely above δ. "
        "`returned J_C/τ` is the mean true cost of the returned models relative to τ (higher = more "
        "reward kept). `ttest` is the paper's default (asymptotic); the other four are exact.",
        "",
        "| problem | costs | τ | 0/1 |",
        "|---|---|---:|---|",
    ]
    for problem in v.default_problems():
        out.append(
            f"| {problem.name} | {problem.description} | {problem.threshold:g} | {'yes' if problem.binary else 'no'} |"
        )
    out += ["", "## Findings (computed from the tables below)", ""]
    out += [f"- {line}" for line in findings(results, args.delta)]
    out += [
        "",
        "How to read them: regimes A and B probe validity (the selected model sits at or just above τ, "
        "so the test alone decides whether an unsafe model gets out); C and D show what the guarantee "
        "costs in solutions when selection leaves a margin. A failure rate of 0 with a low solution rate "
        "means a valid but loose bound; a failure rate above δ means the stated guarantee does not hold "
        "for that cost distribution.",
    ]
    out += ["", "![failure and solution rates](guarantee.png)", ""]
    for regime, outcomes in results:
        out += [f"## {regime.title}", "", regime.description, "", v.format_table(outcomes), ""]
    return "\n".join(out)


def write_csv(path: Path, results) -> None:
    rows = [dict(regime=regime.name, **o.to_dict()) for regime, outcomes in results for o in outcomes]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def plot(path: Path, results, delta: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = v.default_problems()
    names = [p.name for p in problems]
    fig, axes = plt.subplots(len(results), 2, figsize=(15, 3.7 * len(results) + 0.8), squeeze=False)
    width = 0.8 / len(METHODS)

    def offset(i: int) -> float:
        return (i - (len(METHODS) - 1) / 2) * width

    for row, (regime, outcomes) in enumerate(results):
        table = {(o.problem, o.method): o for o in outcomes}
        fail_ax, solve_ax = axes[row]
        top = max(0.25, max(o.failure_band[1] for o in outcomes) + 0.03)
        for i, method in enumerate(METHODS):
            xs, fail, low, high, solve = [], [], [], [], []
            for j, problem in enumerate(problems):
                o = table.get((problem.name, method))
                if o is None:
                    fail_ax.text(j + offset(i), 0.004, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
                    solve_ax.text(j + offset(i), 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=7)
                    continue
                xs.append(j + offset(i))
                fail.append(o.failure_rate)
                low.append(o.failure_rate - o.failure_band[0])
                high.append(o.failure_band[1] - o.failure_rate)
                solve.append(o.solution_rate)
            label = f"{method} ({'asymptotic' if method == 'ttest' else 'exact'})"
            fail_ax.bar(xs, fail, width, color=COLORS[method], label=label, yerr=[low, high], capsize=2, ecolor="black")
            fail_ax.scatter(xs, fail, marker="_", s=120, color=COLORS[method], zorder=3)  # zero bars stay visible
            solve_ax.bar(xs, solve, width, color=COLORS[method], label=label)
            solve_ax.scatter(xs, solve, marker="_", s=120, color=COLORS[method], zorder=3)
        fail_ax.axhline(delta, color="black", linestyle="--", linewidth=1.2)
        fail_ax.text(len(problems) - 0.5, delta, f"δ = {delta:g} ", va="bottom", ha="right", fontsize=9)
        fail_ax.set_ylim(0, top)
        fail_ax.set_ylabel("failure rate")
        fail_ax.set_title(f"{regime.title}: failure rate (95% CP band)", fontsize=11, loc="left")
        solve_ax.set_ylim(0, 1.05)
        solve_ax.set_ylabel("solution rate")
        title = f"{regime.title}: solution rate"
        if regime.selection == "none":
            title += " (= failure rate here)"
        solve_ax.set_title(title, fontsize=11, loc="left")
        for ax in (fail_ax, solve_ax):
            ax.set_xticks(range(len(problems)))
            ax.set_xticklabels(names)
            ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    trials = results[0][1][0].n_trials
    fig.suptitle(
        f"hcrlhf guarantee validation: {trials} trials per bar, δ = {delta:g}; "
        "a valid method keeps every failure bar at or below the dashed line",
        y=0.995,
        fontsize=12,
    )
    fig.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.975), ncol=len(METHODS), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hcrlhf bench guarantee", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=4000, help="trials per (regime, problem) (default 4000)")
    parser.add_argument("--delta", type=float, default=0.1, help="δ of the safety test (default 0.1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--regimes", nargs="+", choices=[r.name for r in REGIMES], default=[r.name for r in REGIMES])
    parser.add_argument("--quick", action="store_true", help="200 trials, print only (a smoke run)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/results")
    parser.add_argument("--out-dir", "--out", dest="out_dir", type=Path, default=RESULTS_DIR,
                        help="where to write guarantee.md/.csv/.png")
    args = parser.parse_args(argv)
    if args.quick:
        args.trials = min(args.trials, 200)
    if args.trials < 1:
        parser.error("--trials must be >= 1")
    if not 0.0 < args.delta < 1.0 or not math.isfinite(args.delta):
        parser.error("--delta must be in (0, 1)")

    started = time.perf_counter()
    regimes = [r for r in REGIMES if r.name in args.regimes]
    results = run(regimes, args.trials, args.delta, args.seed)
    elapsed = time.perf_counter() - started
    for regime, outcomes in results:
        print(f"\n## {regime.title}\n")
        print(v.format_table(outcomes))
    print()
    for line in findings(results, args.delta):
        print("-", line)
    if not (args.quick or args.no_write):
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / "guarantee.md").write_text(markdown(results, args, elapsed))
        write_csv(args.out_dir / "guarantee.csv", results)
        plot(args.out_dir / "guarantee.png", results, args.delta)
        print(f"\nwrote {args.out_dir / 'guarantee.md'}, guarantee.csv and guarantee.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
