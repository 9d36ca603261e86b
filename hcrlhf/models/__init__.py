"""Models: loading policies / reference models / tokenizers, score models (reward and cost), and
value models for PPO critics."""

from hcrlhf.models.loading import (
    choose_attn_implementation,
    flash_attn_available,
    load_causal_lm,
    load_policy_and_reference,
    load_tokenizer,
)
from hcrlhf.models.score_model import ScoreModel, ScoreOutput
from hcrlhf.models.value import ValueHead, ValueModel

__all__ = [
    "choose_attn_implementation",
    "flash_attn_available",
    "load_causal_lm",
    "load_policy_and_reference",
    "load_tokenizer",
    "ScoreModel",
    "ScoreOutput",
    "ValueModel",
    "ValueHead",
]
