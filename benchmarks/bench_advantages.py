"""Benchmark the advantage ops against the peers' own code and a true memory floor.

    hcrlhf bench advantages [--device cpu|cuda] [--quick] [--shapes BxT ...] [--out FILE]
    python -m benchmarks.bench_advantages ...

For each op and shape B ∈ {64, 512}, T ∈ {256, 1024, 4096}: our impls for the device (C++ on a
CPU, Triton on a GPU, and the torch reference on small shapes) against the peers (benchmarks/peers.py):

* gae: OpenRLHF 0.11.2's get_advantages_and_returns (its Python loop over T), and verl 0.9.1's
  compute_gae_advantage_return (a loop over T, then masked_whiten) against ours with whiten=True;
* safe_advantages: Safe RLHF's PPO-Lagrangian path (a host sync per row, two Python GAE loops);
* rloo_advantages: verl's compute_rloo_outcome_advantage (a Python loop over the batch), ours with
  the same outcome-only semantics (no KL, no cost);
* group_advantages (GRPO), where hcrlhf has it: verl's compute_grpo_outcome_advantage.

Every row has its max abs error against the float64 reference (hcrlhf.reference) on the valid
tokens, and "× floor" = time / max(bytes read / best read bandwidth, bytes written / best write
bandwidth) (benchmarks/harness.py); the run fails if a fastest sample beats its floor. Prints the
table and writes benchmarks/results/<device>.md (+ CSV), or --out.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch

from hcrlhf import ops
from hcrlhf.benchmarks import harness, peers

OPS = ("gae", "safe_advantages", "rloo_advantages", "group_advantages")
KL_COEF, LAGRANGE, GROUP = 0.1, 1.5, 2
GAMMA, LAMBDA = 1.0, 0.95


def make_inputs(batch: int, length: int, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Right-padded responses of random length, fp32 per-token inputs, as a rollout produces them."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(max(1, length // 4), length + 1, (batch,), generator=gen)
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
    """{label: (zero-argument callable, extract)}: our impls and the peers of one op. extract(output) gives the
    (B, T) or (B,) advantages that are compared with the float64 reference."""
    per_token = (x["logprobs"], x["ref_logprobs"], x["mask"], x["reward_scores"], x["cost_scores"])
    device = x["logprobs"].device
    ours = ["triton"] if device.type == "cuda" else (["cpp"] if ops.cpp_available() else [])
    if x["mask"].numel() <= 64 * 1024:
        ours.append("torch")
    multiplier = torch.tensor(LAGRANGE, device=device)  # a device tensor: no host sync in our path
    first = lambda out: out[0]
    table = {}
    if op == "gae":
        rewards, values, mask = x["reward_values"], x["cost_values"], x["mask"]
        for impl in ours:
            table[impl] = (lambda impl=impl: ops.gae(rewards, values, mask, GAMMA, LAMBDA, impl=impl), first)
        # OpenRLHF's loop (Safe RLHF's and TRL's are the same loop): the "peer (Python loop)" row
        gae_loop = peers.openrlhf_gae()
        fmask = mask.float()
        table["peer (Python loop): OpenRLHF get_advantages_and_returns"] = (
            lambda: gae_loop(values, rewards, fmask, GAMMA, LAMBDA), first)
        for impl in ours:
            table[f"{impl}, whiten=True"] = (
                lambda impl=impl: ops.gae(rewards, values, mask, GAMMA, LAMBDA, impl=impl, whiten=True), first)
        table["verl compute_gae_advantage_return (whitened)"] = (
            lambda: peers.verl_gae(rewards, values, fmask, GAMMA, LAMBDA), first)
    elif op == "safe_advantages":
        for impl in ours:
            table[impl] = (lambda impl=impl: ops.safe_advantages(
                *per_token, x["reward_values"], x["cost_values"], kl_coef=KL_COEF, lagrange_multiplier=multiplier,
                score_clip=50.0, impl=impl), first)
        # Safe RLHF gives each stream half of kl_coef·KL: twice our kl_coef is the same objective as ours
        table["peer (Safe RLHF)"] = (lambda: peers.safe_rlhf_advantages(
            *per_token, x["reward_values"], x["cost_values"], kl_coef=2 * KL_COEF, lagrange_multiplier=LAGRANGE), first)
    elif op == "rloo_advantages":
        zeros = torch.zeros_like(x["cost_scores"])
        outcome = (x["logprobs"], x["logprobs"], x["mask"], x["reward_scores"], zeros)  # no KL, no cost: verl's RLOO
        for impl in ours:
            table[impl] = (lambda impl=impl: ops.rloo_advantages(
                *outcome, group_size=GROUP, kl_coef=0.0, lagrange_multiplier=0.0, impl=impl), first)
        group_ids = np.arange(x["mask"].shape[0]) // GROUP
        fmask = x["mask"].float()
        table["peer (Python): verl compute_rloo_outcome_advantage"] = (
            lambda: peers.verl_rloo(x["reward_scores"], fmask, group_ids), lambda out: out)
    elif op == "group_advantages":
        zeros = torch.zeros_like(x["cost_scores"])
        outcome = (x["logprobs"], x["logprobs"], x["mask"], x["reward_scores"], zeros)
        for impl in ours:
            table[impl] = (lambda impl=impl: ops.group_advantages(
                *outcome, estimator="grpo", group_size=GROUP, kl_coef=0.0, lagrange_multiplier=0.0, impl=impl), first)
        group_ids = np.arange(x["mask"].shape[0]) // GROUP
        fmask = x["mask"].float()
        table["verl compute_grpo_outcome_advantage"] = (
            lambda: peers.verl_grpo(x["reward_scores"], fmask, group_ids), lambda out: out)
    return table


def reference(op: str, label: str, x: dict[str, torch.Tensor]) -> torch.Tensor:
    """The float64 reference advantages for a row of `op` (whitened for the whitening rows)."""
    from hcrlhf import reference as ref

    d = {k: (v.double() if v.is_floating_point() else v) for k, v in x.items()}
    per_token = (d["logprobs"], d["ref_logprobs"], d["mask"], d["reward_scores"], d["cost_scores"])
    if op == "gae":
        advantages = ref.gae(d["reward_values"], d["cost_values"], d["mask"], GAMMA, LAMBDA)[0]
        if "whiten" in label:
            from hcrlhf.reference.gae import masked_whiten

            advantages = masked_whiten(advantages, d["mask"])
        return advantages
    if op == "safe_advantages":
        return ref.safe_advantages(*per_token, d["reward_values"], d["cost_values"], kl_coef=KL_COEF,
                                   lagrange_multiplier=LAGRANGE, score_clip=50.0)[0]
    outcome = (d["logprobs"], d["logprobs"], d["mask"], d["reward_scores"], torch.zeros_like(d["cost_scores"]))
    if op == "rloo_advantages":
        return ref.rloo_advantages(*outcome, group_size=GROUP, kl_coef=0.0, lagrange_multiplier=0.0)[0]
    return ref.group_advantages(*outcome, estimator="grpo", group_size=GROUP, kl_coef=0.0,
                                lagrange_multiplier=0.0)[0]


def max_error(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor) -> float:
    """Max abs difference on the valid tokens; (B,) and (B, T) results are compared per token."""
    got, want = got.double(), want.double()
    if got.dim() == 1:
        got = got[:, None].expand(mask.shape)
    if want.dim() == 1:
        want = want[:, None].expand(mask.shape)
    return (got - want)[mask].abs().max().item() if mask.any() else 0.0


def io_bytes(op: str, batch: int, length: int) -> tuple[int, int]:
    """(bytes read, bytes written) each op needs at least: fp32 inputs and outputs, a 1-byte mask."""
    tokens = batch * length
    if op == "gae":
        return tokens * (2 * 4 + 1), tokens * 2 * 4
    if op == "safe_advantages":
        return tokens * (4 * 4 + 1) + batch * 2 * 4, tokens * 6 * 4
    return tokens * (2 * 4 + 1) + batch * 2 * 4, batch * 3 * 4  # per-sequence results


def run(device: torch.device, shapes, op_names, budget_s: float) -> list[dict[str, object]]:
    peers.assert_unpatched()
    print(f"device: {harness.device_name(device)}; peers: {peers.versions()}", flush=True)
    rows = []
    for batch, length in shapes:
        x = make_inputs(batch, length, device)
        for op in op_names:
            table = calls(op, x)
            if not table:
                print(f"  {op}: not in this hcrlhf (skipped)", flush=True)
                continue
            reads, writes = io_bytes(op, batch, length)
            results = {}
            for label, (fn, extract) in table.items():
                device_time = harness.time_device(fn, device, budget_s=budget_s)
                full = harness.time_full_call(fn, device, budget_s=budget_s) if device.type == "cuda" else device_time
                error = max_error(extract(fn()), reference(op, label, x), x["mask"])
                results[label] = (device_time, full, harness.peak_memory(fn, device), error)
            fastest = min(v[0].min for v in results.values())
            floor = harness.refined_floor(
                lambda refresh, r=reads, w=writes: harness.memory_floor(device, r, w, refresh=refresh), fastest)
            peer = min(v[1].median for k, v in results.items() if k.split(",")[0] not in ("cpp", "triton", "torch"))
            for label, (device_time, full, peak, error) in results.items():
                row = {
                    "op": op, "B": batch, "T": length, "impl": label,
                    "device ms (p20-p80)": device_time.ms(),
                    "full call ms": f"{full.median * 1e3:.3f}",
                    "GB/s": f"{(reads + writes) / device_time.median / 1e9:.2f}",
                    "x floor": f"{device_time.median / floor:.2f}",
                    "x floor (fastest)": f"{device_time.min / floor:.3f}",
                    "speedup vs fastest peer": f"{peer / full.median:.1f}x",
                    "max abs err vs f64": f"{error:.1e}",
                }
                if peak is not None:
                    row["peak MB"] = f"{peak / 2**20:.1f}"
                rows.append(row)
                print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hcrlhf bench advantages", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--quick", action="store_true", help="two small shapes (a smoke run; written only with --out)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--shapes", nargs="+", metavar="BxT", help="custom shapes, e.g. 64x256 512x1024")
    parser.add_argument("--budget", type=float, default=None, help="seconds of timing per row (default 5; 1 quick)")
    parser.add_argument("--out", help="markdown file to write (default benchmarks/results/<device>.md); the CSV "
                                      "goes beside it; with --quick or --shapes, written only when --out is given")
    parser.add_argument("--floor-check", choices=("fail", "warn"), default="fail",
                        help="a fastest sample below its floor fails the run (default; after writing) or only warns")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write results")
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
    budget = args.budget if args.budget is not None else (1.0 if args.quick else 5.0)
    rows = run(device, shapes, args.ops, budget_s=budget)
    print()
    print(harness.markdown_table(rows))
    if not args.no_write and (args.out or not (args.quick or args.shapes)):
        notes = ("Peers: the installed libraries' own functions (benchmarks/peers.py); Safe RLHF's path follows its "
                 "repository (no package). rloo_advantages / group_advantages rows use verl's outcome-only semantics "
                 "(no KL, no cost) for ours too. Floor (a lower bound, checked against every fastest sample): "
                 "max(bytes read / best read bandwidth, bytes written / best write bandwidth), bandwidths measured "
                 "on buffers of the same size. 'speedup vs fastest peer' compares full-call times. Errors: max abs "
                 "difference from the float64 reference (hcrlhf.reference) on the valid tokens. On a CPU device "
                 "time = full-call wall time.")
        path = harness.write_results("advantages", rows, device, notes=notes, out=args.out)
        print(f"wrote {path}")
    harness.check_floors(rows, mode=args.floor_check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
