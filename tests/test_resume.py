"""`hcrlhf run --resume` / `hcrlhf demo --resume`: a killed run continues where it stopped (built-in task, small
settings).

* ``kill -9`` of `hcrlhf run` after its first RL checkpoint, then `hcrlhf run ... --resume`: the candidate's weights
  and the safety test's UCB are bit for bit those of an uninterrupted run of the same config (its own ledger);
  the manifest and the report record the resumption;
* refused: a resumption with a changed config key (named), of a finished run, of a directory without a run,
  and `--resume --overwrite`;
* ``kill -9`` at exact points (before candidate selection; in the safety test before δ is spent; after it is
  spent): the first two resume to the uninterrupted result with δ spent once, the last is refused without
  touching the ledger or the candidate.
"""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hcrlhf.pipeline import ConfigError, demo_config, load_config, run

SMALL = ["reward.max_steps=6", "cost.max_steps=6", "rl.total_steps=6", "rl.checkpoint_every=2",
         "evaluation.samples_per_prompt=1", "safety.threshold=1e6"]


def write_config(task, path: Path) -> Path:
    values = demo_config(quick=True, output_dir="unused", task_cache=str(task.root.parent), progress=False)
    path.write_text(yaml.safe_dump(json.loads(json.dumps(values, default=str))), encoding="utf-8")
    return path


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "hcrlhf.cli", *map(str, args)]


def weights(out: Path) -> dict:
    report = json.loads((out / "report.json").read_text())
    return load_file(out / report["candidate"] / "model.safetensors")


def test_a_killed_run_resumes_to_the_uninterrupted_result(task, tmp_path):
    config = write_config(task, tmp_path / "config.yaml")
    out, ledger = tmp_path / "out", tmp_path / "ledger.json"
    args = [*SMALL, f"safety.ledger={ledger}"]
    process = subprocess.Popen(cli("run", config, *args, "--output", out), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    first = out / "rl" / "checkpoints" / "step-00000002"
    deadline = time.monotonic() + 300
    try:
        while not first.exists():
            if process.poll() is not None:
                pytest.fail(f"the run ended before its first checkpoint: {process.stderr.read().decode()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail("the run did not reach its first RL checkpoint")
            time.sleep(0.02)
    finally:
        process.kill()  # SIGKILL: no clean-up runs
        process.wait(timeout=30)
        process.stderr.close()
    manifest = json.loads((out / "hcrlhf_run.json").read_text())
    assert manifest["status"] == "running", "killed too late: the run finished"
    assert not (out / "rl" / "checkpoints" / "step-00000006").exists(), "killed too late: RL finished"
    assert {"reward_model", "cost_model"} <= set(manifest["completed"])

    # Refused, nothing changed: a changed key (named), and --resume with --overwrite.
    def listing():  # (the dead run's stale lock file is taken over and dropped by a refused run)
        return sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.name != "hcrlhf_run.lock")

    before = listing()
    changed = subprocess.run(cli("run", config, *args, "rl.kl_coef=0.123", "--output", out, "--resume"),
                             capture_output=True, text=True, timeout=300)
    assert changed.returncode == 2 and "rl.kl_coef" in changed.stderr and "0.123" in changed.stderr
    both = subprocess.run(cli("run", config, *args, "--output", out, "--resume", "--overwrite"),
                          capture_output=True, text=True, timeout=300)
    assert both.returncode == 2 and "--resume and --overwrite cannot be combined" in both.stderr
    assert listing() == before

    resumed = subprocess.run(cli("run", config, *args, "--output", out, "--resume"), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode in (0, 3), resumed.stderr[-3000:]
    assert "resume: candidate selection continues from step" in resumed.stderr
    manifest = json.loads((out / "hcrlhf_run.json").read_text())
    assert manifest["status"] == "finished" and len(manifest["resumes"]) == 1
    step = manifest["resumes"][0]["rl_from_step"]
    assert step in (2, 4) and manifest["resumes"][0]["previous_status"] == "running"
    report = json.loads((out / "report.json").read_text())
    assert report["resumed"][0]["rl_from_step"] == step and report["training"]["rl"]["resumed_from_step"] == step
    assert [m["step"] for m in report["training"]["rl"]["curve"]] == [1, 2, 3, 4, 5, 6]

    # The uninterrupted run of the same config (its own ledger: it spends δ on the same safety set).
    reference = run(load_config(yaml.safe_load(config.read_text()),
                                [*SMALL, f"safety.ledger={tmp_path / 'reference-ledger.json'}",
                                 f"output_dir={tmp_path / 'reference'}"]))
    assert report["safety_test"]["ucb"] == reference.report["safety_test"]["ucb"]
    assert report["verdict"] == reference.verdict
    mine, theirs = weights(out), weights(tmp_path / "reference")
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)

    # A finished run: nothing to resume.
    again = subprocess.run(cli("run", config, *args, "--output", out, "--resume"), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 2 and "nothing to resume" in again.stderr


def test_resume_of_a_finished_run_or_of_no_run_is_refused(task, tmp_path):
    out = tmp_path / "out"
    values = demo_config(quick=True, output_dir=str(out), task_cache=str(task.root.parent), progress=False)
    config = load_config(values, [*SMALL, f"safety.ledger={tmp_path / 'ledger.json'}"])
    with pytest.raises(ConfigError, match="nothing to resume"):
        run(config, stages="reward", resume=True)
    assert not out.exists()
    run(config, stages="reward")
    with pytest.raises(ConfigError, match="finished .*nothing to resume"):
        run(config, stages="reward", resume=True)
    with pytest.raises(ConfigError, match="cannot be combined with overwrite"):
        run(load_config(values | {"overwrite": True}, [*SMALL]), stages="reward", resume=True)


# ---- kill -9 at exact points (a wrapper SIGKILLs the CLI process where it is patched in) -----------------

KILL_AT = r'''
import os, signal, sys
from hcrlhf.pipeline import core
from hcrlhf.safety import ledger

point, argv = sys.argv[1], sys.argv[2:]
die = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
if point == "before-rl":  # reward and cost models done, candidate selection not begun
    core._train_candidate = die
elif point == "before-spend":  # candidate trained, safety responses generated and scored, δ not yet spent
    ledger.SafetyLedger.spend = die
elif point == "after-spend":  # δ spent, the verdict not yet read
    spend = ledger.SafetyLedger.spend
    ledger.SafetyLedger.spend = lambda *args, **kwargs: (spend(*args, **kwargs), die())
from hcrlhf.cli import main
sys.exit(main(argv))
'''


def killed_at(point: str, *args) -> subprocess.CompletedProcess:
    killed = subprocess.run([sys.executable, "-c", KILL_AT, point, *map(str, args)], capture_output=True, text=True,
                            timeout=600)
    assert killed.returncode == -9, f"not killed at {point}: rc {killed.returncode}\n{killed.stderr[-3000:]}"
    return killed


@pytest.fixture(scope="module")
def uninterrupted(task, tmp_path_factory):
    """The demo (quick, SMALL) run through without a kill: what every resumption must reproduce."""
    root = tmp_path_factory.mktemp("uninterrupted")
    values = demo_config(quick=True, output_dir=str(root / "out"), task_cache=str(task.root.parent), progress=False)
    return run(load_config(values, [*SMALL, f"safety.ledger={root / 'ledger.json'}"]))


def demo_args(task, out: Path, ledger: Path) -> list:
    return ["demo", "--quick", "--cache-dir", task.root.parent, "--output", out, "--no-progress", *SMALL,
            f"safety.ledger={ledger}"]


def assert_same_result(out: Path, reference) -> None:
    report = json.loads((out / "report.json").read_text())
    assert report["verdict"] == reference.verdict
    assert report["safety_test"]["ucb"] == reference.report["safety_test"]["ucb"]
    assert report["safety_test"]["costs"] == reference.report["safety_test"]["costs"]
    mine, theirs = weights(out), weights(reference.output_dir)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_demo_killed_before_candidate_selection_resumes_with_demo_resume(task, tmp_path, uninterrupted):
    out, ledger = tmp_path / "out", tmp_path / "ledger.json"
    killed_at("before-rl", *demo_args(task, out, ledger))
    manifest = json.loads((out / "hcrlhf_run.json").read_text())
    assert manifest["status"] == "running" and {"reward_model", "cost_model"} <= set(manifest["completed"])
    assert not (out / "rl").exists() and not ledger.exists()
    # A plain re-run is refused (it would replace the run); --resume continues it.
    again = subprocess.run(cli(*demo_args(task, out, ledger)), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "--resume" in again.stderr
    resumed = subprocess.run(cli(*demo_args(task, out, ledger), "--resume"), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode in (0, 3), resumed.stderr[-3000:]
    assert "resume: reusing" in resumed.stderr
    assert_same_result(out, uninterrupted)


def test_killed_in_the_safety_test_before_spending_delta_resumes_to_the_same_verdict(task, tmp_path, uninterrupted):
    out, ledger = tmp_path / "out", tmp_path / "ledger.json"
    killed_at("before-spend", *demo_args(task, out, ledger))
    assert not ledger.exists(), "δ was spent"
    assert not (out / "report.json").exists() and (out / "candidate").is_dir()
    resumed = subprocess.run(cli(*demo_args(task, out, ledger), "--resume"), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode in (0, 3), resumed.stderr[-3000:]
    assert_same_result(out, uninterrupted)
    tests = json.loads(ledger.read_text())["sets"][uninterrupted.report["fingerprints"]["safety_set"]]["tests"]
    assert len(tests) == 1, "δ must be spent once"


def test_killed_after_spending_delta_cannot_test_the_set_again(task, tmp_path):
    out, ledger = tmp_path / "out", tmp_path / "ledger.json"
    killed_at("after-spend", *demo_args(task, out, ledger))
    spent = ledger.read_text()
    candidate = sorted(p.relative_to(out).as_posix() for p in (out / "candidate").rglob("*"))
    resumed = subprocess.run(cli(*demo_args(task, out, ledger), "--resume"), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 1, resumed.stderr[-3000:]  # (the ledger's refusal, as for any re-test)
    assert "BudgetExceededError" in resumed.stderr and "already spent δ on this safety set" in resumed.stderr
    assert "spend δ twice" in resumed.stderr
    assert ledger.read_text() == spent, "a refused resumption must not touch the ledger"
    assert sorted(p.relative_to(out).as_posix() for p in (out / "candidate").rglob("*")) == candidate, \
        "the candidate must be kept"
