"""One timing/memory/floor harness for every benchmark (docs/architecture.md#tests-and-benchmarks).

GPU: device time from CUDA events with the L2 flushed between repetitions, full-call time from
the wall clock around call + synchronize, peak memory from the CUDA allocator. CPU: wall-clock
median. Both report median and p20/p80. Results go to ``benchmarks/results/<device>.md`` (one
section per benchmark, replaced on re-run) and ``<device>-<section>.csv``.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass(frozen=True)
class Timing:
    """Seconds: median and 20th/80th percentiles over the repetitions."""

    median: float
    p20: float
    p80: float

    @classmethod
    def from_samples(cls, samples: list[float]) -> Timing:
        ordered = sorted(samples)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]
        return cls(statistics.median(ordered), pick(0.2), pick(0.8))

    def ms(self) -> str:
        return f"{self.median * 1e3:.3f} ms [{self.p20 * 1e3:.3f}, {self.p80 * 1e3:.3f}]"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_L2_FLUSH: dict[torch.device, torch.Tensor] = {}


def _flush_l2(device: torch.device) -> None:
    """Overwrite a buffer larger than the L2 cache so small working sets are not timed warm."""
    if device not in _L2_FLUSH:
        _L2_FLUSH[device] = torch.empty(256 * 1024 * 1024 // 4, dtype=torch.int32, device=device)
    _L2_FLUSH[device].zero_()


def time_device(fn: Callable[[], object], device: torch.device, *, reps: int = 50, warmup: int = 5,
                flush: bool = True, budget_s: float = 10.0) -> Timing:
    """Device time per call: CUDA events around each call (L2 flushed before), else the wall clock."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    samples: list[float] = []
    started = time.perf_counter()
    for _ in range(reps):
        if device.type == "cuda":
            if flush:
                _flush_l2(device)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(begin.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        if len(samples) >= 3 and time.perf_counter() - started > budget_s:
            break
    return Timing.from_samples(samples)


def time_full_call(fn: Callable[[], object], device: torch.device, *, reps: int = 50, warmup: int = 5,
                   budget_s: float = 10.0) -> Timing:
    """Wall-clock time of call + synchronize: launch overhead and Python included."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    samples: list[float] = []
    started = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        samples.append(time.perf_counter() - t0)
        if len(samples) >= 3 and time.perf_counter() - started > budget_s:
            break
    return Timing.from_samples(samples)


def peak_memory(fn: Callable[[], object], device: torch.device) -> int | None:
    """Peak extra bytes allocated during one call on CUDA (None on CPU: see the tests for CPU bounds)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def copy_bandwidth(device: torch.device, nbytes: int = 256 * 1024 * 1024) -> float:
    """Measured device copy bandwidth in bytes/s (read + write counted), the memory floor's yardstick."""
    device = torch.device(device)
    if device.type == "cpu":
        nbytes = min(nbytes, 128 * 1024 * 1024)
    src = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = time_device(lambda: dst.copy_(src), device, reps=20, warmup=3, flush=False)
    return 2 * nbytes / timing.median


def device_name(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def device_slug(device: torch.device) -> str:
    """A file-name-safe name of the device kind: e.g. 'nvidia-h100-80gb-hbm3' or 'cpu-2core'."""
    device = torch.device(device)
    if device.type == "cuda":
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
    return f"cpu-{os.cpu_count()}core"


def environment(device: torch.device) -> dict[str, str]:
    import hcrlhf

    info = {
        "device": device_name(device),
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "hcrlhf": hcrlhf.__version__,
        "threads": str(torch.get_num_threads()),
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = "not installed"
    if torch.device(device).type == "cuda":
        info["cuda"] = str(torch.version.cuda)
        info["driver"] = _nvidia_driver()
    return info


def _nvidia_driver() -> str:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip().splitlines()[0]
    except Exception:
        return "unknown"


def markdown_table(rows: list[dict[str, object]]) -> str:
    if not rows:
        return "(no rows)\n"
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_results(section: str, rows: list[dict[str, object]], device: torch.device, *,
                  notes: str = "", results_dir: Path = RESULTS_DIR) -> Path:
    """Replace `section` in results/<device>.md (keeping other sections) and write its CSV."""
    results_dir.mkdir(parents=True, exist_ok=True)
    slug = device_slug(device)
    path = results_dir / f"{slug}.md"
    env = environment(device)
    body = [f"## {section}", "", " · ".join(f"{k}: {v}" for k, v in env.items()), ""]
    if notes:
        body += [notes.strip(), ""]
    body += [markdown_table(rows)]
    block = "\n".join(body)
    text = path.read_text() if path.exists() else f"# Benchmark results on {env['device']}\n\n"
    pattern = re.compile(rf"^## {re.escape(section)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: block + "\n", text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + block
    path.write_text(text.rstrip("\n") + "\n")
    with open(results_dir / f"{slug}-{section}.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)
    return path
