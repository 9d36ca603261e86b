"""Score models (reward and cost models): a transformer backbone and a linear head.

See docs/method.md#reward-and-cost-models for how they are trained and used.

The head maps each position's last hidden state to one number; the model's score of a sequence is the
value at its *last non-pad token* (``end_index``, see :func:`hcrlhf.data.end_indices`), which works for
right and left padding alike. Position ids are computed from the attention mask, so a left-padded row
gets the same positions, and hence the same score, as the same row right-padded.

Two layouts:

* ``kind="backbone"``: any Hugging Face base model (``AutoModel``) + our ``nn.Linear(hidden, 1)`` head,
  saved as the backbone's own ``save_pretrained`` files plus ``score_head.safetensors`` and
  ``hcrlhf_score_config.json``;
* ``kind="sequence_classification"``: a wrapped ``AutoModelForSequenceClassification`` with
  ``num_labels=1`` (its base model and its ``score``/``classifier`` linear layer are used the same way),
  saved with its own ``save_pretrained``.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hcrlhf.data.templates import end_indices, get_template, tokenize_pairs
from hcrlhf.models.loading import _from_pretrained, choose_attn_implementation, resolve_dtype

__all__ = ["ScoreModel", "ScoreOutput", "SCORE_CONFIG_NAME", "HEAD_WEIGHTS_NAME"]

SCORE_CONFIG_NAME = "hcrlhf_score_config.json"
HEAD_WEIGHTS_NAME = "score_head.safetensors"
SCORE_FORMAT = "hcrlhf-score-model"


@dataclass
class ScoreOutput:
    """Attributes:
    scores: (B, T) float32, the head's value at every position (0 on padded positions).
    end_scores: (B,) float32, the score of each sequence (at ``end_index``).
    end_index: (B,) int64, the last non-pad position of each row.
    """

    scores: torch.Tensor
    end_scores: torch.Tensor
    end_index: torch.Tensor


def _find_head(model) -> nn.Linear:
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            if head.out_features != 1:
                raise ValueError(f"ScoreModel: the sequence classifier's {name!r} layer has {head.out_features} "
                                 "outputs; a score model needs num_labels=1")
            return head
    raise ValueError(f"ScoreModel: cannot find a linear 'score'/'classifier' head on {type(model).__name__}")


class ScoreModel(nn.Module):
    """A backbone and a linear head giving one score per sequence.

    Args:
        backbone: a Hugging Face base model (returns ``last_hidden_state``).
        head: ``nn.Linear(hidden_size, 1)``; created (normal init, std 1/√hidden, zero bias) if None.
        wrapped: the ``AutoModelForSequenceClassification`` when this wraps one (internal).
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None, *, wrapped: nn.Module | None = None):
        super().__init__()
        hidden = getattr(backbone.config, "hidden_size", None)
        if head is None:
            if hidden is None:
                raise ValueError("ScoreModel: backbone.config has no hidden_size; pass the head explicitly")
            head = nn.Linear(hidden, 1, bias=True)
            nn.init.normal_(head.weight, std=1.0 / hidden**0.5)
            nn.init.zeros_(head.bias)
        if not isinstance(head, nn.Linear) or head.out_features != 1:
            raise ValueError(f"ScoreModel: head must be nn.Linear(hidden, 1), got {head}")
        self.kind = "backbone" if wrapped is None else "sequence_classification"
        if wrapped is not None:
            self.wrapped = wrapped  # registers the whole model once; backbone and head are its children
            object.__setattr__(self, "backbone", backbone)
            object.__setattr__(self, "head", head)
        else:
            self.backbone = backbone
            self.head = head
        self._takes_position_ids = "position_ids" in inspect.signature(backbone.forward).parameters

    @property
    def config(self):
        return self.backbone.config

    # ------------------------------------------------------------------------------ constructors

    @classmethod
    def from_backbone(cls, model_or_path, *, dtype=None, trust_remote_code: bool = False,
                      attn_implementation: str = "auto", **kwargs) -> ScoreModel:
        """A fresh head on a backbone: a model object (a causal LM's ``base_model`` is used) or an id/path
        loaded with ``AutoModel`` (safetensors only)."""
        if isinstance(model_or_path, nn.Module):
            backbone = getattr(model_or_path, "base_model", model_or_path)
        else:
            from transformers import AutoModel

            backbone = _from_pretrained(
                "ScoreModel.from_backbone", AutoModel, model_or_path, dtype=resolve_dtype(dtype),
                trust_remote_code=trust_remote_code, use_safetensors=True,
                attn_implementation=choose_attn_implementation(attn_implementation), **kwargs,
            )
        return cls(backbone)

    @classmethod
    def from_config(cls, config) -> ScoreModel:
        """A randomly initialised backbone (``AutoModel.from_config``) and head."""
        from transformers import AutoModel

        return cls(AutoModel.from_config(config))

    @classmethod
    def from_sequence_classifier(cls, model_or_path, *, dtype=None, trust_remote_code: bool = False,
                                 attn_implementation: str = "auto", **kwargs) -> ScoreModel:
        """Wrap an ``AutoModelForSequenceClassification`` with one label (an object or an id/path)."""
        if isinstance(model_or_path, nn.Module):
            model = model_or_path
        else:
            from transformers import AutoModelForSequenceClassification

            model = _from_pretrained(
                "ScoreModel.from_sequence_classifier", AutoModelForSequenceClassification, model_or_path,
                num_labels=1, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True,
                attn_implementation=choose_attn_implementation(attn_implementation), **kwargs,
            )
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"ScoreModel: the sequence classifier has num_labels={model.config.num_labels}; "
                             "a score model needs num_labels=1")
        return cls(model.base_model, _find_head(model), wrapped=model)

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, trust_remote_code: bool = False,
                        attn_implementation: str = "auto", **kwargs) -> ScoreModel:
        """Load a score model saved by :meth:`save_pretrained`, or any ``*ForSequenceClassification``
        checkpoint with one label."""
        directory = Path(path).expanduser()
        config_path = directory / SCORE_CONFIG_NAME
        if not config_path.is_file():
            return cls.from_sequence_classifier(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                attn_implementation=attn_implementation, **kwargs)
        score_config = json.loads(config_path.read_text(encoding="utf-8"))
        if score_config.get("format") != SCORE_FORMAT:
            raise ValueError(f"ScoreModel.from_pretrained: {config_path} is not a {SCORE_FORMAT} config")
        if score_config["kind"] == "sequence_classification":
            return cls.from_sequence_classifier(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                attn_implementation=attn_implementation, **kwargs)
        from safetensors.torch import load_file

        model = cls.from_backbone(directory, dtype=dtype, trust_remote_code=trust_remote_code,
                                  attn_implementation=attn_implementation, **kwargs)
        state = load_file(directory / HEAD_WEIGHTS_NAME)
        head = nn.Linear(int(score_config["hidden_size"]), 1, bias="bias" in state)
        head.load_state_dict(state)
        model.head = head.to(device=next(model.backbone.parameters()).device)
        return model

    def save_pretrained(self, path) -> None:
        """Save as safetensors: the backbone's (or wrapped model's) ``save_pretrained`` files, the head
        (``score_head.safetensors``) and ``hcrlhf_score_config.json``."""
        from safetensors.torch import save_file

        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        if self.kind == "sequence_classification":
            self.wrapped.save_pretrained(directory, safe_serialization=True)
        else:
            self.backbone.save_pretrained(directory, safe_serialization=True)
            state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
            save_file(state, directory / HEAD_WEIGHTS_NAME, metadata={"format": "pt"})
        score_config = {"format": SCORE_FORMAT, "version": 1, "kind": self.kind,
                        "hidden_size": self.head.in_features, "score_position": "last_non_pad_token"}
        (directory / SCORE_CONFIG_NAME).write_text(json.dumps(score_config, indent=1, sort_keys=True) + "\n",
                                                   encoding="utf-8")

    # ----------------------------------------------------------------------------------- forward

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> ScoreOutput:
        """Score a batch.

        Args:
            input_ids: (B, T) int64.
            attention_mask: (B, T) 0/1 (or bool); left or right padding; every row needs a valid token.

        Returns:
            :class:`ScoreOutput` with ``scores`` (B, T), ``end_scores`` (B,), ``end_index`` (B,); float32.
        """
        if input_ids.dim() != 2 or attention_mask.shape != input_ids.shape:
            raise ValueError(f"ScoreModel.forward: input_ids and attention_mask must both be (B, T); got "
                             f"{tuple(input_ids.shape)} and {tuple(attention_mask.shape)}")
        attention_mask = attention_mask.long()
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if self._takes_position_ids:
            # Positions count real tokens only, so left padding does not shift them.
            inputs["position_ids"] = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        hidden = self.backbone(**inputs).last_hidden_state  # (B, T, H)
        weight = self.head.weight.float()
        bias = None if self.head.bias is None else self.head.bias.float()
        with torch.autocast(device_type=hidden.device.type, enabled=False):  # the head stays fp32 under bf16
            scores = nn.functional.linear(hidden.float(), weight, bias).squeeze(-1)  # (B, T)
        scores = scores * attention_mask.to(scores.dtype)
        end_index = end_indices(attention_mask)
        end_scores = scores.gather(1, end_index.unsqueeze(1)).squeeze(1)
        return ScoreOutput(scores=scores, end_scores=end_scores, end_index=end_index)

    @torch.no_grad()
    def score(self, tokenizer, prompts, responses, *, template=None, batch_size: int = 32,
              max_length: int | None = None) -> torch.Tensor:
        """Scores (N,) float32 of (prompt, response) pairs (eval mode, right padding, EOS appended)."""
        template = get_template(template, tokenizer)
        prompts, responses = list(prompts), list(responses)
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        out = []
        try:
            for start in range(0, len(prompts), batch_size):
                batch = tokenize_pairs(tokenizer, prompts[start:start + batch_size],
                                       responses[start:start + batch_size], template=template, max_length=max_length)
                out.append(self(batch.input_ids.to(device), batch.attention_mask.to(device)).end_scores.cpu())
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)
