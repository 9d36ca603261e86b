"""ops.linear_logprobs against the float64 reference, and its memory bound measured on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from numerics import require_impl

from hcrlhf import ops, reference
from hcrlhf.ops.linear_logprobs import default_chunk_size

IMPLS = ["torch", "cpp", "triton"]
ATOL = {torch.float32: (2e-5, 2e-6), torch.bfloat16: (2e-5, 1e-4)}


@pytest.fixture(autouse=True)
def small_triton_blocks(monkeypatch):
    import hcrlhf.kernels.token_logprobs as kernel

    monkeypatch.setattr(kernel, "_INTERPRETER_BLOCK_V", 256)


def assert_rule(name, actual, truth, low_precision_ref, atol):
    """max|actual - truth| <= 2 * max|low_precision_ref - truth| + atol (docs/ops.md#how-the-kernels-are-tested)."""
    actual, truth, low = actual.double(), truth.double(), low_precision_ref.double()
    err = (actual - truth).abs()
    bound = 2 * (low - truth).abs().max().item() + atol
    if not torch.isfinite(actual).all() or err.max().item() > bound:
        worst = tuple(int(i) for i in torch.unravel_index(err.nan_to_num(float("inf")).argmax(), err.shape))
        raise AssertionError(f"{name}: max err {err.max().item():.3e} (mean {err.mean().item():.3e}) > bound "
                             f"{bound:.3e}; worst {worst}: got {actual[worst].item():.6g}, "
                             f"want {truth[worst].item():.6g}")


def make_case(n_tokens, hidden_size, vocab, dtype, *, with_bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n_tokens, hidden_size, generator=gen).to(dtype)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * hidden_size**-0.5 * 3).to(dtype)
    bias = torch.randn(vocab, generator=gen).to(dtype) if with_bias else None
    labels = torch.randint(0, vocab, (n_tokens,), generator=gen)
    labels[torch.rand(n_tokens, generator=gen) < 0.2] = -100
    return hidden, weight, bias, labels


def run_with_grads(fn, hidden, weight, bias, upstream, return_entropy):
    params = [hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()]
    if bias is not None:
        params.append(bias.detach().clone().requires_grad_())
    out = fn(*params)
    lp, h = out if return_entropy else (out, None)
    loss = (lp * upstream[0].to(lp.dtype)).sum()
    if return_entropy:
        loss = loss + (h * upstream[1].to(h.dtype)).sum()
    loss.backward()
    return [lp.detach()] + ([h.detach()] if return_entropy else []) + [p.grad for p in params]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_values_and_all_gradients(impl, dtype, with_bias):
    require_impl(impl)
    n_tokens, hidden_size, vocab = 23, 16, 601
    hidden, weight, bias, labels = make_case(n_tokens, hidden_size, vocab, dtype, with_bias=with_bias,
                                             seed=int(with_bias))
    temperature, return_entropy = 0.8, True
    gen = torch.Generator().manual_seed(3)
    upstream = (torch.randn(n_tokens, generator=gen), torch.randn(n_tokens, generator=gen))

    def ref(h, w, *b):
        return reference.linear_logprobs(h, w, labels, b[0] if b else None, temperature, return_entropy)

    def kernel(h, w, *b):
        return ops.linear_logprobs(h, w, labels, bias=b[0] if b else None, temperature=temperature,
                                   return_entropy=return_entropy, chunk_size=5, impl=impl)  # ragged chunks

    as64 = lambda t: None if t is None else t.double()
    truth = run_with_grads(ref, as64(hidden), as64(weight), as64(bias), upstream, return_entropy)
    low = run_with_grads(ref, hidden, weight, bias, upstream, return_entropy)
    got = run_with_grads(kernel, hidden, weight, bias, upstream, return_entropy)
    names = ["logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"]
    atol_value, atol_grad = ATOL[dtype]
    for index, (name, g, t, lo) in enumerate(zip(names, got, truth, low, strict=False)):
        assert g.dtype == (torch.float32 if index < 2 else dtype), name
        assert_rule(f"{impl}/{dtype} {name}", g, t, lo, atol_value if index < 2 else atol_grad)
    assert (got[0][labels == -100] == 0).all() and (got[1][labels == -100] == 0).all()


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_chunk_size_does_not_change_the_result(impl):
    require_impl(impl)
    hidden, weight, bias, labels = make_case(40, 8, 300, torch.float32, with_bias=True, seed=5)
    outs = [ops.linear_logprobs(hidden, weight, labels, bias=bias, chunk_size=c, impl=impl)
            for c in (1, 7, 40, 1000, None)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], atol=1e-5, rtol=1e-6)


def test_leading_dims_logprob_only_and_no_weight_grad():
    hidden, weight, _, labels = make_case(12, 8, 100, torch.float32, with_bias=False, seed=6)
    x = hidden.view(3, 4, 8).requires_grad_()
    lp = ops.linear_logprobs(x, weight, labels.view(3, 4))  # weight does not require grad
    assert lp.shape == (3, 4)
    g = torch.randn(3, 4)
    (lp * g).sum().backward()
    x64 = hidden.double().view(3, 4, 8).requires_grad_()
    (reference.linear_logprobs(x64.view(12, 8), weight.double(), labels) * g.double().view(12)).sum().backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, atol=1e-5, rtol=1e-5)
    assert weight.grad is None


def test_default_chunk_size():
    assert default_chunk_size(10, 151_936, 4, torch.device("cpu")) == 10
    chunk = default_chunk_size(100_000, 151_936, 4, torch.device("cpu"))
    assert chunk % 64 == 0 and chunk * 151_936 * 4 <= 64 * 2**20
    assert default_chunk_size(100_000, 10**9, 4, torch.device("cpu")) == 1


def test_bad_input_names_the_argument():
    hidden, weight, bias, labels = make_case(6, 8, 50, torch.float32, with_bias=True, seed=7)
    call = ops.linear_logprobs
    with pytest.raises(ValueError, match="weight"):
        call(hidden, weight[:, :7], labels)
    with pytest.raises(ValueError, match="weight"):
        call(hidden, weight[:0], labels)
    with pytest.raises(ValueError, match="bias"):
        call(hidden, weight, labels, bias=bias[:49])
    with pytest.raises(TypeError, match="weight"):
        call(hidden, weight.double(), labels)
    with pytest.raises(TypeError, match="bias"):
        call(hidden, weight, labels, bias=bias.half())
    with pytest.raises(ValueError, match="labels"):
        call(hidden, weight, labels[:5])
    bad = labels.clone()
    bad[0] = 50
    with pytest.raises(ValueError, match="labels"):
        call(hidden, weight, bad)
    with pytest.raises(TypeError, match="labels"):
        call(hidden, weight, labels.float())
    with pytest.raises(TypeError, match="hidden"):
        call(hidden.long(), weight, labels)
    with pytest.raises(ValueError, match="chunk_size"):
        call(hidden, weight, labels, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        call(hidden, weight, labels, temperature=-1.0)


_MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from hcrlhf import ops, reference

    torch.set_num_threads(2)
    mode, impl, n_tokens, vocab, hidden_size, chunk = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n_tokens, hidden_size, generator=gen, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * 0.1).requires_grad_()
    labels = torch.randint(0, vocab, (n_tokens,), generator=gen)
    grad_up = torch.randn(n_tokens, generator=gen)
    # warm up the code paths (and their allocations) on a small slice first
    ops.linear_logprobs(hidden[:8], weight, labels[:8], chunk_size=8, impl=impl).sum().backward()
    hidden.grad = weight.grad = None
    # the gradients' own storage is part of any implementation: allocate it before the baseline
    hidden.grad = torch.zeros_like(hidden)
    weight.grad = torch.zeros_like(weight)
    kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    before = kib()
    if mode == "chunked":
        lp, ent = ops.linear_logprobs(hidden, weight, labels, return_entropy=True, chunk_size=chunk, impl=impl)
    else:  # the unfused path, to show that the probe sees an (N, V) buffer
        lp, ent = reference.linear_logprobs(hidden, weight, labels, None, 1.0, True)
    ((lp * grad_up).sum() + ent.sum()).backward()
    print(json.dumps({"extra_bytes": (kib() - before) * 1024}))
""")


def _peak_extra_bytes(mode, impl, n_tokens, vocab, hidden_size, chunk):
    # Large blocks straight from mmap and back to the OS on free (no glibc heap caching), so that
    # the peak RSS tracks the peak of live allocations.
    env = dict(os.environ, OMP_NUM_THREADS="2", MALLOC_MMAP_THRESHOLD_="1048576", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, mode, impl, str(n_tokens), str(vocab),
                          str(hidden_size), str(chunk)], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]


@pytest.mark.parametrize("impl", ["cpp", "torch"])
def test_peak_memory_is_bounded_by_the_chunk_not_n_times_v(impl):
    """Peak RSS growth of forward+backward (measured in a fresh process): a few chunks of logits,
    far below one (N, V) fp32 logits tensor (256 MiB here), which the unfused path does allocate."""
    require_impl(impl)
    n_tokens, vocab, hidden_size, chunk = 2048, 32_768, 16, 64
    full_logits = n_tokens * vocab * 4  # 256 MiB
    chunk_logits = chunk * vocab * 4  # 8 MiB
    extra = _peak_extra_bytes("chunked", impl, n_tokens, vocab, hidden_size, chunk)
    # measured ~11 MiB (C++: one chunk + the V·H fp32 grad_weight accumulator) and ~47 MiB (pure
    # torch: a few fp32 chunk temporaries), against 1.6 GiB for the unfused path
    allowed = (2 if impl == "cpp" else 7) * chunk_logits + 8 * 2**20
    assert extra <= allowed, f"peak extra {extra / 2**20:.1f} MiB > {allowed / 2**20:.1f} MiB"
    assert extra < full_logits / 4
    if impl == "cpp":  # the probe is sensitive: the unfused path shows at least one full (N, V) buffer
        unfused = _peak_extra_bytes("unfused", impl, n_tokens, vocab, hidden_size, chunk)
        assert unfused >= full_logits, f"unfused peak {unfused / 2**20:.1f} MiB < {full_logits / 2**20:.0f} MiB"


@pytest.mark.gpu
def test_gpu_realistic_shape():
    """8192 tokens, H = 1536, V = 151,936 in bf16: values and gradients on a row sample vs fp64."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    n_tokens, hidden_size, vocab = 8192, 1536, 151_936
    hidden = torch.randn(n_tokens, hidden_size, device="cuda", generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(vocab, hidden_size, device="cuda", generator=gen) * hidden_size**-0.5)
    weight = weight.bfloat16().requires_grad_()
    labels = torch.randint(0, vocab, (n_tokens,), device="cuda", generator=gen)
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    lp, ent = ops.linear_logprobs(hidden, weight, labels, return_entropy=True, impl="triton")
    (lp.sum() + ent.sum()).backward()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < n_tokens * vocab * 2  # less than one bf16 (N, V) logits tensor
    rows = slice(0, 256)
    truth_lp, truth_ent = reference.linear_logprobs(hidden[rows].double(), weight.double(), labels[rows],
                                                    None, 1.0, True)
    low_lp, low_ent = reference.linear_logprobs(hidden[rows].detach(), weight.detach(), labels[rows],
                                                None, 1.0, True)
    assert_rule("gpu logp", lp[rows], truth_lp, low_lp, 1e-4)
    assert_rule("gpu entropy", ent[rows], truth_ent, low_ent, 1e-4)
