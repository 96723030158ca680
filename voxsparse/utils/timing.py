"""Latency and peak-memory measurement that is honest on both CPU and CUDA."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    """Wall-clock statistics of ``repeats`` calls after ``warmup`` calls.

    Attributes:
        median_ms / p10_ms / p90_ms: milliseconds per call.
        peak_memory_mb: CUDA peak allocated memory during the timed calls, model and inputs
            included (None on the CPU).
    """

    median_ms: float
    p10_ms: float
    p90_ms: float
    repeats: int
    peak_memory_mb: float | None


def measure(fn: Callable[[], object], device: torch.device, repeats: int = 15, warmup: int = 3) -> Timing:
    """Time ``fn`` (synchronising CUDA around every call so queued kernels are counted)."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    samples.sort()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    return Timing(
        median_ms=statistics.median(samples),
        p10_ms=samples[int(0.1 * (len(samples) - 1))],
        p90_ms=samples[int(0.9 * (len(samples) - 1))],
        repeats=repeats,
        peak_memory_mb=peak,
    )
