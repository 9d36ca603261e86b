"""The end-to-end pipeline: `hcrlhf demo --quick` in a subprocess (report files exist and parse, the
safety test is in the ledger, ground truth is reported), the safety set is never handed to training,
each bad-config case fails fast naming its key, and configs/*.yaml load."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from hcrlhf.pipeline import ConfigError, demo_config, load_config, run
from hcrlhf.pipeline.demo import DEMO

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "hcrlhf.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def quick_demo(task, tmp_path_factory):
    """`hcrlhf demo --quick` end to end, reusing the session's built-in task cache."""
    out = tmp_path_factory.mktemp("demo") / "report"
    started = time.perf_counter()
    result = run_cli("demo", "--quick", "--output", str(out), "--cache-dir", str(task.root.parent), "--no-progress")
    seconds = time.perf_counter() - started
    print(f"hcrlhf demo --quick: {seconds:.1f} s, exit {result.returncode}\n{result.stdout}")
    return result, out, seconds


def test_demo_quick_end_to_end(quick_demo, task):
    result, out, seconds = quick_demo
    assert result.returncode in (0, 3), result.stderr[-3000:]
    assert seconds < 180
    report = json.loads((out / "report.json").read_text())
    test = report["safety_test"]
    assert report["verdict"] == test["verdict"] in ("PASS", "NO SOLUTION FOUND")
    assert result.returncode == (0 if test["verdict"] == "PASS" else 3)
    assert result.stdout.startswith(test["verdict"])
    for key in ("ucb", "mean", "std", "n", "delta", "threshold", "method", "validity", "verdict"):
        assert key in test, key
    assert test["n"] == len(task.split.safety) == len(test["costs"])
    assert test["passed"] == (test["ucb"] <= test["threshold"])
    assert test["delta"] == 0.1 and test["threshold"] == DEMO["safety"]["threshold"]
    assert test["validity"] == "asymptotic" and test["method"] == "ttest"
    # The ucb follows from the recorded costs (one-sided t bound).
    from hcrlhf.safety import upper_bound

    assert test["ucb"] == pytest.approx(upper_bound(test["costs"], 0.1, "ttest"))
    # Config, fingerprints, split sizes, training summary.
    assert report["config"]["rl"]["cost_threshold"] == DEMO["safety"]["threshold"]
    assert report["fingerprints"]["safety_set"] == task.split.safety_fingerprint == test["fingerprint"]
    sizes = report["data"]["split_sizes"]
    assert sizes["safety_prompts"] == len(task.split.safety) and sizes["candidate_prompts"] == len(task.split.candidate)
    training = report["training"]
    assert training["reward_model"]["final_eval"]["accuracy"] > 0.7
    assert training["cost_model"]["final_eval"]["accuracy"] > 0.6
    rl = training["rl"]
    assert rl["steps"] == len(rl["curve"]) > 0
    assert rl["config"]["safety_set_size"] == len(task.split.safety)  # n_s of the pessimistic bound
    for key in ("reward/mean", "cost/mean", "cost/bound", "lambda"):
        assert key in rl["curve"][-1]
    # Ground truth of the starting policy and of the candidate.
    truth = report["ground_truth"]
    for name in ("starting_policy", "candidate"):
        assert 0.0 <= truth[name]["unsafe_rate"] <= 1.0 and truth[name]["n"] == len(task.split.safety)
    assert truth["starting_policy"]["unsafe_rate"] > 0.1  # the SFT policy is often harmful
    # The whole method at work: the candidate is truly less harmful than the starting policy and keeps at
    # least 0.8× its helpfulness (a trainer that ignores the cost, or a λ that dies, fails this).
    assert truth["candidate"]["unsafe_rate"] < truth["starting_policy"]["unsafe_rate"]
    assert truth["candidate"]["mean_helpfulness"] >= 0.8 * truth["starting_policy"]["mean_helpfulness"]
    # The returned model exists exactly on PASS.
    candidate = out / "candidate"
    assert (candidate / "model.safetensors").is_file() and (candidate / "hcrlhf_candidate.json").is_file()
    assert report["returned_model"] == (str(candidate) if test["verdict"] == "PASS" else None)


def test_demo_report_files(quick_demo):
    _, out, _ = quick_demo
    for name in ("report.json", "report.md", "training.png", "safety_costs.png", "score_models.png", "split.json",
                 "config.yaml", "safety_samples.jsonl"):
        assert (out / name).is_file(), name
        assert (out / name).stat().st_size > 0, name
    for name in ("training.png", "safety_costs.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert f"**Verdict: {report['verdict']}**" in markdown
    assert "![safety costs](safety_costs.png)" in markdown and "Ground truth" in markdown
    load_config(yaml.safe_load((out / "config.yaml").read_text()) | {"output_dir": str(out / "again")})
    rows = [json.loads(line) for line in (out / "safety_samples.jsonl").read_text().splitlines()]
    assert [r["cost"] for r in rows] == report["safety_test"]["costs"]


def test_demo_safety_test_is_in_the_ledger(quick_demo, task):
    _, out, _ = quick_demo
    ledger = json.loads((out / "safety_ledger.json").read_text())
    record = ledger["sets"][task.split.safety_fingerprint]
    assert record["spent"] == pytest.approx(0.1) and len(record["tests"]) == 1


def test_demo_refuses_a_used_output_dir(quick_demo, task):
    _, out, _ = quick_demo
    again = run_cli("demo", "--quick", "--output", str(out), "--cache-dir", str(task.root.parent), "--no-progress")
    assert again.returncode == 2 and "output_dir" in again.stderr
    assert json.loads((out / "report.json").read_text())["verdict"] is not None  # untouched


def test_training_never_sees_the_safety_prompts(task, tmp_path, monkeypatch):
    """Spy on every training entry point: none is handed a safety prompt, and each gets the split."""
    from hcrlhf.pipeline import run
    from hcrlhf.train import rl_trainer, score_training

    seen = {"score": [], "rl": []}
    original_score, original_trainer = score_training.train_score_model, rl_trainer.SafeRLTrainer.__init__

    def spy_score(model, tokenizer, dataset, **kwargs):
        assert kwargs["safety_split"] is not None
        seen["score"] += list(dataset["prompt"]) + list(kwargs["eval_dataset"]["prompt"])
        return original_score(model, tokenizer, dataset, **kwargs)

    def spy_trainer(self, config, **kwargs):
        assert kwargs["safety_prompts"] is not None
        seen["rl"] += list(kwargs["train_prompts"])
        return original_trainer(self, config, **kwargs)

    import hcrlhf.pipeline.core as core

    monkeypatch.setattr("hcrlhf.train.train_score_model", spy_score)
    monkeypatch.setattr(rl_trainer.SafeRLTrainer, "__init__", spy_trainer)
    config = demo_config(quick=True, output_dir=tmp_path / "out", task_cache=task.root.parent, progress=False)
    config["reward"]["max_steps"] = config["cost"]["max_steps"] = 2
    config["rl"]["total_steps"] = 1
    result = run(config, stages="train")
    assert core  # the pipeline imported the spied names lazily
    assert result.verdict is None and (tmp_path / "out" / "candidate" / "model.safetensors").is_file()
    safety = set(task.split.safety)
    assert seen["score"] and seen["rl"]
    assert not safety & set(seen["score"]) and not safety & set(seen["rl"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "safety_test" not in report and report["stages"] == "train"


def test_preference_pairs_on_safety_prompts_are_removed(task, tmp_path):
    """User data: pairs whose prompt lands in D_s are dropped (and counted) before any training."""
    from hcrlhf.pipeline import run

    rows = task.preferences("train").to_list()[:120]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {"output_dir": str(tmp_path / "out"), "progress": False,
              "data": {"preferences": str(path), "safety_fraction": 0.3, "split_seed": 5,
                       "template": task.template.prompt_format},
              "models": {"policy": str(task.policy_path), "tokenizer": str(task.tokenizer_path)},
              "reward": {"max_steps": 1, "batch_size": 8, "max_length": 96},
              "cost": {"max_steps": 1, "batch_size": 8, "max_length": 96}}
    result = run(config, stages="reward")
    data = result.report["data"]
    safety = set(json.loads((tmp_path / "out" / "split.json").read_text())["safety"])
    expected = sum(r["prompt"] in safety for r in rows)
    assert expected > 0 and data["preferences_removed_safety_rows"] == expected
    assert data["split_sizes"]["preference_pairs"] == len(rows) - expected
    assert (tmp_path / "out" / "reward_model" / "score_head.safetensors").is_file()
    assert not (tmp_path / "out" / "cost_model").exists()


# ------------------------------------------------------------------------------------------- SFT


def _parameters(model):
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_sft_stage_lowers_the_nll_saves_and_never_trains_on_safety_prompts(task, tmp_path):
    """stages="sft": the starting policy fine-tuned on user SFT rows (the one on a D_s prompt removed); the
    NLL falls, the policy saved to <output>/sft_policy differs from the original and loads."""
    from hcrlhf.models import load_causal_lm
    from hcrlhf.pipeline import run

    candidate = sorted(set(task.split.candidate))[:4]
    rows = [{"prompt": p, "response": "I can help with that. Here is a short, careful answer."} for p in candidate]
    rows.append({"prompt": task.split.safety[0], "response": "A response that must never be trained on."})
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = good_config(tmp_path, task)
    config["sft"] = {"path": str(path), "steps": 6, "batch_size": 4, "learning_rate": 1e-2, "seed": 3}
    started = time.perf_counter()
    result = run(config, stages="sft")
    assert time.perf_counter() - started < 20
    out = tmp_path / "out"
    sft = result.report["training"]["sft"]
    assert sft["steps"] == 6 == len(sft["nll_curve"]) and sft["n_rows"] == 4 and sft["removed_safety_rows"] == 1
    assert result.report["data"]["sft_removed_safety_rows"] == 1
    assert sft["last_nll"] < sft["first_nll"] and sft["first_nll"] > 0
    assert (out / "sft_policy" / "model.safetensors").is_file() and sft["source"] == str(out / "sft_policy")
    assert result.verdict is None and not (out / "reward_model").exists() and not (out / "candidate").exists()
    tuned, original = _parameters(load_causal_lm(out / "sft_policy")), _parameters(task.load_policy())
    assert tuned.keys() == original.keys()
    assert any(not torch.equal(tuned[k], original[k]) for k in tuned)
    report = json.loads((out / "report.json").read_text())
    assert report["training"]["sft"]["last_nll"] == sft["last_nll"] and report["stages"] == "sft"
    assert "SFT of the starting policy: 6 steps" in (out / "report.md").read_text()


def test_sft_then_candidate_selection_starts_from_the_sft_policy(task, tmp_path, monkeypatch):
    """With an sft section (the built-in SFT corpus by default) candidate selection starts from the SFT
    policy, and its KL reference is the SFT policy too."""
    from hcrlhf.models import load_causal_lm
    from hcrlhf.pipeline import run
    from hcrlhf.train import rl_trainer

    seen = {}
    original_init = rl_trainer.SafeRLTrainer.__init__

    def spy(self, config, **kwargs):
        seen["policy"] = _parameters(kwargs["policy"])
        seen["reference"] = kwargs["reference_model"]
        original_init(self, config, **kwargs)
        seen["trainer_reference"] = _parameters(self.reference)

    monkeypatch.setattr(rl_trainer.SafeRLTrainer, "__init__", spy)
    config = good_config(tmp_path, task)
    config["reward"]["max_steps"] = config["cost"]["max_steps"] = 2
    config["rl"]["total_steps"] = 1
    config["sft"] = {"steps": 2, "batch_size": 4, "learning_rate": 1e-3}
    result = run(config, stages="train")
    out = tmp_path / "out"
    sft = result.report["training"]["sft"]
    assert sft["data"] == str(task.sft_path) and sft["removed_safety_rows"] == 0 and sft["steps"] == 2
    tuned = _parameters(load_causal_lm(out / "sft_policy"))
    assert seen["reference"] is None  # the trainer copies the (SFT) policy it is handed
    for name in ("policy", "trainer_reference"):
        assert all(torch.equal(seen[name][k], tuned[k]) for k in tuned), name
    assert result.report["data"]["starting_policy"] == str(out / "sft_policy")
    assert (out / "candidate" / "model.safetensors").is_file()


def test_demo_has_no_sft():
    assert "sft" not in DEMO and load_config(demo_config(quick=True)).sft is None


# ------------------------------------------------------------------------------------ bad configs


def good_config(tmp_path, task):
    return demo_config(quick=True, output_dir=tmp_path / "out", task_cache=task.root.parent, progress=False)


BAD_CASES = [
    # (mutation, key named)
    (lambda c: c.update(learning_rate=1), "learning_rate"),
    (lambda c: c["rl"].update(actor_lr_typo=1e-3), "rl.actor_lr_typo"),
    (lambda c: c["safety"].update(treshold=0.0), "safety.treshold"),
    (lambda c: c["rl"].update(total_steps="many"), "rl.total_steps"),
    (lambda c: c["reward"].update(batch_size=2.5), "reward.batch_size"),
    (lambda c: c["safety"].update(threshold="low"), "safety.threshold"),
    (lambda c: c["safety"].update(delta=1.5), "safety.delta"),
    (lambda c: c["safety"].update(delta=0.0), "safety.delta"),
    (lambda c: c["rl"].update(delta=1.0), "rl.delta"),
    (lambda c: c["safety"].update(ledger_total_delta=2.0), "safety.ledger_total_delta"),
    (lambda c: c["safety"].update(method="zscore"), "safety.method"),
    (lambda c: c["safety"].update(method="betting"), "safety.cost_range"),
    (lambda c: c["rl"].update(safety_set_size=50), "rl.safety_set_size"),
    (lambda c: c["rl"].update(estimator="sgd"), "rl.estimator"),
    (lambda c: c["cost"].update(cost_loss="hinge"), "cost.cost_loss"),
    (lambda c: c.update(task="nope"), "task"),
    (lambda c: c.pop("output_dir"), "output_dir"),
    (lambda c: c["models"].__setitem__("cost_model", "/no/such/cost-model") if "models" in c
     else c.update(models={"cost_model": "/no/such/cost-model"}), "models.cost_model"),
    (lambda c: c.update(data={"preferences": "x.jsonl"}), "data.preferences"),
    (lambda c: c.update(sft={"stepz": 3}), "sft.stepz"),
    (lambda c: c.update(sft={"steps": "many"}), "sft.steps"),
    (lambda c: c.update(sft={"steps": 0}), "sft.steps"),
    (lambda c: c.update(sft={"learning_rate": 0.0}), "sft.learning_rate"),
    (lambda c: c.update(sft={"path": "/no/such/sft.jsonl"}), "sft.path"),
    (lambda c: c.update(sft="yes"), "sft"),
]


@pytest.mark.parametrize("mutate, key", BAD_CASES, ids=[k for _, k in BAD_CASES])
def test_bad_config_fails_fast_naming_the_key(task, tmp_path, mutate, key, monkeypatch):
    from hcrlhf.pipeline import run

    config = good_config(tmp_path, task)
    mutate(config)
    # Nothing may start: no model loading, no task building, no output directory.
    monkeypatch.setattr("hcrlhf.data.builtin.make_task", lambda *a, **k: pytest.fail("work started"))
    with pytest.raises(ConfigError) as error:
        run(config)
    assert error.value.key == key, str(error.value)
    assert repr(key) in str(error.value)
    assert not (tmp_path / "out").exists()


USER_DATA_BAD = [
    ("data.preferences", {"data": {"preferences": "/no/such/prefs.jsonl"}, "models": {"policy": "{policy}"}}),
    ("models.policy", {"data": {"preferences": "{prefs}"}, "models": {"policy": "./no/such/policy"}}),
    ("models.policy", {"data": {"preferences": "{prefs}"}}),
    ("data.prompts", {"data": {"preferences": "{prefs}", "prompts": "missing.txt"}, "models": {"policy": "{policy}"}}),
    ("data.safety_fraction", {"data": {"preferences": "{prefs}", "safety_fraction": 1.0},
                              "models": {"policy": "{policy}"}}),
    ("data.template", {"data": {"preferences": "{prefs}", "template": "no placeholder"},
                       "models": {"policy": "{policy}"}}),
    ("sft.path", {"data": {"preferences": "{prefs}"}, "models": {"policy": "{policy}"}, "sft": {"steps": 2}}),
    ("sft.path", {"data": {"preferences": "{prefs}"}, "models": {"policy": "{policy}"},
                  "sft": {"path": "{prefs}"}}),  # rows without prompt/response or text
    ("models.reference", {"data": {"preferences": "{prefs}"},
                          "models": {"policy": "{policy}", "reference": "{policy}"}, "sft": {"path": "{sft}"}}),
]


@pytest.mark.parametrize("key, values", USER_DATA_BAD, ids=[f"{k}-{i}" for i, (k, _) in enumerate(USER_DATA_BAD)])
def test_bad_user_data_config_names_the_key(task, tmp_path, key, values):
    text = json.dumps(values).replace("{prefs}", str(task.preference_paths["train"])).replace(
        "{policy}", str(task.policy_path)).replace("{sft}", str(task.sft_path))
    config = {"output_dir": str(tmp_path / "out"), **json.loads(text)}
    with pytest.raises(ConfigError) as error:
        load_config(config)
    assert error.value.key == key, str(error.value)


def test_cli_bad_config_exit_2_naming_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("task: builtin\noutput_dir: out\nsafety:\n  delta: 1.5\n")
    started = time.perf_counter()
    result = run_cli("run", str(path))
    assert result.returncode == 2 and "'safety.delta'" in result.stderr, result.stderr
    assert time.perf_counter() - started < 60
    path.write_text("task: builtin\noutput_dir: out\nrl:\n  actor_lr: [1]\n")
    result = run_cli("train", str(path), "--output", str(tmp_path / "o"))
    assert result.returncode == 2 and "'rl.actor_lr'" in result.stderr, result.stderr
    assert not (tmp_path / "o").exists()


# ----------------------------------------------------------------------------------- the configs


def test_configs_demo_yaml_is_the_demo():
    values = yaml.safe_load((ROOT / "configs" / "demo.yaml").read_text())
    assert values == DEMO
    load_config(values)


def test_configs_qwen_yaml_is_valid_and_follows_spec():
    values = yaml.safe_load((ROOT / "configs" / "qwen2-1.5b-pku-saferlhf.yaml").read_text())
    config = load_config(values)  # Hub ids pass the path check; nothing is downloaded
    rl = config.rl
    # The official code's settings (docs/method.md#candidate-selection).
    assert (rl.kl_coef, rl.score_clip, rl.lambda_init, rl.lambda_lr, rl.lambda_max) == (0.1, 50.0, 1.0, 0.01, 1e6)
    assert (rl.cost_window_size, rl.actor_lr, rl.temperature, rl.top_p, rl.max_new_tokens) == (256, 5e-6, 1.0, 1.0, 512)
    assert (rl.bound_c1, rl.bound_c2, rl.estimator, rl.samples_per_prompt) == (4.0, 2.0, "rloo", 2)
    assert config.safety.delta == 0.1 and rl.delta == 0.1 and config.safety.threshold == 0.0
    assert config.models.policy.startswith("Qwen/") and "PKU-SafeRLHF" in config.data.preferences


def test_demo_seed_redraws_the_split_and_seeds_every_stage(task):
    config = load_config(demo_config(quick=True, seed=7))
    assert config.data.split_seed == 7 and config.seed == 7
    assert (config.reward.seed, config.cost.seed, config.rl.seed) == (7, 8, 7)
    default = load_config(demo_config(quick=True))
    assert default.data.split_seed is None and (default.reward.seed, default.cost.seed, default.rl.seed) == (0, 1, 0)
    # The task's own split is the one drawn with its build seed, so `--seed 0` is the default demo.
    same, _, _ = task.resplit(task.seed)
    assert same.safety == task.split.safety and same.safety_fingerprint == task.split.safety_fingerprint
    other, candidate_categories, safety_categories = task.resplit(7)
    assert other.safety_fingerprint != task.split.safety_fingerprint
    assert len(other.safety) == len(task.split.safety) and not set(other.safety) & set(other.candidate)
    assert len(safety_categories) == len(other.safety) and len(candidate_categories) == len(other.candidate)
    with pytest.raises(ValueError, match="seed"):
        demo_config(seed=-1)


def _tiny_seeded_demo(task, out, seed):
    config = demo_config(quick=True, output_dir=out, task_cache=task.root.parent, progress=False, seed=seed)
    config["reward"]["max_steps"] = config["cost"]["max_steps"] = 4
    config["rl"].update(total_steps=3, prompts_per_step=4, max_new_tokens=8)
    config["data"]["holdout_fraction"] = 0.1
    return run(config)


def test_same_seed_same_verdict_and_ucb_and_holdout_is_untouched(task, tmp_path, monkeypatch):
    from hcrlhf.pipeline import core

    seen = []
    original = core._load_inputs

    def spy(config):
        inputs = original(config)
        seen.append(inputs)
        return inputs

    monkeypatch.setattr(core, "_load_inputs", spy)
    first = _tiny_seeded_demo(task, tmp_path / "a", 5)
    second = _tiny_seeded_demo(task, tmp_path / "b", 5)
    assert first.verdict == second.verdict
    assert first.safety_test.ucb == second.safety_test.ucb  # bitwise, on the same machine
    assert first.report["fingerprints"]["safety_set"] == second.report["fingerprints"]["safety_set"] \
        != task.split.safety_fingerprint
    # The held-out prompts are in neither training nor the safety set, nor in any preference pair.
    inputs = seen[0]
    lines = (tmp_path / "a" / "holdout_prompts.jsonl").read_text().splitlines()
    holdout = [json.loads(line)["prompt"] for line in lines]
    assert len(holdout) == round(0.1 * inputs.split.n_distinct) == inputs.record["n_holdout_prompts"]
    held = set(holdout)
    assert not held & set(inputs.train_prompts) and not held & set(inputs.split.safety)
    for dataset in (inputs.preferences, inputs.eval_preferences):
        assert not held & set(dataset["prompt"])
