"""The public ops under torch.compile(fullgraph=True): same values and gradients as eager, no graph break.

The kernel entry points are torch.library custom ops (``hcrlhf::*``, docs/ops.md#torchcompile);
``torch.library.opcheck`` checks their registrations (schema, fake impl, autograd). On a CPU the
Triton impl runs in the interpreter inside its custom op, so it compiles like the others.
"""

from __future__ import annotations

import pytest
import torch
from numerics import require_impl

from hcrlhf import ops

IMPLS = ["cpp", "torch", "triton"]
B, T, V, H = 4, 6, 50, 8
# torch.compile imports torch.jit internals that warn about their own deprecation
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_same(eager, compiled, name):
    """Exact for aot_eager; within 1e-6 (float32) where inductor fuses the surrounding torch code."""
    for i, (a, b) in enumerate(zip(eager, compiled, strict=True)):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6, msg=lambda m, i=i: f"{name} output {i}: {m}")


def values_and_grads(fn, inputs, upstream, grads_of):
    """fn(*inputs) -> tuple of outputs; backward of Σ upstream·outputs; returns outputs + input grads."""
    for x in grads_of:
        x.grad = None
    outs = fn(*inputs)
    if grads_of:
        sum((o * g).sum() for o, g in zip(outs, upstream, strict=True)).backward()
    return [o.detach() for o in outs] + [x.grad.clone() for x in grads_of]


def compare(fn, inputs, *, backend="aot_eager", upstream=(), grads_of=(), name=""):
    eager = values_and_grads(fn, inputs, upstream, grads_of)
    compiled = values_and_grads(torch.compile(fn, fullgraph=True, backend=backend), inputs, upstream, grads_of)
    assert_same(eager, compiled, f"{name} [{backend}]")


def logprob_case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(B, T, V, generator=gen) * 3).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :2] = -100
    upstream = (torch.randn(B, T - 1, generator=gen), torch.randn(B, T - 1, generator=gen))
    return logits, labels, upstream


def advantage_case(seed=0):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)
    mask = torch.rand(B, T, generator=gen) < 0.7
    mask[1] = False  # an empty row
    return dict(logprobs=rand(B, T), ref_logprobs=rand(B, T), mask=mask, reward_scores=rand(B),
                cost_scores=rand(B), reward_values=rand(B, T), cost_values=rand(B, T))


# ---------------------------------------------------------------- values and gradients, every op and impl
@pytest.mark.parametrize("impl", IMPLS)
def test_token_logprobs(impl):
    require_impl(impl)
    logits, labels, upstream = logprob_case()

    def fn(x, y):  # the causal shift: a strided view, read in place
        return ops.token_logprobs(x[:, :-1], y[:, 1:], temperature=0.7, return_entropy=True, impl=impl)

    compare(fn, (logits, labels), upstream=upstream, grads_of=(logits,), name=f"token_logprobs/{impl}")

    def logp_only(x, y):  # one output, the entropy never computed
        return (ops.token_logprobs(x[:, 1:] * 2.0, y[:, 1:].clamp(min=0), ignore_index=3, impl=impl),)

    compare(logp_only, (logits, labels), upstream=upstream[:1], grads_of=(logits,), name=f"logp only/{impl}")


@pytest.mark.parametrize("impl", IMPLS)
def test_token_logprobs_inplace_backward(impl):
    """inplace_backward is supported under compile: the backward is hcrlhf::token_logprobs_bwd_,
    which declares that it mutates the logits (mutates_args); the gradients are those of eager."""
    require_impl(impl)
    logits, labels, upstream = logprob_case(1)

    def fn(x, y):
        return ops.token_logprobs(x * 1.0, y, return_entropy=True, inplace_backward=True, impl=impl)

    gen = torch.Generator().manual_seed(2)
    upstream = (torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen))
    compare(fn, (logits, labels), upstream=upstream, grads_of=(logits,), name=f"inplace/{impl}")
    # a leaf that requires grad is refused under compile as in eager (the check runs while tracing)
    compiled = torch.compile(lambda x, y: ops.token_logprobs(x, y, inplace_backward=True, impl=impl),
                             fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="inplace_backward.*leaf"):
        compiled(logits, labels)


@pytest.mark.parametrize("impl", IMPLS)
def test_token_logprobs_peer_conventions(impl):
    """The options that reach the custom op: a positional temperature, row_mask, K labels per
    position (with a per-label mask), the entropy alone, out_dtype, and inplace_backward with K labels."""
    require_impl(impl)
    logits, labels, _ = logprob_case(11)
    gen = torch.Generator().manual_seed(12)
    row_mask = torch.rand(B, T, generator=gen) < 0.7
    top_k = torch.randint(0, V, (B, T, 3), generator=gen)
    top_k[0, 0, 1] = -100
    top_k[1, 2] = -100  # every label ignored: a dead position

    def fn(x, y, m, k):
        lp, h = ops.token_logprobs(x, y, 0.8, return_entropy=True, row_mask=m, out_dtype=torch.bfloat16, impl=impl)
        h_only = ops.token_logprobs(x[:, :-1], None, 1.2, return_entropy=True, row_mask=m[:, :-1], impl=impl)
        lp_k, h_k = ops.token_logprobs(x, k, 0.9, return_entropy=True, row_mask=m, impl=impl)
        lp_masked = ops.token_logprobs(x * 1.0, k, row_mask=k != 5, inplace_backward=True, impl=impl)
        return lp, h, h_only, lp_k, h_k, lp_masked

    shapes = ((B, T), (B, T), (B, T - 1), (B, T, 3), (B, T), (B, T, 3))
    upstream = tuple(torch.randn(shape, generator=gen) for shape in shapes)
    compare(fn, (logits, labels, row_mask, top_k), upstream=upstream, grads_of=(logits,),
            name=f"token_logprobs conventions/{impl}")


@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logprobs(impl):
    require_impl(impl)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(B, T, H, generator=gen).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) * 0.5).requires_grad_()
    bias = torch.randn(V, generator=gen).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[2, 3] = -100
    upstream = (torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen))

    def fn(h, w, b, y):  # chunk_size=7: several chunks and a ragged last one
        return ops.linear_logprobs(h, w, y, bias=b, temperature=1.3, return_entropy=True, chunk_size=7,
                                   impl=impl)

    compare(fn, (hidden, weight, bias, labels), upstream=upstream, grads_of=(hidden, weight, bias),
            name=f"linear_logprobs/{impl}")

    def no_bias(h, w, y):
        return (ops.linear_logprobs(h, w, y, chunk_size=5, impl=impl),)

    compare(no_bias, (hidden, weight, labels), upstream=upstream[:1], grads_of=(hidden, weight),
            name=f"linear_logprobs no bias/{impl}")


@pytest.mark.parametrize("impl", IMPLS)
def test_gae(impl):
    require_impl(impl)
    case = advantage_case(4)

    def fn(r, v, m):
        return ops.gae(r, v, m, gamma=0.99, gae_lambda=0.9, impl=impl)

    compare(fn, (case["logprobs"], case["reward_values"].T.contiguous().T, case["mask"]), name=f"gae/{impl}")


@pytest.mark.parametrize("impl", IMPLS)
def test_safe_advantages(impl):
    require_impl(impl)
    case = advantage_case(5)

    def fn(lam, **inputs):
        return tuple(ops.safe_advantages(**inputs, kl_coef=0.1, lagrange_multiplier=lam, gamma=0.98, kl_estimator="k3",
                                         score_clip=2.0, whiten=True, impl=impl))

    for lam in (0.7, torch.tensor(0.7)):  # a float, and a CPU 0-dim tensor (read by the op at run time)
        eager = fn(lam, **case)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(lam, **case)
        assert_same(eager, compiled, f"safe_advantages/{impl} λ={lam!r}")


@pytest.mark.parametrize("impl", IMPLS)
def test_rloo_advantages(impl):
    require_impl(impl)
    case = advantage_case(6)
    del case["reward_values"], case["cost_values"]

    def fn(lam, **inputs):
        return tuple(ops.rloo_advantages(**inputs, group_size=2, kl_coef=0.05, lagrange_multiplier=lam,
                                         kl_estimator="k2", impl=impl))

    for lam in (0.3, torch.tensor(0.3, dtype=torch.float64)):
        eager = fn(lam, **case)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(lam, **case)
        assert_same(eager, compiled, f"rloo_advantages/{impl} λ={lam!r}")


@pytest.mark.parametrize("impl", IMPLS)
def test_group_advantages(impl):
    """GRPO over a group_index (the stable-sort densification is traced, no host read), REINFORCE++
    and rloo_advantages' opt-in path, under fullgraph."""
    require_impl(impl)
    case = advantage_case(9)
    del case["reward_values"], case["cost_values"]
    index = torch.tensor([4, 1, 4, 1])

    def fn(lam, index, **inputs):
        grpo = ops.group_advantages(**inputs, estimator="grpo", group_index=index, kl_coef=0.05,
                                    lagrange_multiplier=lam, mask_nan_rewards=True, per_token=True, impl=impl)
        rpp = ops.group_advantages(**inputs, estimator="reinforce_pp", kl_coef=0.05, lagrange_multiplier=lam,
                                   score_clip=1.0, clip_before_kl=True, impl=impl)
        rloo = ops.rloo_advantages(**inputs, group_index=index, kl_coef=0.05, lagrange_multiplier=lam,
                                   mask_nan_rewards=True, impl=impl)
        return (*grpo, *rpp, *rloo)

    case["reward_scores"][2] = float("nan")
    for lam in (0.3, torch.tensor(0.3)):
        eager = fn(lam, index, **case)
        compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")(lam, index, **case)
        for i, (a, b) in enumerate(zip(eager, compiled, strict=True)):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6, equal_nan=True,
                                       msg=lambda m, i=i: f"group_advantages/{impl} output {i}: {m}")


# ---------------------------------------------------------------- inductor (needs a C++ compiler on a CPU)
def test_inductor_token_logprobs_and_gae():
    require_impl("cpp")
    logits, labels, upstream = logprob_case(7)

    def fn(x, y):
        lp, h = ops.token_logprobs(x[:, :-1] * 0.5, y[:, 1:], return_entropy=True, impl="cpp")
        return lp, h

    compare(fn, (logits, labels), backend="inductor", upstream=upstream, grads_of=(logits,), name="token_logprobs")
    case = advantage_case(8)
    compare(lambda r, v, m: ops.gae(r * 2.0, v, m, gamma=0.97, impl="cpp"),
            (case["logprobs"], case["reward_values"], case["mask"]), backend="inductor", name="gae")


# ---------------------------------------------------------------- what the graph holds; checks under compile
def test_the_graph_calls_the_custom_ops():
    """Dynamo keeps the kernels as opaque hcrlhf:: nodes (nothing traced into numpy / Triton)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm.code)
        return gm.forward

    logits, labels, _ = logprob_case()
    torch.compile(lambda x, y: ops.token_logprobs(x, y, impl="cpp"), fullgraph=True, backend=capture)(logits, labels)
    case = advantage_case()
    torch.compile(lambda r, v, m: ops.gae(r, v, m, impl="cpp"), fullgraph=True, backend=capture)(
        case["logprobs"], case["reward_values"], case["mask"])
    assert "hcrlhf.token_logprobs_fwd" in graphs[0] and "hcrlhf.gae" in graphs[1], graphs


@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_changing_scalars_and_shapes_keep_one_graph(impl):
    """A float or int that changes between calls becomes symbolic (automatic dynamic), and so do
    shapes with dynamic=True: the argument checks must still trace without a graph break."""
    require_impl(impl)
    compiled = torch.compile(
        lambda x, y, t, ignore: ops.token_logprobs(x, y, temperature=t, ignore_index=ignore, impl=impl),
        fullgraph=True, backend="aot_eager")
    for n, t, ignore in ((3, 0.5, -100), (3, 0.7, -1), (3, 0.9, -5)):
        x = torch.randn(n, 20, requires_grad=True)
        y = torch.randint(0, 20, (n,))
        compiled(x, y, t, ignore).sum().backward()
        expected = ops.token_logprobs(x, y, temperature=t, ignore_index=ignore, impl=impl)
        torch.testing.assert_close(compiled(x, y, t, ignore), expected, rtol=0, atol=1e-6)
    rloo = torch.compile(lambda lp, m, k, kl, clip: ops.rloo_advantages(
        lp, lp * 0.5, m, lp[:, 0], lp[:, 1], group_size=k, kl_coef=kl, lagrange_multiplier=kl, score_clip=clip,
        impl=impl), fullgraph=True, backend="aot_eager", dynamic=True)
    for rows, k, kl, clip in ((4, 2, 0.1, 1.0), (8, 4, 0.2, 2.0), (6, 3, 0.3, 3.0)):
        lp = torch.randn(rows, 5)
        got = rloo(lp, lp > 0, k, kl, clip)
        expected = ops.rloo_advantages(lp, lp * 0.5, lp > 0, lp[:, 0], lp[:, 1], group_size=k, kl_coef=kl,
                                       lagrange_multiplier=kl, score_clip=clip, impl=impl)
        assert_same(expected, got, f"rloo dynamic/{impl}")


@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_host_checks_become_runtime_asserts(impl):
    """CPU label ranges and a CPU λ tensor are read on the host in eager (ValueError); under compile
    they are torch._assert_async nodes (RuntimeError, the same text without the numbers), no graph break."""
    require_impl(impl)
    logits, labels, _ = logprob_case()
    compiled = torch.compile(lambda x, y: ops.token_logprobs(x, y, impl=impl), fullgraph=True, backend="aot_eager")
    compiled(logits, labels)
    bad = labels.clone()
    bad[1, 2] = V
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 50\)"):
        ops.token_logprobs(logits, bad, impl=impl)
    with pytest.raises(RuntimeError, match=r"token_logprobs: labels must lie in \[0, V\) or equal ignore_index"):
        compiled(logits, bad)
    case = advantage_case()
    del case["reward_values"], case["cost_values"]
    rloo = torch.compile(lambda lam, **kw: ops.rloo_advantages(**kw, group_size=2, kl_coef=0.1,
                                                               lagrange_multiplier=lam, impl=impl),
                         fullgraph=True, backend="aot_eager")
    rloo(torch.tensor(0.5), **case)
    with pytest.raises(ValueError, match="lagrange_multiplier must be finite and >= 0"):
        ops.rloo_advantages(**case, group_size=2, kl_coef=0.1, lagrange_multiplier=torch.tensor(-1.0), impl=impl)
    with pytest.raises(RuntimeError, match="rloo_advantages: lagrange_multiplier must be finite and >= 0"):
        rloo(torch.tensor(-1.0), **case)


# ---------------------------------------------------------------- torch.library.opcheck on every custom op
def _opcheck(op, args):
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_autograd_registration", "test_faketensor",
                                                "test_aot_dispatch_dynamic"))


def test_opcheck_logprob_ops():
    require_impl("cpp")
    gen = torch.Generator().manual_seed(9)
    logits = torch.randn(5, 13, generator=gen)
    labels = torch.tensor([0, 3, -100, 12, 7])
    for impl in ("cpp", "torch"):
        x = logits.clone().requires_grad_()
        _opcheck(torch.ops.hcrlhf.token_logprobs_fwd.default, (x, labels, 0.8, -100, True, False, impl))
        _opcheck(torch.ops.hcrlhf.token_logprobs_fwd.default, (x, labels, 1.0, -100, False, False, impl))
        _, stats, entropy = torch.ops.hcrlhf.token_logprobs_fwd(logits, labels, 0.8, -100, True, False, impl)
        g_lp, g_h = torch.randn(5, generator=gen), torch.randn(5, generator=gen)
        bwd_args = (labels, stats, entropy, g_lp, g_h, 0.8, -100, impl)
        _opcheck(torch.ops.hcrlhf.token_logprobs_bwd.default, (logits, *bwd_args))
        _opcheck(torch.ops.hcrlhf.token_logprobs_bwd.default,
                 (logits, labels, stats, None, g_lp, None, 0.8, -100, impl))
        _opcheck(torch.ops.hcrlhf.token_logprobs_bwd_.default, (logits.clone(), *bwd_args))
        hidden, weight = torch.randn(5, 4, generator=gen), torch.randn(13, 4, generator=gen)
        bias = torch.randn(13, generator=gen)
        grad_args = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        _opcheck(torch.ops.hcrlhf.linear_logprobs_fwd.default, (*grad_args, labels, 0.8, True, 2, impl))
        _opcheck(torch.ops.hcrlhf.linear_logprobs_fwd.default, (*grad_args[:2], None, labels, 1.0, False, 3, impl))
        _, stats, entropy = torch.ops.hcrlhf.linear_logprobs_fwd(hidden, weight, bias, labels, 0.8, True, 2, impl)
        _opcheck(torch.ops.hcrlhf.linear_logprobs_bwd.default,
                 (hidden, weight, bias, labels, stats, entropy, g_lp, g_h, 0.8, 2, impl, True, True, True))
        _opcheck(torch.ops.hcrlhf.linear_logprobs_bwd.default,
                 (hidden, weight, None, labels, stats, None, g_lp, None, 0.8, 2, impl, False, True, False))


def test_opcheck_logprob_ops_new_arguments():
    """token_logprobs_fwd / _bwd / _bwd_ with labels None (entropy alone), (rows, K) labels and a row mask."""
    require_impl("cpp")
    gen = torch.Generator().manual_seed(10)
    logits = torch.randn(5, 13, generator=gen)
    labels = torch.tensor([[0, 3, 3], [-100, 12, 7], [-100, -100, -100], [1, 2, 4], [5, -100, 6]])
    row_mask = torch.tensor([True, True, True, False, True])
    g_k, g_h = torch.randn(5, 3, generator=gen), torch.randn(5, generator=gen)
    for impl in ("cpp", "torch"):
        x = logits.clone().requires_grad_()
        _opcheck(torch.ops.hcrlhf.token_logprobs_fwd.default, (x, None, 0.8, -100, True, False, impl, row_mask))
        _opcheck(torch.ops.hcrlhf.token_logprobs_fwd.default, (x, labels, 0.8, -100, True, False, impl, row_mask))
        one_label = (x, labels[:, 0], 1.0, -100, False, False, impl, row_mask)  # a strided labels view
        _opcheck(torch.ops.hcrlhf.token_logprobs_fwd.default, one_label)
        _, stats, entropy = torch.ops.hcrlhf.token_logprobs_fwd(logits, labels, 0.8, -100, True, False, impl, row_mask)
        bwd_args = (labels, stats, entropy, g_k, g_h, 0.8, -100, impl, row_mask)
        _opcheck(torch.ops.hcrlhf.token_logprobs_bwd.default, (logits, *bwd_args))
        _opcheck(torch.ops.hcrlhf.token_logprobs_bwd_.default, (logits.clone(), *bwd_args))
        _opcheck(torch.ops.hcrlhf.token_logprobs_bwd.default,
                 (logits, None, stats, entropy, None, g_h, 0.8, -100, impl, row_mask))


def test_opcheck_advantage_ops():
    require_impl("cpp")
    case = advantage_case(10)
    tensors = tuple(case.values())
    _opcheck(torch.ops.hcrlhf.gae.default, (case["logprobs"], case["reward_values"], case["mask"], 0.99, 0.95, "cpp"))
    _opcheck(torch.ops.hcrlhf.gae.default,
             (case["logprobs"].double(), case["reward_values"], case["mask"].int(), 1.0, 0.9, "cpp"))
    options = (0.1, 1.0, 0.95, "k1", None, True, True, False, "cpp")
    _opcheck(torch.ops.hcrlhf.safe_advantages.default, (*tensors, None, 0.5, *options))
    _opcheck(torch.ops.hcrlhf.safe_advantages.default,
             (*tensors, torch.tensor(0.5), 0.0, 0.1, 0.9, 0.8, "k3", 3.0, False, False, True, "cpp"))
    rloo_tensors = tensors[:5]
    _opcheck(torch.ops.hcrlhf.rloo_advantages.default, (*rloo_tensors, None, 0.5, 2, 0.1, "k1", None, "cpp"))
    _opcheck(torch.ops.hcrlhf.rloo_advantages.default,
             (*rloo_tensors, torch.tensor(0.5), 0.0, 4, 0.1, "k2", 1.5, "cpp"))
