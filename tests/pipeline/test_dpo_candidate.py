"""Any candidate, one guarantee: `candidate_selection: dpo` (DPO / ADPO on the candidate side's preference pairs)
meets the same safety test as an RL candidate, and `hcrlhf safety-test` on it reproduces the pipeline's test."""

import json
import subprocess
import sys

import pytest

from hcrlhf.pipeline import ConfigError, demo_config, load_config, run

SMALL = ["reward.max_steps=6", "cost.max_steps=6", "evaluation.samples_per_prompt=1", "candidate_selection=dpo",
         "dpo.max_steps=4", "dpo.batch_size=8", "dpo.learning_rate=1e-4", "dpo.preference=safer"]


@pytest.fixture(scope="module")
def adpo_run(task, tmp_path_factory):
    root = tmp_path_factory.mktemp("adpo")
    values = demo_config(quick=True, output_dir=str(root / "out"), task_cache=str(task.root.parent), progress=False)
    return run(load_config(values, [*SMALL, "dpo.mask=ama", "data.category_ratios=EHD:10,IHD:3,MHD:1,benign:10",
                                    f"safety.ledger={root / 'ledger.json'}"]))


def test_adpo_candidate_is_trained_saved_and_tested_like_an_rl_candidate(adpo_run):
    out, report = adpo_run.output_dir, adpo_run.report
    training = report["training"]
    assert "rl" not in training and not (out / "rl").exists()
    dpo = training["dpo"]
    assert dpo["method"] == "ADPO" and dpo["steps"] == 4 and len(dpo["curve"]) == 4
    # FDC for preference data: the pairs DPO trained on were composed 10:3:1:10 (n_k = floor(s·w_k) for the
    # largest scale s = min_k available_k / w_k; docs/method.md#fdc-for-preference-data).
    counts, available = dpo["fdc"]["counts"], dpo["fdc"]["available"]
    weights = {"EHD": 10, "IHD": 3, "MHD": 1, "benign": 10}
    scale = min(available[k] / w for k, w in weights.items())
    assert counts == {k: int(scale * w) for k, w in weights.items()} and counts["MHD"] > 0
    assert dpo["n_pairs"] == sum(counts.values())
    assert 0 < dpo["kept_fraction"] < 1  # the AMA mask was applied (a trained reward model splits responses)
    assert dpo["curve"][0]["loss"] == pytest.approx(0.693147, abs=1e-5)  # policy == reference before step 1
    # The verdict moved the candidate like any other: model/ on PASS, candidate-not-returned/ otherwise.
    assert report["candidate"] == dpo["candidate"] == ("model" if adpo_run.passed else "candidate-not-returned")
    meta = json.loads((out / report["candidate"] / "hcrlhf_candidate.json").read_text())
    assert meta["tested"] and meta["verdict"] == adpo_run.verdict
    assert report["safety_test"]["n"] == len(report["safety_test"]["costs"]) > 0
    assert {"starting_policy", "candidate"} <= set(report["ground_truth"])
    markdown = (out / "report.md").read_text()
    assert "candidate selection (ADPO, chosen = the safer response" in markdown


def test_safety_test_cli_reproduces_the_dpo_candidates_test(adpo_run, task, tmp_path):
    out, report = adpo_run.output_dir, adpo_run.report
    result = subprocess.run([sys.executable, "-m", "hcrlhf.cli", "safety-test", str(out / report["candidate"]),
                             "--prompts", str(task.prompt_paths["safety"]), "--ledger", str(tmp_path / "ledger.json"),
                             "--output", str(tmp_path / "again"), "--no-progress"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == (0 if adpo_run.passed else 3), result.stderr[-3000:]
    again = json.loads((tmp_path / "again" / "safety_test.json").read_text())
    assert again["ucb"] == report["safety_test"]["ucb"] and again["costs"] == report["safety_test"]["costs"]


def test_bad_candidate_selection_is_refused_up_front(task, tmp_path):
    values = demo_config(quick=True, output_dir=str(tmp_path / "out"), task_cache=str(task.root.parent))
    with pytest.raises(ConfigError, match=r"'candidate_selection': must be one of rl, dpo, got 'ppo'"):
        load_config(values, ["candidate_selection=ppo"])
    with pytest.raises(ConfigError, match=r"dpo\.mask"):
        load_config(values, ["candidate_selection=dpo", "dpo.mask=token"])
    assert not (tmp_path / "out").exists()
