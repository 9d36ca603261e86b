"""OpenRLHF integration: one call routes OpenRLHF's log-prob, entropy, KL and return functions through
hcrlhf's ops (docs/integrations.md#openrlhf).

``apply_to_openrlhf()`` replaces, in every loaded ``openrlhf`` module that holds them by name, these
OpenRLHF 0.11.2 functions:

* ``openrlhf.models.utils``: ``log_probs_from_logits``, ``compute_entropy`` →
  :func:`hcrlhf.ops.token_logprobs`; ``compute_approx_kl`` → :func:`hcrlhf.ops.kl_penalty`;
* ``openrlhf.trainer.ppo_utils.experience_maker.RemoteExperienceMaker`` (when that module can be
  imported): ``get_advantages_and_returns`` (GAE) and ``get_cumulative_returns`` (REINFORCE) →
  :func:`hcrlhf.ops.gae`.

Each replacement has the signature and the return conventions of the function it replaces. A call
hcrlhf cannot serve exactly is handed to OpenRLHF's original (counted in :func:`call_counts`).

``openrlhf/models/__init__.py`` imports flash-attn (and through it CUDA), so on a machine without
flash-attn ``import openrlhf.models.utils`` fails although that module is plain torch.
:func:`load_openrlhf_module` imports such a module anyway; ``apply_to_openrlhf`` uses it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import sys
import types
from collections.abc import Iterator

import torch

from hcrlhf.integrations._patching import (
    FLOAT_DTYPES,
    PeerPatch,
    engine,
    logits_refusal,
    promoted_dtype,
    supported_version,
    unit_number,
)

__all__ = [
    "SUPPORTED_OPENRLHF_VERSIONS",
    "UnsupportedOpenRLHFVersionError",
    "apply_to_openrlhf",
    "call_counts",
    "is_applied",
    "load_openrlhf_module",
    "openrlhf_patched",
    "reset_call_counts",
    "revert_openrlhf",
]

logger = logging.getLogger(__name__)

SUPPORTED_OPENRLHF_VERSIONS = ("0.11.2",)
PATCHED = ("log_probs_from_logits", "compute_entropy", "compute_approx_kl", "get_advantages_and_returns",
           "get_cumulative_returns")
UTILS = "openrlhf.models.utils"
EXPERIENCE_MAKER = "openrlhf.trainer.ppo_utils.experience_maker"
# OpenRLHF clamps every KL estimate to ±10 (compute_approx_kl).
_KL_CLAMP = 10.0
_NO_IGNORE = -(2**31)  # a label no vocabulary index equals


class UnsupportedOpenRLHFVersionError(RuntimeError):
    """The installed OpenRLHF is not one whose internals ``apply_to_openrlhf`` knows."""


# ------------------------------------------------------------------------------------------ loading
def load_openrlhf_module(name: str) -> types.ModuleType:
    """Import the OpenRLHF module ``name`` (e.g. ``"openrlhf.models.utils"``), also where a package
    ``__init__`` on its path cannot be imported.

    ``openrlhf/models/__init__.py`` imports the actor, which needs flash-attn; without flash-attn every
    ``openrlhf.models.*`` import fails, the plain-torch ``openrlhf.models.utils`` included. When
    importing a package on the way fails with an ImportError, this registers that package without
    running its ``__init__`` (an empty module whose ``__path__`` is the package's directory) and
    imports the submodule from it. Afterwards ``from openrlhf.models import Actor`` still fails, as
    it would have anyway; ``import openrlhf.models.utils`` works. Where every import works (flash-attn
    installed), this is ``importlib.import_module(name)``.

    Raises:
        ImportError: OpenRLHF is not installed, or ``name`` itself (not a package above it) imports
            something missing.
    """
    try:
        return importlib.import_module(name)
    except ImportError:
        pass
    parts = name.split(".")
    for depth in range(1, len(parts)):
        package = ".".join(parts[:depth])
        if package in sys.modules:
            continue
        try:
            importlib.import_module(package)
        except ImportError:
            _register_bare_package(package)
    return importlib.import_module(name)


def _register_bare_package(package: str) -> None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError(f"{package} is not an installed package")
    module = importlib.util.module_from_spec(spec)  # sets __path__, __spec__; runs nothing
    module.__hcrlhf_bare_package__ = True
    sys.modules[package] = module
    parent, _, child = package.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)


def _installed_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("openrlhf")
    except PackageNotFoundError:
        return "unknown"


# ------------------------------------------------------------------------------------------ public API
def apply_to_openrlhf(*, impl: str = "auto") -> None:
    """Route OpenRLHF's log-prob, entropy, KL and return functions through hcrlhf's ops (the module
    docstring lists them).

    Args:
        impl: "auto" | "triton" | "cpp" | "torch" (float64 inputs always use "torch").

    Call it in every process that computes what you want accelerated (OpenRLHF's Ray actors compute
    log-probs, entropies and the KL loss; the experience maker the KL in the rewards and the returns),
    before training. Idempotent; a later call also patches OpenRLHF modules imported since.

    Raises:
        UnsupportedOpenRLHFVersionError: the installed OpenRLHF is not one of ``SUPPORTED_OPENRLHF_VERSIONS``.
        ImportError: OpenRLHF (or deepspeed, which ``openrlhf.models.utils`` imports) is not installed.
        ValueError: unknown ``impl``.
    """
    _patch.apply(impl, "apply_to_openrlhf")


def revert_openrlhf() -> None:
    """Put OpenRLHF's own functions back wherever :func:`apply_to_openrlhf` placed hcrlhf's. A no-op
    when nothing is applied."""
    _patch.revert()


@contextlib.contextmanager
def openrlhf_patched(*, impl: str = "auto") -> Iterator[None]:
    """:func:`apply_to_openrlhf` on entry, :func:`revert_openrlhf` on exit (also on an exception)."""
    apply_to_openrlhf(impl=impl)
    try:
        yield
    finally:
        revert_openrlhf()


def is_applied() -> bool:
    return _patch.applied is not None


def call_counts() -> dict[str, dict[str, int]]:
    """Per patched function, how many calls hcrlhf served and how many went to OpenRLHF's original
    (``{"compute_approx_kl": {"hcrlhf": 3, "openrlhf": 0}, ...}``), since the last reset."""
    return _patch.call_counts()


def reset_call_counts() -> None:
    _patch.reset_call_counts()


def _load_originals() -> dict:
    if importlib.util.find_spec("openrlhf") is None:
        raise ImportError(f"hcrlhf.integrations.apply_to_openrlhf needs OpenRLHF ({SUPPORTED_OPENRLHF_VERSIONS[-1]})")
    version = _installed_version()
    if not supported_version(version, SUPPORTED_OPENRLHF_VERSIONS):
        raise UnsupportedOpenRLHFVersionError(
            f"hcrlhf.integrations.apply_to_openrlhf supports OpenRLHF {', '.join(SUPPORTED_OPENRLHF_VERSIONS)}, "
            f"found OpenRLHF {version}: it replaces OpenRLHF functions whose signatures and conventions change "
            f"between releases. Install a supported version (pip install 'openrlhf=="
            f"{SUPPORTED_OPENRLHF_VERSIONS[-1]}') or leave OpenRLHF unpatched."
        )
    utils = load_openrlhf_module(UTILS)
    originals = {name: getattr(utils, name) for name in PATCHED[:3]}
    maker = _experience_maker_class(import_it=True)
    if maker is not None:
        originals.update({name: vars(maker)[name] for name in PATCHED[3:] if name in vars(maker)})
    try:
        from flash_attn.ops.triton.cross_entropy import cross_entropy_loss  # noqa: F401
        originals["_flash_ce"] = True
    except ImportError:
        originals["_flash_ce"] = False
    return originals


def _experience_maker_class(import_it: bool = False):
    """OpenRLHF's RemoteExperienceMaker, or None where its module cannot be imported (it needs Ray,
    vLLM and flash-attn)."""
    module = sys.modules.get(EXPERIENCE_MAKER)
    if module is None and import_it:
        try:
            module = load_openrlhf_module(EXPERIENCE_MAKER)
        except ImportError as exc:
            logger.debug("hcrlhf.integrations: %s not patched (%s)", EXPERIENCE_MAKER, exc)
            return None
    return getattr(module, "RemoteExperienceMaker", None)


def _containers() -> list:
    maker = _experience_maker_class()
    return [] if maker is None else [maker]


# ------------------------------------------------------------------------------------------ replacements
def _returns_refusal(rewards, action_mask, *others) -> str | None:
    """Why ops.gae cannot reproduce OpenRLHF's return scans on these inputs (None: it can). OpenRLHF
    zeroes masked rewards and values but runs its recursion through masked positions; the two agree
    where every row's valid positions come first (right padding, OpenRLHF's layout). Checking that
    costs one host sync, as OpenRLHF's own experience maker does many."""
    tensors = (rewards,) + others
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "an argument is not a tensor"
    if rewards.dim() != 2 or any(tuple(t.shape) != tuple(rewards.shape) for t in tensors):
        return "the tensors are not all (B, T) of one shape"
    if any(t.dtype not in (torch.float32, torch.float64) for t in tensors):
        return "rewards / values are not float32 or float64"
    if action_mask is not None:
        if not isinstance(action_mask, torch.Tensor) or tuple(action_mask.shape) != tuple(rewards.shape) \
                or action_mask.device != rewards.device:
            return "action_mask does not have the shape and device of the rewards"
        valid = action_mask != 0
        if bool((valid[:, 1:] & ~valid[:, :-1]).any()):
            return "action_mask has a valid position after a masked one (left padding or holes)"
    return None


def _make_replacements(originals: dict, impl: str, count) -> dict:
    from hcrlhf import ops

    o = originals

    def token_refusal(logits, labels=None) -> str | None:
        return logits_refusal(logits, labels, min_dim=2)  # OpenRLHF's functions take (N, ..., V)

    def log_probs_from_logits(logits: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        name = "log_probs_from_logits"
        reason = token_refusal(logits, labels)
        if reason is None and o["_flash_ce"] and logits.dtype == torch.float64:
            reason = "float64 logits with flash-attn installed"
        if reason is not None:
            count(name, "openrlhf", reason)
            return o[name](logits, labels, temperature)
        count(name, "hcrlhf")
        if temperature != 1.0:
            logits.div_(temperature)  # in place, as OpenRLHF's: the caller's logits are divided too
        # With flash-attn, OpenRLHF's float32 path scores label -100 as 0 (its ignore_index); its torch
        # paths raise on it.
        flash = o["_flash_ce"] and logits.dtype == torch.float32
        logp = ops.token_logprobs(logits, labels, ignore_index=-100 if flash else _NO_IGNORE,
                                  impl=engine(impl, logits.dtype))
        return logp.to(logits.dtype)

    def compute_entropy(logits: torch.Tensor):
        name = "compute_entropy"
        reason = token_refusal(logits)
        if reason is not None:
            count(name, "openrlhf", reason)
            return o[name](logits)
        count(name, "hcrlhf")
        labels = torch.zeros(logits.shape[:-1], dtype=torch.int64, device=logits.device)
        _, entropy = ops.token_logprobs(logits, labels, return_entropy=True, impl=engine(impl, logits.dtype))
        return entropy.to(logits.dtype)

    def compute_approx_kl(log_probs, log_probs_base, log_probs_old=None, kl_estimator="k1",
                          unbiased_gradient=False):
        name = "compute_approx_kl"
        tensors = (log_probs, log_probs_base) + (() if log_probs_old is None or not unbiased_gradient
                                                 else (log_probs_old,))
        reason = None
        if kl_estimator not in ("k1", "k2", "k3"):
            reason = f"kl_estimator {kl_estimator!r} is not k1 / k2 / k3"
        elif not all(isinstance(t, torch.Tensor) and t.dtype in FLOAT_DTYPES for t in tensors) \
                or any(t.shape != log_probs.shape or t.device != log_probs.device for t in tensors):
            reason = "the log-probs are not float tensors of one shape and device"
        if reason is not None:
            count(name, "openrlhf", reason)
            return o[name](log_probs, log_probs_base, log_probs_old, kl_estimator, unbiased_gradient)
        count(name, "hcrlhf")
        # unbiased_gradient: the estimator's value, the gradient of w·k2 (straight through).
        estimator = kl_estimator + ("+" if unbiased_gradient else "")
        old = log_probs_old if unbiased_gradient else None
        kl = ops.kl_penalty(log_probs, log_probs_base, estimator=estimator, clamp=_KL_CLAMP, old_logprobs=old)
        return kl.float()  # OpenRLHF computes and returns float32

    def get_advantages_and_returns(self, values, rewards, action_mask, gamma, lambd):
        name = "get_advantages_and_returns"
        reason = _returns_refusal(rewards, action_mask, values)
        g, lam = unit_number(gamma), unit_number(lambd)
        if reason is None and (g is None or lam is None):
            reason = "gamma / lambd are not numbers in [0, 1]"
        if reason is not None:
            count(name, "openrlhf", reason)
            return o[name](self, values, rewards, action_mask, gamma, lambd)
        count(name, "hcrlhf")
        with torch.no_grad():
            mask = torch.ones_like(rewards, dtype=torch.bool) if action_mask is None else action_mask
            dtype = promoted_dtype(values, rewards, action_mask)  # OpenRLHF multiplies by the mask first
            advantages, returns = ops.gae(rewards, values, mask, g, lam, impl=engine(impl, dtype))
        return advantages.to(dtype), returns.to(dtype)

    def get_cumulative_returns(self, rewards, action_mask, gamma):
        name = "get_cumulative_returns"
        reason = _returns_refusal(rewards, action_mask)
        g = unit_number(gamma)
        if reason is None and g is None:
            reason = "gamma is not a number in [0, 1]"
        if reason is not None:
            count(name, "openrlhf", reason)
            return o[name](self, rewards, action_mask, gamma)
        count(name, "hcrlhf")
        with torch.no_grad():
            mask = torch.ones_like(rewards, dtype=torch.bool) if action_mask is None else action_mask
            # γ-discounted returns: GAE with values 0 and λ = 1.
            _, returns = ops.gae(rewards, torch.zeros_like(rewards), mask, g, 1.0, impl=engine(impl, rewards.dtype))
        return returns.to(rewards.dtype)

    replacements = {
        "log_probs_from_logits": log_probs_from_logits,
        "compute_entropy": compute_entropy,
        "compute_approx_kl": compute_approx_kl,
        "get_advantages_and_returns": get_advantages_and_returns,
        "get_cumulative_returns": get_cumulative_returns,
    }
    for name, fn in replacements.items():
        fn.__doc__ = f"hcrlhf's stand-in for OpenRLHF's ``{name}`` (hcrlhf.integrations.openrlhf); same " \
                     "signature and return conventions."
    return replacements


_patch = PeerPatch(peer="openrlhf", packages=("openrlhf",), patched=PATCHED, load=_load_originals,
                   make=_make_replacements, containers=_containers, logger=logger)
