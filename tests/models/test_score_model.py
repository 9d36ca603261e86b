"""ScoreModel: the score is read at the last non-pad token under both paddings; save → load is exact;
sequence-classification checkpoints are wrapped; value models start from score models."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification, Qwen2Model

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
    assert (tmp_path / "rm" / "model.safetensors").is_file() and (tmp_path / "rm" / "score_head.safetensors").is_file()
    loaded = ScoreModel.from_pretrained(tmp_path / "rm").eval()
    assert loaded.kind == "backbone"
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
