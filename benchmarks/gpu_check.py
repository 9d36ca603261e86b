"""One-shot GPU check: the `gpu`-marked tests and every kernel benchmark at GPU shapes, in one results file.

    python -m benchmarks.gpu_check                 # on a GPU machine: about 8 minutes
    python -m benchmarks.gpu_check --dry-run       # anywhere: the same steps on tiny shapes, no gpu tests

Steps, each a subprocess with its own time limit (the remaining time is shared out, so one slow step
cannot eat the others'): (1) ``pytest -m gpu tests/`` (skipped in a dry run), (2) ``bench logprobs
--preset check`` (the headline shapes; its section is rewritten after every case, so a step cut short keeps
what it measured), (3) ``bench advantages``, (4) ``bench train_step --estimators rloo`` (``hcrlhf bench
train_step`` alone adds ppo), (5) the pytest-benchmark op cases
(``benchmarks/test_bench_ops.py``, GPU-sized shapes, saved under results/pytest-benchmark/<device>/; in a
dry run once each, unsaved). Every step writes its section into one markdown file — by default
``benchmarks/results/<gpu-name>.md`` (a dry run: ``<tmp>/hcrlhf-gpu-check/<device>.md``, so the committed
tables are never touched) — with a "gpu_check" section listing each step's status and time.
Exits non-zero if any step failed (a floor violation included), after writing everything it could; a dry
run only warns about floor violations (tiny ops on a shared CPU time too noisily to hold a bound to).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SECTIONS = ("gpu_check", "gpu tests", "logprobs", "advantages", "train_step", "pytest-benchmark")


def steps(out: Path, dry_run: bool, device: str) -> list[tuple[str, list[str], float]]:
    """(section, command, share of the time budget) for each step."""
    py = [sys.executable, "-m"]
    if dry_run:
        return [
            ("logprobs", [*py, "hcrlhf.benchmarks.bench_logprobs", "--device", device, "--preset", "dry",
                          "--no-memory", "--floor-check", "warn", "--out", str(out)], 0.35),
            ("advantages", [*py, "hcrlhf.benchmarks.bench_advantages", "--device", device, "--shapes", "4x16",
                            "--budget", "0.05", "--floor-check", "warn", "--out", str(out)], 0.15),
            ("train_step", [*py, "hcrlhf.benchmarks.bench_train_step", "--device", device, "--tiny", "--estimators",
                            "rloo", "--iterations", "1", "--out", str(out)], 0.35),
            ("pytest-benchmark", [*py, "pytest", str(ROOT / "benchmarks" / "test_bench_ops.py"), "-q",
                                  "-p", "no:cacheprovider", "--benchmark-disable", "-k", "ours or cpp"],
             0.15),
        ]
    return [
        ("gpu tests", [*py, "pytest", str(ROOT / "tests"), "-m", "gpu", "-q", "-p", "no:cacheprovider"], 0.2),
        ("logprobs", [*py, "hcrlhf.benchmarks.bench_logprobs", "--device", device, "--preset", "check",
                      "--out", str(out)], 0.4),
        ("advantages", [*py, "hcrlhf.benchmarks.bench_advantages", "--device", device, "--budget", "0.5",
                        "--out", str(out)], 0.1),
        ("train_step", [*py, "hcrlhf.benchmarks.bench_train_step", "--device", device, "--estimators", "rloo",
                        "--iterations", "2", "--out", str(out)], 0.2),
        ("pytest-benchmark", [*py, "pytest", str(ROOT / "benchmarks" / "test_bench_ops.py"), "--benchmark-only",
                              "-q", "-p", "no:cacheprovider", "--benchmark-autosave", "--benchmark-max-time=0.2",
                              "-k", "not compile"],
         0.10),
    ]


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on any device, no gpu tests")
    parser.add_argument("--device", default=None, help="default: cuda (cpu in a dry run without one)")
    parser.add_argument("--out", type=Path, help="markdown file (default: benchmarks/results/<device>.md; a dry run "
                                                 "writes under the temp dir)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds for all steps together (default 470; a dry run 240)")
    parser.add_argument("--skip", nargs="+", default=[], choices=SECTIONS[1:], metavar="STEP",
                        help="steps to leave out (e.g. when re-running the ones that timed out)")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not args.dry_run and (device != "cuda" or not torch.cuda.is_available()):
        parser.error("needs a CUDA device (use --dry-run to check the plumbing without one)")
    from hcrlhf.benchmarks import harness

    slug = harness.device_slug(torch.device(device))
    out = args.out or (Path(tempfile.gettempdir()) / "hcrlhf-gpu-check" / f"{slug}.md" if args.dry_run
                       else harness.RESULTS_DIR / f"{slug}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    limit = args.time_limit or (240.0 if args.dry_run else 470.0)
    env = dict(os.environ)
    if args.dry_run and device == "cpu":
        env["HCRLHF_BENCH_DEVICE"] = "cpu"
    else:
        env["HCRLHF_BENCH_SIZE"] = "large"
    started = time.perf_counter()
    plan = [step for step in steps(out, args.dry_run, device) if step[0] not in args.skip]
    status_rows, failed = [], []
    for index, (section, command, share) in enumerate(plan):
        left = limit - (time.perf_counter() - started)
        later = sum(s for _, _, s in plan[index + 1:])
        budget = max(30.0, left * share / (share + later))  # this step's share of what is left
        print(f"[gpu_check] {section}: {' '.join(command)} (limit {budget:.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=budget)
            code, output = result.returncode, result.stdout + result.stderr
        except subprocess.TimeoutExpired as exc:
            code = "timeout"
            output = "".join(x.decode() if isinstance(x, bytes) else (x or "") for x in (exc.stdout, exc.stderr))
        seconds = time.perf_counter() - t0
        ok = code == 0
        if not ok:
            failed.append(section)
        status_rows.append({"step": section, "status": "ok" if ok else f"FAILED ({code})", "seconds": f"{seconds:.0f}",
                            "command": "`" + " ".join(Path(c).name if c == sys.executable else c
                                                      for c in command).replace(str(ROOT) + "/", "") + "`"})
        print(_tail(output), flush=True)
        if section in ("gpu tests", "pytest-benchmark"):  # the pytest steps write no section of their own
            summary = _tail(output, 40 if not ok else 25)
            harness.write_results(section, [], torch.device(device), out=out,
                                  notes=f"Exit status {code}, {seconds:.0f} s.\n\n```\n{summary}\n```")
        elif not ok:
            summary = _tail(output, 40)
            harness.write_results(section, [], torch.device(device), out=out,
                                  notes=f"FAILED (exit status {code}, {seconds:.0f} s):\n\n```\n{summary}\n```")
    total = time.perf_counter() - started
    notes = (f"{'Dry run (tiny shapes, no gpu tests)' if args.dry_run else 'GPU check'}: {total:.0f} s in all"
             f"{', FAILED: ' + ', '.join(failed) if failed else ', every step passed'}.")
    harness.write_results("gpu_check", status_rows, torch.device(device), out=out, notes=notes)
    print(f"[gpu_check] wrote {out}; {notes}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
