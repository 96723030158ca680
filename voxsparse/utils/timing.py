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
    return _timing(samples, torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None)


def measure_back_to_back(fn: Callable[[], object], device: torch.device, repeats: int = 15) -> float:
    """Mean ms per call of ``repeats`` calls of a warmed-up ``fn`` launched one after another, with one
    CUDA synchronisation at the end: the rate of a loop in which the host work of one call overlaps the
    device work queued by the one before (:func:`measure` times each call alone)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) * 1e3 / max(repeats, 1)


def _timing(samples: list[float], peak_mb: float | None) -> Timing:
    samples = sorted(samples)
    return Timing(
        median_ms=statistics.median(samples),
        p10_ms=samples[int(0.1 * (len(samples) - 1))],
        p90_ms=samples[int(0.9 * (len(samples) - 1))],
        repeats=len(samples),
        peak_memory_mb=peak_mb,
    )


def measure_interleaved(
    fns: dict[str, Callable[[], object]], device: torch.device, rounds: int = 5, per_round: int = 4, warmup: int = 3
) -> dict[str, Timing]:
    """Time several callables in alternation, ``per_round`` calls of each per round.

    GPU timings only compare within one process and one stretch of time (hosts with the same GPU
    differ, and one host drifts, by tens of percent), so A and B take turns: A A A A, B B B B,
    A A A A, ... Each one's peak memory is taken over its own calls only.
    """
    cuda = device.type == "cuda"
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    peaks: dict[str, float] = dict.fromkeys(fns, 0.0)
    for _ in range(rounds):
        for name, fn in fns.items():
            if cuda:
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(per_round):
                start = time.perf_counter()
                fn()
                if cuda:
                    torch.cuda.synchronize(device)
                samples[name].append((time.perf_counter() - start) * 1e3)
            if cuda:
                peaks[name] = max(peaks[name], torch.cuda.max_memory_allocated(device) / 2**20)
    return {name: _timing(s, peaks[name] if cuda else None) for name, s in samples.items()}
