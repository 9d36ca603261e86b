"""Templates, left/right padded tokenization and end-of-response indices."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hcrlhf.data import (
    PLAIN_TEMPLATE,
    PromptTemplate,
    end_indices,
    get_template,
    pad_sequences,
    tokenize_pairs,
    tokenize_prompts,
)

WORDS = ["<pad>", "<unk>", "<eos>", "user", "assistant", ":", "a", "b", "c", "d", "e", "f", "g"]


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


TEMPLATE = PromptTemplate("user : {prompt} assistant :")


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_end_indices_right_left_and_holes():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    left = right.flip(1)
    holes = torch.tensor([[1, 0, 1, 0, 0], [0, 1, 1, 0, 1], [1, 1, 0, 0, 0]])
    assert end_indices(right).tolist() == [2, 4, 0]
    assert end_indices(left).tolist() == [4, 4, 4]
    assert end_indices(holes).tolist() == [2, 4, 1]
    assert end_indices(right.bool()).tolist() == [2, 4, 0]
    with pytest.raises(ValueError, match=r"rows \[1\]"):
        end_indices(torch.tensor([[1, 0], [0, 0]]))
    with pytest.raises(TypeError, match="bool or integer"):
        end_indices(torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        end_indices(torch.ones(3, dtype=torch.long))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=1, max_size=9).filter(any), min_size=1, max_size=6))
def test_end_indices_property(rows):
    width = max(len(r) for r in rows)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        mask[b, : len(r)] = torch.tensor(r, dtype=torch.long)
    expected = [max(t for t in range(width) if mask[b, t]) for b in range(len(rows))]
    assert end_indices(mask).tolist() == expected


def test_pad_sequences_sides():
    input_ids, mask, _ = pad_sequences([[5, 6, 7], [8]], pad_token_id=0, padding_side="right")
    assert input_ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    input_ids, mask, _ = pad_sequences([[5, 6, 7], [8]], pad_token_id=0, padding_side="left")
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="padding_side"):
        pad_sequences([[1]], 0, padding_side="middle")
    with pytest.raises(ValueError, match="pad_token_id is None"):
        pad_sequences([[1]], None)


def test_prompts_are_left_padded_for_generation(tokenizer):
    batch = tokenize_prompts(tokenizer, ["a b c", "d"], template=TEMPLATE)
    assert batch.padding_side == "left"
    assert batch.input_ids[0].tolist() == ids(tokenizer, "user : a b c assistant :")
    assert batch.input_ids[1].tolist() == [0, 0] + ids(tokenizer, "user : d assistant :")
    assert batch.end_index.tolist() == [6, 6]  # the last column for every row
    assert not batch.response_mask.any()
    cut = tokenize_prompts(tokenizer, ["a b c"], template=TEMPLATE, max_length=4)
    assert cut.input_ids[0].tolist() == ids(tokenizer, "b c assistant :") and cut.truncated.tolist() == [True]


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_pairs_end_at_the_eos_of_each_response(tokenizer, padding_side):
    batch = tokenize_pairs(tokenizer, ["a", "b c d"], ["e f g", "e"], template=TEMPLATE, padding_side=padding_side)
    eos = tokenizer.eos_token_id
    rows = [ids(tokenizer, "user : a assistant : e f g") + [eos], ids(tokenizer, "user : b c d assistant : e") + [eos]]
    for b, expected in enumerate(rows):
        valid = batch.attention_mask[b].bool()
        assert batch.input_ids[b][valid].tolist() == expected
        assert batch.input_ids[b, batch.end_index[b]].item() == eos
        # The response mask covers the response and its EOS, nothing else.
        n_response = 4 if b == 0 else 2
        assert batch.input_ids[b][batch.response_mask[b]].tolist() == expected[-n_response:]
    assert batch.end_index.tolist() == [8, 8] and batch.input_ids.shape[1] == 9  # both rows have 9 tokens
    # Different lengths (9 and 7 tokens): right padding ends the short row early, left padding at T-1.
    short = tokenize_pairs(tokenizer, ["a", "a"], ["e f g", "e"], template=TEMPLATE, padding_side=padding_side)
    if padding_side == "right":
        assert short.end_index.tolist() == [8, 6]
        assert short.attention_mask[1].tolist() == [1] * 7 + [0, 0]
    else:
        assert short.end_index.tolist() == [8, 8]
        assert short.attention_mask[1].tolist() == [0, 0] + [1] * 7
    for b in range(2):
        assert short.input_ids[b, short.end_index[b]].item() == eos


def test_pairs_truncation_keeps_the_response_and_its_eos(tokenizer):
    batch = tokenize_pairs(tokenizer, ["a b c d"], ["e f"], template=TEMPLATE, max_length=6)
    assert batch.truncated.tolist() == [True]
    assert batch.input_ids[0].tolist() == ids(tokenizer, "d assistant : e f") + [tokenizer.eos_token_id]
    long = tokenize_pairs(tokenizer, ["a"], ["e f g e f g"], template=TEMPLATE, max_length=4)
    assert long.input_ids[0].tolist() == ids(tokenizer, "e f g") + [tokenizer.eos_token_id]
    assert long.response_mask.all()


def test_template_resolution(tokenizer):
    assert get_template(None).format_prompt("x") == "BEGINNING OF CONVERSATION: USER: x ASSISTANT:"
    assert get_template("plain") is PLAIN_TEMPLATE
    assert get_template("Q: {prompt} A:").format_pair("x", "y") == "Q: x A: y"
    with pytest.raises(ValueError, match="exactly one"):
        PromptTemplate("no placeholder")
    with pytest.raises(ValueError, match="chat_template"):
        get_template("chat", tokenizer)
    with pytest.raises(ValueError, match="same length"):
        tokenize_pairs(tokenizer, ["a"], ["b", "c"], template=TEMPLATE)
