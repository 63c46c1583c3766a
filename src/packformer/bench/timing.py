"""Medians with warm-up: CUDA-synchronised on GPU, with the peak GPU memory of the timed calls.

Every call is timed on its own (perf_counter around call + synchronize), so the median is of single
batches, and host overhead (launches, syncs) counts, as it does for a user.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch


@dataclass
class Timing:
    median_ms: float
    min_ms: float
    max_ms: float
    runs: int
    warmup: int
    first_call_ms: float                    # the first warm-up call: compile / export / caches land here
    cpu_median_ms: float = 0.0              # process CPU time per call (all threads): the work done, whatever
                                            # else shares the machine; wall time is what a user waits
    times_ms: list[float] = field(default_factory=list)
    peak_mem_mb: float | None = None        # GPU only: peak allocated during the timed calls (weights included)
    peak_extra_mb: float | None = None      # GPU only: that peak minus what was allocated before (activations)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("median_ms", "min_ms", "max_ms", "first_call_ms", "cpu_median_ms", "peak_mem_mb", "peak_extra_mb"):
            if d[k] is not None:
                d[k] = round(d[k], 4)
        d["times_ms"] = [round(t, 4) for t in self.times_ms]
        return d


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], device: torch.device | str = "cpu", iterations: int = 10, warmup: int = 1,
            max_seconds: float | None = None, min_runs: int = 3) -> tuple[Timing, Any]:
    """Call `fn` `warmup` times, then time up to `iterations` calls; stop early (after at least
    `min_runs`) once the timed calls have taken `max_seconds`. Returns the timing and the last output."""
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    device = torch.device(device)
    cuda = device.type == "cuda"
    first_ms = None
    out = None
    for _ in range(warmup):
        out = None
        synchronize(device)
        t0 = time.perf_counter()
        out = fn()
        synchronize(device)
        if first_ms is None:
            first_ms = (time.perf_counter() - t0) * 1e3
    base = None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times: list[float] = []
    cpu: list[float] = []
    spent = 0.0
    for i in range(iterations):
        out = None
        synchronize(device)
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        synchronize(device)
        dt = time.perf_counter() - t0
        cpu.append((time.process_time() - c0) * 1e3)
        times.append(dt * 1e3)
        spent += dt
        if max_seconds is not None and spent >= max_seconds and len(times) >= min(min_runs, iterations):
            break
    peak = extra = None
    if cuda:
        peak_b = torch.cuda.max_memory_allocated(device)
        peak, extra = peak_b / 2**20, (peak_b - base) / 2**20
    timing = Timing(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times), runs=len(times),
                    warmup=warmup, first_call_ms=first_ms if first_ms is not None else times[0],
                    cpu_median_ms=statistics.median(cpu), times_ms=times,
                    peak_mem_mb=peak, peak_extra_mb=extra)
    return timing, out
