"""Seeded per-row sampling (hcrlhf.models.generation): row seeds, the counter-based noise, the Gumbel-max
processor, and the invariance it buys.

* row_seeds: a stable hash of (seed, *key), the same in every process / Python version, checked against an
  independent hashlib computation and literal values;
* the noise: the torch int64 hash equals a plain-Python (and a numpy uint32 wrap-around) reimplementation on hand
  values, u is strictly inside (0, 1) and uniform, rows / steps / tokens / neighbouring seeds are uncorrelated,
  and the same (seed, step, token) always gives the same value;
* the processor: argmax(processor(scores)) is distributed as the exact filtered softmax (temperature, top-k,
  top-p computed by hand here), tokens cut by top-k / top-p and −inf logits are never sampled;
* invariance: with a tiny random Qwen2 (built from a config), a row's tokens do not depend on the batch it is
  generated in (split, reordered, reversed, alone); sample_and_score gives the same responses for every
  batch_size and for a shard with its prompt_indices, and leaves torch's global generator alone;
* bad input: row_seeds of the wrong type / dtype / length, unsupported sampling settings.
"""

import hashlib
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from hcrlhf.models.generation import (
    NEUTRAL_SETTINGS,
    GenerationEngine,
    HFGenerationEngine,
    SeededSamplingLogitsProcessor,
    decoding_settings,
    generate,
    generation_config,
    greedy_config,
    gumbel_noise,
    noise_bits,
    row_seeds,
    uniform_noise,
)
from hcrlhf.pipeline import Decoding, sample_and_score

M32 = 0xFFFFFFFF


# ------------------------------------------------------------------------------------ row seeds


def _encode(part) -> bytes:
    """The documented key encoding, written out again: tag, 8-byte little-endian length, payload."""
    payload = part.encode("utf-8") if isinstance(part, str) else str(part).encode("ascii")
    return (b"s" if isinstance(part, str) else b"i") + len(payload).to_bytes(8, "little") + payload


def _hashlib_seed(seed, key) -> int:
    key = key if isinstance(key, tuple) else (key,)
    digest = hashlib.blake2b(b"".join(_encode(p) for p in (seed, *key)), digest_size=8,
                             person=b"hcrlhf.rowseed").digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


KEYS = [("sample", 0), ("sample", 1), 7, ("rollout", 3, "x")]


def test_row_seeds_are_a_stable_hash_of_seed_and_key():
    seeds = row_seeds(0, KEYS)
    assert seeds.dtype == torch.int64 and seeds.shape == (4,) and seeds.device.type == "cpu"
    # Literal values: a change of the hash or the encoding changes every run's samples, so it must be seen.
    assert seeds.tolist() == [3106505174734868637, 5307450012112517502, 4430070833114723955, 3760167699732325236]
    assert seeds.tolist() == [_hashlib_seed(0, k) for k in KEYS]
    assert row_seeds(-5, [()]).tolist() == [_hashlib_seed(-5, ())] == [7234055907454338216]
    assert row_seeds(2**70, [1]).tolist() == [_hashlib_seed(2**70, 1)]
    # A row's seed depends on its own key only (not on the others or their order), ints and 1-tuples alike.
    assert row_seeds(0, KEYS[::-1]).tolist() == seeds.tolist()[::-1]
    assert row_seeds(0, [KEYS[2]]).tolist() == row_seeds(0, [(7,)]).tolist() == [seeds[2].item()]
    assert row_seeds(0, [np.int64(7)]).tolist() == [seeds[2].item()]
    # No two different keys encode alike.
    distinct = row_seeds(0, [(1, 23), (12, 3), 1, "1", (1, "2"), ("1", 2), ()]).tolist()
    assert len(set(distinct)) == len(distinct)
    assert row_seeds(1, KEYS).tolist() != seeds.tolist()
    assert row_seeds(0, []).shape == (0,)


def test_row_seeds_are_the_same_in_another_process_with_another_hash_salt():
    code = ("from hcrlhf.models.generation import row_seeds; "
            f"print(row_seeds(0, {KEYS!r}).tolist())")
    for salt in ("1", "12345"):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": salt})
        assert out.stdout.strip() == str(row_seeds(0, KEYS).tolist())


@pytest.mark.parametrize("key", [1.5, (1, 2.0), True, (None,)])
def test_row_seeds_rejects_keys_that_are_not_ints_or_strs(key):
    with pytest.raises(TypeError, match="row_seeds: key parts must be ints or strs"):
        row_seeds(0, [key])


# ------------------------------------------------------------------------------------ the noise


def _py_mix(x: int) -> int:
    """lowbias32 [16 21f0aaad 15 735a2d97 15] on Python ints (no overflow to care about)."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & M32
    x ^= x >> 15
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def _np_mix(x: np.ndarray) -> np.ndarray:
    """The same mixer as C writes it: uint32 arithmetic that wraps around."""
    x = x.astype(np.uint32)
    x ^= x >> np.uint32(16)
    x *= np.uint32(0x21F0AAAD)
    x ^= x >> np.uint32(15)
    x *= np.uint32(0x735A2D97)
    return x ^ (x >> np.uint32(15))


def _py_bits(seed: int, step: int, token: int) -> int:
    """The documented formula of noise_bits, for one (seed, step, token)."""
    lo, hi = seed & M32, (seed >> 32) & M32
    a = _py_mix(_py_mix(_py_mix(lo ^ 0x9E3779B9) ^ hi) ^ step)
    r = _py_mix(_py_mix(_py_mix(hi ^ 0x85EBCA6B) ^ lo) ^ a)
    t = _py_mix(_py_mix(token ^ 0xC2B2AE35))
    return _py_mix((((a >> 1) | 1) * t + r) & M32)


def test_the_mixer_is_uint32_arithmetic():
    values = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, M32]
    expected = [_py_mix(v) for v in values]
    assert _np_mix(np.array(values, dtype=np.uint64)).tolist() == expected
    assert expected[0] == 0 and len(set(expected)) == len(values)  # a bijection with H(0) = 0


SEEDS = [0, 1, 2**32 - 1, 2**32, 2**62 + 12345, 2**63 - 1, -1, -(2**63)]


def test_noise_bits_match_a_plain_python_reimplementation():
    seeds = torch.tensor(SEEDS, dtype=torch.int64)
    for step in (0, 1, 7, 1000, M32):
        bits = noise_bits(seeds, step, 300)
        assert bits.dtype == torch.int64 and bits.shape == (len(SEEDS), 300)
        for i, seed in enumerate(SEEDS):
            for token in (0, 1, 2, 151, 299):
                assert bits[i, token].item() == _py_bits(seed, step, token), (seed, step, token)
        assert 0 <= bits.min().item() and bits.max().item() <= M32


def _big_uniform(rows=256, steps=(0, 1, 2, 3), vocab=1000):
    seeds = row_seeds(0, [("noise", i) for i in range(rows)])
    return torch.stack([uniform_noise(seeds, step, vocab) for step in steps])  # (steps, rows, vocab)


def test_uniform_noise_is_strictly_inside_0_1_and_uniform():
    u = _big_uniform()
    n = u.numel()  # ~1M
    assert u.dtype == torch.float64
    assert 0.0 < u.min().item() and u.max().item() < 1.0
    # Mean 1/2 and variance 1/12 within 5 standard errors (sd of the mean sqrt(1/12 / n) ~ 2.9e-4).
    assert abs(u.mean().item() - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(u.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    counts = torch.histc(u, bins=64, min=0.0, max=1.0)
    assert stats.chisquare(counts.numpy()).pvalue > 1e-4
    bits = (u * 2**32 - 0.5).round().long()
    ones = torch.stack([(bits >> b) & 1 for b in range(32)]).flatten(1).double().mean(dim=1)
    assert ((ones - 0.5).abs() < 5 * 0.5 / math.sqrt(n)).all(), ones


def _corr(x: torch.Tensor, y: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([x.flatten(), y.flatten()]))[0, 1].item()


def test_noise_of_neighbouring_rows_steps_tokens_and_seeds_is_uncorrelated():
    u = _big_uniform()
    bound = 5 / math.sqrt(u[0].numel())  # 5 sd of a sample correlation of independent variables
    assert abs(_corr(u[:, :, :-1], u[:, :, 1:])) < bound  # neighbouring tokens
    assert abs(_corr(u[:, :-1], u[:, 1:])) < bound  # neighbouring rows
    assert abs(_corr(u[:-1], u[1:])) < bound  # neighbouring steps
    assert abs(_corr(u[0], u[0].flip(1))) < bound
    # Worst case for a hash: consecutive raw seeds and seeds one bit apart.
    raw = torch.arange(256, dtype=torch.int64)
    consecutive = uniform_noise(raw, 0, 1000)
    assert abs(_corr(consecutive[:-1], consecutive[1:])) < bound
    for bit in (0, 31, 32, 62):
        flipped = uniform_noise(raw ^ (1 << bit), 0, 1000)
        assert abs(_corr(consecutive, flipped)) < bound, bit
        assert (noise_bits(raw, 0, 1000) != noise_bits(raw ^ (1 << bit), 0, 1000)).double().mean() > 0.999


def test_the_same_seed_step_and_token_always_give_the_same_noise():
    seeds = row_seeds(3, range(6))
    first = noise_bits(seeds, 5, 500)
    assert torch.equal(noise_bits(seeds, 5, 500), first)
    # Each row's noise is its own: the same alone, in another order, and for a smaller vocabulary.
    assert torch.equal(noise_bits(seeds[[4]], 5, 500), first[[4]])
    assert torch.equal(noise_bits(seeds.flip(0), 5, 500), first.flip(0))
    assert torch.equal(noise_bits(seeds, 5, 37), first[:, :37])
    # Another step: other noise. Within a row, no two tokens share noise.
    assert (noise_bits(seeds, 6, 500) != first).double().mean() > 0.999
    assert all(len(set(row)) == 500 for row in first.tolist())


def test_gumbel_noise_is_minus_log_minus_log_u():
    seeds = row_seeds(0, range(64))
    g, u = gumbel_noise(seeds, 3, 2000), uniform_noise(seeds, 3, 2000)
    assert g.dtype == torch.float64 and torch.isfinite(g).all()
    torch.testing.assert_close(g, -torch.log(-torch.log(u)), rtol=1e-15, atol=1e-15)
    # Standard Gumbel: mean γ, variance π²/6 (5 standard errors).
    n = g.numel()
    assert abs(g.mean().item() - 0.5772156649) < 5 * math.sqrt(math.pi**2 / 6 / n)
    assert abs(g.var().item() - math.pi**2 / 6) < 0.05


# ------------------------------------------------------------------------------------ the processor


LOGITS = [2.0, 1.2, 0.9, 0.4, -math.inf, -0.5]


def _softmax(values):
    top = max(values)
    weights = [math.exp(v - top) for v in values]
    return [w / sum(weights) for w in weights]


def _expected(temperature, top_k, top_p):
    """The distribution do_sample=True samples from, worked out here: logits / T, keep the top_k largest, then
    drop the least likely tokens while the dropped mass (with the next one) stays within 1 − top_p."""
    scaled = [v / temperature for v in LOGITS]
    order = sorted(range(len(scaled)), key=lambda i: scaled[i], reverse=True)
    keep = [i for i in order[:top_k or len(order)] if scaled[i] > -math.inf]
    probs = dict(zip(keep, _softmax([scaled[i] for i in keep])))
    cumulative, dropped = 0.0, set()
    for i in sorted(keep, key=lambda i: probs[i]):  # least likely first
        cumulative += probs[i]
        if cumulative <= 1 - top_p and len(dropped) < len(keep) - 1:
            dropped.add(i)
    kept = [i for i in keep if i not in dropped]
    final = dict(zip(kept, _softmax([scaled[i] for i in kept])))
    return [final.get(i, 0.0) for i in range(len(LOGITS))]


CASES = [(0.7, 4, 0.9), (1.7, 0, 1.0), (1.0, 2, 1.0), (0.5, 0, 0.8)]


@pytest.mark.parametrize("temperature, top_k, top_p", CASES)
def test_argmax_of_the_processed_scores_samples_the_filtered_softmax(temperature, top_k, top_p):
    expected = _expected(temperature, top_k, top_p)
    if (temperature, top_k, top_p) == (0.7, 4, 0.9):  # the hand-worked case: top-k keeps 0-3, top-p drops 3
        assert [p > 0 for p in expected] == [True, True, True, False, False, False]
    rows, steps, prompt = 2000, 50, 3
    seeds = row_seeds(11, [("dist", i) for i in range(rows)])
    processor = SeededSamplingLogitsProcessor(seeds, prompt, temperature=temperature, top_k=top_k, top_p=top_p)
    scores = torch.tensor(LOGITS, dtype=torch.float32).expand(rows, -1)
    counts = torch.zeros(len(LOGITS), dtype=torch.long)
    for step in range(steps):
        out = processor(torch.zeros(rows, prompt + step, dtype=torch.long), scores)
        assert out.dtype == torch.float64 and out.shape == scores.shape
        counts += torch.bincount(out.argmax(dim=1), minlength=len(LOGITS))
    n = rows * steps
    support = [i for i, p in enumerate(expected) if p > 0]
    assert all(counts[i] == 0 for i in range(len(LOGITS)) if i not in support), counts  # cut / −inf: never
    # Chi-square goodness of fit over the support (n = 100,000 draws; every expected count > 5,000).
    observed = counts[support].numpy()
    test = stats.chisquare(observed, [expected[i] * n for i in support])
    assert test.pvalue > 1e-4, (counts.tolist(), [round(p * n) for p in expected])


def test_the_processor_adds_the_rows_gumbel_noise_at_the_generated_token_count():
    seeds = row_seeds(0, range(5))
    scores = torch.randn(5, 40)
    scores[:, 7] = -math.inf
    processor = SeededSamplingLogitsProcessor(seeds, 6)
    out = processor(torch.zeros(5, 6 + 3, dtype=torch.long), scores)
    assert torch.equal(out, scores.double() + gumbel_noise(seeds, 3, 40))
    assert torch.isneginf(out[:, 7]).all() and torch.isfinite(out[:, :7]).all()
    # The step is the number of generated tokens, not the (batch-dependent) padded width.
    wider = SeededSamplingLogitsProcessor(seeds, 11)
    assert torch.equal(wider(torch.zeros(5, 11 + 3, dtype=torch.long), scores), out)
    zero = SeededSamplingLogitsProcessor(seeds, 0)(torch.zeros(5, 0, dtype=torch.long), torch.zeros(5, 40))
    assert torch.equal(zero, gumbel_noise(seeds, 0, 40))


def test_the_processor_uses_hugging_faces_warpers():
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    seeds = row_seeds(0, range(4))
    scores, ids = torch.randn(4, 30), torch.zeros(4, 2, dtype=torch.long)
    warped = TopPLogitsWarper(0.8)(ids, TopKLogitsWarper(9)(ids, TemperatureLogitsWarper(0.6)(ids, scores)))
    out = SeededSamplingLogitsProcessor(seeds, 2, temperature=0.6, top_k=9, top_p=0.8)(ids, scores)
    assert torch.equal(torch.isneginf(out), torch.isneginf(warped)) and torch.isneginf(out).any()
    assert torch.equal(out, warped.double() + gumbel_noise(seeds, 0, 30))


# ------------------------------------------------------------------------------------ generate


class _Tok:
    pad_token_id, eos_token_id, bos_token_id = 0, 1, None


DEPLOY = generation_config(Decoding(max_new_tokens=14, temperature=0.8, top_p=0.95, top_k=30), _Tok)


@pytest.fixture(scope="module")
def tiny_qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return Qwen2ForCausalLM(config).eval()


def _prompts(n=9, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 64, (int(length),), generator=generator).tolist()
            for length in torch.randint(1, 8, (n,), generator=generator)]


def _left_padded(prompts):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def _responses(model, prompts, seeds, config=DEPLOY):
    """Each row's response up to and including its first EOS."""
    ids, mask = _left_padded(prompts)
    with torch.no_grad():
        out = generate(model, ids, mask, config, row_seeds=seeds)[:, ids.shape[1]:].tolist()
    return [row[:row.index(1) + 1] if 1 in row else row for row in out]


def test_a_rows_tokens_do_not_depend_on_its_batch(tiny_qwen2):
    prompts = _prompts()
    seeds = row_seeds(0, [("sample", i) for i in range(len(prompts))])
    full = _responses(tiny_qwen2, prompts, seeds)
    assert len({tuple(r) for r in full}) == len(full) and any(r[-1] == 1 for r in full)  # varied, some stop
    assert sum(r[-1] != 1 for r in full) > 0  # and some run to max_new_tokens
    split = _responses(tiny_qwen2, prompts[:3], seeds[:3]) + _responses(tiny_qwen2, prompts[3:], seeds[3:])
    assert split == full
    reversed_ = _responses(tiny_qwen2, prompts[::-1], seeds.flip(0))
    assert reversed_[::-1] == full
    order = [4, 0, 8, 2, 6, 1, 7, 3, 5]
    assert _responses(tiny_qwen2, [prompts[i] for i in order], seeds[order]) == [full[i] for i in order]
    for i in (0, 5):
        assert _responses(tiny_qwen2, [prompts[i]], seeds[[i]]) == [full[i]]
    # The same prompt twice with two seeds: two draws; another run seed: other responses.
    twice = _responses(tiny_qwen2, [prompts[0], prompts[0]], row_seeds(0, [("a",), ("b",)]))
    assert twice[0] != twice[1]
    other = _responses(tiny_qwen2, prompts, row_seeds(1, [("sample", i) for i in range(len(prompts))]))
    assert sum(a != b for a, b in zip(other, full)) >= len(full) - 1


def test_generate_uses_no_global_generator_and_leaves_the_config_alone(tiny_qwen2):
    prompts, seeds = _prompts(4), row_seeds(0, range(4))
    before = decoding_settings(DEPLOY)
    torch.manual_seed(1)
    first = _responses(tiny_qwen2, prompts, seeds)
    state = torch.random.get_rng_state()
    torch.manual_seed(2)
    torch.rand(5)
    assert _responses(tiny_qwen2, prompts, seeds) == first
    torch.manual_seed(1)
    _responses(tiny_qwen2, prompts, seeds)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert decoding_settings(DEPLOY) == before and DEPLOY.do_sample is True


def test_the_greedy_config_keeps_every_neutral_setting_and_draws_no_warning():
    greedy = greedy_config(DEPLOY)
    greedy.validate(strict=True)  # raises on any "set only for sampling" issue Hugging Face would warn about
    settings = decoding_settings(greedy)
    assert settings["do_sample"] is False and (settings["temperature"], settings["top_p"]) == (1.0, 1.0)
    for name, value in NEUTRAL_SETTINGS.items():
        assert settings[name] == value, name
    for name in ("max_new_tokens", "pad_token_id", "eos_token_id"):
        assert settings[name] == decoding_settings(DEPLOY)[name], name


def test_a_greedy_deployment_config_decodes_greedily(tiny_qwen2):
    greedy = greedy_config(DEPLOY)
    prompts = _prompts(3)
    ids, mask = _left_padded(prompts)
    expected = tiny_qwen2.generate(input_ids=ids, attention_mask=mask, generation_config=greedy)
    assert torch.equal(generate(tiny_qwen2, ids, mask, greedy, row_seeds=row_seeds(0, range(3))), expected)


def test_generate_hands_over_to_the_engine(tiny_qwen2):
    calls = []

    class Recorder:
        def generate(self, model, input_ids, attention_mask, config, row_seeds):
            calls.append((model, input_ids, attention_mask, config, row_seeds))
            return input_ids

    ids, mask = _left_padded(_prompts(2))
    seeds = row_seeds(0, range(2))
    assert isinstance(Recorder(), GenerationEngine) and isinstance(HFGenerationEngine(), GenerationEngine)
    assert generate(tiny_qwen2, ids, mask, DEPLOY, row_seeds=seeds, engine=Recorder()) is ids
    assert calls == [(tiny_qwen2, ids, mask, DEPLOY, seeds)]


# ------------------------------------------------------------------------------------ sample_and_score


@pytest.fixture(scope="module")
def tokenizer(task):
    return task.load_tokenizer()


def test_sample_and_score_is_batch_size_and_shard_invariant(task, tokenizer):
    prompts = list(task.split.safety)[:10]
    policy = task.load_policy().eval()
    kwargs = dict(template=task.template, decoding=Decoding(max_new_tokens=12, temperature=1.3), seed=4)
    state = torch.random.get_rng_state()
    full, _ = sample_and_score(policy, tokenizer, prompts, batch_size=8, **kwargs)
    assert torch.equal(torch.random.get_rng_state(), state)  # the global generator is left alone
    assert len(set(full)) > 1
    for batch_size in (1, 3):
        assert sample_and_score(policy, tokenizer, prompts, batch_size=batch_size, **kwargs)[0] == full, batch_size
    k = 4
    shard, _ = sample_and_score(policy, tokenizer, prompts[k:], prompt_indices=range(k, len(prompts)), batch_size=3,
                                **kwargs)
    assert shard == full[k:]
    # Without the indices, the shard's prompts get the seeds of rows 0.. : other draws (the test can fail).
    unindexed, _ = sample_and_score(policy, tokenizer, prompts[k:], batch_size=3, **kwargs)
    assert unindexed != full[k:]
    # The same prompt at two indices gets two draws; another seed, other responses.
    again, _ = sample_and_score(policy, tokenizer, [prompts[0]] * 6, batch_size=6, **kwargs)
    assert len(set(again)) > 1
    other, _ = sample_and_score(policy, tokenizer, prompts, batch_size=8, **{**kwargs, "seed": 5})
    assert other != full


# ------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("seeds, error, message", [
    (torch.zeros(3, dtype=torch.int64), ValueError, r"row_seeds must have shape \(2,\)"),
    (torch.zeros(2, 1, dtype=torch.int64), ValueError, r"row_seeds must have shape \(2,\)"),
    (torch.zeros(2, dtype=torch.int32), TypeError, "row_seeds must be int64"),
    (torch.zeros(2), TypeError, "row_seeds must be int64"),
    ([1, 2], TypeError, "row_seeds must be an int64 torch.Tensor"),
])
def test_generate_rejects_bad_row_seeds(tiny_qwen2, seeds, error, message):
    ids, mask = _left_padded(_prompts(2))
    with pytest.raises(error, match=message):
        generate(tiny_qwen2, ids, mask, DEPLOY, row_seeds=seeds)


def test_generate_needs_row_seeds(tiny_qwen2):
    ids, mask = _left_padded(_prompts(2))
    with pytest.raises(TypeError, match="row_seeds"):
        generate(tiny_qwen2, ids, mask, DEPLOY)


@pytest.mark.parametrize("name, value", [("min_p", 0.1), ("typical_p", 0.9), ("epsilon_cutoff", 0.01),
                                         ("eta_cutoff", 0.01), ("num_return_sequences", 2), ("top_k", None)])
def test_generate_rejects_sampling_settings_it_would_not_reproduce(tiny_qwen2, name, value):
    import copy

    config = copy.deepcopy(DEPLOY)
    setattr(config, name, value)
    ids, mask = _left_padded(_prompts(2))
    with pytest.raises(ValueError, match=f"generate: config.{name}"):
        generate(tiny_qwen2, ids, mask, config, row_seeds=row_seeds(0, range(2)))


def test_noise_functions_reject_bad_arguments():
    with pytest.raises(ValueError, match="step must be an int"):
        noise_bits(row_seeds(0, [1]), -1, 10)
    with pytest.raises(TypeError, match="row_seeds must be int64"):
        uniform_noise(torch.zeros(2, dtype=torch.int32), 0, 10)
    with pytest.raises(ValueError, match="scores must have shape"):
        SeededSamplingLogitsProcessor(row_seeds(0, [1]), 0)(torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 5))


def test_sample_and_score_rejects_prompt_indices_of_another_length(task, tokenizer):
    with pytest.raises(ValueError, match="prompt_indices has 2 entries for 3 prompts"):
        sample_and_score(task.load_policy(), tokenizer, ["a", "b", "c"], template=task.template,
                         decoding=Decoding(max_new_tokens=2), prompt_indices=[0, 1])


@pytest.mark.parametrize("tile", [1, 7, 64, 10_000])
def test_the_noise_does_not_depend_on_the_tiling(monkeypatch, tile):
    from hcrlhf.models import generation

    seeds, scores, ids = row_seeds(0, range(6)), torch.randn(6, 333), torch.zeros(6, 5, dtype=torch.long)
    processor = SeededSamplingLogitsProcessor(seeds, 2, temperature=0.9)
    expected, noise = processor(ids, scores), gumbel_noise(seeds, 3, 333)
    monkeypatch.setitem(generation._TILE, "cpu", tile)
    assert torch.equal(processor(ids, scores), expected)
    assert torch.equal(gumbel_noise(seeds, 3, 333), noise)
