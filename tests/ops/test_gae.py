"""ops.gae: every impl against the float64 reference (docs/ops.md#gae)."""

import math

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


def check_gae(impl, rewards, values, mask, gamma, gae_lambda, atol=2e-5, **options):
    require_impl(impl)
    got_adv, got_ret = ops.gae(rewards, values, mask, gamma=gamma, gae_lambda=gae_lambda, impl=impl, **options)
    truth = reference.gae(rewards.double(), values.double(), mask, gamma, gae_lambda, **options)
    low = reference.gae(rewards, values, mask, gamma, gae_lambda, **options)
    expected_dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    assert got_adv.dtype == got_ret.dtype == expected_dtype
    scale = 1.0 + truth[1].abs().max().item() if truth[1].numel() else 1.0
    for name, got, exact, lowp in zip(("advantages", "returns"), (got_adv, got_ret), truth, low):
        assert_matches_reference(f"{impl} {name}", got, exact, lowp, atol=atol * scale)
    valid = mask != 0
    assert (got_adv[~valid] == 0).all() and (got_ret[~valid] == 0).all(), "masked positions must be 0"
    return got_adv, got_ret


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


@pytest.mark.parametrize("impl", IMPLS)
def test_whiten_strided_inputs_and_mask(impl, generator):
    base = randn((6, 301), generator).float()
    rewards, values = base[::2, 1:300:2], base.t().contiguous().t()[1::2, :299:2]
    mask = make_mask("holes", 6, 301, generator)[::2, 2:301:2]  # a bool mask with non-unit strides
    assert mask.stride(1) != 1
    for variance in ("unbiased", "population"):
        check_gae(impl, rewards, values, mask, gamma=0.97, gae_lambda=0.9, whiten=True, whiten_variance=variance)


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


WHITEN_OPTIONS = [dict(whiten=True, whiten_variance=variance, whiten_shift_mean=shift)
                  for variance in ("unbiased", "population", "none") for shift in (True, False)]


def option_id(options):
    return "-".join(f"{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", WHITEN_OPTIONS, ids=option_id)
@pytest.mark.parametrize("mask_kind", ["holes", "empty_rows"])
def test_whiten_matches_reference(impl, options, mask_kind, generator):
    shape = interpreter_sized(impl, (6, 150))
    rewards, values = randn(shape, generator).float() + 0.7, randn(shape, generator).float()
    mask = make_mask(mask_kind, *shape, generator)
    adv, ret = check_gae(impl, rewards, values, mask, gamma=0.99, gae_lambda=0.95, **options)
    plain_adv, plain_ret = ops.gae(rewards, values, mask, gamma=0.99, gae_lambda=0.95, impl=impl)
    torch.testing.assert_close(ret, plain_ret, rtol=0, atol=0)  # returns are never whitened
    valid = mask != 0
    if options["whiten_shift_mean"]:
        assert adv[valid].mean().abs() < 1e-5
    else:
        torch.testing.assert_close(adv[valid].mean(), plain_adv[valid].mean(), rtol=1e-5, atol=1e-5)
    spread = {"unbiased": adv[valid].std(), "population": adv[valid].std(correction=0),
              "none": adv[valid].std() / plain_adv[valid].std()}[options["whiten_variance"]]
    torch.testing.assert_close(spread, torch.tensor(1.0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_whiten_large_mean_and_low_precision(impl, dtype, generator):
    """A large common offset (mean ≫ spread) must not cost the variance its precision (the
    kernels combine per-row moments, never a global sum of squares)."""
    if impl == "triton" and dtype == torch.float64:
        pytest.skip("Triton computes in float32")
    shape = interpreter_sized(impl, (5, 300))
    rewards = (randn(shape, generator) * 0.1).to(dtype)
    values = (randn(shape, generator) - 200.0).to(dtype)
    check_gae(impl, rewards, values, make_mask("right_padded", *shape, generator), gamma=1.0, gae_lambda=1.0,
              atol=1e-12 if dtype == torch.float64 else 2e-5, whiten=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_whiten_hand_example(impl):
    """γ = λ = 1, V = 0, r = (1, 1, 1): A = (3, 2, 1), mean 2, Σ(A − 2)² = 2."""
    require_impl(impl)
    rewards, values = torch.ones(1, 3), torch.zeros(1, 3)
    mask = torch.ones(1, 3, dtype=torch.bool)
    expected = {
        ("unbiased", True): [1 / math.sqrt(1 + 1e-8), 0.0, -1 / math.sqrt(1 + 1e-8)],
        ("population", True): [math.sqrt(1.5), 0.0, -math.sqrt(1.5)],
        ("none", True): [1.0, 0.0, -1.0],
        ("unbiased", False): [2 + 1 / math.sqrt(1 + 1e-8), 2.0, 2 - 1 / math.sqrt(1 + 1e-8)],
        ("population", False): [2 + math.sqrt(1.5), 2.0, 2 - math.sqrt(1.5)],
        ("none", False): [3.0, 2.0, 1.0],
    }
    for (variance, shift), want in expected.items():
        adv, ret = ops.gae(rewards, values, mask, 1.0, 1.0, impl=impl, whiten=True, whiten_variance=variance,
                           whiten_shift_mean=shift)
        torch.testing.assert_close(adv, torch.tensor([want]), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ret, torch.tensor([[3.0, 2.0, 1.0]]))
    # A spread below eps tells the two eps rules apart: r = 1e-5 gives Σ(A − mean)² = 2e-10, so
    # rsqrt(1e-10 + 1e-8) (unbiased) but rsqrt(max(6.7e-11, 1e-8)) = 1e4 (population).
    tiny = {"unbiased": 1e-5 / math.sqrt(1e-10 + 1e-8), "population": 0.1}
    for variance, step in tiny.items():
        adv, _ = ops.gae(rewards * 1e-5, values, mask, 1.0, 1.0, impl=impl, whiten=True, whiten_variance=variance)
        torch.testing.assert_close(adv, torch.tensor([[step, 0.0, -step]]), rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("impl", IMPLS)
def test_whiten_degenerate_batches(impl):
    """No valid token: zeros. One valid token: variance 0, the whitened value is 0 (plus the mean,
    i.e. the value itself, without shift_mean)."""
    require_impl(impl)
    rewards, values = torch.tensor([[0.5, 2.0, -1.0]]), torch.tensor([[0.1, 0.2, 0.3]])
    for variance in ("unbiased", "population", "none"):
        adv, _ = ops.gae(rewards, values, torch.zeros(1, 3, dtype=torch.bool), impl=impl, whiten=True,
                         whiten_variance=variance)
        assert (adv == 0).all()
        one = torch.tensor([[False, True, False]])
        adv, _ = ops.gae(rewards, values, one, 1.0, 1.0, impl=impl, whiten=True, whiten_variance=variance)
        assert adv.tolist() == [[0.0, 0.0, 0.0]]
        adv, _ = ops.gae(rewards, values, one, 1.0, 1.0, impl=impl, whiten=True, whiten_variance=variance,
                         whiten_shift_mean=False)
        torch.testing.assert_close(adv, torch.tensor([[0.0, 1.8, 0.0]]))


@pytest.mark.parametrize("impl", IMPLS)
def test_whiten_nan_statistics_keep_masked_positions_zero(impl, generator):
    """A NaN reward makes every valid advantage NaN after whitening (as the reference); masked stay 0."""
    require_impl(impl)
    rewards, values = randn((3, 40), generator).float(), randn((3, 40), generator).float()
    mask = make_mask("holes", 3, 40, generator)
    mask[1, 5] = True
    rewards[1, 5] = float("nan")
    adv, _ = ops.gae(rewards, values, mask, impl=impl, whiten=True)
    assert torch.isnan(adv[mask]).all() and (adv[~mask] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_kind", ["right_padded", "holes"])
def test_whiten_matches_verl(impl, mask_kind, generator):
    """verl's compute_gae_advantage_return (GAE, then masked_whiten) and masked_whiten(shift_mean=False)."""
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    verl_f = pytest.importorskip("verl.utils.torch_functional")
    require_impl(impl)
    shape = interpreter_sized(impl, (6, 90))
    dtype = torch.float32 if impl == "triton" else torch.float64
    rewards, values = randn(shape, generator).to(dtype), randn(shape, generator).to(dtype)
    mask = make_mask(mask_kind, *shape, generator)
    valid = mask
    their_adv, their_ret = core_algos.compute_gae_advantage_return(rewards.double(), values.double(),
                                                                   mask.double(), 0.99, 0.9)
    adv, ret = ops.gae(rewards, values, mask, 0.99, 0.9, impl=impl, whiten=True)
    atol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(adv[valid].double(), their_adv[valid], rtol=atol, atol=atol)
    torch.testing.assert_close(ret[valid].double(), their_ret[valid], rtol=atol, atol=atol)
    plain, _ = reference.gae(rewards.double(), values.double(), mask, 0.99, 0.9)
    theirs = verl_f.masked_whiten(plain, mask.double(), shift_mean=False)
    adv, _ = ops.gae(rewards, values, mask, 0.99, 0.9, impl=impl, whiten=True, whiten_shift_mean=False)
    torch.testing.assert_close(adv[valid].double(), theirs[valid], rtol=atol, atol=atol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("no_std_norm", [False, True])
def test_whiten_matches_openrlhf_normalisation(impl, no_std_norm, generator):
    """OpenRLHF's advantage normalisation (experience_maker.py, for gae/reinforce): mean and population
    variance over the action mask, rstd = rsqrt(clamp(var, min=1e-8)); no_std_norm: centring only."""
    require_impl(impl)
    shape = interpreter_sized(impl, (5, 80))
    rewards, values = randn(shape, generator).float(), randn(shape, generator).float()
    mask = make_mask("right_padded", *shape, generator)
    plain, _ = reference.gae(rewards.double(), values.double(), mask, 1.0, 0.95)
    action_mask = mask.double().flatten()
    all_advantages = plain.flatten()
    num_actions = action_mask.sum()
    mean = (all_advantages * action_mask).sum() / num_actions
    if no_std_norm:
        rstd = 1
    else:
        var = ((all_advantages - mean).pow(2) * action_mask).sum() / num_actions
        rstd = var.clamp(min=1e-8).rsqrt()
    theirs = ((plain - mean) * rstd)[mask]
    adv, _ = ops.gae(rewards, values, mask, 1.0, 0.95, impl=impl, whiten=True,
                     whiten_variance="none" if no_std_norm else "population")
    torch.testing.assert_close(adv[mask].double(), theirs, rtol=1e-5, atol=1e-5)


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
        (dict(whiten=True, whiten_variance="biased"), "whiten_variance must be one of"),
        (dict(whiten_shift_mean=None), "whiten_shift_mean must be a bool"),
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
    for variance in ("unbiased", "population"):
        options = dict(whiten=True, whiten_variance=variance)
        got = ops.gae(rewards.cuda(), values.cuda(), mask.cuda(), gamma=1.0, gae_lambda=0.95, impl="triton",
                      **options)
        truth = reference.gae(rewards.double().cuda(), values.double().cuda(), mask.cuda(), 1.0, 0.95, **options)
        low = reference.gae(rewards.cuda(), values.cuda(), mask.cuda(), 1.0, 0.95, **options)
        for g, t, lo in zip(got, truth, low):
            assert_matches_reference(f"triton gpu whiten {variance}", g.cpu(), t.cpu(), lo.cpu(), atol=1e-4)


def test_opcheck_with_whiten_options(generator):
    """The custom op's schema takes the whitening options after impl (older positional calls still work)."""
    require_impl("cpp")
    rewards, values = randn((4, 9), generator).float(), randn((4, 9), generator).float()
    mask = make_mask("holes", 4, 9, generator)
    torch.library.opcheck(torch.ops.hcrlhf.gae.default, (rewards, values, mask, 0.99, 0.9, "cpp", True, "population",
                                                         False),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    compiled = torch.compile(lambda r, v, m: ops.gae(r, v, m, impl="cpp", whiten=True, whiten_shift_mean=False),
                             fullgraph=True, backend="aot_eager")
    for got, want in zip(compiled(rewards, values, mask),
                         ops.gae(rewards, values, mask, impl="cpp", whiten=True, whiten_shift_mean=False)):
        torch.testing.assert_close(got, want)
