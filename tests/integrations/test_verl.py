"""hcrlhf.integrations.apply_to_verl: every patched verl function gives verl's answer (values, gradients,
dtypes, masked positions), unsupported calls go to verl's original, the patch reverts cleanly (modules
and the advantage-estimator registry), unsupported verl versions are refused, verl's advantage path is
the same patched and unpatched, and verl's own unit tests of these functions pass against the patched
functions (docs/integrations.md#verl).

Accuracy rule (docs/ops.md#how-the-kernels-are-tested), with verl's function as the low-precision
baseline: max |hcrlhf − truth| ≤ 2 · max |verl − truth| + atol, the truth being verl's own function on
the float64 copy of the very same input values.
"""

from __future__ import annotations

import inspect
import random
import sys
import types

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl", reason="verl is not installed (scripts/setup.sh installs requirements/peers.txt)")

from hcrlhf.integrations import (  # noqa: E402
    SUPPORTED_VERL_VERSIONS,
    UnsupportedVerlVersionError,
    apply_to_verl,
    revert_verl,
    verl_patched,
)
from hcrlhf.integrations import verl as integration  # noqa: E402
from hcrlhf.integrations._patching import supported_version  # noqa: E402

if not supported_version(verl.__version__, SUPPORTED_VERL_VERSIONS):
    pytest.skip(f"verl {verl.__version__} installed; these tests cover verl {', '.join(SUPPORTED_VERL_VERSIONS)}",
                allow_module_level=True)

import verl.trainer.ppo.core_algos as core_algos  # noqa: E402
import verl.utils.torch_functional as verl_F  # noqa: E402
from peer_numerics import (  # noqa: E402
    TOKEN_ATOL,
    assert_close,
    attributes_holding,
    grads_of,
    random_logits,
    random_mask,
    truth_logp_entropy,
)

TOKEN_FUNCTIONS = ("logprobs_from_logits", "entropy_from_logits", "entropy_from_logits_with_chunking")
# verl's originals, read before any test patches anything.
ORIGINALS = {name: getattr(verl_F if name in TOKEN_FUNCTIONS else core_algos, name) for name in integration.PATCHED}
REGISTRY = dict(core_algos.ADV_ESTIMATOR_REGISTRY)
GROUP_ESTIMATORS = ("compute_grpo_outcome_advantage", "compute_grpo_vectorized_outcome_advantage",
                    "compute_rloo_outcome_advantage", "compute_rloo_vectorized_outcome_advantage")


@pytest.fixture(autouse=True)
def _unpatched():
    """Every test starts and ends with verl unpatched and the call counters at zero."""
    revert_verl()
    integration.reset_call_counts()
    yield
    revert_verl()
    assert verl_F.logprobs_from_logits is ORIGINALS["logprobs_from_logits"]
    assert core_algos.ADV_ESTIMATOR_REGISTRY == REGISTRY


def patched(name):
    apply_to_verl()
    fn = getattr(verl_F if name in TOKEN_FUNCTIONS else core_algos, name)
    assert fn is not ORIGINALS[name]
    return fn


def served(name, hcrlhf=1, peer=0):
    assert integration.call_counts()[name] == {"hcrlhf": hcrlhf, "verl": peer}, integration.call_counts()[name]


def close_to_verl_everywhere(name, ours, theirs, truth, atol):
    for label, got, base, exact in zip(("advantages", "returns"), ours, theirs, truth):
        assert_close(f"{name} {label}", got, base, exact, atol)


# ------------------------------------------------------------------------------------ log-probs and entropy
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(3, 17), (5,)])
def test_logprobs_from_logits_matches_verl(dtype, shape):
    generator = torch.Generator().manual_seed(31)
    logits, labels = random_logits(shape, 131, dtype, generator)
    upstream = [torch.randn(shape, generator=generator, dtype=torch.float64)]
    ours_fn = patched("logprobs_from_logits")
    x_verl, x_ours, x_64 = (x.clone().requires_grad_() for x in (logits, logits, logits.double()))
    theirs, ours = ORIGINALS["logprobs_from_logits"](x_verl, labels), ours_fn(x_ours, labels)
    truth, _ = truth_logp_entropy(x_64, labels)
    atol_value, atol_grad = TOKEN_ATOL[dtype]
    assert_close("logp", ours, theirs, truth.detach(), atol_value)
    (g_ours,), (g_verl,), (g_64,) = (grads_of([o], upstream, [x]) for o, x in
                                     ((ours, x_ours), (theirs, x_verl), (truth, x_64)))
    assert_close("d logp/d logits", g_ours.to(dtype), g_verl.to(dtype), g_64, atol_grad)
    served("logprobs_from_logits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["entropy_from_logits", "entropy_from_logits_with_chunking"])
def test_entropy_functions_match_verl(dtype, name):
    generator = torch.Generator().manual_seed(32)
    shape = (4, 9) if name == "entropy_from_logits" else (23,)  # the chunked one takes (N, V)
    logits, _ = random_logits(shape, 257, dtype, generator)
    upstream = [torch.randn(shape, generator=generator, dtype=torch.float64)]
    ours_fn = patched(name)
    x_verl, x_ours, x_64 = (x.clone().requires_grad_() for x in (logits, logits, logits.double()))
    args = () if name == "entropy_from_logits" else (5,)  # chunk_size: not used by hcrlhf
    theirs, ours = ORIGINALS[name](x_verl, *args), ours_fn(x_ours, *args)
    # the chunked one rounds its chunk to float32 first: that is the input the truth sees
    _, truth = truth_logp_entropy(x_64, None)
    atol_value, atol_grad = TOKEN_ATOL[dtype]
    assert_close("entropy", ours, theirs, truth.detach(), atol_value)
    (g_ours,), (g_verl,), (g_64,) = (grads_of([o], upstream, [x]) for o, x in
                                     ((ours, x_ours), (theirs, x_verl), (truth, x_64)))
    assert_close("d entropy/d logits", g_ours.to(dtype), g_verl.to(dtype), g_64, atol_grad)
    served(name)


# ------------------------------------------------------------------------------------ KL
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kl_name", ["kl", "k1", "abs", "mse", "k2", "low_var_kl", "k3", "k3+", "low_var_kl+", "kl+",
                                     "abs+", "k2+"])
def test_kl_penalty_matches_verl(dtype, kl_name):
    generator = torch.Generator().manual_seed(33)
    logprob = -torch.rand(6, 11, generator=generator, dtype=torch.float64) * 4
    ref = -torch.rand(6, 11, generator=generator, dtype=torch.float64) * 4
    ref[0, :4] = torch.tensor([-40.0, 0.0, -25.0, 30.0])  # log-ratios past verl's k3 clamps (±20 and ±10)
    logprob, ref = logprob.to(dtype), ref.to(dtype)
    upstream = [torch.randn(6, 11, generator=generator, dtype=torch.float64)]
    ours_fn = patched("kl_penalty")
    leaves = [[x.clone().requires_grad_() for x in pair] for pair in ((logprob, ref), (logprob, ref),
                                                                      (logprob.double(), ref.double()))]
    theirs = ORIGINALS["kl_penalty"](*leaves[0], kl_penalty=kl_name)
    ours = ours_fn(*leaves[1], kl_penalty=kl_name)
    truth = ORIGINALS["kl_penalty"](*leaves[2], kl_penalty=kl_name)  # verl's formula in float64
    assert_close("kl", ours, theirs, truth.detach(), 1e-6)
    grads_verl, grads_ours, grads_64 = (grads_of([out], upstream, leaf)
                                        for out, leaf in zip((theirs, ours, truth), leaves))
    for g_ours, g_verl, g_64, what in zip(grads_ours, grads_verl, grads_64, ("logprob", "ref_logprob")):
        assert_close(f"d kl/d {what}", g_ours.to(dtype), g_verl.to(dtype), g_64, 1e-6)
    served("kl_penalty")


# ------------------------------------------------------------------------------------ GAE and REINFORCE++
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 1.0), (0.99, 0.95), (0.7, 0.0)])
def test_gae_matches_verl_on_every_position(dtype, gamma, lam):
    """verl's GAE carries its running advantage through masked positions and whitens every position
    (masked ones too, with the valid positions' statistics); the replacement reproduces all of it."""
    generator = torch.Generator().manual_seed(34)
    rewards = torch.randn(7, 19, generator=generator, dtype=torch.float64)
    values = torch.randn(7, 19, generator=generator, dtype=torch.float64)
    mask = random_mask(7, 19, generator)
    ours_fn = patched("compute_gae_advantage_return")
    theirs = ORIGINALS["compute_gae_advantage_return"](rewards.to(dtype), values.to(dtype), mask, gamma, lam)
    ours = ours_fn(rewards.to(dtype), values.to(dtype), mask, gamma=gamma, lam=lam)
    truth = ORIGINALS["compute_gae_advantage_return"](rewards, values, mask.double(), gamma, lam)
    close_to_verl_everywhere("gae", ours, theirs, truth, 1e-5 if dtype == torch.float32 else 1e-12)
    assert (ours[0][mask == 0] != 0).any(), "the masked positions are not exercised"
    served("compute_gae_advantage_return")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_plus_plus_matches_verl(dtype, gamma):
    from verl.trainer.config import AlgoConfig

    generator = torch.Generator().manual_seed(35)
    rewards = torch.randn(6, 13, generator=generator, dtype=torch.float64)
    mask = random_mask(6, 13, generator)
    config = AlgoConfig(gamma=gamma)
    ours_fn = patched("compute_reinforce_plus_plus_outcome_advantage")
    theirs = ORIGINALS["compute_reinforce_plus_plus_outcome_advantage"](rewards.to(dtype), mask, config=config)
    ours = ours_fn(token_level_rewards=rewards.to(dtype), response_mask=mask, config=config)
    truth = ORIGINALS["compute_reinforce_plus_plus_outcome_advantage"](rewards, mask.double(), config=config)
    close_to_verl_everywhere("reinforce++", ours, theirs, truth, 1e-5 if dtype == torch.float32 else 1e-12)
    served("compute_reinforce_plus_plus_outcome_advantage")


# ------------------------------------------------------------------------------------ group estimators
def uneven_groups(generator):
    """uids as verl makes them (strings, one per row): uneven groups, shuffled, one singleton."""
    sizes = [4, 1, 3, 2, 5]
    uids = np.array([f"uid-{g}" for g, n in enumerate(sizes) for _ in range(n)], dtype=object)
    return uids[torch.randperm(len(uids), generator=generator).numpy()]


@pytest.mark.parametrize("name", GROUP_ESTIMATORS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("option", ["default", "alternative"])
def test_group_estimators_match_verl(name, dtype, option):
    generator = torch.Generator().manual_seed(36)
    index = uneven_groups(generator)
    batch = len(index)
    rewards = torch.randn(batch, 7, generator=generator, dtype=torch.float64)
    mask = random_mask(batch, 7, generator)
    kwargs = {}
    if "grpo" in name and option == "alternative":
        kwargs = dict(norm_adv_by_std_in_grpo=False)  # Dr. GRPO
    elif option == "alternative":
        kwargs = dict(epsilon=0.1)  # not used by RLOO
    ours_fn = patched(name)
    theirs = ORIGINALS[name](rewards.to(dtype), mask, index, **kwargs)
    ours = ours_fn(rewards.to(dtype), mask, index, **kwargs)
    truth = ORIGINALS[name](rewards, mask.double(), index, **kwargs)
    # float64: verl's GRPO divides a lone response's score by a float32 (1 + epsilon), and its vectorized
    # GRPO computes the group statistics in float32; hcrlhf computes float64 throughout
    atol = 1e-5 if dtype == torch.float32 else 1e-6 if "grpo_vectorized" in name else 1e-7
    close_to_verl_everywhere(name, ours, theirs, truth, atol)
    assert ours[0] is ours[1]  # verl returns one tensor twice
    served(name)


def test_grpo_epsilon_reaches_the_op():
    generator = torch.Generator().manual_seed(37)
    index = uneven_groups(generator)
    rewards = torch.randn(len(index), 5, generator=generator)
    mask = torch.ones(len(index), 5)
    ours_fn = patched("compute_grpo_outcome_advantage")
    for epsilon in (1e-6, 0.5):
        theirs, _ = ORIGINALS["compute_grpo_outcome_advantage"](rewards, mask, index, epsilon=epsilon)
        ours, _ = ours_fn(rewards, mask, index, epsilon=epsilon)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mask_dtype", [torch.int64, torch.float64])
@pytest.mark.parametrize("name", ["compute_gae_advantage_return", "compute_reinforce_plus_plus_outcome_advantage",
                                  *GROUP_ESTIMATORS])
def test_advantage_dtypes_follow_verls_type_promotion(name, mask_dtype):
    """float32 rewards with an integer mask stay float32; with a float64 mask verl's products are float64."""
    from verl.trainer.config import AlgoConfig

    generator = torch.Generator().manual_seed(45)
    index = uneven_groups(generator)
    rewards = torch.randn(len(index), 6, generator=generator)
    values = torch.randn(len(index), 6, generator=generator)
    mask = random_mask(len(index), 6, generator).to(mask_dtype)
    if name == "compute_gae_advantage_return":
        args, kwargs = (rewards, values, mask, 0.9, 0.9), {}
    elif name == "compute_reinforce_plus_plus_outcome_advantage":
        args, kwargs = (rewards, mask), {"config": AlgoConfig(gamma=0.9)}
    else:
        args, kwargs = (rewards, mask, index), {}
    theirs = ORIGINALS[name](*args, **kwargs)
    ours = patched(name)(*args, **kwargs)
    for label, a, b in zip(("advantages", "returns"), ours, theirs):
        assert a.dtype == b.dtype, f"{label}: {a.dtype} != verl's {b.dtype}"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=label)
    served(name)


# ------------------------------------------------------------------------------------ fallbacks
def test_calls_hcrlhf_does_not_serve_go_to_verl():
    generator = torch.Generator().manual_seed(38)
    rewards, values = torch.randn(3, 6, generator=generator), torch.randn(3, 6, generator=generator)
    mask = torch.ones(3, 6)
    apply_to_verl()
    # gamma as a tensor, and bf16 rewards (verl computes in their dtype): verl's answer, bit for bit
    for args in ((rewards, values, mask, torch.tensor(0.9), 0.95),
                 (rewards.bfloat16(), values.bfloat16(), mask, 1.0, 1.0)):
        for ours, theirs in zip(core_algos.compute_gae_advantage_return(*args),
                                ORIGINALS["compute_gae_advantage_return"](*args)):
            assert torch.equal(ours, theirs)
    served("compute_gae_advantage_return", hcrlhf=0, peer=2)
    # a bool mask: verl's arithmetic raises, and so does the patched function (verl's error)
    with pytest.raises((RuntimeError, TypeError)):
        core_algos.compute_gae_advantage_return(rewards, values, mask.bool(), 1.0, 1.0)
    # an estimator hcrlhf does not compute, and one verl does not either
    logprob, ref = torch.randn(2, 3, generator=generator), torch.randn(2, 3, generator=generator)
    with pytest.raises(NotImplementedError):
        core_algos.kl_penalty(logprob, ref, "full")
    # REINFORCE++ without a config: verl's assertion
    with pytest.raises(AssertionError):
        core_algos.compute_reinforce_plus_plus_outcome_advantage(rewards, mask)
    # an index that is not one uid per row
    with pytest.raises(Exception):  # noqa: B017 - verl's own failure, whatever it is
        core_algos.compute_grpo_outcome_advantage(rewards, mask, np.array(["a", "b"]))
    counts = integration.call_counts()
    assert counts["kl_penalty"]["verl"] == 1 and counts["compute_grpo_outcome_advantage"]["verl"] == 1
    assert counts["compute_reinforce_plus_plus_outcome_advantage"] == {"hcrlhf": 0, "verl": 1}


def test_label_minus_100_is_an_error_as_in_verls_torch_path():
    logits, labels = random_logits((2, 3), 11, torch.float32, torch.Generator().manual_seed(39))
    labels[0, 0] = -100
    with pytest.raises((ValueError, RuntimeError)):
        ORIGINALS["logprobs_from_logits"](logits, labels)
    with pytest.raises((ValueError, RuntimeError)):
        patched("logprobs_from_logits")(logits, labels)


# ------------------------------------------------------------------------------------ patching
def test_replacements_have_verl_signatures():
    apply_to_verl()

    def params(fn):
        return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]

    for name in integration.PATCHED:
        current = getattr(verl_F if name in TOKEN_FUNCTIONS else core_algos, name)
        assert params(current) == params(ORIGINALS[name]), name


def test_patch_and_revert_round_trip(monkeypatch):
    originals = list(ORIGINALS.values())
    before = attributes_holding(("verl",), originals)
    assert ("verl.trainer.ppo.core_algos", "kl_penalty") in before
    early = types.ModuleType("verl._hcrlhf_test_early")  # imported a function by name before the patch
    early.logprobs_from_logits = ORIGINALS["logprobs_from_logits"]
    monkeypatch.setitem(sys.modules, early.__name__, early)
    before = attributes_holding(("verl",), originals)

    apply_to_verl()
    assert integration.is_applied()
    assert attributes_holding(("verl",), originals) == []
    assert early.logprobs_from_logits is verl_F.logprobs_from_logits
    # the registry that compute_advantage dispatches through
    for key in ("gae", "grpo", "rloo", "reinforce_plus_plus", "grpo_vectorized", "rloo_vectorized"):
        assert core_algos.get_adv_estimator_fn(key) is not REGISTRY[key]
    assert core_algos.get_adv_estimator_fn("remax") is REGISTRY["remax"]  # not patched
    replacement = core_algos.kl_penalty
    apply_to_verl()  # idempotent
    assert core_algos.kl_penalty is replacement

    revert_verl()
    assert not integration.is_applied()
    assert attributes_holding(("verl",), originals) == before
    assert core_algos.ADV_ESTIMATOR_REGISTRY == REGISTRY
    revert_verl()  # a no-op

    apply_to_verl(impl="torch")
    apply_to_verl(impl="auto")  # switching the engine swaps the replacements, never stacks them
    assert attributes_holding(("verl",), originals) == []
    revert_verl()
    with pytest.raises(RuntimeError, match="boom"), verl_patched():
        assert core_algos.kl_penalty is not ORIGINALS["kl_penalty"]
        raise RuntimeError("boom")
    assert core_algos.kl_penalty is ORIGINALS["kl_penalty"] and not integration.is_applied()
    with pytest.raises(ValueError, match="impl must be one of"):
        apply_to_verl(impl="cuda")


@pytest.mark.parametrize("version", ["0.9.0", "0.10.0", "1.0.0.dev0", "unknown"])
def test_unsupported_verl_versions_are_refused(monkeypatch, version):
    monkeypatch.setattr(verl, "__version__", version)
    with pytest.raises(UnsupportedVerlVersionError, match=r"supports verl 0\.9\.1, found verl " + version):
        apply_to_verl()
    assert not integration.is_applied() and core_algos.kl_penalty is ORIGINALS["kl_penalty"]


# ------------------------------------------------------------------------------------ end to end
def advantage_path(estimator, batch):
    """What verl's ray_trainer does between the rollout and the update, without DataProto: the KL
    penalty in the rewards (apply_kl_penalty), then compute_advantage's call of the estimator (GAE
    directly, the others through the registry)."""
    from verl.trainer.config import AlgoConfig

    kld = core_algos.kl_penalty(batch["old_log_probs"], batch["ref_log_prob"], kl_penalty="low_var_kl")
    kld = kld * batch["response_mask"]
    token_level_rewards = batch["token_level_scores"] - 0.05 * kld
    if estimator == "gae":
        return core_algos.compute_gae_advantage_return(token_level_rewards=token_level_rewards,
                                                       values=batch["values"], response_mask=batch["response_mask"],
                                                       gamma=0.99, lam=0.95)
    fn = core_algos.get_adv_estimator_fn(estimator)
    return fn(token_level_rewards=token_level_rewards, response_mask=batch["response_mask"],
              config=AlgoConfig(gamma=1.0), index=batch["uid"])


@pytest.mark.parametrize("estimator", ["gae", "grpo", "grpo_vectorized", "rloo", "rloo_vectorized",
                                       "reinforce_plus_plus"])
def test_verl_advantage_path_is_the_same_patched_and_unpatched(estimator):
    generator = torch.Generator().manual_seed(40)
    batch_size, length = 12, 16
    response_mask = torch.zeros(batch_size, length)
    lengths = torch.randint(3, length + 1, (batch_size,), generator=generator)
    for row, n in enumerate(lengths.tolist()):
        response_mask[row, :n] = 1.0  # right-padded responses, as verl's rollouts
    scores = torch.zeros(batch_size, length)
    scores[torch.arange(batch_size), lengths - 1] = torch.randn(batch_size, generator=generator)  # outcome reward
    batch = {
        "old_log_probs": -torch.rand(batch_size, length, generator=generator) * 3,
        "ref_log_prob": -torch.rand(batch_size, length, generator=generator) * 3,
        "values": torch.randn(batch_size, length, generator=generator),
        "token_level_scores": scores, "response_mask": response_mask,
        "uid": np.array([f"prompt-{i // 4}" for i in range(batch_size)], dtype=object),
    }
    plain = advantage_path(estimator, batch)
    with verl_patched():
        ours = advantage_path(estimator, batch)
    for label, a, b in zip(("advantages", "returns"), ours, plain):
        assert a.shape == b.shape and a.dtype == b.dtype, label
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"{estimator} {label}")
    assert (plain[0].abs() > 1e-3).any()
    counts = integration.call_counts()
    assert counts["kl_penalty"] == {"hcrlhf": 1, "verl": 0}
    assert sum(c["hcrlhf"] for name, c in counts.items() if name != "kl_penalty") == 1
    assert sum(c["verl"] for c in counts.values()) == 0


# ------------------------------------------------------------------------------------ ported from verl
# The tests below restate verl's own unit tests of the functions hcrlhf patches, run against the
# patched functions (so hcrlhf computes). Ported from github.com/volcengine/verl at commit
# b178a3cd56f58b2d502255daba591e92833930a7 (the newest snapshot available here; its files for these
# functions match the 0.9.1 release's behaviour):
#   tests/trainer/ppo/test_core_algos_on_cpu.py  (multi-turn GAE, RLOO / GRPO loop vs vectorized)
#   tests/trainer/config/test_algo_config_on_cpu.py  (TestAlgoCompute: GAE and GRPO with an AlgoConfig)
#   tests/utils/test_linear_cross_entropy.py  (torch reference vs verl's logprobs/entropy, CPU-sized)
# verl's registry tests (TestRegisterAdvEst) exercise register_adv_est, which hcrlhf does not patch.


def test_ported_multi_turn_gae_skips_observation_tokens():
    """verl: the advantages and (masked) returns do not depend on the values at observation tokens."""
    rng = random.Random(41)
    gamma, lam = rng.uniform(0.0, 1.0), rng.uniform(0.0, 1.0)
    rewards = torch.tensor([[0.0, 0.0, 0.1, 0.1, 0.1, 0.0, 0.0, 0.1, 1.0, 0.0, 0.0]])
    observation = [0, 1, 5, 6]  # masked tokens between the turns; the values there are arbitrary
    shared = torch.tensor([0.0, 0.0, 4.0, 5.0, 6.0, 0.0, 0.0, 7.0, 9.0, 0.0, 0.0])
    values = []
    for _ in range(2):
        row = shared.clone()
        row[observation] = torch.tensor([rng.uniform(-100.0, 100.0) for _ in observation])
        values.append(row[None])
    response_mask = torch.tensor([[0, 0, 1, 1, 1, 0, 0, 1, 1, 0, 0]], dtype=torch.float)
    gae = patched("compute_gae_advantage_return")
    adv1, ret1 = gae(rewards, values[0], response_mask, gamma, lam)
    adv2, ret2 = gae(rewards, values[1], response_mask, gamma, lam)
    assert torch.equal(adv1, adv2)
    assert torch.equal(ret1 * response_mask, ret2 * response_mask)
    served("compute_gae_advantage_return", hcrlhf=2)


def _verl_group_index(batch_size, num_groups, rng):
    """verl's helper: every group at least 2 rows, the rest spread at random, shuffled."""
    counts = [2] * num_groups
    for _ in range(batch_size - 2 * num_groups):
        counts[rng.randrange(num_groups)] += 1
    index = [g for g, c in enumerate(counts) for _ in range(c)]
    rng.shuffle(index)
    return np.asarray(index, dtype=np.int64)


def _verl_random_mask(batch_size, seq_len):
    mask = torch.randint(0, 2, (batch_size, seq_len)).float()
    mask[mask.sum(-1) == 0, -1] = 1.0  # every row keeps one valid token
    return mask


@pytest.mark.parametrize(("batch_size", "seq_len", "num_groups", "seed"), [(64, 128, 5, 0), (128, 256, 8, 1),
                                                                          (512, 512, 10, 2)])
@pytest.mark.parametrize("estimator", ["rloo", "grpo"])
def test_ported_loop_and_vectorized_estimators_agree(batch_size, seq_len, num_groups, seed, estimator):
    torch.manual_seed(seed)
    index = _verl_group_index(batch_size, num_groups, random.Random(seed))
    response_mask = _verl_random_mask(batch_size, seq_len)
    token_level_rewards = torch.randn(batch_size, seq_len) * response_mask
    loop = patched(f"compute_{estimator}_outcome_advantage")
    vectorized = patched(f"compute_{estimator}_vectorized_outcome_advantage")
    adv1, ret1 = loop(token_level_rewards=token_level_rewards, response_mask=response_mask, index=index)
    adv2, ret2 = vectorized(token_level_rewards=token_level_rewards, response_mask=response_mask, index=index)
    assert adv1.shape == adv2.shape == ret1.shape == ret2.shape == (batch_size, seq_len)
    assert torch.allclose(adv1, adv2, rtol=1e-5, atol=1e-6)
    assert torch.allclose(ret1, ret2, rtol=1e-5, atol=1e-6)
    served(f"compute_{estimator}_outcome_advantage")
    served(f"compute_{estimator}_vectorized_outcome_advantage")


def test_ported_gae_with_an_algo_config():
    from verl.trainer.config import AlgoConfig

    config = AlgoConfig(gamma=0.99, lam=0.95, adv_estimator="gae")
    assert core_algos.get_adv_estimator_fn(config.adv_estimator) is not None
    torch.manual_seed(42)
    advantages, returns = patched("compute_gae_advantage_return")(
        token_level_rewards=torch.randn(2, 5), values=torch.randn(2, 5), response_mask=torch.ones(2, 5),
        gamma=config.gamma, lam=config.lam)
    assert advantages.shape == returns.shape == (2, 5)
    served("compute_gae_advantage_return")


def test_ported_grpo_with_an_algo_config():
    from verl.trainer.config import AlgoConfig

    config = AlgoConfig(adv_estimator="grpo", norm_adv_by_std_in_grpo=True)
    rewards = torch.tensor([[1.0, 0.5, 0.0], [2.0, 1.0, 0.0], [0.5, 0.2, 0.0], [1.5, 0.8, 0.0]])
    advantages, returns = patched("compute_grpo_outcome_advantage")(
        token_level_rewards=rewards, response_mask=torch.ones(4, 3), index=np.array([0, 0, 1, 1]),
        norm_adv_by_std_in_grpo=config.norm_adv_by_std_in_grpo)
    assert advantages.shape == returns.shape == (4, 3)
    # (beyond the port) by hand: each group of two scores {a, b} gives ±(b − a)/2 / (|b − a|/√2 + 1e-6)
    expected = torch.tensor([-1.0, 1.0, -1.0, 1.0]) * (1 / np.sqrt(2)) / (1 + 1e-6 * np.sqrt(2) / 1.5)
    torch.testing.assert_close(advantages[:2, 0], expected[:2], rtol=1e-5, atol=1e-6)
    served("compute_grpo_outcome_advantage")


def test_ported_logprobs_and_entropy_match_the_torch_reference():
    """verl's linear-cross-entropy test, first comparison: log-probs and entropy of hidden @ weightᵀ at
    temperature 1.5 from torch's cross_entropy / softmax vs verl's logprobs_from_logits and
    entropy_from_logits, values and gradients of (hidden, weight). CPU-sized (verl: up to 8192 × 4096
    × 152k on a GPU); the inputs are bf16 cast to float32, as verl's."""
    torch.manual_seed(43)
    num_tokens, hidden_size, vocab_size, temperature = 97, 64, 1531, 1.5
    hidden = torch.empty(1, num_tokens, hidden_size, dtype=torch.bfloat16).uniform_(-0.5, 0.5).requires_grad_()
    weight = torch.empty(vocab_size, hidden_size, dtype=torch.bfloat16).uniform_(-0.5, 0.5).requires_grad_()
    labels = torch.randint(0, vocab_size, (1, num_tokens))
    logprobs_fn, entropy_fn = patched("logprobs_from_logits"), patched("entropy_from_logits")

    def torch_reference():
        logits = hidden.squeeze(0).float() @ weight.float().T / temperature
        p = logits.softmax(-1)
        entropy = logits.logsumexp(-1) - (p * logits).sum(-1)
        return -torch.nn.functional.cross_entropy(logits, labels.squeeze(0), reduction="none"), entropy

    def verl_path():
        logits = hidden.squeeze(0).float() @ weight.float().T
        logits /= temperature
        return logprobs_fn(logits=logits, labels=labels.squeeze(0), inplace_backward=False), entropy_fn(logits)

    (ref_logp, ref_entropy), (logp, entropy) = torch_reference(), verl_path()
    torch.testing.assert_close(ref_logp, logp, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ref_entropy, entropy, atol=1e-4, rtol=1e-4)
    g_entropy = torch.empty(num_tokens).uniform_(-0.5, 0.5)
    g_logp = torch.empty(num_tokens).uniform_(-1, 1)
    ref_grads = torch.autograd.grad((ref_entropy, ref_logp), (hidden, weight), (g_entropy, g_logp))
    grads = torch.autograd.grad((entropy, logp), (hidden, weight), (g_entropy, g_logp))
    for a, b in zip(ref_grads, grads):
        torch.testing.assert_close(a, b, atol=1e-2, rtol=1e-4)
    served("logprobs_from_logits")
    served("entropy_from_logits")


def test_patched_token_functions_run_under_torch_compile():
    """verl's FSDP engine wraps entropy_from_logits in torch.compile(dynamic=True) at construction: the
    replacement traces (hcrlhf's kernels are torch.library custom ops). Dynamo only (backend "eager"):
    inductor's CPU code generation needs a C++ toolchain and minutes."""
    generator = torch.Generator().manual_seed(44)
    logits, labels = random_logits((4, 7), 33, torch.float32, generator)
    logits.requires_grad_()
    entropy = torch.compile(patched("entropy_from_logits"), dynamic=True, backend="eager")(logits)
    logp = torch.compile(patched("logprobs_from_logits"), dynamic=True, backend="eager")(logits, labels)
    truth_logp, truth_entropy = truth_logp_entropy(logits.detach(), labels)
    torch.testing.assert_close(entropy.double(), truth_entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logp.double(), truth_logp, rtol=1e-5, atol=1e-5)
    (entropy.sum() + logp.sum()).backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
