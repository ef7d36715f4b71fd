"""Small helpers shared by the benchmark scripts: thread setup, timing, machine description, peak memory, one
forward + backward of a scan."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import threading
import time

import torch


def setup_threads(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return f"{cpu}, {os.cpu_count()} cores visible, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


def timed(fn, repeats: int, warmup: int = 1) -> tuple[float, object]:
    """Median wall time of `repeats` calls after `warmup` calls, and the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory(fn) -> tuple[int | None, object]:
    """Peak resident memory above the level before the call (Linux; None elsewhere), sampled every 0.5 ms."""
    try:
        start = _rss_bytes()
    except OSError:
        return None, fn()
    peak = start
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = fn()
    finally:
        done.set()
        sampler.join()
    return max(peak, _rss_bytes()) - start, result


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    b = b.detach().double()
    return ((a.detach().double() - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def forward_backward(scan, inputs, weights):
    """scan(**inputs) and the gradients of sum(y * weights) with respect to every input (fresh leaves)."""
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    y = scan(**leaves)
    (y * weights).sum().backward()
    return y.detach(), {k: v.grad for k, v in leaves.items()}
