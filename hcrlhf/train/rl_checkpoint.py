"""Atomic, pickle-free checkpoints of the RL trainer.

A checkpoint is a directory ``<output_dir>/checkpoints/step-<NNNNNNNN>/`` holding:

* ``<module>.safetensors`` — weights of each module (policy, critics), saved with
  ``safetensors.torch.save_model`` so that tied weights (lm_head = embeddings) are handled;
* ``<module>_adapter/`` — with LoRA, instead of the policy's full weights: its adapter weights only, as a
  standard peft adapter directory (``adapter_model.safetensors`` + ``adapter_config.json``, loadable with
  ``peft.PeftModel.from_pretrained``);
* ``<optimizer>.safetensors`` + ``<optimizer>.json`` — an optimiser's state tensors and the rest of
  its ``state_dict`` (param groups, scalars), no pickle;
* ``rng.safetensors`` — the torch CPU (and CUDA) generator states;
* ``trainer_state.json`` — step, multiplier, cost window, Python and numpy RNG states, config.

It is written into a temporary sibling directory and renamed into place (``os.replace``), so a
``step-*`` directory is always complete: a run killed while saving leaves only a ``.tmp-*`` directory,
which :func:`latest_checkpoint` ignores and :func:`remove_stale_temporaries` deletes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "remove_stale_temporaries",
    "capture_rng_state",
    "restore_rng_state",
    "import_peft",
]

PEFT_MISSING = ("LoRA needs the optional dependency peft, which is not installed: pip install 'hcrlhf[lora]' "
                "(or pip install peft), or set lora_r=0")

STATE_NAME = "trainer_state.json"
RNG_NAME = "rng.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir) -> list[Path]:
    """Complete checkpoints under ``output_dir``, oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def remove_stale_temporaries(output_dir) -> None:
    """Delete ``.tmp-*`` directories left by a run killed while it was saving."""
    root = checkpoint_root(output_dir)
    if root.is_dir():
        for path in root.glob(".tmp-*"):
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------ RNG


def capture_rng_state() -> tuple[dict, dict]:
    """``(tensors, json_state)``: torch CPU/CUDA generator states and Python/numpy states."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    version, internal, gauss = random.getstate()
    # The legacy global numpy generator on purpose: it is what third-party code draws from.
    name, keys, position, has_gauss, cached = np.random.get_state()  # noqa: NPY002
    return tensors, {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
    }


def restore_rng_state(tensors: dict, state: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith("torch_cuda_")),
                                       key=lambda k: int(k.rsplit("_", 1)[1]))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))  # noqa: NPY002


# ------------------------------------------------------------------------------------ optimisers


def _save_optimizer(optimizer: torch.optim.Optimizer, directory: Path, name: str) -> None:
    from safetensors.torch import save_file

    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{param_id}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{param_id}.{key}"] = value
    save_file(tensors, directory / f"{name}.safetensors", metadata={"format": "pt"})
    meta = {"param_groups": state["param_groups"], "scalars": scalars,
            "state_ids": [int(i) for i in state["state"]]}
    (directory / f"{name}.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")


def _load_optimizer(optimizer: torch.optim.Optimizer, directory: Path, name: str) -> None:
    from safetensors.torch import load_file

    tensors = load_file(directory / f"{name}.safetensors")
    meta = json.loads((directory / f"{name}.json").read_text(encoding="utf-8"))
    state: dict[int, dict] = {int(i): {} for i in meta["state_ids"]}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        param_id, field = key.split(".", 1)
        state[int(param_id)][field] = value
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group and isinstance(group["betas"], list):
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


# ----------------------------------------------------------------------------------- adapters


def import_peft():
    """``peft``, imported lazily; a clear ``ImportError`` naming the extra when it is missing."""
    try:
        import peft
    except ImportError as error:
        raise ImportError(PEFT_MISSING) from error
    return peft


def _adapter_dir(directory: Path, name: str) -> Path:
    return directory / f"{name}_adapter"


def _save_adapter(model, directory: Path, name: str) -> None:
    """The adapter weights of a peft model as a peft adapter directory (no model card, no hub calls)."""
    from safetensors.torch import save_file

    peft = import_peft()
    target = _adapter_dir(directory, name)
    target.mkdir()
    tensors = {k: v.detach().cpu().contiguous() for k, v in peft.get_peft_model_state_dict(model).items()}
    save_file(tensors, target / "adapter_model.safetensors", metadata={"format": "pt"})
    model.peft_config[model.active_adapter].save_pretrained(str(target))


def _load_adapter(model, directory: Path, name: str) -> None:
    from safetensors.torch import load_file

    peft = import_peft()
    path = _adapter_dir(directory, name) / "adapter_model.safetensors"
    if not path.is_file():
        raise ValueError(f"load_checkpoint: {path} is missing: was the checkpoint saved without LoRA? (lora_r "
                         "must match the run that wrote it)")
    device = next(model.parameters()).device
    tensors = load_file(path, device=str(device))
    expected = set(peft.get_peft_model_state_dict(model))
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
        raise ValueError(f"load_checkpoint: the adapter weights in {path} do not match the model's adapters "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    result = peft.set_peft_model_state_dict(model, tensors)
    if getattr(result, "unexpected_keys", None):
        raise ValueError(f"load_checkpoint: unexpected adapter keys {result.unexpected_keys[:3]} in {path}")


# ------------------------------------------------------------------------------------ save / load


def save_checkpoint(output_dir, step: int, *, modules: dict, optimizers: dict, state: dict,
                    keep: int | None = None, adapters: dict | None = None) -> Path:
    """Write a checkpoint atomically and return its directory; keep only the newest ``keep`` ones.

    ``modules`` are saved whole; ``adapters`` (peft models) only by their adapter weights."""
    from safetensors.torch import save_file, save_model

    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    temporary = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=root))
    try:
        for name, module in modules.items():
            save_model(module, str(temporary / f"{name}.safetensors"), metadata={"format": "pt"})
        for name, model in (adapters or {}).items():
            _save_adapter(model, temporary, name)
        for name, optimizer in optimizers.items():
            _save_optimizer(optimizer, temporary, name)
        rng_tensors, rng_state = capture_rng_state()
        save_file(rng_tensors, temporary / RNG_NAME)
        full_state = dict(state, step=step, rng=rng_state)
        (temporary / STATE_NAME).write_text(json.dumps(full_state, indent=1, default=str), encoding="utf-8")
        if final.exists():  # re-saving a step (e.g. a resumed run): swap the old one out, then delete it
            old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{step:08d}-", dir=root))
            os.replace(final, old / "old")
            os.replace(temporary, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, final)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    if keep is not None:
        for path in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    return final


def load_checkpoint(path, *, modules: dict, optimizers: dict, restore_rng: bool = True,
                    adapters: dict | None = None) -> dict:
    """Load weights (``adapters``: adapter weights only) and optimiser states in place; restore RNG states;
    return the trainer state."""
    from safetensors.torch import load_file, load_model

    directory = Path(path)
    state = json.loads((directory / STATE_NAME).read_text(encoding="utf-8"))
    for name, module in modules.items():
        device = next(module.parameters()).device
        load_model(module, str(directory / f"{name}.safetensors"), device=str(device))
    for name, model in (adapters or {}).items():
        _load_adapter(model, directory, name)
    for name, optimizer in optimizers.items():
        _load_optimizer(optimizer, directory, name)
    if restore_rng:
        restore_rng_state(load_file(directory / RNG_NAME), state["rng"])
    return state
