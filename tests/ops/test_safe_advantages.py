"""ops.safe_advantages: every impl against the float64 reference (docs/ops.md#safe_advantages)."""

import itertools

import pytest
import torch
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
FIELDS = ops.SafeAdvantages._fields


def make_inputs(shape, generator, mask_kind="holes", dtype=torch.float32):
    batch, _ = shape
    tensors = dict(
        logprobs=randn(shape, generator, 0.5) - 1.0,
        ref_logprobs=randn(shape, generator, 0.5) - 1.0,
        mask=make_mask(mask_kind, *shape, generator),
        reward_scores=randn((batch,), generator, 3.0),
        cost_scores=randn((batch,), generator, 3.0),
        reward_values=randn(shape, generator),
        cost_values=randn(shape, generator),
    )
    return {k: v if v.dtype == torch.bool else v.to(dtype) for k, v in tensors.items()}


def check(impl, inputs, atol=2e-5, **options):
    require_impl(impl)
    got = ops.safe_advantages(**inputs, **options, impl=impl)
    as64 = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    truth = reference.safe_advantages(**as64, **options)
    low = reference.safe_advantages(**inputs, **options)
    scale = 1.0 + max((t.abs().max().item() for t in truth if t.numel()), default=0.0)
    for name, g, t, lo in zip(FIELDS, got, truth, low):
        assert_matches_reference(f"{impl} {name}", g, t, lo, atol=atol * scale)
    invalid = inputs["mask"] == 0
    for name, g in zip(FIELDS, got):
        assert (g[invalid] == 0).all(), f"{impl} {name}: masked positions must be 0"
    return got


DEFAULTS = dict(kl_coef=0.1, lagrange_multiplier=0.8)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("shape", [(1, 1), (2, 33), (7, 1001)], ids=str)
def test_matches_reference(impl, mask_kind, shape, generator):
    check(impl, make_inputs(interpreter_sized(impl, shape), generator, mask_kind), **DEFAULTS)


OPTION_GRID = [
    dict(kl_estimator=est, kl_in_cost=kic, divide_by_one_plus_lambda=divide, whiten=wh, score_clip=clip)
    for est, kic, divide, wh, clip in itertools.product(
        ("k1", "k2", "k3"), (True, False), (True, False), (False, True), (None, 0.5)
    )
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("options", OPTION_GRID, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_options(impl, options, generator):
    inputs = make_inputs((3, 21) if impl == "triton" else (5, 37), generator, "holes")
    multiplier = torch.tensor(1.7) if options["kl_estimator"] == "k2" else 1.7  # λ as float and as tensor
    check(impl, inputs, kl_coef=0.2, lagrange_multiplier=multiplier, gamma=0.99, gae_lambda=0.9, **options)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("kl_in_cost", [True, False])
@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_clip_before_kl(impl, kl_estimator, kl_in_cost, generator):
    """score_clip on the raw scores (TRL / OpenRLHF) instead of the per-token totals; the clip binds."""
    inputs = make_inputs((3, 21) if impl == "triton" else (6, 37), generator, "empty_rows")
    inputs["logprobs"] = inputs["logprobs"] + 0.8  # KL terms that exceed the clip range on their own
    for name in ("reward_scores", "cost_scores"):  # |score| > 1: every score is clipped
        inputs[name] = inputs[name].sign() * (1.0 + inputs[name].abs())
    options = dict(kl_coef=2.0, lagrange_multiplier=0.6, kl_estimator=kl_estimator, kl_in_cost=kl_in_cost,
                   score_clip=0.5)
    got = check(impl, inputs, clip_before_kl=True, **options)
    default = ops.safe_advantages(**inputs, **options, impl=impl)
    assert (got.reward_advantages - default.reward_advantages).abs().max() > 0.1
    if kl_in_cost:  # else the cost stream is the clamped score alone, the same either way
        assert (got.cost_advantages - default.cost_advantages).abs().max() > 0.1
    # KL only (scores inside the clip range): no per-token clamp at all, unlike the default
    inside = dict(inputs, reward_scores=inputs["reward_scores"].clamp(-0.4, 0.4),
                  cost_scores=inputs["cost_scores"].clamp(-0.4, 0.4))
    unclipped = ops.safe_advantages(**inside, **dict(options, score_clip=None), impl=impl)
    clipped = ops.safe_advantages(**inside, **options, clip_before_kl=True, impl=impl)
    for name, a, b in zip(FIELDS, clipped, unclipped):
        torch.testing.assert_close(a, b, msg=name)


def test_clip_before_kl_matches_openrlhf_compute_reward(generator):
    """OpenRLHF: reward = clamp(score, clip range) at the end token − β·kl (models/utils.py compute_reward)."""
    utils = pytest.importorskip("test_kl_penalty").openrlhf_models_utils()
    inputs = make_inputs((5, 30), generator, "right_padded", torch.float64)
    out = ops.safe_advantages(**inputs, kl_coef=0.3, lagrange_multiplier=0.0, score_clip=1.0, clip_before_kl=True,
                              impl="cpp")
    reward = utils.compute_reward(inputs["reward_scores"], 0.3, out.kl, action_mask=inputs["mask"],
                                       reward_clip_range=(-1.0, 1.0))
    expected, _ = reference.gae(reward, inputs["reward_values"], inputs["mask"], 1.0, 0.95)
    torch.testing.assert_close(out.reward_advantages, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("variance", ["unbiased", "population", "none"])
@pytest.mark.parametrize("shift_mean", [True, False])
def test_whiten_variance_and_shift_mean(impl, variance, shift_mean, generator):
    inputs = make_inputs((3, 21) if impl == "triton" else (6, 37), generator, "empty_rows")
    got = check(impl, inputs, **DEFAULTS, whiten=True, whiten_variance=variance, whiten_shift_mean=shift_mean)
    plain = ops.safe_advantages(**inputs, **DEFAULTS, impl=impl)
    valid = inputs["mask"]
    expected = reference.masked_whiten(plain.advantages.double(), valid, variance=variance, shift_mean=shift_mean)
    torch.testing.assert_close(got.advantages.double(), expected, rtol=1e-5, atol=1e-5)
    for name in FIELDS[1:]:
        torch.testing.assert_close(getattr(got, name), getattr(plain, name), rtol=0, atol=0)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("whiten", [False, True])
def test_rows_without_valid_tokens_are_zero(impl, whiten, generator):
    inputs = make_inputs((6, 40), generator, "empty_rows")
    got = check(impl, inputs, kl_coef=0.1, lagrange_multiplier=0.5, whiten=whiten)
    empty = ~(inputs["mask"].any(dim=1))
    assert empty.any()
    for tensor in got:
        assert (tensor[empty] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(impl, dtype, generator):
    inputs = make_inputs(interpreter_sized(impl, (4, 300)), generator, "left_padded", dtype)
    check(impl, inputs, **DEFAULTS, whiten=True)


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_float64(impl, generator):
    got = check(impl, make_inputs((3, 45), generator, "holes", torch.float64), atol=1e-12, **DEFAULTS)
    assert all(t.dtype == torch.float64 for t in got)


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_inputs(impl, generator):
    big = make_inputs((6, 140), generator, "holes")
    inputs = {k: v[::2, ::2] if v.dim() == 2 else v[::2] for k, v in big.items()}
    inputs["reward_values"] = big["reward_values"].t().contiguous().t()[::2, ::2]
    inputs["mask"] = inputs["mask"].to(torch.int32)
    check(impl, inputs, **DEFAULTS, whiten=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_kl_in_cost_makes_kl_weight_independent_of_lambda(impl, generator):
    """With kl_in_cost the combined advantage carries exactly −β·KL for every λ (docs/ops.md#safe_advantages)."""
    require_impl(impl)
    inputs = make_inputs((3, 25), generator, "right_padded")
    inputs.update(reward_scores=torch.zeros(3), cost_scores=torch.zeros(3))
    inputs.update(reward_values=torch.zeros(3, 25), cost_values=torch.zeros(3, 25))
    results = [ops.safe_advantages(**inputs, kl_coef=0.3, lagrange_multiplier=multiplier, impl=impl).advantages
               for multiplier in (0.0, 0.5, 10.0)]
    pure_kl, _ = reference.gae(-0.3 * reference.kl_penalty(inputs["logprobs"], inputs["ref_logprobs"], "k1")
                               * inputs["mask"], torch.zeros(3, 25), inputs["mask"], 1.0, 0.95)
    for advantages in results:
        torch.testing.assert_close(advantages, pure_kl, atol=1e-6, rtol=1e-5)


def extreme_log_ratios(inputs):
    """Valid positions with d = logprobs − ref_logprobs = ±100 and ±inf (docs/ops.md#kl-estimators)."""
    inputs = dict(inputs)
    logprobs, ref, mask = inputs["logprobs"].clone(), inputs["ref_logprobs"].clone(), inputs["mask"].clone()
    cells = [(0, 1), (0, 4), (1, 2), (2, 0), (2, 3)]
    for (b, t), (lp, rf) in zip(cells, [(-101.0, -1.0), (-1.0, -101.0), (-float("inf"), -1.0),
                                        (-0.5, -float("inf")), (-100.5, -0.5)]):
        logprobs[b, t], ref[b, t], mask[b, t] = lp, rf, True
    inputs.update(logprobs=logprobs, ref_logprobs=ref, mask=mask)
    return inputs, cells


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("whiten", [False, True])
def test_k3_extreme_log_ratios_are_clamped_not_nan(impl, whiten, generator):
    """k3 at log-ratio ±100 (and ±inf) is capped at 10 as verl's low_var_kl, on every impl: finite
    advantages, where main returned inf KL and NaN advantages."""
    inputs, cells = extreme_log_ratios(make_inputs((3, 9), generator, "holes"))
    got = check(impl, inputs, kl_coef=0.1, lagrange_multiplier=0.7, kl_estimator="k3", whiten=whiten)
    for name, tensor in zip(FIELDS, got):
        assert torch.isfinite(tensor).all(), f"{impl} {name}: non-finite output"
    for b, t in cells:
        assert got.kl[b, t] == 10.0, f"{impl}: k3 at ({b}, {t}) = {got.kl[b, t].item()}, want the cap 10"


@pytest.mark.parametrize("impl", IMPLS)
def test_k3_clamp_keeps_nan(impl, generator):
    """The clamp must not hide a NaN log-prob (a GPU's plain min/max would return the bound)."""
    require_impl(impl)
    inputs = make_inputs((2, 6), generator, "all_valid")
    inputs["logprobs"][1, 2] = float("nan")
    got = ops.safe_advantages(**inputs, kl_coef=0.1, lagrange_multiplier=0.5, kl_estimator="k3", impl=impl)
    assert torch.isnan(got.kl[1, 2]) and torch.isfinite(got.kl[0]).all()


def test_negative_lambda_tensor_on_device_gives_nan(generator):
    """A device λ is never read on the host; an invalid one must not pass silently (reference rule)."""
    inputs = make_inputs((2, 5), generator, "all_valid")
    out = reference.safe_advantages(**inputs, kl_coef=0.1, lagrange_multiplier=torch.tensor(-1.0))
    assert torch.isnan(out.advantages).all()


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(logprobs=torch.zeros(2, 5, 1)), "logprobs must have 2 dimension"),
        (dict(ref_logprobs=torch.zeros(2, 4)), r"ref_logprobs must have shape \(2, 5\)"),
        (dict(reward_scores=torch.zeros(3)), r"reward_scores must have shape \(2,\)"),
        (dict(cost_values=torch.zeros(5, 2)), r"cost_values must have shape \(2, 5\)"),
        (dict(mask=torch.ones(2, 6)), r"mask must have shape"),
        (dict(logprobs=torch.zeros(2, 5, dtype=torch.int32)), "logprobs must be float16"),
        (dict(lagrange_multiplier=-0.5), "lagrange_multiplier must be finite and >= 0"),
        (dict(lagrange_multiplier=float("nan")), "lagrange_multiplier must be finite"),
        (dict(lagrange_multiplier=torch.tensor(-2.0)), "lagrange_multiplier must be finite"),
        (dict(lagrange_multiplier=torch.ones(2)), "lagrange_multiplier must be a float or a 0-dim"),
        (dict(kl_coef=-1.0), "kl_coef must be finite"),
        (dict(kl_estimator="k4"), "kl_estimator must be one of"),
        (dict(score_clip=0.0), "score_clip must be None or"),
        (dict(gamma=2.0), "gamma must be a number in"),
        (dict(impl="fast"), "impl must be one of"),
        (dict(clip_before_kl="yes"), "clip_before_kl must be a bool"),
        (dict(whiten=True, whiten_variance="sample"), "whiten_variance must be one of"),
        (dict(whiten_shift_mean=1), "whiten_shift_mean must be a bool"),
    ],
)
def test_bad_input_names_the_argument(change, match, generator):
    args = dict(make_inputs((2, 5), generator, "all_valid"), **DEFAULTS)
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.safe_advantages(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("whiten", [False, True])
def test_gpu_large_shapes_and_device_lambda(whiten):
    gen = torch.Generator().manual_seed(0)
    inputs = make_inputs((512, 4096), gen, "right_padded")
    options = dict(kl_coef=0.1, lagrange_multiplier=torch.tensor(2.0, device="cuda"), whiten=whiten)
    got = ops.safe_advantages(**{k: v.cuda() for k, v in inputs.items()}, **options, impl="triton")
    options["lagrange_multiplier"] = 2.0
    truth = reference.safe_advantages(**{k: v.double().cuda() if v.is_floating_point() else v.cuda()
                                         for k, v in inputs.items()}, **options)
    low = reference.safe_advantages(**{k: v.cuda() for k, v in inputs.items()}, **options)
    for name, g, t, lo in zip(FIELDS, got, truth, low):
        assert_matches_reference(name, g.cpu(), t.cpu(), lo.cpu(), atol=1e-4 * (1 + t.abs().max().item()))
    bad = ops.safe_advantages(**{k: v.cuda() for k, v in inputs.items()}, kl_coef=0.1,
                              lagrange_multiplier=torch.tensor(-1.0, device="cuda"), impl="triton")
    assert torch.isnan(bad.advantages[inputs["mask"].cuda()]).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", [(0, 5), (3, 0)], ids=str)
def test_empty_inputs(impl, shape, generator):
    require_impl(impl)
    inputs = make_inputs(shape, generator)
    out = ops.safe_advantages(**inputs, **DEFAULTS, whiten=True, impl=impl)
    assert all(t.shape == shape for t in out)
    rloo = ops.rloo_advantages(inputs["logprobs"], inputs["ref_logprobs"], inputs["mask"], inputs["reward_scores"],
                               inputs["cost_scores"], group_size=3 if shape[0] else 2, kl_coef=0.1,
                               lagrange_multiplier=1.0, impl=impl)
    assert all(t.shape == shape[:1] for t in rloo)
    torch.testing.assert_close(rloo.kl, torch.zeros(shape[0]))
    adv, ret = ops.gae(inputs["reward_values"], inputs["cost_values"], inputs["mask"], impl=impl)
    assert adv.shape == ret.shape == shape


def test_opcheck_with_new_options(generator):
    require_impl("cpp")
    inputs = make_inputs((4, 9), generator, "holes")
    args = (*inputs.values(), None, 0.5, 0.1, 1.0, 0.95, "k3", 0.7, True, True, True, "cpp", True, "population",
            False)
    torch.library.opcheck(torch.ops.hcrlhf.safe_advantages.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
