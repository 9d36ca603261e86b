"""One timing/memory/floor harness for every benchmark (docs/architecture.md#tests-and-benchmarks).

GPU: device time from CUDA events with the L2 flushed between repetitions, full-call time from
the wall clock around call + synchronize, peak memory from the CUDA allocator. CPU: wall-clock
median. Both report median and p20/p80 (and keep the fastest sample for the floor check). Results
go to ``benchmarks/results/<device>.md`` (one section per benchmark, replaced on re-run) and
``<device>-<section>.csv``, or wherever ``--out`` points.

Floors are true lower bounds, never estimates: a memory-bound op that reads R bytes and writes W
bytes cannot finish before max(R / B_read, W / B_write), where B_read and B_write are the best
(fastest of many runs, warm caches, a buffer of the same size as the op's) measured read and write
bandwidths; a matmul-bound op cannot beat its FLOPs / the best measured matmul rate. Every bench
checks that its fastest sample is not below its floor (:func:`check_floors`): a violation means the
floor was measured wrong, and the run says so instead of printing a "× floor" below 1.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import os
import platform
import re
import statistics
import sys
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
    min: float = float("nan")  # the fastest sample: what a floor must not exceed

    @classmethod
    def from_samples(cls, samples: list[float]) -> Timing:
        ordered = sorted(samples)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]
        return cls(statistics.median(ordered), pick(0.2), pick(0.8), ordered[0])

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


_BANDWIDTH: dict[tuple[str, str, int], float] = {}


def _best_time(fn: Callable[[], object], device: torch.device, reps: int, min_span_s: float = 0.2) -> float:
    """Fastest of at least `reps` calls spread over at least `min_span_s` (warm, no L2 flush): the most favourable
    time, so a floor built on it stays low. The span matters on a shared machine: a few back-to-back calls can
    all fall in one stretch where another process holds a core."""
    best, started, count = float("inf"), time.perf_counter(), 0
    while count < reps or (time.perf_counter() - started < min_span_s and count < 100 * reps):
        best = min(best, time_device(fn, device, reps=1, warmup=1 if count == 0 else 0, flush=False).min)
        count += 1
    return best


def read_bandwidth(device: torch.device, nbytes: int, *, reps: int = 20, refresh: bool = False) -> float:
    """Best measured read bandwidth (bytes/s) over a buffer of `nbytes`: max over a sum and a max reduction.

    The buffer has the op's size, so it sits in the same cache level as the op's input; the time is the
    fastest of `reps` warm runs. Reading nbytes therefore takes at least nbytes / this.
    """
    device = torch.device(device)
    nbytes = max(int(nbytes), 4096)
    key = ("read", str(device), nbytes)
    if key not in _BANDWIDTH or refresh:
        buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
        best = min(_best_time(lambda: buf.sum(), device, reps), _best_time(lambda: buf.amax(), device, reps))
        _BANDWIDTH[key] = max(_BANDWIDTH.get(key, 0.0), buf.numel() * 4 / best)  # a re-measure only raises it
    return _BANDWIDTH[key]


def write_bandwidth(device: torch.device, nbytes: int, *, reps: int = 20, refresh: bool = False) -> float:
    """Best measured write bandwidth (bytes/s): fill_ of an already-touched buffer of `nbytes` (no page faults)."""
    device = torch.device(device)
    nbytes = max(int(nbytes), 4096)
    key = ("write", str(device), nbytes)
    if key not in _BANDWIDTH or refresh:
        buf = torch.zeros(nbytes // 4, dtype=torch.float32, device=device)
        best = _best_time(lambda: buf.fill_(1.0), device, reps)
        _BANDWIDTH[key] = max(_BANDWIDTH.get(key, 0.0), buf.numel() * 4 / best)
    return _BANDWIDTH[key]


def refined_floor(floor_fn: Callable[[bool], float], fastest: float, *, tries: int = 3) -> float:
    """floor_fn(refresh) with the yardstick re-measured (more runs, best kept) while a fastest sample beats it.

    On a shared machine one measurement of the bandwidth or matmul rate can be slowed throughout (a descheduled
    thread stalls every rep); a time below the floor then says the yardstick was measured low, so it is measured
    again. What is left after `tries` is a real violation for :func:`check_floors`."""
    floor = floor_fn(False)
    for _ in range(tries):
        if fastest >= floor:
            break
        floor = min(floor, floor_fn(True))
    return floor


def memory_floor(device: torch.device, read_bytes: int, write_bytes: int = 0, *, refresh: bool = False) -> float:
    """Seconds an op that reads `read_bytes` and writes `write_bytes` needs at least.

    max(R / B_read, W / B_write): each term alone is a lower bound (nothing reads faster than the best
    measured read); their sum is not, since reads and writes can overlap.
    """
    reps = 50 if refresh else 20
    floor = read_bytes / read_bandwidth(device, read_bytes, reps=reps, refresh=refresh)
    if write_bytes:
        floor = max(floor, write_bytes / write_bandwidth(device, write_bytes, reps=reps, refresh=refresh))
    return floor


def matmul_rate(device: torch.device, dtype: torch.dtype, shapes: list[tuple[int, int, int]], *,
                reps: int = 10) -> float:
    """Best measured matmul rate (FLOP/s) in `dtype`: max over (M, K, N) shapes of 2·M·K·N / fastest time.

    Pass the op's own matmul shape(s) with a large square one: the floor FLOPs / this rate is then below
    the time of the op's own bare matmul too.
    """
    device = torch.device(device)
    best = 0.0
    for m, k, n in shapes:
        gen = torch.Generator().manual_seed(0)
        a = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
        b = torch.randn(k, n, generator=gen).to(device=device, dtype=dtype)
        out = torch.empty(m, n, device=device, dtype=dtype)
        best = max(best, 2 * m * k * n / _best_time(lambda a=a, b=b, out=out: torch.mm(a, b, out=out), device, reps))
    return best


class FloorViolation(AssertionError):
    """A measured time fell below its floor: the floor (not the kernel) is wrong."""


def check_floors(rows: list[dict[str, object]], key: str = "x floor (fastest)", *, mode: str = "fail") -> int:
    """Raise FloorViolation naming every row whose fastest sample beat its floor (its ratio is below 1);
    mode="warn" prints the same message to stderr instead (for smoke runs on a shared machine). Returns the count."""
    bad = [row for row in rows if row.get(key) not in (None, "") and float(row[key]) < 1.0]
    if bad:
        message = (
            f"{len(bad)} measured time(s) below the floor, which must be a lower bound (re-measure the bandwidth or "
            "matmul rate over more runs, or the floor's byte/FLOP count is wrong): "
            + "; ".join(", ".join(f"{k}={v}" for k, v in row.items()) for row in bad))
        if mode != "warn":
            raise FloorViolation(message)
        print(f"WARNING: {message}", file=sys.stderr, flush=True)
    return len(bad)


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
    info.update(peer_versions())
    info["hcrlhf commit"] = git_commit()
    if torch.device(device).type == "cuda":
        info["cuda"] = str(torch.version.cuda)
        info["driver"] = _nvidia_driver()
    return info


def peer_versions() -> dict[str, str]:
    """Installed versions of the peer libraries the benchmarks import (requirements/peers.txt)."""
    from importlib import metadata

    found = {}
    for name in ("trl", "verl", "openrlhf"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def git_commit() -> str:
    """The hcrlhf source commit (short hash, '+dirty' with uncommitted changes), or 'unknown' outside a checkout."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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
                  notes: str = "", results_dir: Path = RESULTS_DIR, out: str | Path | None = None) -> Path:
    """Replace `section` in results/<device>.md, or in `out` (keeping other sections), and write its CSV
    (``<device>-<section>.csv`` beside it, or ``<out stem>-<section>.csv``)."""
    slug = device_slug(device)
    if out is not None:
        path = Path(out)
        results_dir, slug = path.parent, path.stem
    else:
        path = results_dir / f"{slug}.md"
    results_dir.mkdir(parents=True, exist_ok=True)
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
