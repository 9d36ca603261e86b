"""Prompt templates, tokenization for generation and scoring, and end-of-response indices.

Two paddings, one convention:

* **generation** batches are *left* padded, so that every row's next token is produced at the last
  column (``tokenize_prompts``);
* **scoring** batches (reward/cost models, log-probs of a finished response) are *right* padded by
  default (``tokenize_pairs``), but every helper here also accepts left padding.

The *end* of a row is its last valid position (docs/ops.md#conventions): the score of a (prompt, response) pair
is read there. :func:`end_indices` finds it from the attention mask alone, whatever the padding.

Prompt and response are tokenized separately and concatenated, so the boundary between them is exact
(``response_mask``) and the same as in generation, where the response tokens follow the prompt tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "PromptTemplate",
    "ChatTemplate",
    "SAFE_RLHF_TEMPLATE",
    "PLAIN_TEMPLATE",
    "get_template",
    "TokenizedBatch",
    "pad_sequences",
    "end_indices",
    "tokenize_prompts",
    "tokenize_pairs",
]

PADDING_SIDES = ("left", "right")


@dataclass(frozen=True)
class PromptTemplate:
    """A plain-text prompt template.

    Attributes:
        prompt_format: text with exactly one ``{prompt}`` placeholder; what the policy sees before it
            starts its response.
        response_separator: text put between the formatted prompt and the response (tokenized with the
            response, without special tokens).
    """

    prompt_format: str = "BEGINNING OF CONVERSATION: USER: {prompt} ASSISTANT:"
    response_separator: str = " "

    def __post_init__(self):
        if not isinstance(self.prompt_format, str) or self.prompt_format.count("{prompt}") != 1:
            raise ValueError(
                f"PromptTemplate: prompt_format must contain exactly one '{{prompt}}', got {self.prompt_format!r}"
            )
        if not isinstance(self.response_separator, str):
            raise TypeError(f"PromptTemplate: response_separator must be a str, got {type(self.response_separator)}")

    def format_prompt(self, prompt: str) -> str:
        """The text the policy is conditioned on."""
        return self.prompt_format.replace("{prompt}", prompt)

    def format_pair(self, prompt: str, response: str) -> str:
        """Prompt and response as one text (for display; tokenization keeps them apart)."""
        return self.format_prompt(prompt) + self.response_separator + response


class ChatTemplate:
    """Uses the tokenizer's own chat template (``tokenizer.apply_chat_template``) for the prompt.

    Args:
        tokenizer: a Hugging Face tokenizer with a ``chat_template``.
        system: optional system message put before the user turn.
    """

    response_separator = ""

    def __init__(self, tokenizer, system: str | None = None):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("ChatTemplate: tokenizer has no chat_template; use a PromptTemplate instead")
        self.tokenizer = tokenizer
        self.system = system

    def format_prompt(self, prompt: str) -> str:
        messages = [] if self.system is None else [{"role": "system", "content": self.system}]
        messages.append({"role": "user", "content": prompt})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def format_pair(self, prompt: str, response: str) -> str:
        return self.format_prompt(prompt) + response


#: The Safe RLHF / HC-RLHF conversation template.
SAFE_RLHF_TEMPLATE = PromptTemplate()
#: No decoration: the prompt text itself, the response after one space.
PLAIN_TEMPLATE = PromptTemplate("{prompt}", " ")


def get_template(template=None, tokenizer=None):
    """Resolve ``template``: ``None``/``"safe_rlhf"``, ``"plain"``, ``"chat"`` (needs ``tokenizer``),
    a format string with ``{prompt}``, or a template object (returned as is)."""
    if template is None or template == "safe_rlhf":
        return SAFE_RLHF_TEMPLATE
    if template == "plain":
        return PLAIN_TEMPLATE
    if template == "chat":
        if tokenizer is None:
            raise ValueError("get_template: template='chat' needs the tokenizer")
        return ChatTemplate(tokenizer)
    if isinstance(template, str):
        return PromptTemplate(template)
    if hasattr(template, "format_prompt") and hasattr(template, "response_separator"):
        return template
    raise TypeError(
        "template must be None, 'safe_rlhf', 'plain', 'chat', a format string with '{prompt}', "
        f"or a PromptTemplate, got {type(template).__name__}"
    )


@dataclass
class TokenizedBatch:
    """A padded batch of token ids.

    Attributes:
        input_ids: (B, T) int64, padded with the tokenizer's pad id.
        attention_mask: (B, T) int64, 1 on real tokens.
        response_mask: (B, T) bool, True on response tokens (including an appended EOS); all False for
            prompt-only batches.
        end_index: (B,) int64, the last valid position of each row (see :func:`end_indices`).
        padding_side: "left" or "right".
        truncated: (B,) bool, rows that lost tokens to ``max_length``.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    response_mask: torch.Tensor
    end_index: torch.Tensor
    padding_side: str
    truncated: torch.Tensor

    def to(self, device) -> TokenizedBatch:
        return TokenizedBatch(
            self.input_ids.to(device), self.attention_mask.to(device), self.response_mask.to(device),
            self.end_index.to(device), self.padding_side, self.truncated,
        )

    def model_inputs(self) -> dict:
        """``input_ids`` and ``attention_mask`` for a Hugging Face model's forward/generate."""
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def _check_padding_side(fn: str, padding_side: str) -> str:
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"{fn}: padding_side must be 'left' or 'right', got {padding_side!r}")
    return padding_side


def pad_sequences(
    sequences: Sequence[Sequence[int]], pad_token_id: int, *, padding_side: str = "right", flags=None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Pad lists of token ids into a (B, T) tensor.

    Args:
        sequences: B lists of ints (each may be empty).
        pad_token_id: the id written on padded positions.
        padding_side: "right" (pads after the tokens) or "left" (before them).
        flags: optional B lists of bools aligned with ``sequences`` (padded with False).

    Returns:
        ``(input_ids (B,T) int64, attention_mask (B,T) int64, padded flags (B,T) bool or None)``, with
        T = the longest sequence (at least 1).
    """
    fn = "pad_sequences"
    _check_padding_side(fn, padding_side)
    if pad_token_id is None:
        raise ValueError(f"{fn}: pad_token_id is None; set tokenizer.pad_token (e.g. to the EOS token)")
    batch = len(sequences)
    width = max([len(s) for s in sequences] + [1])
    input_ids = torch.full((batch, width), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((batch, width), dtype=torch.long)
    padded_flags = None if flags is None else torch.zeros((batch, width), dtype=torch.bool)
    for row, tokens in enumerate(sequences):
        n = len(tokens)
        if n == 0:
            continue
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, cols] = torch.as_tensor(list(tokens), dtype=torch.long)
        attention_mask[row, cols] = 1
        if flags is not None:
            if len(flags[row]) != n:
                raise ValueError(f"{fn}: flags[{row}] has {len(flags[row])} entries for {n} tokens")
            padded_flags[row, cols] = torch.as_tensor(list(flags[row]), dtype=torch.bool)
    return input_ids, attention_mask, padded_flags


def end_indices(attention_mask: torch.Tensor) -> torch.Tensor:
    """The last valid position of each row: ``max{t : attention_mask[b, t] != 0}``.

    Correct for right padding (``length - 1``), left padding (``T - 1``) and masks with holes.

    Args:
        attention_mask: (B, T) bool or integer tensor.

    Returns:
        (B,) int64 on the mask's device.

    Raises:
        ValueError: if some row has no valid position (naming the rows).
    """
    fn = "end_indices"
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"{fn}: attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.dim() != 2:
        raise ValueError(f"{fn}: attention_mask must have shape (B, T), got {tuple(attention_mask.shape)}")
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise TypeError(f"{fn}: attention_mask must be bool or integer, got {attention_mask.dtype}")
    valid = attention_mask != 0
    width = valid.shape[1]
    has_any = valid.any(dim=1)
    if not bool(has_any.all()):
        empty = torch.nonzero(~has_any).flatten().tolist()
        raise ValueError(f"{fn}: rows {empty[:10]} of attention_mask have no valid position")
    positions = torch.arange(width, device=valid.device).expand_as(valid)
    # Padded positions get -1 so that the maximum is the last valid position whatever the padding side.
    return torch.where(valid, positions, torch.full_like(positions, -1)).amax(dim=1)


def _encode(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def _as_text_list(fn: str, name: str, texts) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    texts = list(texts)
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"{fn}: {name}[{index}] must be a str, got {type(text).__name__}")
    return texts


def tokenize_prompts(
    tokenizer, prompts, *, template=None, max_length: int | None = None, padding_side: str = "left"
) -> TokenizedBatch:
    """Format and tokenize prompts for generation, **left padded** by default.

    A prompt longer than ``max_length`` tokens keeps its *last* ``max_length`` tokens (the end of the
    template, where the response starts, matters most).

    Returns:
        a :class:`TokenizedBatch` with (B, T) ``input_ids``/``attention_mask``, an all-False
        ``response_mask`` and ``end_index`` (B,) (= T-1 for every row under left padding).
    """
    fn = "tokenize_prompts"
    _check_padding_side(fn, padding_side)
    template = get_template(template, tokenizer)
    prompts = _as_text_list(fn, "prompts", prompts)
    if not prompts:
        raise ValueError(f"{fn}: prompts must not be empty")
    ids = _encode(tokenizer, [template.format_prompt(p) for p in prompts], add_special_tokens=True)
    truncated = []
    if max_length is not None:
        if max_length < 1:
            raise ValueError(f"{fn}: max_length must be >= 1, got {max_length}")
        truncated = [len(x) > max_length for x in ids]
        ids = [x[-max_length:] for x in ids]
    else:
        truncated = [False] * len(ids)
    input_ids, attention_mask, _ = pad_sequences(ids, tokenizer.pad_token_id, padding_side=padding_side)
    return TokenizedBatch(
        input_ids, attention_mask, torch.zeros_like(attention_mask, dtype=torch.bool),
        end_indices(attention_mask), padding_side, torch.tensor(truncated, dtype=torch.bool),
    )


def tokenize_pairs(
    tokenizer,
    prompts,
    responses,
    *,
    template=None,
    max_length: int | None = None,
    padding_side: str = "right",
    add_eos: bool = True,
) -> TokenizedBatch:
    """Tokenize (prompt, response) pairs for scoring, **right padded** by default.

    Each row is ``format_prompt(prompt)`` (with the tokenizer's special tokens, e.g. BOS) followed by
    ``response_separator + response`` (no special tokens) and, with ``add_eos``, the EOS token, which
    is then the row's end token where the score is read. Over ``max_length``, the prompt loses tokens
    from its left first; the response is cut only if it alone is too long (its EOS is kept).

    Args:
        prompts, responses: B strings each.
        max_length: optional cap on a row's length (>= 2 with ``add_eos``).
        padding_side: "right" (default, scoring) or "left".

    Returns:
        a :class:`TokenizedBatch`: ``input_ids``/``attention_mask``/``response_mask`` (B, T),
        ``end_index`` (B,).
    """
    fn = "tokenize_pairs"
    _check_padding_side(fn, padding_side)
    template = get_template(template, tokenizer)
    prompts = _as_text_list(fn, "prompts", prompts)
    responses = _as_text_list(fn, "responses", responses)
    if len(prompts) != len(responses):
        raise ValueError(
            f"{fn}: prompts and responses must have the same length, got {len(prompts)} and {len(responses)}")
    if not prompts:
        raise ValueError(f"{fn}: prompts must not be empty")
    eos = tokenizer.eos_token_id
    if add_eos and eos is None:
        raise ValueError(f"{fn}: add_eos=True but the tokenizer has no eos_token")
    if max_length is not None and max_length < 1 + int(add_eos):
        raise ValueError(f"{fn}: max_length must be >= {1 + int(add_eos)}, got {max_length}")
    prompt_ids = _encode(tokenizer, [template.format_prompt(p) for p in prompts], add_special_tokens=True)
    response_ids = _encode(tokenizer, [template.response_separator + r for r in responses], add_special_tokens=False)
    sequences, flags, truncated = [], [], []
    for p_ids, r_ids in zip(prompt_ids, response_ids):
        r_ids = list(r_ids) + ([eos] if add_eos else [])
        cut = False
        if max_length is not None and len(p_ids) + len(r_ids) > max_length:
            cut = True
            if len(r_ids) >= max_length:
                # Keep the response's beginning and its EOS: the end token is what the score reads.
                r_ids = r_ids[: max_length - 1] + [r_ids[-1]] if add_eos else r_ids[:max_length]
                p_ids = []
            else:
                p_ids = p_ids[len(p_ids) + len(r_ids) - max_length:]
        sequences.append(list(p_ids) + r_ids)
        flags.append([False] * len(p_ids) + [True] * len(r_ids))
        truncated.append(cut)
    input_ids, attention_mask, response_mask = pad_sequences(
        sequences, tokenizer.pad_token_id, padding_side=padding_side, flags=flags
    )
    return TokenizedBatch(
        input_ids, attention_mask, response_mask, end_indices(attention_mask), padding_side,
        torch.tensor(truncated, dtype=torch.bool),
    )
