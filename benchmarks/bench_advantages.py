"""Benchmark the advantage ops against the peer-style path and the memory floor.

    hcrlhf bench advantages [--device cpu|cuda] [--quick]
    python -m benchmarks.bench_advantages ...

For each op (gae, safe_advantages, rloo_advantages) and shape B ∈ {64, 512}, T ∈ {256, 1024,
4096}: our impls for the device (C++ on a CPU, Triton on a GPU, and the torch reference on small
shapes) against the Safe RLHF-style Python path (benchmarks/peers.py) and the floor = minimum
bytes moved / measured copy bandwidth. Prints the table and writes
benchmarks/results/<device>.md (+ CSV).
"""

from __future__ import annotations

import argparse
import sys

import torch

from hcrlhf import ops
from hcrlhf.benchmarks import harness, peers

OPS = ("gae", "safe_advantages", "rloo_advantages")
KL_COEF, LAGRANGE, GROUP = 0.1, 1.5, 2


def make_inputs(batch: int, length: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded responses of random length, fp32 per-token inputs, as a rollout produces them."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 4, length + 1, (batch,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    tensors = dict(
        logprobs=torch.randn(batch, length, generator=gen) * 0.3 - 1.0,
        ref_logprobs=torch.randn(batch, length, generator=gen) * 0.3 - 1.0,
        mask=mask,
        reward_scores=torch.randn(batch, generator=gen),
        cost_scores=torch.randn(batch, generator=gen),
        reward_values=torch.randn(batch, length, generator=gen),
        cost_values=torch.randn(batch, length, generator=gen),
    )
    return {k: v.to(device) for k, v in tensors.items()}


def calls(op: str, x: dict[str, torch.Tensor]):
    """{label: zero-argument callable} for our impls and the peer path of one op."""
    per_token = (x["logprobs"], x["ref_logprobs"], x["mask"], x["reward_scores"], x["cost_scores"])
    device = x["logprobs"].device
    ours = ["triton"] if device.type == "cuda" else (["cpp"] if ops.cpp_available() else [])
    if x["mask"].numel() <= 64 * 1024:
        ours.append("torch")
    multiplier = torch.tensor(LAGRANGE, device=device)  # a device tensor: no host sync in our path
    if op == "gae":
        table = {impl: (lambda impl=impl: ops.gae(x["reward_values"], x["cost_values"], x["mask"], impl=impl))
                 for impl in ours}
        table["peer (Python loop)"] = lambda: peers.python_loop_gae(x["reward_values"], x["cost_values"], x["mask"],
                                                                     1.0, 0.95)
    elif op == "safe_advantages":
        table = {impl: (lambda impl=impl: ops.safe_advantages(
            *per_token, x["reward_values"], x["cost_values"], kl_coef=KL_COEF, lagrange_multiplier=multiplier,
            score_clip=50.0, impl=impl)) for impl in ours}
        table["peer (Safe RLHF)"] = lambda: peers.safe_rlhf_advantages(
            *per_token, x["reward_values"], x["cost_values"], kl_coef=KL_COEF, lagrange_multiplier=LAGRANGE)
    else:
        table = {impl: (lambda impl=impl: ops.rloo_advantages(
            *per_token, group_size=GROUP, kl_coef=KL_COEF, lagrange_multiplier=multiplier, score_clip=50.0, impl=impl))
            for impl in ours}
        table["peer (Python)"] = lambda: peers.rloo_python(
            *per_token, group_size=GROUP, kl_coef=KL_COEF, lagrange_multiplier=LAGRANGE)
    return table


def min_bytes(op: str, batch: int, length: int) -> int:
    """Bytes each op must move at least: fp32 inputs and outputs, a 1-byte mask."""
    tokens = batch * length
    if op == "gae":
        return tokens * (2 * 4 + 1 + 2 * 4)
    if op == "safe_advantages":
        return tokens * (4 * 4 + 1 + 6 * 4) + batch * 2 * 4
    return tokens * (2 * 4 + 1) + batch * (2 * 4 + 3 * 4)


def run(device: torch.device, shapes, op_names, budget_s: float) -> list[dict[str, object]]:
    bandwidth = harness.copy_bandwidth(device)
    print(f"device: {harness.device_name(device)}; measured copy bandwidth {bandwidth / 1e9:.1f} GB/s", flush=True)
    rows = []
    for batch, length in shapes:
        x = make_inputs(batch, length, device)
        for op in op_names:
            floor = min_bytes(op, batch, length) / bandwidth
            timings = {}
            for label, fn in calls(op, x).items():
                device_time = harness.time_device(fn, device, budget_s=budget_s)
                full = harness.time_full_call(fn, device, budget_s=budget_s) if device.type == "cuda" else device_time
                timings[label] = (device_time, full, harness.peak_memory(fn, device))
            peer = next(v for k, v in timings.items() if k.startswith("peer"))[1].median
            for label, (device_time, full, peak) in timings.items():
                row = {
                    "op": op, "B": batch, "T": length, "impl": label,
                    "device ms (p20-p80)": device_time.ms(),
                    "full call ms": f"{full.median * 1e3:.3f}",
                    "GB/s": f"{min_bytes(op, batch, length) / device_time.median / 1e9:.2f}",
                    "x floor": f"{device_time.median / floor:.2f}",
                    "speedup vs peer": f"{peer / full.median:.1f}x",
                }
                if peak is not None:
                    row["peak MB"] = f"{peak / 2**20:.1f}"
                rows.append(row)
                print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return rows, bandwidth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hcrlhf bench advantages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="two small shapes only (a smoke run)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--shapes", nargs="+", metavar="BxT", help="custom shapes, e.g. 64x256 512x1024")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/results")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no CUDA device is available")
    shapes = [(64, 256), (512, 1024)] if args.quick else [(b, t) for b in (64, 512) for t in (256, 1024, 4096)]
    if args.shapes:
        try:
            shapes = [tuple(int(n) for n in text.lower().split("x")) for text in args.shapes]
        except ValueError:
            parser.error(f"--shapes takes BxT pairs such as 64x256, got {args.shapes}")
        if any(len(s) != 2 or min(s) < 1 or s[0] % GROUP for s in shapes):
            parser.error(f"--shapes: each must be BxT with B, T >= 1 and B even, got {args.shapes}")
    rows, bandwidth = run(device, shapes, args.ops, budget_s=1.0 if args.quick else 5.0)
    print()
    print(harness.markdown_table(rows))
    if not (args.no_write or args.quick or args.shapes):
        notes = (f"Measured copy bandwidth {bandwidth / 1e9:.1f} GB/s; floor = minimum bytes / that bandwidth. "
                 "'speedup vs peer' compares full-call times. On a CPU device time = full-call wall time.")
        path = harness.write_results("advantages", rows, device, notes=notes)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
