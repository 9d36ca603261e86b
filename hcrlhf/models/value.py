"""Value models (critics) for PPO, initialised from the reward / cost models as Safe RLHF does.

Safe RLHF starts the reward critic as a copy of the reward model and the cost critic as a copy of the
cost model: the critic is a score model whose *per-token* output is the value estimate V(s_t).
:class:`ValueModel` is that (a trainable deep copy); :class:`ValueHead` is a lighter alternative, a
linear head over another model's hidden states (e.g. the policy's), initialised from a score model's
head when the hidden sizes match.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from hcrlhf.models.score_model import ScoreModel

__all__ = ["ValueModel", "ValueHead"]


class ValueModel(nn.Module):
    """A PPO critic: per-token values from a :class:`ScoreModel`.

    Args:
        score_model: the model whose per-token scores are the values (owned by the critic).
    """

    def __init__(self, score_model: ScoreModel):
        super().__init__()
        if not isinstance(score_model, ScoreModel):
            raise TypeError(f"ValueModel: score_model must be a ScoreModel, got {type(score_model).__name__}")
        self.score_model = score_model

    @classmethod
    def from_score_model(cls, score_model: ScoreModel, *, copy_weights: bool = True) -> ValueModel:
        """A critic initialised from a reward or cost model. With ``copy_weights`` (default) the critic
        is a deep copy, so training it leaves the reward/cost model untouched; all parameters trainable."""
        critic = copy.deepcopy(score_model) if copy_weights else score_model
        critic.requires_grad_(True)
        critic.train()
        return cls(critic)

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> ValueModel:
        """A critic initialised from a saved score model (see :meth:`ScoreModel.from_pretrained`)."""
        model = ScoreModel.from_pretrained(path, **kwargs)
        model.train()
        return cls(model)

    def save_pretrained(self, path) -> None:
        self.score_model.save_pretrained(path)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Values (B, T) float32 at every position, 0 on padded positions."""
        return self.score_model(input_ids, attention_mask).scores


class ValueHead(nn.Module):
    """A linear value head over hidden states (B, T, H) → values (B, T) float32.

    Args:
        hidden_size: H.
    """

    def __init__(self, hidden_size: int):
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"ValueHead: hidden_size must be a positive int, got {hidden_size!r}")
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    @classmethod
    def from_score_model(cls, score_model: ScoreModel, hidden_size: int | None = None) -> ValueHead:
        """A head initialised with ``score_model``'s head weights (hidden sizes must match)."""
        source = score_model.head
        if hidden_size is not None and hidden_size != source.in_features:
            raise ValueError(f"ValueHead.from_score_model: hidden_size {hidden_size} differs from the score "
                             f"model's {source.in_features}; the head cannot be copied")
        head = cls(source.in_features)
        with torch.no_grad():
            head.linear.weight.copy_(source.weight.float())
            if source.bias is not None:
                head.linear.bias.copy_(source.bias.float())
        return head

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != self.linear.in_features:
            raise ValueError(f"ValueHead: hidden_states must be (B, T, {self.linear.in_features}), "
                             f"got {tuple(hidden_states.shape)}")
        values = self.linear(hidden_states.float()).squeeze(-1)
        if attention_mask is not None:
            values = values * attention_mask.to(values.dtype)
        return values
