"""One explicit decoding for every sampling hcrlhf does (RL rollouts, the safety test, the ground truth),
and for the candidate's saved ``generation_config.json``; sampled with per-row seeded noise, so that a prompt's
response depends on its seed and not on the batch (or the process) it is generated in.

Hugging Face ``generate`` fills every setting it is not given from the model's own ``generation_config``
(a ``repetition_penalty``, ``no_repeat_ngram_size``, ``min_new_tokens``, ``suppress_tokens`` or ``top_k`` shipped
with a checkpoint), and a plain ``generate()`` on a directory decodes with whatever its
``generation_config.json`` says (greedily, when it says nothing). So:

* :func:`generation_config` builds one :class:`transformers.GenerationConfig` from the four settings hcrlhf
  exposes (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``) with **every other setting that changes
  the sampled tokens set to its neutral value** and pad / EOS from the tokenizer. It is the *distribution*
  sampled from (ancestral sampling, ``do_sample=True``);
* :func:`generate` samples from it with the model's own generation config replaced for the call, so nothing is
  inherited from the checkpoint (settings whose only neutral value is None, such as ``suppress_tokens`` or
  ``min_p``, included);
* :func:`decoding_settings` is the record of a config: every explicit setting, for the report;
* written as the candidate's ``generation_config.json``, the same config makes a plain ``generate()`` on the
  returned model sample from the distribution the safety test sampled from (with torch's global generator,
  so not the same draws).

**Why seeded per-row noise.** ``do_sample=True`` draws every token with ``torch.multinomial`` from torch's
global generator: the draws of a row depend on how many rows came before it in the batch, on earlier batches
and on what else used the generator, so the same prompt gets another response in another batch, with another
``batch_size`` or on another rank of a multi-process run. :func:`generate` instead takes one 63-bit seed per
row (:func:`row_seeds`: a stable hash of a run seed and a key such as the prompt's index in the full list) and
samples by the Gumbel-max trick: ``argmax(filtered logits + g)`` with ``g = −log(−log u)``, u uniform on (0, 1), is
an exact sample from ``softmax(filtered logits)``, and here u is a counter-based hash of (row seed, number of
tokens generated so far, token id) (:func:`noise_bits`), not a draw from a generator. So a row's
tokens are a function of its prompt, its seed and the model only: the same in any batch, batch size, order or
process, up to floating-point ties (the model's logits of one row may differ in the last bits between batch
layouts, and an argmax flips only where two perturbed logits are that close). :class:`HFGenerationEngine` runs
this as Hugging Face *greedy* decoding with :class:`SeededSamplingLogitsProcessor` (Hugging Face's own
temperature / top-k / top-p warpers, then the noise); :class:`GenerationEngine` is the seam for other engines.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import operator
from typing import Protocol, runtime_checkable

import torch

__all__ = [  # noqa: F822 - SeededSamplingLogitsProcessor is defined on first access (module __getattr__)
    "generation_config", "generate", "own_generation_config", "decoding_settings", "NEUTRAL_SETTINGS", "row_seeds",
    "noise_bits", "uniform_noise", "gumbel_noise", "SeededSamplingLogitsProcessor", "GenerationEngine",
    "HFGenerationEngine", "greedy_config", "sampling_settings",
]

#: Settings that change the sampled tokens, at the value that leaves sampling from softmax(logits / T)
#: (then top-k / top-p) untouched. Settings whose neutral value is None (bad_words_ids, suppress_tokens,
#: begin_suppress_tokens, sequence_bias, forced_bos/eos_token_id, exponential_decay_length_penalty, min_p,
#: top_h, max_time, stop_strings, watermarking_config, ...) stay None: :func:`generate` keeps the model's own
#: values of those from being filled in.
NEUTRAL_SETTINGS = {
    "num_beams": 1,
    "num_return_sequences": 1,
    "min_new_tokens": 0,  # min_length stays None (its global default, 0): setting both draws a warning
    "repetition_penalty": 1.0,
    "encoder_repetition_penalty": 1.0,
    "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0,
    "typical_p": 1.0,
    "epsilon_cutoff": 0.0,
    "eta_cutoff": 0.0,
    "guidance_scale": 1.0,
    "renormalize_logits": False,
    "remove_invalid_values": False,
    "use_cache": True,
}


def generation_config(decoding, tokenizer):
    """The explicit :class:`transformers.GenerationConfig` of ``decoding``.

    Args:
        decoding: anything with ``max_new_tokens``, ``temperature``, ``top_p`` and ``top_k`` (a
            :class:`hcrlhf.pipeline.Decoding`, a :class:`hcrlhf.train.SafeRLConfig`).
        tokenizer: gives ``pad_token_id`` and ``eos_token_id`` (and ``bos_token_id``).

    Returns:
        ancestral sampling (``do_sample=True``) from softmax(logits / temperature), cut to the ``top_k`` most
        likely tokens (0: off) and the ``top_p`` nucleus (1.0: off), at most ``max_new_tokens`` tokens, stopping
        at EOS; every other setting that changes the tokens at its neutral value (:data:`NEUTRAL_SETTINGS`).
    """
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, temperature=float(decoding.temperature), top_p=float(decoding.top_p),
        top_k=int(decoding.top_k), max_new_tokens=int(decoding.max_new_tokens), **NEUTRAL_SETTINGS,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
    )


def _generating_model(model):
    """The Hugging Face model whose ``generate`` runs (a peft wrapper hands over to its base model)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def own_generation_config(model, config):
    """``model.generation_config`` is ``config`` inside the block (and restored after): ``generate`` then has
    nothing of the checkpoint's own generation config to fill unset settings from."""
    target = _generating_model(model)
    saved = target.generation_config
    target.generation_config = copy.deepcopy(config)
    try:
        yield
    finally:
        target.generation_config = saved


# ------------------------------------------------------------------------------------------- row seeds

_SEED_MASK = (1 << 63) - 1


def _key_part(fn: str, part) -> bytes:
    """One key part as tagged, length-prefixed bytes: ints as signed decimal, strs as UTF-8, so that no two
    different keys encode alike ((1, 23) vs (12, 3), 1 vs "1")."""
    if isinstance(part, str):
        tag, payload = b"s", part.encode("utf-8")
    elif isinstance(part, bool):
        raise TypeError(f"{fn}: key parts must be ints or strs, got the bool {part!r}")
    else:
        try:
            value = operator.index(part)
        except TypeError:
            raise TypeError(f"{fn}: key parts must be ints or strs, got {type(part).__name__}") from None
        tag, payload = b"i", str(value).encode("ascii")
    return tag + len(payload).to_bytes(8, "little") + payload


def row_seeds(seed: int, keys) -> torch.Tensor:
    """One 63-bit seed per row: row i's seed is a stable hash of ``(seed, *keys[i])``.

    The hash is BLAKE2b (8-byte digest, personalised with ``b"hcrlhf.rowseed"``) of the parts encoded as tagged,
    length-prefixed bytes (ints in signed decimal, strs in UTF-8), masked to 63 bits. So the same ``(seed, key)``
    gives the same seed on every machine, platform, process and Python version (unlike ``hash()``, which is
    salted per process for strs), and it does not depend on the other keys or their order.

    Args:
        seed: the run's seed (any int).
        keys: one key per row; a key is an int or a tuple / list of ints and strs, e.g. ``("sample", i)`` for
            the i-th prompt of a list.

    Returns:
        int64 (B,) CPU tensor of non-negative seeds, ``len(keys)`` of them.

    Equivalent naive code::

        torch.tensor([int.from_bytes(hashlib.blake2b(encode((seed, *key)), digest_size=8,
                                                     person=b"hcrlhf.rowseed").digest(), "little") & (2**63 - 1)
                      for key in keys])
    """
    fn = "row_seeds"
    head = _key_part(fn, seed)
    out = []
    for key in keys:
        parts = tuple(key) if isinstance(key, (tuple, list)) else (key,)
        digest = hashlib.blake2b(head + b"".join(_key_part(fn, p) for p in parts), digest_size=8,
                                 person=b"hcrlhf.rowseed").digest()
        out.append(int.from_bytes(digest, "little") & _SEED_MASK)
    return torch.tensor(out, dtype=torch.int64)


def _check_row_seeds(fn: str, seeds, rows: int | None = None) -> torch.Tensor:
    """``seeds`` as one int64 seed per row, (rows,) (any length when ``rows`` is None)."""
    expected = f"({'B' if rows is None else rows},)"
    if not isinstance(seeds, torch.Tensor):
        raise TypeError(f"{fn}: row_seeds must be an int64 torch.Tensor of shape {expected} "
                        f"(hcrlhf.models.generation.row_seeds), got {type(seeds).__name__}")
    if seeds.dtype != torch.int64:
        raise TypeError(f"{fn}: row_seeds must be int64 (hcrlhf.models.generation.row_seeds), got {seeds.dtype}")
    if seeds.dim() != 1 or (rows is not None and seeds.shape[0] != rows):
        raise ValueError(f"{fn}: row_seeds must have shape {expected}, one seed per row"
                         f"{'' if rows is None else ' of input_ids'}, got {tuple(seeds.shape)}")
    return seeds


# ------------------------------------------------------------------------------ counter-based noise
#
# All of it is uint32 arithmetic held in int64 tensors, every value in [0, 2^32). The mixer is Chris Wellons'
# two-round "lowbias32" [16 21f0aaad 15 735a2d97 15] (hash-prospector, issue 19: avalanche bias 0.107), a
# bijection of the 32-bit words. Both its multipliers, and the per-(row, step) multiplier below, are below 2^31,
# so every product is (< 2^32) × (< 2^31) < 2^63 and the affine step a·t + r is at most
# (2^32 − 1)·(2^31 − 1) + 2^32 − 1 = (2^32 − 1)·2^31 < 2^63: nothing overflows int64 (no wrap-around is relied
# on), and masking with 2^32 − 1 gives exactly the wrap-around product of C's uint32 arithmetic.

_M32 = 0xFFFFFFFF
_MIX = (16, 0x21F0AAAD, 15, 0x735A2D97, 15)
_ROW_A, _ROW_R, _TOKEN = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35  # domain constants: the three keys never share inputs
# The (B, V) noise is made in tiles of whole rows' column ranges, of about this many elements. CPU: 512 KiB per
# int64 buffer, so that its ~20 elementwise passes run in cache (measured ~2x faster than whole (B, V) passes at
# B=64, V=151,936). Elsewhere: one tile (one kernel per pass) up to 2^24 elements, which only caps the two int64
# temporaries at 128 MiB each for large B·V. Every element gets the same operations either way.
_TILE = {"cpu": 1 << 16}
_DEVICE_TILE = 1 << 24


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 of a tensor of uint32 values held in int64 (new tensor)."""
    s1, c1, s2, c2, s3 = _MIX
    x = x ^ (x >> s1)
    x = (x * c1) & _M32
    x = x ^ (x >> s2)
    x = (x * c2) & _M32
    return x ^ (x >> s3)


def _mix32_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """:func:`_mix32` in place (``scratch``: an int64 buffer of x's shape)."""
    s1, c1, s2, c2, s3 = _MIX
    x.bitwise_xor_(torch.bitwise_right_shift(x, s1, out=scratch))
    x.mul_(c1).bitwise_and_(_M32)
    x.bitwise_xor_(torch.bitwise_right_shift(x, s2, out=scratch))
    x.mul_(c2).bitwise_and_(_M32)
    return x.bitwise_xor_(torch.bitwise_right_shift(x, s3, out=scratch))


def _row_state(seeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The step-independent part of each row's key: two 32-bit words from the seed's two halves."""
    lo, hi = seeds & _M32, (seeds >> 32) & _M32
    return _mix32(_mix32(lo ^ _ROW_A) ^ hi), _mix32(_mix32(hi ^ _ROW_R) ^ lo)


def _step_keys(state: tuple[torch.Tensor, torch.Tensor], step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(multiplier, offset) of each row at ``step``: an odd multiplier below 2^31 and a 32-bit offset (together
    62 bits: two (row, step) keys give the same noise only if both match)."""
    a = _mix32(state[0] ^ step)
    return (a >> 1) | 1, _mix32(state[1] ^ a)


def _token_keys(vocab_size: int, device) -> torch.Tensor:
    """A distinct, well-mixed 32-bit word per token id (mixing twice: ids are small, consecutive ints)."""
    return _mix32(_mix32(torch.arange(vocab_size, dtype=torch.int64, device=device) ^ _TOKEN))


def _tile_bits_(tokens: torch.Tensor, mult: torch.Tensor, offset: torch.Tensor):
    """The 32 noise bits of a (rows, tokens) tile, and a scratch buffer of its shape."""
    x = tokens[None, :] * mult[:, None]  # < 2^32 · 2^31
    x.add_(offset[:, None]).bitwise_and_(_M32)
    scratch = torch.empty_like(x)
    return _mix32_(x, scratch), scratch


def _check_step(fn: str, step) -> int:
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= _M32:
        raise ValueError(f"{fn}: step must be an int in [0, 2^32), got {step!r}")
    return step


def noise_bits(row_seeds: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
    """The 32 random bits of every (row, token) at ``step``: int64 (B, V) in [0, 2^32), on row_seeds' device.

    A counter-based hash (nothing is drawn from a generator): with ``H`` the lowbias32 mixer on 32-bit words,
    ``lo, hi`` the halves of the row seed, ``a = H(H(H(lo ^ A) ^ hi) ^ step)``, ``r = H(H(H(hi ^ R) ^ lo) ^ a)``
    and ``t_v = H(H(v ^ T))``::

        bits[i, v] = H(((a >> 1 | 1) * t_v + r) mod 2^32)

    Within a row and step, v ↦ bits is injective (no two tokens share noise); across rows and steps the
    (multiplier, offset) pair is 62 bits.
    """
    fn = "noise_bits"
    seeds = _check_row_seeds(fn, row_seeds)
    mult, offset = _step_keys(_row_state(seeds), _check_step(fn, step))
    return _tile_bits_(_token_keys(int(vocab_size), seeds.device), mult, offset)[0]


def uniform_noise(row_seeds: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
    """u = (bits + 1/2) / 2^32 (:func:`noise_bits`): float64 (B, V), strictly inside (0, 1), in [2^-33, 1 − 2^-33];
    exact (33 significant bits fit float64's 53)."""
    return (noise_bits(row_seeds, step, vocab_size).double() + 0.5) * 2.0 ** -32  # int64 + float would be float32


def _add_gumbel(scores: torch.Tensor, mult: torch.Tensor, offset: torch.Tensor, tokens: torch.Tensor):
    """``scores + g`` in float64, g = −log(−log u) of :func:`uniform_noise` (same operations, tile by tile).

    float64 because u near 1 needs all of its 33 significant bits (in float32, u = 1 − 2^-33 rounds to 1 and g
    to +inf; the largest g are exactly the ones that pick the token), and so that the sum adds no rounding ties
    to float32 logits. −inf + g = −inf (g is always finite: g ∈ [−log(33 ln 2), 33 ln 2] ≈ [−3.13, 22.87])."""
    rows, vocab = scores.shape
    out = torch.empty((rows, vocab), dtype=torch.float64, device=scores.device)
    width = max(1, _TILE.get(scores.device.type, _DEVICE_TILE) // max(rows, 1))
    for start in range(0, vocab, width):
        bits, scratch = _tile_bits_(tokens[start:start + width], mult, offset)
        g = scratch.view(torch.float64)  # the int64 scratch buffer, reused: same size
        # copy_ first: int64 + 0.5 would be computed in float32 (the default dtype), losing the low bits.
        g.copy_(bits).add_(0.5).mul_(2.0 ** -32).log_().neg_().log_().neg_()
        torch.add(g, scores[:, start:start + width], out=out[:, start:start + width])
    return out


def gumbel_noise(row_seeds: torch.Tensor, step: int, vocab_size: int) -> torch.Tensor:
    """g = −log(−log u) of :func:`uniform_noise`: float64 (B, V) standard Gumbel noise, the noise
    :class:`SeededSamplingLogitsProcessor` adds at ``step``."""
    fn = "gumbel_noise"
    seeds = _check_row_seeds(fn, row_seeds)
    mult, offset = _step_keys(_row_state(seeds), _check_step(fn, step))
    zeros = torch.zeros(seeds.shape[0], int(vocab_size), device=seeds.device)
    return _add_gumbel(zeros, mult, offset, _token_keys(int(vocab_size), seeds.device))


# ------------------------------------------------------------------------------------ the sampler


def sampling_settings(config) -> dict:
    """``temperature``, ``top_k`` and ``top_p`` of a sampling (``do_sample=True``) config, checked: the settings
    :class:`SeededSamplingLogitsProcessor` reproduces. A sampling-only setting it does not reproduce (``min_p``,
    ``top_h``, ``typical_p``, ``epsilon_cutoff``, ``eta_cutoff``, watermarking) and more than one sequence per
    row (beams, ``num_return_sequences``) raise ValueError rather than sample another distribution."""
    fn = "generate"
    for name in ("temperature", "top_k", "top_p"):
        if getattr(config, name, None) is None:
            raise ValueError(f"{fn}: config.{name} must be set explicitly (hcrlhf.models.generation_config), got None")
    unsupported = {
        "min_p": config.min_p is not None, "top_h": getattr(config, "top_h", None) is not None,
        "typical_p": config.typical_p is not None and config.typical_p < 1.0,
        "epsilon_cutoff": config.epsilon_cutoff is not None and 0.0 < config.epsilon_cutoff < 1.0,
        "eta_cutoff": config.eta_cutoff is not None and 0.0 < config.eta_cutoff < 1.0,
        "watermarking_config": getattr(config, "watermarking_config", None) is not None,
        "num_beams": config.num_beams not in (None, 1),
        "num_return_sequences": config.num_return_sequences not in (None, 1),
    }
    for name, bad in unsupported.items():
        if bad:
            raise ValueError(f"{fn}: config.{name}={getattr(config, name)!r} is not supported by seeded sampling "
                             "(supported: temperature, top_k, top_p; one sequence per row)")
    return {"temperature": float(config.temperature), "top_k": int(config.top_k), "top_p": float(config.top_p)}


@functools.cache
def _processor_class():
    """:class:`SeededSamplingLogitsProcessor`, defined on first use: a subclass of transformers' LogitsProcessor,
    and transformers is imported lazily throughout hcrlhf."""
    from transformers import LogitsProcessor

    class SeededSamplingLogitsProcessor(LogitsProcessor):
        """Turns Hugging Face *greedy* decoding into exact ancestral sampling with per-row seeded noise.

        Each call maps scores (B, V) to ``warped + g`` (float64), where ``warped`` is Hugging Face's own
        ``TemperatureLogitsWarper`` (when temperature ≠ 1), ``TopKLogitsWarper`` (top_k > 0) and ``TopPLogitsWarper``
        (top_p < 1), in the order and with the arguments ``do_sample=True`` uses, and ``g`` is
        :func:`gumbel_noise` of the row seeds at ``step = input_ids.shape[1] − prompt_length`` (tokens generated so
        far: independent of the batch's padded prompt width). Greedy decoding's argmax of that is an exact sample
        from softmax(warped) (the Gumbel-max trick); −inf stays −inf, so a token cut by top-k / top-p is never picked.

        Vectorised integer ops on the scores' device (no per-row loop, no generator, no host sync); the step-
        independent row keys and the token keys are made once per device.

        Equivalent naive code::

            warped = top_p(top_k(scores / temperature))
            u = (noise_bits(row_seeds, step, V) + 0.5) / 2**32
            return warped.double() - torch.log(-torch.log(u))
        """

        def __init__(self, row_seeds: torch.Tensor, prompt_length: int, *, temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0):
            from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

            fn = "SeededSamplingLogitsProcessor"
            seeds = _check_row_seeds(fn, row_seeds)
            if isinstance(prompt_length, bool) or not isinstance(prompt_length, int) or prompt_length < 0:
                raise ValueError(f"{fn}: prompt_length must be a non-negative int, got {prompt_length!r}")
            self.prompt_length = prompt_length
            self.rows = seeds.shape[0]
            # Hugging Face's warpers, as _get_logits_processor builds them for do_sample=True and one beam.
            self.warpers = []
            if temperature != 1.0:
                self.warpers.append(TemperatureLogitsWarper(float(temperature)))
            if top_k != 0:
                self.warpers.append(TopKLogitsWarper(top_k=int(top_k), min_tokens_to_keep=1))
            if top_p < 1.0:
                self.warpers.append(TopPLogitsWarper(top_p=float(top_p), min_tokens_to_keep=1))
            self._state = _row_state(seeds)
            self._on_device: dict = {}

        @classmethod
        def from_config(cls, config, row_seeds: torch.Tensor, prompt_length: int):
            """The processor of a sampling GenerationConfig (:func:`sampling_settings`)."""
            return cls(row_seeds, prompt_length, **sampling_settings(config))

        def _keys(self, device, vocab_size: int):
            state = self._on_device.get(device)
            if state is None:
                state = self._on_device[device] = tuple(s.to(device) for s in self._state)
            tokens = self._on_device.get((device, vocab_size))
            if tokens is None:
                tokens = self._on_device[(device, vocab_size)] = _token_keys(vocab_size, device)
            return state, tokens

        def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
            if scores.dim() != 2 or scores.shape[0] != self.rows:
                raise ValueError(f"SeededSamplingLogitsProcessor: scores must have shape ({self.rows}, V), one row per "
                                 f"row seed, got {tuple(scores.shape)}")
            step = input_ids.shape[1] - self.prompt_length
            for warper in self.warpers:
                scores = warper(input_ids, scores)
            state, tokens = self._keys(scores.device, scores.shape[1])
            mult, offset = _step_keys(state, _check_step("SeededSamplingLogitsProcessor", step))
            return _add_gumbel(scores, mult, offset, tokens)

    SeededSamplingLogitsProcessor.__module__ = __name__
    SeededSamplingLogitsProcessor.__qualname__ = "SeededSamplingLogitsProcessor"
    return SeededSamplingLogitsProcessor


def __getattr__(name):
    if name == "SeededSamplingLogitsProcessor":
        return _processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def greedy_config(config):
    """``config`` as Hugging Face greedy decoding: ``do_sample=False`` with temperature / top_p at their neutral
    1.0 and top_k unset (Hugging Face warns about any other value of these in greedy mode), every other setting
    (:data:`NEUTRAL_SETTINGS`, lengths, pad / EOS) as in ``config``."""
    greedy = copy.deepcopy(config)
    greedy.do_sample, greedy.temperature, greedy.top_p, greedy.top_k = False, 1.0, 1.0, None
    return greedy


@runtime_checkable
class GenerationEngine(Protocol):
    """How :func:`generate` samples (the seam for other engines, e.g. vLLM on GPUs).

    ``generate(model, input_ids, attention_mask, config, row_seeds)`` gets left-padded prompts (B, P), the
    deployment ``config`` (:func:`generation_config`: the distribution) and one int64 seed per row (B,), and
    returns prompt + response ids (B, P + T) like Hugging Face's ``generate``. Contract: row i's response is a
    sample from ``config``'s distribution whose randomness is a function of ``row_seeds[i]`` alone (no global
    generator), so it does not depend on the batch. Different engines need not give the same tokens for a seed.
    """

    def generate(self, model, input_ids: torch.Tensor, attention_mask: torch.Tensor, config,
                 row_seeds: torch.Tensor) -> torch.Tensor: ...


class HFGenerationEngine:
    """The default engine: Hugging Face ``generate``, greedily (:func:`greedy_config`), with
    :class:`SeededSamplingLogitsProcessor` doing the sampling, and the model's own generation config set aside
    for the call (:func:`own_generation_config`)."""

    def generate(self, model, input_ids, attention_mask, config, row_seeds):
        from transformers import LogitsProcessorList

        greedy = greedy_config(config)
        processors = LogitsProcessorList()
        if config.do_sample:
            processors.append(_processor_class().from_config(config, row_seeds, input_ids.shape[1]))
        with own_generation_config(model, greedy):
            return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=greedy,
                                  logits_processor=processors)


def generate(model, input_ids, attention_mask, config, *, row_seeds: torch.Tensor,
             engine: GenerationEngine | None = None) -> torch.Tensor:
    """Sample from exactly ``config`` (see :func:`generation_config`) with one seed per row.

    Args:
        model: a Hugging Face causal LM (or a peft wrapper of one).
        input_ids, attention_mask: (B, P) left-padded prompts.
        config: the deployment GenerationConfig (the distribution; a greedy one, ``do_sample=False``, decodes
            greedily and ignores the seeds).
        row_seeds: int64 (B,) tensor, one seed per row (:func:`row_seeds`); row i's response depends on it and on
            row i's prompt only, not on the other rows, the batch size or the process.
        engine: a :class:`GenerationEngine` (default :class:`HFGenerationEngine`).

    Returns:
        (B, P + T) prompt + response ids; nothing of the model's own generation config is inherited.
    """
    fn = "generate"
    seeds = _check_row_seeds(fn, row_seeds, input_ids.shape[0])
    if config.do_sample:
        sampling_settings(config)
    engine = HFGenerationEngine() if engine is None else engine
    return engine.generate(model, input_ids, attention_mask, config, seeds)


def decoding_settings(config) -> dict:
    """Every explicit setting of a generation config (None-valued, i.e. off, settings left out), with the
    transformers version whose defaults apply to anything else."""
    values = config.to_dict()
    out = {k: v for k, v in sorted(values.items()) if v is not None and not k.startswith("_")
           and k != "transformers_version"}
    import transformers

    out["transformers_version"] = transformers.__version__
    return out
