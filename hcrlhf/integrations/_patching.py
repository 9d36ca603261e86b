"""What the TRL, verl and OpenRLHF integrations share: swapping a peer's functions for hcrlhf's in every
loaded module of the peer (and in the registries and classes that hold them), reverting, counting
which calls hcrlhf served, and refusing peer versions the replacements were not written against.
"""

from __future__ import annotations

import logging
import numbers
import sys
import threading
from collections import Counter
from collections.abc import Callable

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def logits_refusal(logits, labels=None, *, min_dim: int = 1) -> str | None:
    """Why ``ops.token_logprobs`` cannot serve a peer's ``(logits, labels)`` call exactly (None: it can): float
    logits of at least ``min_dim`` dims with a vocabulary on a CPU or CUDA device, and int labels of the logits'
    leading shape on the same device."""
    if not isinstance(logits, torch.Tensor) or logits.dtype not in FLOAT_DTYPES:
        return "logits are not a float16/bfloat16/float32/float64 tensor"
    if logits.dim() < min_dim or logits.shape[-1] == 0:
        return "logits have no vocabulary dim" if min_dim <= 1 else "logits are not (N, ..., V)"
    if logits.device.type not in ("cpu", "cuda"):
        return f"logits are on a {logits.device.type} device"
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dtype not in (torch.int32, torch.int64):
            return "labels are not an int32/int64 tensor"
        if tuple(labels.shape) != tuple(logits.shape[:-1]) or labels.device != logits.device:
            return "labels do not have the leading shape and the device of the logits"
    return None


def supported_version(version, supported: tuple[str, ...]) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(version).public in supported  # a local build (+label) of a release counts
    except (InvalidVersion, TypeError):
        return False


def unit_number(x) -> float | None:
    """x as a float in [0, 1], or None (a tensor, a bool, a value out of range: the peer's original)."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return None
    x = float(x)
    return x if 0.0 <= x <= 1.0 else None


def promoted_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the peers' arithmetic on these tensors ends in (``rewards * mask`` and the like): type
    promotion of the first with every floating one (an integer or bool mask takes the floats' dtype)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        if t is not None and t.dtype.is_floating_point:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def engine(impl: str, dtype: torch.dtype) -> str:
    return "torch" if dtype == torch.float64 else impl  # the ops compute float64 in the torch engine only


class PeerPatch:
    """State of one peer's patch: the originals, hcrlhf's replacements, and the call counters.

    ``load()`` imports the peer's modules and returns ``{name: original}`` for the names in
    ``patched`` (plus private ``"_..."`` entries the replacements need); ``make(originals, impl,
    count)`` returns ``{name: replacement}``; ``containers()`` lists the dicts (registries) and
    classes whose entries are swapped besides module attributes.
    """

    def __init__(self, *, peer: str, packages: tuple[str, ...], patched: tuple[str, ...],
                 load: Callable[[], dict], make: Callable[..., dict], containers: Callable[[], list],
                 logger: logging.Logger):
        self.peer, self.packages, self.patched = peer, packages, patched
        self._load, self._make, self._containers, self._logger = load, make, containers, logger
        self.lock = threading.RLock()
        self.applied: dict | None = None  # {"originals", "replacements", "impl"}
        self.counts: Counter = Counter()
        self._reasons_logged: set = set()

    # ------------------------------------------------------------------ apply / revert
    def apply(self, impl: str, api: str) -> None:
        from hcrlhf.ops import IMPLS

        if impl not in IMPLS:
            raise ValueError(f"{api}: impl must be one of {IMPLS}, got {impl!r}")
        with self.lock:
            loaded = self._load()  # imports (and version-checks) every time: modules may load late
            if self.applied is None:
                originals = loaded
            else:
                # The peer's modules hold hcrlhf's replacements now: keep the originals read the
                # first time, adding those of modules that loaded since (the replacements look
                # their original up at call time, in this same dict).
                originals = self.applied["originals"]
                for name, value in loaded.items():
                    originals.setdefault(name, value)
                if self.applied["impl"] == impl:
                    self._swap(self.applied["originals"], self.applied["replacements"])  # modules loaded since
                    return
                self._revert_locked()
            replacements = self._make(originals, impl, self.count)
            self._swap(originals, replacements)
            self.applied = {"originals": originals, "replacements": replacements, "impl": impl}

    def revert(self) -> None:
        with self.lock:
            self._revert_locked()

    def _revert_locked(self) -> None:
        if self.applied is None:
            return
        self._swap(self.applied["replacements"], self.applied["originals"])
        self.applied = None

    def _swap(self, old: dict, new: dict) -> None:
        """Everywhere the peer holds ``old[name]`` (module attributes of its loaded modules, the
        registries and classes of ``containers()``), put ``new[name]``."""
        pairs = [(old[name], new[name]) for name in self.patched if name in old and name in new]

        def replacement(value):
            for before, after in pairs:
                if value is before:
                    return after
            return None

        for module in self._modules():
            try:
                items = list(vars(module).items())
            except TypeError:
                continue
            for attr, value in items:
                after = replacement(value)
                if after is not None:
                    setattr(module, attr, after)
        for container in self._containers():
            if isinstance(container, dict):
                for key, value in list(container.items()):
                    after = replacement(value)
                    if after is not None:
                        container[key] = after
            else:  # a class: its own attributes (subclasses that override a method keep theirs)
                for attr, value in list(vars(container).items()):
                    after = replacement(value)
                    if after is not None:
                        setattr(container, attr, after)

    def _modules(self):
        return [module for name, module in list(sys.modules.items())
                if module is not None and any(name == p or name.startswith(p + ".") for p in self.packages)]

    # ------------------------------------------------------------------ counters
    def count(self, name: str, route: str, reason: str | None = None) -> None:
        """Record one call of ``name`` served by ``route`` ("hcrlhf" or the peer); log a fallback's
        reason once (INFO)."""
        self.counts[(name, route)] += 1
        if reason is not None and (name, reason) not in self._reasons_logged:
            self._reasons_logged.add((name, reason))
            self._logger.info("hcrlhf.integrations: %s handed to %s's original (%s)", name, self.peer, reason)

    def call_counts(self) -> dict[str, dict[str, int]]:
        return {name: {"hcrlhf": self.counts[(name, "hcrlhf")], self.peer: self.counts[(name, self.peer)]}
                for name in self.patched}

    def reset_call_counts(self) -> None:
        self.counts.clear()


def next_valid_fill(x: torch.Tensor, valid: torch.Tensor, tail: float | torch.Tensor = 0.0) -> torch.Tensor:
    """(B, T): x on valid positions; on a masked position, x at the row's next valid position (``tail``
    where none follows). What a right-to-left scan that carries its state through masked positions
    holds there. No host sync."""
    batch, length = x.shape
    if length == 0:
        return x
    positions = torch.arange(length, device=x.device).expand(batch, length)
    nearest = torch.where(valid, positions, length)
    nearest = nearest.flip(1).cummin(1).values.flip(1)  # index of the next valid position at or after t
    padded = torch.cat([x, torch.as_tensor(tail, dtype=x.dtype, device=x.device).expand(batch, 1)], dim=1)
    return padded.gather(1, nearest)
