"""ops.linear_logprobs against the float64 reference, and its memory bound measured on the CPU."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from numerics import require_impl

from hcrlhf import ops, reference
from hcrlhf.ops.linear_logprobs import default_tiles

IMPLS = ["torch", "cpp", "triton"]
ATOL = {torch.float32: (2e-5, 2e-6), torch.bfloat16: (2e-5, 1e-4)}
INF, NAN = float("inf"), float("nan")


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
@pytest.mark.parametrize("vocab_chunk", [None, 150], ids=["whole_vocab", "vocab_tiles"])
def test_values_and_all_gradients(impl, dtype, with_bias, vocab_chunk):
    """Ragged token chunks (5 of 23 tokens) and, with vocab_tiles, ragged vocabulary tiles (150 of 601:
    the merge across tiles, labels outside their tile, grad_hidden summed over tiles, grad_weight over chunks)."""
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
                                   return_entropy=return_entropy, chunk_size=5, vocab_chunk_size=vocab_chunk,
                                   impl=impl)

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
    tiles = [(1, None), (7, None), (40, None), (1000, None), (None, None), (7, 1), (40, 64), (None, 299), (13, 300)]
    outs = [ops.linear_logprobs(hidden, weight, labels, bias=bias, chunk_size=c, vocab_chunk_size=v,
                                return_entropy=True, impl=impl) for c, v in tiles]
    for (c, v), out in zip(tiles[1:], outs[1:], strict=True):
        for got, want in zip(out, outs[0], strict=True):
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-6, msg=f"chunk {c}, tile {v}")


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_tiles_against_hand_computed_values(impl):
    """H = 1, logits x = (0, 1, 2, 3, 4)·h, one vocabulary entry per tile, T = 0.5: log p, entropy and
    d/dh from the closed forms (math, not the code under test)."""
    require_impl(impl)
    h_values, temperature, vocab = (1.0, -0.5), 0.5, 5
    hidden = torch.tensor(h_values, dtype=torch.float64)[:, None].float().requires_grad_()
    weight = torch.arange(vocab, dtype=torch.float32)[:, None]
    labels = torch.tensor([3, 0])
    lp, ent = ops.linear_logprobs(hidden, weight, labels, temperature=temperature, return_entropy=True,
                                  chunk_size=1, vocab_chunk_size=1, impl=impl)
    (lp.sum() + ent.sum()).backward()
    for row, (h, label) in enumerate(zip(h_values, labels.tolist(), strict=True)):
        z = [j * h / temperature for j in range(vocab)]
        log_z = math.log(sum(math.exp(v) for v in z))
        p = [math.exp(v - log_z) for v in z]
        entropy = -sum(q * math.log(q) for q in p)
        # d/dz: onehot - p (log-prob) and -p (log p + H) (entropy); dz_j/dh = j / T
        grad_z = [(j == label) - p[j] - p[j] * (math.log(p[j]) + entropy) for j in range(vocab)]
        grad_h = sum(g * j / temperature for j, g in enumerate(grad_z))
        assert lp[row].item() == pytest.approx(z[label] - log_z, abs=1e-5)
        assert ent[row].item() == pytest.approx(entropy, abs=1e-5)
        assert hidden.grad[row, 0].item() == pytest.approx(grad_h, abs=1e-4)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_logits_across_vocabulary_tiles(impl):
    """The non-finite rules (docs/ops.md#non-finite-logits) hold when the logits are split into tiles:
    a tile whose logits are all -inf (a -inf bias block) contributes nothing, a label inside it gives
    -inf with finite gradients; a NaN / +inf anywhere, or every logit -inf, gives a NaN row; an ignored
    row stays 0 with a zero gradient."""
    require_impl(impl)
    gen = torch.Generator().manual_seed(11)
    n_tokens, hidden_size, vocab = 8, 16, 700
    hidden = torch.randn(n_tokens, hidden_size, generator=gen)
    weight = torch.randn(vocab, hidden_size, generator=gen) * 0.5
    weight[:, 0] = weight[:, 0].abs() + 0.1  # so that hidden[:, 0] = -inf gives every logit -inf
    bias = torch.randn(vocab, generator=gen)
    bias[256:384] = -INF  # exactly the third tile of 128: all -inf for every row
    bias[690:] = -INF  # the tail of the last tile
    labels = torch.tensor([3, 300, 695, 7, -100, 9, 12, 600])  # rows 1, 2: labels on -inf logits
    hidden[3, 4] = NAN
    hidden[4, 1] = NAN  # ignored row
    hidden[5, 0] = INF  # logits +inf: undefined
    hidden[6] = 0.0
    hidden[6, 0] = -INF  # every logit -inf: undefined
    results = {}
    for name, tile in (("tiles", 128), ("whole", None)):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        lp, ent = ops.linear_logprobs(h, w, labels, bias=b, return_entropy=True, chunk_size=3,
                                      vocab_chunk_size=tile, impl=impl)
        (lp.nan_to_num(neginf=0.0).sum() + ent.sum()).backward()  # skip the -inf values, keep their gradient
        results[name] = (lp.detach(), ent.detach(), h.grad, w.grad, b.grad)
    lp, ent, g_hidden, g_weight, g_bias = results["tiles"]
    assert lp[1] == -INF and lp[2] == -INF
    undefined = [3, 5, 6]
    assert torch.isnan(lp[undefined]).all() and torch.isnan(ent[undefined]).all()
    assert torch.isnan(g_hidden[undefined]).all()
    assert lp[4] == 0 and ent[4] == 0 and (g_hidden[4] == 0).all()
    ok = [0, 1, 2, 7]
    assert torch.isfinite(ent[ok]).all() and torch.isfinite(g_hidden[ok]).all()
    # the same numbers as the untiled op (one engine pass over all of V)
    for got, want in zip(results["tiles"], results["whole"], strict=True):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5, equal_nan=True)
    # and as the float64 reference on the defined rows
    h64, w64, b64 = (t.double().requires_grad_() for t in (hidden[ok], weight, bias))
    r_lp, r_ent = reference.linear_logprobs(h64, w64, labels[ok], b64, 1.0, True)
    (r_lp.nan_to_num(neginf=0.0).sum() + r_ent.sum()).backward()
    torch.testing.assert_close(lp[ok].double(), r_lp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent[ok].double(), r_ent, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(g_hidden[ok].double(), h64.grad, atol=1e-4, rtol=1e-4)


def test_all_minus_inf_tile_in_float64():
    """float64 (impl="torch"): a tile whose logits are all -inf is dropped from the merge even where its
    sentinel's distance to the row max overflows to -inf (T = 0.25), instead of giving 0·inf = NaN."""
    gen = torch.Generator().manual_seed(14)
    hidden = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    weight = torch.randn(300, 8, generator=gen, dtype=torch.float64)
    bias = torch.randn(300, generator=gen, dtype=torch.float64)
    bias[100:200] = -INF
    labels = torch.tensor([0, 150, 299, -100, 42])
    lp, ent = ops.linear_logprobs(hidden, weight, labels, bias=bias, temperature=0.25, return_entropy=True,
                                  vocab_chunk_size=100, impl="torch")
    r_lp, r_ent = reference.linear_logprobs(hidden, weight, labels, bias, 0.25, True)
    assert lp[1] == -INF and r_lp[1] == -INF
    torch.testing.assert_close(lp, r_lp, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ent, r_ent, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("impl", ["torch", "cpp"])
@pytest.mark.parametrize("temperature", [0.7, 50_000.0])
def test_float16_vocabulary_tiles(impl, temperature):
    """float16 tiles: the sentinel (-65504) stays weightless; at temperature 50,000 (where it would not)
    the op runs whole-vocabulary blocks. Values against the float64 reference on the same fp16 logits."""
    require_impl(impl)
    hidden, weight, bias, labels = make_case(12, 8, 400, torch.float16, with_bias=True, seed=15)
    lp, ent = ops.linear_logprobs(hidden, weight, labels, bias=bias, temperature=temperature, return_entropy=True,
                                  vocab_chunk_size=128, impl=impl)
    logits = torch.addmm(bias, hidden, weight.T).double()  # the fp16 logits the op sees, in float64
    r_lp, r_ent = reference.token_logprobs(logits, labels, temperature, True, -100)
    torch.testing.assert_close(lp.double(), r_lp, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(ent.double(), r_ent, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "cpp"])
@pytest.mark.parametrize("temperature", [1e-4, 3e-3, 50.0])
def test_vocabulary_tiles_at_extreme_temperatures(impl, temperature):
    """The merge across tiles keeps the engine's precision at tiny temperatures (the max is subtracted in
    the logits' units before scaling) and at a large one; the rule against float64 as everywhere."""
    require_impl(impl)
    n_tokens, hidden_size, vocab = 19, 8, 500
    hidden, weight, bias, labels = make_case(n_tokens, hidden_size, vocab, torch.float32, with_bias=True, seed=9)
    gen = torch.Generator().manual_seed(4)
    upstream = (torch.randn(n_tokens, generator=gen), torch.randn(n_tokens, generator=gen))

    def ref(h, w, b):
        return reference.linear_logprobs(h, w, labels, b, temperature, True)

    def kernel(h, w, b):
        return ops.linear_logprobs(h, w, labels, bias=b, temperature=temperature, return_entropy=True,
                                   chunk_size=8, vocab_chunk_size=96, impl=impl)

    truth = run_with_grads(ref, hidden.double(), weight.double(), bias.double(), upstream, True)
    low = run_with_grads(ref, hidden, weight, bias, upstream, True)
    got = run_with_grads(kernel, hidden, weight, bias, upstream, True)
    for name, g, t, lo in zip(["logp", "entropy", "grad_hidden", "grad_weight", "grad_bias"], got, truth, low,
                              strict=True):
        assert_rule(f"{impl} T={temperature} {name}", g, t, lo, 2e-5 if name in ("logp", "entropy") else 2e-6)


@pytest.mark.parametrize("impl", ["torch", "cpp"])
def test_vocabulary_tiles_under_torch_compile(impl):
    """The tiled ops stay opaque custom ops with vocab_chunk: opcheck (schema, fake tensors, autograd
    registration, AOT dispatch) and torch.compile(fullgraph=True) give eager's values and gradients."""
    require_impl(impl)
    hidden, weight, bias, labels = make_case(6, 4, 13, torch.float32, with_bias=True, seed=12)
    gen = torch.Generator().manual_seed(13)
    g_lp, g_h = torch.randn(6, generator=gen), torch.randn(6, generator=gen)
    tests = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    grad_args = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    torch.library.opcheck(torch.ops.hcrlhf.linear_logprobs_fwd.default,
                          (*grad_args, labels, 0.8, True, 4, impl, 5), test_utils=tests)
    _, stats, entropy = torch.ops.hcrlhf.linear_logprobs_fwd(hidden, weight, bias, labels, 0.8, True, 4, impl, 5)
    torch.library.opcheck(torch.ops.hcrlhf.linear_logprobs_bwd.default,
                          (hidden, weight, bias, labels, stats, entropy, g_lp, g_h, 0.8, 4, impl, True, True, True, 5),
                          test_utils=tests)

    def fn(h, w, b):
        return ops.linear_logprobs(h, w, labels, bias=b, temperature=1.25, return_entropy=True, chunk_size=4,
                                   vocab_chunk_size=5, impl=impl)

    results = []
    for f in (fn, torch.compile(fn, fullgraph=True, backend="aot_eager")):
        h, w, b = (t.clone().requires_grad_() for t in (hidden, weight, bias))
        lp, ent = f(h, w, b)
        ((lp * g_lp).sum() + (ent * g_h).sum()).backward()
        results.append((lp, ent, h.grad, w.grad, b.grad))
    for eager, compiled in zip(*results, strict=True):
        torch.testing.assert_close(compiled, eager)


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


def test_default_tiles():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert default_tiles(10, 151_936, 4, cpu) == (10, 151_936)  # 10 tokens: the block fits the budget
    chunk, tile = default_tiles(100_000, 151_936, 4, cpu)
    assert chunk == 1021 and tile % 128 == 0 and chunk * tile * 4 <= 32 * 2**20 < chunk * (tile + 128) * 4
    assert default_tiles(100_000, 151_936, 2, cpu) == (1021, 2 * tile)  # bf16: twice the entries per block
    assert default_tiles(2048, 151_936, 4, cpu)[0] == 1024 and default_tiles(1025, 151_936, 4, cpu)[0] == 513
    assert default_tiles(100_000, 151_936, 4, cpu, chunk_size=64) == (64, 131_072)
    assert default_tiles(100_000, 151_936, 4, cpu, vocab_chunk_size=10**6) == (1021, 151_936)
    assert default_tiles(100, 50, 4, cpu, chunk_size=500, vocab_chunk_size=7) == (100, 7)
    # a GPU keeps the whole vocabulary per block and as many tokens (multiple of 64) as fit 512 MiB
    chunk, tile = default_tiles(100_000, 151_936, 2, cuda)
    assert tile == 151_936 and chunk % 64 == 0 and chunk * tile * 2 <= 512 * 2**20 < (chunk + 64) * tile * 2
    assert default_tiles(100_000, 10**9, 4, cuda) == (1, 134_217_728)
    assert default_tiles(100_000, 151_936, 2, cuda, vocab_chunk_size=16_384)[0] == 16_384


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
    with pytest.raises(ValueError, match="vocab_chunk_size"):
        call(hidden, weight, labels, vocab_chunk_size=0)
    with pytest.raises(ValueError, match="vocab_chunk_size"):
        call(hidden, weight, labels, vocab_chunk_size=True)
    with pytest.raises(ValueError, match="temperature"):
        call(hidden, weight, labels, temperature=-1.0)


_MEMORY_PROBE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from hcrlhf import ops, reference

    torch.set_num_threads(2)
    mode, impl, n_tokens, vocab, hidden_size, chunk = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
    chunk = chunk or None  # 0: the default tiles
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
@pytest.mark.parametrize("chunk", [64, 0], ids=["64_tokens", "default_tiles"])
def test_peak_memory_is_bounded_by_the_chunk_not_n_times_v(impl, chunk):
    """Peak RSS growth of forward+backward (measured in a fresh process): a few blocks of logits,
    far below one (N, V) fp32 logits tensor (256 MiB here), which the unfused path does allocate.
    64 tokens: blocks of (64, V); default tiles: (1024, 8192) blocks, two token chunks of four tiles."""
    require_impl(impl)
    n_tokens, vocab, hidden_size = 2048, 32_768, 16
    full_logits = n_tokens * vocab * 4  # 256 MiB
    rows, tile = default_tiles(n_tokens, vocab, 4, torch.device("cpu"), chunk or None)
    assert (rows, tile) == ((64, vocab) if chunk else (1024, 8192))
    block = rows * (tile + 16) * 4  # 8 MiB, 32 MiB
    extra = _peak_extra_bytes("chunked", impl, n_tokens, vocab, hidden_size, chunk)
    # measured (64 tokens / default tiles) ~11 / 38 MiB with C++ (one block + the V·H fp32 grad_weight) and
    # ~63 / 256 MiB with pure torch (~8 fp32 block temporaries), against 1.6 GiB for the unfused path
    allowed = (2 if impl == "cpp" else 9) * block + 8 * 2**20
    assert extra <= allowed, f"peak extra {extra / 2**20:.1f} MiB > {allowed / 2**20:.1f} MiB"
    assert extra < (full_logits / 4 if impl == "cpp" or chunk else full_logits)
    print(f"{impl}, chunk {chunk}: peak extra {extra / 2**20:.1f} MiB")
    if impl == "cpp" and chunk:  # the probe is sensitive: the unfused path shows at least one full (N, V) buffer
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
