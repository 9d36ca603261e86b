"""Loading policies, reference models and tokenizers from a Hugging Face id or a local directory.

Weights are read from safetensors only (``use_safetensors=True``: no pickle), ``trust_remote_code``
stays off unless the caller asks, and the attention implementation is ``flash_attention_2`` when the
``flash-attn`` package and a CUDA device are present, else ``sdpa``.

Tokenizers are saved with :func:`save_tokenizer`, which checks that ``AutoTokenizer`` loads the same
tokenizer back from the directory (also next to a model config, see :func:`save_tokenizer`), and loaded with
:func:`load_tokenizer`, which loads a tokenizer saved as a plain ``tokenizer.json`` as it was saved.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import warnings
from pathlib import Path

import torch

__all__ = [
    "flash_attn_available",
    "choose_attn_implementation",
    "resolve_dtype",
    "load_causal_lm",
    "load_tokenizer",
    "save_tokenizer",
    "tokenizer_fingerprint",
    "same_tokenizer",
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


#: The generic fast tokenizer, which runs a saved ``tokenizer.json`` exactly as it is (transformers 5 calls it
#: ``TokenizersBackend``, transformers 4 ``PreTrainedTokenizerFast``).
GENERIC_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _saved_as_generic_tokenizer(directory: Path) -> bool:
    """A local directory holding a ``tokenizer.json`` whose ``tokenizer_config.json`` names the generic class."""
    config = directory / "tokenizer_config.json"
    if not (config.is_file() and (directory / "tokenizer.json").is_file()):
        return False
    try:
        declared = json.loads(config.read_text(encoding="utf-8")).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(declared, str) and declared in GENERIC_TOKENIZER_CLASSES


def load_tokenizer(name_or_path, *, padding_side: str = "left", trust_remote_code: bool = False, **kwargs):
    """Load a tokenizer; sets ``padding_side`` and, if the tokenizer has no pad token, uses EOS as pad.

    A local directory whose tokenizer was saved as a plain ``tokenizer.json`` (``tokenizer_class``
    TokenizersBackend / PreTrainedTokenizerFast in ``tokenizer_config.json``; the built-in task's word-level
    tokenizer, and every directory hcrlhf saves it in) is loaded with that generic class, i.e. as saved:
    ``AutoTokenizer`` of transformers 5 would take the model type's registered class instead when the directory
    also holds a model config (``Qwen2Tokenizer`` for a qwen2 config, which rebuilds a byte-level BPE from the
    vocabulary and tokenizes the task's text into other ids). Anything else goes through ``AutoTokenizer``.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if padding_side not in ("left", "right"):
        raise ValueError(f"load_tokenizer: padding_side must be 'left' or 'right', got {padding_side!r}")
    if is_local(name_or_path) and _saved_as_generic_tokenizer(Path(str(name_or_path)).expanduser()):
        tokenizer = _from_pretrained("load_tokenizer", PreTrainedTokenizerFast, name_or_path, **kwargs)
    else:
        tokenizer = _from_pretrained("load_tokenizer", AutoTokenizer, name_or_path,
                                     trust_remote_code=trust_remote_code, **kwargs)
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"load_tokenizer: {name_or_path!r} has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fingerprint(tokenizer) -> dict:
    """What decides a tokenizer's ids: the SHA-256 of its backend pipeline (``tokenizer.json``: normalizer,
    pre-tokenizer, model and vocabulary, added tokens, post-processor; padding and truncation state left out),
    or of its vocabulary for a tokenizer without a backend, plus its size and special-token ids. The class
    name is given for information only (two classes can tokenize alike)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
        text = json.dumps(spec, sort_keys=True, ensure_ascii=False)
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return {"class": type(tokenizer).__name__, "sha256": "sha256:" + hashlib.sha256(text.encode()).hexdigest(),
            "size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id,
            "bos_token_id": tokenizer.bos_token_id, "unk_token_id": tokenizer.unk_token_id}


def same_tokenizer(first, second) -> bool:
    """True when two tokenizers (or :func:`tokenizer_fingerprint` s) tokenize alike: the same backend pipeline,
    size and special-token ids (the class name may differ)."""
    a, b = (x if isinstance(x, dict) else tokenizer_fingerprint(x) for x in (first, second))
    keys = ("sha256", "size", "pad_token_id", "eos_token_id", "bos_token_id", "unk_token_id")
    return all(a.get(k) == b.get(k) for k in keys)


def _auto_tokenizer(directory: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    except Exception:  # any failure to load means "does not round-trip"
        return None


def save_tokenizer(tokenizer, directory) -> None:
    """Save ``tokenizer`` so that ``AutoTokenizer.from_pretrained(directory)`` and :func:`load_tokenizer` load
    it back as it is (checked here).

    ``AutoTokenizer`` of transformers 5 ignores ``tokenizer_class`` in ``tokenizer_config.json`` for some model
    types (qwen2 among them) and takes the model type's registered class when a model config sits in the same
    directory: a generic ``tokenizer.json`` tokenizer saved next to a Qwen2 policy (the built-in task's) would
    load as ``Qwen2Tokenizer`` and tokenize into other ids. When a plain save does not round-trip, the
    generic class is also declared as the directory's ``auto_map`` for ``AutoTokenizer`` (no code is shipped:
    without ``trust_remote_code`` transformers then loads the declared class), and the round trip is checked
    again; if it still fails a warning says so (:func:`load_tokenizer` loads it as saved either way).
    """
    directory = Path(directory)
    tokenizer.save_pretrained(str(directory))
    loaded = _auto_tokenizer(directory)
    if loaded is not None and same_tokenizer(tokenizer, loaded):
        return
    config_path = directory / "tokenizer_config.json"
    if config_path.is_file() and _saved_as_generic_tokenizer(directory):
        values = json.loads(config_path.read_text(encoding="utf-8"))
        values["auto_map"] = {"AutoTokenizer": [None, values["tokenizer_class"]]}
        config_path.write_text(json.dumps(values, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        loaded = _auto_tokenizer(directory)
        if loaded is not None and same_tokenizer(tokenizer, loaded):
            return
    warnings.warn(f"save_tokenizer: AutoTokenizer.from_pretrained({str(directory)!r}) does not load the saved "
                  f"{type(tokenizer).__name__} back (it gives "
                  f"{'an error' if loaded is None else type(loaded).__name__ + ' with other ids'}); load it with "
                  "hcrlhf.models.load_tokenizer, or PreTrainedTokenizerFast.from_pretrained")


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
