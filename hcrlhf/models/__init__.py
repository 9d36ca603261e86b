"""Models: loading policies / reference models / tokenizers (and saving tokenizers so that they load back),
the one explicit decoding of all sampling (:mod:`hcrlhf.models.generation`), score models (reward and cost), value
models for PPO critics, and the log-probs of response tokens (:mod:`hcrlhf.models.logprobs`)."""

from hcrlhf.models.loading import (
    choose_attn_implementation,
    flash_attn_available,
    load_causal_lm,
    load_policy_and_reference,
    load_tokenizer,
    save_tokenizer,
)
from hcrlhf.models.logprobs import (
    decoder_and_head,
    is_peft_model,
    lm_loss_backward,
    response_logprobs,
    tokenize_lm_rows,
)
from hcrlhf.models.score_model import ScoreCheckpointError, ScoreModel, ScoreOutput
from hcrlhf.models.value import ValueHead, ValueModel

__all__ = [
    "choose_attn_implementation",
    "flash_attn_available",
    "load_causal_lm",
    "load_policy_and_reference",
    "load_tokenizer",
    "save_tokenizer",
    "ScoreModel",
    "ScoreOutput",
    "ScoreCheckpointError",
    "ValueModel",
    "ValueHead",
    "decoder_and_head",
    "is_peft_model",
    "response_logprobs",
    "tokenize_lm_rows",
    "lm_loss_backward",
]
