"""Tile sizes of ops.linear_logprobs on the CPU: the op against the bare lm_head matmul, the unfused path and
TRL's ChunkedLogProbFunction, one process, variants interleaved round by round, min over rounds.

    python benchmarks/bench_linear_logprobs_tiles.py --vocab 151936 --mode fwd
    python benchmarks/bench_linear_logprobs_tiles.py --mode fwd --variants ours C1024xV2048 C1024xV4096 C512xV4096
    python benchmarks/bench_linear_logprobs_tiles.py --mode fwdbwd --variants unfused ours trl

Variants: ``bare`` (h @ W.T alone), ``unfused`` (h @ W.T, log_softmax, gather), ``ours`` (the defaults of
default_tiles), ``CcxVv`` (chunk_size=c, vocab_chunk_size=v; ``V0`` = the whole vocabulary), ``trl``
(ChunkedLogProbFunction with the 32,768-entry vocabulary tile TRL's trainers use). fwd+bwd: the gradients of
Σ g·logp w.r.t. hidden and weight. Prints min / median ms per variant and each variant's min relative to the
first variant's. ``--memory`` also runs each variant once more in a fresh process and reports its peak RSS growth.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import torch

from hcrlhf import ops


def make_variant(name: str):
    if name == "bare":
        return lambda h, w, y: h @ w.T
    if name == "unfused":
        return lambda h, w, y: torch.log_softmax(h @ w.T, -1).gather(-1, y[:, None])[:, 0]
    if name == "ours":
        return lambda h, w, y: ops.linear_logprobs(h, w, y)
    if name == "trl":
        from trl.kernels import ChunkedLogProbFunction

        return lambda h, w, y: ChunkedLogProbFunction.apply(h, w, None, y, 1.0, 32768, None, 1.0, ())[0]
    match = re.fullmatch(r"C(\d+)xV(\d+)", name)
    if match is None:
        raise SystemExit(f"unknown variant {name!r}")
    chunk, tile = int(match[1]), int(match[2]) or None
    return lambda h, w, y: ops.linear_logprobs(h, w, y, chunk_size=chunk, vocab_chunk_size=tile)


def inputs(n_tokens, hidden_size, vocab, dtype, grad):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n_tokens, hidden_size, generator=gen).to(dtype).requires_grad_(grad)
    weight = (torch.randn(vocab, hidden_size, generator=gen) * hidden_size**-0.5).to(dtype).requires_grad_(grad)
    labels = torch.randint(0, vocab, (n_tokens,), generator=gen)
    upstream = torch.randn(n_tokens, generator=gen)
    return hidden, weight, labels, upstream


def run_once(fn, hidden, weight, labels, upstream, mode, clock=time.perf_counter):
    hidden.grad = weight.grad = None
    start = clock()
    if mode == "fwd":
        with torch.no_grad():
            fn(hidden, weight, labels)
    else:
        out = fn(hidden, weight, labels)
        (out.float() * upstream[:, None] if out.dim() == 2 else out.float() * upstream).sum().backward()
    return (clock() - start) * 1e3


def peak_rss_growth(args, name):
    """Peak RSS growth (bytes) of one call of one variant, in a fresh process."""
    cmd = [sys.executable, __file__, "--child", name, "--mode", args.mode, "--tokens", str(args.tokens),
           "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--dtype", args.dtype]
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mode", choices=("fwd", "fwdbwd"), default="fwd")
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=896)
    parser.add_argument("--vocab", type=int, default=151_936)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--variants", nargs="+", default=["bare", "unfused", "ours", "trl"])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory", action="store_true")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="cpu: this process's CPU time (all threads), less sensitive to other load")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    tensors = inputs(args.tokens, args.hidden, args.vocab, dtype, args.mode == "fwdbwd")
    if args.child:
        import resource

        fn = make_variant(args.child)
        run_once(fn, *(t[:8] if t.dim() and t.shape[0] == args.tokens else t for t in tensors), args.mode)
        kib = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        before = kib()
        run_once(fn, *tensors, args.mode)
        print(json.dumps({"extra_bytes": (kib() - before) * 1024}))
        return
    fns = {name: make_variant(name) for name in args.variants}
    for fn in fns.values():  # warm-up
        run_once(fn, *tensors, args.mode)
    times = {name: [] for name in fns}
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    for _ in range(args.reps):
        for name, fn in fns.items():
            times[name].append(run_once(fn, *tensors, args.mode, clock))
    print(f"{args.mode} N {args.tokens} H {args.hidden} V {args.vocab} {args.dtype}, {args.threads} threads, "
          f"{args.reps} interleaved rounds, {args.clock} clock")
    first = min(times[args.variants[0]])
    for name, ts in times.items():
        line = f"  {name:14s} min {min(ts):8.0f} ms  median {statistics.median(ts):8.0f} ms  " \
               f"min/{args.variants[0]} {min(ts) / first:5.2f}"
        if args.memory:
            line += f"  peak +{peak_rss_growth(args, name) / 2**20:7.0f} MiB"
        print(line, flush=True)


if __name__ == "__main__":
    main()
