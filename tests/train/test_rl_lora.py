"""LoRA (peft) in SafeRLTrainer on the built-in task, tiny models, CPU.

What is proven here: with lora_r > 0 only adapter weights are trainable and change (the base weights stay
bitwise equal to the initial policy's), there is no frozen reference copy and the reference log-probs are
those of the policy with its adapters disabled, i.e. of the initial policy; checkpoints hold the adapter
weights only (a peft adapter directory) and a killed-and-resumed LoRA run ends bitwise identical to an
uninterrupted one; the merged export is a plain causal LM with the trained policy's log-probs; bad LoRA
settings and a missing peft are refused with clear errors.
"""

import json
import sys

import peft  # a declared test dependency (pyproject.toml [test] extra): missing, the module fails to collect
import pytest
import torch

from hcrlhf.config import ConfigError
from hcrlhf.models import response_logprobs
from hcrlhf.train import SafeRLConfig, SafeRLTrainer

pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


def make_config(**overrides):
    values = dict(total_steps=2, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=12, actor_lr=1e-2,
                  critic_lr=1e-3, progress=False, seed=3, lora_r=4, lora_alpha=8.0)
    values.update(overrides)
    return SafeRLConfig(**values)


def make_trainer(task, tokenizer, config, policy=None, **kwargs):
    return SafeRLTrainer(config, policy=policy if policy is not None else task.load_policy(), tokenizer=tokenizer,
                         reward_model=task.new_score_model(seed=1), cost_model=task.new_score_model(seed=2),
                         train_prompts=task.prompts("candidate")[0], safety_prompts=task.split,
                         template=task.template, **kwargs)


def base_weights(trainer):
    """The base model's weights under their original names (adapter tensors left out)."""
    state = trainer.policy.get_base_model().state_dict()
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if "lora_" not in k}


def adapter_weights(trainer):
    return {k: v.detach().clone() for k, v in peft.get_peft_model_state_dict(trainer.policy).items()}


def test_only_adapters_train_and_the_reference_is_the_base_model(task, tokenizer, tmp_path):
    initial = task.load_policy()
    trainer = make_trainer(task, tokenizer, make_config(minibatch_size=4, micro_batch_tokens=100,
                                                        gradient_checkpointing=True))
    assert trainer.reference is None  # one base model serves both
    trainable = [n for n, p in trainer.policy.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainer.actor_parameters) == len(trainable)
    adapters_before = adapter_weights(trainer)
    critic_before = {k: v.clone() for k, v in trainer.critics["reward_critic"].state_dict().items()}

    history = trainer.train()
    assert len(history) == 2 and all(m["policy_loss"] == m["policy_loss"] for m in history)
    adapters_after = adapter_weights(trainer)
    assert all(not torch.equal(adapters_before[k], adapters_after[k]) for k in adapters_after), "an adapter is stuck"
    expected = initial.state_dict()
    after = base_weights(trainer)
    assert set(after) == set(expected)
    for key, tensor in expected.items():
        assert torch.equal(after[key], tensor), f"base weight {key} changed"
    assert any(not torch.equal(v, trainer.critics["reward_critic"].state_dict()[k]) for k, v in critic_before.items())

    # The reference = the policy with adapters disabled = the initial policy; the adapted policy differs.
    rollout = trainer.rollout(task.prompts("candidate")[0][:3])
    mask = rollout.action_mask
    index = mask.reshape(-1).nonzero().squeeze(1)
    reference = trainer.reference_logprobs(rollout)
    with torch.no_grad():
        original = response_logprobs(initial, rollout.input_ids, rollout.attention_mask, index)
        adapted = response_logprobs(trainer.policy, rollout.input_ids, rollout.attention_mask, index)
    torch.testing.assert_close(reference[mask], original[mask], rtol=0, atol=1e-6)
    assert (adapted[mask] - original[mask]).abs().max() > 1e-3
    # Adapters are enabled again after the reference pass.
    with torch.no_grad():
        again = response_logprobs(trainer.policy, rollout.input_ids, rollout.attention_mask, index)
    assert torch.equal(again, adapted)

    # The merged export is a plain causal LM with the trained policy's log-probs.
    from transformers import AutoModelForCausalLM

    trainer.save_pretrained(tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        exported = response_logprobs(merged, rollout.input_ids, rollout.attention_mask, index)
    torch.testing.assert_close(exported[mask], adapted[mask], rtol=0, atol=1e-4)
    assert any("lora_" in name for name, _ in trainer.policy.named_modules())  # merged a copy, not the policy


def _strip_times(lines):
    rows = [json.loads(line) for line in lines]
    return [{k: v for k, v in row.items() if not k.startswith("time/") and k != "tokens_per_s"} for row in rows]


def test_kill_and_resume_with_lora_equals_an_uninterrupted_run(task, tokenizer, tmp_path):
    # With the PTX mix on too: its LM loss trains the adapters as well.
    settings = dict(estimator="rloo", total_steps=3, checkpoint_every=1, keep_checkpoints=1,
                    lora_target_modules=["q_proj", "v_proj", "down_proj"], ptx_coef=1.0,
                    ptx_path=str(task.sft_path))
    straight = make_trainer(task, tokenizer, make_config(output_dir=str(tmp_path / "a"), **settings))
    straight.train()

    killed = make_trainer(task, tokenizer, make_config(output_dir=str(tmp_path / "b"), **settings))
    original_update = killed._update_rloo

    def crash(*args, **kwargs):
        if killed.global_step == 2:
            raise KeyboardInterrupt("killed")
        return original_update(*args, **kwargs)

    killed._update_rloo = crash
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    checkpoint = tmp_path / "b" / "checkpoints" / "step-00000002"
    assert not (checkpoint / "policy.safetensors").exists()  # adapter weights only
    assert (checkpoint / "policy_adapter" / "adapter_model.safetensors").is_file()
    saved = json.loads((checkpoint / "policy_adapter" / "adapter_config.json").read_text())
    assert saved["r"] == 4 and set(saved["target_modules"]) == {"q_proj", "v_proj", "down_proj"}

    resumed = make_trainer(task, tokenizer, make_config(output_dir=str(tmp_path / "b"), resume=True, **settings))
    assert resumed.global_step == 2
    resumed.train()
    ours, theirs = adapter_weights(straight), adapter_weights(resumed)
    assert set(ours) == set(theirs)
    for key, tensor in ours.items():
        assert torch.equal(tensor, theirs[key]), f"{key} differs after resume"
    assert base_weights(resumed).keys() == base_weights(straight).keys()
    assert resumed.multiplier.log_value == straight.multiplier.log_value
    a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(a) == 3 and _strip_times(a) == _strip_times(b)
    assert all(row["ptx_loss"] > 0 for row in _strip_times(a))

    # The saved adapter is a standard peft directory.
    loaded = peft.PeftModel.from_pretrained(task.load_policy(), str(tmp_path / "a" / "checkpoints" / "step-00000003"
                                                                    / "policy_adapter"))
    for key, tensor in peft.get_peft_model_state_dict(loaded).items():
        assert torch.equal(tensor, ours[key])
    # Resuming without LoRA (a different config) is refused.
    with pytest.raises(ValueError, match="config differs in lora_r"):
        make_trainer(task, tokenizer, make_config(output_dir=str(tmp_path / "b"), resume=True,
                                                  **dict(settings, lora_r=0, lora_target_modules=None)))


def test_missing_peft_is_a_clear_error(task, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` now raises ImportError
    policy = task.load_policy()
    with pytest.raises(ImportError, match=r"pip install 'hcrlhf\[lora\]'"):
        make_trainer(task, tokenizer, make_config(), policy=policy)
    assert not any("lora" in name for name, _ in policy.named_modules())  # refused before touching the model


@pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`:UserWarning")
def test_lora_misuse_is_refused(task, tokenizer):
    with pytest.raises(ValueError, match="do not pass reference_model"):
        make_trainer(task, tokenizer, make_config(), reference_model=task.load_policy())
    wrapped = make_trainer(task, tokenizer, make_config(total_steps=1)).policy
    with pytest.raises(ValueError, match="pass the base model without adapters"):
        make_trainer(task, tokenizer, make_config(), policy=wrapped)
    with pytest.raises(ValueError, match="adapter on the LM head"):
        make_trainer(task, tokenizer, make_config(lora_target_modules=["q_proj", "lm_head"]))


@pytest.mark.parametrize("values, key, pattern", [
    ({"lora_r": -1}, "lora_r", "must be >= 0"),
    ({"lora_r": 4, "lora_alpha": 0.0}, "lora_alpha", "must be a finite number > 0"),
    ({"lora_target_modules": ["q_proj"]}, "lora_target_modules", "is set but lora_r is 0"),
    ({"lora_r": 4, "lora_target_modules": []}, "lora_target_modules", "must name at least one module"),
    ({"lora_r": 4, "lora_target_modules": ["q_proj", 3]}, "lora_target_modules", r"must be list\[str\] \| str \| null"),
])
def test_bad_lora_settings_are_named(values, key, pattern):
    with pytest.raises(ConfigError, match=f"'{key}': {pattern}"):
        SafeRLConfig.from_dict(values)


def test_lora_settings_from_yaml(tmp_path):
    path = tmp_path / "rl.yaml"
    path.write_text("lora_r: 8\nlora_alpha: 16\nlora_target_modules: [q_proj, v_proj]\n")
    config = SafeRLConfig.from_yaml(path)
    assert config.lora_r == 8 and config.lora_alpha == 16.0 and config.lora_target_modules == ["q_proj", "v_proj"]
    assert SafeRLConfig.from_dict(config.to_dict()) == config
    every_linear = SafeRLConfig.from_dict({"lora_r": 8, "lora_target_modules": "all-linear"})
    assert every_linear.lora_target_modules == "all-linear"
    assert SafeRLConfig().lora_r == 0  # off by default
