"""The op micro-benchmarks as pytest-benchmark cases: ours against the peers' own code (benchmarks/peers.py).

    pytest benchmarks/ --benchmark-only                                 # small CPU shapes, nothing saved
    pytest benchmarks/ --benchmark-only --benchmark-autosave            # save under results/pytest-benchmark/<device>/
    pytest benchmarks/ --benchmark-only --benchmark-compare --benchmark-compare-fail=min:10%
                                                            # fail if any case's min is 10% slower than the last save
    HCRLHF_BENCH_SIZE=large pytest benchmarks/ --benchmark-only         # GPU-sized shapes
    HCRLHF_BENCH_DEVICE=cpu ...                                         # the device (default: cuda when available)

Not part of the normal test run (pyproject's testpaths is tests/). Each case is checked against the float64
reference first, so a fast wrong kernel does not pass as a speed-up. benchmarks/conftest.py points the storage at
benchmarks/results/pytest-benchmark/<device>/.
"""

from __future__ import annotations

import os

import pytest
import torch

from hcrlhf import ops
from hcrlhf.benchmarks import bench_advantages, bench_logprobs
from hcrlhf.benchmarks.conftest import bench_device

pytest.importorskip("pytest_benchmark")

DEVICE = bench_device()
LARGE = os.environ.get("HCRLHF_BENCH_SIZE", "small") == "large"
TOKEN = dict(B=8, T=1024, V=151_936, dtype="bfloat16") if LARGE else dict(B=2, T=64, V=4096, dtype="float32")
LINEAR = dict(N=8192, H=896, V=151_936, dtype="bfloat16") if LARGE else dict(N=128, H=64, V=4096, dtype="float32")
ADVANTAGES = (512, 1024) if LARGE else (16, 128)
OURS_KERNEL = "triton" if DEVICE.type == "cuda" else "cpp"


def _synced(call):
    if DEVICE.type != "cuda":
        return call
    def run():
        out = call()
        torch.cuda.synchronize(DEVICE)
        return out
    return run


def _needs_cpp():
    if DEVICE.type == "cpu" and not ops.cpp_available():
        pytest.skip("the CPU cases time the C++ kernels: build them first")


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", ["ours", *bench_logprobs.TOKEN_PEERS])
def test_token_logprobs(benchmark, impl, mode):
    _needs_cpp()
    spec = dict(TOKEN, op="token_logprobs", device=str(DEVICE), impl=impl)
    out_err, grad_err = bench_logprobs.reference_errors(spec, with_grad=mode == "fwd+bwd")
    assert out_err < (5e-2 if spec["dtype"] == "bfloat16" else 1e-4)
    fn, inputs, grad_out = bench_logprobs.build(spec)
    benchmark.group = f"token_logprobs {mode} {TOKEN}"
    benchmark.extra_info.update(max_abs_err_vs_f64=out_err, grad_max_abs_err_vs_f64=grad_err)
    benchmark(_synced(bench_logprobs._modes(fn, inputs, grad_out, mode)))


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", [f"ours ({OURS_KERNEL})", "TRL ChunkedLogProbFunction",
                                  "unfused matmul + log_softmax+gather"])
def test_linear_logprobs(benchmark, impl, mode):
    _needs_cpp()
    spec = dict(LINEAR, op="linear_logprobs", device=str(DEVICE), impl=impl)
    out_err, grad_err = bench_logprobs.reference_errors(spec, with_grad=mode == "fwd+bwd")
    assert out_err < (5e-2 if spec["dtype"] == "bfloat16" else 1e-4)
    fn, inputs, grad_out = bench_logprobs.build(spec)
    benchmark.group = f"linear_logprobs {mode} {LINEAR}"
    benchmark.extra_info.update(max_abs_err_vs_f64=out_err, grad_max_abs_err_vs_f64=grad_err)
    benchmark(_synced(bench_logprobs._modes(fn, inputs, grad_out, mode)))


def _advantage_cases():
    x = bench_advantages.make_inputs(*ADVANTAGES, DEVICE)  # labels name the device's kernels (cpp or triton)
    for op in bench_advantages.OPS:
        for label in bench_advantages.calls(op, x):
            if label.split(",")[0] != "torch":  # the torch reference is the spec, not a contender
                yield op, label


@pytest.mark.parametrize(("op", "label"), list(_advantage_cases()))
def test_advantages(benchmark, op, label):
    _needs_cpp()
    x = bench_advantages.make_inputs(*ADVANTAGES, DEVICE)
    fn, extract = bench_advantages.calls(op, x)[label]
    error = bench_advantages.max_error(extract(fn()), bench_advantages.reference(op, label, x), x["mask"])
    assert error < 1e-4
    benchmark.group = f"{op} B,T={ADVANTAGES}"
    benchmark.extra_info["max_abs_err_vs_f64"] = error
    benchmark(_synced(fn))
