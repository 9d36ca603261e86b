"""ops.group_advantages: every impl against the float64 reference, the peers' own functions (verl) and
formulas (OpenRLHF, TRL), and hand-computed cases (docs/ops.md#group_advantages)."""

import math

import pytest
import torch
from numerics import IMPLS, assert_matches_reference, interpreter_sized, make_mask, randn, require_impl

from hcrlhf import ops, reference

pytestmark = pytest.mark.usefixtures("poisoned_outputs")

UNEVEN_INDEX = [7, 3, 7, 11, 3, 7, -2, 3, 11, 7]  # sizes 4, 3, 2, 1, in no particular order


def make_inputs(batch, length, generator, mask_kind="holes", dtype=torch.float32):
    tensors = dict(
        logprobs=randn((batch, length), generator, 0.5) - 1.0,
        ref_logprobs=randn((batch, length), generator, 0.5) - 1.0,
        mask=make_mask(mask_kind, batch, length, generator),
        reward_scores=randn((batch,), generator, 3.0),
        cost_scores=randn((batch,), generator, 3.0),
    )
    return {k: v if v.dtype == torch.bool else v.to(dtype) for k, v in tensors.items()}


def as_float64(inputs):
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


def check(impl, inputs, atol=2e-5, **options):
    require_impl(impl)
    got = ops.group_advantages(**inputs, **options, impl=impl)
    truth = reference.group_advantages(**as_float64(inputs), **options)
    low = reference.group_advantages(**inputs, **options)
    scale = 1.0 + max(t.nan_to_num(0).abs().max().item() if t.numel() else 0.0 for t in truth)
    float64 = inputs["logprobs"].dtype == torch.float64
    for name, g, t, lo in zip(ops.GroupAdvantages._fields, got, truth, low):
        assert g.dtype == (torch.float64 if float64 else torch.float32), f"{impl} {name}: dtype {g.dtype}"
        nan = torch.isnan(t)  # only the returns of NaN-scored rows (mask_nan_rewards)
        assert torch.equal(torch.isnan(g), nan), f"{impl} {name}: NaN at other positions than the reference"
        assert_matches_reference(f"{impl} {name}", g.masked_fill(nan, 0), t.masked_fill(nan, 0),
                                 lo.masked_fill(torch.isnan(lo), 0), atol=atol * scale)
    return got


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo"])
@pytest.mark.parametrize("grouping", ["size", "index"])
@pytest.mark.parametrize("per_token", [False, True])
def test_grouped_estimators_match_reference(impl, estimator, grouping, per_token, generator):
    inputs = make_inputs(10, 37, generator)
    group = dict(group_size=5) if grouping == "size" else dict(group_index=torch.tensor(UNEVEN_INDEX))
    got = check(impl, inputs, estimator=estimator, **group, kl_coef=0.1, lagrange_multiplier=1.3,
                kl_estimator="k3", per_token=per_token)
    assert got.advantages.shape == ((10, 37) if per_token else (10,))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
@pytest.mark.parametrize("whiten_variance", ["unbiased", "population"])
def test_reinforce_pp_matches_reference(impl, kl_estimator, whiten_variance, generator):
    shape = interpreter_sized(impl, (7, 301))
    got = check(impl, make_inputs(*shape, generator), estimator="reinforce_pp", kl_coef=0.05,
                lagrange_multiplier=0.7, kl_estimator=kl_estimator, whiten_variance=whiten_variance)
    assert got.advantages.shape == got.returns.shape == got.kl.shape == shape


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "reinforce_pp"])
@pytest.mark.parametrize("score_clip,clip_before_kl", [(None, False), (1.0, False), (1.0, True)])
@pytest.mark.parametrize("mask_kind", ["left_padded", "empty_rows"])
def test_clip_multiplier_and_masks(impl, estimator, score_clip, clip_before_kl, mask_kind, generator):
    group = {} if estimator == "reinforce_pp" else dict(group_size=3)
    check(impl, make_inputs(*interpreter_sized(impl, (6, 1001)), generator, mask_kind), estimator=estimator,
          **group, kl_coef=0.05, lagrange_multiplier=torch.tensor(0.6), score_clip=score_clip,
          clip_before_kl=clip_before_kl)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("estimator", ["grpo", "reinforce_pp"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_and_strided(impl, estimator, dtype, generator):
    big = make_inputs(8, 90, generator, "holes", dtype)
    inputs = {k: v[:, ::3] if v.dim() == 2 else v for k, v in big.items()}
    group = {} if estimator == "reinforce_pp" else dict(group_size=4)
    check(impl, inputs, estimator=estimator, **group, kl_coef=0.1, lagrange_multiplier=2.0)


@pytest.mark.parametrize("impl", ["torch", "cpp"])
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "reinforce_pp"])
def test_float64(impl, estimator, generator):
    group = {} if estimator == "reinforce_pp" else dict(group_index=torch.tensor(UNEVEN_INDEX))
    check(impl, make_inputs(10, 30, generator, dtype=torch.float64), atol=1e-12, estimator=estimator, **group,
          kl_coef=0.1, lagrange_multiplier=0.5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("estimator", ["grpo", "dr_grpo", "reinforce_pp"])
def test_nan_rewards_are_left_out(impl, estimator, generator):
    """mask_nan_rewards: a NaN reward or cost gives advantage 0 and the other rows are exactly what
    they are without the NaN rows (TRL's unscorable completions); the returns keep the NaN."""
    inputs = make_inputs(10, 23, generator)
    inputs["reward_scores"][[1, 6]] = math.nan  # row 6 is the whole of its group
    inputs["cost_scores"][8] = math.nan
    group = {} if estimator == "reinforce_pp" else dict(group_index=torch.tensor(UNEVEN_INDEX))
    options = dict(estimator=estimator, kl_coef=0.1, lagrange_multiplier=0.8, mask_nan_rewards=True,
                   per_token=True)
    got = check(impl, inputs, **group, **options)
    keep = torch.tensor([i not in (1, 6, 8) for i in range(10)])
    assert (got.advantages[~keep] == 0).all()
    assert torch.isnan(got.returns[~keep][inputs["mask"][~keep]]).all()
    kept = {k: v[keep] for k, v in as_float64(inputs).items()}
    group = {} if estimator == "reinforce_pp" else dict(group_index=torch.tensor(UNEVEN_INDEX)[keep])
    alone = reference.group_advantages(**kept, **group, **{**options, "mask_nan_rewards": False})
    torch.testing.assert_close(got.advantages[keep].double(), alone.advantages, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_integer_scores(impl, generator):
    require_impl(impl)
    inputs = make_inputs(6, 9, generator)
    inputs["reward_scores"] = torch.tensor([1, 0, 1, 1, 0, 0])  # verifier rewards
    inputs["cost_scores"] = torch.tensor([0, 2, 0, 1, 0, 3], dtype=torch.int32)
    options = dict(estimator="grpo", group_size=3, kl_coef=0.1, lagrange_multiplier=0.5, impl=impl)
    got = ops.group_advantages(**inputs, **options)
    floats = {**inputs, "reward_scores": inputs["reward_scores"].float(), "cost_scores": inputs["cost_scores"].float()}
    torch.testing.assert_close(got, ops.group_advantages(**floats, **options))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("batch,length", [(0, 5), (4, 0), (1, 3)])
@pytest.mark.parametrize("estimator", ["grpo", "reinforce_pp"])
def test_empty_and_tiny_shapes(impl, batch, length, estimator, generator):
    require_impl(impl)
    inputs = make_inputs(batch, length, generator, "all_valid")
    group = {} if estimator == "reinforce_pp" else dict(group_index=torch.arange(batch))
    got = ops.group_advantages(**inputs, estimator=estimator, **group, kl_coef=0.1, lagrange_multiplier=0.5,
                               per_token=True, impl=impl)
    truth = reference.group_advantages(**inputs, estimator=estimator, **group, kl_coef=0.1, lagrange_multiplier=0.5,
                                       per_token=True)
    for g, t in zip(got, truth):
        assert g.shape == (batch, length)
        torch.testing.assert_close(g, t, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- hand-computed values
def test_grpo_and_dr_grpo_by_hand():
    """Group [1, 2, 6]: mean 3, unbiased std √7; group [4, 4]: std 0; a lone row: mean 0, std 1."""
    G = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0, -5.0], dtype=torch.float64)
    index = torch.tensor([0, 0, 0, 1, 1, 2])
    zeros = torch.zeros(6, 2, dtype=torch.float64)
    common = dict(group_index=index, kl_coef=0.3, lagrange_multiplier=0.0, eps=1e-6)
    out = ops.group_advantages(zeros, zeros, torch.ones(6, 2), G, torch.zeros(6, dtype=torch.float64),
                               estimator="grpo", **common)
    s = math.sqrt(7.0) + 1e-6
    expected = torch.tensor([-2 / s, -1 / s, 3 / s, 0.0, 0.0, -5 / (1 + 1e-6)], dtype=torch.float64)
    torch.testing.assert_close(out.advantages, expected)
    out = ops.group_advantages(zeros, zeros, torch.ones(6, 2), G, torch.zeros(6, dtype=torch.float64),
                               estimator="dr_grpo", **common)
    torch.testing.assert_close(out.advantages, torch.tensor([-2.0, -1.0, 3.0, 0.0, 0.0, -5.0], dtype=torch.float64))


@pytest.mark.parametrize("impl", IMPLS)
def test_reinforce_pp_by_hand(impl):
    """Row 0: valid at 0, 2, 3 (a hole at 1), k1 kl = [1, ·, 2, 4], β = 0.5, score 3, cost 1, λ = 2:
    r = [−0.5, 0, −1, −2 + 3 − 2] → R = [−2.5, 0, −2, −1]. Row 1: one token, kl 0, score 1 → R = 1."""
    require_impl(impl)
    logprobs = torch.tensor([[1.0, 9.0, 2.0, 4.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, False, True, True], [True, False, False, False]])
    out = ops.group_advantages(logprobs, torch.zeros(2, 4), mask, torch.tensor([3.0, 1.0]), torch.tensor([1.0, 0.0]),
                               estimator="reinforce_pp", kl_coef=0.5, lagrange_multiplier=2.0, impl=impl)
    returns = torch.tensor([[-2.5, 0.0, -2.0, -1.0], [1.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(out.returns, returns)
    values = torch.tensor([-2.5, -2.0, -1.0, 1.0])  # the four valid returns
    mean, var = values.mean(), values.var()  # unbiased
    expected = torch.where(mask, (returns - mean) / torch.sqrt(var + 1e-8), 0.0)
    torch.testing.assert_close(out.advantages, expected)


# ---------------------------------------------------------------- the peers
def verl_core_algos():
    return pytest.importorskip("verl.trainer.ppo.core_algos")


def verl_token_level_rewards(inputs, kl_coef):
    """verl's use_kl_in_reward: token_level_rewards = token_level_scores − β·kl_penalty(·, 'kl') (k1),
    the score at the last valid token."""
    core_algos = verl_core_algos()
    mask = inputs["mask"]
    scores = torch.zeros(mask.shape, dtype=torch.float64)
    end = reference.last_valid_index(mask)
    scores[torch.arange(mask.shape[0]), end] = inputs["reward_scores"].double()
    kld = core_algos.kl_penalty(inputs["logprobs"].double(), inputs["ref_logprobs"].double(), "kl") * mask
    return scores - kl_coef * kld


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kl_coef", [0.0, 0.2])
@pytest.mark.parametrize("norm_by_std", [True, False])
def test_matches_verl_grpo(impl, kl_coef, norm_by_std, generator):
    """verl's compute_grpo_outcome_advantage (norm_adv_by_std_in_grpo=False is Dr. GRPO) with an
    uneven, unordered index including a group of one; kl_coef=0 is verl's default (KL in the loss)."""
    require_impl(impl)
    core_algos = verl_core_algos()
    inputs = make_inputs(10, 17, generator, "right_padded")
    index = torch.tensor(UNEVEN_INDEX)
    expected, _ = core_algos.compute_grpo_outcome_advantage(
        verl_token_level_rewards(inputs, kl_coef), inputs["mask"].double(), index.numpy(),
        norm_adv_by_std_in_grpo=norm_by_std)
    got = ops.group_advantages(**inputs, estimator="grpo" if norm_by_std else "dr_grpo", group_index=index,
                               kl_coef=kl_coef, lagrange_multiplier=0.0, per_token=True, impl=impl)
    # verl's size-1 group uses float32 constants (mean 0, std 1): 1e-6 relative
    torch.testing.assert_close(got.advantages.double(), expected, atol=2e-5, rtol=2e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_verl_reinforce_pp(impl, generator):
    require_impl(impl)
    core_algos = verl_core_algos()
    inputs = make_inputs(6, 21, generator, "right_padded")

    class Config:
        gamma = 1.0

    expected, expected_returns = core_algos.compute_reinforce_plus_plus_outcome_advantage(
        verl_token_level_rewards(inputs, 0.1), inputs["mask"].double(), config=Config())
    got = ops.group_advantages(**inputs, estimator="reinforce_pp", kl_coef=0.1, lagrange_multiplier=0.0,
                               impl=impl)
    torch.testing.assert_close(got.returns.double(), expected_returns, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got.advantages.double(), expected, atol=2e-5, rtol=1e-5)


def openrlhf_shaped_returns(rewards, kl_coef, kl, mask, clip):
    """OpenRLHF's compute_reward (score clipped first, −β·kl per token, score at the eos) and
    get_cumulative_returns (γ = 1), transcribed (openrlhf.models needs flash_attn, absent here)."""
    r = rewards.clamp(-clip, clip)
    eos = mask.size(1) - 1 - mask.long().fliplr().argmax(dim=1, keepdim=True)
    reward = torch.zeros_like(kl).scatter_(1, eos, r.unsqueeze(1)) - kl_coef * kl
    reward = mask * reward
    returns = torch.zeros_like(reward)
    running = torch.zeros(reward.size(0), dtype=reward.dtype)
    for t in reversed(range(reward.size(1))):
        running = reward[:, t] + running
        returns[:, t] = running
    return returns


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_openrlhf_formulas(impl, generator):
    """group_norm: (r − mean)/(std + 1e-9) per group; dr_grpo: r − mean; reinforce: clipped score,
    per-token KL reward, cumulative returns, whitened with the population variance and rsqrt(max(var, 1e-8))."""
    require_impl(impl)
    inputs = make_inputs(8, 19, generator, "right_padded", torch.float64 if impl != "triton" else torch.float32)
    rewards = inputs["reward_scores"].double().view(-1, 4)
    common = dict(group_size=4, kl_coef=0.0, lagrange_multiplier=0.0, impl=impl)
    got = ops.group_advantages(**inputs, estimator="grpo", eps=1e-9, **common)
    expected = (rewards - rewards.mean(-1, keepdim=True)) / (rewards.std(-1, keepdim=True) + 1e-9)
    torch.testing.assert_close(got.advantages.double(), expected.reshape(-1), atol=2e-5, rtol=1e-5)
    got = ops.group_advantages(**inputs, estimator="dr_grpo", **common)
    torch.testing.assert_close(got.advantages.double(), (rewards - rewards.mean(-1, keepdim=True)).reshape(-1),
                               atol=2e-5, rtol=1e-5)

    mask = inputs["mask"]
    kl = (inputs["logprobs"] - inputs["ref_logprobs"]).double() * mask
    returns = openrlhf_shaped_returns(inputs["reward_scores"].double(), 0.05, kl, mask.double(), 2.0)
    mean = (returns * mask).sum() / mask.sum()
    var = ((returns - mean).pow(2) * mask).sum() / mask.sum()
    expected = (returns - mean) * var.clamp(min=1e-8).rsqrt() * mask
    got = ops.group_advantages(**inputs, estimator="reinforce_pp", kl_coef=0.05, lagrange_multiplier=0.0,
                               score_clip=2.0, clip_before_kl=True, whiten_variance="population", impl=impl)
    torch.testing.assert_close(got.returns.double(), returns * mask, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(got.advantages.double(), expected, atol=2e-5, rtol=1e-5)


def test_matches_trl_grpo_nan_handling(generator):
    """TRL's GRPOTrainer (scale_rewards="group"): nanmean / nanstd per group, advantages of unscorable
    rows zeroed by nan_to_num; eps=1e-4 is TRL's."""
    inputs = make_inputs(8, 5, generator, dtype=torch.float64)
    inputs["reward_scores"][[2, 5]] = math.nan
    rewards = inputs["reward_scores"].view(-1, 4)
    mean = torch.nanmean(rewards, dim=1, keepdim=True)
    count = (~torch.isnan(rewards)).sum(1, keepdim=True)
    std = torch.sqrt(torch.nansum((rewards - mean) ** 2, dim=1, keepdim=True) / (count - 1))  # TRL's nanstd
    expected = torch.nan_to_num((rewards - mean) / (std + 1e-4), nan=0.0).reshape(-1)
    got = ops.group_advantages(**inputs, estimator="grpo", group_size=4, kl_coef=0.0, lagrange_multiplier=0.0,
                               mask_nan_rewards=True, eps=1e-4, impl="torch")
    torch.testing.assert_close(got.advantages, expected)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "change,match",
    [
        (dict(estimator="ppo"), "estimator must be one of"),
        (dict(group_size=None), "pass exactly one of group_size"),
        (dict(group_index=torch.zeros(4, dtype=torch.int64)), "pass exactly one of group_size"),
        (dict(group_size=3), "group_size=3 must divide the batch size B=4"),
        (dict(group_size=0), "group_size must be an integer >= 1"),
        (dict(group_size=None, group_index=torch.zeros(4)), "group_index must be an int64"),
        (dict(group_size=None, group_index=torch.zeros(5, dtype=torch.int64)), "group_index must have shape"),
        (dict(estimator="reinforce_pp"), "pass neither group_size nor group_index"),
        (dict(estimator="reinforce_pp", group_size=None, per_token=False), "per_token must be None or True"),
        (dict(reward_scores=torch.ones(4, dtype=torch.bool)), "reward_scores must be .* got torch.bool"),
        (dict(eps=-1.0), "eps must be finite and >= 0"),
        (dict(whiten_variance="biased"), "whiten_variance must be one of"),
        (dict(mask_nan_rewards=1), "mask_nan_rewards must be a bool"),
        (dict(lagrange_multiplier=float("inf")), "lagrange_multiplier must be finite"),
    ],
)
def test_bad_input_names_the_argument(change, match, generator):
    args = dict(make_inputs(4, 5, generator), estimator="grpo", group_size=2, kl_coef=0.1, lagrange_multiplier=1.0)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.group_advantages(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("estimator", ["grpo", "reinforce_pp"])
def test_gpu_large_shapes(estimator):
    gen = torch.Generator().manual_seed(0)
    inputs = make_inputs(512, 4096, gen, "right_padded")
    group = {} if estimator == "reinforce_pp" else dict(group_index=torch.randint(0, 100, (512,), generator=gen))
    options = dict(estimator=estimator, kl_coef=0.1, lagrange_multiplier=1.0, score_clip=50.0, **group)
    got = ops.group_advantages(**{k: v.cuda() for k, v in inputs.items()},
                               **{k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in options.items()},
                               impl="triton")
    truth = reference.group_advantages(**as_float64(inputs), **options)
    low = reference.group_advantages(**inputs, **options)
    for g, t, lo in zip(got, truth, low):
        assert_matches_reference("gpu", g.cpu(), t, lo, atol=1e-4 * (1 + t.abs().max().item()))
