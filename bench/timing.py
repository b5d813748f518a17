"""Timing and peak memory, on CPU (wall clock) and CUDA (events).

A sample is the mean of ``inner`` back-to-back calls, with ``inner`` chosen in warm-up so one
sample lasts at least ``min_sample_s``: short ops are not lost in timer and launch noise.
"""
from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch


class Timer:
    """Times calls on one device: CUDA events on a GPU, ``perf_counter`` after the call on CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def sample(self, fn: Callable[[], object], inner: int = 1) -> float:
        """Seconds per call, averaged over ``inner`` consecutive calls."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(inner):
                fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1000.0 / inner
        begin = time.perf_counter()
        for _ in range(inner):
            fn()
        return (time.perf_counter() - begin) / inner

    def calibrate(self, fn: Callable[[], object], min_sample_s: float) -> int:
        """How many calls make one sample of at least ``min_sample_s`` (after one warm call)."""
        fn()
        self.sync()
        once = self.sample(fn)
        return max(1, min(1000, int(min_sample_s / max(once, 1e-9)) + 1))

    def median(self, fn: Callable[[], object], repeats: int, min_sample_s: float = 0.05) -> float:
        inner = self.calibrate(fn, min_sample_s)
        return statistics.median(self.sample(fn, inner) for _ in range(repeats))


def _rss_bytes() -> int:
    # statm's second field is the resident set in pages.
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def peak_memory(device: torch.device, fn: Callable[[], object]) -> int:
    """Peak extra memory of one call of ``fn``: max allocated on CUDA, sampled RSS on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - baseline
    baseline = _rss_bytes()
    peak = [baseline]
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        fn()
    finally:
        done.set()
        watcher.join()
    return max(peak[0], _rss_bytes()) - baseline
