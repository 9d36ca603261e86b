"""Several processes under real ``torchrun`` (gloo on this CPU, 2 ranks): what a user of
``torchrun --nproc-per-node N -m hcrlhf ...`` relies on (docs/distributed.md).

* a 2-rank run of the built-in task equals a 1-rank run with the same global batch over 3 iterations, for the
  FSDP2 path (RLOO, micro-batched, frozen models sharded too) and the replicated path (PPO with LoRA: two
  critics, two epochs, whitening over both ranks' tokens; the saved policy has the adapters merged): the same
  sampled tokens, metrics and final weights within float32 reduction-order error;
* the 2-rank safety test of the saved policy gives the 1-rank costs, UCB and verdict, and δ is spent once;
* a 2-rank run killed after its second checkpoint resumes to the same weights as the uninterrupted run;
* a rank that raises, or dies without a word, ends the whole job, non-zero, with the cause, within the timeout.

Tolerances. Both runs compute the same sums, split differently: a rank's forward sees 4 rows instead of 8 (CPU
GEMMs may round a row differently with the batch shape), and the ranks average two half-batch gradients instead
of one backward over the whole batch. Those differ in the last float32 bits (~1e-7 relative). Adam's update
m/√v is scale-free per element, so for an element whose gradient is itself near rounding level those bits can
change the step by a good fraction of lr = 1e-3: elements are compared with atol 1e-4 (a tenth of one step),
and the whole difference must be under 1e-4 of how far training moved the weights (the norm of the change);
the metrics with rtol 1e-4. A sampling or data-split bug changes tokens (tested exactly) and moves metrics and
weights by whole percent (checked by breaking the rank scaling of the loss, the global prompt index of the
sampling seeds and the cost gathering: each fails here).
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT_S = 60  # HCRLHF_DIST_TIMEOUT of the jobs: a collective waits at most this long for a rank


def _free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def torchrun(nproc: int, *args, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc-per-node nproc`` of ``args`` (a script and its arguments, or ``-m module ...``)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HCRLHF_DIST_TIMEOUT=str(TIMEOUT_S), PYTHONUNBUFFERED="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), *map(str, args)]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def train(task, out: Path, nproc: int, *extra) -> dict:
    done = torchrun(nproc, WORKER, "--task-root", task.root, "--out", out, *extra)
    assert done.returncode == 0, f"torchrun failed ({done.returncode}):\n{done.stderr[-6000:]}"
    return json.loads((out / "result.json").read_text())


def weights(directory: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(directory / "model.safetensors")


def assert_same_run(one: dict, two: dict, one_dir: Path, two_dir: Path, start: Path) -> None:
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert len(one["history"]) == len(two["history"]) == 3
    for first, second in zip(one["history"], two["history"]):
        assert first["tokens"] == second["tokens"] and first["step"] == second["step"]  # the same samples
        assert first.keys() == second.keys()
        for name, value in first.items():
            assert second[name] == pytest.approx(value, rel=1e-4, abs=1e-6), (first["step"], name)
    a, b, initial = weights(one_dir / "policy"), weights(two_dir / "policy"), weights(start)
    assert a.keys() == b.keys() == initial.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-4, msg=lambda m, n=name: f"{n}: {m}")
    difference = torch.cat([(b[n] - a[n]).reshape(-1) for n in a]).norm()
    moved = torch.cat([(a[n] - initial[n]).reshape(-1) for n in a]).norm()
    assert moved > 1e-2  # they trained: equal weights are not merely unchanged ones
    assert difference <= 1e-4 * moved, f"the runs differ by {difference / moved:.2e} of what training moved"


@pytest.fixture(scope="module")
def runs(task, tmp_path_factory):
    """1-rank and 2-rank FSDP2 RLOO runs of 3 iterations, each followed by the safety test of its policy."""
    root = tmp_path_factory.mktemp("torchrun")
    task.load_policy().save_pretrained(root / "start", safe_serialization=True)
    results = {}
    for nproc in (1, 2):
        results[nproc] = train(task, root / f"rloo-{nproc}", nproc, "--steps", 3)
    return root, results


def test_two_ranks_train_as_one(runs):
    root, results = runs
    assert_same_run(results[1], results[2], root / "rloo-1", root / "rloo-2", root / "start")
    # Sharded checkpoints: one torch.distributed.checkpoint file per rank, listed in the manifest.
    last = root / "rloo-2" / "rl" / "checkpoints" / "step-00000003"
    manifest = json.loads((last / "manifest.json").read_text())
    assert sorted(n for n in manifest["files"] if n.startswith("sharded/") and n.endswith(".distcp")) == [
        "sharded/__0_0.distcp", "sharded/__1_0.distcp"]
    # The candidate of a sharded run is one ordinary HF model (the class, not FSDP's wrapper, in its config).
    saved = json.loads((root / "rloo-2" / "policy" / "config.json").read_text())
    assert saved["architectures"] == ["Qwen2ForCausalLM"]
    # One log: rank 0 alone wrote metrics.jsonl, one line per iteration.
    assert len((root / "rloo-2" / "rl" / "metrics.jsonl").read_text().splitlines()) == 3


def test_two_rank_safety_test_matches_one_rank(runs):
    _, results = runs
    one, two = results[1], results[2]
    assert len(two["costs"]) == 24
    assert two["costs"] == pytest.approx(one["costs"], abs=1e-5)
    assert two["ucb"] == pytest.approx(one["ucb"], abs=1e-5)
    assert two["verdict"] == one["verdict"]
    assert two["ledger_spent"] == pytest.approx(0.1)  # δ spent once, by rank 0


def test_replicated_ppo_with_lora_two_ranks_train_as_one(task, tmp_path):
    task.load_policy().save_pretrained(tmp_path / "start", safe_serialization=True)
    extra = ("--steps", 3, "--estimator", "ppo", "--sharding", "replicate", "--lora", "--no-safety")
    one = train(task, tmp_path / "ppo-1", 1, *extra)
    two = train(task, tmp_path / "ppo-2", 2, *extra)
    assert_same_run(one, two, tmp_path / "ppo-1", tmp_path / "ppo-2", tmp_path / "start")


def test_killed_run_resumes_exactly(runs, task, tmp_path):
    root, results = runs
    out = tmp_path / "killed"
    started = time.perf_counter()
    died = torchrun(2, WORKER, "--task-root", task.root, "--out", out, "--steps", 3, "--no-safety",
                    "--fail-at", 3, "--fail-how", "exit")
    assert died.returncode != 0
    assert time.perf_counter() - started < 120  # the job ended; nobody waited for the dead rank
    checkpoints = sorted(p.name for p in (out / "rl" / "checkpoints").iterdir() if p.name.startswith("step-"))
    assert checkpoints[-1] == "step-00000002"
    resumed = train(task, out, 2, "--steps", 3, "--no-safety", "--resume")
    assert [m["step"] for m in resumed["history"]] == [3]
    a, b = weights(root / "rloo-2" / "policy"), weights(out / "policy")
    for name in a:  # the same process count and splits: the same float operations, so bitwise
        assert torch.equal(a[name], b[name]), name
    assert resumed["history"][0] == pytest.approx({k: v for k, v in results[2]["history"][-1].items()})


def test_a_rank_that_raises_ends_the_job(task, tmp_path):
    started = time.perf_counter()
    done = torchrun(2, WORKER, "--task-root", task.root, "--out", tmp_path, "--steps", 3, "--no-safety",
                    "--fail-at", 2)
    elapsed = time.perf_counter() - started
    assert done.returncode != 0
    assert "rank 1 fails on purpose at iteration 2" in done.stderr
    assert elapsed < TIMEOUT_S + 60, f"the job took {elapsed:.0f} s to end"
    assert not (tmp_path / "result.json").exists()


def test_cli_demo_on_two_ranks_matches_one_process(task, tmp_path, monkeypatch):
    """``torchrun --nproc-per-node 2 -m hcrlhf demo``: the whole pipeline (score models, candidate selection, safety
    test, ground truth) on two ranks gives the one-process report, and prints its result once."""
    from hcrlhf import cli

    overrides = ["--quick", "--cache-dir", task.root.parent, "--no-progress", "rl.total_steps=4",
                 "reward.max_steps=5", "cost.max_steps=5"]
    monkeypatch.setenv("HCRLHF_STATE_DIR", str(tmp_path / "state-2"))
    # Frozen models sharded too: the safety test then reloads the saved cost model whole on every rank.
    done = torchrun(2, "-m", "hcrlhf", "demo", "--output", tmp_path / "two", *overrides, "rl.shard_frozen_models=true")
    # NO SOLUTION FOUND exits 3 on every rank; torchrun reports any non-zero exit of a rank as 1.
    assert done.returncode in (0, 1), done.stderr[-4000:]
    verdicts = [line for line in done.stdout.splitlines() if line.startswith(("PASS", "NO SOLUTION FOUND"))]
    assert len(verdicts) == 1, done.stdout  # rank 0 alone prints the result
    assert done.stderr.count("[hcrlhf] stage: safety test") == 1  # and logs
    monkeypatch.setenv("HCRLHF_STATE_DIR", str(tmp_path / "state-1"))
    code = cli.main(["demo", "--output", str(tmp_path / "one"), *map(str, overrides)])
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert code == (0 if one["verdict"] == "PASS" else 3) and (done.returncode == 0) == (code == 0)
    assert two["verdict"] == one["verdict"]
    assert two["config"]["rl"]["shard_frozen_models"] is True
    assert two["safety_test"]["costs"] == pytest.approx(one["safety_test"]["costs"], abs=1e-4)
    assert two["safety_test"]["ucb"] == pytest.approx(one["safety_test"]["ucb"], abs=1e-4)
    assert two["training"]["cost_model"]["final_eval"]["mean_margin"] == pytest.approx(
        one["training"]["cost_model"]["final_eval"]["mean_margin"], rel=1e-4)
    for first, second in zip(one["training"]["rl"]["curve"], two["training"]["rl"]["curve"]):
        assert second["cost/mean"] == pytest.approx(first["cost/mean"], rel=1e-4, abs=1e-5)
    (spent_set,) = json.loads((tmp_path / "state-2" / "safety_ledger.json").read_text())["sets"].values()
    assert len(spent_set["tests"]) == 1 and spent_set["spent"] == pytest.approx(0.1)  # δ spent once
