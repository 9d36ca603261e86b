"""Short reward / cost model training on the built-in task beats chance on held-out pairs; checkpoints
are safetensors and reload to identical scores; accumulation and the safety split behave."""

import json

import pytest
import torch

from hcrlhf.models import ScoreModel
from hcrlhf.train import ScoreTrainingConfig, evaluate_score_model, train_cost_model, train_reward_model

STEPS = 25


@pytest.fixture(scope="module")
def data(task):
    return task.load_tokenizer(), task.preferences("train"), task.preferences("test")


def config(**overrides):
    values = dict(learning_rate=2e-3, max_steps=STEPS, epochs=10, batch_size=16, warmup_ratio=0.1, max_length=96,
                  progress=False, seed=0)
    values.update(overrides)
    return ScoreTrainingConfig(**values)


def test_reward_model_learns_helpfulness(task, data, tmp_path):
    tokenizer, train, test = data
    model = task.new_score_model(seed=0)
    result = train_reward_model(model, tokenizer, train, eval_dataset=test, template=task.template,
                                safety_split=task.split, config=config(output_dir=str(tmp_path / "rm"), save_every=10))
    before, after = result.initial_eval["accuracy"], result.final_eval["accuracy"]
    print(f"reward model held-out pair accuracy: {before:.3f} -> {after:.3f} ({result.final_eval['n_pairs']} pairs)")
    assert result.final_eval["n_pairs"] == len(test) > 100
    assert after >= 0.85 and after >= before + 0.3
    assert result.steps == STEPS and len([h for h in result.history if "loss" in h]) == STEPS

    # Checkpoints: safetensors, a state file, and the final model reloads to identical scores.
    saved = [p.name for p in result.checkpoints]
    assert saved == ["checkpoint-10", "checkpoint-20", "rm"]
    assert (tmp_path / "rm" / "model.safetensors").is_file() and not list((tmp_path / "rm").glob("*.bin"))
    state = json.loads((tmp_path / "rm" / "training_state.json").read_text())
    assert state["step"] == STEPS and state["final_eval"]["accuracy"] == after
    loaded = ScoreModel.from_pretrained(tmp_path / "rm")
    rows = test.select(range(40))
    prompts, responses = list(rows["prompt"]), list(rows["response_0"])
    original = model.score(tokenizer, prompts, responses, template=task.template)
    assert torch.equal(loaded.score(tokenizer, prompts, responses, template=task.template), original)
    reloaded_eval = evaluate_score_model(loaded, tokenizer, test, kind="reward", template=task.template, max_length=96)
    assert reloaded_eval["accuracy"] == after
    assert reloaded_eval["by_category"] == result.final_eval["by_category"]

    # transformers loads the trained head too (nothing missing or re-drawn) and, with the tokenizer's pad id
    # saved in config.json, scores the same right-padded batch alike; config.json says what trained it.
    from transformers import AutoModelForSequenceClassification

    from hcrlhf.data import tokenize_pairs

    hf, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm", output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"] and hf.config.num_labels == 1
    assert hf.config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    assert {k: hf.config.hcrlhf["training"][k] for k in ("kind", "loss", "steps")} == \
        {"kind": "reward", "loss": "bt", "steps": STEPS}
    pairs = tokenize_pairs(tokenizer, prompts, responses, template=task.template)
    with torch.no_grad():
        theirs = hf.eval()(input_ids=pairs.input_ids, attention_mask=pairs.attention_mask).logits.squeeze(-1)
    torch.testing.assert_close(theirs, original, rtol=1e-5, atol=1e-5)
    assert loaded.provenance["hcrlhf"]["training"]["kind"] == "reward"


@pytest.mark.parametrize("variant", ["bt_sign", "bt"])
def test_cost_model_learns_harm(task, data, variant):
    tokenizer, train, test = data
    result = train_cost_model(task.new_score_model(seed=0), tokenizer, train, eval_dataset=test,
                              template=task.template, config=config(cost_loss=variant))
    before, after = result.initial_eval, result.final_eval
    print(f"cost model ({variant}) held-out pair accuracy {before['accuracy']:.3f} -> {after['accuracy']:.3f}, "
          f"sign accuracy {before['sign_accuracy']:.3f} -> {after['sign_accuracy']:.3f}")
    assert after["accuracy"] >= 0.72 and after["accuracy"] >= before["accuracy"] + 0.3
    assert after["mean_cost_unsafe"] > after["mean_cost_safe"]
    by_category = after["by_category"]
    assert set(by_category) == {"EHD", "IHD", "MHD", "benign"}
    assert sum(m["n_pairs"] for m in by_category.values()) == after["n_pairs"]
    print("  per category:", {c: round(m["accuracy"], 3) for c, m in by_category.items()})
    if variant == "bt_sign":  # c > 0 means unsafe
        assert after["sign_accuracy"] >= 0.9
        assert after["mean_cost_unsafe"] > 0 > after["mean_cost_safe"]


def test_gradient_accumulation_averages_over_the_step(task, data):
    tokenizer, train, _ = data
    small = train.select(range(64))
    whole = train_reward_model(task.new_score_model(seed=0), tokenizer, small, template=task.template,
                               config=config(max_steps=1, batch_size=16, gradient_accumulation_steps=1))
    accumulated = train_reward_model(task.new_score_model(seed=0), tokenizer, small, template=task.template,
                                     config=config(max_steps=1, batch_size=4, gradient_accumulation_steps=4))
    assert accumulated.history[0]["loss"] == pytest.approx(whole.history[0]["loss"], rel=1e-5)
    assert accumulated.history[0]["accuracy"] == whole.history[0]["accuracy"]


def test_training_refuses_safety_prompts_and_bad_settings(task, data):
    tokenizer, train, _ = data
    leaked = train.to_list()[:4]
    leaked[0] = {**leaked[0], "prompt": task.split.safety[0]}
    with pytest.raises(ValueError, match="safety"):
        train_reward_model(task.new_score_model(), tokenizer, leaked, template=task.template,
                           safety_split=task.split, config=config(max_steps=1))
    with pytest.raises(ValueError, match="bf16=True needs a CUDA device"):
        train_reward_model(task.new_score_model(), tokenizer, train, template=task.template,
                           config=config(max_steps=1, bf16=True, device="cpu"))
    with pytest.raises(ValueError, match="'cost_loss': must be one of"):
        train_cost_model(task.new_score_model(), tokenizer, train, config=config(cost_loss="hinge"))
    with pytest.raises(ValueError, match="lacks columns"):
        train_reward_model(task.new_score_model(), tokenizer, [{"prompt": "x"}], config=config())


@pytest.mark.gpu
def test_bf16_training_on_gpu(task, data):
    tokenizer, train, test = data
    model = task.new_score_model(seed=0).to("cuda")
    result = train_reward_model(model, tokenizer, train, eval_dataset=test, template=task.template,
                                config=config(bf16="auto"))
    assert result.final_eval["accuracy"] >= 0.8
