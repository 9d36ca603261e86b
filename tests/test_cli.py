"""The `hcrlhf` command: version, the advantage benchmark, and exit codes."""

import subprocess
import sys

import pytest


def run_cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "hcrlhf.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def test_version():
    import hcrlhf

    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"hcrlhf {hcrlhf.__version__}"


def test_stdout_carries_only_the_results_while_a_command_works(monkeypatch, capsys):
    """A library that prints to stdout mid-run (DeepSpeed logs its accelerator there when transformers imports it)
    must not push the verdict off stdout's first line: such output goes to stderr."""
    from hcrlhf import cli

    def noisy_demo(args):
        print("[WARNING] [real_accelerator.py] Setting accelerator to CPU.")
        cli._say("PASS: UCB -1 <= threshold 0")
        return 0

    monkeypatch.setattr(cli, "cmd_demo", noisy_demo)
    assert cli.main(["demo"]) == 0
    out, err = capsys.readouterr()
    assert out == "PASS: UCB -1 <= threshold 0\n"
    assert "Setting accelerator to CPU" in err


def test_bench_advantages_small_run_prints_the_table():
    result = run_cli("bench", "advantages", "--device", "cpu", "--shapes", "4x16", "--ops", "gae", "rloo_advantages")
    assert result.returncode == 0, result.stderr
    assert "| op | B | T | impl |" in result.stdout
    for label in ("peer (Python loop)", "peer (Python)", "| gae | 4 | 16 |", "| rloo_advantages | 4 | 16 |"):
        assert label in result.stdout


@pytest.mark.parametrize("args", [("bench", "nope"), ("bench", "advantages", "--shapes", "3x"), (),
                                  ("demo", "--seed", "-1"), ("demo", "--seed", "x")])
def test_bad_usage_exits_2(args):
    result = run_cli(*args)
    assert result.returncode == 2
    if "--seed" in args:
        assert "--seed: must be a non-negative integer" in result.stderr


def test_bench_list_has_the_method_experiments():
    result = run_cli("bench", "list")
    assert result.returncode == 0
    assert {"advantages", "logprobs", "guarantee", "method", "demo"} <= set(result.stdout.split())


# ------------------------------------------------------------------------- help and safety-test

@pytest.mark.parametrize("command", [(), ("demo",), ("run",), ("train-reward",), ("train-cost",), ("train",),
                                     ("safety-test",), ("bench",)])
def test_help_has_examples(command):
    result = run_cli(*command, "--help")
    assert result.returncode == 0
    assert "example" in result.stdout, result.stdout


@pytest.fixture(scope="module")
def saved_models(task, tmp_path_factory):
    """A cost model (fresh head on the SFT backbone, saved) for testing the verdict logic."""
    root = tmp_path_factory.mktemp("safety-cli")
    task.new_score_model(seed=7).save_pretrained(root / "cost_model")
    return root


def safety_cli(task, saved_models, tmp_path, *extra):
    args = ["safety-test", str(task.policy_path), "--prompts", str(task.prompt_paths["safety"]),
            "--cost-model", str(saved_models / "cost_model"), "--tokenizer", str(task.tokenizer_path),
            "--template", task.template.prompt_format, "--max-new-tokens", "16", "--delta", "0.1",
            "--seed", "3", "--no-progress", *extra]
    return run_cli(*args)


def last_json(stdout):
    import json

    return json.loads(stdout.strip().splitlines()[-1])


def test_safety_test_pass_and_no_solution_on_either_side_of_tau(task, saved_models, tmp_path):
    import json

    high = safety_cli(task, saved_models, tmp_path, "--threshold", "1e6", "--ledger", str(tmp_path / "a.json"),
                      "--output", str(tmp_path / "out"))
    assert high.returncode == 0, high.stderr[-2000:]
    record = last_json(high.stdout)
    assert record["verdict"] == "PASS" and record["n"] == len(task.split.safety)
    ucb = record["ucb"]
    assert (tmp_path / "out" / "safety_costs.png").is_file()
    assert json.loads((tmp_path / "out" / "safety_test.json").read_text())["ucb"] == ucb
    # Same seed, same costs: τ just below the UCB fails, τ equal to it passes (UCB ≤ τ).
    below = safety_cli(task, saved_models, tmp_path, "--threshold", repr(ucb - 1e-6), "--ledger",
                       str(tmp_path / "b.json"))
    assert below.returncode == 3, below.stderr[-2000:]
    assert last_json(below.stdout)["verdict"] == "NO SOLUTION FOUND" and last_json(below.stdout)["ucb"] == ucb
    assert below.stdout.startswith("NO SOLUTION FOUND")
    at = safety_cli(task, saved_models, tmp_path, "--threshold", repr(ucb), "--ledger", str(tmp_path / "c.json"))
    assert at.returncode == 0 and last_json(at.stdout)["verdict"] == "PASS"
    # Each test is recorded in its ledger; a second test on the same set with the whole budget is refused.
    ledger = json.loads((tmp_path / "a.json").read_text())
    assert [s["spent"] for s in ledger["sets"].values()] == [pytest.approx(0.1)]
    again = safety_cli(task, saved_models, tmp_path, "--threshold", "1e6", "--ledger", str(tmp_path / "a.json"))
    assert again.returncode == 1 and "BudgetExceededError" in again.stderr


def test_safety_test_refuses_prompts_seen_in_training(task, saved_models, tmp_path):
    import json
    import shutil

    candidate = tmp_path / "candidate"
    shutil.copytree(task.policy_path, candidate)
    shutil.copytree(task.tokenizer_path, candidate, dirs_exist_ok=True)
    leaked = task.split.safety[:1] + task.split.candidate[:5]
    (candidate / "train_prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in leaked))
    args = ["safety-test", str(candidate), "--prompts", str(task.prompt_paths["safety"]), "--cost-model",
            str(saved_models / "cost_model"), "--ledger", str(tmp_path / "l.json")]
    result = run_cli(*args)
    assert result.returncode == 2 and "overlap" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "l.json").exists()


@pytest.mark.parametrize("extra", [("--delta", "1.5"), ("--method", "betting"), ("--method", "zscore"),
                                   ("--max-new-tokens", "0"), ("--threshold", "nan"), ("--temperature", "-1")])
def test_safety_test_bad_usage_exits_2(task, saved_models, tmp_path, extra):
    result = safety_cli(task, saved_models, tmp_path, "--threshold", "0", "--ledger", str(tmp_path / "l.json"),
                        *extra)
    assert result.returncode == 2, result.stderr[-2000:]
    assert not (tmp_path / "l.json").exists()


def test_safety_test_takes_safety_overrides(task, saved_models, tmp_path):
    # The override wins over the flag.
    result = safety_cli(task, saved_models, tmp_path, "--threshold", "-1000000", "--ledger", str(tmp_path / "l.json"),
                        "safety.threshold=1e6", "safety.batch_size=7")
    assert result.returncode == 0, result.stderr[-2000:]
    assert last_json(result.stdout)["threshold"] == 1e6


@pytest.mark.parametrize("override, key", [("safety.delta=2", "'safety.delta'"),
                                           ("safety.treshold=1", "'safety.treshold'"), ("rl.kl_coef=1", "'rl'"),
                                           ("delta", "section.key=value")])
def test_safety_test_bad_override_exits_2_naming_the_key(task, saved_models, tmp_path, override, key):
    result = safety_cli(task, saved_models, tmp_path, "--ledger", str(tmp_path / "l.json"), override)
    assert result.returncode == 2, result.stderr[-2000:]
    assert key in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "l.json").exists()


# ------------------------------------------------------------------- the default (per-user) δ ledger

def _state_ledger(state_dir):
    import json

    return json.loads((state_dir / "safety_ledger.json").read_text())


def test_safety_test_default_ledger_is_per_user_so_a_new_output_cannot_re_spend(task, saved_models, tmp_path,
                                                                                 _state_dir):
    first = safety_cli(task, saved_models, tmp_path, "--threshold", "1e6", "--output", str(tmp_path / "one"))
    assert first.returncode == 0, first.stderr[-2000:]
    ledger = _state_ledger(_state_dir)
    assert [s["spent"] for s in ledger["sets"].values()] == [pytest.approx(0.1)]
    assert not (tmp_path / "one" / "safety_ledger.json").exists()
    # Another output folder, the same safety set: refused before anything is loaded or written.
    again = safety_cli(task, saved_models, tmp_path, "--threshold", "1e6", "--output", str(tmp_path / "two"))
    assert again.returncode == 1 and "BudgetExceededError" in again.stderr, again.stderr[-2000:]
    for hint in ("refused before spending", "already spent", f"hcrlhf safety-test {task.policy_path}",
                 "hcrlhf demo --seed N", "safety.ledger", str(_state_dir / "safety_ledger.json")):
        assert hint in again.stderr, hint
    assert not (tmp_path / "two").exists() and _state_ledger(_state_dir) == ledger


def test_safety_test_refuses_the_same_set_minus_one_prompt_unless_declared_new(task, saved_models, tmp_path,
                                                                                _state_dir):
    first = safety_cli(task, saved_models, tmp_path, "--threshold", "1e6")
    assert first.returncode == 0, first.stderr[-2000:]
    smaller = tmp_path / "smaller.txt"
    smaller.write_text("".join(p + "\n" for p in task.split.safety[1:]))
    refused = safety_cli(task, saved_models, tmp_path, "--threshold", "1e6", "--prompts", str(smaller))
    assert refused.returncode == 1 and "OverlappingSafetySetError" in refused.stderr, refused.stderr[-2000:]
    assert "--allow-overlapping-set" in refused.stderr
    declared = safety_cli(task, saved_models, tmp_path, "--threshold", "1e6", "--prompts", str(smaller),
                          "--allow-overlapping-set")
    assert declared.returncode == 0, declared.stderr[-2000:]
    assert last_json(declared.stdout)["n"] == len(task.split.safety) - 1
    record = _state_ledger(_state_dir)["sets"][last_json(declared.stdout)["fingerprint"]]
    assert record["tests"][0]["allow_overlapping_set"] is True
    assert record["tests"][0]["overlaps"][0]["shared_prompts"] == len(task.split.safety) - 1


def test_safety_test_counts_each_prompt_once(task, saved_models, tmp_path):
    distinct = list(task.split.safety[:10])
    copies = tmp_path / "copies.txt"
    copies.write_text("".join(p + "\n" for p in distinct * 3 + [" " + p.replace(" ", "  ") for p in distinct]))
    result = safety_cli(task, saved_models, tmp_path, "--threshold", "1e6", "--prompts", str(copies), "--ledger",
                        str(tmp_path / "l.json"))
    assert result.returncode == 0, result.stderr[-2000:]
    record = last_json(result.stdout)
    assert record["n"] == 10 and record["prompts_duplicates_dropped"] == 30
    assert "dropped 30 duplicate prompt(s)" in result.stderr
    from hcrlhf.safety import fingerprint

    assert record["fingerprint"] == fingerprint(distinct)


@pytest.fixture(scope="module")
def headless_classifier(task, tmp_path_factory):
    """The SFT policy as a one-label sequence classifier saved *without* its score weights."""
    from safetensors.torch import save_file
    from transformers import AutoModelForSequenceClassification

    directory = tmp_path_factory.mktemp("headless") / "cost_model"
    model = AutoModelForSequenceClassification.from_pretrained(task.policy_path, num_labels=1)
    model.config.save_pretrained(directory)
    save_file({k: v.contiguous() for k, v in model.state_dict().items() if not k.startswith("score.")},
              str(directory / "model.safetensors"), metadata={"format": "pt"})
    return directory


@pytest.mark.parametrize("which", ["causal_lm", "headless_classifier"])
def test_safety_test_refuses_a_cost_model_without_a_trained_head(task, headless_classifier, tmp_path, which):
    """A plain causal LM (or a classifier missing its head) as --cost-model would score with a random head:
    refused with exit 2 before any δ is spent, naming the path and the missing weight; no ledger written."""
    cost_model = task.policy_path if which == "causal_lm" else headless_classifier
    ledger = tmp_path / "ledger.json"
    result = run_cli("safety-test", str(task.policy_path), "--prompts", str(task.prompt_paths["safety"]),
                     "--cost-model", str(cost_model), "--tokenizer", str(task.tokenizer_path), "--template",
                     task.template.prompt_format, "--max-new-tokens", "4", "--threshold", "1e6", "--ledger",
                     str(ledger), "--no-progress")
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"--cost-model: {cost_model}: not a trained score model" in result.stderr
    assert "score.weight" in result.stderr and "Traceback" not in result.stderr
    assert not ledger.exists()


def test_safety_test_refuses_a_run_directory_a_non_model_and_a_missing_device(task, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "candidate-not-returned").mkdir(parents=True)
    (run_dir / "hcrlhf_run.json").write_text("{}")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "readme.txt").write_text("not a model")
    args = ["--prompts", str(task.prompt_paths["safety"]), "--cost-model", str(task.policy_path),
            "--ledger", str(tmp_path / "ledger.json"), "--no-progress"]
    result = run_cli("safety-test", str(run_dir), *args)
    assert result.returncode == 2 and "is an hcrlhf run directory, not a model" in result.stderr
    assert str(run_dir / "candidate-not-returned") in result.stderr
    result = run_cli("safety-test", str(notes), *args)
    assert result.returncode == 2 and "is not a Hugging Face model directory (no config.json)" in result.stderr
    import torch

    if not torch.cuda.is_available():
        result = run_cli("safety-test", str(task.policy_path), *args, "--device", "cuda")
        assert result.returncode == 2 and "--device cuda: this torch" in result.stderr
    assert not (tmp_path / "ledger.json").exists()
