"""verl integration: one call routes verl's log-prob, entropy, KL and advantage functions through
hcrlhf's ops (docs/integrations.md#verl).

``apply_to_verl()`` replaces, in every loaded ``verl`` module that holds them by name and in
``verl.trainer.ppo.core_algos.ADV_ESTIMATOR_REGISTRY`` (what ``get_adv_estimator_fn`` returns), these
verl 0.9.1 functions:

* ``verl.utils.torch_functional``: ``logprobs_from_logits``, ``entropy_from_logits``,
  ``entropy_from_logits_with_chunking`` → :func:`hcrlhf.ops.token_logprobs`;
* ``verl.trainer.ppo.core_algos``: ``kl_penalty`` → :func:`hcrlhf.ops.kl_penalty`;
  ``compute_gae_advantage_return`` → :func:`hcrlhf.ops.gae`;
  ``compute_reinforce_plus_plus_outcome_advantage`` → :func:`hcrlhf.ops.gae` (γ-discounted returns,
  whitened); ``compute_grpo_outcome_advantage`` and its ``_vectorized`` twin →
  :func:`hcrlhf.ops.group_advantages`; ``compute_rloo_outcome_advantage`` and its ``_vectorized`` twin
  → :func:`hcrlhf.ops.rloo_advantages`.

Each replacement has the signature and the return conventions (shapes, dtypes, values on masked
positions) of the verl function it replaces. A call hcrlhf cannot serve exactly (docs/integrations.md
lists them) goes to verl's original, counted in :func:`call_counts`. ``revert_verl()`` puts the originals
back; ``verl_patched()`` does both around a block.
"""

from __future__ import annotations

import contextlib
import logging
import numbers
import os
from collections.abc import Iterator

import numpy as np
import torch

from hcrlhf.integrations._patching import (
    FLOAT_DTYPES,
    PeerPatch,
    engine,
    logits_refusal,
    next_valid_fill,
    promoted_dtype,
    supported_version,
    unit_number,
)

__all__ = [
    "SUPPORTED_VERL_VERSIONS",
    "UnsupportedVerlVersionError",
    "apply_to_verl",
    "call_counts",
    "is_applied",
    "reset_call_counts",
    "revert_verl",
    "verl_patched",
]

logger = logging.getLogger(__name__)

# The verl releases whose functions this module was written against and tested with.
SUPPORTED_VERL_VERSIONS = ("0.9.1",)
PATCHED = (
    "logprobs_from_logits", "entropy_from_logits", "entropy_from_logits_with_chunking", "kl_penalty",
    "compute_gae_advantage_return", "compute_reinforce_plus_plus_outcome_advantage",
    "compute_grpo_outcome_advantage", "compute_grpo_vectorized_outcome_advantage",
    "compute_rloo_outcome_advantage", "compute_rloo_vectorized_outcome_advantage",
)
# verl's kl_penalty names → hcrlhf's estimators ("+" keeps its meaning: k2's gradient, straight through).
_KL_NAMES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}
# A label no vocabulary index equals: where verl's torch path raises on -100, hcrlhf must not score it 0.
_NO_IGNORE = -(2**31)


class UnsupportedVerlVersionError(RuntimeError):
    """The installed verl is not one whose internals ``apply_to_verl`` knows."""


# ------------------------------------------------------------------------------------------ public API
def apply_to_verl(*, impl: str = "auto") -> None:
    """Route verl's log-prob, entropy, KL and advantage functions through hcrlhf's ops (the module
    docstring lists them).

    Args:
        impl: the hcrlhf engine, as for every op: "auto" (Triton on CUDA, C++ on CPU when built, else
            torch) | "triton" | "cpp" | "torch". float64 inputs always use "torch".

    Call it in every process that computes what you want accelerated, before verl builds its workers
    (verl's actor keeps the entropy function it finds at construction): the trainer's driver computes
    the advantages and the KL in the rewards, the Ray workers the log-probs, entropies and the KL loss
    (e.g. Ray's ``runtime_env={"worker_process_setup_hook": ...}``). Idempotent; a second call with
    another ``impl`` switches the engine, and picks up verl modules imported since the first.

    Raises:
        UnsupportedVerlVersionError: the installed verl is not one of ``SUPPORTED_VERL_VERSIONS``.
        ImportError: verl is not installed.
        ValueError: unknown ``impl``.
    """
    _patch.apply(impl, "apply_to_verl")


def revert_verl() -> None:
    """Put verl's own functions back wherever :func:`apply_to_verl` placed hcrlhf's (modules imported
    after the patch and the estimator registry included). A no-op when nothing is applied."""
    _patch.revert()


@contextlib.contextmanager
def verl_patched(*, impl: str = "auto") -> Iterator[None]:
    """:func:`apply_to_verl` on entry, :func:`revert_verl` on exit (also on an exception)."""
    apply_to_verl(impl=impl)
    try:
        yield
    finally:
        revert_verl()


def is_applied() -> bool:
    """Whether hcrlhf's replacements are in place in verl."""
    return _patch.applied is not None


def call_counts() -> dict[str, dict[str, int]]:
    """Per patched function, how many calls hcrlhf served and how many went to verl's original
    (``{"kl_penalty": {"hcrlhf": 3, "verl": 0}, ...}``), since the last reset."""
    return _patch.call_counts()


def reset_call_counts() -> None:
    _patch.reset_call_counts()


# ------------------------------------------------------------------------------------------ loading
def _load_originals() -> dict:
    try:
        import verl
    except ImportError as exc:
        raise ImportError(f"hcrlhf.integrations.apply_to_verl needs verl ({SUPPORTED_VERL_VERSIONS[-1]})") from exc
    version = getattr(verl, "__version__", "unknown")
    if not supported_version(version, SUPPORTED_VERL_VERSIONS):
        raise UnsupportedVerlVersionError(
            f"hcrlhf.integrations.apply_to_verl supports verl {', '.join(SUPPORTED_VERL_VERSIONS)}, found verl "
            f"{version}: it replaces verl functions whose signatures and conventions change between releases. "
            f"Install a supported version (pip install 'verl=={SUPPORTED_VERL_VERSIONS[-1]}') or leave verl "
            "unpatched."
        )
    import verl.trainer.ppo.core_algos as core_algos
    import verl.utils.torch_functional as verl_F

    originals = {name: getattr(verl_F, name) for name in PATCHED[:3]}
    originals.update({name: getattr(core_algos, name) for name in PATCHED[3:]})
    # Not replaced; read for verl's conventions.
    originals["_masked_whiten"] = verl_F.masked_whiten
    originals["_flash_ce"] = lambda: bool(verl_F.FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE) and \
        os.environ.get("VERL_DISABLE_FLASH_ATTN_CE", "0") != "1"
    originals["_npu_ce"] = lambda: bool(verl_F.NPU_CROSS_ENTROPY_LOSS_AVAILABLE)
    return originals


def _containers() -> list:
    import sys

    core_algos = sys.modules.get("verl.trainer.ppo.core_algos")
    return [] if core_algos is None else [core_algos.ADV_ESTIMATOR_REGISTRY]


# ------------------------------------------------------------------------------------------ helpers
def _is_float_tensor(*xs) -> bool:
    return all(isinstance(x, torch.Tensor) and x.dtype in FLOAT_DTYPES for x in xs)


def _advantage_refusal(rewards, mask, *others) -> str | None:
    """Why the advantage ops cannot serve these (B, T) inputs as verl computes them (None: they can)."""
    tensors = (rewards, mask) + others
    if not all(isinstance(t, torch.Tensor) for t in tensors):
        return "an argument is not a tensor"
    if rewards.dim() != 2 or any(tuple(t.shape) != tuple(rewards.shape) for t in tensors):
        return "the tensors are not all (B, T) of one shape"
    if any(t.dtype not in (torch.float32, torch.float64) for t in (rewards,) + others):
        return "rewards / values are not float32 or float64 (verl computes in their own dtype)"
    if mask.dtype == torch.bool or mask.dtype.is_complex:
        return "response_mask is bool (verl's arithmetic on it raises)"
    if len({t.device for t in tensors}) != 1:
        return "the tensors are on different devices"
    return None


def _group_ids(index, batch: int, device) -> torch.Tensor | None:
    """verl's ``index`` (uids: a numpy array or sequence, one per row) as dense int64 group ids."""
    try:
        ids = np.asarray(index)
        if ids.shape != (batch,):
            return None
        inverse = np.unique(ids, return_inverse=True)[1].reshape(-1)
    except (TypeError, ValueError):
        return None
    return torch.as_tensor(inverse, dtype=torch.int64, device=device)


# ------------------------------------------------------------------------------------------ replacements
def _make_replacements(originals: dict, impl: str, count) -> dict:
    from hcrlhf import ops

    o = originals
    masked_whiten = o["_masked_whiten"]

    # -------------------------------------------------------------- log-probs and entropy
    token_refusal = logits_refusal

    def entropy_of(logits):
        return ops.token_logprobs(logits, None, return_entropy=True, impl=engine(impl, logits.dtype))

    def logprobs_from_logits(logits, labels, inplace_backward=True):
        name = "logprobs_from_logits"
        reason = token_refusal(logits, labels)
        if reason is None and o["_npu_ce"]() and not o["_flash_ce"]():
            reason = "verl would use torch_npu's cross entropy"
        if reason is not None:
            count(name, "verl", reason)
            return o[name](logits, labels, inplace_backward)
        count(name, "hcrlhf")
        flash = o["_flash_ce"]()
        # verl's flash-attn path returns float32 and scores label -100 as 0 (flash's ignore_index);
        # its torch path keeps the logits' dtype and raises on -100.
        out_dtype = torch.float32 if flash else logits.dtype
        options = dict(ignore_index=-100 if flash else _NO_IGNORE, impl=engine(impl, logits.dtype))
        if flash and inplace_backward and logits.requires_grad and logits.grad_fn is not None:
            try:  # the memory flash-attn would overwrite too; refused for a view of a leaf (ValueError)
                return ops.token_logprobs(logits, labels, inplace_backward=True, **options).to(out_dtype)
            except ValueError:
                pass
        return ops.token_logprobs(logits, labels, **options).to(out_dtype)

    def entropy_from_logits(logits):
        name = "entropy_from_logits"
        reason = token_refusal(logits)
        if reason is not None:
            count(name, "verl", reason)
            return o[name](logits)
        count(name, "hcrlhf")
        return entropy_of(logits).to(logits.dtype)

    def entropy_from_logits_with_chunking(logits, chunk_size=2048):
        name = "entropy_from_logits_with_chunking"
        reason = token_refusal(logits)
        if reason is None and logits.dim() != 2:
            reason = "logits are not (N, V)"
        if reason is None and logits.dtype == torch.float64:
            reason = "float64 logits (verl rounds them to float32 first)"
        if reason is not None:
            count(name, "verl", reason)
            return o[name](logits, chunk_size)
        count(name, "hcrlhf")
        # verl fills a torch.zeros(N) buffer: the default dtype. One streaming pass per row:
        # chunk_size (verl's rows per step) has nothing to bound.
        return entropy_of(logits).to(torch.get_default_dtype())

    # -------------------------------------------------------------- KL
    def kl_penalty(logprob, ref_logprob, kl_penalty):
        name = "kl_penalty"
        estimator = None
        if isinstance(kl_penalty, str):
            plus = kl_penalty.endswith("+")
            base = _KL_NAMES.get(kl_penalty[:-1] if plus else kl_penalty)
            estimator = None if base is None else base + ("+" if plus and base != "k2" else "")
        reason = None
        if estimator is None:
            reason = f"kl_penalty {kl_penalty!r} is not one hcrlhf computes"
        elif not _is_float_tensor(logprob, ref_logprob) or logprob.shape != ref_logprob.shape \
                or logprob.device != ref_logprob.device:
            reason = "logprob / ref_logprob are not float tensors of one shape and device"
        if reason is not None:
            count(name, "verl", reason)
            return o[name](logprob, ref_logprob, kl_penalty)
        count(name, "hcrlhf")
        dtype = torch.promote_types(logprob.dtype, ref_logprob.dtype)  # verl computes in the inputs' dtype
        kl = ops.kl_penalty(logprob, ref_logprob, estimator=estimator)
        return kl.to(dtype)

    # -------------------------------------------------------------- GAE and REINFORCE++
    def compute_gae_advantage_return(token_level_rewards, values, response_mask, gamma, lam):
        name = "compute_gae_advantage_return"
        reason = _advantage_refusal(token_level_rewards, response_mask, values)
        g, lam_ = unit_number(gamma), unit_number(lam)
        if reason is None and (g is None or lam_ is None):
            reason = "gamma / lam are not numbers in [0, 1]"
        if reason is not None:
            count(name, "verl", reason)
            return o[name](token_level_rewards, values, response_mask, gamma, lam)
        count(name, "hcrlhf")
        with torch.no_grad():
            dtype = promoted_dtype(token_level_rewards, values, response_mask)
            advantages, _ = ops.gae(token_level_rewards, values, response_mask, g, lam_,
                                    impl=engine(impl, dtype))
            # verl's scan carries its running advantage through masked positions and keeps it there;
            # its returns are advantages + values everywhere; it whitens every position (masked ones
            # included) with the statistics of the valid ones: verl's own masked_whiten, so that
            # masked positions and its errors (fewer than two valid tokens) stay verl's.
            advantages = next_valid_fill(advantages.to(dtype), response_mask != 0)
            returns = advantages + values
            advantages = masked_whiten(advantages, response_mask)
        return advantages, returns

    def compute_reinforce_plus_plus_outcome_advantage(token_level_rewards, response_mask, config=None, **kwargs):
        name = "compute_reinforce_plus_plus_outcome_advantage"
        reason = _advantage_refusal(token_level_rewards, response_mask)
        gamma = None if config is None else unit_number(getattr(config, "gamma", None))
        if reason is None and gamma is None:
            reason = "config is None or config.gamma is not a number in [0, 1]"
        if reason is not None:
            count(name, "verl", reason)
            return o[name](token_level_rewards, response_mask, config, **kwargs)
        count(name, "hcrlhf")
        with torch.no_grad():
            dtype = token_level_rewards.dtype
            # γ-discounted returns that skip masked positions: GAE with values 0 and λ = 1.
            zeros = torch.zeros_like(token_level_rewards)
            advantages, returns = ops.gae(token_level_rewards, zeros, response_mask, gamma, 1.0, whiten=True,
                                          whiten_variance="unbiased", impl=engine(impl, dtype))
            return advantages.to(promoted_dtype(token_level_rewards, response_mask)), returns.to(dtype)

    # -------------------------------------------------------------- group estimators
    def outcome_inputs(token_level_rewards, response_mask, index):
        reason = _advantage_refusal(token_level_rewards, response_mask)
        groups = None
        if reason is None and token_level_rewards.shape[0] == 0:
            reason = "an empty batch"
        if reason is None:
            groups = _group_ids(index, token_level_rewards.shape[0], token_level_rewards.device)
            if groups is None:
                reason = "index is not one uid per row"
        return reason, groups

    def grpo(name):
        def compute(token_level_rewards, response_mask, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True,
                    config=None):
            reason, groups = outcome_inputs(token_level_rewards, response_mask, index)
            if reason is None and not (isinstance(epsilon, numbers.Real) and epsilon >= 0):
                reason = "epsilon is not a number >= 0"
            if reason is not None:
                count(name, "verl", reason)
                return o[name](token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo, config)
            count(name, "hcrlhf")
            with torch.no_grad():
                scores = token_level_rewards.sum(dim=-1)
                estimator = "grpo" if norm_adv_by_std_in_grpo else "dr_grpo"
                scalars = _group_advantage_scalars(scores, groups, estimator, float(epsilon), impl)
                advantages = scalars.to(scores.dtype).unsqueeze(-1) * response_mask
            return advantages, advantages

        compute.__name__ = name
        return compute

    def rloo(name, vectorized):
        def compute(token_level_rewards, response_mask, index, epsilon=1e-6, config=None, **kwargs):
            reason, groups = outcome_inputs(token_level_rewards, response_mask, index)
            if reason is not None:
                count(name, "verl", reason)
                return o[name](token_level_rewards, response_mask, index, epsilon, config, **kwargs)
            count(name, "hcrlhf")
            with torch.no_grad():
                scores = token_level_rewards.sum(dim=-1)
                advantages = _rloo_scalars(scores, groups, impl)
                sizes = torch.bincount(groups)[groups]
                # A prompt with one response has no leave-one-out baseline: verl's loop keeps its
                # score (as hcrlhf's op), its vectorized version gives 0.
                if vectorized:
                    advantages = torch.where(sizes == 1, 0.0, advantages)
                advantages = advantages.to(scores.dtype).unsqueeze(-1) * response_mask
            return advantages, advantages

        compute.__name__ = name
        return compute

    replacements = {
        "logprobs_from_logits": logprobs_from_logits,
        "entropy_from_logits": entropy_from_logits,
        "entropy_from_logits_with_chunking": entropy_from_logits_with_chunking,
        "kl_penalty": kl_penalty,
        "compute_gae_advantage_return": compute_gae_advantage_return,
        "compute_reinforce_plus_plus_outcome_advantage": compute_reinforce_plus_plus_outcome_advantage,
        "compute_grpo_outcome_advantage": grpo("compute_grpo_outcome_advantage"),
        "compute_grpo_vectorized_outcome_advantage": grpo("compute_grpo_vectorized_outcome_advantage"),
        "compute_rloo_outcome_advantage": rloo("compute_rloo_outcome_advantage", False),
        "compute_rloo_vectorized_outcome_advantage": rloo("compute_rloo_vectorized_outcome_advantage", True),
    }
    for name, fn in replacements.items():
        fn.__doc__ = f"hcrlhf's stand-in for verl's ``{name}`` (hcrlhf.integrations.verl); same signature and " \
                     "return conventions."
        fn.__wrapped_original__ = originals[name]
    return replacements


def _group_advantage_scalars(scores, groups, estimator, epsilon, impl):
    """(B,) GRPO / Dr. GRPO advantages of the sequence scores, as verl's loop computes them: a group's
    mean and unbiased std, ``(s − mean) / (std + epsilon)``; a prompt with one response has mean 0, std 1
    (ops.group_advantages follows verl's rule)."""
    from hcrlhf import ops

    batch = scores.shape[0]
    zeros = torch.zeros(batch, 1, dtype=scores.dtype, device=scores.device)
    mask = torch.ones(batch, 1, dtype=torch.bool, device=scores.device)
    result = ops.group_advantages(zeros, zeros, mask, scores, torch.zeros_like(scores), estimator=estimator,
                                  group_index=groups, kl_coef=0.0, lagrange_multiplier=0.0, eps=epsilon,
                                  impl=engine(impl, scores.dtype))
    return result.advantages


def _rloo_scalars(scores, groups, impl):
    """(B,) leave-one-out advantages of the sequence scores (a prompt with one response keeps its score: baseline 0)."""
    from hcrlhf import ops

    batch = scores.shape[0]
    zeros = torch.zeros(batch, 1, dtype=scores.dtype, device=scores.device)
    mask = torch.ones(batch, 1, dtype=torch.bool, device=scores.device)
    result = ops.rloo_advantages(zeros, zeros, mask, scores, torch.zeros_like(scores), group_index=groups,
                                 kl_coef=0.0, lagrange_multiplier=0.0, impl=engine(impl, scores.dtype))
    return result.advantages


_patch = PeerPatch(peer="verl", packages=("verl",), patched=PATCHED, load=_load_originals,
                   make=_make_replacements, containers=_containers, logger=logger)
