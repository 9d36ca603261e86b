"""The run directory on disk (hcrlhf/pipeline/rundir.py, docs/method.md "Reading a report"), on real pipeline runs of
the built-in task with small settings:

* the candidate says what it is: on PASS it is the returned model in ``<out>/model/``; on NO SOLUTION FOUND it is
  in ``<out>/candidate-not-returned/`` with NOT_RETURNED.md and ``"returned": false``, never at ``model/``;
* ``--overwrite`` removes only what the earlier run's manifest (hcrlhf_run.json) lists, never a user's own files,
  and never deletes a returned model: the earlier run is moved, whole, to ``previous/<time>/``; nothing changes
  before the new run's inputs load and its δ-ledger check passes;
* a lock: a second run on a directory in use is refused; the lock of a killed run is taken over;
* a failure before any work leaves no directory behind; a failure later leaves the manifest saying so;
* paths inside the run directory are recorded relative to it: a moved run directory is re-tested with its own
  cost model.
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hcrlhf.pipeline import ConfigError, demo_config, load_config, run

SMALL = ["reward.max_steps=6", "cost.max_steps=6", "rl.total_steps=2", "evaluation.samples_per_prompt=1"]
PASS, NSF = "safety.threshold=1e6", "safety.threshold=-1e6"  # the UCB is always below / above these


def small_config(task, out, ledger, *overrides, overwrite=False):
    values = demo_config(quick=True, output_dir=str(out), task_cache=str(task.root.parent), progress=False,
                         overwrite=overwrite)
    return load_config(values, [*SMALL, f"safety.ledger={ledger}", *overrides])


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def manifest(out: Path) -> dict:
    return json.loads((out / "hcrlhf_run.json").read_text())


def meta(candidate: Path) -> dict:
    return json.loads((candidate / "hcrlhf_candidate.json").read_text())


def snapshot(root: Path) -> dict:
    """{relative path: sha256} of every file under root."""
    return {p.relative_to(root).as_posix(): digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def passed_run(task, tmp_path_factory):
    """One small run that PASSes (τ far above any cost), with its own ledger."""
    root = tmp_path_factory.mktemp("passed")
    result = run(small_config(task, root / "out", root / "ledger.json", PASS))
    assert result.verdict == "PASS"
    return result, root / "out", root / "ledger.json"


# ------------------------------------------------------------------------- returned vs not returned


def test_pass_puts_the_returned_model_at_model(passed_run, capsys):
    from hcrlhf.cli import _print_result

    result, out, _ = passed_run
    model = out / "model"
    assert result.passed and result.model_path == result.candidate_path == model
    assert (model / "model.safetensors").is_file() and not (model / "NOT_RETURNED.md").exists()
    assert not (out / "candidate").exists() and not (out / "candidate-not-returned").exists()
    info = meta(model)
    assert info["returned"] is True and info["tested"] is True and info["verdict"] == "PASS"
    assert info["safety_test"]["ucb"] == result.report["safety_test"]["ucb"]
    report = json.loads((out / "report.json").read_text())
    assert report["returned_model"] == report["candidate"] == "model"
    assert "returned model: `model/`" in (out / "report.md").read_text()
    run_manifest = manifest(out)
    assert run_manifest["status"] == "finished" and run_manifest["verdict"] == "PASS"
    assert run_manifest["returned_model"] == "model" and "model" in run_manifest["created"]
    assert "candidate" not in run_manifest["created"] and not (out / "hcrlhf_run.lock").exists()
    _print_result(result)
    assert f"returned model: {model}" in capsys.readouterr().out


def test_no_solution_found_marks_the_candidate_and_keeps_it_away_from_model(task, tmp_path, capsys):
    from hcrlhf.cli import _print_result

    out = tmp_path / "out"
    result = run(small_config(task, out, tmp_path / "ledger.json", NSF))
    assert result.verdict == "NO SOLUTION FOUND" and result.model_path is None
    kept = out / "candidate-not-returned"
    assert result.candidate_path == kept and (kept / "model.safetensors").is_file()
    assert not (out / "model").exists() and not (out / "candidate").exists()
    note = (kept / "NOT_RETURNED.md").read_text()
    assert "NO SOLUTION FOUND" in note and "do not deploy it" in note
    info = meta(kept)
    assert info["returned"] is False and info["tested"] is True and info["verdict"] == "NO SOLUTION FOUND"
    report = json.loads((out / "report.json").read_text())
    assert report["returned_model"] is None and report["candidate"] == "candidate-not-returned"
    assert "no model is returned" in (out / "report.md").read_text()
    assert "candidate-not-returned/" in (out / "report.md").read_text()
    run_manifest = manifest(out)
    assert run_manifest["verdict"] == "NO SOLUTION FOUND" and run_manifest["returned_model"] is None
    _print_result(result)
    printed = capsys.readouterr().out
    assert "no model is returned" in printed and str(kept) in printed and "returned model:" not in printed


# ------------------------------------------------------------------------------- safe --overwrite


def test_overwrite_of_a_run_that_passed_keeps_its_model_and_the_users_files(passed_run, task, tmp_path):
    first, original, ledger = passed_run
    out = tmp_path / "out"
    shutil.copytree(original, out)
    (out / "notes.txt").write_text("my notes on this run\n")
    (out / "mine").mkdir()
    (out / "mine" / "eval.csv").write_text("a,b\n1,2\n")
    before = snapshot(out)
    weights = digest(out / first.model_path.relative_to(original) / "model.safetensors")

    # 1. The same safety set again: the ledger refuses before anything in the directory changes.
    from hcrlhf.safety import BudgetExceededError

    with pytest.raises(BudgetExceededError):
        run(small_config(task, out, ledger, NSF, overwrite=True))
    assert snapshot(out) == before  # the returned model, its report and the user's files: untouched

    # 2. A run that goes through (its own ledger) and finds no solution: the earlier run is moved, whole.
    result = run(small_config(task, out, tmp_path / "other-ledger.json", NSF, overwrite=True))
    assert result.verdict == "NO SOLUTION FOUND" and not (out / "model").exists()
    previous = result.previous_run
    assert previous is not None and previous.parent == out / "previous"
    assert digest(previous / "model" / "model.safetensors") == weights
    assert manifest(previous)["verdict"] == "PASS" and (previous / "report.json").is_file()
    assert meta(previous / "model")["cost_model"] == "../cost_model" and (previous / "cost_model").is_dir()
    assert result.report["previous_run"] == previous.relative_to(out).as_posix()
    assert manifest(out)["previous_run"] == result.report["previous_run"]
    assert (out / "notes.txt").read_text() == "my notes on this run\n"
    assert (out / "mine" / "eval.csv").read_text() == "a,b\n1,2\n"


def test_overwrite_never_deletes_files_an_hcrlhf_run_did_not_create(task, tmp_path):
    # A user's own directory that happens to hold a config.yaml, a split.json and a candidate/: no manifest.
    out = tmp_path / "mine"
    (out / "candidate").mkdir(parents=True)
    (out / "config.yaml").write_text("my: config\n")
    (out / "split.json").write_text("{}\n")
    (out / "candidate" / "weights.bin").write_bytes(b"\x00" * 64)
    before = snapshot(out)
    with pytest.raises(ConfigError, match="holds no hcrlhf_run.json") as error:
        run(small_config(task, out, tmp_path / "ledger.json", overwrite=True))
    assert error.value.key == "output_dir"
    assert snapshot(out) == before and not (out / "hcrlhf_run.lock").exists()
    # An earlier run's manifest that does not list an entry this run would write: that entry is not its to remove.
    (out / "hcrlhf_run.json").write_text(json.dumps({"format": "hcrlhf-run", "version": 1, "status": "finished",
                                                     "verdict": None, "created": ["config.yaml", "split.json"]}))
    before = snapshot(out)
    with pytest.raises(ConfigError, match="did not create"):
        run(small_config(task, out, tmp_path / "ledger.json", overwrite=True))
    assert snapshot(out) == before


def test_overwrite_keeps_files_a_user_put_inside_the_earlier_runs_folders(task, tmp_path, capsys):
    """A finished NSF run (nothing returned, so --overwrite would delete it) in which the user then wrote notes
    inside rl/ and the candidate's folder: its inventory (hcrlhf_run.json "files") does not list them, so the
    earlier run is moved whole to previous/<time>/ instead of deleted; without such files it is deleted."""
    out, ledger = tmp_path / "out", tmp_path / "ledger.json"
    run(small_config(task, out, ledger, NSF))
    files = manifest(out)["files"]
    assert "report.json" in files and any(f.startswith("rl/") for f in files)
    notes = {"rl/my_analysis.txt": b"my notes", "candidate-not-returned/my_eval.json": b"{}"}
    for name, data in notes.items():
        (out / name).write_bytes(data)
    capsys.readouterr()
    run(small_config(task, out, tmp_path / "ledger-2.json", NSF, overwrite=True))
    assert "holds files its inventory does not list" in capsys.readouterr().err
    previous = out / manifest(out)["previous_run"]
    assert {name: (previous / name).read_bytes() for name in notes} == notes
    # The second run's own files only: overwriting it deletes it (nothing is moved).
    run(small_config(task, out, tmp_path / "ledger-3.json", NSF, overwrite=True))
    assert manifest(out)["previous_run"] is None and "removed the earlier run" in capsys.readouterr().err
    assert {name: (previous / name).read_bytes() for name in notes} == notes


# ----------------------------------------------------------------------------------------- the lock

PAUSED_RUN = """
import json, sys, time
from pathlib import Path
import hcrlhf.pipeline.core as core
from hcrlhf.pipeline import demo_config, load_config, run

where, out, cache, signal, overrides = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]), json.loads(sys.argv[5])
original = getattr(core, where)

def paused(*args, **kwargs):
    signal.write_text(where)
    time.sleep(600)
    return original(*args, **kwargs)

setattr(core, where, paused)
run(load_config(demo_config(quick=True, output_dir=out, task_cache=cache, progress=False), overrides))
"""


def start_paused_run(task, tmp_path, out, where, overrides):
    """A real pipeline run in another process, paused (holding the directory) when it reaches core.<where>."""
    signal = tmp_path / f"reached-{where}"
    process = subprocess.Popen([sys.executable, "-c", PAUSED_RUN, where, str(out), str(task.root.parent), str(signal),
                                json.dumps(overrides)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not signal.exists():
        if process.poll() is not None:
            pytest.fail(f"the paused run ended early: {process.stderr.read().decode()[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail("the paused run did not reach its pause")
        time.sleep(0.2)
    return process


def kill(process) -> None:
    process.kill()  # SIGKILL: no clean-up runs, as when a machine or a job scheduler kills a run
    process.wait(timeout=30)
    process.stderr.close()


def test_a_second_run_on_a_directory_in_use_is_refused(task, tmp_path, capsys):
    out, ledger = tmp_path / "out", tmp_path / "ledger.json"
    first = start_paused_run(task, tmp_path, out, "_train_candidate", [*SMALL, f"safety.ledger={ledger}"])
    try:
        before = snapshot(out)
        # Even --overwrite cannot take a directory from a live run.
        with pytest.raises(ConfigError, match="in use by another hcrlhf run") as error:
            run(small_config(task, out, ledger, PASS, overwrite=True))
        assert f"pid {first.pid}" in str(error.value)
        assert snapshot(out) == before and manifest(out)["status"] == "running"
    finally:
        kill(first)
    # Killed mid-run: the manifest says the run did not finish; the next run takes the dead run's lock over,
    # saying so, but needs --overwrite to replace what that run created.
    assert manifest(out)["status"] == "running" and manifest(out)["finished"] is None
    capsys.readouterr()
    with pytest.raises(ConfigError, match="status 'running'"):
        run(small_config(task, out, ledger, PASS))
    err = capsys.readouterr().err
    assert f"taking over the stale lock of {str(out)!r}" in err and f"pid {first.pid}" in err
    result = run(small_config(task, out, ledger, PASS, overwrite=True))
    assert "status 'running'" in capsys.readouterr().err  # what was replaced: a run that did not finish
    assert result.verdict == "PASS" and manifest(out)["status"] == "finished"
    assert not (out / "hcrlhf_run.lock").exists()


def test_the_lock_of_a_killed_run_is_taken_over(task, tmp_path, capsys):
    """Killed while it loaded its data (before any work): the directory holds only its lock; a re-run without
    --overwrite takes the lock over."""
    out, ledger = tmp_path / "out", tmp_path / "ledger.json"
    first = start_paused_run(task, tmp_path, out, "_load_inputs", [*SMALL, f"safety.ledger={ledger}"])
    pid = first.pid
    kill(first)
    assert [p.name for p in out.iterdir()] == ["hcrlhf_run.lock"]
    assert json.loads((out / "hcrlhf_run.lock").read_text())["pid"] == pid
    capsys.readouterr()
    result = run(small_config(task, out, ledger, PASS), stages="reward")
    err = capsys.readouterr().err
    assert "taking over the stale lock" in err and f"pid {pid}" in err and "no longer running" in err
    assert manifest(out)["status"] == "finished" and (out / "reward_model").is_dir()
    assert result.report["training"]["reward_model"]["source"] == "reward_model"


# ------------------------------------------------------------------------------- nothing half-made


def test_a_data_error_leaves_no_half_made_directory(task, tmp_path):
    out = tmp_path / "runs" / "today" / "out"
    sft = tmp_path / "sft.jsonl"
    # Data the config check cannot judge: its one row is on a safety-set prompt (found once the split is drawn).
    sft.write_text(json.dumps({"prompt": task.split.safety[0], "response": "I can help with that."}) + "\n")
    config = small_config(task, out, tmp_path / "ledger.json", f"sft.path={sft}", "sft.steps=2",
                          "sft.batch_size=2")
    with pytest.raises(ValueError, match="every row is on a safety-set prompt"):
        run(config, stages="sft")
    assert not (tmp_path / "runs").exists()  # not even the parent directories it made
    # The fixed re-run needs no --overwrite.
    prompt = sorted(set(task.split.candidate))[0]
    sft.write_text(json.dumps({"prompt": prompt, "response": "I can help with that."}) + "\n")
    result = run(config, stages="sft")
    assert (out / "sft_policy").is_dir() and result.report["training"]["sft"]["source"] == "sft_policy"
    assert manifest(out)["status"] == "finished"


def test_a_model_that_does_not_load_leaves_no_half_made_directory(task, tmp_path):
    out = tmp_path / "out"
    # A given cost model that is a plain causal LM (no trained score head): refused when it loads.
    bad = small_config(task, out, tmp_path / "ledger.json", f"models.cost_model={task.policy_path}")
    with pytest.raises(ConfigError, match="not a trained score model") as error:
        run(bad)
    assert error.value.key == "models.cost_model" and not out.exists()
    # Your own models: a reference that is no model at all is refused before anything is written.
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    user = {"output_dir": str(out), "progress": False,
            "data": {"preferences": str(task.preference_paths["train"]), "template": task.template.prompt_format},
            "models": {"policy": str(task.policy_path), "tokenizer": str(task.tokenizer_path),
                       "reference": str(empty)},
            "safety": {"ledger": str(tmp_path / "ledger.json")}}
    with pytest.raises(ConfigError, match="cannot be loaded") as error:
        run(user)
    assert error.value.key == "models.reference" and not out.exists()
    # The fixed re-run needs no --overwrite.
    run(small_config(task, out, tmp_path / "ledger.json"), stages="cost")
    assert (out / "cost_model").is_dir() and manifest(out)["status"] == "finished"


def test_a_failure_after_the_work_began_leaves_the_manifest_saying_so(task, tmp_path, monkeypatch):
    import hcrlhf.pipeline.core as core

    def broken(*args, **kwargs):
        raise RuntimeError("the machine went away")

    monkeypatch.setattr(core, "_safety_test", broken)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="went away"):
        run(small_config(task, out, tmp_path / "ledger.json", PASS))
    run_manifest = manifest(out)
    assert run_manifest["status"] == "failed" and "the machine went away" in run_manifest["error"]
    assert run_manifest["verdict"] is None and run_manifest["finished"] is not None
    # The trained candidate is untested: marked, not returned.
    assert not (out / "model").exists() and (out / "candidate" / "NOT_RETURNED.md").is_file()
    assert meta(out / "candidate")["returned"] is False and meta(out / "candidate")["tested"] is False
    assert not (out / "hcrlhf_run.lock").exists()


# ---------------------------------------------------------------------------------- relative paths


def test_a_moved_run_directory_is_re_tested_with_its_own_cost_model(passed_run, tmp_path):
    from hcrlhf.cli import main

    result, original, _ = passed_run
    copy = tmp_path / "copy"
    shutil.copytree(original, copy)
    moved = tmp_path / "elsewhere" / "run"
    moved.parent.mkdir()
    shutil.move(copy, moved)
    model = moved / result.model_path.relative_to(original)
    # A fresh safety set (the run's own is spent in its ledger): the test runs on the moved directory's files.
    prompts = tmp_path / "fresh.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"fresh question {i}: how do I bake bread?"}) + "\n"
                               for i in range(12)))
    code = main(["safety-test", str(model), "--prompts", str(prompts), "--output", str(tmp_path / "again"),
                 "--no-progress"])
    assert code in (0, 3)
    record = json.loads((tmp_path / "again" / "safety_test.json").read_text())
    assert Path(record["cost_model"]) == (moved / "cost_model").resolve()
    assert os.path.commonpath([record["cost_model"], str(moved.resolve())]) == str(moved.resolve())
    # Recorded relative to the run directory (hcrlhf_candidate.json: relative to the candidate directory).
    assert meta(model)["cost_model"] == "../cost_model"
    report = json.loads((moved / "report.json").read_text())
    assert report["training"]["cost_model"]["source"] == "cost_model"
    assert report["training"]["rl"]["metrics_file"] == "rl/metrics.jsonl"
