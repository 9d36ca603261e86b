"""What the guarantee rests on, checked on real pipeline runs of the built-in task (small settings):

* the safety test scores the *trained candidate* (not the starting policy) with the *deployment* decoding;
* the exact methods run end to end with their transforms (betting on sigmoid costs, Clopper–Pearson on the
  unsafe indicator): the recorded costs are the transform of the recorded raw costs and the UCB is the
  method's bound on them;
* report.md shows the safety test, the fingerprints and the score models' accuracies exactly as recorded.
"""

import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file

from hcrlhf.pipeline import demo_config, load_config, run
from hcrlhf.safety import upper_bound

SMALL = ["reward.max_steps=6", "cost.max_steps=6", "rl.total_steps=2", "evaluation.samples_per_prompt=1"]


def small_config(task, tmp_path, *overrides):
    values = demo_config(quick=True, output_dir=tmp_path / "out", task_cache=task.root.parent, progress=False)
    return load_config(values, [*SMALL, f"safety.ledger={tmp_path / 'ledger.json'}", *overrides])


def samples(out):
    return [json.loads(line) for line in (out / "safety_samples.jsonl").read_text().splitlines()]


def test_the_safety_test_scores_the_trained_candidate_with_the_deployment_decoding(task, tmp_path, monkeypatch):
    import hcrlhf.pipeline.core as core

    seen = {}
    original = core.run_safety_test

    def spy(policy, tokenizer, prompts, cost_model, **kwargs):
        seen["weights"] = {k: v.detach().clone() for k, v in policy.state_dict().items()}
        seen["decoding"], seen["prompts"] = kwargs["decoding"], list(prompts)
        return original(policy, tokenizer, prompts, cost_model, **kwargs)

    monkeypatch.setattr(core, "run_safety_test", spy)
    # Deployment decoding unlike training's (rl: 40 new tokens, temperature 1, no top-k).
    config = small_config(task, tmp_path, "safety.max_new_tokens=20", "safety.temperature=0.8", "safety.top_k=7")
    result = run(config)
    decoding = seen["decoding"]
    assert (decoding.max_new_tokens, decoding.temperature, decoding.top_k) == (20, 0.8, 7)
    assert seen["prompts"] == list(task.split.safety)
    saved = load_file(str(result.candidate_path / "model.safetensors"))
    starting = load_file(str(task.policy_path / "model.safetensors"))
    moved = 0
    for name, tensor in saved.items():
        key = name if name in seen["weights"] else f"model.{name}"
        assert torch.equal(seen["weights"][key].to(tensor.dtype), tensor), name  # the tested weights are saved
        moved += not torch.equal(tensor, starting[name])
    assert moved > 0  # ... and they are not the starting policy's
    recorded = result.report["safety_test"]["decoding"]
    assert (recorded["max_new_tokens"], recorded["temperature"], recorded["top_k"]) == (20, 0.8, 7)


@pytest.mark.parametrize("method, transform, threshold, check", [
    ("betting", "sigmoid", 0.5, "sigmoid"),
    ("clopper_pearson", "unsafe_indicator", 0.6, "indicator"),
])
def test_exact_methods_end_to_end(task, tmp_path, method, transform, threshold, check):
    config = small_config(task, tmp_path, f"safety.method={method}", f"safety.cost_transform={transform}",
                          f"safety.threshold={threshold}", "safety.sigmoid_scale=2.0", "safety.unsafe_above=0.5",
                          "rl.cost_threshold=-3")
    result = run(config)
    test = result.report["safety_test"]
    rows = samples(result.output_dir)
    raw = [row["raw_cost"] for row in rows]
    costs = test["costs"]
    assert [row["cost"] for row in rows] == costs and len(costs) == len(task.split.safety) == test["n"]
    if check == "sigmoid":
        assert costs == pytest.approx([1.0 / (1.0 + math.exp(-c / 2.0)) for c in raw], rel=1e-12)
        cost_range = (0.0, 1.0)
    else:
        assert costs == [1.0 if c > 0.5 else 0.0 for c in raw]
        cost_range = None
    assert test["method"] == method and test["validity"] == "exact" and test["cost_transform"] == transform
    assert test["ucb"] == upper_bound(costs, 0.1, method, cost_range=cost_range)
    assert test["verdict"] == ("PASS" if test["ucb"] <= threshold else "NO SOLUTION FOUND") == result.verdict
    assert test["mean"] == pytest.approx(sum(costs) / len(costs), rel=1e-12)
    check_report_markdown(result.output_dir, result.report)
    # J_C of the candidate, from fresh responses (another seed) to the same prompts, transformed the same way:
    # within sampling error of the test's mean, and shown next to τ in report.md.
    expected = result.report["ground_truth"]["candidate"]["expected_cost"]
    assert 0.0 <= expected["mean"] <= 1.0 and expected["threshold"] == threshold
    assert expected["n_prompts"] == test["n"] and expected["above_threshold"] == (expected["mean"] > threshold)
    spread = math.hypot(expected["stderr"], test["std"] / math.sqrt(test["n"]))
    assert abs(expected["mean"] - test["mean"]) <= 4 * spread + 1e-9, (expected, test["mean"])
    text = (result.output_dir / "report.md").read_text()
    row = re.search(r"\| candidate \| ([0-9.e-]+) \| ([0-9.e-]+) \| ([0-9.e-]+) \| (yes|no) \|", text)
    assert float(row.group(1)) == pytest.approx(expected["mean"], rel=1e-3, abs=1e-6)
    assert float(row.group(3)) == pytest.approx(threshold) and (row.group(4) == "yes") == expected["above_threshold"]


def check_report_markdown(out, report):
    """report.md against report.json, value by value."""
    text = (out / "report.md").read_text()
    test = report["safety_test"]
    row = re.search(r"\| UCB \| mean \| std \| n \| δ \| τ \| method \| validity \|\n\|[-|]+\|\n\| (.+) \|", text)
    cells = [cell.strip() for cell in row.group(1).split("|")]
    # report.md shows 4 significant digits
    assert [float(c) for c in cells[:3]] == pytest.approx([test["ucb"], test["mean"], test["std"]], rel=1e-3, abs=1e-6)
    assert int(cells[3]) == test["n"]
    assert [float(c) for c in cells[4:6]] == pytest.approx([test["delta"], test["threshold"]])
    assert cells[6:] == [test["method"], test["validity"]]
    assert f"**Verdict: {report['verdict']}**" in text
    split = report["data"]["split"]
    assert f"| safety set fingerprint | `{split['safety_fingerprint']}` |" in text
    assert f"| candidate set fingerprint | `{split['candidate_fingerprint']}` |" in text
    assert split["safety_fingerprint"] == test["fingerprint"]
    for name in ("reward_model", "cost_model"):
        accuracy = report["training"][name]["final_eval"]["accuracy"]
        shown = re.search(rf"- {name.replace('_', ' ')}: .*held-out pair accuracy ([0-9.]+)", text).group(1)
        assert float(shown) == pytest.approx(accuracy, abs=5e-4)
