"""The peers' own code, imported from the installed packages (requirements/peers.txt), for the benchmarks.

Every peer row in a benchmark table calls the peer library's function itself: TRL 1.16
(``trl.trainer.utils.selective_log_softmax`` / ``entropy_from_logits``, ``trl.kernels.ChunkedLogProbFunction``),
verl 0.9.1 (``verl.utils.torch_functional``, ``verl.trainer.ppo.core_algos``) and OpenRLHF 0.11.2
(``openrlhf.models.utils``). Each of them picks its own fast path at run time (TRL its Triton kernel on a
GPU, verl and OpenRLHF flash-attn's cross-entropy when flash-attn is installed): :func:`logprob_paths`
says which one ran, and the tables print it.

Only what cannot be imported is here as code:

* OpenRLHF's GAE is a method of ``RemoteExperienceMaker`` in ``openrlhf/trainer/ppo_utils/experience_maker.py``,
  whose module imports ray and vLLM; :func:`openrlhf_gae` compiles that one method from the installed file's
  source (no copy, no edit).
* Safe RLHF (PKU-Alignment/safe-rlhf on GitHub; the ``safe-rlhf`` name on PyPI is an unrelated placeholder)
  has no installable package: :func:`safe_rlhf_logprobs` and :func:`safe_rlhf_advantages` follow its
  ``safe_rlhf/utils.py`` (``gather_log_probabilities``) and ``safe_rlhf/algorithms/ppo_lag/trainer.py``
  (``add_kl_divergence_regularization`` + ``get_advantages_and_returns``, both run for reward and cost).
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import os
import sys

import torch

# ------------------------------------------------------------------------------------------ loading


@functools.cache
def trl_utils():
    """``trl.trainer.utils`` (TRL 1.16: selective_log_softmax, entropy_from_logits)."""
    return importlib.import_module("trl.trainer.utils")


@functools.cache
def trl_chunked_logprob():
    """``trl.kernels.ChunkedLogProbFunction``, TRL's fused lm_head + log-prob autograd function."""
    return importlib.import_module("trl.kernels").ChunkedLogProbFunction


@functools.cache
def verl_functional():
    """``verl.utils.torch_functional`` (logprobs_from_logits, entropy_from_logits, masked_whiten)."""
    return importlib.import_module("verl.utils.torch_functional")


@functools.cache
def verl_core_algos():
    """``verl.trainer.ppo.core_algos`` (compute_gae_advantage_return, the RLOO / GRPO estimators)."""
    return importlib.import_module("verl.trainer.ppo.core_algos")


@functools.cache
def openrlhf_utils():
    """``openrlhf.models.utils`` (log_probs_from_logits, compute_entropy, compute_approx_kl), loaded without
    ``openrlhf.models.__init__`` (it needs flash-attn) by hcrlhf.integrations.openrlhf's loader."""
    from hcrlhf.integrations.openrlhf import load_openrlhf_module

    return load_openrlhf_module("openrlhf.models.utils")


@functools.cache
def openrlhf_gae():
    """OpenRLHF 0.11.2's ``RemoteExperienceMaker.get_advantages_and_returns`` compiled from the installed
    ``openrlhf/trainer/ppo_utils/experience_maker.py`` (importing that module needs ray and vLLM; the method
    uses neither, nor ``self``). Returns ``f(values, rewards, action_mask, gamma, lambd) -> (advantages, returns)``."""
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("openrlhf is not installed (pip install -r requirements/peers.txt)")
    path = os.path.join(spec.submodule_search_locations[0], "trainer", "ppo_utils", "experience_maker.py")
    with open(path) as handle:
        tree = ast.parse(handle.read(), filename=path)
    method = next(node for cls in tree.body if isinstance(cls, ast.ClassDef) and cls.name == "RemoteExperienceMaker"
                  for node in cls.body
                  if isinstance(node, ast.FunctionDef) and node.name == "get_advantages_and_returns")
    module = ast.Module(body=[method], type_ignores=[])
    namespace = {"torch": torch, "Tuple": tuple}
    exec(compile(module, path, "exec"), namespace)  # the peer's own source, from the installed file
    function = namespace["get_advantages_and_returns"]
    return functools.partial(function, None)


def assert_unpatched() -> None:
    """Refuse to benchmark a peer whose functions hcrlhf.integrations has replaced with hcrlhf's ops (the peer
    rows would time hcrlhf)."""
    for name in ("trl", "verl", "openrlhf"):
        integration = sys.modules.get(f"hcrlhf.integrations.{name}")
        if integration is not None and integration.is_applied():
            raise RuntimeError(f"hcrlhf.integrations has patched {name}: revert it before benchmarking its code")


def versions() -> dict[str, str]:
    """{package: installed version} for trl, verl, openrlhf."""
    from hcrlhf.benchmarks.harness import peer_versions

    return peer_versions()


# ------------------------------------------------------------------------------------------- log-probs
# Each takes logits (B, T, V) and labels (B, T), as the peers' trainers call them, and returns (B, T).


def trl_logprobs(logits, labels):
    return trl_utils().selective_log_softmax(logits, labels)


def verl_logprobs(logits, labels):
    return verl_functional().logprobs_from_logits(logits, labels)


def openrlhf_logprobs(logits, labels):
    return openrlhf_utils().log_probs_from_logits(logits, labels)


def safe_rlhf_logprobs(logits, labels):
    """Safe RLHF's gather_log_probabilities: a full log_softmax in the logits' dtype, then gather."""
    return torch.log_softmax(logits, dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def plain_logprobs(logits, labels):
    """The plain path every peer starts from (fp32 maths): what torch.compile gets as the baseline."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def plain_logprobs_and_entropy(logits, labels):
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return log_p.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(log_p.exp() * log_p).sum(-1)


def trl_logprobs_and_entropy(logits, labels):
    utils = trl_utils()
    return utils.selective_log_softmax(logits, labels), utils.entropy_from_logits(logits)


def verl_logprobs_and_entropy(logits, labels):
    functional = verl_functional()
    return functional.logprobs_from_logits(logits, labels), functional.entropy_from_logits(logits)


def openrlhf_logprobs_and_entropy(logits, labels):
    utils = openrlhf_utils()
    return utils.log_probs_from_logits(logits, labels), utils.compute_entropy(logits)


def logprob_paths(device: torch.device) -> dict[str, str]:
    """Which path each peer's log-prob function takes on `device` (they choose at run time)."""
    assert_unpatched()
    device = torch.device(device)
    trl_kernel = device.type in ("cuda", "xpu") and trl_utils().is_triton_available()
    flash_ce = verl_functional().FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE
    return {
        "trl": "its Triton kernel" if trl_kernel else "gather - per-row logsumexp loop (fp32) / per-row "
                                                      "log_softmax loop (bf16)",
        "verl": "flash-attn cross_entropy" if flash_ce else "logprobs_from_logits_v2 (flash-attn absent): per-row "
                                                            "logsumexp loop (fp32) / per-row log_softmax loop (bf16)",
        "openrlhf": ("flash-attn cross_entropy (fp32) / per-row log_softmax loop (bf16)" if flash_ce else
                     "gather - chunked logsumexp (fp32, flash-attn absent) / per-row log_softmax loop (bf16)"),
    }


# --------------------------------------------------------------------------------------- linear log-probs


def trl_linear_logprobs(hidden, weight, labels):
    """TRL's fused lm_head: ``ChunkedLogProbFunction`` with the vocabulary tile TRL's trainers use (32,768) and
    no optional outputs."""
    chunk = trl_utils()._CHUNKED_LOGPROB_CHUNK_SIZE
    return trl_chunked_logprob().apply(hidden, weight, None, labels, 1.0, chunk, None, 1.0, ())[0]


def unfused_linear_logprobs(hidden, weight, labels):
    """lm_head matmul, then Safe RLHF's log_softmax + gather (the (N, V) logits and log-probs materialised)."""
    return safe_rlhf_logprobs(hidden @ weight.T, labels)


def plain_linear_logprobs(hidden, weight, labels):
    return plain_logprobs(hidden @ weight.T, labels)


def bare_lm_head(hidden, weight, labels):
    """The lm_head matmul alone (its gradient flows from a dummy sum): what the matmul by itself costs."""
    return (hidden @ weight.T).sum(-1)


# ------------------------------------------------------------------------------------------ advantages


def python_loop_gae(rewards, values, mask, gamma, gae_lambda):
    """TRL / Safe RLHF style GAE: zero rewards and values with the mask, one loop over T (Safe RLHF's
    get_advantages_and_returns; OpenRLHF's is the same loop: see :func:`openrlhf_gae`)."""
    mask = mask.to(rewards.dtype)
    values = values * mask
    rewards = rewards * mask
    last = 0.0
    reversed_advantages = []
    length = rewards.size(-1)
    for t in reversed(range(length)):
        next_values = values[:, t + 1] if t < length - 1 else 0.0
        delta = rewards[:, t] + gamma * next_values - values[:, t]
        last = delta + gamma * gae_lambda * last
        reversed_advantages.append(last)
    advantages = torch.stack(reversed_advantages[::-1], dim=1)
    return advantages, advantages + values


def safe_rlhf_advantages(logprobs, ref_logprobs, mask, reward_scores, cost_scores, reward_values, cost_values,
                         *, kl_coef, lagrange_multiplier, gamma=1.0, gae_lambda=0.95, score_clip=50.0):
    """Safe RLHF's reward/cost shaping and two GAE loops, then the λ-combination."""
    end_index = torch.cat([row.nonzero()[-1] for row in mask])  # one host sync per row
    kl_divergence = -kl_coef * (logprobs - ref_logprobs)
    rewards = 0.5 * kl_divergence
    costs = -0.5 * kl_divergence
    reward_clip = torch.clamp(reward_scores, min=-score_clip, max=score_clip)
    cost_clip = torch.clamp(cost_scores, min=-score_clip, max=score_clip)
    rewards = torch.scatter_add(rewards, dim=-1, index=end_index.unsqueeze(-1), src=reward_clip.unsqueeze(-1))
    costs = torch.scatter_add(costs, dim=-1, index=end_index.unsqueeze(-1), src=cost_clip.unsqueeze(-1))
    reward_advantages, reward_returns = python_loop_gae(rewards, reward_values, mask, gamma, gae_lambda)
    cost_advantages, cost_returns = python_loop_gae(costs, cost_values, mask, gamma, gae_lambda)
    advantages = (reward_advantages - lagrange_multiplier * cost_advantages) / (1 + lagrange_multiplier)
    return advantages, reward_advantages, cost_advantages, reward_returns, cost_returns


def rloo_python(logprobs, ref_logprobs, mask, reward_scores, cost_scores, *, group_size, kl_coef,
                lagrange_multiplier, score_clip=50.0):
    """The plain-torch RLOO this project's trainer used before its fused op: masked KL sum, clamp, per-group
    leave-one-out baseline (the train_step benchmark's peer-style side)."""
    kl = ((logprobs - ref_logprobs) * mask).sum(-1)
    returns = torch.clamp(reward_scores - kl_coef * kl, -score_clip, score_clip) - lagrange_multiplier * cost_scores
    grouped = returns.view(-1, group_size)
    baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    return (grouped - baseline).view(-1), returns, kl


def verl_gae(rewards, values, mask, gamma, gae_lambda):
    """verl's compute_gae_advantage_return: GAE, then masked_whiten of the advantages (returns unwhitened)."""
    return verl_core_algos().compute_gae_advantage_return(rewards, values, mask, gamma, gae_lambda)


def outcome_rewards(scores, mask):
    """(B,) scores placed on each row's last valid token, as verl's token_level_rewards carry an outcome reward."""
    last = mask.long().cumsum(-1).argmax(-1, keepdim=True)
    return torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device).scatter(-1, last, scores[:, None])


def verl_rloo(scores, mask, group_ids):
    """verl's compute_rloo_outcome_advantage on outcome rewards; `group_ids` a numpy array of prompt ids."""
    return verl_core_algos().compute_rloo_outcome_advantage(outcome_rewards(scores, mask), mask, group_ids)[0]


def verl_grpo(scores, mask, group_ids):
    """verl's compute_grpo_outcome_advantage (group mean / std) on outcome rewards."""
    return verl_core_algos().compute_grpo_outcome_advantage(outcome_rewards(scores, mask), mask, group_ids)[0]
