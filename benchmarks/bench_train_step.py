"""Benchmark one iteration of the Lagrangian RL trainer: our kernels vs peer-style ops.

    hcrlhf bench train_step [--device cpu|cuda] [--quick] [--estimators ppo rloo] [--out FILE] [--no-write]
    hcrlhf bench train_step --nproc N [--sharding fsdp|replicate] ...   # 1 process vs N under torchrun
    python -m hcrlhf.benchmarks.bench_train_step ...

The same :class:`hcrlhf.train.SafeRLTrainer` iteration is run twice per estimator, each in a fresh process:

* **hcrlhf** — as shipped: ``ops.linear_logprobs`` on the response positions only (the (N, V) logits
  never exist) and the fused ``ops.safe_advantages`` / ``ops.rloo_advantages``;
* **peer-style** — what Safe RLHF / TRL-style code does: the model's full logits over *every* position,
  ``log_softmax`` + ``gather`` (and a full softmax for the entropy), and Safe RLHF's advantages with the
  Python-loop GAE (``benchmarks/peers.py``; a host sync per row), or the Python RLOO.

Reported per phase (median over the measured iterations, ms): generation, scoring, log-probs,
advantages, update, total; and the peak memory of one iteration (CUDA allocator peak on a GPU; on a CPU
the peak RSS growth of one iteration, VmHWM reset before it). Ratios are peer-style / hcrlhf.

``--nproc N`` instead runs hcrlhf's iteration in one process and under ``torchrun --nproc-per-node N`` (the
same global batch split over N ranks, docs/distributed.md) and reports the throughput of each (response tokens
of the whole batch per second) and the speed-up. On a CPU the one process gets N intra-op threads and each of the
N processes one, so both use the same cores.

Models are randomly initialised Qwen2-shaped ones (policy, reference, reward, cost and, for ppo, two
critics), prompts come from the built-in task. CPU: a tiny model with a 32k vocabulary; GPU: a
~0.5B Qwen2-shaped model (vocab 151,936, hidden 896, 24 layers).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

SECTION = "train_step"
PHASES = ("generation", "scoring", "logprobs", "advantages", "update")

SHAPES = {
    "cpu": dict(vocab_size=32000, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, prompts_per_step=8, samples_per_prompt=2, max_new_tokens=48),
    "cpu-quick": dict(vocab_size=8000, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, prompts_per_step=4, samples_per_prompt=2,
                      max_new_tokens=16),
    # plumbing checks only (gpu_check --dry-run): the smallest model that runs every phase
    "tiny": dict(vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, prompts_per_step=2, samples_per_prompt=2, max_new_tokens=4),
    "cuda": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                 num_attention_heads=14, num_key_value_heads=2, prompts_per_step=16, samples_per_prompt=2,
                 max_new_tokens=128),
}


# ------------------------------------------------------------------------------- peer-style ops


def peer_response_logprobs(model, input_ids, attention_mask, action_index, *, temperature=1.0, return_entropy=False,
                           impl="auto"):
    """Full logits over every position, log_softmax + gather (Safe RLHF's gather_log_probabilities)."""
    from hcrlhf.benchmarks.peers import safe_rlhf_logprobs

    positions = (attention_mask.long().cumsum(1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                   use_cache=False).logits[:, :-1].float() / temperature
    mask = torch.zeros(logits.shape[0] * logits.shape[1], dtype=torch.bool, device=logits.device)
    mask[action_index] = True
    mask = mask.view(logits.shape[:2])
    logp = safe_rlhf_logprobs(logits, input_ids[:, 1:]) * mask
    if not return_entropy:
        return logp
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1) * mask
    return logp, entropy


class PeerOps:
    """Stands in for ``hcrlhf.ops`` inside the trainer: Safe RLHF's Python-loop advantages and Python RLOO."""

    @staticmethod
    def safe_advantages(logprobs, ref_logprobs, mask, reward_scores, cost_scores, reward_values, cost_values, *,
                        kl_coef, lagrange_multiplier, gamma=1.0, gae_lambda=0.95, score_clip=50.0, **_):
        from hcrlhf.benchmarks.peers import safe_rlhf_advantages
        from hcrlhf.ops import SafeAdvantages

        mask = mask.bool()
        out = safe_rlhf_advantages(logprobs, ref_logprobs, mask, reward_scores, cost_scores, reward_values,
                                   cost_values, kl_coef=kl_coef, lagrange_multiplier=lagrange_multiplier,
                                   gamma=gamma, gae_lambda=gae_lambda,
                                   score_clip=score_clip if score_clip is not None else 1e30)
        kl = (logprobs - ref_logprobs) * mask
        return SafeAdvantages(*(x * mask for x in out), kl)

    @staticmethod
    def rloo_advantages(logprobs, ref_logprobs, mask, reward_scores, cost_scores, *, group_size, kl_coef,
                        lagrange_multiplier, score_clip=50.0, **_):
        from hcrlhf.benchmarks.peers import rloo_python
        from hcrlhf.ops import RLOOAdvantages

        return RLOOAdvantages(*rloo_python(logprobs, ref_logprobs, mask.float(), reward_scores, cost_scores,
                                           group_size=group_size, kl_coef=kl_coef,
                                           lagrange_multiplier=lagrange_multiplier,
                                           score_clip=score_clip if score_clip is not None else 1e30))


@contextlib.contextmanager
def peer_style():
    from hcrlhf.train import rl_trainer

    saved = rl_trainer.response_logprobs, rl_trainer.ops
    rl_trainer.response_logprobs, rl_trainer.ops = peer_response_logprobs, PeerOps
    try:
        yield
    finally:
        rl_trainer.response_logprobs, rl_trainer.ops = saved


# ------------------------------------------------------------------------------------ one run


def _status_kib(key: str) -> int | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run_child(spec: dict) -> dict:
    """Build the models and a trainer, run warm-up + measured iterations, return timings and peak memory."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from hcrlhf import distributed
    from hcrlhf.data.builtin import make_task
    from hcrlhf.models import ScoreModel
    from hcrlhf.train import SafeRLConfig, SafeRLTrainer

    distributed.setup()
    device = distributed.default_device() if spec["device"] == "cuda" else torch.device("cpu")
    shape = SHAPES[spec["shape"]]
    task = make_task(spec["task_root"], seed=0)
    tokenizer = task.load_tokenizer()
    config = Qwen2Config(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                         intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_hidden_layers"],
                         num_attention_heads=shape["num_attention_heads"],
                         num_key_value_heads=shape["num_key_value_heads"], max_position_embeddings=1024,
                         tie_word_embeddings=True, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, use_sliding_window=False)
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(config).to(device)
    reward_model, cost_model = ScoreModel.from_config(config).to(device), ScoreModel.from_config(config).to(device)
    rl_config = SafeRLConfig(estimator=spec["estimator"], total_steps=10**6, prompts_per_step=shape["prompts_per_step"],
                             samples_per_prompt=shape["samples_per_prompt"], max_new_tokens=shape["max_new_tokens"],
                             actor_lr=1e-6, critic_lr=1e-6, progress=False, sync_phase_timing=True,
                             device=str(device), seed=0, sharding=spec.get("sharding", "fsdp"))
    trainer = SafeRLTrainer(rl_config, policy=policy, tokenizer=tokenizer, reward_model=reward_model,
                            cost_model=cost_model, train_prompts=task.prompts("candidate")[0],
                            safety_prompts=task.split)
    context = peer_style() if spec["variant"] == "peer-style" else contextlib.nullcontext()
    with context:
        trainer.step()  # warm-up: libraries, allocator, threads
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # reset VmHWM to the current RSS
            base = _status_kib("VmRSS")
        history = [trainer.step() for _ in range(spec["iterations"])]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            high = _status_kib("VmHWM")
            peak = None if high is None or base is None else (high - base) * 1024
    distributed.close()
    timings = {phase: statistics.median(m[f"time/{phase}"] for m in history) for phase in PHASES}
    timings["total"] = statistics.median(m["time/total"] for m in history)
    return {"timings": timings, "peak_bytes": peak, "tokens": statistics.median(m["tokens"] for m in history)}


def measure(spec: dict, threads: int | None = None, nproc: int = 1) -> dict:
    """One child run; ``nproc`` > 1: under ``torchrun --nproc-per-node nproc`` (rank 0 reports)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", MALLOC_TRIM_THRESHOLD_="0")
    extra = ["--threads", str(threads)] if threads else []
    launcher = [sys.executable]
    if nproc > 1:
        env["OMP_NUM_THREADS"] = str(threads or 1)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr",
                    "127.0.0.1", "--master-port", str(_free_port())]
    command = [*launcher, "-m", "hcrlhf.benchmarks.bench_train_step", *extra, "--child", json.dumps(spec)]
    out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(f"bench_train_step child failed for {spec}:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _free_port() -> int:
    import socket

    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


# ----------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hcrlhf bench train_step", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="a smaller CPU model (a smoke run; written with --out)")
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # plumbing only: gpu_check --dry-run
    parser.add_argument("--estimators", nargs="+", choices=("ppo", "rloo"), default=["ppo", "rloo"])
    parser.add_argument("--iterations", type=int, default=3, help="measured iterations after one warm-up")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--task-root", default=str(Path(tempfile.gettempdir()) / "hcrlhf-bench-task"))
    parser.add_argument("--out", help="markdown file to write (default benchmarks/results/<device>.md); the CSV goes "
                                      "beside it; with --quick, results are written only when --out is given")
    parser.add_argument("--no-write", action="store_true", help="print only; do not write benchmarks/results")
    parser.add_argument("--nproc", type=int, default=None,
                        help="compare 1 process with N processes under torchrun (hcrlhf only; the batch is split)")
    parser.add_argument("--sharding", choices=("fsdp", "replicate"), default="fsdp", help="with --nproc: how the "
                        "trained models are spread over the processes")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)  # recorded in the results header too
    if args.child:
        spec = json.loads(args.child)
        result = run_child(spec)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(result))
        return 0

    from hcrlhf.benchmarks import harness

    device = torch.device(args.device)
    shape = "tiny" if args.tiny else "cuda" if device.type == "cuda" else ("cpu-quick" if args.quick else "cpu")
    if args.nproc:
        return _scaling(args, device, shape)
    rows = []
    for estimator in args.estimators:
        results = {}
        for variant in ("hcrlhf", "peer-style"):
            spec = dict(device=args.device, shape=shape, estimator=estimator, variant=variant,
                        iterations=args.iterations, task_root=args.task_root)
            results[variant] = measure(spec, args.threads)
            timings, peak = results[variant]["timings"], results[variant]["peak_bytes"]
            row = {"model": _model_name(SHAPES[shape]), "estimator": estimator, "variant": variant}
            row.update({f"{phase} ms": f"{timings[phase] * 1e3:.1f}" for phase in (*PHASES, "total")})
            row["peak MiB"] = "n/a" if peak is None else f"{peak / 2**20:.1f}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        ours, peer = results["hcrlhf"], results["peer-style"]
        ratio = {"model": _model_name(SHAPES[shape]), "estimator": estimator, "variant": "ratio peer/hcrlhf"}
        for phase in (*PHASES, "total"):
            ratio[f"{phase} ms"] = f"{peer['timings'][phase] / max(ours['timings'][phase], 1e-12):.2f}x"
        both = ours["peak_bytes"], peer["peak_bytes"]
        ratio["peak MiB"] = f"{both[1] / both[0]:.2f}x" if all(both) else "n/a"
        rows.append(ratio)
        print(json.dumps(ratio), flush=True)
    print(harness.markdown_table(rows))
    if not args.no_write and (args.out or not (args.quick or args.tiny)):
        s = SHAPES[shape]
        notes = (f"One SafeRLTrainer iteration, median of {args.iterations} after a warm-up, each variant in a fresh "
                 f"process. {s['prompts_per_step']} prompts x {s['samples_per_prompt']} samples, "
                 f"{s['max_new_tokens']} new tokens, random-weight Qwen2-shaped models (policy, reference, reward, "
                 "cost; ppo adds two critics). hcrlhf: ops.linear_logprobs on response positions only + fused "
                 "advantages. peer-style: full logits + log_softmax/gather at every position, Safe RLHF Python-loop "
                 "GAE / Python RLOO. Phase times are device-synchronised. Peak memory: CUDA allocator peak "
                 "(GPU) or peak RSS growth of the measured iterations (CPU).")
        path = harness.write_results(SECTION, rows, device, notes=notes, out=args.out)
        print(f"wrote {path}")
    return 0


def _scaling(args, device: torch.device, shape: str) -> int:
    """--nproc N: hcrlhf's iteration in one process and in N processes under torchrun, same global batch."""
    from hcrlhf.benchmarks import harness

    nproc = args.nproc
    if nproc < 2:
        raise SystemExit("hcrlhf bench train_step: --nproc must be at least 2")
    s = SHAPES[shape]
    if s["prompts_per_step"] % nproc:
        raise SystemExit(f"hcrlhf bench train_step: --nproc {nproc} must divide the {s['prompts_per_step']} prompts "
                         "per step")
    cpu = device.type == "cpu"
    rows = []
    for estimator in args.estimators:
        measured = {}
        for processes in (1, nproc):
            spec = dict(device=args.device, shape=shape, estimator=estimator, variant="hcrlhf",
                        iterations=args.iterations, task_root=args.task_root, sharding=args.sharding)
            # The same cores either way on a CPU: N threads in one process, or one thread in each of N.
            threads = (nproc if processes == 1 else 1) if cpu else args.threads
            result = measure(spec, threads, nproc=processes)
            measured[processes] = result
            timings = result["timings"]
            row = {"model": _model_name(s), "estimator": estimator,
                   "processes": f"{processes}" + (f" ({args.sharding})" if processes > 1 else ""),
                   "threads each": str(threads) if cpu else "-"}
            row.update({f"{phase} ms": f"{timings[phase] * 1e3:.1f}" for phase in (*PHASES, "total")})
            row["tokens/s"] = f"{result['tokens'] / timings['total']:.0f}"
            row["peak MiB (rank 0)"] = "n/a" if result["peak_bytes"] is None else f"{result['peak_bytes'] / 2**20:.1f}"
            rows.append(row)
            print(json.dumps(row), flush=True)
        one, many = measured[1], measured[nproc]
        speedup = (many["tokens"] / many["timings"]["total"]) / (one["tokens"] / one["timings"]["total"])
        rows.append({"model": _model_name(s), "estimator": estimator, "processes": f"speed-up {nproc} vs 1",
                     "tokens/s": f"{speedup:.2f}x"})
        print(json.dumps(rows[-1]), flush=True)
    print(harness.markdown_table(rows))
    if not args.no_write and (args.out or not (args.quick or args.tiny)):
        notes = (f"hcrlhf's SafeRLTrainer iteration in 1 process vs {nproc} under torchrun (sharding={args.sharding}), "
                 f"the same global batch ({s['prompts_per_step']} prompts x {s['samples_per_prompt']} samples, "
                 f"{s['max_new_tokens']} new tokens), median of {args.iterations} iterations after a warm-up. "
                 "tokens/s: response tokens of the whole batch per second of rank 0's iteration. "
                 + ("CPU: the single process has as many intra-op threads as there are processes in the other run. "
                    if cpu else ""))
        path = harness.write_results(f"train_step_scaling-{args.sharding}", rows, device, notes=notes, out=args.out)
        print(f"wrote {path}")
    return 0


def _model_name(shape: dict) -> str:
    return (f"Qwen2 V={shape['vocab_size']} H={shape['hidden_size']} L={shape['num_hidden_layers']}")


if __name__ == "__main__":
    sys.exit(main())
