"""The one explicit decoding (hcrlhf.models.generation) and tokenizers that load back as saved.

* every setting that changes the sampled tokens is explicit in the GenerationConfig hcrlhf samples with, and a
  setting in the policy's own generation config (repetition_penalty 1.3, ...) changes nothing: the same seed gives
  the same samples through hcrlhf's sampling, while plain ``generate`` with the old explicit kwargs picks it up;
* a word-level tokenizer saved next to a Qwen2 model config (the built-in task's, as in every directory the
  pipeline writes) loads back as saved through ``AutoTokenizer`` and hcrlhf's ``load_tokenizer``.
"""

import json
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from hcrlhf.data.templates import tokenize_prompts
from hcrlhf.models.generation import NEUTRAL_SETTINGS, decoding_settings, generate, generation_config, row_seeds
from hcrlhf.models.loading import load_tokenizer, same_tokenizer, save_tokenizer, tokenizer_fingerprint
from hcrlhf.pipeline import Decoding, sample_and_score

DECODING = Decoding(max_new_tokens=40)  # the demo's decoding


@pytest.fixture(scope="module")
def tokenizer(task):
    return task.load_tokenizer()


def test_generation_config_makes_every_sampling_setting_explicit(tokenizer):
    config = generation_config(Decoding(max_new_tokens=17, temperature=0.7, top_p=0.9, top_k=5), tokenizer)
    assert (config.do_sample, config.temperature, config.top_p, config.top_k, config.max_new_tokens) == (
        True, 0.7, 0.9, 5, 17)
    assert (config.pad_token_id, config.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    settings = decoding_settings(config)
    for name, value in NEUTRAL_SETTINGS.items():
        assert settings[name] == value, name
    assert {"do_sample", "temperature", "top_p", "top_k", "max_new_tokens", "transformers_version"} <= set(settings)
    for name in ("repetition_penalty", "no_repeat_ngram_size", "min_new_tokens", "typical_p", "epsilon_cutoff",
                 "eta_cutoff"):
        assert name in settings, name


# A setting in the checkpoint's own generation config that generate() would otherwise pick up.
LEAKS = [("repetition_penalty", 1.3), ("no_repeat_ngram_size", 2), ("min_new_tokens", 25), ("min_p", 0.2),
         ("suppress_tokens", "eos")]


def _old_style_generate(policy, tokenizer, batch, seed):
    """How hcrlhf sampled before: explicit kwargs for four settings, everything else from the model's config."""
    torch.manual_seed(seed)
    return policy.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask, do_sample=True,
                           temperature=DECODING.temperature, top_p=DECODING.top_p, top_k=DECODING.top_k,
                           max_new_tokens=DECODING.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                           eos_token_id=tokenizer.eos_token_id)


@pytest.mark.parametrize("name, value", LEAKS, ids=[name for name, _ in LEAKS])
def test_the_policys_own_generation_config_changes_no_sample(task, tokenizer, name, value):
    prompts = list(task.split.safety)
    value = [tokenizer.eos_token_id] if value == "eos" else value
    plain, tuned = task.load_policy().eval(), task.load_policy().eval()
    setattr(tuned.generation_config, name, value)
    # The setting matters: sampled the old way, it changes the responses.
    batch = tokenize_prompts(tokenizer, prompts, template=task.template)
    old_plain, old_tuned = (_old_style_generate(m, tokenizer, batch, 0) for m in (plain, tuned))
    assert not torch.equal(old_plain, old_tuned)
    # Through hcrlhf's sampling (the safety test, the ground truth) it changes nothing.
    kwargs = dict(template=task.template, decoding=DECODING, batch_size=64, seed=0)
    expected, _ = sample_and_score(plain, tokenizer, prompts, **kwargs)
    got, _ = sample_and_score(tuned, tokenizer, prompts, **kwargs)
    assert got == expected
    assert getattr(tuned.generation_config, name) == value  # the model's own config is restored afterwards


def test_generate_restores_the_model_config_on_error(task, tokenizer):
    policy = task.load_policy().eval()
    own = policy.generation_config
    config = generation_config(DECODING, tokenizer)
    with pytest.raises(IndexError):  # token ids out of the embedding's range
        generate(policy, torch.full((1, 2), 10_000), torch.ones(1, 2, dtype=torch.long), config,
                 row_seeds=row_seeds(0, [0]))
    assert policy.generation_config is own


# ------------------------------------------------------------------------------------ tokenizers


def test_a_tokenizer_saved_next_to_a_qwen2_config_loads_back_as_saved(task, tokenizer, tmp_path):
    """The built-in task's word-level tokenizer next to its Qwen2 policy: transformers 5's AutoTokenizer would take
    Qwen2Tokenizer (the model type's class) and tokenize into other ids; save_tokenizer makes it load back."""
    directory = tmp_path / "policy"
    shutil.copytree(task.policy_path, directory)
    save_tokenizer(tokenizer, directory)
    texts = [task.template.format_prompt(p) for p in task.split.safety]
    expected = tokenizer(texts).input_ids
    for loaded in (AutoTokenizer.from_pretrained(directory), load_tokenizer(directory),
                   load_tokenizer(directory, trust_remote_code=True)):
        assert same_tokenizer(tokenizer, loaded), type(loaded).__name__
        assert loaded(texts).input_ids == expected
        for name in ("pad_token", "eos_token", "unk_token", "bos_token"):
            assert getattr(loaded, name) == getattr(tokenizer, name), name
    # hcrlhf's loader reads such a directory as saved even without the AutoTokenizer declaration.
    config = directory / "tokenizer_config.json"
    values = json.loads(config.read_text())
    values.pop("auto_map", None)
    config.write_text(json.dumps(values))
    assert load_tokenizer(directory)(texts).input_ids == expected


def test_tokenizer_fingerprint_tells_tokenizers_apart(tokenizer):
    fingerprint = tokenizer_fingerprint(tokenizer)
    assert same_tokenizer(fingerprint, tokenizer) and fingerprint["class"] == type(tokenizer).__name__
    assert not same_tokenizer(fingerprint, {**fingerprint, "sha256": "sha256:0"})
    assert not same_tokenizer(fingerprint, {**fingerprint, "pad_token_id": fingerprint["eos_token_id"]})
