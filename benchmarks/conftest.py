"""pytest-benchmark set-up for ``pytest benchmarks/ --benchmark-only`` (benchmarks/test_bench_ops.py).

Saved runs go to ``benchmarks/results/pytest-benchmark/<device>/`` (``<device>`` as in the results
tables, e.g. ``cpu-2core`` or ``nvidia-h100-80gb-hbm3``) unless ``--benchmark-storage`` says otherwise,
so ``--benchmark-compare`` compares a run with the last one saved for the same kind of device.
"""

from __future__ import annotations

from pathlib import Path

import pytest


def bench_device():
    import os

    import torch

    name = os.environ.get("HCRLHF_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    storage = getattr(config.option, "benchmark_storage", None)
    if storage is None or not str(storage).rstrip("/").endswith(".benchmarks"):  # set by the user: keep it
        return
    from hcrlhf.benchmarks.harness import device_slug

    root = Path(__file__).resolve().parent / "results" / "pytest-benchmark" / device_slug(bench_device())
    config.option.benchmark_storage = f"file://{root}"
