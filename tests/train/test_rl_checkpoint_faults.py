"""Fault injection into SafeRLTrainer checkpoints and metrics (built-in task, tiny models, CPU).

One reference run (3 iterations, a checkpoint after each, state snapshotted after each) is trained once per
module; each test copies its output directory, breaks something, resumes, and compares with the snapshots
bit for bit. What is proven: every checkpoint has a manifest (size + sha256 of every file) written last,
after every file and directory is fsynced, and the parent is fsynced after the rename; flipped bytes (size
kept), truncation, a missing manifest or an unreadable file in the newest checkpoint make resume warn, set
it aside as ``*.corrupt`` (not deleted) and continue from the previous one, ending where an uninterrupted
run ends; no checkpoint verifying is an error naming each; a torn last metrics line is dropped and the log
has each step once; kill -9 of a training process (after its first checkpoint, or inside a checkpoint
save) then resume ends where an uninterrupted run ends; a full disk (ENOSPC) during a checkpoint leaves
nothing resume would pick; keep_checkpoints counts good checkpoints only; a checkpoint from before
manifests resumes with a warning (and a truncated one is still caught).
"""

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from hcrlhf.train import SafeRLConfig, SafeRLTrainer, rl_checkpoint

SETTINGS = dict(prompts_per_step=4, samples_per_prompt=2, max_new_tokens=12, actor_lr=1e-3, critic_lr=1e-3,
                progress=False, seed=3, minibatch_size=4, ppo_epochs=2, micro_batch_tokens=100, ama="sign",
                entropy_coef=0.01, checkpoint_every=1, keep_checkpoints=None)
STEPS = 3


def make_trainer(task, tokenizer, **overrides):
    config = SafeRLConfig(**{**SETTINGS, "total_steps": STEPS, **overrides})
    return SafeRLTrainer(config, policy=task.load_policy(), tokenizer=tokenizer,
                         reward_model=task.new_score_model(seed=1), cost_model=task.new_score_model(seed=2),
                         train_prompts=task.prompts("candidate")[0], safety_prompts=task.split,
                         template=task.template)


def state_of(trainer) -> dict:
    modules = {"policy": trainer.policy, **trainer.critics}
    tensors = {f"{name}.{key}": t.detach().clone() for name, m in modules.items() for key, t in m.state_dict().items()}
    for name, optimizer in trainer._optimizers().items():
        for param_id, param_state in optimizer.state_dict()["state"].items():
            for key, value in param_state.items():
                tensors[f"{name}.{param_id}.{key}"] = torch.as_tensor(value).clone()
    return {"step": trainer.global_step, "tensors": tensors, "multiplier": trainer.multiplier.state_dict(),
            "cost_window": trainer.cost_window.state_dict()}


def assert_same_state(trainer, expected: dict) -> None:
    got = state_of(trainer)
    assert got["step"] == expected["step"]
    assert got["tensors"].keys() == expected["tensors"].keys()
    differing = [k for k, t in expected["tensors"].items() if not torch.equal(t, got["tensors"][k])]
    assert not differing, f"{len(differing)} tensors differ from the uninterrupted run, e.g. {differing[:3]}"
    assert got["multiplier"] == expected["multiplier"]
    assert got["cost_window"] == expected["cost_window"]


def metric_rows(path: Path) -> list[dict]:
    data = path.read_bytes()
    assert data.endswith(b"\n")
    rows = [json.loads(line) for line in data.decode().splitlines()]
    return [{k: v for k, v in row.items() if not k.startswith("time/") and k != "tokens_per_s"} for row in rows]


@pytest.fixture(scope="module")
def reference(task, tokenizer, tmp_path_factory):
    """An uninterrupted run: checkpoints step-1..3 (keep all), the state after each iteration, the metrics."""
    out = tmp_path_factory.mktemp("reference") / "run"
    trainer = make_trainer(task, tokenizer, output_dir=str(out))
    states = {0: state_of(trainer)}
    for step in range(1, STEPS + 1):
        trainer.config.total_steps = step
        trainer.train()
        states[step] = state_of(trainer)
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == [f"step-{s:08d}" for s in range(1, STEPS + 1)]
    return {"dir": out, "states": states, "metrics": metric_rows(out / "metrics.jsonl")}


@pytest.fixture
def run_dir(reference, tmp_path):
    """A private copy of the reference run's output directory."""
    target = tmp_path / "run"
    shutil.copytree(reference["dir"], target)
    return target


def ckpt(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step-{step:08d}"


def flip_bytes(path: Path, count: int = 4) -> None:
    """Invert ``count`` bytes near the end of the file (tensor data in a safetensors file); size kept."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 8 - count, len(data) - 8):
        data[i] ^= 0xFF
    size = path.stat().st_size
    path.write_bytes(bytes(data))
    assert path.stat().st_size == size


def truncate(path: Path) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size // 2)


def replace_by_directory(path: Path, patch) -> None:
    path.unlink()
    path.mkdir()


def read_error(path: Path, patch) -> None:
    """Reading the file fails with EIO (a bad sector), whatever the user's permissions."""
    original = rl_checkpoint._hash_file

    def failing(target, **kwargs):
        if Path(target) == path:
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(target))
        return original(target, **kwargs)

    patch.setattr(rl_checkpoint, "_hash_file", failing)


def flip(path: Path, patch) -> None:
    flip_bytes(path)


def cut(path: Path, patch) -> None:
    truncate(path)


def delete(path: Path, patch) -> None:
    path.unlink()


def resume_and_finish(task, tokenizer, run: Path, expect_from: int, **overrides):
    trainer = make_trainer(task, tokenizer, output_dir=str(run), resume=True, **overrides)
    assert trainer.global_step == expect_from
    trainer.train()
    return trainer


# ---------------------------------------------------------------------------------------- manifest


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="maps fsynced descriptors to paths via /proc")
def test_manifest_is_written_last_after_fsyncing_every_file_and_directory(task, tokenizer, tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()
    trainer = make_trainer(task, tokenizer, output_dir=str(tmp_path))
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def spy_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def spy_replace(src, dst, **kwargs):
        events.append(("replace", str(src), str(dst)))
        return real_replace(src, dst, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", spy_fsync)
        patch.setattr(os, "replace", spy_replace)
        final = trainer.save_checkpoint()

    root = tmp_path / "checkpoints"
    renames = [i for i, e in enumerate(events) if e[0] == "replace" and e[2] == str(final)]
    assert len(renames) == 1
    rename = renames[0]
    temporary = Path(events[rename][1])
    assert temporary.parent == root and temporary.name.startswith(".tmp-step-00000000-")
    before = [Path(e[1]) for e in events[:rename] if e[0] == "fsync"]
    files = sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file())
    directories = sorted(p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_dir())
    synced = {p.relative_to(temporary).as_posix() for p in before if p.is_relative_to(temporary)}
    assert set(files) <= synced, f"not fsynced before the rename: {set(files) - synced}"
    assert set(directories) | {"."} <= synced, "a directory was not fsynced before the rename"
    manifest_at = before.index(temporary / "manifest.json")
    file_syncs = [i for i, p in enumerate(before) if p.is_relative_to(temporary) and (final / p.relative_to(
        temporary)).is_file()]
    assert max(file_syncs) == manifest_at, "manifest.json is not the last file written and fsynced"
    assert ("fsync", str(root)) in events[rename + 1:], "the parent directory was not fsynced after the rename"

    manifest = json.loads((final / "manifest.json").read_text())
    assert manifest["format"] == "hcrlhf-rl-checkpoint" and manifest["format_version"] == 1
    assert manifest["step"] == 0 and manifest["hash"] == "sha256"
    assert sorted(manifest["files"]) == [f for f in files if f != "manifest.json"]
    for name, entry in manifest["files"].items():
        data = (final / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert rl_checkpoint.verify_checkpoint(final) is True


# ------------------------------------------------------------------------ corruption -> fallback


CORRUPTIONS = {
    # (file in the newest checkpoint, how it is broken, what the warning says)
    "flipped-weights": ("policy.safetensors", flip, "policy.safetensors does not match its sha256"),
    "flipped-optimizer": ("actor_optimizer.safetensors", flip, "actor_optimizer.safetensors does not match"),
    "truncated-weights": ("policy.safetensors", cut, r"policy.safetensors has \d+ bytes, the manifest says"),
    "truncated-state": ("trainer_state.json", cut, "trainer_state.json has"),
    "missing-manifest": ("manifest.json", delete, "manifest.json is missing"),
    "not-a-file": ("rng.safetensors", replace_by_directory, "rng.safetensors is not a regular file"),
    "read-error": ("cost_critic.safetensors", read_error, r"cost_critic.safetensors is unreadable \(\[Errno 5\]"),
}


@pytest.mark.parametrize("case", sorted(CORRUPTIONS))
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(task, tokenizer, reference, run_dir, case,
                                                                  monkeypatch):
    name, damage, reason = CORRUPTIONS[case]
    with monkeypatch.context() as patch:
        damage(ckpt(run_dir, 3) / name, patch)
        with pytest.warns(UserWarning, match=rf"step-00000003 failed verification: {reason}.*Renamed it to "
                                             r"step-00000003\.corrupt \(not deleted\); resuming from "
                                             r"step-00000002"):
            trainer = make_trainer(task, tokenizer, output_dir=str(run_dir), resume=True)
    assert trainer.global_step == 2
    assert_same_state(trainer, reference["states"][2])
    aside = run_dir / "checkpoints" / "step-00000003.corrupt"
    assert aside.is_dir() and (name == "manifest.json" or (aside / name).exists())  # kept for inspection
    trainer.train()
    assert_same_state(trainer, reference["states"][3])
    assert metric_rows(run_dir / "metrics.jsonl") == reference["metrics"]
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step-00000001", "step-00000002", "step-00000003", "step-00000003.corrupt"]
    assert rl_checkpoint.verify_checkpoint(ckpt(run_dir, 3)) is True


def test_no_checkpoint_verifies_is_a_clear_error_and_nothing_is_touched(task, tokenizer, run_dir):
    flip_bytes(ckpt(run_dir, 1) / "policy.safetensors")
    truncate(ckpt(run_dir, 2) / "reward_critic.safetensors")
    (ckpt(run_dir, 3) / "manifest.json").unlink()
    before = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*"))

    with pytest.raises(rl_checkpoint.CheckpointError) as caught:
        make_trainer(task, tokenizer, output_dir=str(run_dir), resume=True)
    message = str(caught.value)
    assert "none of the 3 checkpoint(s)" in message and "Nothing was renamed or deleted" in message
    assert "step-00000003: manifest.json is missing" in message
    assert "step-00000002: reward_critic.safetensors has" in message
    assert "step-00000001: policy.safetensors does not match its sha256" in message
    assert sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*")) == before


# ----------------------------------------------------------------------------------- metrics log


@pytest.mark.parametrize("tail", ["half-line", "zero-filled"])
def test_torn_last_metrics_line_is_dropped_and_each_step_logged_once(task, tokenizer, reference, run_dir, tail):
    # As if the run died while appending step 3's line, before checkpoint 3 existed.
    shutil.rmtree(ckpt(run_dir, 3))
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines(keepends=True)
    assert len(lines) == 3
    broken = lines[2][: len(lines[2]) // 2] if tail == "half-line" else b"\x00" * 64
    metrics.write_bytes(b"".join(lines[:2]) + broken)

    with pytest.warns(UserWarning, match="metrics.jsonl: dropped a torn last line"):
        trainer = make_trainer(task, tokenizer, output_dir=str(run_dir), resume=True)
    assert trainer.global_step == 2
    assert metrics.read_bytes() == b"".join(lines[:2])  # truncated to the last good line
    trainer.train()
    assert_same_state(trainer, reference["states"][3])
    assert metric_rows(metrics) == reference["metrics"]


def test_trim_metrics_log_keeps_each_step_once(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "x": 1}, {"step": 2, "x": 2}, {"step": 2, "x": 22}, {"step": 4, "x": 4}, "not json",
            {"step": 5, "x": 5}]
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows) + '{"step": 6, ')
    notes = rl_checkpoint.trim_metrics_log(path, 4)
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 1, "x": 1}, {"step": 2, "x": 22}, {"step": 4, "x": 4}]
    text = "\n".join(notes)
    assert "torn last line" in text and "line 5" in text and "step(s) [2]" in text and "step(s) [3]" in text
    untouched = path.stat().st_mtime_ns
    assert rl_checkpoint.trim_metrics_log(path, 4) == ["has no line for step(s) [3] (lost before the checkpoint "
                                                       "was written)"]
    assert path.stat().st_mtime_ns == untouched


# --------------------------------------------------------------------------------------- kill -9


TRAIN_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    import torch
    if not torch.cuda.is_available():  # as tests/conftest.py, so that the numbers match the test process
        os.environ.setdefault("TRITON_INTERPRET", "1")
        torch.set_num_threads(1)
    from hcrlhf.data.builtin import make_task
    from hcrlhf.train import SafeRLConfig, SafeRLTrainer
    from hcrlhf.train import rl_checkpoint

    task_root, settings, hang_in_save_of = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
    if hang_in_save_of:  # signal, then hang, inside the save of that step (files written, no manifest yet)
        original = rl_checkpoint._write_manifest
        def hanging(directory, step):
            if step == hang_in_save_of:
                (directory.parent.parent / "saving").write_text(str(directory))
                time.sleep(120)
            return original(directory, step)
        rl_checkpoint._write_manifest = hanging
    task = make_task(task_root, seed=0)
    trainer = SafeRLTrainer(SafeRLConfig(**settings), policy=task.load_policy(),
                            tokenizer=task.load_tokenizer(), reward_model=task.new_score_model(seed=1),
                            cost_model=task.new_score_model(seed=2), train_prompts=task.prompts("candidate")[0],
                            safety_prompts=task.split, template=task.template)
    trainer.train()
""")


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
@pytest.mark.parametrize("when", ["after-first-checkpoint", "inside-second-checkpoint"])
def test_kill_9_then_resume_equals_an_uninterrupted_run(task, tokenizer, reference, tmp_path, when):
    out = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(TRAIN_SCRIPT)
    settings = {**SETTINGS, "total_steps": STEPS, "output_dir": str(out)}
    hang = 2 if when == "inside-second-checkpoint" else 0
    signal_file = out / "saving" if hang else ckpt(out, 1)
    log = open(tmp_path / "train.log", "wb")  # not a pipe: a full pipe would block the child
    process = subprocess.Popen([sys.executable, str(script), str(task.root.parent), json.dumps(settings), str(hang)],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not signal_file.exists():
            if process.poll() is not None:
                pytest.fail(f"the training process exited ({process.returncode}) before the kill:\n"
                            f"{(tmp_path / 'train.log').read_text(errors='replace')[-3000:]}")
            assert time.monotonic() < deadline, "the training process made no checkpoint in time"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()
    assert process.returncode == -signal.SIGKILL
    assert not ckpt(out, STEPS).exists(), "the run finished before it was killed"
    if hang:
        assert [p.name for p in (out / "checkpoints").glob(".tmp-step-00000002-*")], "not killed mid-save"
    survivors = rl_checkpoint.list_checkpoints(out)
    assert survivors and all(rl_checkpoint.verify_checkpoint(p) is True for p in survivors)

    trainer = make_trainer(task, tokenizer, output_dir=str(out), resume=True)
    assert trainer.global_step == int(survivors[-1].name.split("-")[1])
    assert not list((out / "checkpoints").glob(".tmp-*"))
    trainer.train()
    assert_same_state(trainer, reference["states"][STEPS])
    assert metric_rows(out / "metrics.jsonl") == reference["metrics"]


# ------------------------------------------------------------------------------------- full disk


def _partial_then_enospc(original):
    def write(*args, **kwargs):
        original(*args, **kwargs)
        path = Path(args[1])
        with open(path, "r+b") as handle:  # part of the file made it to disk, then the disk was full
            handle.truncate(path.stat().st_size // 3)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    return write


@pytest.mark.parametrize("where", ["weights", "optimizer", "fsync"])
def test_full_disk_during_a_checkpoint_leaves_nothing_resume_would_pick(task, tokenizer, reference, run_dir, where,
                                                                        monkeypatch):
    import safetensors.torch

    shutil.rmtree(ckpt(run_dir, 3))
    trainer = make_trainer(task, tokenizer, output_dir=str(run_dir), resume=True)
    assert trainer.global_step == 2
    with monkeypatch.context() as patch, pytest.raises(OSError) as caught:
        if where == "weights":
            patch.setattr(safetensors.torch, "save_model", _partial_then_enospc(safetensors.torch.save_model))
        elif where == "optimizer":
            patch.setattr(safetensors.torch, "save_file", _partial_then_enospc(safetensors.torch.save_file))
        else:  # fsync can report ENOSPC (thin provisioning, NFS): the data may never reach the disk
            real_fsync = os.fsync
            calls = []

            def fsync(fd):
                calls.append(fd)
                if len(calls) == 4:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real_fsync(fd)

            patch.setattr(os, "fsync", fsync)
        trainer.train()
    assert caught.value.errno == errno.ENOSPC

    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step-00000001", "step-00000002"], names  # no partial step-3, no leftover temporary
    point = rl_checkpoint.select_checkpoint(run_dir)
    assert point.path == ckpt(run_dir, 2) and not point.legacy and not point.rejected
    resumed = resume_and_finish(task, tokenizer, run_dir, 2)
    assert_same_state(resumed, reference["states"][3])
    assert metric_rows(run_dir / "metrics.jsonl") == reference["metrics"]


# ---------------------------------------------------------------------------------- keep / legacy


def test_keep_checkpoints_counts_good_ones_and_keeps_the_one_resumed_from(task, tokenizer, reference, run_dir):
    # Checkpoints 1 (good) and 3 (corrupt): resume from 1 and save step 2 with keep_checkpoints=2. Counting the
    # corrupt step-3 would delete step-1, the one resumed from, and keep the corrupt one.
    shutil.rmtree(ckpt(run_dir, 2))
    flip_bytes(ckpt(run_dir, 3) / "cost_critic.safetensors")
    with pytest.warns(UserWarning, match="step-00000003 failed verification"):
        trainer = make_trainer(task, tokenizer, output_dir=str(run_dir), resume=True, keep_checkpoints=2,
                               total_steps=2)
    assert trainer.global_step == 1
    trainer.train()
    assert_same_state(trainer, reference["states"][2])
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names == ["step-00000001", "step-00000002", "step-00000003.corrupt"]


def _strip_manifest(directory: Path) -> None:
    """Make a checkpoint look like one written before manifests existed."""
    (directory / "manifest.json").unlink()
    state = json.loads((directory / "trainer_state.json").read_text())
    del state["checkpoint_format"]
    (directory / "trainer_state.json").write_text(json.dumps(state, indent=1))


def test_pre_manifest_checkpoints_resume_with_a_warning_and_truncation_is_still_caught(task, tokenizer, reference,
                                                                                      run_dir):
    for step in (2, 3):
        _strip_manifest(ckpt(run_dir, step))
    truncate(ckpt(run_dir, 3) / "policy.safetensors")
    with pytest.warns(UserWarning) as caught:
        trainer = make_trainer(task, tokenizer, output_dir=str(run_dir), resume=True)
    messages = "\n".join(str(w.message) for w in caught)
    assert "step-00000003 failed verification: policy.safetensors is damaged (truncated: " in messages
    assert "step-00000002 has no manifest.json (written by an older hcrlhf): its files cannot be verified" in messages
    assert trainer.global_step == 2
    trainer.train()
    assert_same_state(trainer, reference["states"][3])
    assert rl_checkpoint.verify_checkpoint(ckpt(run_dir, 3)) is True  # re-saved with a manifest
