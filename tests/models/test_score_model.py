"""ScoreModel: the score is read at the last non-pad token under both paddings; save → load is exact;
the saved format is a Hugging Face one-label sequence classifier with its trained head (same scores in
transformers); a checkpoint without a trained head is refused; the old layout (score_head.safetensors)
still loads; sequence-classification checkpoints are wrapped; value models start from score models."""

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import (
    AutoModelForSequenceClassification,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
    Qwen2Model,
)

from hcrlhf.data import pad_sequences
from hcrlhf.models import (
    ScoreModel,
    ValueHead,
    ValueModel,
    choose_attn_implementation,
    flash_attn_available,
    load_causal_lm,
    load_policy_and_reference,
)
from hcrlhf.models.score_model import ScoreCheckpointError

VOCAB = 50
PAD = 0


def tiny_config(**overrides):
    values = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, use_sliding_window=False)
    values.update(overrides)
    config = Qwen2Config(**values)
    config._attn_implementation = "sdpa"
    return config


@pytest.fixture
def score_model():
    torch.manual_seed(0)
    model = ScoreModel(Qwen2Model(tiny_config()))
    model.eval()
    return model


def rows(seed=0, lengths=(7, 3, 5, 1)):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(1, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def batch(sequences, side):
    input_ids, mask, _ = pad_sequences(sequences, PAD, padding_side=side)
    return input_ids, mask


@torch.no_grad()
def test_score_is_read_at_the_last_non_pad_token(score_model):
    sequences = rows()
    input_ids, mask = batch(sequences, "right")
    out = score_model(input_ids, mask)
    assert out.end_index.tolist() == [len(s) - 1 for s in sequences]
    # By hand: the head applied to the hidden state at each row's last real token.
    hidden = score_model.backbone(input_ids=input_ids, attention_mask=mask).last_hidden_state
    expected = torch.stack([score_model.head(hidden[b, len(s) - 1]).squeeze() for b, s in enumerate(sequences)])
    torch.testing.assert_close(out.end_scores, expected, rtol=1e-5, atol=1e-6)
    # And each row alone (no padding at all) gives the same score.
    for b, s in enumerate(sequences):
        alone = score_model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).end_scores[0]
        torch.testing.assert_close(out.end_scores[b], alone, rtol=1e-5, atol=1e-5)
    assert out.scores.shape == input_ids.shape and out.scores.dtype == torch.float32
    assert (out.scores[mask == 0] == 0).all()


@torch.no_grad()
def test_end_token_equal_to_the_pad_id_is_still_the_end(score_model):
    # Many tokenizers pad with EOS: the end must come from the attention mask, not from the token ids.
    sequences = [[5, 9, PAD], [7, 3, 4, 8, PAD]]
    for side in ("right", "left"):
        input_ids, mask = batch(sequences, side)
        out = score_model(input_ids, mask)
        hidden = score_model.backbone(input_ids=input_ids, attention_mask=mask,
                                      position_ids=(mask.cumsum(1) - 1).clamp(min=0)).last_hidden_state
        for b in range(2):
            assert input_ids[b, out.end_index[b]] == PAD and mask[b, out.end_index[b]] == 1
            torch.testing.assert_close(out.end_scores[b], score_model.head(hidden[b, out.end_index[b]]).squeeze())


@torch.no_grad()
def test_left_and_right_padding_give_the_same_scores(score_model):
    sequences = rows(1)
    right = score_model(*batch(sequences, "right"))
    left = score_model(*batch(sequences, "left"))
    assert left.end_index.tolist() == [6] * 4
    assert torch.isfinite(left.scores).all()
    torch.testing.assert_close(left.end_scores, right.end_scores, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_only_the_end_token_and_before_matter(score_model):
    sequences = rows(2)
    input_ids, mask = batch(sequences, "right")
    base = score_model(input_ids, mask).end_scores
    garbage = input_ids.clone()
    garbage[mask == 0] = 7  # what sits in padded positions must not matter
    torch.testing.assert_close(score_model(garbage, mask).end_scores, base)
    changed = input_ids.clone()
    changed[0, len(sequences[0]) - 1] = (changed[0, len(sequences[0]) - 1] % (VOCAB - 1)) + 1
    assert not torch.isclose(score_model(changed, mask).end_scores[0], base[0])


@torch.no_grad()
def test_save_load_gives_identical_scores(score_model, tmp_path):
    input_ids, mask = batch(rows(3), "right")
    before = score_model(input_ids, mask).end_scores
    score_model.save_pretrained(tmp_path / "rm")
    assert (tmp_path / "rm" / "model.safetensors").is_file()
    assert not (tmp_path / "rm" / "score_head.safetensors").exists()
    loaded = ScoreModel.from_pretrained(tmp_path / "rm").eval()
    assert loaded.kind == "sequence_classification"  # saved as a Hugging Face one-label classifier
    assert torch.equal(loaded(input_ids, mask).end_scores, before)


@torch.no_grad()
def test_wraps_a_sequence_classifier_with_one_label(tmp_path):
    torch.manual_seed(1)
    classifier = Qwen2ForSequenceClassification(tiny_config(num_labels=1)).eval()
    model = ScoreModel.from_sequence_classifier(classifier).eval()
    assert model.kind == "sequence_classification"
    input_ids, mask = batch(rows(4), "right")
    ours = model(input_ids, mask).end_scores
    theirs = classifier(input_ids=input_ids, attention_mask=mask).logits.squeeze(-1)  # HF pools at the last non-pad
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path / "cls")
    loaded = ScoreModel.from_pretrained(tmp_path / "cls").eval()
    assert loaded.kind == "sequence_classification"
    assert torch.equal(loaded(input_ids, mask).end_scores, ours)
    # A plain HF checkpoint (no hcrlhf config) loads as a wrapped classifier too.
    classifier.save_pretrained(tmp_path / "plain")
    assert torch.equal(ScoreModel.from_pretrained(tmp_path / "plain").eval()(input_ids, mask).end_scores, ours)
    with pytest.raises(ValueError, match="num_labels=1"):
        ScoreModel.from_sequence_classifier(Qwen2ForSequenceClassification(tiny_config(num_labels=2)))


def trained(model, seed=10):
    """Stand-in for training: fresh values in the head and in one backbone weight (so a reload that kept any
    initial value, or re-drew the head, would not match)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=generator))
        model.backbone.norm.weight.add_(0.1 * torch.randn(model.backbone.norm.weight.shape, generator=generator))
    return model


@torch.no_grad()
def test_transformers_loads_the_trained_head_and_gives_the_same_scores(score_model, tmp_path):
    trained(score_model)
    training = {"kind": "cost", "loss": "bt_sign", "steps": 3}
    score_model.save_pretrained(tmp_path / "cm", pad_token_id=PAD, training=training)
    model, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "cm", output_loading_info=True)
    model.eval()
    assert {k: list(v) for k, v in info.items()} == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [],
                                                      "error_msgs": []}
    assert type(model) is Qwen2ForSequenceClassification and model.config.num_labels == 1
    assert torch.equal(model.score.weight, score_model.head.weight)
    assert model.config.pad_token_id == PAD
    entry = model.config.hcrlhf
    assert entry["format"] == "hcrlhf-score-model" and entry["training"] == training
    assert entry["score_position"] == "last_non_pad_token"
    # Right padding with pad_token_id: transformers pools at the last token that is not the pad id, which is
    # the attention mask's last position when no sequence ends with the pad token: the same scores.
    sequences = rows(6)
    input_ids, mask = batch(sequences, "right")
    ours = score_model(input_ids, mask).end_scores
    theirs = model(input_ids=input_ids, attention_mask=mask).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # Left padding agrees once the positions count real tokens only, as ScoreModel's do.
    input_ids, mask = batch(sequences, "left")
    theirs = model(input_ids=input_ids, attention_mask=mask,
                   position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits.squeeze(-1)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    # The documented limit: a sequence that ends with the pad token (a tokenizer that pads with EOS) is read
    # one token early by transformers, which pools on token ids, never on the attention mask.
    ends_in_pad = [[5, 9, 4, PAD]]
    ids, ones = torch.tensor(ends_in_pad), torch.ones(1, 4, dtype=torch.long)
    theirs = model(input_ids=ids, attention_mask=ones).logits[0, 0]
    assert not torch.isclose(theirs, score_model(ids, ones).end_scores[0])
    # And hcrlhf reads its own save back: the same scores, the recorded training shown in its provenance.
    loaded = ScoreModel.from_pretrained(tmp_path / "cm", role="cost").eval()
    assert torch.equal(loaded(input_ids, mask).end_scores, score_model(input_ids, mask).end_scores)
    assert loaded.provenance["format"] == "hcrlhf" and loaded.provenance["hcrlhf"]["training"] == training
    assert loaded.provenance["architecture"] == "Qwen2ForSequenceClassification"
    with pytest.raises(ScoreCheckpointError, match="trained this as a cost model; a reward model"):
        ScoreModel.from_pretrained(tmp_path / "cm", role="reward")


def test_a_checkpoint_without_a_trained_head_is_refused(tmp_path):
    torch.manual_seed(4)
    # A plain causal LM (a base model): no score head in it.
    Qwen2ForCausalLM(tiny_config()).save_pretrained(tmp_path / "lm")
    with pytest.raises(ScoreCheckpointError, match=r"lm: not a trained score model.*'score'.*score\.weight.*"
                                                   r"Qwen2ForCausalLM"):
        ScoreModel.from_pretrained(tmp_path / "lm")
    # A sequence classifier saved without its score weights.
    classifier = Qwen2ForSequenceClassification(tiny_config(num_labels=1))
    classifier.config.save_pretrained(tmp_path / "headless")
    save_file({k: v.contiguous() for k, v in classifier.state_dict().items() if not k.startswith("score.")},
              str(tmp_path / "headless" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ScoreCheckpointError, match=r"headless: not a trained score model.*score\.weight"):
        ScoreModel.from_pretrained(tmp_path / "headless")
    # A head of the wrong shape (two labels) would be re-initialised: refused too.
    Qwen2ForSequenceClassification(tiny_config(num_labels=2)).save_pretrained(tmp_path / "two")
    with pytest.raises(ScoreCheckpointError, match=r"wrong shape.*score\.weight \(2, 32\)"):
        ScoreModel.from_pretrained(tmp_path / "two")
    # An old-layout directory whose head file is gone.
    ScoreModel(Qwen2Model(tiny_config())).backbone.save_pretrained(tmp_path / "old")
    (tmp_path / "old" / "hcrlhf_score_config.json").write_text(json.dumps(
        {"format": "hcrlhf-score-model", "version": 1, "kind": "backbone", "hidden_size": 32}))
    with pytest.raises(ScoreCheckpointError, match="score_head.safetensors is missing"):
        ScoreModel.from_pretrained(tmp_path / "old")
    # A third-party one-label classifier with its head is accepted; a fresh head is available on request.
    classifier.save_pretrained(tmp_path / "third-party")
    accepted = ScoreModel.from_pretrained(tmp_path / "third-party", role="cost")
    assert accepted.provenance["format"] == "sequence_classifier" and accepted.provenance["hcrlhf"] is None
    assert torch.equal(accepted.head.weight, classifier.score.weight)
    assert ScoreModel.from_sequence_classifier(tmp_path / "lm", allow_untrained_head=True).kind == \
        "sequence_classification"


def save_old_layout(model: ScoreModel, directory, bias: float):
    """A directory as hcrlhf wrote it before the Hugging Face format: the backbone's files, the head (with
    its bias) in score_head.safetensors, hcrlhf_score_config.json and the trainer's training_state.json."""
    model.backbone.save_pretrained(directory)
    save_file({"weight": model.head.weight.detach().clone(), "bias": torch.tensor([bias])},
              str(directory / "score_head.safetensors"), metadata={"format": "pt"})
    (directory / "hcrlhf_score_config.json").write_text(json.dumps(
        {"format": "hcrlhf-score-model", "version": 1, "kind": "backbone", "hidden_size": 32,
         "score_position": "last_non_pad_token"}))
    (directory / "training_state.json").write_text(json.dumps(
        {"config": {"kind": "cost", "cost_loss": "bt_sign", "regularization": 0.001}, "step": 5, "total_steps": 5,
         "n_train_pairs": 40}))


@torch.no_grad()
def test_old_layout_still_loads_and_resaves(score_model, tmp_path):
    trained(score_model)
    input_ids, mask = batch(rows(7), "right")
    expected = score_model(input_ids, mask).end_scores
    save_old_layout(score_model, tmp_path / "old", bias=0.0)
    loaded = ScoreModel.from_pretrained(tmp_path / "old", role="cost").eval()
    assert loaded.kind == "backbone" and torch.equal(loaded(input_ids, mask).end_scores, expected)
    assert loaded.provenance["hcrlhf"]["training"]["kind"] == "cost"
    assert loaded.provenance["hcrlhf"]["training"]["steps"] == 5
    # Saving it again converts it (its bias is 0): transformers then loads the trained head.
    loaded.save_pretrained(tmp_path / "converted")
    model, info = AutoModelForSequenceClassification.from_pretrained(tmp_path / "converted", output_loading_info=True)
    assert not info["missing_keys"] and torch.equal(model.score.weight, score_model.head.weight)
    assert model.config.hcrlhf["training"]["loss"] == "bt_sign"
    # A non-zero bias has no place in Qwen2's bias-free `score`: it loads (the bias counts) and saves in the
    # old layout again, with a warning.
    save_old_layout(score_model, tmp_path / "biased", bias=0.5)
    biased = ScoreModel.from_pretrained(tmp_path / "biased").eval()
    torch.testing.assert_close(biased(input_ids, mask).end_scores, expected + 0.5)
    with pytest.warns(UserWarning, match="old layout"):
        biased.save_pretrained(tmp_path / "biased-again")
    assert (tmp_path / "biased-again" / "score_head.safetensors").is_file()
    torch.testing.assert_close(ScoreModel.from_pretrained(tmp_path / "biased-again")(input_ids, mask).end_scores,
                               expected + 0.5)


def test_from_backbone_uses_a_causal_lm_base_and_loads_from_disk(tmp_path):
    torch.manual_seed(2)
    lm = Qwen2ForCausalLM(tiny_config())
    model = ScoreModel.from_backbone(lm)
    assert model.backbone is lm.model
    lm.save_pretrained(tmp_path / "lm")
    loaded = ScoreModel.from_backbone(tmp_path / "lm")
    assert loaded.config._attn_implementation == "sdpa"
    for name, tensor in lm.model.state_dict().items():
        assert torch.equal(loaded.backbone.state_dict()[name], tensor), name


def test_value_model_starts_from_the_score_model(score_model):
    critic = ValueModel.from_score_model(score_model)
    input_ids, mask = batch(rows(5), "right")
    with torch.no_grad():
        torch.testing.assert_close(critic(input_ids, mask), score_model(input_ids, mask).scores)
    assert all(p.requires_grad for p in critic.parameters())
    with torch.no_grad():
        critic.score_model.head.weight.add_(1.0)  # training the critic leaves the reward model alone
    assert not torch.equal(critic.score_model.head.weight, score_model.head.weight)

    head = ValueHead.from_score_model(score_model)
    hidden = torch.randn(2, 3, 32)
    torch.testing.assert_close(head(hidden), score_model.head(hidden).squeeze(-1))
    with pytest.raises(ValueError, match="hidden_size 16 differs"):
        ValueHead.from_score_model(score_model, hidden_size=16)
    with pytest.raises(ValueError, match=r"\(B, T, 32\)"):
        head(torch.randn(2, 3, 8))


def test_load_causal_lm_local_safetensors_sdpa(tmp_path):
    torch.manual_seed(3)
    Qwen2ForCausalLM(tiny_config()).save_pretrained(tmp_path / "policy")
    policy, reference = load_policy_and_reference(tmp_path / "policy")
    assert policy.training and not reference.training
    assert not any(p.requires_grad for p in reference.parameters())
    assert policy.config._attn_implementation == "sdpa"
    assert load_causal_lm(tmp_path / "policy", dtype="bfloat16").dtype == torch.bfloat16
    with pytest.raises(OSError, match="could not load"):
        load_causal_lm(tmp_path / "policy-missing-weights-dir-does-not-exist-but/looks/local")


def test_attention_choice():
    assert choose_attn_implementation("auto", device="cpu") == "sdpa"
    assert choose_attn_implementation("eager") == "eager"
    if not flash_attn_available():
        assert choose_attn_implementation("auto") == "sdpa"
        with pytest.raises(ValueError, match="flash-attn"):
            choose_attn_implementation("flash_attention_2")
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        choose_attn_implementation("fast")
