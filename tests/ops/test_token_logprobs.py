"""ops.token_logprobs against the float64 reference, for every impl (Triton through the interpreter).

Tolerance rule (docs/ops.md#how-the-kernels-are-tested): err(impl) <= 2 * err(reference run in the test
dtype) + atol, errors measured against the reference run in float64 on the same (rounded) inputs.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from numerics import require_impl

from hcrlhf import ops, reference
from hcrlhf.ops import cpp_available
from hcrlhf.ops.token_logprobs import row_layout

IMPLS = ["torch", "cpp", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# atol per dtype for (values, gradients): values are computed in fp32 whatever the input dtype
ATOL = {torch.float32: (2e-5, 1e-6), torch.bfloat16: (2e-5, 1e-5), torch.float16: (2e-5, 1e-6)}


@pytest.fixture(autouse=True)
def poison_new_tensors(monkeypatch):
    """New float tensors start as NaN, so an output element a kernel forgets to write is caught."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point() and t.numel():
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


@pytest.fixture(autouse=True)
def small_triton_blocks(monkeypatch):
    """Small V blocks so that modest vocabularies span several blocks (the online max/sum path)."""
    import hcrlhf.kernels.token_logprobs as kernel

    monkeypatch.setattr(kernel, "_INTERPRETER_BLOCK_V", 512)


def assert_rule(name, actual, truth, low_precision_ref, atol):
    """max|actual - truth| <= 2 * max|low_precision_ref - truth| + atol, with a useful message."""
    actual, truth, low = actual.double(), truth.double(), low_precision_ref.double()
    # a NaN in the truth would slip through the max-error bound below (NaN > bound is False)
    assert torch.isfinite(truth).all() and torch.isfinite(low).all(), f"{name}: non-finite reference"
    err = (actual - truth).abs()
    ref_err = (low - truth).abs()
    bound = 2 * ref_err.max().item() + atol
    if not torch.isfinite(actual).all() or err.max().item() > bound:
        worst = tuple(int(i) for i in torch.unravel_index(err.nan_to_num(float("inf")).argmax(), err.shape))
        raise AssertionError(
            f"{name}: max err {err.max().item():.3e} (mean {err.mean().item():.3e}) > bound {bound:.3e} "
            f"(2 x reference err {ref_err.max().item():.3e} + atol {atol:g}); worst index {worst}: "
            f"got {actual[worst].item():.6g}, want {truth[worst].item():.6g}"
        )


def check_against_reference(impl, logits, labels, *, temperature=1.0, return_entropy=True,
                            ignore_index=-100, inplace_backward=False, atol=None, upstream=None):
    """Values and gradients (random upstream gradients through both outputs) vs float64."""
    dtype = logits.dtype
    atol_value, atol_grad = atol or ATOL[dtype]
    shape = labels.shape
    gen = torch.Generator().manual_seed(7)
    g_lp, g_h = upstream or (torch.randn(shape, generator=gen), torch.randn(shape, generator=gen))

    def run(fn, x):
        x = x.detach().clone().requires_grad_()
        out = fn(x)
        lp, h = out if return_entropy else (out, None)
        loss = (lp * g_lp.to(lp.dtype)).sum() + ((h * g_h.to(h.dtype)).sum() if return_entropy else 0)
        loss.backward()
        return lp.detach(), (h.detach() if return_entropy else None), x.grad

    ref = lambda x: reference.token_logprobs(x, labels, temperature, return_entropy, ignore_index)
    truth = run(ref, logits.double())
    low = run(ref, logits)
    kernel_input = logits.detach().clone()
    got = run(lambda x: ops.token_logprobs(
        x if not inplace_backward else x * 1,  # a non-leaf, so its buffer may be overwritten
        labels, temperature=temperature, return_entropy=return_entropy, ignore_index=ignore_index,
        inplace_backward=inplace_backward, impl=impl), kernel_input)
    assert got[0].dtype == torch.float32 and got[0].shape == shape
    assert got[2].dtype == dtype
    assert_rule(f"{impl}/{dtype} logp", got[0], truth[0], low[0], atol_value)
    if return_entropy:
        assert got[1].dtype == torch.float32 and got[1].shape == shape
        assert_rule(f"{impl}/{dtype} entropy", got[1], truth[1], low[1], atol_value)
    assert_rule(f"{impl}/{dtype} grad", got[2], truth[2], low[2], atol_grad)
    ignored = labels == ignore_index
    assert (got[0][ignored] == 0).all() and (got[2][ignored] == 0).all()
    return got


def random_case(shape, vocab, dtype, *, scale=3.0, ignore_fraction=0.2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*shape, vocab, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < ignore_fraction] = -100
    return logits, labels


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_values_entropy_and_gradients(impl, dtype, temperature):
    require_impl(impl)
    # V = 1271: not a multiple of the block (512 in the interpreter here, 8/2048 in C++)
    logits, labels = random_case((3, 5), 1271, dtype, seed=int(temperature * 10))
    check_against_reference(impl, logits, labels, temperature=temperature)


@pytest.mark.parametrize("impl", IMPLS)
def test_logprob_only_and_custom_ignore_index(impl):
    require_impl(impl)
    logits, labels = random_case((6,), 700, torch.float32, seed=3, ignore_fraction=0.0)
    labels[2] = 5  # ignore_index=5 is a valid id too: it must be ignored, not looked up
    check_against_reference(impl, logits, labels, return_entropy=False, ignore_index=5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_vocabulary(impl, dtype, monkeypatch):
    """V = 151,936 (> 65,536, Qwen's vocabulary) with a few rows."""
    require_impl(impl)
    import hcrlhf.kernels.token_logprobs as kernel

    monkeypatch.setattr(kernel, "_INTERPRETER_BLOCK_V", 16384)  # 10 blocks per row: keeps it quick
    logits, labels = random_case((2,), 151_936, dtype, seed=11, ignore_fraction=0.0)
    check_against_reference(impl, logits, labels, temperature=0.9)


@pytest.mark.parametrize("impl", IMPLS)
def test_single_token(impl):
    require_impl(impl)
    logits, labels = random_case((), 333, torch.float32, seed=4, ignore_fraction=0.0)
    lp, h = check_against_reference(impl, logits, labels)[:2]
    assert lp.shape == () and h.shape == ()
    logits, labels = random_case((1, 1), 333, torch.bfloat16, seed=5, ignore_fraction=0.0)
    check_against_reference(impl, logits, labels)


@pytest.mark.parametrize("impl", IMPLS)
def test_vocabulary_of_one_and_tiny(impl):
    require_impl(impl)
    for vocab in (1, 3, 9):
        logits, labels = random_case((4,), vocab, torch.float32, seed=vocab, ignore_fraction=0.0)
        check_against_reference(impl, logits, labels)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_views(impl):
    require_impl(impl)
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(3, 6, 301, generator=gen) * 2
    labels = torch.randint(0, 301, (3, 6), generator=gen)
    shifted = base[:, :-1]  # the usual causal shift: strides (6·301, 301, 1), no copy
    assert row_layout(shifted) is not None
    check_against_reference(impl, shifted, labels[:, 1:])
    transposed = base.transpose(0, 1)  # (6, 3, V) with strides (301, 6·301, 1)
    assert row_layout(transposed) is not None
    check_against_reference(impl, transposed, labels.T)
    padded = torch.randn(4, 301 + 17, generator=gen)[:, :301]  # row stride != V
    check_against_reference(impl, padded, labels[0, :4])
    # three independent leading strides (falls back to one copy) and a strided last dim
    weird = torch.randn(2, 3, 4, 50, generator=gen).permute(2, 0, 1, 3)[:, :, ::2]
    assert row_layout(weird) is None
    check_against_reference(impl, weird, torch.randint(0, 50, weird.shape[:-1], generator=gen))
    strided_last = torch.randn(5, 100, generator=gen)[:, ::2]
    check_against_reference(impl, strided_last, torch.randint(0, 50, (5,), generator=gen))


@pytest.mark.parametrize("impl", IMPLS)
def test_all_ignored_and_empty(impl):
    require_impl(impl)
    logits, labels = random_case((4,), 100, torch.float32, seed=2)
    labels[:] = -100
    lp, h, grad = check_against_reference(impl, logits, labels)
    assert (lp == 0).all() and (h == 0).all() and (grad == 0).all()
    empty = torch.randn(0, 7, 50, requires_grad=True)
    lp, h = ops.token_logprobs(empty, torch.zeros(0, 7, dtype=torch.long), return_entropy=True, impl=impl)
    assert lp.shape == (0, 7) and h.shape == (0, 7)
    (lp.sum() + h.sum()).backward()
    assert empty.grad.shape == empty.shape


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_vocabulary_minus_inf(impl):
    """-inf logits (top-k / allowed-token masks) give p = 0: finite values and gradients, even when a
    whole leading block of the row is -inf."""
    require_impl(impl)
    logits, labels = random_case((4,), 1500, torch.float32, seed=6, ignore_fraction=0.0)
    logits[:, :1100] = float("-inf")
    logits[1, 1200:1300] = float("-inf")
    labels = torch.randint(1300, 1500, (4,))
    check_against_reference(impl, logits, labels)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_inplace_backward_overwrites_logits_with_the_gradient(impl, dtype):
    require_impl(impl)
    logits, labels = random_case((2, 3), 777, dtype, seed=8)
    check_against_reference(impl, logits, labels, inplace_backward=True)
    # and the gradient really lives in the logits' memory (no (N, V) gradient buffer)
    leaf = logits.clone().requires_grad_()
    x = leaf * 1.0  # a non-leaf whose buffer nothing else needs
    x.retain_grad()
    lp = ops.token_logprobs(x[:, :2], labels[:, :2], impl=impl, inplace_backward=True)  # a strided view
    lp.sum().backward()
    assert torch.equal(x.detach()[:, :2], x.grad[:, :2])
    assert (x.grad[:, 2] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_gradient_through_one_output_only(impl):
    require_impl(impl)
    logits, labels = random_case((5,), 400, torch.float32, seed=12)
    x = logits.clone().requires_grad_()
    lp, h = ops.token_logprobs(x, labels, return_entropy=True, impl=impl)
    g = torch.randn(5)
    (h * g).sum().backward()
    xr = logits.double().requires_grad_()
    (reference.token_logprobs(xr, labels, 1.0, True)[1] * g.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=1e-6, rtol=1e-5)


def test_auto_matches_explicit_impl():
    logits, labels = random_case((3,), 200, torch.float32, seed=13)
    expected = "cpp" if cpp_available() else "torch"
    torch.testing.assert_close(ops.token_logprobs(logits, labels),
                               ops.token_logprobs(logits, labels, impl=expected), atol=0, rtol=0)
    lp64 = ops.token_logprobs(logits.double(), labels)  # float64 runs the reference, float64 out
    assert lp64.dtype == torch.float64


def test_nan_logits_propagate():
    require_impl("cpp")
    logits, labels = random_case((2,), 3000, torch.float32, seed=14, ignore_fraction=0.0)
    logits[0, 2500] = float("nan")
    lp, h = ops.token_logprobs(logits, labels, return_entropy=True, impl="cpp")
    assert torch.isnan(lp[0]) and torch.isnan(h[0]) and torch.isfinite(lp[1]) and torch.isfinite(h[1])


@pytest.mark.parametrize("impl", IMPLS)
def test_bad_input_names_the_argument(impl):
    require_impl(impl)
    logits, labels = random_case((3,), 50, torch.float32, seed=15, ignore_fraction=0.0)
    call = lambda *a, **k: ops.token_logprobs(*a, impl=impl, **k)
    bad = labels.clone()
    bad[1] = 50
    with pytest.raises(ValueError, match="labels"):
        call(logits, bad)
    bad[1] = -1
    with pytest.raises(ValueError, match="labels"):
        call(logits, bad)
    with pytest.raises(ValueError, match="labels"):
        call(logits, labels[:2])  # V / leading-shape mismatch
    with pytest.raises(ValueError, match="labels"):
        call(logits[None], labels)
    with pytest.raises(TypeError, match="labels"):
        call(logits, labels.float())
    with pytest.raises(TypeError, match="logits"):
        call(logits.long(), labels)
    with pytest.raises(ValueError, match="V"):
        call(torch.randn(3, 0), labels)
    with pytest.raises(ValueError, match="temperature"):
        call(logits, labels, temperature=0.0)
    with pytest.raises(TypeError, match="temperature"):
        call(logits, labels, temperature="hot")
    with pytest.raises(TypeError, match="ignore_index"):
        call(logits, labels, ignore_index=1.5)
    with pytest.raises(ValueError, match="impl"):
        ops.token_logprobs(logits, labels, impl="cuda")
    if impl == "cpp":
        with pytest.raises(TypeError, match="float64"):
            call(logits.double(), labels)


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 6), vocab=st.integers(1, 5000), dtype=st.sampled_from(DTYPES),
       temperature=st.floats(0.25, 4.0), scale=st.floats(0.0, 30.0), seed=st.integers(0, 2**16))
def test_cpp_property(rows, vocab, dtype, temperature, scale, seed):
    require_impl("cpp")
    logits, labels = random_case((rows,), vocab, dtype, scale=scale, seed=seed)
    check_against_reference("cpp", logits, labels, temperature=temperature)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_realistic_shape(dtype):
    """8192 x 151,936 on the GPU (compiled Triton), checked row-block-wise against the fp64 reference."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(8192, 151_936, device="cuda", generator=gen) * 3).to(dtype)
    labels = torch.randint(0, 151_936, (8192,), device="cuda", generator=gen)
    labels[::7] = -100
    x = logits.clone().requires_grad_()
    lp, h = ops.token_logprobs(x, labels, return_entropy=True, impl="triton")
    g_lp, g_h = torch.randn(8192, device="cuda"), torch.randn(8192, device="cuda")
    ((lp * g_lp).sum() + (h * g_h).sum()).backward()
    for rows in (slice(0, 64), slice(4096, 4160), slice(8128, 8192)):
        sub = logits[rows]
        truth = reference.token_logprobs(sub.double(), labels[rows], 1.0, True)
        low = reference.token_logprobs(sub, labels[rows], 1.0, True)
        assert_rule("gpu logp", lp[rows], truth[0], low[0], 2e-5)
        assert_rule("gpu entropy", h[rows], truth[1], low[1], 2e-5)
        xr = sub.double().requires_grad_()
        a, b = reference.token_logprobs(xr, labels[rows], 1.0, True)
        ((a * g_lp[rows].double()).sum() + (b * g_h[rows].double()).sum()).backward()
        xl = sub.clone().requires_grad_()
        a, b = reference.token_logprobs(xl, labels[rows], 1.0, True)
        ((a * g_lp[rows]).sum() + (b * g_h[rows]).sum()).backward()
        assert_rule("gpu grad", x.grad[rows], xr.grad, xl.grad, 1e-5)


@pytest.mark.gpu
def test_gpu_int64_offsets():
    """N·V > 2^31 elements: the rows past 2^31 must be addressed correctly (int64 offsets)."""
    vocab = 151_936
    rows = 2**31 // vocab + 64
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, vocab, (rows,), device="cuda")
    lp = ops.token_logprobs(logits, labels, impl="triton")
    tail = slice(rows - 64, rows)
    truth = reference.token_logprobs(logits[tail].double(), labels[tail])
    torch.testing.assert_close(lp[tail].double(), truth, atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------- tiny temperatures
# Exact to float32 *relative* precision down to the floor: |err| <= rtol * max(|truth|, 1)
# (values, gradients); a gradient's relative error grows like |log p|·eps through exp (the float32
# reference shows 1.6e-6 at T = 1e-2), and bf16/fp16 gradients are rounded to their 8/11 bits.
TINY_T_RTOL = {torch.float32: (1e-6, 1e-5), torch.bfloat16: (1e-6, 8e-3), torch.float16: (1e-6, 2e-3)}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1e-2, 1e-3, 1e-4])
def test_tiny_temperatures_match_float64(impl, dtype, temperature):
    """Down to MIN_TEMPERATURE every impl is within float32 relative precision of the float64
    reference: values, entropy and gradients (main's C++ kernel was off by 4e-5 at T = 1e-2 and by
    3e-3 at 1e-4 on the argmax log-prob: it rounded z = x / T before subtracting the max)."""
    require_impl(impl)
    from hcrlhf.ops._checks import MIN_TEMPERATURE

    assert MIN_TEMPERATURE == 1e-4
    gen = torch.Generator().manual_seed(21)
    logits = (torch.randn(6, 2500, generator=gen) * 3).to(dtype)  # > one C++ chunk, several Triton blocks
    labels = torch.randint(0, 2500, (6,), generator=gen)
    labels[:3] = logits[:3].float().argmax(-1)  # the mode: log p ~ 0, where rounding z = x/T shows most
    labels[3] = logits[3].float().topk(2).indices[1]  # the runner-up: log p = -gap / T
    g_lp, g_h = torch.randn(6, generator=gen), torch.randn(6, generator=gen)

    def run(fn, x):
        x = x.detach().clone().requires_grad_()
        lp, h = fn(x)
        ((lp * g_lp.to(lp.dtype)).sum() + (h * g_h.to(h.dtype)).sum()).backward()
        return lp.detach().double(), h.detach().double(), x.grad.double()

    truth = run(lambda x: reference.token_logprobs(x, labels, temperature, True), logits.double())
    got = run(lambda x: ops.token_logprobs(x, labels, temperature=temperature, return_entropy=True, impl=impl),
              logits)
    rtol_value, rtol_grad = TINY_T_RTOL[dtype]
    for name, g, t, rtol in zip(("logp", "entropy", "grad"), got, truth, (rtol_value, rtol_value, rtol_grad)):
        assert torch.isfinite(g).all(), f"{impl}/{dtype} T={temperature} {name}: non-finite"
        err = ((g - t).abs() / t.abs().clamp(min=1.0)).max().item()
        assert err <= rtol, f"{impl}/{dtype} T={temperature} {name}: relative error {err:.2e} > {rtol:g}"


@pytest.mark.parametrize("impl", IMPLS)
def test_temperature_below_the_floor_is_refused(impl):
    require_impl(impl)
    logits, labels = random_case((3,), 50, torch.float32, seed=22, ignore_fraction=0.0)
    ops.token_logprobs(logits, labels, temperature=1e-4, impl=impl)  # the floor itself is fine
    for temperature in (9.99e-5, 1e-6, 1e-8, 1e-300):
        with pytest.raises(ValueError, match="temperature"):
            ops.token_logprobs(logits, labels, temperature=temperature, impl=impl)
        with pytest.raises(ValueError, match="temperature"):
            ops.linear_logprobs(torch.randn(3, 8), torch.randn(50, 8), labels, temperature=temperature, impl=impl)


# ---------------------------------------------------------------- non-finite logits
INF, NAN = float("inf"), float("nan")


def non_finite_case(dtype, vocab=2500):
    """Rows of every kind in docs/ops.md#non-finite-logits; V spans two C++ chunks and five Triton
    blocks, and the special values sit in different chunks/blocks."""
    gen = torch.Generator().manual_seed(23)
    logits = torch.randn(11, vocab, generator=gen) * 2
    labels = torch.randint(0, vocab, (11,), generator=gen)
    kinds = ["finite", "masked", "label_-inf", "+inf", "+inf_label", "nan", "all_-inf",
             "ignored_nan", "ignored_all_-inf", "ignored_+inf", "masked_leading"]
    logits[1, 100:2300] = -INF
    labels[1] = 2400
    logits[2, 10:2200] = -INF
    labels[2] = 700  # its own logit is -inf
    logits[3, 2300] = INF
    logits[4, 50] = INF
    labels[4] = 50
    logits[5, 100] = NAN
    logits[6] = -INF
    logits[7, 2450] = NAN
    logits[8] = -INF
    logits[9, 5] = INF
    labels[7:10] = -100
    logits[10, :2450] = -INF  # a whole leading chunk/block of -inf before the first finite logit
    labels[10] = 2460
    return logits.to(dtype), labels, kinds


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("return_entropy", [True, False])
def test_non_finite_logits_one_answer(impl, dtype, return_entropy):
    """-inf label logit -> -inf; NaN / +inf anywhere or all -inf -> NaN log-prob, entropy and
    gradient row; ignored -> 0 and a zero gradient (docs/ops.md#non-finite-logits), on every impl."""
    require_impl(impl)
    logits, labels, kinds = non_finite_case(dtype)
    gen = torch.Generator().manual_seed(24)
    g_lp, g_h = torch.randn(11, generator=gen), torch.randn(11, generator=gen)

    def run(fn, x):
        x = x.detach().clone().requires_grad_()
        out = fn(x)
        lp, h = out if return_entropy else (out, None)
        loss = (lp * g_lp.to(lp.dtype)).sum() + ((h * g_h.to(h.dtype)).sum() if return_entropy else 0)
        loss.backward()
        return lp.detach(), None if h is None else h.detach(), x.grad

    got = run(lambda x: ops.token_logprobs(x, labels, return_entropy=return_entropy, impl=impl), logits)
    truth = run(lambda x: reference.token_logprobs(x, labels, 1.0, return_entropy), logits.double())
    low = run(lambda x: reference.token_logprobs(x, labels, 1.0, return_entropy), logits)
    lp, h, grad = got
    undefined = [kinds.index(k) for k in ("+inf", "+inf_label", "nan", "all_-inf")]
    ignored = [kinds.index(k) for k in ("ignored_nan", "ignored_all_-inf", "ignored_+inf")]
    finite = [kinds.index(k) for k in ("finite", "masked", "label_-inf", "masked_leading")]
    for name, ref in (("reference", truth), ("kernel", got)):  # the spec and the kernel alike
        r_lp, r_h, r_grad = ref
        assert torch.isnan(r_lp[undefined]).all(), f"{name}: log-prob of undefined rows must be NaN"
        assert torch.isnan(r_grad[undefined]).all(), f"{name}: gradient of undefined rows must be NaN"
        assert (r_lp[ignored] == 0).all() and (r_grad[ignored] == 0).all(), f"{name}: ignored rows"
        assert r_lp[kinds.index("label_-inf")] == -INF, f"{name}: a -inf label logit gives -inf"
        assert torch.isfinite(r_grad[finite]).all(), f"{name}: finite gradient where the softmax is defined"
        if return_entropy:
            assert torch.isnan(r_h[undefined]).all() and (r_h[ignored] == 0).all()
            assert torch.isfinite(r_h[finite]).all()
    atol_value, atol_grad = ATOL[dtype]
    rows = [i for i in finite if kinds[i] != "label_-inf"]
    assert_rule(f"{impl} logp", lp[rows], truth[0][rows], low[0][rows], atol_value)
    if return_entropy:
        assert_rule(f"{impl} entropy", h[finite], truth[1][finite], low[1][finite], atol_value)
    assert_rule(f"{impl} grad", grad[finite], truth[2][finite], low[2][finite], atol_grad)


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs_non_finite_rows(impl):
    """linear_logprobs follows the same rules: a -inf bias entry as the label gives -inf with finite
    gradients; a NaN or +inf hidden state makes its row NaN; an ignored row stays 0 / zero grad."""
    require_impl(impl)
    gen = torch.Generator().manual_seed(25)
    hidden = torch.randn(6, 16, generator=gen)
    weight = torch.randn(700, 16, generator=gen) * 0.5
    bias = torch.randn(700, generator=gen)
    bias[600:] = -INF  # masked vocabulary entries
    labels = torch.tensor([3, 650, 5, 7, -100, 9])  # row 1: label on a -inf bias entry
    hidden[2, 4] = NAN
    hidden[3, 0] = INF  # logits = ±inf: an undefined softmax
    hidden[4, 1] = NAN  # ignored row
    out = {}
    for name, fn, h in (("ops", lambda h, w, b: ops.linear_logprobs(h, w, labels, bias=b, return_entropy=True,
                                                                      chunk_size=4, impl=impl), hidden),
                        ("ref", lambda h, w, b: reference.linear_logprobs(h, w, labels, b, 1.0, True),
                         hidden.double())):
        h = h.clone().requires_grad_()
        w = (weight if name == "ops" else weight.double()).clone().requires_grad_()
        b = (bias if name == "ops" else bias.double()).clone().requires_grad_()
        lp, ent = fn(h, w, b)
        (lp.nan_to_num(neginf=0.0).sum() + ent.sum()).backward()  # skip the -inf value, keep its gradient
        out[name] = (lp.detach(), ent.detach(), h.grad)
    (lp, ent, g_hidden), (r_lp, r_ent, r_g_hidden) = out["ops"], out["ref"]
    assert lp[1] == -INF and r_lp[1] == -INF
    assert torch.isnan(lp[[2, 3]]).all() and torch.isnan(ent[[2, 3]]).all() and torch.isnan(g_hidden[[2, 3]]).all()
    assert lp[4] == 0 and ent[4] == 0 and (g_hidden[4] == 0).all()
    assert torch.isnan(r_lp[[2, 3]]).all() and torch.isnan(r_g_hidden[[2, 3]]).all() and (r_g_hidden[4] == 0).all()
    ok = [0, 1, 5]
    torch.testing.assert_close(lp[[0, 5]].double(), r_lp[[0, 5]], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent[ok].double(), r_ent[ok], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(g_hidden[ok].double(), r_g_hidden[ok], atol=2e-5, rtol=1e-5)


# ---------------------------------------------------------------- inplace_backward refusals
@pytest.mark.parametrize("impl", IMPLS)
def test_inplace_backward_refuses_leaves_and_aliased_memory(impl):
    """A leaf (or a view of one) would have its data overwritten; an expanded / overlapping view
    would get wrong gradients (rows overwrite each other): ValueError naming inplace_backward."""
    require_impl(impl)
    logits, labels = random_case((3, 4), 300, torch.float32, seed=26, ignore_fraction=0.0)
    call = lambda x, y=labels: ops.token_logprobs(x, y, impl=impl, inplace_backward=True)
    leaf = logits.clone().requires_grad_()
    with pytest.raises(ValueError, match="inplace_backward.*leaf"):
        call(leaf)
    with pytest.raises(ValueError, match="inplace_backward.*leaf"):
        call(leaf[:, :-1], labels[:, :-1])  # a view of a leaf shares its memory
    row = logits[0, 0].clone().requires_grad_()
    expanded = (row * 1.0).expand(3, 4, 300)  # stride 0: every row is the same memory
    with pytest.raises(ValueError, match="inplace_backward.*stride"):
        call(expanded)
    overlapping = (leaf * 1.0).reshape(-1).as_strided((6, 300), (150, 1))  # rows overlap by half
    with pytest.raises(ValueError, match="inplace_backward.*stride"):
        call(overlapping, labels.reshape(-1)[:6])
    # what stays allowed: non-leaf views that do not overlap, and logits that need no gradient
    base = leaf * 1.0
    for view, view_labels in ((base, labels), (base[:, :-1], labels[:, :-1]), (base.transpose(0, 1), labels.T)):
        call(view, view_labels).sum().backward(retain_graph=True)
    call(logits)  # no grad required: nothing is overwritten
    # the same tensors are fine with inplace_backward=False, and give the expanded gradient right
    expanded_lp = ops.token_logprobs(expanded, labels, impl=impl)
    expanded_lp.sum().backward()
    truth = row.detach().double().requires_grad_()
    reference.token_logprobs(truth.expand(3, 4, 300), labels).sum().backward()
    torch.testing.assert_close(row.grad.double(), truth.grad, atol=1e-5, rtol=1e-5)


def test_internal_overlap_detection():
    from hcrlhf.ops._checks import has_internal_overlap

    base = torch.randn(3, 6, 301)
    for ok in (base, base[:, :-1], base.transpose(0, 1), torch.randn(4, 318)[:, :301], base[:, ::2],
               base[0, 0].expand(1, 301), torch.randn(0, 5)):
        assert not has_internal_overlap(ok), tuple(ok.stride())
    for bad in (base[0, 0].expand(2, 301), base.reshape(-1).as_strided((4, 301), (300, 1)),
                base.reshape(-1).as_strided((3, 5, 301), (301, 60, 1))):
        assert has_internal_overlap(bad), tuple(bad.stride())
