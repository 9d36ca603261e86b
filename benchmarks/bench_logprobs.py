"""Benchmark token_logprobs and linear_logprobs against the peers' own code, torch.compile and a true floor.

    hcrlhf bench logprobs [--device cpu|cuda] [--preset full|check|dry] [--quick] [--out FILE] [--no-write]
    python -m benchmarks.bench_logprobs ...

token_logprobs (logits (B, T, V) -> log-prob of the label), and token_logprobs+entropy (log-prob and
entropy): forward, backward and forward+backward; ours (Triton on a GPU, C++ on a CPU) against the
peer libraries' functions themselves (benchmarks/peers.py: TRL 1.16 selective_log_softmax /
entropy_from_logits, verl 0.9.1 logprobs_from_logits / entropy_from_logits, OpenRLHF 0.11.2
log_probs_from_logits / compute_entropy), Safe RLHF's log_softmax+gather, and torch.compile of the
plain fp32 log_softmax+gather path.

linear_logprobs (hidden -> log-prob, no (N, V) logits): forward and forward+backward against TRL's
ChunkedLogProbFunction, the unfused lm_head + log_softmax+gather, torch.compile of the plain path
and, for reference, the bare lm_head matmul.

Every row has: the max abs error against a float64 reference (log-prob / entropy, and the gradient
w.r.t. the logits or the hidden states in fwd+bwd mode; computed from the closed-form gradient, in
row chunks); the peak extra memory of one fwd+bwd (CUDA allocator peak, or on a CPU the peak RSS
growth in a fresh process); and "× floor", the time over a true lower bound (benchmarks/harness.py):
bytes read / best measured read bandwidth (and bytes written / write bandwidth) for token ops,
FLOPs / best measured matmul rate for linear ops. The run fails (after writing the table) if any
fastest sample beats its floor.

Presets: full (GPU: B·T ∈ {2048, 8192}, V ∈ {32,000, 151,936}, bf16 and fp32; CPU: a reduced grid), check
(the one-shot GPU check's few shapes), dry (tiny shapes, seconds; --quick is the same and writes nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from hcrlhf import ops
from hcrlhf.benchmarks import harness, peers

SECTION = "logprobs"
REFERENCE_CHUNK_ROWS = 256

TOKEN_PEERS = {
    "TRL selective_log_softmax": peers.trl_logprobs,
    "verl logprobs_from_logits": peers.verl_logprobs,
    "OpenRLHF log_probs_from_logits": peers.openrlhf_logprobs,
    "Safe RLHF log_softmax+gather": peers.safe_rlhf_logprobs,
    "torch.compile(log_softmax+gather)": peers.plain_logprobs,
}
ENTROPY_PEERS = {
    "TRL selective_log_softmax + entropy_from_logits": peers.trl_logprobs_and_entropy,
    "verl logprobs_from_logits + entropy_from_logits": peers.verl_logprobs_and_entropy,
    "OpenRLHF log_probs_from_logits + compute_entropy": peers.openrlhf_logprobs_and_entropy,
    "torch.compile(log_softmax: log-prob, entropy)": peers.plain_logprobs_and_entropy,
}
LINEAR_PEERS = {
    "TRL ChunkedLogProbFunction": peers.trl_linear_logprobs,
    "unfused matmul + log_softmax+gather": peers.unfused_linear_logprobs,
    "torch.compile(matmul + log_softmax+gather)": peers.plain_linear_logprobs,
    "bare lm_head matmul": peers.bare_lm_head,
}
OURS_TOKEN = ("ours", "ours (inplace bwd)")

_COMPILED: dict[str, object] = {}


def _compiled(fn):
    """torch.compile of `fn` (inductor, static shapes: one graph per shape/dtype/grad mode, compiled in warm-up)."""
    import torch._dynamo

    for name in ("cache_size_limit", "recompile_limit"):  # a graph per benchmark case
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    if fn.__name__ not in _COMPILED:
        _COMPILED[fn.__name__] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn.__name__]


# ---------------------------------------------------------------- building and timing
def build(spec: dict):
    """(fn, inputs, grad_out) for one benchmark case; inputs are made fresh from a fixed seed.

    fn returns a tensor or, for token_logprobs+entropy, a (log-prob, entropy) pair; grad_out matches it."""
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    # made on the device: a GPU-sized case (1.2e9 logits) would take seconds per build from a CPU generator
    gen = torch.Generator(device=device).manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=gen, device=device)
    randint = lambda high, shape: torch.randint(0, high, shape, generator=gen, device=device)
    impl, op, vocab = spec["impl"], spec["op"], spec["V"]
    if op == "linear_logprobs":
        n, hidden_size = spec["N"], spec["H"]
        labels = randint(vocab, (n,))
        grad_out = randn(n)
        hidden = randn(n, hidden_size).to(dtype).requires_grad_()
        weight = (randn(vocab, hidden_size) * hidden_size**-0.5).to(dtype).requires_grad_()
        if impl.startswith("ours"):
            kernel = impl.split("(")[1].rstrip(")")
            fn = lambda h, w, y: ops.linear_logprobs(h, w, y, impl=kernel)
        else:
            fn = LINEAR_PEERS[impl]
            fn = _compiled(fn) if impl.startswith("torch.compile") else fn
        return fn, (hidden, weight, labels), grad_out
    batch, length = spec["B"], spec["T"]
    labels = randint(vocab, (batch, length))
    grad_out = randn(batch, length)
    logits = (randn(batch, length, vocab) * 2).to(dtype).requires_grad_()
    entropy = op == "token_logprobs+entropy"
    if entropy:
        grad_out = (grad_out, randn(batch, length))
    if impl in OURS_TOKEN:
        inplace = "inplace" in impl
        kernel = "triton" if device.type == "cuda" else "cpp"
        # in place: the timed backward overwrites the logits with their (finite) gradient each rep
        fn = lambda x, y: ops.token_logprobs(x, y, impl=kernel, inplace_backward=inplace, return_entropy=entropy)
        if inplace:  # refused for a leaf (its data would be overwritten): a non-leaf, as a model's logits
            logits = logits * 1.0  # are; made here, untimed, and autograd.grad stops at it
    else:
        fn = (ENTROPY_PEERS if entropy else TOKEN_PEERS)[impl]
        fn = _compiled(fn) if impl.startswith("torch.compile") else fn
    return fn, (logits, labels), grad_out


def _modes(fn, inputs, grad_out, mode):
    """A zero-argument callable timing `mode` of fn(*inputs) w.r.t. the float inputs that need grad."""
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                return fn(*inputs)
        return run
    if mode == "bwd":
        out = fn(*inputs)
        return lambda: torch.autograd.grad(out, wrt, grad_out, retain_graph=True)
    return lambda: torch.autograd.grad(fn(*inputs), wrt, grad_out)


_PROBE = r"""
import json, sys, torch
from hcrlhf.benchmarks import bench_logprobs as b

def status_kib(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])

spec = json.loads(sys.argv[1])
small = dict(spec, N=8) if spec["op"] == "linear_logprobs" else dict(spec, B=1, T=8)
fn, inputs, grad_out = b.build(small)  # warm-up: load libraries, start threads
b._modes(fn, inputs, grad_out, "fwd+bwd")()
fn, inputs, grad_out = b.build(spec)
run = b._modes(fn, inputs, grad_out, "fwd+bwd")
run()  # a torch.compile row compiles here, outside the measured call
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak RSS (VmHWM) to the current RSS: input set-up is not counted
before = status_kib("VmRSS")
run()
print(json.dumps({"extra": (status_kib("VmHWM") - before) * 1024}))
"""


def cpu_peak_extra(spec: dict) -> int | None:
    """Peak RSS growth of one forward+backward in a fresh process (CPU memory has no allocator stats)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", MALLOC_TRIM_THRESHOLD_="0")
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(spec)], capture_output=True, text=True,
                             env=env, timeout=900)
        return json.loads(out.stdout.strip().splitlines()[-1])["extra"]
    except Exception as exc:  # a probe failure must not lose the timing table
        print(f"  memory probe failed for {spec}: {exc}", file=sys.stderr)
        return None


# ---------------------------------------------------------------- float64 agreement
def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def reference_errors(spec: dict, with_grad: bool) -> tuple[float, float | None]:
    """(max abs error of the outputs, of the gradient or None) of spec's impl against float64, in row chunks.

    The reference gradient is the closed form, not autograd: d logp_y / dx = onehot(y) - p and
    d H / dx = -p (log p + H); for linear_logprobs it is chained through the weight (dh = dx @ W)."""
    fn, inputs, grad_out = build(spec)
    if with_grad:
        outs = _as_tuple(fn(*inputs))
        wrt = inputs[0]
        grad = torch.autograd.grad(outs, wrt, _as_tuple(grad_out), retain_graph=False)[0].detach()
    else:
        with torch.no_grad():
            outs = _as_tuple(fn(*inputs))
        grad = None
    outs = [o.detach().reshape(-1) for o in outs]
    grads_out = [g.reshape(-1) for g in _as_tuple(grad_out)]
    if spec["op"] == "linear_logprobs":
        hidden, weight, labels = inputs
        rows = hidden.detach().shape[0]
        weight64 = weight.detach().double()
    else:
        logits, labels = inputs
        rows = labels.numel()
        # the inplace variant's logits were overwritten by the backward: rebuild them from the seed
        logits = build(dict(spec, impl="ours"))[1][0] if "inplace" in spec["impl"] else logits
        flat = logits.detach().reshape(rows, -1)
    labels = labels.reshape(-1)
    out_err, grad_err = 0.0, 0.0
    for start in range(0, rows, REFERENCE_CHUNK_ROWS):
        sl = slice(start, min(start + REFERENCE_CHUNK_ROWS, rows))
        if spec["op"] == "linear_logprobs":
            x = hidden.detach()[sl].double() @ weight64.T
        else:
            x = flat[sl].double()
        log_p = torch.log_softmax(x, dim=-1)
        p = log_p.exp()
        refs = [log_p.gather(-1, labels[sl, None]).squeeze(-1)]
        if len(outs) == 2:
            refs.append(-(p * log_p).sum(-1))
        for out, ref in zip(outs, refs):
            out_err = max(out_err, (out[sl].double() - ref).abs().max().item())
        if grad is None:
            continue
        dx = grads_out[0][sl, None].double() * (torch.zeros_like(p).scatter_(-1, labels[sl, None], 1.0) - p)
        if len(refs) == 2:
            dx -= grads_out[1][sl, None].double() * p * (log_p + refs[1][:, None])
        if spec["op"] == "linear_logprobs":
            dx = dx @ weight64
        got = grad.reshape(rows, -1)[sl].double()
        grad_err = max(grad_err, (got - dx).abs().max().item())
    return out_err, (grad_err if with_grad else None)


# ---------------------------------------------------------------- running
def _measure(spec: dict, mode: str, device, budget_s: float, reps: int, memory: bool):
    """(timing, peak extra bytes) of one impl in one mode; the peak only for fwd+bwd."""
    fn, inputs, grad_out = build(spec)
    call = _modes(fn, inputs, grad_out, mode)
    timing = harness.time_device(call, device, reps=reps, warmup=2, budget_s=budget_s)
    peak = None
    if mode == "fwd+bwd" and memory:
        peak = harness.peak_memory(call, device) if device.type == "cuda" else cpu_peak_extra(spec)
    del fn, inputs, grad_out, call
    return timing, peak


def _fmt_err(err):
    return "" if err is None else f"{err:.1e}"


def _rows_for(results, mode, floor_s, work, unit, errors):
    fastest_peer = min(t.median for impl, (_, t, _) in results.items()
                       if not impl.startswith("ours") and impl != "bare lm_head matmul")
    rows = []
    for impl, (spec, timing, peak) in results.items():
        shape = f"{spec['N']}" if spec["op"] == "linear_logprobs" else f"{spec['B']}x{spec['T']}"
        out_err, grad_err = errors.get(impl, (None, None))
        rows.append({
            "op": spec["op"], "N or BxT": shape, "V": spec["V"], "H": spec.get("H", ""), "dtype": spec["dtype"],
            "mode": mode, "impl": impl, "ms (p20-p80)": timing.ms(),
            "rate": f"{work / timing.median / (1e9 if unit == 'GB/s' else 1e12):.2f} {unit}",
            "x floor": f"{timing.median / floor_s:.2f}", "x floor (fastest)": f"{timing.min / floor_s:.3f}",
            "speedup vs fastest peer": f"{fastest_peer / timing.median:.2f}x",
            "max abs err vs f64": _fmt_err(out_err), "grad max abs err vs f64": _fmt_err(grad_err),
            "peak extra MB": "" if peak is None else f"{peak / 2**20:.0f}",
        })
        print("  ".join(f"{k}={v}" for k, v in rows[-1].items()), flush=True)
    return rows


def run_token(device, cases, budget_s, reps, memory, op="token_logprobs"):
    rows = []
    peer_table = ENTROPY_PEERS if op == "token_logprobs+entropy" else TOKEN_PEERS
    for batch, length, vocab, dtype in cases:
        itemsize = torch.empty((), dtype=dtype).element_size()
        logits_bytes = batch * length * vocab * itemsize
        small = batch * length * (8 + 4)  # labels in, one fp32 result out
        for mode in ("fwd", "bwd", "fwd+bwd"):
            # fwd reads the logits; bwd reads them and writes the gradient; fwd+bwd reads them twice (the
            # forward runs before the gradient is known) and writes the gradient once.
            reads, writes = {"fwd": (logits_bytes, 0), "bwd": (logits_bytes, logits_bytes),
                             "fwd+bwd": (2 * logits_bytes, logits_bytes)}[mode]
            results, errors = {}, {}
            for impl in (*OURS_TOKEN, *peer_table):
                if "inplace" in impl and mode != "fwd+bwd":
                    continue
                spec = dict(op=op, device=str(device), dtype=str(dtype).split(".")[1], B=batch, T=length, V=vocab,
                            impl=impl)
                results[impl] = (spec, *_measure(spec, mode, device, budget_s, reps, memory))
                if mode != "bwd":
                    errors[impl] = reference_errors(spec, with_grad=mode == "fwd+bwd")
            fastest = min(timing.min for _, timing, _ in results.values())
            floor_s = harness.refined_floor(
                lambda refresh, r=reads + small, w=writes: harness.memory_floor(device, r, w, refresh=refresh), fastest)
            rows += _rows_for(results, mode, floor_s, reads + writes, "GB/s", errors)
    return rows


def run_linear(device, shapes, dtypes, budget_s, reps, memory):
    rows = []
    for n, hidden_size, vocab in shapes:
        for dtype in dtypes:
            square = [(4096, 4096, 4096)] if device.type == "cuda" else []
            shapes = [(n, hidden_size, vocab), (n, vocab, hidden_size), (vocab, n, hidden_size), *square]
            rates = [harness.matmul_rate(device, dtype, shapes)]

            def rate_floor(refresh, flops, rates=rates, dtype=dtype, shapes=shapes):
                if refresh:  # re-measured over more runs; the best rate seen is kept
                    rates.append(max(rates[-1], harness.matmul_rate(device, dtype, shapes, reps=30)))
                return flops / rates[-1]

            impls = ["ours (triton)"] if device.type == "cuda" else ["ours (cpp)", "ours (torch)"]
            for mode in ("fwd", "fwd+bwd"):
                flops = 2 * n * hidden_size * vocab * (1 if mode == "fwd" else 3)
                results, errors = {}, {}
                for impl in (*impls, *LINEAR_PEERS):
                    spec = dict(op="linear_logprobs", device=str(device), dtype=str(dtype).split(".")[1],
                                N=n, V=vocab, H=hidden_size, impl=impl)
                    results[impl] = (spec, *_measure(spec, mode, device, budget_s, reps, memory))
                    if impl != "bare lm_head matmul":
                        errors[impl] = reference_errors(spec, with_grad=mode == "fwd+bwd")
                fastest = min(timing.min for _, timing, _ in results.values())
                floor_s = harness.refined_floor(lambda refresh, f=flops: rate_floor(refresh, f), fastest)
                rows += _rows_for(results, mode, floor_s, flops, "TFLOP/s", errors)
    return rows


PRESETS = {
    # (token cases (B, T, V, dtype), entropy cases, linear shapes (N, H, V), linear dtypes)
    "dry": ([(2, 16, 1000, torch.float32), (2, 8, 1000, torch.bfloat16)], [(2, 16, 1000, torch.float32)],
            [(32, 64, 1000)], [torch.float32]),
    # the one-shot GPU check (benchmarks/gpu_check.py): the headline shapes only, to fit its time limit
    "check": ([(8, 1024, 151_936, torch.bfloat16), (4, 1024, 32_000, torch.float32)],
              [(8, 1024, 151_936, torch.bfloat16)], [(8192, 896, 151_936), (4096, 4096, 32_000)], [torch.bfloat16]),
    "full-cuda": ([(b, 1024, v, dt) for b in (2, 8) for v in (32_000, 151_936)
                   for dt in (torch.bfloat16, torch.float32)],
                  [(b, 1024, v, torch.bfloat16) for b in (2, 8) for v in (32_000, 151_936)],
                  [(n, h, v) for n in (2048, 8192) for h in (896, 1536, 4096) for v in (32_000, 151_936)],
                  [torch.bfloat16]),
    # 2 CPU cores: the headline shape (2 x 1024 x 151,936) in fp32 and bf16, and a smaller vocabulary
    "full-cpu": ([(2, 1024, 32_000, torch.float32), (2, 1024, 151_936, torch.float32),
                  (2, 1024, 151_936, torch.bfloat16)], [(2, 1024, 32_000, torch.float32)],
                 [(1024, 896, 32_000), (1024, 896, 151_936)], [torch.float32]),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hcrlhf bench logprobs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--preset", choices=("full", "check", "dry"), default="full")
    parser.add_argument("--quick", action="store_true", help="--preset dry, written only with --out (a smoke run)")
    parser.add_argument("--ops", nargs="+", choices=("token", "entropy", "linear"),
                        default=["token", "entropy", "linear"])
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory column (CPU: a process per row)")
    parser.add_argument("--out", help="markdown file to write (default benchmarks/results/<device>.md); the CSV "
                                      "goes beside it")
    parser.add_argument("--floor-check", choices=("fail", "warn"), default="fail",
                        help="a fastest sample below its floor fails the run (default; after writing) or only warns")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    if device.type == "cpu" and not ops.cpp_available():
        parser.error("the CPU benchmark times the C++ kernels: build them first (pip install -e .)")
    preset = "dry" if args.quick else args.preset
    if preset == "full":
        preset = "full-cuda" if device.type == "cuda" else "full-cpu"
    token_cases, entropy_cases, linear_shapes, linear_dtypes = PRESETS[preset]
    if preset == "dry":
        budget_s, reps = 0.3, 5
    else:
        budget_s, reps = (1.5, 20) if device.type == "cuda" else (4.0, 10)
    memory = not args.no_memory and not (preset == "dry" and device.type == "cpu")
    paths = peers.logprob_paths(device)
    print(f"device: {harness.device_name(device)}; peers: {peers.versions()}; paths: {paths}", flush=True)
    write = not args.no_write and (args.out or not args.quick)
    notes = (
        "Peers are the installed libraries' own functions (benchmarks/peers.py), called on (B, T, V) logits as "
        "their trainers do; the path each took here: " + "; ".join(f"{k}: {v}" for k, v in paths.items())
        + ". torch.compile rows: inductor, static shapes, compiled in the warm-up. Floor (a lower bound, checked "
        "against every row's fastest sample): token ops max(bytes read / best read bandwidth, bytes written / "
        "best write bandwidth), bandwidths measured on a buffer of the same size (fwd reads the logits; bwd reads "
        "them and writes the gradient; fwd+bwd reads them twice, writes once); linear_logprobs FLOPs (fwd 2NHV, "
        "fwd+bwd 6NHV) / the best measured matmul rate over the op's three matmul shapes. 'x floor' uses the "
        "median, 'x floor (fastest)' the fastest sample. Errors: max abs difference from a float64 reference "
        "(log-prob, and entropy where computed; gradient w.r.t. the logits, or the hidden states for "
        "linear_logprobs, in fwd+bwd). 'ours (inplace bwd)' writes the gradient over the logits. Peak extra "
        "MB: fwd+bwd only; CUDA allocator peak on a GPU, peak RSS growth in a fresh process on a CPU."
        + (" CPU numbers come from a shared 2-core machine and are noisy." if device.type == "cpu" else "")
    )
    work = []
    if "token" in args.ops:
        work += [lambda case=case: run_token(device, [case], budget_s, reps, memory) for case in token_cases]
    if "entropy" in args.ops:
        work += [lambda case=case: run_token(device, [case], budget_s, reps, memory, op="token_logprobs+entropy")
                 for case in entropy_cases]
    if "linear" in args.ops:
        work += [lambda shape=shape: run_linear(device, [shape], linear_dtypes, budget_s, reps, memory)
                 for shape in linear_shapes]
    rows = []
    for index, step in enumerate(work):
        rows += step()
        if write:  # after every case, so a run cut short (a time limit) keeps what it measured
            partial = "" if index == len(work) - 1 else f" (partial: {index + 1} of {len(work)} cases so far)"
            path = harness.write_results(SECTION, rows, device, notes=notes + partial, out=args.out)
    print()
    print(harness.markdown_table(rows))
    if write:
        print(f"wrote {path}")
    harness.check_floors(rows, mode=args.floor_check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
