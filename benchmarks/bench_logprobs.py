"""Benchmark token_logprobs and linear_logprobs against the peers' paths and the floor.

    hcrlhf bench logprobs [--device cpu|cuda] [--quick] [--no-write]
    python -m benchmarks.bench_logprobs ...

token_logprobs (logits -> log-prob of the label): forward, backward and forward+backward; ours
(Triton on a GPU, C++ on a CPU) against log_softmax+gather (Safe RLHF), the fp32-upcast path
(OpenRLHF), the per-row loop (TRL's selective_log_softmax) and the floor = bytes that must move
(read the logits; backward also writes the gradient) / measured copy bandwidth.

linear_logprobs (hidden -> log-prob, no (N, V) logits): forward and forward+backward against the
unfused path (lm_head matmul + log_softmax+gather) and the bare lm_head matmul (its FLOPs are the
floor). Peak memory: CUDA allocator peak on a GPU; on a CPU the peak RSS growth of one
forward+backward measured in a fresh process (glibc told to return large blocks to the OS).

Full grid on a GPU: N in {2048, 8192}, V in {32,000, 151,936}, H in {896, 1536, 4096}. A CPU runs a
reduced grid (2 cores would take hours on the full one); --quick is a smoke run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from hcrlhf import ops
from hcrlhf.benchmarks import harness
from hcrlhf.benchmarks.peers import (
    bare_lm_head,
    fp32_upcast_logprobs,
    per_row_logprobs,
    safe_rlhf_logprobs,
    unfused_linear_logprobs,
)

SECTION = "logprobs"


# ---------------------------------------------------------------- timing helpers
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
fn, inputs, grad_out = b.build(dict(spec, N=8))  # warm-up: load libraries, start threads
b._modes(fn, inputs, grad_out, "fwd+bwd")()
fn, inputs, grad_out = b.build(spec)
run = b._modes(fn, inputs, grad_out, "fwd+bwd")
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
                             env=env, timeout=600)
        return json.loads(out.stdout.strip().splitlines()[-1])["extra"]
    except Exception as exc:  # a probe failure must not lose the timing table
        print(f"  memory probe failed for {spec}: {exc}", file=sys.stderr)
        return None


TOKEN_IMPLS = {
    "log_softmax+gather (Safe RLHF)": safe_rlhf_logprobs,
    "fp32 upcast (OpenRLHF)": fp32_upcast_logprobs,
    "per-row loop (TRL)": per_row_logprobs,
}
LINEAR_IMPLS = {
    "unfused matmul+log_softmax": unfused_linear_logprobs,
    "bare lm_head matmul (floor)": bare_lm_head,
}


def build(spec: dict):
    """(fn, inputs, grad_out) for one benchmark case; inputs are made fresh from a fixed seed."""
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    gen = torch.Generator().manual_seed(0)
    n, vocab = spec["N"], spec["V"]
    labels = torch.randint(0, vocab, (n,), generator=gen).to(device)
    grad_out = torch.randn(n, generator=gen).to(device)
    impl = spec["impl"]
    if spec["op"] == "token_logprobs":
        logits = (torch.randn(n, vocab, generator=gen) * 2).to(device=device, dtype=dtype).requires_grad_()
        if impl.startswith("ours"):
            inplace = "inplace" in impl
            kernel = "triton" if device.type == "cuda" else "cpp"
            # in place: the timed backward overwrites the logits with their (finite) gradient each rep
            fn = lambda x, y: ops.token_logprobs(x, y, impl=kernel, inplace_backward=inplace)
            if inplace:  # refused for a leaf (its data would be overwritten): a non-leaf, as a model's logits
                logits = logits * 1.0  # are; made here, untimed, and autograd.grad stops at it
        else:
            fn = TOKEN_IMPLS[impl]
        return fn, (logits, labels), grad_out
    hidden_size = spec["H"]
    hidden = torch.randn(n, hidden_size, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) * hidden_size**-0.5).to(device=device, dtype=dtype)
    weight.requires_grad_()
    if impl.startswith("ours"):
        kernel = impl.split("(")[1].rstrip(")")
        fn = lambda h, w, y: ops.linear_logprobs(h, w, y, impl=kernel)
    else:
        fn = LINEAR_IMPLS[impl]
    return fn, (hidden, weight, labels), grad_out


def _row(spec, mode, timing, floor_s, work, unit, peer_s, peak):
    row = {
        "op": spec["op"], "N": spec["N"], "V": spec["V"], "H": spec.get("H", ""), "dtype": spec["dtype"],
        "mode": mode, "impl": spec["impl"], "ms (p20-p80)": timing.ms(),
        "rate": f"{work / timing.median / (1e9 if unit == 'GB/s' else 1e12):.2f} {unit}",
        "x floor": f"{timing.median / floor_s:.2f}" if floor_s else "",
        "speedup vs log_softmax+gather": f"{peer_s / timing.median:.2f}x" if peer_s else "",
        "peak extra MB": "" if peak is None else f"{peak / 2**20:.0f}",
    }
    return row


def _measure(spec: dict, mode: str, device, budget_s: float):
    """(timing, peak extra bytes) of one impl in one mode; the peak only for fwd+bwd."""
    fn, inputs, grad_out = build(spec)
    call = _modes(fn, inputs, grad_out, mode)
    timing = harness.time_device(call, device, reps=10, warmup=1, budget_s=budget_s)
    peak = None
    if mode == "fwd+bwd":
        peak = harness.peak_memory(call, device) if device.type == "cuda" else cpu_peak_extra(spec)
    return timing, peak


def run_token(device, cases, budget_s, bandwidth, per_row_max_elements):
    rows = []
    for n, vocab, dtype in cases:
        itemsize = torch.empty((), dtype=dtype).element_size()
        impls = ["ours", "ours (inplace bwd)", *TOKEN_IMPLS]
        if n * vocab > per_row_max_elements:  # the per-row loop takes minutes on a CPU here
            impls.remove("per-row loop (TRL)")
        for mode in ("fwd", "bwd", "fwd+bwd"):
            moved = n * vocab * itemsize * {"fwd": 1, "bwd": 2, "fwd+bwd": 3}[mode]
            floor_s = moved / bandwidth
            results = {}
            for impl in impls:
                if "inplace" in impl and mode != "fwd+bwd":
                    continue
                spec = dict(op="token_logprobs", device=str(device), dtype=str(dtype).split(".")[1],
                            N=n, V=vocab, impl=impl)
                results[impl] = (spec, *_measure(spec, mode, device, budget_s))
            peer_s = results["log_softmax+gather (Safe RLHF)"][1].median
            for spec, timing, peak in results.values():
                row = _row(spec, mode, timing, floor_s, moved, "GB/s", peer_s, peak)
                rows.append(row)
                print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def run_linear(device, shapes, dtypes, budget_s):
    rows = []
    for n, hidden_size, vocab in shapes:
        for dtype in dtypes:
            impls = ["ours (triton)"] if device.type == "cuda" else ["ours (cpp)", "ours (torch)"]
            impls += list(LINEAR_IMPLS)
            for mode in ("fwd", "fwd+bwd"):
                flops = 2 * n * hidden_size * vocab * (1 if mode == "fwd" else 3)
                results = {}
                for impl in impls:
                    spec = dict(op="linear_logprobs", device=str(device), dtype=str(dtype).split(".")[1],
                                N=n, V=vocab, H=hidden_size, impl=impl)
                    results[impl] = (spec, *_measure(spec, mode, device, budget_s))
                floor_s = results["bare lm_head matmul (floor)"][1].median
                peer_s = results["unfused matmul+log_softmax"][1].median
                for spec, timing, peak in results.values():
                    row = _row(spec, mode, timing, floor_s, flops, "TFLOP/s", peer_s, peak)
                    rows.append(row)
                    print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hcrlhf bench logprobs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="small shapes only (a smoke run; nothing written)")
    parser.add_argument("--ops", nargs="+", choices=("token", "linear"), default=["token", "linear"])
    parser.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    if device.type == "cpu" and not ops.cpp_available():
        parser.error("the CPU benchmark times the C++ kernels: build them first (pip install -e .)")
    per_row_max_elements = 2**62
    if args.quick:
        token_cases = [(256, 32_000, torch.float32)]
        linear_shapes, linear_dtypes = [(256, 256, 32_000)], [torch.float32]
    elif device.type == "cuda":
        token_cases = [(n, v, dt) for n in (2048, 8192) for v in (32_000, 151_936)
                       for dt in (torch.bfloat16, torch.float32)]
        linear_shapes = [(n, h, v) for n in (2048, 8192) for h in (896, 1536, 4096) for v in (32_000, 151_936)]
        linear_dtypes = [torch.bfloat16]
    else:  # 2 CPU cores: the headline shape (2048 x 151,936) in fp32 and bf16, and a smaller vocabulary
        token_cases = [(2048, 32_000, torch.float32), (2048, 151_936, torch.float32),
                       (2048, 151_936, torch.bfloat16)]
        per_row_max_elements = 2048 * 32_000
        linear_shapes = [(1024, 896, 32_000)]
        linear_dtypes = [torch.float32]
    budget_s = 1.0 if args.quick else (6.0 if device.type == "cuda" else 4.0)
    bandwidth = harness.copy_bandwidth(device)
    print(f"device: {harness.device_name(device)}; copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    rows = []
    if "token" in args.ops:
        rows += run_token(device, token_cases, budget_s, bandwidth, per_row_max_elements)
    if "linear" in args.ops:
        rows += run_linear(device, linear_shapes, linear_dtypes, budget_s)
    print()
    print(harness.markdown_table(rows))
    if not (args.no_write or args.quick):
        notes = (
            f"Measured copy bandwidth {bandwidth / 1e9:.1f} GB/s. token_logprobs floor = bytes that must move "
            "(fwd: read N·V logits; bwd: read logits + write gradient) / that bandwidth. linear_logprobs floor "
            "= the bare lm_head matmul (same FLOPs, no log-prob work) in the same mode. 'ours (inplace bwd)' "
            "writes the gradient over the logits. Peak extra MB: fwd+bwd only; CUDA allocator peak on a GPU, "
            "peak RSS growth in a fresh process on a CPU (includes the gradient itself)."
            + (" CPU numbers come from a shared 2-core machine (other jobs running) and are noisy; reduced "
               "grid, and the per-row loop only at 2048 x 32,000 (it takes tens of seconds per call beyond)."
               if device.type == "cpu" else "")
        )
        path = harness.write_results(SECTION, rows, device, notes=notes)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
