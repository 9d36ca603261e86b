"""ops.rloo_advantages: every impl against the float64 reference (docs/ops.md#rloo_advantages)."""

import pytest
import torch
from numerics import IMPLS, assert_matches_reference, interpreter_sized, make_mask, randn, require_impl

from hcrlhf import ops, reference

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def make_inputs(batch, length, generator, mask_kind="holes", dtype=torch.float32):
    tensors = dict(
        logprobs=randn((batch, length), generator, 0.5) - 1.0,
        ref_logprobs=randn((batch, length), generator, 0.5) - 1.0,
        mask=make_mask(mask_kind, batch, length, generator),
        reward_scores=randn((batch,), generator, 3.0),
        cost_scores=randn((batch,), generator, 3.0),
    )
    return {k: v if v.dtype == torch.bool else v.to(dtype) for k, v in tensors.items()}


def check(impl, inputs, atol=2e-5, **options):
    require_impl(impl)
    got = ops.rloo_advantages(**inputs, **options, impl=impl)
    truth = reference.rloo_advantages(**{k: v.double() if v.is_floating_point() else v
                                         for k, v in inputs.items()}, **options)
    low = reference.rloo_advantages(**inputs, **options)
    scale = 1.0 + max(t.abs().max().item() for t in truth)
    for name, g, t, lo in zip(ops.RLOOAdvantages._fields, got, truth, low):
        assert_matches_reference(f"{impl} {name}", g, t, lo, atol=atol * scale)
    return got


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("group_size,batch", [(2, 2), (2, 14), (3, 9), (4, 8), (8, 16)])
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_matches_reference(impl, group_size, batch, kl_estimator, generator):
    check(impl, make_inputs(batch, 61, generator), group_size=group_size, kl_coef=0.1,
          lagrange_multiplier=1.3, kl_estimator=kl_estimator)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("score_clip", [None, 1.0])
@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("mask_kind", ["left_padded", "empty_rows"])
def test_clip_multiplier_and_masks(impl, score_clip, as_tensor, mask_kind, generator):
    multiplier = torch.tensor(0.6) if as_tensor else 0.6
    check(impl, make_inputs(*interpreter_sized(impl, (6, 1001)), generator, mask_kind), group_size=3, kl_coef=0.05,
          lagrange_multiplier=multiplier, score_clip=score_clip)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_and_strided(impl, dtype, generator):
    big = make_inputs(8, 90, generator, "holes", dtype)
    inputs = {k: v[:, ::3] if v.dim() == 2 else v for k, v in big.items()}
    check(impl, inputs, group_size=4, kl_coef=0.1, lagrange_multiplier=2.0)


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_float64(impl, generator):
    got = check(impl, make_inputs(4, 30, generator, dtype=torch.float64), atol=1e-12, group_size=2,
                kl_coef=0.1, lagrange_multiplier=0.5)
    assert all(t.dtype == torch.float64 for t in got)


@pytest.mark.parametrize("impl", IMPLS)
def test_k3_extreme_log_ratios_are_clamped_not_nan(impl, generator):
    """k3 at log-ratio ±100 (and ±inf) is capped at 10 per token on every impl: finite sums and
    advantages, where main returned inf KL and NaN advantages for the whole group."""
    inputs = make_inputs(4, 7, generator, "all_valid")
    inputs["logprobs"][0, 1], inputs["ref_logprobs"][0, 1] = -101.0, -1.0
    inputs["logprobs"][1, 3], inputs["ref_logprobs"][1, 3] = -1.0, -101.0
    inputs["logprobs"][2, 0] = -float("inf")
    inputs["ref_logprobs"][3, 6] = -float("inf")
    got = check(impl, inputs, group_size=2, kl_coef=0.1, lagrange_multiplier=1.0, kl_estimator="k3")
    for name, tensor in zip(ops.RLOOAdvantages._fields, got):
        assert torch.isfinite(tensor).all(), f"{impl} {name}: non-finite output"
    others = reference.rloo_advantages(**{**inputs, "mask": inputs["mask"].clone().index_put_(
        (torch.arange(4), torch.tensor([1, 3, 0, 6])), torch.tensor(False))}, group_size=2, kl_coef=0.1,
        lagrange_multiplier=1.0, kl_estimator="k3").kl
    torch.testing.assert_close(got.kl, others + 10.0)  # each extreme token adds exactly the cap


def test_group_advantages_sum_to_zero_and_match_hand_computation():
    returns = torch.tensor([1.0, 2.0, 6.0, -1.0, 3.0, 4.0])
    out = reference.rloo_advantages(torch.zeros(6, 2), torch.zeros(6, 2), torch.ones(6, 2), returns,
                                    torch.zeros(6), group_size=3, kl_coef=0.1, lagrange_multiplier=1.0)
    expected = torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5, -1 - 3.5, 3 - 1.5, 4 - 1.0])
    torch.testing.assert_close(out.advantages, expected)
    torch.testing.assert_close(out.advantages.view(2, 3).sum(1), torch.zeros(2))


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(group_size=1), "group_size must be an integer >= 2"),
        (dict(group_size=True), "group_size must be an integer >= 2"),
        (dict(group_size=3), "group_size=3 must divide the batch size B=4"),
        (dict(cost_scores=torch.zeros(4, 1)), "cost_scores must have 1 dimension"),
        (dict(lagrange_multiplier=float("inf")), "lagrange_multiplier must be finite"),
        (dict(kl_estimator="kl"), "kl_estimator must be one of"),
    ],
)
def test_bad_input_names_the_argument(change, match, generator):
    args = dict(make_inputs(4, 5, generator), group_size=2, kl_coef=0.1, lagrange_multiplier=1.0)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.rloo_advantages(**args)


@pytest.mark.gpu
def test_gpu_large_shapes():
    gen = torch.Generator().manual_seed(0)
    inputs = make_inputs(512, 4096, gen, "right_padded")
    options = dict(group_size=2, kl_coef=0.1, lagrange_multiplier=1.0, score_clip=50.0)
    got = ops.rloo_advantages(**{k: v.cuda() for k, v in inputs.items()}, **options, impl="triton")
    truth = reference.rloo_advantages(**{k: v.double() if v.is_floating_point() else v
                                         for k, v in inputs.items()}, **options)
    low = reference.rloo_advantages(**inputs, **options)
    for g, t, lo in zip(got, truth, low):
        assert_matches_reference("gpu", g.cpu(), t, lo, atol=1e-4 * (1 + t.abs().max().item()))


# ---------------------------------------------------------------- opt-in options (peer conventions)
UNEVEN_INDEX = [7, 3, 7, 11, 3, 7, -2, 3, 11, 7]  # sizes 4, 3, 2, 1, in no particular order


def as_float64(inputs):
    return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}


def check_opt_in(impl, inputs, atol=2e-5, **options):
    """check() for outputs that may hold NaN (the returns of NaN-scored rows), in the same places as the reference."""
    require_impl(impl)
    got = ops.rloo_advantages(**inputs, **options, impl=impl)
    truth = reference.rloo_advantages(**as_float64(inputs), **options)
    low = reference.rloo_advantages(**inputs, **options)
    scale = 1.0 + max(t.nan_to_num(0).abs().max().item() for t in truth)
    for name, g, t, lo in zip(ops.RLOOAdvantages._fields, got, truth, low):
        nan = torch.isnan(t)
        assert torch.equal(torch.isnan(g), nan), f"{impl} {name}: NaN at other positions than the reference"
        assert_matches_reference(f"{impl} {name}", g.masked_fill(nan, 0), t.masked_fill(nan, 0),
                                 lo.masked_fill(torch.isnan(lo), 0), atol=atol * scale)
    return got


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grouping", ["size", "index"])
@pytest.mark.parametrize("per_token", [False, True])
@pytest.mark.parametrize("clip_before_kl", [False, True])
@pytest.mark.parametrize("mask_nan_rewards", [False, True])
def test_opt_in_options_match_reference(impl, grouping, per_token, clip_before_kl, mask_nan_rewards, generator):
    inputs = make_inputs(10, 37, generator)
    if mask_nan_rewards:
        inputs["reward_scores"][[1, 6]] = float("nan")
        inputs["cost_scores"][8] = float("nan")
    group = dict(group_size=5) if grouping == "size" else dict(group_index=torch.tensor(UNEVEN_INDEX))
    got = check_opt_in(impl, inputs, **group, kl_coef=0.1, lagrange_multiplier=torch.tensor(1.3), kl_estimator="k3",
                       score_clip=2.0, clip_before_kl=clip_before_kl, mask_nan_rewards=mask_nan_rewards,
                       per_token=per_token)
    assert got.advantages.shape == ((10, 37) if per_token else (10,))
    if per_token:  # A and G broadcast over the valid positions; kl per token, summing to the (B,) kl
        flat = ops.rloo_advantages(**inputs, **group, kl_coef=0.1, lagrange_multiplier=1.3, kl_estimator="k3",
                                   score_clip=2.0, clip_before_kl=clip_before_kl,
                                   mask_nan_rewards=mask_nan_rewards, impl=impl)
        mask = inputs["mask"]
        torch.testing.assert_close(got.advantages, torch.where(mask, flat.advantages[:, None], 0.0))
        torch.testing.assert_close(got.returns, torch.where(mask, flat.returns[:, None], 0.0), equal_nan=True)
        torch.testing.assert_close(got.kl.sum(1), flat.kl, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_group_index_any_order_equals_contiguous_groups(impl, generator):
    """Rows shuffled, with their group ids, give the contiguous-layout advantages shuffled alike."""
    require_impl(impl)
    inputs = make_inputs(12, 15, generator)
    options = dict(kl_coef=0.1, lagrange_multiplier=0.9, score_clip=3.0)
    contiguous = ops.rloo_advantages(**inputs, group_size=4, **options, impl=impl)
    order = torch.randperm(12, generator=generator)
    shuffled = {k: v[order] for k, v in inputs.items()}
    got = ops.rloo_advantages(**shuffled, group_index=(torch.arange(12) // 4)[order] * 1000 - 7, **options, impl=impl)
    for g, c in zip(got, contiguous):
        torch.testing.assert_close(g, c[order], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_uneven_groups_by_hand(impl):
    """Groups {0, 2, 5} = [1, 6, 2], {1, 4} = [−1, 3], {3} = [4]: leave-one-out means 4, 1.5, 3.5 and
    3, −1; the lone row keeps its return (verl: a size-1 group's mean is 0)."""
    require_impl(impl)
    G = torch.tensor([1.0, -1.0, 6.0, 4.0, 3.0, 2.0])
    out = ops.rloo_advantages(torch.zeros(6, 2), torch.zeros(6, 2), torch.ones(6, 2), G, torch.zeros(6),
                              group_index=torch.tensor([5, 9, 5, 0, 9, 5], dtype=torch.int32), kl_coef=0.1,
                              lagrange_multiplier=1.0, impl=impl)
    torch.testing.assert_close(out.advantages, torch.tensor([1 - 4.0, -1 - 3.0, 6 - 1.5, 4.0, 3 + 1.0, 2 - 3.5]))


def test_matches_verl_rloo(generator):
    """verl's compute_rloo_outcome_advantage with an uneven, unordered index (a size-1 group included),
    KL in the reward as verl's use_kl_in_reward computes it (k1)."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    inputs = make_inputs(10, 17, generator, "right_padded")
    mask = inputs["mask"]
    scores = torch.zeros(mask.shape, dtype=torch.float64)
    scores[torch.arange(10), reference.last_valid_index(mask)] = inputs["reward_scores"].double()
    kld = core_algos.kl_penalty(inputs["logprobs"].double(), inputs["ref_logprobs"].double(), "kl") * mask
    index = torch.tensor(UNEVEN_INDEX)
    expected, _ = core_algos.compute_rloo_outcome_advantage(scores - 0.2 * kld, mask.double(), index.numpy())
    for impl in IMPLS:
        require_impl(impl)
        got = ops.rloo_advantages(**inputs, group_index=index, kl_coef=0.2, lagrange_multiplier=0.0, per_token=True,
                                  impl=impl)
        torch.testing.assert_close(got.advantages.double(), expected, atol=2e-5, rtol=1e-5)


def test_matches_trl_rloo_nan_and_clip(generator):
    """TRL's RLOOTrainer: unscorable (NaN) rewards left out of the leave-one-out baseline (nansum,
    divisor = scorable count − 1) and their advantage zeroed; reward_clip_range clamps the raw reward
    before β·KL (k1, summed over the completion) is subtracted. Where a group keeps one scorable row,
    TRL gives it 0/0 → 0 but hcrlhf verl's size-1 rule (A = G): that row is checked separately."""
    inputs = make_inputs(12, 9, generator, dtype=torch.float64)
    inputs["reward_scores"][[1, 5, 9, 10]] = float("nan")  # group 2 keeps only row 8 and row 11
    inputs["reward_scores"][11] = float("nan")  # ... only row 8
    beta, clip = 0.05, 2.0
    kl = ((inputs["logprobs"] - inputs["ref_logprobs"]) * inputs["mask"]).sum(-1)
    rewards = inputs["reward_scores"].clamp(-clip, clip) - beta * kl
    grouped = rewards.view(-1, 4)
    scorable = (~torch.isnan(grouped)).sum(1, keepdim=True)
    baselines = (torch.nansum(grouped, 1, keepdim=True) - grouped) / (scorable - 1)
    expected = torch.nan_to_num(rewards - baselines.view(-1), nan=0.0)
    got = ops.rloo_advantages(**inputs, group_size=4, kl_coef=beta, lagrange_multiplier=0.0, score_clip=clip,
                              clip_before_kl=True, mask_nan_rewards=True)
    lone = torch.arange(12) == 8
    torch.testing.assert_close(got.advantages[~lone], expected[~lone])
    assert expected[8] == 0 and got.advantages[8] == rewards[8]


@pytest.mark.parametrize("impl", IMPLS)
def test_integer_scores_and_bool_refused(impl, generator):
    require_impl(impl)
    inputs = make_inputs(4, 6, generator)
    inputs["reward_scores"] = torch.tensor([1, 0, 0, 1])
    options = dict(group_size=2, kl_coef=0.1, lagrange_multiplier=0.5, impl=impl)
    got = ops.rloo_advantages(**inputs, **options)
    torch.testing.assert_close(got, ops.rloo_advantages(**{**inputs, "reward_scores": torch.tensor([1.0, 0, 0, 1])},
                                                        **options))
    with pytest.raises(TypeError, match="cost_scores must be .* got torch.bool"):
        ops.rloo_advantages(**{**inputs, "cost_scores": torch.ones(4, dtype=torch.bool)}, **options)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(group_size=None), "pass exactly one of group_size"),
        (dict(group_index=torch.zeros(4, dtype=torch.int64)), "pass exactly one of group_size"),
        (dict(group_size=None, group_index=torch.zeros(4)), "group_index must be an int64"),
        (dict(group_size=None, group_index=torch.zeros(4, 1, dtype=torch.int64)), "group_index must have 1 dim"),
        (dict(per_token="yes"), "per_token must be a bool"),
        (dict(clip_before_kl=None), "clip_before_kl must be a bool"),
    ],
)
def test_bad_opt_in_input_names_the_argument(change, match, generator):
    args = dict(make_inputs(4, 5, generator), group_size=2, kl_coef=0.1, lagrange_multiplier=1.0)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.rloo_advantages(**args)
