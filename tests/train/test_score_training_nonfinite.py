"""Score-model training that diverges (a NaN/inf loss, or weights broken by the last update) stops with an error
naming the step and saves nothing: no model, no checkpoint, no half-written directory; `hcrlhf train-reward`
exits 1."""

import json

import pytest

from hcrlhf.pipeline import demo_config
from hcrlhf.train import ScoreTrainingConfig, train_cost_model, train_reward_model

# With this learning rate the tiny built-in score model's weights are NaN after its 2nd update: the losses of
# steps 1 and 2 are finite, the 3rd is NaN.
HUGE_LR = 1e6


def config(**overrides):
    values = dict(learning_rate=HUGE_LR, max_steps=6, batch_size=16, warmup_ratio=0.0, lr_schedule="constant",
                  max_length=96, progress=False, seed=0)
    values.update(overrides)
    return ScoreTrainingConfig(**values)


@pytest.fixture(scope="module")
def pairs(task):
    return task.preferences("train").select(range(160))


def test_a_nan_loss_stops_training_naming_the_step_and_saves_nothing(task, tokenizer, pairs, tmp_path):
    out = tmp_path / "rm"
    with pytest.raises(FloatingPointError, match=r"reward model's (loss is nan|weights are not finite).* at step \d+"):
        train_reward_model(task.new_score_model(seed=0), tokenizer, pairs, template=task.template,
                           config=config(output_dir=str(out)))
    assert not out.exists()


def test_checkpoints_of_a_diverged_run_are_removed(task, tokenizer, pairs, tmp_path):
    out = tmp_path / "cm"
    with pytest.raises(FloatingPointError, match=r"cost model's .* at step 2 of 6"):
        train_cost_model(task.new_score_model(seed=0), tokenizer, pairs, template=task.template,
                         config=config(output_dir=str(out), save_every=1))  # checkpoint-1 is saved, then removed
    assert not out.exists()
    # An output directory that existed before keeps what it held, and gets nothing.
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FloatingPointError):
        train_cost_model(task.new_score_model(seed=0), tokenizer, pairs, template=task.template,
                         config=config(output_dir=str(out), save_every=1))
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_weights_broken_by_the_last_update_are_refused_before_saving(task, tokenizer, pairs, tmp_path):
    """Two steps: both losses are finite, but the second update leaves NaN weights."""
    out = tmp_path / "rm"
    with pytest.raises(FloatingPointError, match=r"weights are not finite .* at step 2 of 2"):
        train_reward_model(task.new_score_model(seed=0), tokenizer, pairs, template=task.template,
                           config=config(output_dir=str(out), max_steps=2))
    assert not out.exists()


def test_cli_train_reward_with_a_huge_learning_rate_exits_1_and_saves_no_model(task, tmp_path, capsys):
    from hcrlhf.cli import main

    values = demo_config(quick=True, output_dir=tmp_path / "out", task_cache=task.root.parent, progress=False)
    values["reward"].update(learning_rate=HUGE_LR, max_steps=5)
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(values))  # JSON is YAML
    code = main(["train-reward", str(path)])
    err = capsys.readouterr().err
    assert code == 1 and "FloatingPointError" in err and "step" in err, err
    assert not (tmp_path / "out" / "reward_model").exists()
    manifest = json.loads((tmp_path / "out" / "hcrlhf_run.json").read_text())
    assert manifest["status"] == "failed" and "FloatingPointError" in manifest["error"], manifest
