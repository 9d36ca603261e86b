"""ops.gae: every impl against the float64 reference (docs/ops.md#gae)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import (
    IMPLS,
    MASK_KINDS,
    assert_matches_reference,
    interpreter_sized,
    make_mask,
    randn,
    require_impl,
)

from hcrlhf import ops, reference

pytestmark = pytest.mark.usefixtures("poisoned_outputs")


def check_gae(impl, rewards, values, mask, gamma, gae_lambda, atol=2e-5):
    require_impl(impl)
    got_adv, got_ret = ops.gae(rewards, values, mask, gamma=gamma, gae_lambda=gae_lambda, impl=impl)
    truth = reference.gae(rewards.double(), values.double(), mask, gamma, gae_lambda)
    low = reference.gae(rewards, values, mask, gamma, gae_lambda)
    expected_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    assert got_adv.dtype == got_ret.dtype == expected_dtype
    scale = 1.0 + truth[1].abs().max().item() if truth[1].numel() else 1.0
    for name, got, exact, lowp in zip(("advantages", "returns"), (got_adv, got_ret), truth, low):
        assert_matches_reference(f"{impl} {name}", got, exact, lowp, atol=atol * scale)
    valid = mask != 0
    assert (got_adv[~valid] == 0).all() and (got_ret[~valid] == 0).all(), "masked positions must be 0"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("shape", [(1, 1), (1, 17), (5, 64), (7, 1001)], ids=str)
def test_matches_reference(impl, mask_kind, shape, generator):
    shape = interpreter_sized(impl, shape)
    rewards, values = randn(shape, generator).float(), randn(shape, generator).float()
    check_gae(impl, rewards, values, make_mask(mask_kind, *shape, generator), gamma=0.99, gae_lambda=0.95)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("gamma,gae_lambda", [(1.0, 0.95), (1.0, 1.0), (0.9, 0.0), (0.0, 0.5)])
def test_discounts(impl, gamma, gae_lambda, generator):
    shape = interpreter_sized(impl, (4, 130))
    check_gae(impl, randn(shape, generator).float(), randn(shape, generator).float(),
              make_mask("holes", *shape, generator), gamma=gamma, gae_lambda=gae_lambda)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(impl, dtype, generator):
    shape = interpreter_sized(impl, (6, 200))
    check_gae(impl, randn(shape, generator).to(dtype), randn(shape, generator).to(dtype),
              make_mask("right_padded", *shape, generator), gamma=1.0, gae_lambda=0.95)


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_float64_in_float64_out(impl, generator):
    shape = (3, 50)
    check_gae(impl, randn(shape, generator), randn(shape, generator), make_mask("holes", *shape, generator),
              gamma=0.99, gae_lambda=0.9, atol=1e-12)


def test_triton_refuses_float64(generator):
    x = randn((2, 3), generator)
    with pytest.raises(TypeError, match="float64"):
        ops.gae(x, x, torch.ones(2, 3, dtype=torch.bool), impl="triton")


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_views_and_numeric_masks(impl, generator):
    base_r, base_v = randn((6, 301), generator).float(), randn((301, 6), generator).float()
    rewards = base_r[::2, 1:300:2]  # non-unit strides in both dims
    values = base_v.t()[::2, 1:300:2]  # transposed storage
    bool_mask = make_mask("holes", *rewards.shape, generator)
    for mask in (bool_mask, bool_mask.to(torch.int64), bool_mask.to(torch.float32), bool_mask.to(torch.uint8)):
        check_gae(impl, rewards, values, mask, gamma=0.97, gae_lambda=0.9)


@settings(max_examples=25, deadline=None)
@given(
    batch=st.integers(1, 6), length=st.integers(1, 70), keep=st.floats(0.0, 1.0),
    gamma=st.floats(0.0, 1.0), gae_lambda=st.floats(0.0, 1.0), seed=st.integers(0, 2**31 - 1),
    impl=st.sampled_from(IMPLS),
)
def test_property_random_masks(batch, length, keep, gamma, gae_lambda, seed, impl):
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, length, generator=gen) < keep
    check_gae(impl, randn((batch, length), gen).float(), randn((batch, length), gen).float(), mask, gamma, gae_lambda)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(rewards=torch.zeros(3)), "rewards must have 2 dimension"),
        (dict(values=torch.zeros(2, 4)), r"values must have shape \(2, 3\)"),
        (dict(mask=torch.ones(3, 2, dtype=torch.bool)), r"mask must have shape \(2, 3\)"),
        (dict(rewards=torch.zeros(2, 3, dtype=torch.int64)), "rewards must be float16"),
        (dict(gamma=1.5), "gamma must be a number in"),
        (dict(gae_lambda=-0.1), "gae_lambda must be a number in"),
        (dict(impl="cuda"), "impl must be one of"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(rewards=torch.randn(2, 3), values=torch.randn(2, 3), mask=torch.ones(2, 3, dtype=torch.bool))
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.gae(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(512, 4096), (512, 1024), (3, 4097)], ids=str)
def test_gpu_large_shapes(shape):
    gen = torch.Generator().manual_seed(0)
    rewards, values = randn(shape, gen).float(), randn(shape, gen).float()
    mask = make_mask("holes", *shape, gen)
    got = ops.gae(rewards.cuda(), values.cuda(), mask.cuda(), gamma=1.0, gae_lambda=0.95, impl="triton")
    truth = reference.gae(rewards.double().cuda(), values.double().cuda(), mask.cuda(), 1.0, 0.95)
    low = reference.gae(rewards.cuda(), values.cuda(), mask.cuda(), 1.0, 0.95)
    for g, t, lo in zip(got, truth, low):
        assert_matches_reference("triton gpu", g.cpu(), t.cpu(), lo.cpu(), atol=1e-4)
