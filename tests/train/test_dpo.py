"""DPO / ADPO (hcrlhf.train.dpo): the loss against hand-computed float64 values; the AMA mask (hysteresis flips
only at threshold crossings, a subset of the response tokens, the empty-mask fallback); zero gradient on masked
tokens; ADPO with mask "none" is plain DPO (against an independent float64 log-softmax path); train_dpo on the
built-in task lowers the DPO loss of its batch and saves a model transformers loads; bad settings are refused
before any work and a diverged run names the step and saves nothing."""

import copy
import json
import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from hcrlhf.config import ConfigError
from hcrlhf.data import tokenize_pairs
from hcrlhf.train.dpo import DPOConfig, ama_mask, dpo_loss, masked_sequence_logps, preference_logps, train_dpo

LOG2 = math.log(2.0)


@pytest.fixture(scope="module")
def rows(task):
    return task.preferences("train").select(range(8)).to_list()


def config(**overrides):
    values = dict(learning_rate=1e-3, batch_size=8, max_steps=6, epochs=100.0, max_length=64, progress=False)
    values.update(overrides)
    return DPOConfig(**values)


class ConstantScores(nn.Module):
    """A stand-in score model: ``scores[b, t] = fn(t)`` at every position (no parameters needed)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, input_ids, attention_mask):
        positions = torch.arange(input_ids.shape[1], dtype=torch.float32).expand(input_ids.shape)
        return SimpleNamespace(scores=self.fn(positions))


# ---------------------------------------------------------------------------------------- the loss


def test_dpo_loss_matches_hand_computed_float64_values():
    # Two pairs, β = 0.5. Pair 1: chosen log-ratio −1.0 − (−1.2) = 0.2, rejected −1.5 − (−1.1) = −0.4, logit
    # 0.5·(0.2 + 0.4) = 0.3. Pair 2: chosen −2.0 − (−1.8) = −0.2, rejected −1.0 − (−1.3) = 0.3, logit −0.25.
    # loss = mean(log(1 + e^−0.3), log(1 + e^0.25)) = mean(0.5543552444685271, 0.8259394198788436).
    f64 = dict(dtype=torch.float64)
    policy_chosen = torch.tensor([-1.0, -2.0], **f64, requires_grad=True)
    policy_rejected = torch.tensor([-1.5, -1.0], **f64, requires_grad=True)
    ref_chosen, ref_rejected = torch.tensor([-1.2, -1.8], **f64), torch.tensor([-1.1, -1.3], **f64)
    loss, metrics = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, 0.5)
    assert loss.dtype == torch.float64
    assert loss.item() == pytest.approx(0.6901473321736853, abs=1e-15)
    # implicit rewards β·log-ratio: chosen (0.1, −0.1), rejected (−0.2, 0.15); pair 2 is ranked wrong
    assert metrics["reward_chosen"].item() == pytest.approx(0.0, abs=1e-15)
    assert metrics["reward_rejected"].item() == pytest.approx(-0.025, abs=1e-15)
    assert metrics["accuracy"].item() == 0.5
    assert metrics["margin"].item() == pytest.approx(0.025, abs=1e-15)
    # d loss / d π_c,i = −β·σ(−logit_i)/B = (−0.25·σ(−0.3), −0.25·σ(0.25)); d / d π_r,i is its negative
    loss.backward()
    expected = torch.tensor([-0.10638937079708526, -0.14054412522144952], **f64)
    torch.testing.assert_close(policy_chosen.grad, expected, rtol=0, atol=1e-15)
    torch.testing.assert_close(policy_rejected.grad, -expected, rtol=0, atol=1e-15)


def test_dpo_loss_refuses_bad_inputs():
    x = torch.zeros(3)
    for beta in (0.0, -1.0, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="beta"):
            dpo_loss(x, x, x, x, beta)
    with pytest.raises(ValueError, match="ref_rejected_logps"):
        dpo_loss(x, x, x, torch.zeros(4), 0.1)
    with pytest.raises(ValueError, match="policy_rejected_logps"):
        dpo_loss(x, x.double(), x, x, 0.1)
    with pytest.raises(ValueError, match=r"policy_chosen_logps must be a \(B,\)"):
        dpo_loss(torch.zeros(2, 3), x, x, x, 0.1)


# -------------------------------------------------------------------------------------- the AMA mask


def test_hysteresis_flips_only_at_threshold_crossings():
    nan = float("nan")
    # Row 0: three prompt positions (scores ignored, NaN included) then the response. It starts at +1 (0.1 ≥ 0);
    # −0.31 < −0.3 flips to −1; 0.29 and 0.3 (not > 0.3) keep −1; 0.31 flips to +1; −0.3 (not < −0.3) keeps +1;
    # −0.5 flips to −1. Row 1 starts at −1 (−0.1 < 0) and stays there until 0.4. Row 2: the last two columns are
    # padding (not response) and stay out.
    scores = torch.tensor([
        [5.0, nan, -5.0, 0.1, 0.2, 0.35, 0.0, -0.2, -0.31, 0.29, 0.3, 0.31, -0.3, -0.5],
        [9.0, -0.1, 0.2, 0.25, 0.3, 0.4, 0.0, 0.1, -0.29, -0.3, 0.0, 0.2, 0.1, 0.0],
        [0.0, 0.0, 0.0, 0.0, -0.4, 0.1, 0.2, 0.5, 0.2, -0.1, -0.2, 0.0, 9.0, -9.0],
    ])
    response = torch.zeros(scores.shape, dtype=torch.bool)
    response[0, 3:] = True
    response[1, 1:] = True
    response[2, 4:12] = True
    plus, minus = 1, -1
    expected_z = [
        [plus, plus, plus, plus, plus, minus, minus, minus, plus, plus, minus],
        [minus, minus, minus, minus, plus, plus, plus, plus, plus, plus, plus, plus, plus],
        [minus, minus, minus, plus, plus, plus, plus, plus],
    ]
    positive = ama_mask(scores, response, keep="positive", empty="skip")
    negative = ama_mask(scores, response, keep="negative", empty="skip")
    for row, z in enumerate(expected_z):
        columns = response[row].nonzero().squeeze(1)
        assert positive[row, columns].tolist() == [v == plus for v in z], row
        assert negative[row, columns].tolist() == [v == minus for v in z], row
    assert not (positive | negative)[~response].any()


def test_ama_mask_is_a_subset_of_the_response_tokens(generator):
    batch, width = 64, 20
    scores = torch.randn(batch, width, generator=generator) * 0.5
    lengths = torch.randint(0, width + 1, (batch,), generator=generator)
    starts = torch.randint(0, width, (batch,), generator=generator)
    columns = torch.arange(width)
    response = (columns >= starts[:, None]) & (columns < starts[:, None] + lengths[:, None])  # some rows empty
    for empty in ("full", "skip"):
        positive = ama_mask(scores, response, keep="positive", empty=empty)
        negative = ama_mask(scores, response, keep="negative", empty=empty)
        assert positive.dtype == torch.bool and positive.shape == response.shape
        assert not (positive & ~response).any() and not (negative & ~response).any()
    # Without the fallback the two sides split the response tokens exactly.
    positive = ama_mask(scores, response, keep="positive", empty="skip")
    negative = ama_mask(scores, response, keep="negative", empty="skip")
    assert torch.equal(positive | negative, response) and not (positive & negative).any()


def test_an_empty_ama_mask_falls_back_to_the_full_response_or_is_skipped():
    scores = torch.tensor([[0.0, 0.9, 0.8, 0.7, 0.0], [0.0, -0.9, 0.1, 0.8, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    response = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    # "negative": row 0 never goes below −0.3 → nothing kept; row 1 keeps its first two tokens; row 2 has none.
    skip = ama_mask(scores, response, keep="negative", empty="skip")
    full = ama_mask(scores, response, keep="negative", empty="full")
    assert skip.tolist() == [[False] * 5, [False, True, True, False, False], [False] * 5]
    assert full.tolist() == [response[0].tolist(), [False, True, True, False, False], [False] * 5]


def test_ama_mask_refuses_bad_arguments():
    scores, response = torch.zeros(2, 3), torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match="lower must be < upper"):
        ama_mask(scores, response, upper=0.3, lower=0.3)  # lower is signed: 0.3 is not "below −0.3"
    with pytest.raises(ValueError, match="upper must be a finite number"):
        ama_mask(scores, response, upper=float("nan"))
    with pytest.raises(ValueError, match="keep"):
        ama_mask(scores, response, keep="chosen")
    with pytest.raises(ValueError, match="empty"):
        ama_mask(scores, response, empty="none")
    with pytest.raises(TypeError, match="response_mask must be a bool"):
        ama_mask(scores, response.float())
    with pytest.raises(ValueError, match="same shape"):
        ama_mask(scores, response[:, :2])


def test_the_masked_loss_has_exactly_zero_gradient_on_masked_tokens(generator):
    f64 = dict(dtype=torch.float64)
    scores = torch.tensor([[0.0, 0.5, 0.6, -0.4, -0.6, 0.2, 0.0], [0.0, 0.0, -0.5, -0.1, 0.4, -0.4, -0.2]])
    response = torch.tensor([[0, 1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    chosen_mask = ama_mask(scores, response, keep="positive")
    rejected_mask = ama_mask(scores, response, keep="negative")
    assert 0 < chosen_mask.sum() < response.sum() and 0 < rejected_mask.sum() < response.sum()
    chosen = (-torch.rand(2, 7, generator=generator, **f64)).requires_grad_(True)
    rejected = (-torch.rand(2, 7, generator=generator, **f64)).requires_grad_(True)
    with torch.no_grad():  # a NaN outside the mask (e.g. a padded position) must not leak into the loss
        chosen[~chosen_mask] = float("nan")
        rejected[~rejected_mask] = float("nan")
    ref_chosen, ref_rejected = torch.tensor([-2.0, -1.5], **f64), torch.tensor([-1.0, -2.5], **f64)
    loss, _ = dpo_loss(masked_sequence_logps(chosen, chosen_mask), masked_sequence_logps(rejected, rejected_mask),
                       ref_chosen, ref_rejected, 0.1)
    assert torch.isfinite(loss)
    loss.backward()
    for grad, mask in ((chosen.grad, chosen_mask), (rejected.grad, rejected_mask)):
        assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))  # exactly 0, not just small
        assert (grad[mask] != 0).all()
    # The masked sum is the plain sum over the kept tokens, in the input dtype.
    values = torch.arange(12, **f64).view(2, 6)
    mask = torch.tensor([[1, 0, 1, 0, 0, 1], [0, 0, 0, 0, 0, 0]], dtype=torch.bool)
    sums = masked_sequence_logps(values, mask)
    assert sums.dtype == torch.float64 and sums.tolist() == [0.0 + 2.0 + 5.0, 0.0]


# ------------------------------------------------------------------- sequence log-probs on the built-in task


def hf_response_sums(model, input_ids, attention_mask, mask):
    """Σ over ``mask`` (the (N, T − 1) action grid) of log-softmax(HF logits): the plain, unfused path."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].double()
    token = torch.log_softmax(logits, dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    return (token * mask).sum(dim=1)


@pytest.fixture(scope="module")
def float64_models(task):
    """(policy, reference) in float64; the policy's weights perturbed so that its log-probs differ."""
    reference = task.load_policy().double().eval()
    policy = copy.deepcopy(reference)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator, dtype=p.dtype))
    return policy, reference


def test_adpo_with_mask_none_is_plain_dpo(task, tokenizer, rows, float64_models):
    policy, reference = float64_models
    beta = 0.1
    with torch.no_grad():
        logps = preference_logps(policy, reference, tokenizer, rows, config=config(beta=beta), template=task.template)
        loss, _ = dpo_loss(logps.policy_chosen, logps.policy_rejected, logps.ref_chosen, logps.ref_rejected, beta)
        # Independently: full HF logits in float64, log-softmax, the sum over the response tokens.
        chosen = [r[f"response_{r['better_response_id']}"] for r in rows]
        rejected = [r[f"response_{1 - r['better_response_id']}"] for r in rows]
        prompts = [r["prompt"] for r in rows]
        batch = tokenize_pairs(tokenizer, prompts + prompts, chosen + rejected, template=task.template, max_length=64)
        response = batch.response_mask[:, 1:].double()
        pi = hf_response_sums(policy, batch.input_ids, batch.attention_mask, response)
        ref = hf_response_sums(reference, batch.input_ids, batch.attention_mask, response)
        n = len(rows)
        plain = -torch.nn.functional.logsigmoid(beta * ((pi[:n] - ref[:n]) - (pi[n:] - ref[n:]))).mean()
    torch.testing.assert_close(torch.cat([logps.policy_chosen, logps.policy_rejected]), pi, rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.cat([logps.ref_chosen, logps.ref_rejected]), ref, rtol=0, atol=1e-10)
    assert abs(loss.item() - plain.item()) < 1e-12 and abs(loss.item() - LOG2) > 1e-3
    assert logps.kept_tokens == logps.response_tokens == int(batch.response_mask[:, 1:].sum())
    assert logps.empty_responses == 0


def test_adpo_masks_by_the_score_of_each_prefix(task, tokenizer, rows, float64_models):
    policy, reference = float64_models
    with torch.no_grad():
        plain = preference_logps(policy, reference, tokenizer, rows, config=config(), template=task.template)

        def run(fn, **overrides):
            return preference_logps(policy, reference, tokenizer, rows, config=config(mask="ama", **overrides),
                                    score_model=ConstantScores(fn), template=task.template)

        # All scores +1: the chosen side keeps everything, the rejected side nothing → "full" falls back to
        # its whole response (exactly plain DPO), "skip" leaves its sums at exactly 0.
        full = run(lambda t: torch.ones_like(t))
        for name in ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected"):
            assert torch.equal(getattr(full, name), getattr(plain, name)), name
        assert full.empty_responses == len(rows) and full.kept_tokens == plain.response_tokens
        skip = run(lambda t: torch.ones_like(t), empty_mask="skip")
        assert torch.equal(skip.policy_chosen, plain.policy_chosen)
        assert not skip.policy_rejected.any() and not skip.ref_rejected.any()
        loss, _ = dpo_loss(skip.policy_chosen, skip.policy_rejected, skip.ref_chosen, skip.ref_rejected, 0.1)
        only_chosen = -torch.nn.functional.logsigmoid(0.1 * (plain.policy_chosen - plain.ref_chosen)).mean()
        assert loss.item() == pytest.approx(only_chosen.item(), abs=1e-14)
        # A cost model reads as −C: all costs +1 (unsafe) keep the rejected side and drop the chosen one.
        cost = run(lambda t: torch.ones_like(t), empty_mask="skip", ama_score_model="cost")
        assert not cost.policy_chosen.any() and torch.equal(cost.policy_rejected, plain.policy_rejected)

        # Scores +1 at even positions, −1 at odd ones: action j (token j + 1) is read at position j + 1, so the
        # chosen side sums the tokens at even positions and the rejected side those at odd ones.
        alternating = run(lambda t: 1.0 - 2.0 * (t % 2), empty_mask="skip")
        prompts = [r["prompt"] for r in rows]
        chosen = [r[f"response_{r['better_response_id']}"] for r in rows]
        rejected = [r[f"response_{1 - r['better_response_id']}"] for r in rows]
        batch = tokenize_pairs(tokenizer, prompts + prompts, chosen + rejected, template=task.template, max_length=64)
        token_position = torch.arange(1, batch.input_ids.shape[1])
        response = batch.response_mask[:, 1:]
        n = len(rows)
        keep = torch.cat([response[:n] & (token_position % 2 == 0), response[n:] & (token_position % 2 == 1)])
        expected = hf_response_sums(policy, batch.input_ids, batch.attention_mask, keep.double())
    torch.testing.assert_close(torch.cat([alternating.policy_chosen, alternating.policy_rejected]), expected,
                               rtol=0, atol=1e-10)
    assert alternating.kept_tokens == int(keep.sum()) < alternating.response_tokens


# ------------------------------------------------------------------------------------------ training


def test_train_dpo_lowers_the_loss_of_its_batch_and_saves_a_model_transformers_loads(task, tokenizer, rows,
                                                                                    tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    policy = task.load_policy()
    out = tmp_path / "dpo"
    result = train_dpo(policy, None, tokenizer, rows, config=config(output_dir=str(out)), template=task.template)
    losses = [h["loss"] for h in result.history]
    assert result.steps == 6 and [h["step"] for h in result.history] == [1, 2, 3, 4, 5, 6]
    assert losses[0] == pytest.approx(LOG2, abs=1e-6)  # the policy equals its reference before the first update
    assert losses[-1] < losses[0] - 0.3 and result.history[-1]["accuracy"] == 1.0
    assert result.kept_fraction == 1.0 and all(h["kept_fraction"] == 1.0 for h in result.history)
    # The trained policy's DPO loss on its batch, against a fresh copy of the starting policy.
    with torch.no_grad():
        logps = preference_logps(policy, task.load_policy(), tokenizer, rows, config=config(), template=task.template)
        after, _ = dpo_loss(logps.policy_chosen, logps.policy_rejected, logps.ref_chosen, logps.ref_rejected, 0.1)
    assert after.item() < losses[-1] < LOG2

    assert result.saved_path == out and (out / "model.safetensors").is_file()
    state = json.loads((out / "dpo_training.json").read_text())
    assert state["steps"] == 6 and state["config"]["beta"] == 0.1 and len(state["history"]) == 6
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    loaded_tokenizer = AutoTokenizer.from_pretrained(out)
    text = task.template.format_pair(rows[0]["prompt"], rows[0]["response_0"])
    ids = loaded_tokenizer(text, return_tensors="pt")["input_ids"]
    assert ids.tolist() == tokenizer(text, return_tensors="pt")["input_ids"].tolist()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, policy(input_ids=ids).logits)


def test_micro_batches_and_adpo_with_a_score_model(task, tokenizer, rows):
    whole = train_dpo(task.load_policy(), None, tokenizer, rows, config=config(max_steps=2), template=task.template)
    split = train_dpo(task.load_policy(), None, tokenizer, rows, config=config(max_steps=2, micro_batch_pairs=3),
                      template=task.template)
    for a, b in zip(whole.history, split.history):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["margin"] == pytest.approx(b["margin"], abs=1e-5)
    # ADPO with an (untrained) score model: part of the response tokens are masked, and the loss still falls.
    score_model = task.new_score_model(seed=0)
    adpo = train_dpo(task.load_policy(), None, tokenizer, rows, config=config(mask="ama"), score_model=score_model,
                     template=task.template)
    assert 0 < adpo.kept_fraction < 1 and adpo.history[0]["loss"] == pytest.approx(LOG2, abs=1e-6)
    assert adpo.history[-1]["loss"] < LOG2 - 0.3
    assert not any(p.requires_grad for p in score_model.parameters())


def test_lora_policy_uses_its_base_model_as_the_reference(task, tokenizer, rows, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    base = task.load_policy()
    before = {name: p.detach().clone() for name, p in base.named_parameters()}
    policy = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    out = tmp_path / "lora"
    result = train_dpo(policy, None, tokenizer, rows, config=config(learning_rate=1e-2, max_steps=3,
                                                                    output_dir=str(out)), template=task.template)
    assert result.history[0]["loss"] == pytest.approx(LOG2, abs=1e-6) and result.history[-1]["loss"] < LOG2
    for name, p in policy.get_base_model().named_parameters():  # only the adapters trained
        if "lora_" not in name:
            assert torch.equal(p, before[name.replace(".base_layer", "")]), name
    loaded = AutoModelForCausalLM.from_pretrained(out)  # a plain causal LM: the adapters merged
    assert type(loaded).__name__ == "Qwen2ForCausalLM"
    assert not any("lora" in name for name, _ in loaded.named_parameters())


# ------------------------------------------------------------------------------------ refusals, divergence


def test_bad_settings_are_refused_before_any_work(task, tokenizer, rows, tmp_path):
    for value in (float("nan"), float("inf"), 0.0, -1e-3):
        with pytest.raises(ConfigError, match="learning_rate") as error:
            DPOConfig(learning_rate=value)
        assert error.value.key == "learning_rate"
    with pytest.raises(ConfigError, match="ama_lower"):
        DPOConfig(ama_upper=0.3, ama_lower=0.3)
    with pytest.raises(ConfigError, match="empty_mask"):
        DPOConfig(empty_mask="none")
    with pytest.raises(ConfigError, match="preference"):
        DPOConfig(preference="helpful")

    policy = task.load_policy()
    weights = copy.deepcopy(policy.state_dict())
    out = tmp_path / "out"
    changed = config(output_dir=str(out))
    changed.learning_rate = float("inf")  # changed in place after creation: validated again
    with pytest.raises(ConfigError, match="learning_rate"):
        train_dpo(policy, None, tokenizer, rows, config=changed, template=task.template)
    with pytest.raises(ValueError, match="score_model"):
        train_dpo(policy, None, tokenizer, rows, config=config(mask="ama", output_dir=str(out)), template=task.template)
    with pytest.raises(ValueError, match="reference is the policy itself"):
        train_dpo(policy, policy, tokenizer, rows, config=config(output_dir=str(out)), template=task.template)
    with pytest.raises(ValueError, match="safer_response_id"):
        train_dpo(policy, None, tokenizer, [{"prompt": "p", "response_0": "a", "response_1": "b"}],
                  config=config(preference="safer", output_dir=str(out)))
    on_safety_prompt = dict(rows[0], prompt=task.split.safety[0])
    with pytest.raises(ValueError, match="belong to the safety set"):
        train_dpo(policy, None, tokenizer, [on_safety_prompt], config=config(output_dir=str(out)),
                  template=task.template, safety_split=task.split)
    assert not out.exists()
    for name, value in policy.state_dict().items():
        assert torch.equal(value, weights[name]), name


def test_a_diverging_run_names_the_step_and_saves_nothing(task, tokenizer, rows, tmp_path):
    out = tmp_path / "dpo"
    # With this learning rate the weights after the first update make the second step's loss NaN.
    with pytest.raises(FloatingPointError, match=r"DPO loss is nan at step 2 of 4.*no model was saved"):
        train_dpo(task.load_policy(), None, tokenizer, rows, config=config(learning_rate=1e12, max_steps=4,
                                                                           output_dir=str(out)),
                  template=task.template)
    assert not out.exists()
    # A finite loss and gradient, but an update that overflows float16 weights (AdamW moves each weight by about
    # the learning rate, 1e5 > 65504): refused before saving, naming the last step.
    with pytest.raises(FloatingPointError, match=r"weights are not finite .* at step 1 of 1"):
        train_dpo(task.load_policy().half(), None, tokenizer, rows,
                  config=config(learning_rate=1e5, max_steps=1, output_dir=str(out)), template=task.template)
    assert not out.exists()
