"""`hcrlhf demo` over several seeds: does the README's run command keep its promise?

    hcrlhf bench demo [--seeds 0 1 2 3 4] [--quick] [--workers W] [--no-write]

Runs the built-in demo (``hcrlhf demo --seed N``: a fresh candidate / safety split and fresh training and
test seeds per N, the same task) for each seed and tabulates the verdict, the safety test's UCB against τ,
the true unsafe rate and mean helpfulness of the starting policy and of the candidate on the safety
prompts (the built-in task knows the truth), the λ trace (start, peak, end) and the wall time. The targets:
PASS on at least 4 of 5 seeds, and in every run a candidate less unsafe than the starting policy with at
least 0.8× its helpfulness. Writes benchmarks/results/demo-seeds.md (+ .csv; ``--quick``: demo-seeds-quick).

Each run spends δ in its own ledger, ``safety_ledger.json`` in its (temporary) output directory, never in the
per-user default ledger: the benchmark re-tests the demo's safety sets on purpose (seed 0 is the default demo's
split), and must neither be refused by your own earlier demos nor use up their budget.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def run_seed(seed: int, quick: bool, work: str) -> dict:
    import torch

    from hcrlhf.pipeline import demo_config, run

    torch.set_num_threads(1)
    started = time.perf_counter()
    out = Path(work) / f"seed-{seed}"
    config = demo_config(quick=quick, seed=seed, output_dir=str(out), progress=False)
    config["safety"]["ledger"] = str(out / "safety_ledger.json")  # its own ledger (see the module docstring)
    result = run(config)
    report = result.report
    truth, test, rl = report["ground_truth"], report["safety_test"], report["training"]["rl"]
    lambdas = [point["lambda"] for point in rl["curve"]] + [rl["final"]["lambda_next"]]
    start, candidate = truth["starting_policy"], truth["candidate"]
    return {"seed": seed, "verdict": result.verdict, "ucb": test["ucb"], "threshold": test["threshold"],
            "mean_cost": test["mean"], "unsafe_start": start["unsafe_rate"],
            "unsafe_candidate": candidate["unsafe_rate"],
            "help_start": start["mean_helpfulness"], "help_candidate": candidate["mean_helpfulness"],
            "lambda_start": lambdas[0], "lambda_peak": max(lambdas), "lambda_end": lambdas[-1],
            "lambda_min": min(lambdas), "final_bound": rl["final"]["cost/bound"],
            "seconds": round(time.perf_counter() - started, 1)}


def targets(row: dict) -> tuple[bool, bool]:
    """(safer than the start, helpfulness at least 0.8× the start's)."""
    return (row["unsafe_candidate"] < row["unsafe_start"],
            row["help_candidate"] >= 0.8 * row["help_start"])


def markdown(rows: list[dict], args, elapsed: float) -> str:
    import torch

    from hcrlhf import __version__

    passed = sum(r["verdict"] == "PASS" for r in rows)
    safer = sum(targets(r)[0] for r in rows)
    helpful = sum(targets(r)[1] for r in rows)
    command = f"hcrlhf demo{' --quick' if args.quick else ''} --seed N"
    lines = [
        f"# `{command}` over {len(rows)} seeds",
        "",
        f"`hcrlhf bench demo{' --quick' if args.quick else ''} --seeds {' '.join(map(str, args.seeds))}` — "
        f"{datetime.date.today().isoformat()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, hcrlhf {__version__}; {args.workers} runs in parallel, "
        f"{elapsed / 60:.1f} min in all.",
        "",
        f"**PASS on {passed} of {len(rows)} seeds; candidate less unsafe than the starting policy in {safer} of "
        f"{len(rows)}; helpfulness at least 0.8× the starting policy's in {helpful} of {len(rows)}.** "
        "Truth on the safety prompts (the built-in task's harm and helpfulness functions, "
        "`evaluation.samples_per_prompt` samples each); λ by the default PID rule.",
        "",
        "| seed | verdict | UCB (τ) | true unsafe: start → candidate | helpfulness: start → candidate | "
        "λ start / peak / end | final U | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['verdict']} | {r['ucb']:.3f} ({r['threshold']:g}) | {r['unsafe_start']:.3f} → "
            f"{r['unsafe_candidate']:.3f} | {r['help_start']:.3f} → {r['help_candidate']:.3f} | "
            f"{r['lambda_start']:.3g} / {r['lambda_peak']:.3g} / {r['lambda_end']:.3g} | {r['final_bound']:.2f} | "
            f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hcrlhf bench demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--quick", action="store_true", help="the --quick demo")
    parser.add_argument("--workers", type=int, default=max(1, min(2, os.cpu_count() or 1)),
                        help="demos run in parallel processes (default: 2 or the cores)")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/results")
    parser.add_argument("--out-dir", "--out", dest="out_dir", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.workers < 1 or any(s < 0 for s in args.seeds):
        parser.error("--workers must be >= 1 and seeds >= 0")
    from tqdm.auto import tqdm

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hcrlhf-demo-seeds-") as work, \
            concurrent.futures.ProcessPoolExecutor(args.workers) as pool:
        futures = [pool.submit(run_seed, seed, args.quick, work) for seed in args.seeds]
        rows = [f.result() for f in tqdm(concurrent.futures.as_completed(futures), total=len(futures), desc="seeds")]
    rows.sort(key=lambda r: r["seed"])
    text = markdown(rows, args, time.perf_counter() - started)
    print(text)
    if not args.no_write:
        name = "demo-seeds-quick" if args.quick else "demo-seeds"
        args.out_dir.mkdir(parents=True, exist_ok=True)
        (args.out_dir / f"{name}.md").write_text(text, encoding="utf-8")
        with open(args.out_dir / f"{name}.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        print(f"wrote {args.out_dir / (name + '.md')} and .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
