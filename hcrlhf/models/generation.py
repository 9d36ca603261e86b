"""One explicit decoding for every sampling hcrlhf does (RL rollouts, the safety test, the ground truth),
and for the candidate's saved ``generation_config.json``.

Hugging Face ``generate`` fills every setting it is not given from the model's own ``generation_config``
(a ``repetition_penalty``, ``no_repeat_ngram_size``, ``min_new_tokens``, ``suppress_tokens`` or ``top_k`` shipped
with a checkpoint), and a plain ``generate()`` on a directory decodes with whatever its
``generation_config.json`` says (greedily, when it says nothing). So:

* :func:`generation_config` builds one :class:`transformers.GenerationConfig` from the four settings hcrlhf
  exposes (``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``) with **every other setting that changes
  the sampled tokens set to its neutral value** and pad / EOS from the tokenizer;
* :func:`generate` runs ``model.generate`` with that config *and* with the model's own generation config
  replaced by it for the call, so nothing is inherited from the checkpoint (settings whose only neutral value
  is None, such as ``suppress_tokens`` or ``min_p``, included);
* :func:`decoding_settings` is the record of a config: every explicit setting, for the report;
* written as the candidate's ``generation_config.json``, the same config makes a plain ``generate()`` on the
  returned model sample the way the safety test sampled.
"""

from __future__ import annotations

import contextlib
import copy

__all__ = ["generation_config", "generate", "own_generation_config", "decoding_settings", "NEUTRAL_SETTINGS"]

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


def generate(model, input_ids, attention_mask, config):
    """``model.generate`` with exactly ``config`` (see :func:`generation_config`): the model's own generation
    config is set aside for the call, so no setting is inherited from the checkpoint."""
    with own_generation_config(model, config):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)


def decoding_settings(config) -> dict:
    """Every explicit setting of a generation config (None-valued, i.e. off, settings left out), with the
    transformers version whose defaults apply to anything else."""
    values = config.to_dict()
    out = {k: v for k, v in sorted(values.items()) if v is not None and not k.startswith("_")
           and k != "transformers_version"}
    import transformers

    out["transformers_version"] = transformers.__version__
    return out
