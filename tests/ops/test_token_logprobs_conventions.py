"""ops.token_logprobs options that let the peers' log-prob / entropy helpers be swapped for it.

TRL's ``selective_log_softmax`` / ``entropy_from_logits``, verl's ``logprobs_from_logits`` /
``entropy_from_logits`` and OpenRLHF's ``log_probs_from_logits`` / ``compute_entropy`` take the
temperature positionally, return the logits' dtype, compute the entropy without labels, gather
K labels per position and (TRL) skip masked rows. Every option is checked on every impl, forward
and backward, against the float64 reference with the rule of docs/ops.md#how-the-kernels-are-tested,
and the new math also against formulas written out here and against the peers themselves.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from numerics import assert_matches_reference, require_impl

from hcrlhf import ops, reference

IMPLS = ["torch", "cpp", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# atol per dtype for (values, gradients), as in test_token_logprobs.py
ATOL = {torch.float32: (2e-5, 1e-6), torch.bfloat16: (2e-5, 1e-5), torch.float16: (2e-5, 1e-6)}
INF, NAN = float("inf"), float("nan")


@pytest.fixture(autouse=True)
def poison_new_tensors(monkeypatch):
    """New float tensors start as NaN, so an output element a kernel forgets to write is caught."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        if t.is_floating_point() and t.numel():
            t.fill_(NAN)
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


@pytest.fixture(autouse=True)
def small_triton_blocks(monkeypatch):
    """V blocks of 128 in the interpreter, so that the test vocabularies span several blocks."""
    import hcrlhf.kernels.token_logprobs as kernel

    monkeypatch.setattr(kernel, "_INTERPRETER_BLOCK_V", 128)


def run(fn, logits, upstream):
    """Outputs of fn(x) (a tuple) and d(Σ upstream_i · output_i)/dx for a fresh leaf x = logits."""
    x = logits.detach().clone().requires_grad_()
    outs = fn(x)
    sum((out.double() * g.double()).sum() for out, g in zip(outs, upstream, strict=True)).backward()
    return [out.detach() for out in outs] + [x.grad]


def check(name, impl_fn, ref_fn, logits, upstream, atol=None):
    """Values and gradient of impl_fn vs the float64 reference (err <= 2 x the reference's own error
    in the test dtype + atol); returns impl_fn's outputs and gradient."""
    atol_value, atol_grad = atol or ATOL[logits.dtype]
    truth = run(ref_fn, logits.double(), upstream)
    low = run(ref_fn, logits, upstream)
    got = run(impl_fn, logits, upstream)
    for i, (g, t, lo) in enumerate(zip(got, truth, low, strict=True)):
        last = i == len(got) - 1
        # a NaN in the truth would pass any max-error bound: these cases are all finite by design
        assert torch.isfinite(t).all() and torch.isfinite(lo).all(), f"{name} output {i}: non-finite reference"
        assert g.dtype == (logits.dtype if last else torch.float32), f"{name} output {i}: dtype {g.dtype}"
        assert_matches_reference(f"{name} {'grad' if last else f'output {i}'}", g, t, lo,
                                 atol=atol_grad if last else atol_value)
    return got


def multi_label_case(lead, vocab, k, dtype, seed=0, ignore_index=-100):
    """(logits (*lead, V), labels (*lead, K), row_mask (*lead,)): a label repeated within a row,
    ignored labels, a row whose labels are all ignored, and masked-out rows."""
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(*lead, vocab, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, vocab, (*lead, k), generator=gen)
    labels[..., 1] = labels[..., 0]  # the same token twice: its gradient terms add up
    labels[torch.rand(*lead, k, generator=gen) < 0.2] = ignore_index
    flat = labels.view(-1, k)
    flat[1] = ignore_index  # every label ignored: a dead row
    row_mask = torch.rand(lead, generator=gen) < 0.75
    row_mask.view(-1)[2] = False
    row_mask.view(-1)[0] = True
    return logits, labels, row_mask


def upstream_for(*shapes, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for shape in shapes]


# ---------------------------------------------------------------- signature
def test_signature_is_the_planned_one():
    """temperature is the third positional parameter (as in TRL / OpenRLHF); the rest keyword-only
    with today's defaults, under the names the integrations use."""
    params = inspect.signature(ops.token_logprobs).parameters
    assert list(params)[:3] == ["logits", "labels", "temperature"]
    assert all(p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD for p in list(params.values())[:3])
    assert params["labels"].default is None and params["temperature"].default == 1.0
    expected = dict(return_entropy=False, ignore_index=-100, inplace_backward=False, out_dtype=None, row_mask=None,
                    impl="auto")
    for name, default in expected.items():
        assert params[name].kind is inspect.Parameter.KEYWORD_ONLY and params[name].default == default, name


@pytest.mark.parametrize("impl", IMPLS)
def test_positional_temperature(impl):
    require_impl(impl)
    gen = torch.Generator().manual_seed(2)
    logits, labels = torch.randn(4, 300, generator=gen) * 2, torch.randint(0, 300, (4,), generator=gen)
    positional = ops.token_logprobs(logits, labels, 0.6, impl=impl)
    keyword = ops.token_logprobs(logits, labels, temperature=0.6, impl=impl)
    assert torch.equal(positional, keyword)
    assert not torch.allclose(positional, ops.token_logprobs(logits, labels, impl=impl))
    with pytest.raises(ValueError, match="temperature"):
        ops.token_logprobs(logits, labels, 0.0, impl=impl)


# ---------------------------------------------------------------- out_dtype
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_out_dtype_casts_values_and_keeps_gradients(impl, dtype):
    require_impl(impl)
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(3, 5, 257, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, 257, (3, 5), generator=gen)
    labels[0, 1] = -100
    g_lp, g_h = upstream_for((3, 5), (3, 5), seed=4)

    def run_with(out_dtype):
        x = logits.clone().requires_grad_()
        lp, h = ops.token_logprobs(x, labels, 0.8, return_entropy=True, out_dtype=out_dtype, impl=impl)
        ((lp * g_lp.to(lp.dtype)).sum() + (h * g_h.to(h.dtype)).sum()).backward()
        return lp, h, x.grad

    lp, h, grad = run_with(None)
    assert lp.dtype == h.dtype == torch.float32 and grad.dtype == dtype
    for out_dtype in (dtype, torch.float64):
        lp_cast, h_cast, grad_cast = run_with(out_dtype)
        assert lp_cast.dtype == h_cast.dtype == out_dtype and grad_cast.dtype == dtype
        # exactly the float32 results cast, and the gradient of Σ g·cast(out) (g rounded like the output)
        assert torch.equal(lp_cast, lp.detach().to(out_dtype)) and torch.equal(h_cast, h.detach().to(out_dtype))
        x = logits.clone().requires_grad_()
        lp32, h32 = ops.token_logprobs(x, labels, 0.8, return_entropy=True, impl=impl)
        ((lp32.to(out_dtype) * g_lp.to(out_dtype)).sum() + (h32.to(out_dtype) * g_h.to(out_dtype)).sum()).backward()
        assert torch.equal(grad_cast, x.grad)


def test_out_dtype_default_is_float64_for_float64_logits():
    """float64 logits keep float64 results by default (the more accurate choice); out_dtype casts."""
    gen = torch.Generator().manual_seed(5)
    logits, labels = torch.randn(3, 40, generator=gen, dtype=torch.float64), torch.randint(0, 40, (3,), generator=gen)
    assert ops.token_logprobs(logits, labels).dtype == torch.float64
    assert ops.token_logprobs(logits, labels, out_dtype=torch.float32).dtype == torch.float32
    assert ops.token_logprobs(logits, return_entropy=True, out_dtype=torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("bad", [torch.int64, torch.bool, "float32", torch.complex64, 32])
def test_out_dtype_must_be_a_floating_dtype(bad):
    logits, labels = torch.randn(2, 10), torch.tensor([1, 2])
    with pytest.raises(TypeError, match="out_dtype"):
        ops.token_logprobs(logits, labels, out_dtype=bad)


# ---------------------------------------------------------------- entropy without labels
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_entropy_without_labels(impl, dtype):
    require_impl(impl)
    gen = torch.Generator().manual_seed(6)
    logits = (torch.randn(3, 4, 301, generator=gen) * 3).to(dtype)
    (g_h,) = upstream_for((3, 4), seed=7)
    got = check(f"entropy/{impl}/{dtype}",
                lambda x: (ops.token_logprobs(x, None, 0.9, return_entropy=True, impl=impl),),
                lambda x: (reference.token_logprobs(x, None, 0.9, True),), logits, [g_h])
    assert got[0].shape == (3, 4)


@pytest.mark.parametrize("impl", IMPLS)
def test_entropy_without_labels_by_hand(impl):
    """H = -Σ p log p and dH/dz = -p·(log p + H), written out in float64, on fp32 logits."""
    require_impl(impl)
    gen = torch.Generator().manual_seed(8)
    logits = torch.randn(5, 333, generator=gen) * 2
    g_h = torch.randn(5, generator=gen)
    temperature = 1.3
    x = logits.clone().requires_grad_()
    entropy = ops.token_logprobs(x, return_entropy=True, temperature=temperature, impl=impl)
    (entropy * g_h).sum().backward()
    z = logits.double() / temperature
    p = z.exp() / z.exp().sum(-1, keepdim=True)
    h = -(p * p.log()).sum(-1)
    grad = -p * (p.log() + h[:, None]) * g_h.double()[:, None] / temperature
    torch.testing.assert_close(entropy.double(), h, atol=2e-5, rtol=0)
    torch.testing.assert_close(x.grad.double(), grad, atol=1e-6, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_entropy_without_labels_shapes_and_errors(impl):
    require_impl(impl)
    logits = torch.randn(7, generator=torch.Generator().manual_seed(9))
    h = ops.token_logprobs(logits, return_entropy=True, impl=impl)  # one distribution: a 0-dim entropy
    assert h.shape == () and torch.isclose(h.double(), reference.token_logprobs(logits.double(), None, 1.0, True))
    empty = ops.token_logprobs(torch.randn(0, 3, 9), return_entropy=True, impl=impl)
    assert empty.shape == (0, 3)
    with pytest.raises(ValueError, match="labels=None.*return_entropy=True"):
        ops.token_logprobs(logits, impl=impl)
    with pytest.raises(ValueError, match="return_entropy=True"):
        ops.token_logprobs(logits[None], None, 0.5, impl=impl)


# ---------------------------------------------------------------- row_mask
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_row_mask_matches_reference(impl, dtype):
    require_impl(impl)
    gen = torch.Generator().manual_seed(10)
    logits = (torch.randn(3, 5, 263, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, 263, (3, 5), generator=gen)
    labels[1, 1] = -100
    row_mask = torch.rand(3, 5, generator=gen) < 0.6
    row_mask[0] = False  # a whole sequence masked out
    logits[0, 2, 7] = NAN  # masked-out rows may hold anything
    logits[2, ~row_mask[2]] = INF
    g_lp, g_h = upstream_for((3, 5), (3, 5), seed=11)
    got = check(f"row_mask/{impl}/{dtype}",
                lambda x: ops.token_logprobs(x, labels, 0.7, return_entropy=True, row_mask=row_mask, impl=impl),
                lambda x: reference.token_logprobs(x, labels, 0.7, True, row_mask=row_mask), logits, [g_lp, g_h])
    lp, h, grad = got
    dead = ~row_mask | (labels == -100)
    assert (lp[dead] == 0).all() and (h[dead] == 0).all() and (grad[dead] == 0).all()
    assert (lp[~dead] != 0).all() and (grad[~dead] != 0).any(-1).all()
    # entropy alone, with the mask
    h_only, grad_h = check(f"row_mask entropy alone/{impl}/{dtype}",
                           lambda x: (ops.token_logprobs(x, None, 0.7, return_entropy=True, row_mask=row_mask,
                                                         impl=impl),),
                           lambda x: (reference.token_logprobs(x, None, 0.7, True, row_mask=row_mask),), logits, [g_h])
    assert (h_only[~row_mask] == 0).all() and (grad_h[~row_mask] == 0).all() and torch.equal(h_only[~dead], h[~dead])


@pytest.mark.parametrize("impl", IMPLS)
def test_row_mask_is_ignore_index_by_another_name(impl):
    """Masking a row equals giving it the ignore label; integer masks (0 = masked, TRL's
    ``row_mask == 0``) equal bool masks."""
    require_impl(impl)
    gen = torch.Generator().manual_seed(12)
    logits = torch.randn(4, 6, 200, generator=gen) * 2
    labels = torch.randint(0, 200, (4, 6), generator=gen)
    row_mask = torch.rand(4, 6, generator=gen) < 0.5
    g_lp, g_h = upstream_for((4, 6), (4, 6), seed=13)
    fn = lambda **kw: (lambda x: ops.token_logprobs(x, return_entropy=True, impl=impl, **kw))
    masked = run(fn(labels=labels, row_mask=row_mask), logits, [g_lp, g_h])
    ignored = run(fn(labels=labels.masked_fill(~row_mask, -100)), logits, [g_lp, g_h])
    as_int = run(fn(labels=labels, row_mask=row_mask.long() * 3), logits, [g_lp, g_h])
    as_int32 = run(fn(labels=labels, row_mask=row_mask.int()), logits, [g_lp, g_h])
    for a, b, c, d in zip(masked, ignored, as_int, as_int32, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d)


@pytest.mark.parametrize("impl", IMPLS)
def test_masked_rows_are_not_read(impl):
    """The engines skip dead rows: their saved statistics stay (0, 0) instead of (max, log-sum) of
    the row (every live row's max is > 0 here), i.e. no block of those rows was reduced."""
    require_impl(impl)
    gen = torch.Generator().manual_seed(14)
    logits = torch.randn(6, 300, generator=gen).abs() + 0.5
    labels = torch.randint(0, 300, (6,), generator=gen)
    labels[4] = -100
    row_mask = torch.tensor([True, False, True, False, True, True])
    for k_labels in (labels, labels[:, None].expand(6, 3).contiguous(), None):
        _, stats, _ = torch.ops.hcrlhf.token_logprobs_fwd(logits, k_labels, 1.0, -100, True, False, impl, row_mask)
        dead = ~row_mask if k_labels is None else ~row_mask | (labels == -100)
        assert (stats[dead] == 0).all() and (stats[~dead, 0] > 0).all(), (impl, stats)


@pytest.mark.parametrize("impl", IMPLS)
def test_row_mask_errors(impl):
    require_impl(impl)
    logits, labels = torch.randn(2, 3, 20), torch.randint(0, 20, (2, 3))
    call = lambda **kw: ops.token_logprobs(logits, labels, impl=impl, **kw)
    with pytest.raises(TypeError, match="row_mask"):
        call(row_mask=torch.ones(2, 3))  # a float mask: 0/1 weights are not a mask
    with pytest.raises(TypeError, match="row_mask"):
        call(row_mask=[[True] * 3] * 2)
    with pytest.raises(ValueError, match=r"row_mask must have shape \(2, 3\)"):
        call(row_mask=torch.ones(2, 3, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="row_mask"):
        call(row_mask=torch.ones(3, dtype=torch.bool))


# ---------------------------------------------------------------- several labels per position
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_multi_label_matches_reference(impl, dtype, temperature):
    require_impl(impl)
    logits, labels, row_mask = multi_label_case((3, 4), 389, 5, dtype, seed=15)
    g_lp, g_h = upstream_for((3, 4, 5), (3, 4), seed=16)
    for mask in (None, row_mask):
        lp, h, grad = check(
            f"multi/{impl}/{dtype}/T={temperature}/mask={mask is not None}",
            lambda x, m=mask: ops.token_logprobs(x, labels, temperature, return_entropy=True, row_mask=m, impl=impl),
            lambda x, m=mask: reference.token_logprobs(x, labels, temperature, True, row_mask=m), logits, [g_lp, g_h])
        assert lp.shape == (3, 4, 5) and h.shape == (3, 4)
        live = (labels != -100) & (True if mask is None else mask[..., None])
        assert (lp[~live] == 0).all() and (lp[live] < 0).all()
        dead_rows = ~live.any(-1)
        assert dead_rows.view(-1)[1] and (h[dead_rows] == 0).all() and (grad[dead_rows] == 0).all()
    # log-probs only (no entropy), and a per-label mask of the labels' shape (TRL's convention)
    label_mask = torch.rand(3, 4, 5, generator=torch.Generator().manual_seed(17)) < 0.7
    check(f"multi per-label mask/{impl}/{dtype}",
          lambda x: (ops.token_logprobs(x, labels, temperature, row_mask=label_mask, impl=impl),),
          lambda x: (reference.token_logprobs(x, labels, temperature, row_mask=label_mask),), logits, [g_lp])


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_label_by_hand(impl):
    """log p_k = z_k - logsumexp(z); d/dz Σ_k g_k log p_k = Σ_k g_k·onehot(label_k) - p·Σ_k g_k (a
    repeated label counts twice, an ignored one not at all), plus -g_H·p·(log p + H) — written out
    in float64 on fp32 logits."""
    require_impl(impl)
    gen = torch.Generator().manual_seed(18)
    rows, vocab, temperature = 4, 450, 0.8
    logits = torch.randn(rows, vocab, generator=gen) * 2
    labels = torch.tensor([[3, 3, 17, 449], [0, -100, 0, 5], [-100, -100, -100, -100], [448, 2, 1, 0]])
    g, g_h = torch.randn(rows, 4, generator=gen), torch.randn(rows, generator=gen)
    x = logits.clone().requires_grad_()
    lp, h = ops.token_logprobs(x, labels, temperature, return_entropy=True, impl=impl)
    ((lp * g).sum() + (h * g_h).sum()).backward()
    z = logits.double() / temperature
    log_p = z - z.exp().sum(-1, keepdim=True).log()
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1)
    want_lp = torch.zeros(rows, 4, dtype=torch.float64)
    want_grad = torch.zeros(rows, vocab, dtype=torch.float64)
    for r in range(rows):
        live = [k for k in range(4) if labels[r, k] != -100]
        if not live:
            entropy[r] = 0.0  # a dead row: nothing counts, nothing is read
            continue
        total = 0.0
        for k in live:
            want_lp[r, k] = log_p[r, labels[r, k]]
            want_grad[r, labels[r, k]] += g[r, k].item()
            total += g[r, k].item()
        want_grad[r] -= p[r] * total + g_h[r].item() * p[r] * (log_p[r] + entropy[r])
    want_grad /= temperature
    torch.testing.assert_close(lp.double(), want_lp, atol=2e-5, rtol=0)
    torch.testing.assert_close(h.double(), entropy, atol=2e-5, rtol=0)
    torch.testing.assert_close(x.grad.double(), want_grad, atol=2e-6, rtol=0)


@pytest.mark.parametrize("impl", IMPLS)
def test_one_label_as_k_equals_1(impl):
    """labels[..., None] (K = 1) gives the one-label results (to float32 rounding) and shapes (..., 1)."""
    require_impl(impl)
    gen = torch.Generator().manual_seed(19)
    logits = torch.randn(3, 4, 300, generator=gen) * 3
    labels = torch.randint(0, 300, (3, 4), generator=gen)
    labels[0, 0] = -100
    g_lp, g_h = upstream_for((3, 4), (3, 4), seed=20)
    one = run(lambda x: ops.token_logprobs(x, labels, 0.9, return_entropy=True, impl=impl), logits, [g_lp, g_h])
    k1 = run(lambda x: ops.token_logprobs(x, labels[..., None], 0.9, return_entropy=True, impl=impl), logits,
             [g_lp[..., None], g_h])
    assert k1[0].shape == (3, 4, 1)
    torch.testing.assert_close(k1[0][..., 0], one[0], atol=5e-6, rtol=0)
    torch.testing.assert_close(k1[1], one[1], atol=0, rtol=0)
    torch.testing.assert_close(k1[2], one[2], atol=1e-6, rtol=0)


@pytest.mark.parametrize("impl", ["cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_multi_label_inplace_backward_and_views(impl, dtype):
    """The label columns are read before the in-place backward overwrites them; strided views work."""
    require_impl(impl)
    logits, labels, row_mask = multi_label_case((2, 5), 311, 4, dtype, seed=21)
    g_lp, g_h = upstream_for((2, 4, 4), (2, 4), seed=22)
    shifted_labels, shifted_mask = labels[:, 1:], row_mask[:, 1:]
    for inplace in (False, True):
        check(f"multi view inplace={inplace}/{impl}/{dtype}",
              lambda x, i=inplace: ops.token_logprobs((x * 1 if i else x)[:, :-1], shifted_labels, 0.8,
                                                      return_entropy=True, row_mask=shifted_mask,
                                                      inplace_backward=i, impl=impl),
              lambda x: reference.token_logprobs(x[:, :-1], shifted_labels, 0.8, True, row_mask=shifted_mask),
              logits, [g_lp, g_h])


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_label_non_finite_logits(impl):
    """The one-label rules per label: -inf label logit -> -inf with finite gradients; an undefined
    row -> NaN for its live labels, entropy and gradient; ignored labels and dead rows -> 0."""
    require_impl(impl)
    gen = torch.Generator().manual_seed(23)
    logits = torch.randn(4, 500, generator=gen)
    logits[0, :300] = -INF
    logits[1, 77] = NAN
    logits[2, 5] = INF
    logits[3] = NAN  # dead: all labels ignored
    labels = torch.tensor([[10, 400, -100], [1, -100, 2], [5, 6, 7], [-100, -100, -100]])
    x = logits.clone().requires_grad_()
    lp, h = ops.token_logprobs(x, labels, return_entropy=True, impl=impl)
    (lp.nan_to_num(neginf=0.0).sum() + h.sum()).backward()
    assert lp[0, 0] == -INF and torch.isfinite(lp[0, 1]) and lp[0, 2] == 0 and torch.isfinite(h[0])
    assert torch.isfinite(x.grad[0]).all()
    assert torch.isnan(lp[1, [0, 2]]).all() and lp[1, 1] == 0 and torch.isnan(h[1:3]).all()
    assert torch.isnan(lp[2]).all() and torch.isnan(x.grad[1:3]).all()
    assert (lp[3] == 0).all() and h[3] == 0 and (x.grad[3] == 0).all()


@pytest.mark.parametrize("impl", ["cpp", "triton", "torch"])
def test_multi_label_out_of_range_label_gives_nan(impl):
    """Unchecked labels (CUDA without HCRLHF_CHECK_LABELS) never read out of bounds: an out-of-range
    label gives NaN and a NaN gradient row. The custom op is called directly (the public op
    range-checks CPU labels)."""
    require_impl(impl)
    gen = torch.Generator().manual_seed(24)
    logits = torch.randn(3, 50, generator=gen).requires_grad_()
    labels = torch.tensor([[1, 2], [3, 50], [-7, -100]])
    lp, _, _ = torch.ops.hcrlhf.token_logprobs_fwd(logits, labels, 1.0, -100, False, False, impl)
    assert torch.isfinite(lp[0]).all() and torch.isfinite(lp[1, 0]) and torch.isnan(lp[1, 1]) and torch.isnan(lp[2, 0])
    lp.nan_to_num(0.0).sum().backward()
    assert torch.isfinite(logits.grad[0]).all() and torch.isnan(logits.grad[1:]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_multi_label_errors(impl):
    require_impl(impl)
    logits = torch.randn(2, 3, 20)
    call = lambda labels, **kw: ops.token_logprobs(logits, labels, impl=impl, **kw)
    with pytest.raises(ValueError, match="labels must have shape"):
        call(torch.zeros(2, 3, 0, dtype=torch.long))  # K = 0
    with pytest.raises(ValueError, match="labels must have shape"):
        call(torch.zeros(2, 4, 2, dtype=torch.long))  # leading dims differ
    bad = torch.zeros(2, 3, 2, dtype=torch.long)
    bad[1, 2, 1] = 20
    with pytest.raises(ValueError, match="labels"):
        call(bad)
    with pytest.raises(ValueError, match="row_mask"):
        call(torch.zeros(2, 3, 2, dtype=torch.long), row_mask=torch.ones(2, 3, 3, dtype=torch.bool))


# ---------------------------------------------------------------- the reference is the derivative
def test_reference_gradcheck():
    """torch.autograd.gradcheck (finite differences, float64) on the reference with the new options:
    K labels with repeats and ignores, a row mask, entropy alone, a temperature."""
    gen = torch.Generator().manual_seed(25)
    logits = torch.randn(2, 3, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[[0, 0, 6], [1, -100, 2], [-100, -100, -100]], [[3, 4, 5], [6, 6, 6], [2, 1, 0]]])
    row_mask = torch.tensor([[True, True, True], [False, True, True]])
    checks = [
        lambda x: reference.token_logprobs(x, labels, 0.7, True, row_mask=row_mask),
        lambda x: reference.token_logprobs(x, None, 1.3, True, row_mask=row_mask),
        lambda x: reference.token_logprobs(x, labels[..., 0], 0.9, True, row_mask=row_mask),
        lambda x: ops.token_logprobs(x, labels, 0.7, return_entropy=True, row_mask=labels != 6, impl="torch"),
    ]
    for fn in checks:
        assert torch.autograd.gradcheck(fn, (logits,), eps=1e-6, atol=1e-7)


# ---------------------------------------------------------------- the peers, swapped for the op
def _peer_case(dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2, 6, 301, generator=gen) * 3).to(dtype)
    labels = torch.randint(0, 301, (2, 6), generator=gen)
    return logits, labels


def swap_check(name, ours, theirs, logits, upstream):
    """Same shape and dtype as the peer; values and gradient within 2 x the peer's own error (+ atol)
    of float64 truth, which is the peer run in float64 on the same rounded logits."""
    atol_value, atol_grad = ATOL[logits.dtype]
    got, base, truth = (run(fn, x, upstream) for fn, x in ((ours, logits), (theirs, logits),
                                                          (theirs, logits.double())))
    for i, (g, b, t) in enumerate(zip(got, base, truth, strict=True)):
        assert torch.isfinite(t).all() and torch.isfinite(b).all(), f"{name} output {i}: non-finite peer"
        assert (g.shape, g.dtype) == (b.shape, b.dtype), f"{name} output {i}: {g.shape} {g.dtype} vs the peer's"
        assert_matches_reference(f"{name} output {i}", g, t, b, atol=atol_grad if i == len(got) - 1 else atol_value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_trl_selective_log_softmax_and_entropy(dtype):
    """TRL 1.16 on the CPU (its torch path): row_mask (int or bool, the shape of the index, == 0
    skipped) zeroes log-probs and entropies; K labels per row; entropy_from_logits."""
    trl_utils = pytest.importorskip("trl.trainer.utils")
    logits, labels = _peer_case(dtype, 26)
    gen = torch.Generator().manual_seed(27)
    row_mask = (torch.rand(2, 6, generator=gen) < 0.6).long()
    g_lp, g_h = upstream_for((2, 6), (2, 6), seed=28)
    swap_check(f"selective_log_softmax/{dtype}",
               lambda x: (ops.token_logprobs(x, labels, 0.7, row_mask=row_mask, out_dtype=x.dtype),),
               lambda x: (trl_utils.selective_log_softmax(x, labels, 0.7, row_mask),), logits, [g_lp])
    swap_check(f"selective_log_softmax_and_entropy/{dtype}",
               lambda x: ops.token_logprobs(x, labels, 0.7, return_entropy=True, row_mask=row_mask.bool(),
                                            out_dtype=x.dtype),
               lambda x: trl_utils.selective_log_softmax_and_entropy(x, labels, True, 0.7, row_mask),
               logits, [g_lp, g_h])
    swap_check(f"entropy_from_logits/{dtype}",
               lambda x: (ops.token_logprobs(x, return_entropy=True, out_dtype=x.dtype),),
               lambda x: (trl_utils.entropy_from_logits(x),), logits, [g_h])
    top_k = torch.randint(0, 301, (2, 6, 4), generator=gen)
    label_mask = (torch.rand(2, 6, 4, generator=gen) < 0.7).long()
    (g_k,) = upstream_for((2, 6, 4), seed=29)
    swap_check(f"selective_log_softmax top-K/{dtype}",
               lambda x: (ops.token_logprobs(x, top_k, 1.2, row_mask=label_mask, out_dtype=x.dtype),),
               lambda x: (trl_utils.selective_log_softmax(x, top_k, 1.2, label_mask),), logits, [g_k])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_verl_logprobs_and_entropy(dtype):
    verl = pytest.importorskip("verl.utils.torch_functional")
    logits, labels = _peer_case(dtype, 30)
    g_lp, g_h = upstream_for((2, 6), (2, 6), seed=31)
    swap_check(f"verl logprobs_from_logits/{dtype}",
               lambda x: (ops.token_logprobs(x, labels, out_dtype=x.dtype),),
               lambda x: (verl.logprobs_from_logits(x, labels),), logits, [g_lp])
    swap_check(f"verl entropy_from_logits/{dtype}",
               lambda x: (ops.token_logprobs(x, return_entropy=True, out_dtype=x.dtype),),
               lambda x: (verl.entropy_from_logits(x),), logits, [g_h])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_openrlhf_log_probs_and_entropy(dtype):
    pytest.importorskip("openrlhf")
    pytest.importorskip("deepspeed", reason="openrlhf.models.utils imports deepspeed")
    from hcrlhf.integrations.openrlhf import load_openrlhf_module

    utils = load_openrlhf_module("openrlhf.models.utils")
    compute_entropy = getattr(utils.compute_entropy, "_torchdynamo_orig_callable", utils.compute_entropy)
    logits, labels = _peer_case(dtype, 32)
    g_lp, g_h = upstream_for((2, 6), (2, 6), seed=33)
    swap_check(f"openrlhf log_probs_from_logits/{dtype}",
               lambda x: (ops.token_logprobs(x, labels, 0.8, out_dtype=x.dtype),),
               lambda x: (utils.log_probs_from_logits(x * 1, labels, 0.8),), logits, [g_lp])  # it divides in place
    swap_check(f"openrlhf compute_entropy/{dtype}",
               lambda x: (ops.token_logprobs(x, return_entropy=True, out_dtype=x.dtype),),
               lambda x: (compute_entropy(x),), logits, [g_h])


# ---------------------------------------------------------------- GPU (compiled Triton)
@pytest.mark.gpu
def test_gpu_multi_label_row_mask_realistic():
    """4096 x 151,936 bf16 on the GPU: K = 8 labels with ignores, a row mask, the entropy; row blocks
    checked against the float64 reference (values and gradients)."""
    n, vocab, k, temperature = 4096, 151_936, 8, 0.9
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(n, vocab, device="cuda", generator=gen) * 3).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (n, k), device="cuda", generator=gen)
    labels[::5, 3] = -100
    labels[::7, 2] = labels[::7, 1]
    row_mask = torch.rand(n, device="cuda", generator=gen) < 0.8
    g_lp, g_h = torch.randn(n, k, device="cuda", generator=gen), torch.randn(n, device="cuda", generator=gen)
    x = logits.clone().requires_grad_()
    lp, h = ops.token_logprobs(x, labels, temperature, return_entropy=True, row_mask=row_mask, impl="triton")
    ((lp * g_lp).sum() + (h * g_h).sum()).backward()
    h_only = ops.token_logprobs(logits, None, temperature, return_entropy=True, row_mask=row_mask, impl="triton")
    assert torch.equal(h_only, h.detach())
    for rows in (slice(0, 32), slice(2048, 2080), slice(n - 32, n)):
        fn = lambda z, r=rows: reference.token_logprobs(z, labels[r], temperature, True, row_mask=row_mask[r])
        upstream = [g_lp[rows], g_h[rows]]
        truth, low = run(fn, logits[rows].double(), upstream), run(fn, logits[rows], upstream)
        got = (lp[rows].detach(), h[rows].detach(), x.grad[rows])
        for name, g, t, lo, atol in zip(("logp", "entropy", "grad"), got, truth, low, (2e-5, 2e-5, 1e-5), strict=True):
            assert_matches_reference(f"gpu {name} rows {rows}", g, t, lo, atol=atol)
