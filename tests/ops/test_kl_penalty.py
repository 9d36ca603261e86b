"""ops.kl_penalty: values and gradients against closed forms, expected-gradient identities and the
peers' own functions (docs/ops.md#kl-estimators)."""

import importlib.util
import math
import os

import pytest
import torch

from hcrlhf import ops, reference

BASE = ("k1", "k2", "k3", "abs")


def log_ratio_inputs(n=64, scale=1.2, seed=0, dtype=torch.float64):
    """Log-ratios d in [−2·scale, 2·scale]: inside every k3 clamp (|d| < 2.6) at the default scale."""
    gen = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, generator=gen, dtype=torch.float64) - 2.0
    logprobs = ref + scale * torch.randn(n, generator=gen, dtype=torch.float64).clamp(-2.0, 2.0)
    return logprobs.to(dtype).requires_grad_(), ref.to(dtype)


def closed_form(d, name):
    """Value and d(value)/d(logprobs) by hand, for |d| inside every clamp."""
    if name == "k1":
        return d, torch.ones_like(d)
    if name == "k2":
        return 0.5 * d * d, d
    if name == "k3":
        return torch.exp(-d) - 1 + d, 1 - torch.exp(-d)
    if name == "abs":
        return d.abs(), torch.sign(d)
    raise ValueError(name)


@pytest.mark.parametrize("straight_through", [False, True])
@pytest.mark.parametrize("name", BASE)
def test_values_and_gradients_match_closed_forms(name, straight_through):
    logprobs, ref = log_ratio_inputs()
    estimator = name + "+" if straight_through else name
    got = ops.kl_penalty(logprobs, ref, estimator)
    (grad,) = torch.autograd.grad(got.sum(), logprobs)
    d = logprobs.detach() - ref
    value, slope = closed_form(d, name)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got.detach(), value, rtol=1e-12, atol=1e-12)
    # "+": the gradient of k2 (d), whatever the value
    torch.testing.assert_close(grad, d if straight_through else slope, rtol=1e-12, atol=1e-12)


def test_gradient_of_ref_logprobs_is_minus_that_of_logprobs():
    logprobs, ref = log_ratio_inputs()
    ref.requires_grad_()
    for estimator in ("k1", "k2", "k3", "abs", "k3+"):
        g_lp, g_ref = torch.autograd.grad(ops.kl_penalty(logprobs, ref, estimator).sum(), (logprobs, ref))
        torch.testing.assert_close(g_ref, -g_lp)


def test_hand_values():
    """d = log 2: k1 = 0.693147…, k2 = 0.240227…, k3 = 1/2 − 1 + log 2 = 0.193147…, abs = 0.693147…"""
    lp, ref = torch.tensor([math.log(2.0)], dtype=torch.float64), torch.zeros(1, dtype=torch.float64)
    expected = {"k1": 0.6931471805599453, "k2": 0.2402265069591007, "k3": 0.1931471805599453,
                "abs": 0.6931471805599453}
    for name, value in expected.items():
        assert ops.kl_penalty(lp, ref, name).item() == pytest.approx(value, rel=1e-14)
        assert ops.kl_penalty(ref, lp, name).item() == pytest.approx(
            {"k1": -value, "k2": value, "abs": value, "k3": 2.0 - 1.0 - math.log(2.0)}[name], rel=1e-14)


def categorical(seed=0, vocab=7):
    gen = torch.Generator().manual_seed(seed)
    theta = (0.7 * torch.randn(vocab, generator=gen, dtype=torch.float64)).requires_grad_()
    ref_logits = 0.7 * torch.randn(vocab, generator=gen, dtype=torch.float64)
    return theta, torch.log_softmax(ref_logits, -1)


def expected_gradient(estimator, theta, log_ref):
    """E_{y~π}[∇_θ k(y)], exactly: Σ_y π(y) ∇_θ k(log π_θ(y), log π_ref(y)) with the weights π(y) held fixed."""
    log_pi = torch.log_softmax(theta, -1)
    per_token = ops.kl_penalty(log_pi, log_ref, estimator)
    (grad,) = torch.autograd.grad((log_pi.exp().detach() * per_token).sum(), theta)
    return grad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_gradient_identities(seed):
    """E_π[∇k1] = 0; E_π[∇k2] = E_π[∇k*+] = ∇KL(π‖π_ref); E_π[∇k3] = ∇KL(π_ref‖π) (Schulman's estimators)."""
    theta, log_ref = categorical(seed)
    log_pi = torch.log_softmax(theta, -1)
    (reverse,) = torch.autograd.grad((log_pi.exp() * (log_pi - log_ref)).sum(), theta)
    log_pi = torch.log_softmax(theta, -1)
    (forward,) = torch.autograd.grad((log_ref.exp() * (log_ref - log_pi)).sum(), theta)
    assert reverse.abs().max() > 1e-2 and (reverse - forward).abs().max() > 1e-3  # not a vacuous test
    torch.testing.assert_close(expected_gradient("k1", theta, log_ref), torch.zeros_like(theta), atol=1e-14, rtol=0)
    for estimator in ("k2", "k1+", "k3+", "abs+", "k2+"):
        torch.testing.assert_close(expected_gradient(estimator, theta, log_ref), reverse, atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(expected_gradient("k3", theta, log_ref), forward, atol=1e-13, rtol=1e-12)


def test_k3_expected_value_is_the_kl():
    theta, log_ref = categorical(3)
    log_pi = torch.log_softmax(theta.detach(), -1)
    kl = (log_pi.exp() * (log_pi - log_ref)).sum()
    for estimator in ("k1", "k3"):  # unbiased
        value = (log_pi.exp() * ops.kl_penalty(log_pi, log_ref, estimator)).sum()
        torch.testing.assert_close(value, kl, rtol=1e-12, atol=1e-14)


def test_k3_clamps_and_their_gradient():
    lp = torch.tensor([-101.0, -1.0, -float("inf"), -0.5, -1.0, 2.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-1.0, -101.0, -1.0, -float("inf"), -1.0 - 1e-3, 0.0], dtype=torch.float64)
    got = ops.kl_penalty(lp, ref, "k3")
    (grad,) = torch.autograd.grad(got.sum(), lp)
    assert got[:4].tolist() == [10.0, 10.0, 10.0, 10.0]
    assert grad[:4].tolist() == [0.0, 0.0, 0.0, 0.0]  # capped: no gradient, never NaN
    d = torch.tensor([1e-3, 2.0], dtype=torch.float64)
    torch.testing.assert_close(grad[4:], 1 - torch.exp(-d))


def test_clamp_option_and_mask():
    lp = torch.tensor([[30.0, -30.0, 0.5], [float("inf"), 1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.zeros(2, 3, dtype=torch.float64)
    got = ops.kl_penalty(lp, ref, "k1", clamp=10.0)
    assert got.detach().tolist() == [[10.0, -10.0, 0.5], [10.0, 1.0, -2.0]]
    mask = torch.tensor([[1, 1, 1], [0, 1, 1]])
    for estimator in ("k1", "k2", "k3", "k2+"):
        out = ops.kl_penalty(lp, ref, estimator, mask=mask)
        (grad,) = torch.autograd.grad(out.sum(), lp)
        assert out[1, 0] == 0 and grad[1, 0] == 0, estimator  # masked inf: no NaN in value or gradient
        assert torch.isfinite(grad).all(), estimator


def test_importance_weight_of_the_straight_through_gradient():
    logprobs, ref = log_ratio_inputs(scale=0.5)
    old = logprobs.detach() + 0.3 * torch.randn(logprobs.shape, dtype=torch.float64,
                                                generator=torch.Generator().manual_seed(5))
    old[0] = logprobs.detach()[0] - 5.0  # weight e^5 capped at 10
    got = ops.kl_penalty(logprobs, ref, "k3+", old_logprobs=old)
    (grad,) = torch.autograd.grad(got.sum(), logprobs)
    d = logprobs.detach() - ref
    weight = torch.exp(logprobs.detach() - old).clamp(max=10.0)
    assert weight[0] == 10.0
    torch.testing.assert_close(got.detach(), closed_form(d, "k3")[0])
    torch.testing.assert_close(grad, weight * d)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_inputs_compute_in_float32(dtype):
    logprobs, ref = log_ratio_inputs(dtype=dtype)
    got = ops.kl_penalty(logprobs, ref, "k3")
    assert got.dtype == torch.float32
    (grad,) = torch.autograd.grad(got.sum(), logprobs)
    assert grad.dtype == dtype
    d = logprobs.detach().double() - ref.double()
    torch.testing.assert_close(got.double(), closed_form(d, "k3")[0], rtol=1e-5, atol=1e-6)


def test_reference_is_the_same_function_the_advantage_ops_use():
    logprobs, ref = log_ratio_inputs()
    for name in ("k1", "k2", "k3"):
        torch.testing.assert_close(ops.kl_penalty(logprobs, ref, name), reference.kl_penalty(logprobs, ref, name))
        out = ops.safe_advantages(logprobs.detach()[None], ref[None], torch.ones(1, 64, dtype=torch.bool),
                                  torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.float64),
                                  torch.zeros(1, 64, dtype=torch.float64), torch.zeros(1, 64, dtype=torch.float64),
                                  kl_coef=0.1, lagrange_multiplier=0.0, kl_estimator=name, impl="torch")
        torch.testing.assert_close(out.kl[0], ops.kl_penalty(logprobs, ref, name).detach())


# verl's names -> ours (docs/ops.md#kl-estimators).
VERL_NAMES = {"kl": "k1", "k1": "k1", "abs": "abs", "mse": "k2", "k2": "k2", "low_var_kl": "k3", "k3": "k3"}


@pytest.mark.parametrize("verl_name", [*VERL_NAMES, *(n + "+" for n in VERL_NAMES)])
def test_matches_verl_kl_penalty(verl_name):
    core_algos = pytest.importorskip("verl.trainer.ppo.core_algos")
    ours_name = VERL_NAMES[verl_name.rstrip("+")] + ("+" if verl_name.endswith("+") else "")
    logprobs, ref = log_ratio_inputs(n=200, scale=6.0)  # reaches the k3 clamps
    logprobs_v = logprobs.detach().clone().requires_grad_()
    ours = ops.kl_penalty(logprobs, ref, ours_name)
    theirs = core_algos.kl_penalty(logprobs_v, ref, verl_name)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    weights = torch.linspace(0.5, 1.5, 200, dtype=torch.float64)  # a non-uniform upstream gradient
    (g_ours,) = torch.autograd.grad((weights * ours).sum(), logprobs)
    (g_theirs,) = torch.autograd.grad((weights * theirs).sum(), logprobs_v)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-12, atol=1e-12)


def openrlhf_models_utils():
    """openrlhf/models/utils.py loaded from its file: ``openrlhf.models.__init__`` imports the actor
    stack, which needs flash-attn; utils.py itself needs only torch and deepspeed."""
    pytest.importorskip("deepspeed")
    spec = importlib.util.find_spec("openrlhf")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("openrlhf is not installed")
    path = os.path.join(spec.submodule_search_locations[0], "models", "utils.py")
    module_spec = importlib.util.spec_from_file_location("_openrlhf_models_utils", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_matches_openrlhf_compute_approx_kl(name, unbiased):
    utils = openrlhf_models_utils()
    logprobs, ref = log_ratio_inputs(n=200, scale=6.0, dtype=torch.float32)
    logprobs[:3].detach().copy_(torch.tensor([40.0, -40.0, 15.0]))  # k1/k2 past OpenRLHF's ±10 clamp
    old = (logprobs.detach() + 0.8 * torch.randn(200, generator=torch.Generator().manual_seed(1)))
    logprobs_o = logprobs.detach().clone().requires_grad_()
    ours = ops.kl_penalty(logprobs, ref, name + "+" if unbiased else name, clamp=10.0,
                          old_logprobs=old if unbiased else None)
    theirs = utils.compute_approx_kl(logprobs_o, ref, old if unbiased else None, kl_estimator=name,
                                     unbiased_gradient=unbiased)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours.sum(), logprobs)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), logprobs_o)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(estimator="k4"), "estimator must be one of"),
        (dict(estimator="low_var_kl"), "estimator must be one of"),
        (dict(ref_logprobs=torch.zeros(3, 5)), r"ref_logprobs must have shape \(2, 5\)"),
        (dict(logprobs=torch.zeros(2, 5, dtype=torch.int64)), "logprobs must be float16"),
        (dict(mask=torch.ones(2, 4)), r"mask must have shape \(2, 5\)"),
        (dict(clamp=0.0), "clamp must be None or a finite number > 0"),
        (dict(clamp=float("inf")), "clamp must be None or a finite number > 0"),
        (dict(old_logprobs=torch.zeros(2, 5)), "old_logprobs .* needs a '\\+' estimator"),
        (dict(estimator="k1+", old_logprobs=torch.zeros(5)), r"old_logprobs must have shape \(2, 5\)"),
    ],
)
def test_bad_input_names_the_argument(change, match):
    args = dict(logprobs=torch.randn(2, 5), ref_logprobs=torch.randn(2, 5), estimator="k1")
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=match):
        ops.kl_penalty(**args)


def test_torch_compile_fullgraph_matches_eager():
    """Argument checks and the estimator trace into one graph (no breaks); values and gradients agree."""
    logprobs, ref = log_ratio_inputs(n=32, scale=3.0, dtype=torch.float32)
    mask = torch.arange(32) % 5 != 0

    def loss(lp, rf):
        return (ops.kl_penalty(lp, rf, "k3+", mask=mask, clamp=10.0) * 0.5).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    lp_c = logprobs.detach().clone().requires_grad_()
    eager, got = loss(logprobs, ref), compiled(lp_c, ref)
    torch.testing.assert_close(got, eager)
    (g_eager,) = torch.autograd.grad(eager, logprobs)
    (g_got,) = torch.autograd.grad(got, lp_c)
    torch.testing.assert_close(g_got, g_eager)
