"""Atomic, pickle-free checkpoints of the RL trainer.

A checkpoint is a directory ``<output_dir>/checkpoints/step-<NNNNNNNN>/`` holding:

* ``<module>.safetensors`` — weights of each module (policy, critics), saved with
  ``safetensors.torch.save_model`` so that tied weights (lm_head = embeddings) are handled;
* ``<module>_adapter/`` — with LoRA, instead of the policy's full weights: its adapter weights only, as a
  standard peft adapter directory (``adapter_model.safetensors`` + ``adapter_config.json``, loadable with
  ``peft.PeftModel.from_pretrained``);
* ``<optimizer>.safetensors`` + ``<optimizer>.json`` — an optimiser's state tensors and the rest of
  its ``state_dict`` (param groups, scalars), no pickle;
* ``sharded/`` — instead of the two above, when the models are sharded over ranks (FSDP2 under ``torchrun``):
  the modules' and optimisers' states as ``torch.distributed.checkpoint`` files, one per rank (written in
  parallel; re-sharded on load, so a run may resume at another world size);
* ``rng.safetensors`` — the torch CPU (and CUDA) generator states;
* ``trainer_state.json`` — step, multiplier, cost window, Python and numpy RNG states, config;
* ``manifest.json`` — written last: ``{"format": "hcrlhf-rl-checkpoint", "format_version": 1, "step": N,
  "hash": "sha256", "files": {"<relative posix path>": {"size": bytes, "sha256": hex}, ...}}`` for every
  other file of the directory.

It is written into a temporary sibling directory; every file (and then every directory) is fsynced, and
the directory is renamed into place (``os.replace``) and its parent fsynced, so a ``step-*`` directory is
always complete and durable: a run killed while saving leaves only a ``.tmp-*`` directory, which
:func:`latest_checkpoint` ignores and :func:`remove_stale_temporaries` deletes.

:func:`verify_checkpoint` checks a checkpoint against its manifest (sizes, then sha256);
:func:`select_checkpoint` (used on resume) takes the newest checkpoint that verifies, renaming newer ones
that do not aside as ``step-<NNNNNNNN>.corrupt`` (never deleting them), and raises
:class:`CheckpointError` listing each checkpoint and why when none verifies. A checkpoint written before
manifests existed (no ``manifest.json`` and no ``checkpoint_format`` in its ``trainer_state.json``) is
accepted as *unverified* after a structural check (its JSON parses, each safetensors file's header
matches its size), which catches truncation but not flipped bits.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import stat
import tempfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch

__all__ = [
    "save_checkpoint",
    "save_sharded_checkpoint",
    "load_checkpoint",
    "load_sharded_checkpoint",
    "latest_checkpoint",
    "list_checkpoints",
    "remove_stale_temporaries",
    "verify_checkpoint",
    "select_checkpoint",
    "trim_metrics_log",
    "fsync_file",
    "CheckpointError",
    "CorruptCheckpointError",
    "ResumePoint",
    "capture_rng_state",
    "restore_rng_state",
    "import_peft",
]

PEFT_MISSING = ("LoRA needs the optional dependency peft, which is not installed: pip install 'hcrlhf[lora]' "
                "(or pip install peft), or set lora_r=0")

STATE_NAME = "trainer_state.json"
RNG_NAME = "rng.safetensors"
MANIFEST_NAME = "manifest.json"
SHARDED_NAME = "sharded"  # torch.distributed.checkpoint files of sharded models
FORMAT = "hcrlhf-rl-checkpoint"
FORMAT_VERSION = 1
CORRUPT_SUFFIX = ".corrupt"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_CHUNK = 8 << 20


class CheckpointError(RuntimeError):
    """Resume found checkpoints but none of them verifies; the message names each one and why."""


class CorruptCheckpointError(ValueError):
    """One checkpoint fails verification; the message is the reason."""


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


# ------------------------------------------------------------------------- durability / manifest


def fsync_file(path) -> None:
    """Flush a file's data to the storage device (no-op when the file does not exist)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_directory(path) -> None:
    """Make the entries of a directory (creations, renames) durable; POSIX only (Windows cannot open one)."""
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_file(path: Path, *, fsync: bool = False) -> tuple[int, str]:
    """``(size, sha256 hex)`` of a file, read in chunks; ``fsync``: also flush it to the device."""
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(handle.fileno())
    return size, digest.hexdigest()


def _write_manifest(directory: Path, step: int) -> None:
    """Fsync every file of ``directory`` while hashing it, write ``manifest.json`` last (fsynced), then
    fsync every directory, deepest first."""
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        size, digest = _hash_file(path, fsync=True)
        files[path.relative_to(directory).as_posix()] = {"size": size, "sha256": digest}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "step": step, "hash": "sha256", "files": files}
    with open(directory / MANIFEST_NAME, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    subdirectories = sorted((p for p in directory.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True)
    for path in [*subdirectories, directory]:
        _fsync_directory(path)


def verify_checkpoint(path) -> bool:
    """Check a checkpoint directory: ``True`` when every file matches ``manifest.json`` (size, then sha256);
    ``False`` for a checkpoint written before manifests existed that passes the structural check (it cannot
    be verified); otherwise raise :class:`CorruptCheckpointError` with the reason."""
    directory = Path(path)
    manifest_path = directory / MANIFEST_NAME
    if not manifest_path.exists():
        _check_legacy(directory)
        return False
    try:
        manifest = json.loads(manifest_path.read_bytes())
    except (OSError, ValueError) as error:
        raise CorruptCheckpointError(f"{MANIFEST_NAME} is unreadable ({error})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorruptCheckpointError(f"{MANIFEST_NAME} is not an {FORMAT} manifest")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise CorruptCheckpointError(f"{MANIFEST_NAME} has format_version {manifest.get('format_version')!r}; "
                                     f"this version of hcrlhf reads {FORMAT_VERSION}")
    match = _STEP_DIR.match(directory.name)
    if match and manifest.get("step") != int(match.group(1)):
        raise CorruptCheckpointError(f"{MANIFEST_NAME} is for step {manifest.get('step')!r}, the directory for "
                                     f"step {int(match.group(1))}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CorruptCheckpointError(f"{MANIFEST_NAME} has no file list")
    for required in (STATE_NAME, RNG_NAME):
        if required not in files:
            raise CorruptCheckpointError(f"{MANIFEST_NAME} does not list {required}")
    for name, entry in sorted(files.items()):
        relative = PurePosixPath(name)
        if relative.is_absolute() or ".." in relative.parts or name == MANIFEST_NAME or not isinstance(entry, dict):
            raise CorruptCheckpointError(f"{MANIFEST_NAME} has an invalid entry {name!r}")
        target = directory.joinpath(*relative.parts)
        try:
            info = target.stat()
            if not stat.S_ISREG(info.st_mode):
                raise CorruptCheckpointError(f"{name} is not a regular file")
            size = info.st_size
            if size != entry.get("size"):
                raise CorruptCheckpointError(f"{name} has {size} bytes, the manifest says {entry.get('size')}")
            size, digest = _hash_file(target)
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{name} is missing") from None
        except OSError as error:
            raise CorruptCheckpointError(f"{name} is unreadable ({error})") from None
        if size != entry.get("size") or digest != entry.get("sha256"):
            raise CorruptCheckpointError(f"{name} does not match its sha256 in the manifest (its bytes changed "
                                         "after the checkpoint was written)")
    return True


def _check_legacy(directory: Path) -> None:
    """The checks possible without a manifest, for checkpoints written before manifests existed: the JSON
    files parse and each safetensors file is as long as its header says (catches truncation, not bit flips).
    A checkpoint of this format (``checkpoint_format`` in its state) without a manifest is corrupt."""
    try:
        state = json.loads((directory / STATE_NAME).read_bytes())
    except FileNotFoundError:
        raise CorruptCheckpointError(f"{MANIFEST_NAME} and {STATE_NAME} are missing") from None
    except (OSError, ValueError) as error:
        raise CorruptCheckpointError(f"{MANIFEST_NAME} is missing and {STATE_NAME} is unreadable ({error})") from None
    if not isinstance(state, dict) or "checkpoint_format" in state:
        raise CorruptCheckpointError(f"{MANIFEST_NAME} is missing")
    if not (directory / RNG_NAME).is_file():
        raise CorruptCheckpointError(f"{MANIFEST_NAME} and {RNG_NAME} are missing")
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = path.relative_to(directory).as_posix()
        try:
            if path.suffix == ".json":
                json.loads(path.read_bytes())
            elif path.suffix == ".safetensors":
                _check_safetensors_layout(path, name)
        except OSError as error:
            raise CorruptCheckpointError(f"{name} is unreadable ({error})") from None
        except ValueError as error:
            raise CorruptCheckpointError(f"{name} is damaged ({error})") from None


def _check_safetensors_layout(path: Path, name: str) -> None:
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        head = handle.read(8)
        header_size = int.from_bytes(head, "little") if len(head) == 8 else size
        if 8 + header_size > size:
            raise ValueError(f"truncated: {size} bytes")
        try:
            header = json.loads(handle.read(header_size))
            end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"),
                      default=0)
        except (TypeError, KeyError, IndexError, AttributeError) as error:
            raise ValueError(f"bad header ({error!r})") from None
    expected = 8 + header_size + end
    if expected != size:
        raise ValueError(f"{'truncated' if size < expected else 'trailing bytes'}: {size} bytes, its header "
                         f"describes {expected}")


@dataclass
class ResumePoint:
    """What :func:`select_checkpoint` chose: ``path`` (None: no checkpoint at all), whether it is an
    unverifiable pre-manifest checkpoint, the newer checkpoints that failed verification as
    ``(original path, where it was renamed, reason)``, and earlier set-aside directories found."""

    path: Path | None
    legacy: bool = False
    rejected: list = field(default_factory=list)
    set_aside_before: list = field(default_factory=list)


def select_checkpoint(output_dir) -> ResumePoint:
    """The newest checkpoint under ``output_dir`` that verifies (see :func:`verify_checkpoint`).

    Newer checkpoints that fail are renamed aside to ``step-<NNNNNNNN>.corrupt`` (``.corrupt-2``, … when
    taken), never deleted, so that ``keep_checkpoints`` counts good checkpoints only and a resumed run
    re-saves those steps cleanly. When none verifies, nothing is renamed and :class:`CheckpointError`
    lists each checkpoint with its reason."""
    root = checkpoint_root(output_dir)
    aside = sorted(p.name for p in root.iterdir() if CORRUPT_SUFFIX in p.name) if root.is_dir() else []
    failures = []
    for path in reversed(list_checkpoints(output_dir)):
        try:
            verified = verify_checkpoint(path)
        except CorruptCheckpointError as error:
            failures.append((path, str(error)))
            continue
        rejected = [(bad, _set_aside(bad), reason) for bad, reason in failures]
        if rejected:
            _fsync_directory(root)
        return ResumePoint(path, legacy=not verified, rejected=rejected, set_aside_before=aside)
    if failures:
        listing = "\n".join(f"  {path.name}: {reason}" for path, reason in failures)
        raise CheckpointError(
            f"cannot resume: none of the {len(failures)} checkpoint(s) under {root} verifies:\n{listing}\n"
            "Nothing was renamed or deleted. Restore a good copy of one of them, or move the checkpoints "
            "directory away to start afresh.")
    return ResumePoint(None, set_aside_before=aside)


def _set_aside(path: Path) -> Path:
    target = path.with_name(path.name + CORRUPT_SUFFIX)
    number = 1
    while target.exists():
        number += 1
        target = path.with_name(f"{path.name}{CORRUPT_SUFFIX}-{number}")
    os.rename(path, target)
    return target


# ------------------------------------------------------------------------------------ metrics log


def trim_metrics_log(path, step: int) -> list[str]:
    """Make a JSON Lines metrics log consistent with a run resumed after iteration ``step``.

    Keeps one line per iteration ``<= step`` (the last one when a step appears twice); drops lines of later
    iterations (they are re-run), a torn last line (no newline, or not JSON: the process died while
    appending) and any other line that does not parse. Rewrites the file atomically (fsynced) when
    anything changed. Returns notes for warnings: torn or unparseable lines dropped, duplicated or missing
    steps (not the routine drop of later iterations)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    notes, kept, duplicates = [], {}, []
    lines = data.split(b"\n")
    if lines[-1]:
        notes.append(f"dropped a torn last line ({len(lines[-1])} bytes without a newline)")
    lines.pop()
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            row = json.loads(raw)
            row_step = row["step"]
            if isinstance(row_step, bool) or not isinstance(row_step, int):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            what = "the last line" if number == len(lines) else f"line {number}"
            notes.append(f"dropped {what}: not a JSON object with an integer step")
            continue
        if row_step > step:  # logged by the run that died; re-run now (expected, not warned)
            continue
        if row_step in kept:
            duplicates.append(row_step)
        kept[row_step] = raw
    if duplicates:
        notes.append(f"kept the last of several lines for step(s) {sorted(set(duplicates))}")
    missing = sorted(set(range(1, step + 1)) - set(kept))
    if missing:
        notes.append(f"has no line for step(s) {missing} (lost before the checkpoint was written)")
    cleaned = b"".join(kept[s] + b"\n" for s in sorted(kept))
    if cleaned != data:
        temporary = path.with_name(f".{path.name}.tmp")
        with open(temporary, "wb") as handle:
            handle.write(cleaned)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        _fsync_directory(path.parent)
    return notes


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
    """Write a checkpoint atomically and durably and return its directory; keep only the newest ``keep``.

    ``modules`` are saved whole; ``adapters`` (peft models) only by their adapter weights. The files are
    fsynced and listed with their sizes and sha256 in ``manifest.json`` (written last, fsynced), the
    directories fsynced, the directory renamed into place and the parent fsynced; only then are older
    checkpoints beyond ``keep`` deleted."""
    from safetensors.torch import save_model

    root = _checkpoint_root_made(output_dir)
    temporary = Path(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=root))
    try:
        for name, module in modules.items():
            save_model(module, str(temporary / f"{name}.safetensors"), metadata={"format": "pt"})
        for name, model in (adapters or {}).items():
            _save_adapter(model, temporary, name)
        for name, optimizer in optimizers.items():
            _save_optimizer(optimizer, temporary, name)
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    return _seal_checkpoint(temporary, output_dir, step, state, keep)


def save_sharded_checkpoint(output_dir, step: int, *, modules: dict, optimizers: dict, state: dict,
                            keep: int | None = None) -> Path:
    """:func:`save_checkpoint` for models sharded over ranks (FSDP2); every rank calls it.

    The modules and optimiser states go to ``sharded/`` with ``torch.distributed.checkpoint`` (each rank writes
    its own shards, in parallel); rank 0 then writes the trainer state and the manifest, which covers the shard
    files too, and renames the directory into place, as :func:`save_checkpoint` does. Returns the directory on
    every rank."""
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from hcrlhf import distributed

    temporary = None
    if distributed.is_main():
        temporary = str(tempfile.mkdtemp(prefix=f".tmp-step-{step:08d}-", dir=_checkpoint_root_made(output_dir)))
    temporary = Path(distributed.broadcast_object(temporary))
    model_state, optimizer_state = get_state_dict(nn.ModuleDict(modules), list(optimizers.values()))
    dcp.save({"modules": model_state, "optimizers": optimizer_state}, checkpoint_id=temporary / SHARDED_NAME)
    distributed.barrier()  # every rank's shards are written before rank 0 seals the directory
    final = None
    if distributed.is_main():
        final = str(_seal_checkpoint(temporary, output_dir, step, dict(state, sharded=True), keep))
    return Path(distributed.broadcast_object(final))


def _checkpoint_root_made(output_dir) -> Path:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        root.mkdir(parents=True, exist_ok=True)
        _fsync_directory(root.parent)
    return root


def _seal_checkpoint(temporary: Path, output_dir, step: int, state: dict, keep: int | None) -> Path:
    """Add the RNG and trainer state and the manifest to a filled temporary directory, rename it into place
    (swapping out an old directory of the same step), then delete checkpoints beyond ``keep``."""
    from safetensors.torch import save_file

    root = checkpoint_root(output_dir)
    final = root / f"step-{step:08d}"
    try:
        rng_tensors, rng_state = capture_rng_state()
        save_file(rng_tensors, temporary / RNG_NAME)
        full_state = dict(state, step=step, rng=rng_state, checkpoint_format=FORMAT_VERSION)
        (temporary / STATE_NAME).write_text(json.dumps(full_state, indent=1, default=str), encoding="utf-8")
        _write_manifest(temporary, step)
        if final.exists():  # re-saving a step (e.g. a fresh run in an old directory): swap the old one out
            old = Path(tempfile.mkdtemp(prefix=f".tmp-old-{step:08d}-", dir=root))
            os.replace(final, old / "old")
            try:
                os.replace(temporary, final)
            except BaseException:
                os.replace(old / "old", final)
                raise
            _fsync_directory(root)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temporary, final)
            _fsync_directory(root)
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


def load_sharded_checkpoint(path, *, modules: dict, optimizers: dict) -> dict:
    """Load a :func:`save_sharded_checkpoint` checkpoint into sharded ``modules`` and their ``optimizers`` on
    every rank (``torch.distributed.checkpoint`` re-shards on load, so the world size may differ from the one
    that saved it); returns the trainer state. The RNG states are not restored: under several processes
    sampling draws from per-row seeds, not from the global generators."""
    import torch.distributed.checkpoint as dcp
    from torch import nn
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    directory = Path(path)
    state = json.loads((directory / STATE_NAME).read_text(encoding="utf-8"))
    if not (directory / SHARDED_NAME).is_dir():
        raise ValueError(f"load_sharded_checkpoint: {directory} holds no sharded states ({SHARDED_NAME}/); it was "
                         "written by a run whose models were not sharded (sharding='replicate' or one process)")
    container = nn.ModuleDict(modules)
    optimizer_list = list(optimizers.values())
    model_state, optimizer_state = get_state_dict(container, optimizer_list)
    holder = {"modules": model_state, "optimizers": optimizer_state}
    dcp.load(holder, checkpoint_id=directory / SHARDED_NAME)
    set_state_dict(container, optimizer_list, model_state_dict=holder["modules"],
                   optim_state_dict=holder["optimizers"])
    return state
