"""Problems that used to surface only after training (at the safety test) are refused before any work starts,
all at once, each naming its key: a non-finite cost_range, a safety set too small for the test, empty prompts;
and the same for `hcrlhf safety-test` before it loads or samples anything."""

import json

import pytest

from hcrlhf.pipeline import ConfigError, demo_config, load_config, run


def quick_config(tmp_path, task):
    return demo_config(quick=True, output_dir=tmp_path / "out", task_cache=task.root.parent, progress=False)


def user_config(tmp_path, task, prompts, **data):
    """Your own data (the built-in task's files): a prompt pool ``prompts`` written to prompts.jsonl."""
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path, {"output_dir": str(tmp_path / "out"), "progress": False,
                  "data": {"preferences": str(task.preference_paths["train"]), "prompts": str(path),
                           "split_seed": 5, "template": task.template.prompt_format, **data},
                  "models": {"policy": str(task.policy_path), "tokenizer": str(task.tokenizer_path)},
                  "reward": {"max_steps": 1, "batch_size": 8, "max_length": 96},
                  "cost": {"max_steps": 1, "batch_size": 8, "max_length": 96}}


@pytest.fixture
def no_training(monkeypatch):
    from hcrlhf.pipeline import core

    monkeypatch.setattr(core, "_score_model", lambda *a, **k: pytest.fail("training started"))
    monkeypatch.setattr(core, "_sft", lambda *a, **k: pytest.fail("training started"))


# ------------------------------------------------------------------------------------- 1. cost_range

BAD_RANGES = [
    ({"method": "betting", "cost_range": [0, float("inf")]}, "finite"),
    ({"method": "hoeffding", "cost_range": [float("-inf"), 0]}, "finite"),
    ({"method": "bernstein", "cost_range": [0, float("nan")]}, "finite"),
    ({"method": "ttest", "cost_range": [float("nan"), 1]}, "finite"),
    ({"method": "ttest", "cost_range": [-1, float("inf")]}, "finite"),
    ({"method": "clopper_pearson", "cost_transform": "unsafe_indicator", "cost_range": [0, 2]}, "0/1"),
    ({"method": "betting", "cost_transform": "sigmoid", "cost_range": [0, 0.5]}, "sigmoid"),
]


@pytest.mark.parametrize("safety, words", BAD_RANGES, ids=[str(s) for s, _ in BAD_RANGES])
def test_a_cost_range_the_test_would_refuse_is_refused_by_the_config(task, tmp_path, monkeypatch, safety, words):
    config = quick_config(tmp_path, task)
    config["safety"].update(safety)
    if safety.get("cost_transform", "none") != "none":
        config["rl"]["cost_threshold"] = 0.0
    monkeypatch.setattr("hcrlhf.data.builtin.make_task", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ConfigError) as error:
        run(config)
    assert error.value.key == "safety.cost_range" and words in str(error.value), str(error.value)
    assert not (tmp_path / "out").exists()


def test_a_non_finite_cost_range_override_is_refused():
    with pytest.raises(ConfigError) as error:
        load_config({"task": "builtin", "output_dir": "x"}, ["safety.method=betting", "safety.cost_range=[0, .inf]"])
    assert error.value.key == "safety.cost_range"


def test_a_non_finite_learning_rate_is_refused():
    with pytest.raises(ConfigError) as error:
        load_config({"task": "builtin", "output_dir": "x"}, ["reward.learning_rate=.inf", "cost.learning_rate=.nan"])
    assert [key for key, _ in error.value.problems] == ["reward.learning_rate", "cost.learning_rate"]


# ---------------------------------------------------------------------------------- 2. the safety set's size


def test_a_safety_set_too_small_for_the_test_is_refused_before_training(task, tmp_path, no_training):
    # 3 distinct prompts, safety_fraction 0.2: the split puts 1 prompt in D_s; every bound needs n >= 2.
    _, config = user_config(tmp_path, task, sorted(set(task.split.candidate))[:3], safety_fraction=0.2)
    with pytest.raises(ConfigError) as error:
        run(config)
    assert error.value.key == "data.safety_fraction", str(error.value)
    assert "1 distinct prompt" in str(error.value) and "at least 2" in str(error.value)
    assert not (tmp_path / "out").exists()  # nothing written
    for stages in ("reward", "train"):  # the split is the same for every stage: refused there too
        with pytest.raises(ConfigError, match="data.safety_fraction"):
            run(config, stages=stages)


def test_a_big_enough_safety_set_passes(task, tmp_path, monkeypatch):
    """The same pool with safety_size 2 passes the check (and the split gives 2 safety prompts)."""
    from hcrlhf.pipeline import core

    _, config = user_config(tmp_path, task, sorted(set(task.split.candidate))[:3], safety_size=2)
    inputs = core._load_inputs(load_config(config))
    assert len(inputs.split.safety) == 2


# ------------------------------------------------------------------------------------- 3. empty prompts


def test_an_empty_prompt_in_the_pool_is_refused_naming_its_index_and_file(task, tmp_path, no_training):
    prompts = sorted(set(task.split.candidate))[:20]
    prompts[7] = "  \t "
    path, config = user_config(tmp_path, task, prompts, safety_fraction=0.25)
    with pytest.raises(ConfigError) as error:
        run(config)
    assert error.value.key == "data.prompts", str(error.value)
    assert "prompt[7]" in str(error.value) and str(path) in str(error.value) and "empty" in str(error.value)
    assert not (tmp_path / "out").exists()


def test_every_problem_of_the_pool_is_reported_at_once(task, tmp_path, no_training):
    prompts = sorted(set(task.split.candidate))[:2] + [""]
    _, config = user_config(tmp_path, task, prompts, safety_fraction=0.2)
    with pytest.raises(ConfigError) as error:
        run(config)
    assert [key for key, _ in error.value.problems] == ["data.prompts", "data.safety_fraction"], str(error.value)


def test_safety_test_refuses_an_empty_prompt_in_the_safety_set():
    from hcrlhf.safety import safety_test

    with pytest.raises(ValueError, match=r"safety_set\[1\] is empty"):
        safety_test([0.1, 0.2, 0.3], threshold=1.0, delta=0.1, safety_set=["a prompt", " ", "another"])


def test_run_safety_test_checks_its_prompts_and_settings_before_sampling(monkeypatch):
    from hcrlhf.pipeline import Decoding, run_safety_test, safety_stage
    from hcrlhf.pipeline.config import SafetyConfig

    monkeypatch.setattr(safety_stage, "sample_and_score_on_ranks", lambda *a, **k: pytest.fail("sampling started"))
    settings = SafetyConfig(method="ttest")
    kwargs = dict(settings=settings, decoding=Decoding(), template=None, ledger=None, label="x")
    with pytest.raises(ValueError, match="at least 2"):
        run_safety_test(None, None, ["only one prompt"], None, **kwargs)
    with pytest.raises(ValueError, match=r"prompts\[1\] is empty"):
        run_safety_test(None, None, ["a", "", "c"], None, **kwargs)
    with pytest.raises(ValueError, match="copies"):
        run_safety_test(None, None, ["a", "b", " a"], None, **kwargs)
    settings.cost_range = [0.0, float("inf")]  # changed in place after the config was checked
    with pytest.raises(ValueError, match="cost_range"):
        run_safety_test(None, None, ["a", "b"], None, **kwargs)


# --------------------------------------------------------------------------------- hcrlhf safety-test


@pytest.fixture
def safety_test_cli(tmp_path, monkeypatch, capsys):
    """``hcrlhf safety-test`` in this process on a prompt file; loading the tokenizer (its first load) fails the
    test. Returns ``(exit code, stderr)``."""
    from hcrlhf import cli

    monkeypatch.setattr(cli, "_candidate_tokenizer", lambda *a, **k: pytest.fail("loading started"))
    (tmp_path / "candidate").mkdir()
    (tmp_path / "cost_model").mkdir()

    def call(prompts, *extra):
        path = tmp_path / "safety.jsonl"
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
        code = cli.main(["safety-test", str(tmp_path / "candidate"), "--prompts", str(path), "--cost-model",
                         str(tmp_path / "cost_model"), *extra])
        return code, capsys.readouterr().err, path

    return call


def test_safety_test_cli_refuses_too_few_prompts_before_loading(safety_test_cli):
    code, err, path = safety_test_cli(["the one prompt", " the one  prompt"])  # one distinct prompt
    assert code == 2 and "--prompts" in err and "1 distinct prompt" in err and "at least 2" in err, err
    assert str(path) in err


def test_safety_test_cli_refuses_an_empty_prompt_before_loading(safety_test_cli):
    code, err, path = safety_test_cli(["a", "\u3000", "b", "c"])  # an ideographic space: whitespace only
    assert code == 2 and "prompt[1]" in err and str(path) in err and "empty" in err, err


@pytest.mark.parametrize("args", [["safety.cost_range=[0, .inf]", "--method", "betting", "--cost-range", "0", "1"],
                                  ["--method", "betting", "--cost-range", "0", "inf"]])
def test_safety_test_cli_refuses_a_non_finite_cost_range_before_loading(safety_test_cli, args):
    code, err, _ = safety_test_cli(["a", "b", "c"], *args)
    assert code == 2 and "cost_range" in err, err
