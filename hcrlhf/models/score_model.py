"""Score models (reward and cost models): a transformer backbone and a linear head.

See docs/method.md#reward-and-cost-models for how they are trained and used.

The head maps each position's last hidden state to one number; the model's score of a sequence is the
value at its *last non-pad token* (``end_index``, see :func:`hcrlhf.data.end_indices`), which works for
right and left padding alike. Position ids are computed from the attention mask, so a left-padded row
gets the same positions, and hence the same score, as the same row right-padded.

Two layouts in memory:

* ``kind="backbone"``: any Hugging Face base model (``AutoModel``) + our ``nn.Linear(hidden, 1, bias=False)``
  head (bias-free like Safe RLHF's score head and the ``score`` layer of Hugging Face's classifiers);
* ``kind="sequence_classification"``: a wrapped ``AutoModelForSequenceClassification`` with
  ``num_labels=1`` (its base model and its ``score``/``classifier`` linear layer are used the same way).

Saved format (:meth:`ScoreModel.save_pretrained`, both layouts): a plain Hugging Face one-label
``*ForSequenceClassification`` checkpoint, ``config.json`` + ``model.safetensors`` holding the backbone
*and the trained head* (``score.weight``), so ``AutoModelForSequenceClassification.from_pretrained(path)``
loads it with nothing missing. ``config.json`` also gets ``pad_token_id`` (the tokenizer's, when
training saves it) and an ``hcrlhf`` entry (``SCORE_FORMAT``, the score position and, for a model trained
by :func:`hcrlhf.train.train_score_model`, ``training``: kind reward/cost, loss, steps, ...).

Pooling: Hugging Face's classifiers read the rightmost token whose *id* differs from ``pad_token_id``;
ScoreModel reads the last position of the *attention mask*. On right-padded (or unpadded) batches padded
with ``pad_token_id`` they give the same score as long as a sequence's last real token is not the pad
token. They cannot agree when it is (a tokenizer that pads with EOS, scoring responses that end with
EOS as :func:`hcrlhf.data.tokenize_pairs` does): Hugging Face then skips the trailing EOS, and no saved
config value changes that, because its pooling never reads the attention mask — give such a tokenizer a
distinct pad token, or score with ScoreModel. On left-padded batches pass
``position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)`` to the Hugging Face model too (ScoreModel
does; Hugging Face otherwise numbers positions from the first column).

Loading (:meth:`ScoreModel.from_pretrained`) refuses a checkpoint whose head is not in it (a plain causal
LM or base model, or a classifier saved without its ``score`` weights: Hugging Face would initialise the
head at random) or has the wrong shape, from the loader's own report of missing / mismatched keys,
with :class:`ScoreCheckpointError`. Directories saved by earlier versions of hcrlhf (the backbone's files +
``score_head.safetensors`` + ``hcrlhf_score_config.json``) still load; saving such a model again writes
the new format (when its head's bias is 0 or the architecture's classifier has a bias; otherwise the old
layout again, with a warning).
"""

from __future__ import annotations

import copy
import inspect
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from hcrlhf.data.templates import end_indices, get_template, tokenize_pairs
from hcrlhf.models.loading import _from_pretrained, choose_attn_implementation, resolve_dtype

__all__ = ["ScoreModel", "ScoreOutput", "ScoreCheckpointError", "training_record", "SCORE_CONFIG_NAME",
           "HEAD_WEIGHTS_NAME"]

SCORE_CONFIG_NAME = "hcrlhf_score_config.json"  # the old layout (kind "backbone"): read, written only as fallback
HEAD_WEIGHTS_NAME = "score_head.safetensors"  # the old layout's head
SCORE_FORMAT = "hcrlhf-score-model"
SCORE_FORMAT_VERSION = 2  # 2: a Hugging Face sequence-classification checkpoint with an `hcrlhf` config entry
SCORE_POSITION = "last_non_pad_token"  # the last position of the attention mask


class ScoreCheckpointError(ValueError):
    """A checkpoint that cannot serve as a trained score model: its score head is not in it (Hugging Face
    would initialise one at random) or has the wrong shape, or hcrlhf marked it as the other kind."""


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


def _find_head_name(model) -> str:
    for name in ("score", "classifier", "v_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear):
            if head.out_features != 1:
                raise ValueError(f"ScoreModel: the sequence classifier's {name!r} layer has {head.out_features} "
                                 "outputs; a score model needs num_labels=1")
            return name
    raise ValueError(f"ScoreModel: cannot find a linear 'score'/'classifier' head on {type(model).__name__}")


def _find_head(model) -> nn.Linear:
    return getattr(model, _find_head_name(model))


def _keys(info, name: str) -> list[str]:
    """The parameter names of a ``from_pretrained(..., output_loading_info=True)`` report entry (missing keys
    are names; mismatched keys are ``(name, checkpoint shape, model shape)`` tuples)."""
    return sorted(k[0] if isinstance(k, tuple) else str(k) for k in (info.get(name) or ()))


def _check_loading_info(path, model, info) -> None:
    """Refuse a loaded classifier that left weights to random initialisation (missing from the checkpoint)
    or re-initialised them (wrong shape): its scores would not be a trained model's."""
    missing, mismatched = _keys(info, "missing_keys"), _keys(info, "mismatched_keys")
    if not missing and not mismatched:
        return
    try:
        head = _find_head_name(model)
    except ValueError:
        head = "score"
    architectures = getattr(model.config, "architectures", None) or ["?"]
    problems = []
    if missing:
        problems.append(f"missing from the checkpoint: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    if mismatched:
        problems.append("of the wrong shape (a score model has num_labels=1): " + ", ".join(
            f"{k[0]} {tuple(k[1])} in the checkpoint, {tuple(k[2])} needed" if isinstance(k, tuple) and len(k) == 3
            else str(k) for k in sorted(info["mismatched_keys"], key=str)))
    untrained_head = any(k == head or k.startswith(head + ".") for k in missing + mismatched)
    what = (f"no trained score head ({head!r})" if untrained_head else "weights that are not in the checkpoint")
    raise ScoreCheckpointError(
        f"{path}: not a trained score model: it has {what}; transformers would initialise them at random. "
        f"Weights {'; '.join(problems)}. Its config.json names {architectures[0]}: a plain causal LM or base "
        "model, or a sequence classifier saved without its head, cannot be a reward or cost model. Use one "
        "trained by hcrlhf (`hcrlhf train-cost` / `train-reward` save <output_dir>/cost_model, reward_model) "
        "or a one-label *ForSequenceClassification checkpoint that contains its head.")


def training_record(config: dict, steps=None, total_steps=None, n_train_pairs=None) -> dict:
    """The ``training`` part of a saved score model's ``hcrlhf`` config entry, from the settings of
    :class:`hcrlhf.train.ScoreTrainingConfig` (as a dict): kind, loss, regularization, steps."""
    kind = config.get("kind")
    return {"trainer": "hcrlhf.train.train_score_model", "kind": kind,
            "loss": config.get("cost_loss") if kind == "cost" else "bt",
            "regularization": config.get("regularization"), "learning_rate": config.get("learning_rate"),
            "seed": config.get("seed"), "steps": steps, "total_steps": total_steps, "n_train_pairs": n_train_pairs}


class ScoreModel(nn.Module):
    """A backbone and a linear head giving one score per sequence.

    Args:
        backbone: a Hugging Face base model (returns ``last_hidden_state``).
        head: ``nn.Linear(hidden_size, 1)``; created if None (bias-free, normal init with std 1/√hidden).
        wrapped: the ``AutoModelForSequenceClassification`` when this wraps one (internal).

    Attributes:
        provenance: what :meth:`from_pretrained` loaded (path, format, architecture and the ``hcrlhf``
            config entry: kind, loss, steps of hcrlhf's training); ``{}`` for a model built in memory.
    """

    def __init__(self, backbone: nn.Module, head: nn.Linear | None = None, *, wrapped: nn.Module | None = None):
        super().__init__()
        hidden = getattr(backbone.config, "hidden_size", None)
        if head is None:
            if hidden is None:
                raise ValueError("ScoreModel: backbone.config has no hidden_size; pass the head explicitly")
            # Drawn exactly as the biased head of earlier versions was, so a seeded head keeps its weights.
            drawn = nn.Linear(hidden, 1, bias=True)
            nn.init.normal_(drawn.weight, std=1.0 / hidden**0.5)
            head = torch.nn.utils.skip_init(nn.Linear, hidden, 1, bias=False)
            with torch.no_grad():
                head.weight.copy_(drawn.weight)
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
        self.provenance: dict = {}

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
                                 attn_implementation: str = "auto", allow_untrained_head: bool = False,
                                 **kwargs) -> ScoreModel:
        """Wrap an ``AutoModelForSequenceClassification`` with one label (an object or an id/path).

        Loading from an id/path refuses (:class:`ScoreCheckpointError`) a checkpoint that leaves any weight
        to random initialisation, such as a causal LM without a score head, unless
        ``allow_untrained_head=True`` (for a head you are about to train)."""
        if isinstance(model_or_path, nn.Module):
            model = model_or_path
        else:
            from transformers import AutoModelForSequenceClassification

            kwargs.setdefault("ignore_mismatched_sizes", True)  # a wrong-shaped head is reported below instead
            model, info = _from_pretrained(
                "ScoreModel.from_sequence_classifier", AutoModelForSequenceClassification, model_or_path,
                num_labels=1, dtype=resolve_dtype(dtype), trust_remote_code=trust_remote_code, use_safetensors=True,
                attn_implementation=choose_attn_implementation(attn_implementation), output_loading_info=True,
                **kwargs,
            )
            if not allow_untrained_head:
                _check_loading_info(model_or_path, model, info)
        if getattr(model.config, "num_labels", 1) != 1:
            raise ValueError(f"ScoreModel: the sequence classifier has num_labels={model.config.num_labels}; "
                             "a score model needs num_labels=1")
        return cls(model.base_model, _find_head(model), wrapped=model)

    @classmethod
    def from_pretrained(cls, path, *, dtype=None, trust_remote_code: bool = False,
                        attn_implementation: str = "auto", role: str | None = None, **kwargs) -> ScoreModel:
        """Load a trained score model: a directory saved by :meth:`save_pretrained` (this format, or the
        old one with ``score_head.safetensors``), or any one-label ``*ForSequenceClassification``
        checkpoint that contains its head.

        Args:
            role: ``"reward"`` or ``"cost"``: also refuse a model that hcrlhf trained as the other kind.

        Raises:
            ScoreCheckpointError: the checkpoint has no trained head (a plain causal LM or base model, a
                classifier saved without its ``score`` weights: any weight left to random initialisation)
                or one of the wrong shape, or it was trained as the other ``role``. Checked from the
                checkpoint (the loader's missing / mismatched keys), before the model is used.
        """
        if role not in (None, "reward", "cost"):
            raise ValueError(f"ScoreModel.from_pretrained: role must be None, 'reward' or 'cost', got {role!r}")
        directory = Path(path).expanduser()
        config_path = directory / SCORE_CONFIG_NAME
        old = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else None
        if old is not None and old.get("format") != SCORE_FORMAT:
            raise ValueError(f"ScoreModel.from_pretrained: {config_path} is not a {SCORE_FORMAT} config")
        if old is not None and old.get("kind") == "backbone":
            model = cls._from_old_layout(directory, old, dtype=dtype, trust_remote_code=trust_remote_code,
                                         attn_implementation=attn_implementation, **kwargs)
        else:
            model = cls.from_sequence_classifier(path, dtype=dtype, trust_remote_code=trust_remote_code,
                                                 attn_implementation=attn_implementation, **kwargs)
            entry = getattr(model.wrapped.config, "hcrlhf", None)
            architectures = getattr(model.wrapped.config, "architectures", None) or [type(model.wrapped).__name__]
            model.provenance = {"path": str(path), "format": "hcrlhf" if entry else "sequence_classifier",
                                "architecture": architectures[0], "hcrlhf": entry}
        trained_as = ((model.provenance.get("hcrlhf") or {}).get("training") or {}).get("kind")
        if role is not None and trained_as not in (None, role):
            raise ScoreCheckpointError(f"{path}: hcrlhf trained this as a {trained_as} model; a {role} model is "
                                       "needed here")
        return model

    @classmethod
    def _from_old_layout(cls, directory: Path, score_config: dict, **kwargs) -> ScoreModel:
        """A directory of the old layout: the backbone's files + ``score_head.safetensors``."""
        from safetensors.torch import load_file

        head_path = directory / HEAD_WEIGHTS_NAME
        if not head_path.is_file():
            raise ScoreCheckpointError(f"{directory}: {SCORE_CONFIG_NAME} describes an hcrlhf score model (old "
                                       f"layout) but its trained head {HEAD_WEIGHTS_NAME} is missing")
        model = cls.from_backbone(directory, **kwargs)
        state = load_file(head_path)
        head = nn.Linear(int(score_config["hidden_size"]), 1, bias="bias" in state)
        head.load_state_dict(state)
        model.head = head.to(device=next(model.backbone.parameters()).device)
        entry = {"format": SCORE_FORMAT, "version": score_config.get("version", 1),
                 "score_position": score_config.get("score_position", SCORE_POSITION)}
        state_path = directory / "training_state.json"
        if state_path.is_file():  # written next to the model by train_score_model
            state = json.loads(state_path.read_text(encoding="utf-8"))
            entry["training"] = training_record(state.get("config", {}), state.get("step"), state.get("total_steps"),
                                                state.get("n_train_pairs"))
        architectures = getattr(model.backbone.config, "architectures", None) or [type(model.backbone).__name__]
        model.provenance = {"path": str(directory), "format": f"hcrlhf (old layout: {HEAD_WEIGHTS_NAME})",
                            "architecture": architectures[0], "hcrlhf": entry}
        return model

    def save_pretrained(self, path, *, pad_token_id: int | None = None, training: dict | None = None) -> None:
        """Save as a Hugging Face one-label sequence-classification checkpoint (safetensors) that carries
        the head, loadable by ``AutoModelForSequenceClassification.from_pretrained`` and :meth:`from_pretrained`.

        Args:
            pad_token_id: written to ``config.json`` (Hugging Face's classifiers pool at the last token that
                is not this id); default: the backbone config's.
            training: what trained the head (kind, loss, steps, ...: :func:`training_record`), written to the
                ``hcrlhf`` entry of ``config.json``; default: what the loaded checkpoint recorded, if any.

        A backbone with no Hugging Face sequence classifier to match (or a head whose non-zero bias that
        classifier cannot hold, from an old-layout checkpoint) is saved in the old layout, with a warning.
        """
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        entry = {"format": SCORE_FORMAT, "version": SCORE_FORMAT_VERSION, "score_position": SCORE_POSITION}
        training = training if training is not None else (self.provenance.get("hcrlhf") or {}).get("training")
        if training is not None:
            entry["training"] = dict(training)
        if self.kind == "sequence_classification":
            model, problem = self.wrapped, None
        else:
            model, problem = self._as_sequence_classifier()
        if model is None:
            warnings.warn(f"ScoreModel.save_pretrained: {problem}; saving {directory} in the old layout "
                          f"({HEAD_WEIGHTS_NAME}), which hcrlhf loads but AutoModelForSequenceClassification does "
                          "not", stacklevel=2)
            self._save_old_layout(directory)
            return
        config = copy.deepcopy(model.config)
        config.hcrlhf = entry
        if pad_token_id is not None:
            config.pad_token_id = int(pad_token_id)
        for stale in (SCORE_CONFIG_NAME, HEAD_WEIGHTS_NAME):  # an old-layout save in the same directory
            (directory / stale).unlink(missing_ok=True)
        original = model.config
        model.config = config
        try:
            model.save_pretrained(directory)
        finally:
            model.config = original

    def _as_sequence_classifier(self):
        """``(classifier, None)``: the backbone's Hugging Face one-label sequence classifier holding this
        backbone (shared, not copied) and this head, for saving; ``(None, reason)`` when there is none."""
        from itertools import chain

        from transformers import AutoModelForSequenceClassification

        config = copy.deepcopy(self.backbone.config)
        config.num_labels = 1
        try:  # a shell on the meta device (eager attention: no kernel checks): its backbone and head are replaced
            with torch.device("meta"):
                shell = AutoModelForSequenceClassification.from_config(config, attn_implementation="eager")
        except Exception as error:  # noqa: BLE001 - any failure means: no matching classifier, use the old layout
            return None, f"transformers has no sequence classifier for {type(self.backbone).__name__} ({error})"
        shell.config = config  # the caller's config, without the shell's attention setting
        prefix = shell.base_model_prefix
        if type(getattr(shell, prefix, None)) is not type(self.backbone):
            return None, f"{type(shell).__name__}.{prefix} is not a {type(self.backbone).__name__}"
        try:
            name = _find_head_name(shell)
        except ValueError as error:
            return None, str(error)
        target, bias, where = getattr(shell, name), self.head.bias, f"{type(shell).__name__}.{name}"
        if target.in_features != self.head.in_features:
            return None, f"{where} takes {target.in_features} features, the head {self.head.in_features}"
        if target.bias is None and bias is not None and bool(bias.detach().ne(0).any()):
            return None, f"the head has a bias ({float(bias.detach().float().sum()):.6g}) and {where} has none"
        head = torch.nn.utils.skip_init(nn.Linear, self.head.in_features, 1, bias=target.bias is not None,
                                        device=self.head.weight.device, dtype=self.head.weight.dtype)
        with torch.no_grad():
            head.weight.copy_(self.head.weight)
            if head.bias is not None:
                head.bias.copy_(bias if bias is not None else torch.zeros_like(head.bias))
        setattr(shell, prefix, self.backbone)
        setattr(shell, name, head)
        left = [n for n, t in chain(shell.named_parameters(), shell.named_buffers()) if t.is_meta]
        if left:
            return None, f"{type(shell).__name__} has weights beyond its base model and head: {left[:5]}"
        return shell, None

    def _save_old_layout(self, directory: Path) -> None:
        from safetensors.torch import save_file

        self.backbone.save_pretrained(directory)
        state = {k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}
        save_file(state, directory / HEAD_WEIGHTS_NAME, metadata={"format": "pt"})
        score_config = {"format": SCORE_FORMAT, "version": 1, "kind": "backbone",
                        "hidden_size": self.head.in_features, "score_position": SCORE_POSITION}
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
