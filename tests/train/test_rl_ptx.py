"""The pretraining-loss mix (PTX) of SafeRLTrainer on the built-in task, tiny models, CPU.

What is proven here: with ptx_coef = 0 the PTX code never runs and the actor gradient is exactly that of the
plain policy loss; with ptx_coef > 0 the actor gradient is that of policy loss + ptx_coef · LM loss, both
written out by hand with full-logits log_softmax (and micro-batched on the trainer's side), the logged
ptx_loss is that LM loss and the policy loss is unchanged; PPO draws one PTX batch per optimiser step as a
function of the step number; a killed-and-resumed PTX run ends identical to an uninterrupted one, and
resuming with a different PTX file is refused; bad PTX settings and files are refused with named errors.
"""

import json

import pytest
import torch

from hcrlhf.data.templates import tokenize_pairs
from hcrlhf.train import SafeRLConfig, SafeRLTrainer
from hcrlhf.train import rl_trainer as rl_trainer_module


def make_config(**overrides):
    values = dict(total_steps=2, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=12, actor_lr=1e-3,
                  critic_lr=1e-3, progress=False, seed=3)
    values.update(overrides)
    return SafeRLConfig(**values)


def make_trainer(task, tokenizer, config):
    return SafeRLTrainer(config, policy=task.load_policy(), tokenizer=tokenizer,
                         reward_model=task.new_score_model(seed=1), cost_model=task.new_score_model(seed=2),
                         train_prompts=task.prompts("candidate")[0], safety_prompts=task.split,
                         template=task.template)


def full_logprobs(model, input_ids, attention_mask, temperature=1.0):
    """log π(token j + 1 | prefix through j) for every column j, the textbook way (full logits)."""
    positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits[:, :-1]
    full = torch.log_softmax(logits.float() / temperature, dim=-1)
    return full.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def run_one_rloo_step(task, tokenizer, monkeypatch, **overrides):
    """One rloo iteration; returns the trainer, its metrics, the actor gradient just before the optimiser
    step, and the rollout and advantages the update saw."""
    trainer = make_trainer(task, tokenizer, make_config(estimator="rloo", total_steps=1, max_grad_norm=None,
                                                        micro_batch_tokens=60, **overrides))
    seen = {}
    original_rollout, original_advantages = trainer.rollout, rl_trainer_module.ops.rloo_advantages

    def rollout_spy(prompts, **kwargs):
        seen["rollout"] = original_rollout(prompts, **kwargs)
        return seen["rollout"]

    def advantages_spy(*args, **kwargs):
        result = original_advantages(*args, **kwargs)
        seen["advantages"] = result.advantages
        return result

    original_step = trainer.actor_optimizer.step

    def step_spy(*args, **kwargs):
        seen["grads"] = [p.grad.detach().clone() for p in trainer.actor_parameters]
        return original_step(*args, **kwargs)

    trainer.rollout = rollout_spy
    trainer.actor_optimizer.step = step_spy
    with monkeypatch.context() as patch:
        patch.setattr(rl_trainer_module.ops, "rloo_advantages", advantages_spy)
        metrics = trainer.step()
    return trainer, metrics, seen


def hand_gradients(task, tokenizer, seen, ptx_coef=0.0, ptx_rows=None):
    """The gradient of −mean_i A_i·Σ_t log π + ptx_coef · LM loss on a fresh copy of the initial policy."""
    policy = task.load_policy()
    rollout = seen["rollout"]
    logp = full_logprobs(policy, rollout.input_ids, rollout.attention_mask)
    sequence = torch.where(rollout.action_mask, logp, torch.zeros_like(logp)).sum(1)
    policy_loss = -(seen["advantages"] * sequence).sum() / rollout.rows
    lm_loss = torch.zeros(())
    if ptx_rows is not None:
        batch = tokenize_pairs(tokenizer, [r["prompt"] for r in ptx_rows], [r["response"] for r in ptx_rows],
                               template=task.template)
        targets = batch.response_mask[:, 1:]
        lm_logp = full_logprobs(policy, batch.input_ids, batch.attention_mask)
        lm_loss = -lm_logp[targets].sum() / targets.sum()
    (policy_loss + ptx_coef * lm_loss).backward()
    return [p.grad for p in policy.parameters()], policy_loss.detach(), lm_loss.detach()


def test_ptx_off_is_the_plain_loss_and_ptx_on_adds_the_lm_loss(task, tokenizer, monkeypatch):
    def no_ptx(*args, **kwargs):
        raise AssertionError("the PTX path ran with ptx_coef = 0")

    with monkeypatch.context() as patch:
        patch.setattr(SafeRLTrainer, "_ptx_backward", no_ptx)
        off, off_metrics, off_seen = run_one_rloo_step(task, tokenizer, monkeypatch)
    assert "ptx_loss" not in off_metrics and off.ptx_rows == []
    coef = 0.5
    on, on_metrics, on_seen = run_one_rloo_step(task, tokenizer, monkeypatch, ptx_coef=coef,
                                                ptx_path=str(task.sft_path), ptx_batch_size=3)
    # Same seed, so the same rollout; the PTX draws do not touch the global generators.
    assert torch.equal(off_seen["rollout"].input_ids, on_seen["rollout"].input_ids)
    assert on_metrics["policy_loss"] == off_metrics["policy_loss"]

    expected, policy_loss, _ = hand_gradients(task, tokenizer, off_seen)
    assert off_metrics["policy_loss"] == pytest.approx(float(policy_loss), abs=1e-5)
    for got, want in zip(off_seen["grads"], expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)

    rows = on.ptx_batch(0)
    assert len(rows) == 3 and all({"prompt", "response"} <= set(r) for r in rows)
    expected, _, lm_loss = hand_gradients(task, tokenizer, on_seen, ptx_coef=coef, ptx_rows=rows)
    assert on_metrics["ptx_loss"] == pytest.approx(float(lm_loss), abs=1e-5) and on_metrics["ptx_loss"] > 0
    for got, want in zip(on_seen["grads"], expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    # The LM term really moved the gradient (it flows into the policy).
    difference = sum(float((a - b).abs().sum()) for a, b in zip(on_seen["grads"], off_seen["grads"]))
    assert difference > 1e-3


def test_ppo_draws_one_ptx_batch_per_optimiser_step(task, tokenizer, monkeypatch):
    config = make_config(ptx_coef=1.0, ptx_path=str(task.sft_path), minibatch_size=4, ppo_epochs=2,
                         micro_batch_tokens=100)
    trainer = make_trainer(task, tokenizer, config)
    numbers = []
    original = SafeRLTrainer._ptx_backward

    def spy(self, update_number):
        numbers.append(update_number)
        return original(self, update_number)

    monkeypatch.setattr(SafeRLTrainer, "_ptx_backward", spy)
    history = trainer.train()
    assert numbers == list(range(8))  # 2 iterations × 2 epochs × 2 minibatches
    assert all(0 < m["ptx_loss"] < 20 for m in history)
    # ptx_batch_size defaults to the update's rows (minibatch_size); batches follow seeded permutations.
    first, second = trainer.ptx_batch(0), trainer.ptx_batch(1)
    assert len(first) == 4 and first != second and trainer.ptx_batch(0) == first


def _strip_times(lines):
    rows = [json.loads(line) for line in lines]
    return [{k: v for k, v in row.items() if not k.startswith("time/") and k != "tokens_per_s"} for row in rows]


def test_kill_and_resume_with_ptx_equals_an_uninterrupted_run(task, tokenizer, tmp_path):
    ptx = tmp_path / "ptx.jsonl"
    ptx.write_text("".join(json.dumps({"text": f"sure . first , then {i} ."}) + "\n" for i in range(5)))
    settings = dict(total_steps=3, checkpoint_every=1, minibatch_size=4, ptx_coef=2.0, ptx_path=str(ptx),
                    ptx_batch_size=3, micro_batch_tokens=60)
    straight = make_trainer(task, tokenizer, make_config(output_dir=str(tmp_path / "a"), **settings))
    straight.train()

    killed = make_trainer(task, tokenizer, make_config(output_dir=str(tmp_path / "b"), **settings))
    original_update = killed._update_ppo

    def crash(*args, **kwargs):
        if killed.global_step == 2:
            raise KeyboardInterrupt("killed")
        return original_update(*args, **kwargs)

    killed._update_ppo = crash
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    state = json.loads((tmp_path / "b" / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["ptx_fingerprint"] == killed.ptx_fingerprint

    resumed = make_trainer(task, tokenizer, make_config(output_dir=str(tmp_path / "b"), resume=True, **settings))
    assert resumed.global_step == 2
    resumed.train()
    for name, module in {"policy": straight.policy, **straight.critics}.items():
        other = resumed.policy if name == "policy" else resumed.critics[name]
        theirs = other.state_dict()
        for key, tensor in module.state_dict().items():
            assert torch.equal(tensor, theirs[key]), f"{name}.{key} differs after resume"
    a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(a) == 3 and _strip_times(a) == _strip_times(b)
    assert all("ptx_loss" in row for row in _strip_times(a))

    ptx.write_text(json.dumps({"text": "something else ."}) + "\n")
    with pytest.raises(ValueError, match="PTX text in ptx_path=.* differs"):
        make_trainer(task, tokenizer, make_config(output_dir=str(tmp_path / "b"), resume=True, **settings))


def test_plain_text_rows_target_every_token_after_the_first(task, tokenizer, tmp_path):
    ptx = tmp_path / "ptx.json"
    ptx.write_text(json.dumps([{"text": "sure . first"}, {"text": "then , next , finally ."}]))
    trainer = make_trainer(task, tokenizer, make_config(ptx_coef=1.0, ptx_path=str(ptx)))
    assert trainer.ptx_kind == "text"
    input_ids, attention_mask, targets = trainer.tokenize_ptx(trainer.ptx_rows)
    assert torch.equal(targets, attention_mask[:, 1:].bool())
    last = attention_mask.sum(1) - 1
    assert torch.all(input_ids[torch.arange(2), last] == tokenizer.eos_token_id)  # an EOS ends each row


@pytest.mark.parametrize("values, pattern", [
    ({"ptx_coef": 8.0}, "'ptx_path': is required with ptx_coef=8.0"),
    ({"ptx_path": "sft.jsonl"}, "'ptx_path': is set but ptx_coef is 0"),
    ({"ptx_batch_size": 4}, "'ptx_batch_size': is set but ptx_coef is 0"),
    ({"ptx_coef": -1.0, "ptx_path": "x"}, "'ptx_coef': must be a finite number >= 0"),
    ({"ptx_coef": 1.0, "ptx_path": "x", "ptx_batch_size": 0}, "'ptx_batch_size': must be >= 1"),
])
def test_bad_ptx_settings_are_named(values, pattern):
    with pytest.raises(ValueError, match=pattern):
        SafeRLConfig.from_dict(values)
    assert SafeRLConfig().ptx_coef == 0.0  # off by default


def test_bad_ptx_files_are_refused(task, tokenizer, tmp_path):
    config = lambda path: make_config(ptx_coef=1.0, ptx_path=str(path))  # noqa: E731
    with pytest.raises(FileNotFoundError, match="ptx_path=.*is not a file"):
        make_trainer(task, tokenizer, config(tmp_path / "missing.jsonl"))
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"text": "a"}) + "\n" + json.dumps({"prompt": "p", "response": "r"}) + "\n")
    with pytest.raises(ValueError, match=r"mixed.jsonl:2: a 'pairs' row in a file of 'text' rows"):
        make_trainer(task, tokenizer, config(mixed))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(ValueError, match=r"wrong.jsonl:1: a row must be an object"):
        make_trainer(task, tokenizer, config(wrong))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="holds no rows"):
        make_trainer(task, tokenizer, config(empty))
