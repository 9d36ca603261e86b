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
