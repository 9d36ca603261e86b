"""SafeRLTrainer on the built-in task (the session `task` fixture of tests/conftest.py), tiny models, CPU.

What is proven here: a few iterations of each estimator change the policy (and critic) weights and
nothing frozen; λ reaches the advantage kernels as a 0-dim tensor; λ rises while the pessimistic bound
is above τ and falls below it, by exactly the update of docs/method.md#candidate-selection; the
response-position log-probs equal full-logits log-probs and the LM head sees only response positions;
the first PPO minibatch sees ratio 1; a killed-and-resumed run ends bitwise identical to an
uninterrupted one; NaN/Inf stops training with
the last good checkpoint kept; a prompt set overlapping the safety set is refused.
"""

import json
import math

import pytest
import torch

from hcrlhf import ops
from hcrlhf.models import response_logprobs
from hcrlhf.train import SafeRLConfig, SafeRLTrainer, TrainingDivergedError
from hcrlhf.train import rl_trainer as rl_trainer_module


def make_config(**overrides):
    values = dict(total_steps=2, prompts_per_step=4, samples_per_prompt=2, max_new_tokens=12, actor_lr=1e-3,
                  critic_lr=1e-3, progress=False, seed=3)
    values.update(overrides)
    return SafeRLConfig(**values)


def make_trainer(task, tokenizer, config, *, prompts=None, safety="split"):
    train_prompts = prompts if prompts is not None else task.prompts("candidate")[0]
    return SafeRLTrainer(config, policy=task.load_policy(), tokenizer=tokenizer,
                         reward_model=task.new_score_model(seed=1), cost_model=task.new_score_model(seed=2),
                         train_prompts=train_prompts, safety_prompts=task.split if safety == "split" else safety,
                         template=task.template)


def snapshot(module):
    return {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}


def changed(before, module):
    return [name for name, tensor in module.state_dict().items() if not torch.equal(before[name], tensor)]


@pytest.mark.parametrize("estimator", ["ppo", "rloo"])
def test_iterations_change_policy_and_critics_only(task, tokenizer, estimator, monkeypatch):
    if estimator == "ppo":
        extra = dict(minibatch_size=4, ppo_epochs=2, micro_batch_tokens=80, entropy_coef=0.01)
    else:
        extra = dict(gradient_checkpointing=True, ama="hysteresis")  # the HF checkpointing path runs too
    trainer = make_trainer(task, tokenizer, make_config(estimator=estimator, **extra))
    frozen = {"reference": trainer.reference, "reward_model": trainer.reward_model, "cost_model": trainer.cost_model}
    before = {name: snapshot(m) for name, m in {"policy": trainer.policy, **trainer.critics, **frozen}.items()}

    seen = []
    for name in ("safe_advantages", "rloo_advantages"):
        original = getattr(ops, name)

        def spy(*args, _original=original, **kwargs):
            seen.append(kwargs["lagrange_multiplier"])
            return _original(*args, **kwargs)

        monkeypatch.setattr(rl_trainer_module.ops, name, spy)
    history = trainer.train()

    assert len(history) == 2 and trainer.global_step == 2
    assert len(changed(before["policy"], trainer.policy)) > 0.5 * len(before["policy"])
    assert set(trainer.critics) == ({"reward_critic", "cost_critic"} if estimator == "ppo" else set())
    for name, critic in trainer.critics.items():
        assert changed(before[name], critic), f"{name} did not change"
    for name, module in frozen.items():
        assert not changed(before[name], module), f"{name} changed"
    # λ reaches the kernels as a 0-dim tensor (no host sync to read it).
    assert len(seen) == 2 and all(isinstance(x, torch.Tensor) and x.dim() == 0 for x in seen)
    expected = {"reward/mean", "cost/mean", "cost/bound", "lambda", "kl", "entropy", "policy_loss", "tokens_per_s",
                "time/generation", "time/scoring", "time/logprobs", "time/update", "grad_norm/actor"}
    if estimator == "ppo":
        expected |= {"approx_kl", "clip_fraction", "explained_variance/reward", "explained_variance/cost",
                     "value_loss/reward", "value_loss/cost"}
    for metrics in history:
        assert expected <= set(metrics)
        assert all(math.isfinite(v) for v in metrics.values() if isinstance(v, float))


def test_first_ppo_minibatch_has_ratio_one(task, tokenizer):
    # One epoch, one minibatch, micro-batched differently from the rollout: old and new log-probs agree.
    trainer = make_trainer(task, tokenizer, make_config(total_steps=1, micro_batch_tokens=40))
    metrics = trainer.step()
    assert abs(metrics["approx_kl"]) < 1e-6 and metrics["clip_fraction"] == 0.0


def _student_k(n_candidate, n_safety, delta, c1, c2):
    """The k of docs/method.md#candidate-selection, written out here from scipy's t quantiles (independent of
    hcrlhf.safety)."""
    from scipy import stats

    return (c1 * stats.t.ppf(1 - delta, n_candidate - 1) / math.sqrt(n_candidate)
            + c2 * stats.t.ppf(1 - delta, n_safety - 1) / math.sqrt(n_safety))


@pytest.mark.parametrize("rule", ["official", "pid"])
def test_lambda_follows_the_pessimistic_bound(task, tokenizer, rule):
    """U = μ̂ + k·σ̂ over the window with k from the window's n_c, and λ moved by exactly the chosen rule's
    step: up while U > τ, down while U < τ."""
    config = make_config(estimator="rloo", cost_threshold=-50.0, lambda_update=rule, lambda_lr=0.002,
                         lambda_ki=0.3, lambda_kp=0.2, lambda_min=0.01, lambda_error_clip=[0.5, 1.0], total_steps=4,
                         bound_c1=1.0)
    trainer = make_trainer(task, tokenizer, config)
    integral, last_error = 0.0, 0.0
    for phase, threshold in ((0, -50.0), (1, 50.0)):
        trainer.config.cost_threshold = threshold
        for _ in range(2):
            metrics = trainer.step()
            window = trainer.cost_window.values()
            mean, std = window.mean(), window.std(ddof=1)
            k = _student_k(len(window), config.safety_set_size, config.delta, 1.0, config.bound_c2)
            assert metrics["cost/coefficient_k"] == pytest.approx(k, rel=1e-12)
            bound = metrics["cost/bound"]
            assert bound == pytest.approx(mean + k * std, rel=1e-9)
            lagrange_multiplier = metrics["lambda"]
            if rule == "official":
                expected_log = math.log(lagrange_multiplier) + 0.002 * lagrange_multiplier * (bound - threshold)
            else:  # error in σ̂ units, clipped to [-0.5, 1], anti-windup integral
                error = min(max((bound - threshold) / std, -0.5), 1.0)
                integral = min(max(integral + 0.3 * error, math.log(0.01)), math.log(1e6))
                expected_log = integral + 0.2 * error  # λ_0 = 1, kd = 0
                last_error = error
            assert math.log(metrics["lambda_next"]) == pytest.approx(expected_log, rel=1e-9, abs=1e-12)
            if phase == 0:
                assert bound > threshold and metrics["lambda_next"] > lagrange_multiplier
            else:
                assert bound < threshold and metrics["lambda_next"] < lagrange_multiplier
    assert last_error <= 0.0
    lambdas = [m["lambda"] for m in trainer.history] + [trainer.history[-1]["lambda_next"]]
    assert lambdas[0] < lambdas[1] < lambdas[2] > lambdas[3] > lambdas[4]


@pytest.mark.parametrize("estimator", ["rloo", "ppo"])
@pytest.mark.parametrize("actor_coefficient", ["rollout", "window"])
def test_the_advantage_op_receives_the_augmented_costs(task, tokenizer, monkeypatch, estimator, actor_coefficient):
    """The cost scores reaching the advantage kernel are c + k·((c − μ̂)² − σ̂²)/(2σ̂) with the raw costs of
    the cost model, μ̂, σ̂ of the window including them, and the actor's k from the rows of the update
    (official) or the window — every piece recomputed here, not read from the trainer. Dropping the σ̂ term,
    using the other n_c or flipping a sign fails this test."""
    config = make_config(estimator=estimator, actor_coefficient=actor_coefficient, total_steps=3)
    trainer = make_trainer(task, tokenizer, config)
    raw_costs, received = [], []
    cost_forward = trainer.cost_model.forward

    def record_costs(*args, **kwargs):
        out = cost_forward(*args, **kwargs)
        raw_costs.append(out.end_scores.detach().double().clone())
        return out

    monkeypatch.setattr(trainer.cost_model, "forward", record_costs)
    name = "rloo_advantages" if estimator == "rloo" else "safe_advantages"
    original = getattr(ops, name)

    def spy(*args, **kwargs):
        received.append(args[4].detach().double().clone())  # cost_scores, the fifth positional argument
        return original(*args, **kwargs)

    monkeypatch.setattr(rl_trainer_module.ops, name, spy)
    window = []
    rows = config.prompts_per_step * config.samples_per_prompt
    for step in range(3):
        trainer.step()
        costs = torch.cat(raw_costs)
        raw_costs.clear()
        window = (window + costs.tolist())[-config.cost_window_size:]
        values = torch.tensor(window, dtype=torch.float64)
        mean, std = values.mean(), values.std()
        n_c = rows if actor_coefficient == "rollout" else len(window)
        k = _student_k(n_c, config.safety_set_size, config.delta, config.bound_c1, config.bound_c2)
        expected = costs + k * ((costs - mean) ** 2 - std**2) / (2 * std)
        torch.testing.assert_close(received[step], expected, rtol=1e-5, atol=1e-5)
        assert (received[step] - costs).abs().max() > 1e-3  # the augmentation is really there
    assert trainer.history[-1]["cost/actor_coefficient_k"] == pytest.approx(k, rel=1e-12)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_response_logprobs_equal_full_logits(task, tokenizer, temperature, monkeypatch):
    trainer = make_trainer(task, tokenizer, make_config(temperature=temperature))
    rollout = trainer.rollout(task.prompts("candidate")[0][:3])
    assert rollout.rows == 6 and rollout.prompts[0] == rollout.prompts[1]  # samples of one prompt adjacent
    mask = rollout.action_mask
    assert not mask[:, : rollout.prompt_width - 1].any()  # prompt positions are never actions
    index = mask.reshape(-1).nonzero().squeeze(1)

    calls = []
    original = ops.linear_logprobs

    def spy(hidden, weight, labels, **kwargs):
        calls.append(hidden.shape[0])
        return original(hidden, weight, labels, **kwargs)

    monkeypatch.setattr(rl_trainer_module.ops, "linear_logprobs", spy)
    policy = trainer.policy
    with torch.no_grad():
        logp, entropy = response_logprobs(policy, rollout.input_ids, rollout.attention_mask, index,
                                          temperature=temperature, return_entropy=True)
        positions = (rollout.attention_mask.cumsum(1) - 1).clamp(min=0)
        logits = policy(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                        position_ids=positions).logits[:, :-1].float() / temperature
        full = torch.log_softmax(logits, dim=-1)
        expected = full.gather(-1, rollout.input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        expected_entropy = -(full.exp() * full).sum(-1)
    assert calls == [int(mask.sum())]  # the LM head saw the response positions only
    torch.testing.assert_close(logp[mask], expected[mask], rtol=0, atol=2e-5)
    torch.testing.assert_close(entropy[mask], expected_entropy[mask], rtol=0, atol=2e-5)
    assert torch.all(logp[~mask] == 0) and torch.all(entropy[~mask] == 0)
    # The end of each row (where the scores are read) is the last action; EOS ends a response.
    eos_rows = (rollout.input_ids[:, rollout.prompt_width:] == tokenizer.eos_token_id).any(1)
    last_token = rollout.input_ids.gather(1, rollout.attention_mask.cumsum(1).argmax(1, keepdim=True)).squeeze(1)
    assert torch.all((last_token == tokenizer.eos_token_id)[eos_rows])


def _strip_times(lines):
    rows = [json.loads(line) for line in lines]
    return [{k: v for k, v in row.items() if not k.startswith("time/") and k != "tokens_per_s"} for row in rows]


def test_kill_and_resume_equals_an_uninterrupted_run(task, tokenizer, tmp_path, monkeypatch):
    settings = dict(total_steps=4, checkpoint_every=2, minibatch_size=4, ppo_epochs=2, micro_batch_tokens=100,
                    ama="sign", entropy_coef=0.01, keep_checkpoints=1)

    straight = make_trainer(task, tokenizer, make_config(output_dir=str(tmp_path / "a"), **settings))
    straight.train()

    killed = make_trainer(task, tokenizer, make_config(output_dir=str(tmp_path / "b"), **settings))
    original_update = killed._update_ppo

    def crash_in_third_update(*args, **kwargs):
        if killed.global_step == 2:
            raise KeyboardInterrupt("killed")
        return original_update(*args, **kwargs)

    killed._update_ppo = crash_in_third_update
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    checkpoints = tmp_path / "b" / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["step-00000002"]
    (checkpoints / ".tmp-step-00000004-dead").mkdir()  # as if killed while saving

    resumed = make_trainer(task, tokenizer, make_config(output_dir=str(tmp_path / "b"), resume=True, **settings))
    assert resumed.global_step == 2
    resumed.train()

    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-00000004"]
    for name, module in {"policy": straight.policy, **straight.critics}.items():
        other = resumed.policy if name == "policy" else resumed.critics[name]
        theirs = other.state_dict()
        for key, tensor in module.state_dict().items():
            assert torch.equal(tensor, theirs[key]), f"{name}.{key} differs after resume"
    assert resumed.multiplier.log_value == straight.multiplier.log_value
    assert resumed.cost_window.values().tolist() == straight.cost_window.values().tolist()
    a = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    b = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert len(a) == len(b) == 4 and _strip_times(a) == _strip_times(b)
    # A config change that alters the trajectory is refused on resume.
    with pytest.raises(ValueError, match="config differs in kl_coef"):
        make_trainer(task, tokenizer, make_config(output_dir=str(tmp_path / "b"), resume=True, kl_coef=0.5,
                                                  **settings))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(task, tokenizer, tmp_path, monkeypatch):
    trainer = make_trainer(task, tokenizer, make_config(estimator="rloo", total_steps=3, checkpoint_every=1,
                                                        output_dir=str(tmp_path)))
    trainer.config.total_steps = 1
    trainer.train()
    good = tmp_path / "checkpoints" / "step-00000001"
    assert good.is_dir()
    original_forward = trainer.reward_model.forward

    def nan_scores(*args, **kwargs):
        out = original_forward(*args, **kwargs)
        out.end_scores = torch.full_like(out.end_scores, float("nan"))
        return out

    monkeypatch.setattr(trainer.reward_model, "forward", nan_scores)
    trainer.config.total_steps = 3
    with pytest.raises(TrainingDivergedError, match=r"policy_loss is nan at iteration 2.*step-00000001"):
        trainer.train()
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000001"]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 1


def test_infinite_lambda_stops(task, tokenizer):
    trainer = make_trainer(task, tokenizer, make_config(estimator="rloo", cost_threshold=-1e6, lambda_lr=1e3,
                                                        lambda_update="official", lambda_max=None))
    with pytest.raises(TrainingDivergedError, match="Lagrange multiplier"):
        trainer.step()


def test_prompts_overlapping_the_safety_set_are_refused(task, tokenizer):
    candidate = list(task.prompts("candidate")[0])
    safety = list(task.prompts("safety")[0])
    leaky = candidate[:10] + [safety[3]]
    for given in (task.split, safety):
        with pytest.raises(ValueError, match="belong to the safety set"):
            make_trainer(task, tokenizer, make_config(), prompts=leaky, safety=given)
    from hcrlhf.safety import fingerprint

    with pytest.raises(ValueError, match="are the safety set itself"):
        make_trainer(task, tokenizer, make_config(), prompts=safety, safety=fingerprint(safety))
    with pytest.warns(UserWarning, match="not checked against the safety set"):
        make_trainer(task, tokenizer, make_config(), prompts=candidate[:10], safety=None)


def test_rollouts_use_exactly_the_configured_decoding(task, tokenizer):
    """The rollout samples with one explicit GenerationConfig: a setting in the policy's own generation config
    (repetition_penalty 1.3) changes no rollout token with the same seed."""
    config = make_config(estimator="rloo", max_new_tokens=20)
    plain = make_trainer(task, tokenizer, config)
    tuned = make_trainer(task, tokenizer, config)
    tuned.policy.generation_config.repetition_penalty = 1.3
    prompts = list(task.prompts("candidate")[0][:16])
    rollouts = []
    for trainer in (plain, tuned):
        torch.manual_seed(0)
        rollouts.append(trainer.rollout(prompts))
    assert torch.equal(rollouts[0].input_ids, rollouts[1].input_ids)
    assert tuned.policy.generation_config.repetition_penalty == 1.3  # restored after the rollout
    settings = plain.generation_config().to_dict()
    assert (settings["do_sample"], settings["repetition_penalty"], settings["max_new_tokens"]) == (True, 1.0, 20)


def test_save_pretrained_round_trips_through_plain_transformers(task, tokenizer, tmp_path):
    """The saved directory: AutoTokenizer gives the training tokenizer (not the Qwen2 config's Qwen2Tokenizer),
    and generation_config.json is the decoding asked for (default: the rollout's)."""
    from transformers import AutoTokenizer, GenerationConfig

    from hcrlhf.models.generation import decoding_settings, generation_config
    from hcrlhf.models.loading import same_tokenizer
    from hcrlhf.pipeline import Decoding

    trainer = make_trainer(task, tokenizer, make_config(estimator="rloo"))
    trainer.save_pretrained(tmp_path / "rollout")
    assert same_tokenizer(AutoTokenizer.from_pretrained(tmp_path / "rollout"), tokenizer)
    saved = decoding_settings(GenerationConfig.from_pretrained(tmp_path / "rollout"))
    assert saved == decoding_settings(trainer.generation_config())
    deployment = generation_config(Decoding(max_new_tokens=7, temperature=0.5, top_k=3), tokenizer)
    trainer.save_pretrained(tmp_path / "deployment", generation_config=deployment)
    saved = GenerationConfig.from_pretrained(tmp_path / "deployment")
    assert (saved.do_sample, saved.max_new_tokens, saved.temperature, saved.top_k) == (True, 7, 0.5, 3)
