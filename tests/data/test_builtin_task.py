"""The built-in offline task: byte-identical for a seed, cached, consistent with its ground truth, and
its SFT policy is sometimes helpful and sometimes harmful."""

import hashlib
import random
from pathlib import Path

import pytest
import torch

from hcrlhf.data import load_preferences, tokenize_prompts
from hcrlhf.data.builtin import all_prompts, harm, helpfulness, is_safe, make_task, sample_response
from hcrlhf.safety import assert_disjoint, fingerprint


def file_hashes(directory: Path) -> dict:
    return {p.relative_to(directory).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def test_same_seed_is_byte_identical(task, tmp_path):
    again = make_task(tmp_path, seed=0)
    assert again.root != task.root
    first, second = file_hashes(task.root), file_hashes(again.root)
    essential = {"manifest.json", "split.json", "sft.jsonl", "policy/model.safetensors", "policy/config.json",
                 "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json", "preferences/train.jsonl",
                 "preferences/test.jsonl", "prompts/candidate.jsonl", "prompts/safety.jsonl"}
    assert essential <= set(first)
    different = sorted(k for k in set(first) | set(second) if first.get(k) != second.get(k))
    assert not different, f"files differ between two builds with seed 0: {different}"


def test_cache_is_reused_and_a_damaged_cache_is_rebuilt(task, tmp_path):
    weights = task.policy_path / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    cached = make_task(task.root.parent, seed=0)
    assert cached.root == task.root and weights.stat().st_mtime_ns == stamp
    assert cached.manifest == task.manifest

    cheap = make_task(tmp_path, seed=3, sft_steps=2, eval_samples_per_category=2)
    tokenizer_file = cheap.tokenizer_path / "tokenizer.json"
    good = tokenizer_file.read_bytes()
    tokenizer_file.write_bytes(good + b" ")
    rebuilt = make_task(tmp_path, seed=3, sft_steps=2, eval_samples_per_category=2)
    assert tokenizer_file.read_bytes() == good and rebuilt.manifest == cheap.manifest
    # Another seed gives other data.
    assert (cheap.preference_paths["train"].read_bytes() != task.preference_paths["train"].read_bytes())
    assert cheap.split.safety_fingerprint != task.split.safety_fingerprint
    with pytest.raises(ValueError, match="unknown build parameters"):
        make_task(tmp_path, seed=0, sft_step=3)


def test_tokenizer_and_policy_load_with_auto_classes(task):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(task.tokenizer_path)
    assert tokenizer.pad_token == "<pad>" and tokenizer.eos_token == "<eos>"
    text = task.template.format_pair(*task.split.candidate[:1], "sure . first , check the bread twice .")
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    policy = AutoModelForCausalLM.from_pretrained(task.policy_path)
    n_params = sum(p.numel() for p in policy.parameters())
    assert type(policy).__name__ == "Qwen2ForCausalLM" and 100_000 <= n_params <= 1_000_000
    assert (task.policy_path / "model.safetensors").is_file()
    assert not list(task.policy_path.glob("*.bin"))


def test_every_word_of_the_data_is_in_the_vocabulary(task):
    tokenizer = task.load_tokenizer()
    data = task.preferences("train")
    texts = list(data["prompt"]) + list(data["response_0"]) + list(data["response_1"]) + list(task.split.safety)
    assert all(tokenizer.unk_token_id not in ids for ids in tokenizer(texts)["input_ids"])


def test_ground_truth_behaves():
    for text, category, slots in all_prompts():
        if category == "benign":
            helpful = sample_response(category, slots, "comply", random.Random(0))
            refusal = sample_response(category, slots, "refuse", random.Random(0))
            assert helpfulness(text, helpful) > helpfulness(text, refusal)
            assert is_safe(text, helpful) and is_safe(text, refusal)
        else:
            rng = random.Random(0)
            complied = sample_response(category, slots, "comply", rng)
            redirected = sample_response(category, slots, "redirect", rng)
            assert harm(text, complied) >= 0.5 > harm(text, redirected), (text, complied, redirected)
            assert helpfulness(text, complied) > helpfulness(text, redirected)
    categories = {c for _, c, _ in all_prompts()}
    assert categories == {"EHD", "IHD", "MHD", "benign"}


def test_preferences_follow_the_schema_and_the_ground_truth(task):
    train, test = task.preferences("train"), task.preferences("test")
    assert len(train) == task.manifest["preferences"]["train"]["pairs"] and len(test) > 50
    assert set(train["category"]) == {"EHD", "IHD", "MHD", "benign"}
    rows = train.to_list() + test.to_list()
    agree = decisive = 0
    for row in rows:
        for i in (0, 1):
            assert row[f"is_response_{i}_safe"] == is_safe(row["prompt"], row[f"response_{i}"])
        gap = helpfulness(row["prompt"], row["response_0"]) - helpfulness(row["prompt"], row["response_1"])
        if abs(gap) >= 1:
            decisive += 1
            agree += row["better_response_id"] == (0 if gap > 0 else 1)
    # Bradley–Terry noise with beta 3: a gap of 1 is labelled right with probability σ(3) ≈ 0.95.
    assert decisive > 300 and 0.85 < agree / decisive < 1.0
    # Pairs use candidate prompts only, and train / test prompts are disjoint.
    train_prompts, test_prompts = set(train["prompt"]), set(test["prompt"])
    assert train_prompts | test_prompts <= set(task.split.candidate)
    assert not train_prompts & test_prompts
    load_preferences(task.preference_paths["train"])  # valid under the strict loader


def test_split_is_recorded_and_disjoint(task):
    candidate, candidate_categories = task.prompts("candidate")
    safety, safety_categories = task.prompts("safety")
    assert len(candidate) + len(safety) == len(all_prompts())
    assert_disjoint(candidate, safety)
    assert task.split.safety_fingerprint == fingerprint(safety) == task.manifest["split"]["safety_fingerprint"]
    assert task.manifest["split"]["seed"] == 0
    assert set(safety_categories) == set(candidate_categories) == {"EHD", "IHD", "MHD", "benign"}
    with pytest.raises(ValueError):
        task.split.check_training(candidate + safety[:1])


def test_policy_is_sometimes_helpful_and_sometimes_harmful(task):
    stats = task.manifest["policy_on_safety_prompts"]
    for category in ("EHD", "IHD", "MHD"):
        assert 0.1 <= stats[category]["unsafe_rate"] <= 0.9, stats
    assert stats["benign"]["unsafe_rate"] <= 0.2 and stats["benign"]["helpful_rate"] >= 0.2
    # An independent sample, here and now.
    tokenizer = task.load_tokenizer()
    policy = task.load_policy().eval()
    prompts = [p for p, c in zip(*task.prompts("candidate")) if c != "benign"][:48]
    batch = tokenize_prompts(tokenizer, prompts, template=task.template)
    torch.manual_seed(123)
    with torch.no_grad():
        out = policy.generate(**batch.model_inputs(), do_sample=True, max_new_tokens=40, top_k=0,
                              pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    responses = tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    unsafe = sum(not is_safe(p, r) for p, r in zip(prompts, responses))
    helpful = sum(helpfulness(p, r) >= 1.5 for p, r in zip(prompts, responses))
    assert 5 <= unsafe <= 43, responses
    assert helpful >= 3, responses
