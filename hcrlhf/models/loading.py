"""Loading policies, reference models and tokenizers from a Hugging Face id or a local directory.

Weights are read from safetensors only (``use_safetensors=True``: no pickle), ``trust_remote_code``
stays off unless the caller asks, and the attention implementation is ``flash_attention_2`` when the
``flash-attn`` package and a CUDA device are present, else ``sdpa``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

__all__ = [
    "flash_attn_available",
    "choose_attn_implementation",
    "resolve_dtype",
    "load_causal_lm",
    "load_tokenizer",
    "load_policy_and_reference",
    "is_local",
]

ATTN_IMPLEMENTATIONS = ("auto", "flash_attention_2", "sdpa", "eager")


def flash_attn_available() -> bool:
    """True when ``flash_attn`` is importable and CUDA is available."""
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def choose_attn_implementation(requested: str = "auto", device=None) -> str:
    """``"auto"`` → ``flash_attention_2`` if flash-attn and CUDA are there (and ``device`` is not a CPU),
    else ``sdpa``; an explicit choice is checked and returned."""
    if requested not in ATTN_IMPLEMENTATIONS:
        raise ValueError(f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, got {requested!r}")
    on_cpu = device is not None and torch.device(device).type == "cpu"
    if requested == "auto":
        return "flash_attention_2" if flash_attn_available() and not on_cpu else "sdpa"
    if requested == "flash_attention_2" and (not flash_attn_available() or on_cpu):
        raise ValueError(
            "attn_implementation='flash_attention_2' needs the flash-attn package (pip install hcrlhf[gpu]) and a "
            "CUDA device; use 'sdpa' or 'auto'"
        )
    return requested


def resolve_dtype(dtype):
    """``None``/``"auto"`` pass through; ``"bfloat16"``/``"bf16"``/``torch.bfloat16``... → a torch dtype."""
    if dtype is None or dtype == "auto" or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in names:
        raise ValueError(f"dtype must be a torch dtype, 'auto' or one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def is_local(name_or_path) -> bool:
    return Path(str(name_or_path)).expanduser().exists()


def _from_pretrained(fn: str, loader, name_or_path, **kwargs):
    local = is_local(name_or_path)
    if local:
        kwargs["local_files_only"] = True
    try:
        return loader.from_pretrained(str(Path(str(name_or_path)).expanduser()) if local else name_or_path, **kwargs)
    except OSError as error:
        where = "local directory" if local else "Hugging Face id (needs network access or a cached copy)"
        raise OSError(f"{fn}: could not load {name_or_path!r} as a {where}: {error}") from error


def load_causal_lm(
    name_or_path,
    *,
    dtype=None,
    device=None,
    trust_remote_code: bool = False,
    attn_implementation: str = "auto",
    revision: str | None = None,
    **kwargs,
):
    """Load a causal LM (``AutoModelForCausalLM``) from a Hub id or local path, safetensors only.

    Args:
        name_or_path: a Hugging Face model id or a local directory.
        dtype: ``None`` (float32), ``"auto"`` (the checkpoint's), a torch dtype or its name.
        device: optional device to move the model to.
        trust_remote_code: run the repository's own modelling code (off unless asked).
        attn_implementation: ``"auto"`` (flash_attention_2 if available, else sdpa), or explicit.
        revision: optional Hub revision.
        **kwargs: passed to ``from_pretrained``.
    """
    from transformers import AutoModelForCausalLM

    model = _from_pretrained(
        "load_causal_lm", AutoModelForCausalLM, name_or_path, dtype=resolve_dtype(dtype),
        trust_remote_code=trust_remote_code, use_safetensors=True,
        attn_implementation=choose_attn_implementation(attn_implementation, device), revision=revision, **kwargs,
    )
    if device is not None:
        model = model.to(device)
    return model


def load_tokenizer(name_or_path, *, padding_side: str = "left", trust_remote_code: bool = False, **kwargs):
    """Load a tokenizer; sets ``padding_side`` and, if the tokenizer has no pad token, uses EOS as pad."""
    from transformers import AutoTokenizer

    if padding_side not in ("left", "right"):
        raise ValueError(f"load_tokenizer: padding_side must be 'left' or 'right', got {padding_side!r}")
    tokenizer = _from_pretrained("load_tokenizer", AutoTokenizer, name_or_path,
                                 trust_remote_code=trust_remote_code, **kwargs)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"load_tokenizer: {name_or_path!r} has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_policy_and_reference(name_or_path, *, reference=None, **kwargs):
    """``(policy, reference)``: the policy in train mode and a frozen eval-mode reference model.

    Args:
        name_or_path: the policy (usually the SFT model).
        reference: the reference model's id/path (default: the same as the policy).
        **kwargs: passed to :func:`load_causal_lm` for both.
    """
    policy = load_causal_lm(name_or_path, **kwargs)
    policy.train()
    reference_model = load_causal_lm(reference if reference is not None else name_or_path, **kwargs)
    reference_model.eval()
    reference_model.requires_grad_(False)
    return policy, reference_model
