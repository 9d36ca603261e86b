"""SafeRLConfig: unknown keys, wrong types and bad ranges are refused naming the key; invalid combinations
are rejected up front; YAML round trip (including PyYAML's string-typed ``1e-6``)."""

import dataclasses

import pytest

from hcrlhf.config import ConfigError
from hcrlhf.train import SafeRLConfig


def test_defaults_are_valid_and_documented():
    config = SafeRLConfig()
    assert config.estimator == "ppo" and config.kl_coef == 0.1 and config.lambda_max == 1e6
    doc = SafeRLConfig.__doc__
    for field in dataclasses.fields(SafeRLConfig):
        assert f"{field.name}:" in doc or f", {field.name}:" in doc or f"{field.name}, " in doc, field.name


def test_unknown_keys_are_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"'estimater': unknown key; did you mean 'estimator'\?"):
        SafeRLConfig.from_dict({"estimater": "rloo"})
    with pytest.raises(ConfigError, match="'no_such_setting': unknown key; known keys: .*kl_coef"):
        SafeRLConfig.from_dict({"no_such_setting": 1, "kl_coef": 0.2})


def test_every_problem_is_reported_at_once_each_naming_its_key():
    values = {"estimater": "rloo", "total_steps": "many", "kl_coef": -1.0, "top_p": 2.0}
    with pytest.raises(ConfigError) as error:
        SafeRLConfig.from_dict(values)
    assert [key for key, _ in error.value.problems] == ["estimater", "total_steps", "kl_coef", "top_p"]
    assert "4 problems" in str(error.value)
    with pytest.raises(ConfigError) as error:  # created directly: the same checks, all at once
        SafeRLConfig(kl_coef=-1.0, top_p=2.0, estimator="sgd")
    assert {key for key, _ in error.value.problems} == {"kl_coef", "top_p", "estimator"}
    assert str(error.value).startswith("SafeRLConfig: 3 problems")


@pytest.mark.parametrize("key, value, pattern", [
    ("total_steps", "10", "must be int"),
    ("total_steps", 2.5, "must be int"),
    ("kl_coef", True, "must be float"),
    ("kl_coef", "lots", "must be float"),
    ("estimator", "dpo", "must be one of"),
    ("kl_estimator", "k4", "must be one of"),
    ("temperature", 0.0, "must be a finite number > 0"),
    ("temperature", 1e-6, "must be >= 0.0001"),
    ("top_p", 1.5, "must be in"),
    ("delta", 1.0, "must be in"),
    ("gae_lambda", -0.1, "must be in"),
    ("cost_window_size", 1, "must be >= 2"),
    ("lambda_lr", -1.0, "must be a finite number >= 0"),
    ("lambda_update", "adam", "must be one of"),
    ("actor_coefficient", "batch", "must be one of"),
    ("lambda_ki", -0.1, "must be a finite number >= 0"),
    ("lambda_min", 0.0, "must be a finite number > 0"),
    ("lambda_error_clip", [1.0], "must be a pair"),
    ("lambda_error_clip", [0.0, 1.0], "must be a pair"),
    ("ama", "on", "must be one of"),
    ("bf16", "yes", "must be one of"),
    ("score_clip", -1.0, "must be a finite number > 0"),
])
def test_bad_values_are_named(key, value, pattern):
    with pytest.raises(ConfigError, match=f"'{key}': {pattern}") as error:
        SafeRLConfig.from_dict({key: value})
    assert error.value.key == key


@pytest.mark.parametrize("values, pattern", [
    ({"estimator": "rloo", "samples_per_prompt": 1}, "rloo' needs samples_per_prompt >= 2"),
    ({"estimator": "rloo", "ama": "sign", "ama_token_scores": "critics"}, "needs estimator='ppo'"),
    ({"estimator": "rloo", "ppo_epochs": 4}, "one update per rollout"),
    ({"prompts_per_step": 3, "samples_per_prompt": 2, "minibatch_size": 4}, "must divide"),
    ({"ama": "hysteresis", "ama_lower": 0.5, "ama_upper": 0.3}, "ama_lower < ama_upper"),
    ({"lambda_init": 2.0, "lambda_max": 1.0}, "lambda_max"),
    ({"lambda_init": 0.1, "lambda_min": 0.5}, "lambda_min"),
    ({"resume": True}, "resume=True needs output_dir"),
    ({"checkpoint_every": 5}, "checkpoint_every=5 needs output_dir"),
    ({"prompts_per_step": 1, "samples_per_prompt": 1}, ">= 2"),
])
def test_invalid_combinations_are_rejected(values, pattern):
    with pytest.raises(ValueError, match=pattern):
        SafeRLConfig.from_dict(values)


@pytest.mark.parametrize("key, value", [("top_p", 0.9), ("top_k", 20)])
def test_truncated_rollout_sampling_is_refused(key, value):
    """Rollouts drawn from a top-p / top-k truncated distribution while the log-probs, ratios and KL are those of
    the full softmax would be off-policy by an uncorrected amount: refused, naming the key and the alternative."""
    with pytest.raises(ConfigError, match=f"'{key}': .*full softmax.*safety.{key}") as error:
        SafeRLConfig.from_dict({key: value})
    assert error.value.key == key
    SafeRLConfig.from_dict({"top_p": 1.0, "top_k": 0, "temperature": 0.7})  # untruncated sampling is fine


def test_yaml(tmp_path):
    path = tmp_path / "rl.yaml"
    path.write_text("estimator: rloo\nactor_lr: 1e-6\nscore_clip: null\ntotal_steps: 3\nkl_coef: 1\n")
    config = SafeRLConfig.from_yaml(path)
    assert config.estimator == "rloo" and config.actor_lr == 1e-6 and config.score_clip is None
    assert config.total_steps == 3 and isinstance(config.kl_coef, float)
    assert SafeRLConfig.from_dict(config.to_dict()) == config
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="must hold one mapping"):
        SafeRLConfig.from_yaml(path)
    path.write_text("estimator: ppo\nclip_rnage: 0.1\n")
    with pytest.raises(ValueError, match="clip_rnage.*clip_range"):
        SafeRLConfig.from_yaml(path)
