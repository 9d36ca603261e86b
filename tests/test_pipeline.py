"""The end-to-end pipeline: `hcrlhf demo --quick` in a subprocess (report files exist and parse, the
safety test is in the ledger, ground truth is reported), the safety set is never handed to training,
each bad-config case fails fast naming its key, and configs/*.yaml load."""

import json
import os
import shutil
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


def run_cli(*args, timeout=300, state=None):
    """The CLI in a subprocess; ``state``: its HCRLHF_STATE_DIR (the per-user ledger's directory)."""
    env = None if state is None else dict(os.environ, HCRLHF_STATE_DIR=str(state))
    return subprocess.run([sys.executable, "-m", "hcrlhf.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def demo_state(out):
    """The per-user state directory (default δ ledger) of the quick_demo fixture's runs."""
    return out.parent / "state"


def candidate_dir(out):
    """The candidate of a finished run (report.json says where): model/ on PASS, candidate-not-returned/ on NSF."""
    return out / json.loads((out / "report.json").read_text())["candidate"]


@pytest.fixture(scope="module")
def quick_demo(task, tmp_path_factory):
    """`hcrlhf demo --quick` end to end, reusing the session's built-in task cache, with its own default ledger."""
    out = tmp_path_factory.mktemp("demo") / "report"
    started = time.perf_counter()
    # timeout: a hang guard only, >10x the ~45-75 s the quick demo takes on a 2-core machine
    result = run_cli("demo", "--quick", "--output", str(out), "--cache-dir", str(task.root.parent), "--no-progress",
                     state=demo_state(out), timeout=900)
    seconds = time.perf_counter() - started
    print(f"hcrlhf demo --quick: {seconds:.1f} s, exit {result.returncode}\n{result.stdout}")
    return result, out, seconds


def test_demo_quick_end_to_end(quick_demo, task):
    result, out, seconds = quick_demo
    assert result.returncode in (0, 3), result.stderr[-3000:]
    # no wall-clock limit here (flaky on a loaded machine): its time is printed above, and measured by
    # `hcrlhf bench demo --quick` (benchmarks/bench_demo.py)
    report = json.loads((out / "report.json").read_text())
    test = report["safety_test"]
    assert report["verdict"] == test["verdict"] in ("PASS", "NO SOLUTION FOUND")
    assert result.returncode == (0 if test["verdict"] == "PASS" else 3)
    assert result.stdout.startswith(test["verdict"])
    benign = [report["ground_truth"][p]["over_safety"]["benign"]["over_safe_rate"]
              for p in ("starting_policy", "candidate")]
    assert f"over-safe on benign prompts {benign[0]:.3f} -> {benign[1]:.3f}" in result.stdout
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
    # The returned model exists exactly on PASS (model/); on NSF the candidate is kept, marked, elsewhere.
    passed = test["verdict"] == "PASS"
    candidate = out / ("model" if passed else "candidate-not-returned")
    assert (candidate / "model.safetensors").is_file() and (candidate / "hcrlhf_candidate.json").is_file()
    assert report["returned_model"] == ("model" if passed else None) and report["candidate"] == candidate.name
    assert (candidate / "NOT_RETURNED.md").is_file() != passed and not (out / "candidate").exists()
    assert (out / "model").exists() == passed


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
    # The default ledger is the per-user one (HCRLHF_STATE_DIR here), not a file in the output folder.
    assert not (out / "safety_ledger.json").exists()
    ledger = json.loads((demo_state(out) / "safety_ledger.json").read_text())
    record = ledger["sets"][task.split.safety_fingerprint]
    assert record["spent"] == pytest.approx(0.1) and len(record["tests"]) == 1
    assert record["tests"][0]["label"] == f"hcrlhf pipeline {out.resolve()}"
    assert len(record["prompt_digests"]) == len(task.split.safety)
    report = json.loads((out / "report.json").read_text())
    assert report["ledger"] == {"path": str(demo_state(out) / "safety_ledger.json"), "total_delta": 0.1,
                                "spent_before": 0.0}
    assert report["safety_test"]["ledger"] == report["ledger"]["path"]
    meta = json.loads((candidate_dir(out) / "hcrlhf_candidate.json").read_text())
    assert meta["ledger"] == report["ledger"]["path"]


def test_a_second_demo_into_a_new_folder_is_refused_before_training(quick_demo, task, tmp_path):
    """The same safety set (the default demo's split) from another output folder: refused right after the
    split, before any training, naming what was spent, when, by which run, and how to get a fresh set."""
    _, out, _ = quick_demo
    other = tmp_path / "other"
    again = run_cli("demo", "--quick", "--output", str(other), "--cache-dir", str(task.root.parent),
                    "--no-progress", state=demo_state(out))
    assert again.returncode == 1 and "BudgetExceededError" in again.stderr, again.stderr[-3000:]
    for hint in ("refused before spending", "already spent δ=0.1", f"hcrlhf pipeline {out.resolve()}",
                 "hcrlhf demo --seed N", "safety.ledger", str(demo_state(out) / "safety_ledger.json")):
        assert hint in again.stderr, hint
    assert "stage: reward model" not in again.stderr and not (other / "reward_model").exists()
    ledger = json.loads((demo_state(out) / "safety_ledger.json").read_text())
    assert len(ledger["sets"][task.split.safety_fingerprint]["tests"]) == 1


def test_a_moved_demo_run_cannot_re_spend_from_the_ledger(quick_demo, task, tmp_path):
    """A run directory moved elsewhere: `hcrlhf safety-test` on its candidate finds the same ledger."""
    _, out, _ = quick_demo
    moved = tmp_path / "moved"
    shutil.move(out, moved)
    try:
        again = run_cli("safety-test", str(candidate_dir(moved)), "--prompts", str(task.prompt_paths["safety"]),
                        "--cost-model", str(moved / "cost_model"), "--no-progress", state=demo_state(out))
        assert again.returncode == 1 and "BudgetExceededError" in again.stderr, again.stderr[-3000:]
        assert not out.exists()  # no ledger recreated where the run used to be
    finally:
        shutil.move(moved, out)
    ledger = json.loads((demo_state(out) / "safety_ledger.json").read_text())
    assert len(ledger["sets"][task.split.safety_fingerprint]["tests"]) == 1


def test_pipeline_checks_the_ledger_before_training(task, tmp_path, monkeypatch):
    from hcrlhf.pipeline import core
    from hcrlhf.safety import BudgetExceededError, SafetyLedger, default_ledger_path

    SafetyLedger(default_ledger_path(), 0.1).spend(list(task.split.safety), 0.1, "an earlier run, elsewhere")
    monkeypatch.setattr(core, "_score_model", lambda *a, **k: pytest.fail("training started"))
    with pytest.raises(BudgetExceededError, match="an earlier run, elsewhere"):
        run(good_config(tmp_path, task))
    assert not (tmp_path / "out" / "reward_model").exists()
    # A smaller δ still fits a budget with room left; none is left here, so any δ is refused.
    config = good_config(tmp_path, task)
    config["overwrite"] = True
    config["safety"]["delta"] = 0.01
    with pytest.raises(BudgetExceededError):
        run(config)


def test_pipeline_split_tests_each_user_prompt_once(task, tmp_path):
    """A prompt file with copies: they are dropped before the split (counted in split.json and report.json),
    so the safety set holds each prompt once."""
    distinct = sorted(set(task.split.candidate))[:40]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in distinct * 3))
    config = {"output_dir": str(tmp_path / "out"), "progress": False,
              "data": {"preferences": str(task.preference_paths["train"]), "prompts": str(prompts),
                       "safety_fraction": 0.25, "split_seed": 5, "template": task.template.prompt_format},
              "models": {"policy": str(task.policy_path), "tokenizer": str(task.tokenizer_path)},
              "reward": {"max_steps": 1, "batch_size": 8, "max_length": 96}}
    result = run(config, stages="reward")
    split = json.loads((tmp_path / "out" / "split.json").read_text())
    assert len(split["safety"]) == len(set(split["safety"])) == 10 and len(split["candidate"]) == 30
    assert split["n_duplicates_dropped"] == 80
    assert result.report["data"]["split"]["n_duplicates_dropped"] == 80
    assert result.report["data"]["split_sizes"]["safety_prompts"] == 10


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
    assert (tmp_path / "out" / "reward_model" / "model.safetensors").is_file()  # with its head: HF-loadable
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
    result = run(config, stages="sft")
    out = tmp_path / "out"
    sft = result.report["training"]["sft"]
    assert sft["steps"] == 6 == len(sft["nll_curve"]) and sft["n_rows"] == 4 and sft["removed_safety_rows"] == 1
    assert result.report["data"]["sft_removed_safety_rows"] == 1
    assert sft["last_nll"] < sft["first_nll"] and sft["first_nll"] > 0
    assert (out / "sft_policy" / "model.safetensors").is_file()
    assert sft["source"] == "sft_policy"  # relative to the run directory
    assert result.verdict is None and not (out / "reward_model").exists() and not (out / "candidate").exists()
    from transformers import AutoTokenizer

    from hcrlhf.models import load_tokenizer
    from hcrlhf.models.loading import same_tokenizer

    for tokenizer in (AutoTokenizer.from_pretrained(out / "sft_policy"), load_tokenizer(out / "sft_policy")):
        assert same_tokenizer(tokenizer, task.load_tokenizer())  # the training tokenizer, next to a Qwen2 config
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
    assert result.report["data"]["starting_policy"] == "sft_policy"  # relative to the run directory
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
    result = run_cli("run", str(path))
    assert result.returncode == 2 and "'safety.delta'" in result.stderr, result.stderr
    assert "[hcrlhf] stage:" not in result.stderr  # fails fast: refused before any stage starts, not timed
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
    # Both runs test one safety set on purpose (reproducibility): each gets its own ledger, explicitly.
    config["safety"]["ledger"] = str(Path(out) / "ledger.json")
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


def test_a_given_score_model_without_a_trained_head_is_refused(task, tmp_path):
    """models.cost_model = a plain causal LM (no score head: it would be drawn at random) is a bad config
    naming the key and the missing weight, found before anything is trained or tested."""
    config = good_config(tmp_path, task)
    config["models"] = {"cost_model": str(task.policy_path)}
    with pytest.raises(ConfigError, match=r"models\.cost_model.*not a trained score model.*score\.weight") as error:
        run(config, stages="cost")
    assert error.value.key == "models.cost_model"
    assert not (tmp_path / "out" / "cost_model").exists()


# ------------------------------------------------------- what is tested is what is returned (candidate/)


def test_safety_test_cli_with_defaults_reproduces_the_pipelines_test_exactly(quick_demo, task, tmp_path):
    """`hcrlhf safety-test CANDIDATE --prompts SAFETY` with default arguments (only its own ledger, so that δ is
    not refused) samples the same responses and gives the pipeline's UCB to the last digit: the candidate's own
    tokenizer, template, decoding, prompt length, seed and batch size come from the candidate directory."""
    _, out, _ = quick_demo
    report = json.loads((out / "report.json").read_text())
    result = run_cli("safety-test", str(candidate_dir(out)), "--prompts", str(task.prompt_paths["safety"]),
                     "--ledger", str(tmp_path / "ledger.json"), "--output", str(tmp_path / "again"), "--no-progress")
    assert result.returncode == (0 if report["verdict"] == "PASS" else 3), result.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "safety_test.json").read_text())
    pipeline = report["safety_test"]
    print(f"UCB pipeline {pipeline['ucb']!r}, hcrlhf safety-test {again['ucb']!r}")
    assert again["ucb"] == pipeline["ucb"] and again["costs"] == pipeline["costs"]
    assert again["verdict"] == pipeline["verdict"]
    for key in ("decoding", "sampling_seed", "batch_size", "max_prompt_length"):
        assert again[key] == pipeline[key], key
    responses = [json.loads(line)["response"] for line in (out / "safety_samples.jsonl").read_text().splitlines()]
    assert [json.loads(line)["response"] for line in
            (tmp_path / "again" / "safety_samples.jsonl").read_text().splitlines()] == responses


def _texts(task):
    return [task.template.format_prompt(p) for p in task.split.safety]


def test_saved_tokenizers_load_back_as_trained(quick_demo, task):
    """candidate/, reward_model/ and cost_model/ hold a Qwen2 config next to the task's word-level tokenizer:
    AutoTokenizer and hcrlhf's load_tokenizer must give the training tokenizer (not Qwen2Tokenizer)."""
    from transformers import AutoTokenizer

    from hcrlhf.models import load_tokenizer

    _, out, _ = quick_demo
    trained = task.load_tokenizer()  # the tokenizer training used
    expected = trained(_texts(task)).input_ids
    for name in (candidate_dir(out).name, "reward_model", "cost_model"):
        for loaded in (AutoTokenizer.from_pretrained(out / name), load_tokenizer(out / name)):
            assert loaded(_texts(task)).input_ids == expected, name
            for token in ("pad_token", "eos_token", "unk_token", "bos_token"):
                assert getattr(loaded, token) == getattr(trained, token), (name, token)
                assert getattr(loaded, f"{token}_id") == getattr(trained, f"{token}_id"), (name, token)


def test_the_candidate_deploys_with_plain_transformers_as_tested(quick_demo, task):
    """AutoModelForCausalLM + AutoTokenizer on candidate/: the weights that were tested, the training
    tokenizer's ids and greedy tokens, and its ``generation_config.json`` is the tested decoding: sampling the plain
    model with that config and the test's per-prompt seeds (``hcrlhf.models.generation.generate``) gives exactly
    the responses the safety test scored. (A bare ``model.generate()`` samples the same distribution with torch's
    global generator: other draws.)"""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from hcrlhf.data.templates import tokenize_prompts
    from hcrlhf.models import load_causal_lm
    from hcrlhf.models.generation import decoding_settings, generate, row_seeds

    _, out, _ = quick_demo
    candidate = candidate_dir(out)
    meta = json.loads((candidate / "hcrlhf_candidate.json").read_text())
    report = json.loads((out / "report.json").read_text())
    model, tokenizer = AutoModelForCausalLM.from_pretrained(candidate).eval(), AutoTokenizer.from_pretrained(candidate)
    trained = task.load_tokenizer()
    saved = load_file(str(candidate / "model.safetensors"))
    state = model.state_dict()
    assert all(torch.equal(state[name], tensor) for name, tensor in saved.items())
    # The deployment decoding is the candidate's generation_config.json, and it is the one the test recorded.
    settings = decoding_settings(GenerationConfig.from_pretrained(candidate))
    assert settings == meta["decoding"] == report["safety_test"]["decoding"]
    assert settings["do_sample"] is True and settings["top_k"] == 0
    prompts = list(task.split.safety)[:report["safety_test"]["batch_size"]]
    batch = tokenize_prompts(tokenizer, prompts, template=task.template)
    assert torch.equal(batch.input_ids, tokenize_prompts(trained, prompts, template=task.template).input_ids)
    # Greedy tokens: plain transformers == the pipeline's loader with the training tokenizer.
    greedy = GenerationConfig(do_sample=False, max_new_tokens=12, pad_token_id=tokenizer.pad_token_id,
                              eos_token_id=tokenizer.eos_token_id)
    reference = load_causal_lm(candidate).eval()
    expected = reference.generate(**tokenize_prompts(trained, prompts, template=task.template).model_inputs(),
                                  generation_config=greedy)
    assert torch.equal(model.generate(**batch.model_inputs(), generation_config=greedy), expected)
    # The plain model, the saved config, the test's seed per prompt index: the responses the test scored.
    seeds = row_seeds(report["safety_test"]["sampling_seed"], [("sample", i) for i in range(len(prompts))])
    with torch.no_grad():
        output = generate(model, batch.input_ids, batch.attention_mask, GenerationConfig.from_pretrained(candidate),
                          row_seeds=seeds)
    responses = []
    for row in output[:, batch.input_ids.shape[1]:].tolist():
        end = row.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in row else len(row)
        responses.append(tokenizer.decode(row[:end], skip_special_tokens=True).strip())
    tested = [json.loads(line)["response"] for line in (out / "safety_samples.jsonl").read_text().splitlines()]
    assert responses == tested[:len(prompts)]


def test_safety_test_cli_defaults_follow_the_candidates_seed_batch_size_and_decoding(task, tmp_path):
    """A run whose test differs from every CLI default — seed 5, batch size 16, a deployment decoding unlike the
    rollouts' — is reproduced exactly by `hcrlhf safety-test` with default arguments."""
    config = demo_config(quick=True, output_dir=tmp_path / "out", task_cache=task.root.parent, progress=False, seed=5)
    config["reward"]["max_steps"] = config["cost"]["max_steps"] = 4
    config["rl"].update(total_steps=2, prompts_per_step=4, max_new_tokens=8)
    config["safety"].update(batch_size=16, temperature=0.8, top_k=7, max_new_tokens=12,
                            ledger=str(tmp_path / "pipeline-ledger.json"))
    config["evaluation"]["samples_per_prompt"] = 1
    result = run(config)
    safety = json.loads((tmp_path / "out" / "split.json").read_text())["safety"]
    prompts = tmp_path / "safety.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in safety))
    cli = run_cli("safety-test", str(result.candidate_path), "--prompts", str(prompts), "--ledger",
                  str(tmp_path / "ledger.json"), "--output", str(tmp_path / "again"), "--no-progress")
    assert cli.returncode in (0, 3), cli.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "safety_test.json").read_text())
    pipeline = result.report["safety_test"]
    assert (pipeline["sampling_seed"], pipeline["batch_size"]) == (5, 16)
    assert (pipeline["decoding"]["temperature"], pipeline["decoding"]["top_k"]) == (0.8, 7)
    for key in ("ucb", "costs", "verdict", "decoding", "sampling_seed", "batch_size"):
        assert again[key] == pipeline[key], key
