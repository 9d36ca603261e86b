"""The one config system (hcrlhf.config): every section checks itself on creation and reports all problems at
once, each naming its dotted key; dotted KEY=VALUE overrides from the command line; the effective config
written to the run dir loads again; docs/config.md is generated from the classes and kept current."""

import dataclasses
import json
import subprocess
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from hcrlhf.config import ConfigError, Problems, Section, apply_overrides, field_docs, parse_override
from hcrlhf.pipeline import demo_config, load_config
from hcrlhf.pipeline.config import PipelineConfig, config_reference

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Inner(Section):
    """A nested section.

    Attributes:
        rate: a rate in (0, 1).
        names: some names.
    """

    rate: float = 0.5
    names: list[str] = field(default_factory=list)

    def check(self, problems: Problems) -> None:
        problems.open_unit("rate", self.rate)


@dataclass
class Outer(Section):
    """The root.

    Attributes:
        steps: how many.
        inner, spare: two nested sections.
        extra: an optional section.
    """

    steps: int = 1
    inner: Inner = field(default_factory=Inner)
    spare: Inner = field(default_factory=Inner)
    extra: Inner | None = None

    def check(self, problems: Problems) -> None:
        problems.at_least("steps", self.steps, 1)
        if self.steps > 10 and self.inner.rate > 0.9:
            problems.add("inner.rate", "must be <= 0.9 with more than 10 steps")


def test_all_problems_at_once_with_dotted_keys_and_hints():
    with pytest.raises(ConfigError) as error:
        Outer.from_dict({"stepz": 3, "steps": 0, "inner": {"rate": 2.0, "names": [1]}, "spare": "x",
                         "extra": {"rat": 0.1}})
    problems = dict(error.value.problems)
    assert set(problems) == {"stepz", "steps", "inner.rate", "inner.names", "spare", "extra.rat"}
    assert "did you mean 'steps'?" in problems["stepz"]
    assert "did you mean 'rate'?" in problems["extra.rat"]
    assert problems["inner.names"].startswith("must be list[str]")
    assert problems["spare"] == "must be a mapping of settings, got str"
    assert str(error.value).startswith("6 problems:\n  config key 'stepz'")


def test_checked_on_creation_and_after_changes():
    with pytest.raises(ConfigError, match="Inner: config key 'rate': must be in the open interval"):
        Inner(rate=1.0)
    with pytest.raises(ConfigError, match="'steps': must be int, got '3'"):
        Outer(steps="3")
    config = Outer()
    config.steps = 0  # a dataclass can be changed in place; validate() (the trainers call it) catches it
    with pytest.raises(ConfigError, match="'steps': must be >= 1"):
        config.validate()
    with pytest.raises(ConfigError, match="'inner.rate': must be <= 0.9"):  # a cross-section rule
        Outer.from_dict({"steps": 11, "inner": {"rate": 0.95}})


def test_nested_loading_round_trip_and_coercion():
    config = Outer.from_dict({"steps": 2, "inner": {"rate": "1e-3"}, "extra": None})
    assert config.inner.rate == 1e-3 and config.extra is None and isinstance(config.spare, Inner)
    assert Outer.from_dict(config.to_dict()) == config
    assert Outer.from_dict({"inner": Inner(rate=0.25)}).inner.rate == 0.25  # a built section is taken as is
    assert Outer.from_dict({"extra": {}}).extra == Inner()


@pytest.mark.parametrize("text, expected", [
    ("rl.kl_coef=0.05", ("rl.kl_coef", 0.05)),
    ("rl.score_clip=null", ("rl.score_clip", None)),
    ("safety.cost_range=[0, 1]", ("safety.cost_range", [0, 1])),
    ("progress=false", ("progress", False)),
    ("rl.actor_lr=1e-6", ("rl.actor_lr", "1e-6")),  # YAML reads it as a string; the float field takes it
    ("data.template=Q: {prompt} A:", ("data.template", "Q: {prompt} A:")),
    ("output_dir=runs/a=b", ("output_dir", "runs/a=b")),
])
def test_override_values_are_read_as_yaml(text, expected):
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["rl.kl_coef", "=3", "rl..kl_coef=1", "rl.kl-coef=1", " =x"])
def test_malformed_overrides_are_refused(text):
    with pytest.raises(ConfigError, match="an override must look like section.key=value"):
        parse_override(text)


def test_overrides_create_sections_and_refuse_paths_through_settings():
    values = {"seed": 0, "rl": {"kl_coef": 0.1}}
    out = apply_overrides(values, ["rl.kl_coef=0.2", "safety.delta=0.05", "sft=null"])
    assert out == {"seed": 0, "rl": {"kl_coef": 0.2}, "safety": {"delta": 0.05}, "sft": None}
    assert values == {"seed": 0, "rl": {"kl_coef": 0.1}}  # the input is not changed
    with pytest.raises(ConfigError) as error:
        apply_overrides(values, ["seed.value=1"])
    assert error.value.key == "seed" and "not a section" in str(error.value)


# ------------------------------------------------------------------------------ the pipeline config


def test_pipeline_overrides_apply_and_derived_settings_follow():
    config = load_config(demo_config(quick=True), ["rl.total_steps=2", "safety.threshold=-1.5", "safety.delta=0.05"])
    assert config.rl.total_steps == 2
    # rl takes τ and δ from safety unless it sets its own
    assert config.rl.cost_threshold == -1.5 and config.rl.delta == 0.05
    assert config.reward.kind == "reward" and config.cost.kind == "cost"
    assert config.rl.output_dir == str(Path("hcrlhf-demo") / "rl")


def test_pipeline_reports_every_problem_across_sections():
    with pytest.raises(ConfigError) as error:
        load_config(demo_config(quick=True), ["rl.kl_cof=0.05", "safety.delta=2", "reward.batch_size=0",
                                              "task=nope", "rl.output_dir=x", "sft.stepz=1"])
    keys = [key for key, _ in error.value.problems]
    assert sorted(keys) == sorted(["rl.kl_cof", "safety.delta", "reward.batch_size", "task", "rl.output_dir",
                                   "sft.stepz"]), keys
    problems = dict(error.value.problems)
    assert "did you mean 'kl_coef'?" in problems["rl.kl_cof"]
    assert "is set by the pipeline" in problems["rl.output_dir"]


def test_a_refused_section_does_not_add_false_required_errors(tmp_path):
    """Only the real problem: with data.safety_fraction refused, the data section's stand-in defaults must not
    make data.preferences / data.prompts look unset (they are set)."""
    prefs, prompts = tmp_path / "prefs.jsonl", tmp_path / "prompts.txt"
    prefs.write_text("{}\n")
    prompts.write_text("a\nb\n")
    values = {"output_dir": str(tmp_path / "out"), "models": {"policy": str(tmp_path)},
              "data": {"preferences": str(prefs), "prompts": str(prompts), "safety_fraction": 1}}
    with pytest.raises(ConfigError) as error:
        load_config(values)
    assert [key for key, _ in error.value.problems] == ["data.safety_fraction"], error.value.problems


def test_device_and_bf16_a_cpu_run_cannot_use_are_refused_up_front(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError) as error:  # (the device is the problem; bf16 would be fine on it)
        load_config(demo_config(quick=True, output_dir="out"), ["models.device=cuda:0", "rl.bf16=true"])
    assert [key for key, _ in error.value.problems] == ["models.device"], error.value.problems
    with pytest.raises(ConfigError) as error:
        load_config(demo_config(quick=True, output_dir="out"), ["reward.bf16=true", "rl.bf16=true"])
    assert sorted(key for key, _ in error.value.problems) == ["reward.bf16", "rl.bf16"], error.value.problems
    load_config(demo_config(quick=True, output_dir="out"), ["rl.bf16=auto", "models.device=cpu"])  # fine


def test_yaml_with_a_key_given_twice_or_a_directory_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("task: builtin\nsafety: {threshold: -3.0}\noutput_dir: x\nsafety: {delta: 0.5}\n")
    with pytest.raises(ConfigError, match=r"key 'safety' is given twice in one mapping \(lines 2 and 4\)"):
        load_config(path)
    with pytest.raises(ConfigError, match="is a directory; expected a YAML file"):
        load_config(tmp_path)


def test_effective_config_loads_again_and_equals_the_original():
    config = load_config(demo_config(quick=True, seed=3), ["rl.total_steps=7", "safety.method=hoeffding",
                                                           "safety.cost_transform=sigmoid", "rl.cost_threshold=-3"])
    values = config.to_dict(loadable=True)
    assert "overwrite" not in values and "output_dir" not in values["rl"] and "kind" not in values["reward"]
    assert values["safety"]["cost_range"] == [0.0, 1.0]  # filled in from the transform, written out
    again = load_config(yaml.safe_load(yaml.safe_dump(values)))
    assert again == config


def test_sections_are_typed():
    hints = {f.name: f.type for f in dataclasses.fields(PipelineConfig)}
    assert "Any" not in " ".join(map(str, hints.values()))
    config = load_config(demo_config(quick=True))
    assert type(config.rl).__name__ == "SafeRLConfig" and type(config.reward).__name__ == "ScoreTrainingConfig"


def test_every_key_is_documented_and_docs_config_md_is_current():
    from hcrlhf.config import _section_class

    queue = [PipelineConfig]
    while queue:
        cls = queue.pop()
        docs, hints = field_docs(cls), typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            assert docs.get(f.name), f"{cls.__name__}.{f.name} has no entry in the class docstring's Attributes"
            if _section_class(hints[f.name]) is not None:
                queue.append(_section_class(hints[f.name]))
    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert text == config_reference(), "docs/config.md is stale: run python -m hcrlhf.config > docs/config.md"
    for key in ("`lambda_error_clip`", "`score_clip`", "`divide_by_one_plus_lambda`", "`holdout_fraction`"):
        assert key in text


# ------------------------------------------------------------------------------------- the CLI


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "hcrlhf.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_cli_overrides_reach_the_run_and_the_effective_config(task, tmp_path):
    out = tmp_path / "run"
    result = run_cli("run", str(ROOT / "configs" / "demo.yaml"), "rl.total_steps=2", "--output", str(out),
                     f"task_cache={task.root.parent}", "--no-progress", "reward.seed=5")
    assert result.returncode in (0, 3), result.stderr[-3000:]
    # --no-progress silences the libraries' bars too (transformers' weight loading), and the verdict prints once
    assert "it/s" not in result.stderr and "Loading weights" not in result.stderr, result.stderr[-2000:]
    assert (result.stdout + result.stderr).count("UCB") == 1, result.stdout + result.stderr[-2000:]
    written = yaml.safe_load((out / "config.yaml").read_text())
    assert written["rl"]["total_steps"] == 2 and written["reward"]["seed"] == 5
    assert written["output_dir"] == str(out) and written["progress"] is False
    report = json.loads((out / "report.json").read_text())
    assert report["config"] == written
    metrics = (out / "rl" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in metrics] == [1, 2]
    assert load_config(written | {"output_dir": str(tmp_path / "again")}).rl.total_steps == 2


@pytest.mark.parametrize("args, key", [
    (["rl.kl_cof=0.05"], "'rl.kl_cof'"),
    (["rl.total_steps=many"], "'rl.total_steps'"),
    (["--output", "x", "safety.delta=1.5"], "'safety.delta'"),
    (["rl.total_steps"], "section.key=value"),
])
def test_cli_bad_override_exit_2_naming_the_key(tmp_path, args, key):
    result = run_cli("run", str(ROOT / "configs" / "demo.yaml"), *args, timeout=120)
    assert result.returncode == 2, result.stderr
    assert key in result.stderr and "Traceback" not in result.stderr
