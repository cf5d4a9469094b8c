"""How the benchmark measures: warm-up calls, then order statistics of many timed calls.

Warm-up calls come first, so module loading, autotuning and compilation stay out of the numbers (the first
call's time is reported apart). Each timed call is bracketed by CUDA events on a GPU, by
``time.perf_counter`` on the CPU; peak memory is ``torch.cuda.max_memory_allocated`` after a reset. On a
shared CPU the speed drifts within seconds, so :func:`time_paired` times two models in alternating blocks.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a host clock reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Collect dropped models and hand cached GPU blocks back, so the next peak reading is its model's alone."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def percentile(sorted_ms: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (q in [0, 1])."""
    pos = q * (len(sorted_ms) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_ms) - 1)
    return sorted_ms[lo] + (sorted_ms[hi] - sorted_ms[lo]) * (pos - lo)


def time_calls(
    fn: Callable[[], torch.Tensor], device: torch.device, warmup: int, iters: int
) -> tuple[dict, torch.Tensor]:
    """Warm up, then time ``iters`` calls one by one: median/p10/p90 in ms, the peak memory of the timed calls,
    and the last call's output (checked against the references, so what was timed is what was checked).

    On CUDA each call sits between two recorded events and the host never waits in between, so host launch
    overhead counts only where it starves the GPU, as it would in a sampling loop.
    """
    first = None
    for i in range(warmup):
        t0 = time.perf_counter()
        fn()
        if i == 0:
            synchronize(device)
            first = time.perf_counter() - t0  # includes compilation / graph capture, reported separately
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        events = [
            (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)
        ]
        for start, end in events:
            start.record()
            out = fn()
            end.record()
        torch.cuda.synchronize(device)
        times = [start.elapsed_time(end) for start, end in events]
        peak = torch.cuda.max_memory_allocated(device) / 2**30
    else:
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            out = fn()
            times.append((time.perf_counter() - t0) * 1000.0)
        peak = None
    ordered = sorted(times)
    stats = {
        "median_ms": statistics.median(times),
        "p10_ms": percentile(ordered, 0.1),
        "p90_ms": percentile(ordered, 0.9),
        "mean_ms": statistics.fmean(times),
        "min_ms": ordered[0],
        "iters": iters,
        "warmup": warmup,
        "first_call_s": first,
        "peak_gib": peak,
    }
    return stats, out


def time_paired(
    calls: dict[str, Callable[[], torch.Tensor]], rounds: int, block: int
) -> dict[str, dict[str, float]]:
    """Time several callables in alternating blocks: ``rounds`` times, each runs ``block`` calls in a row (after
    one untimed call), in a rotating order; per callable, the median over rounds of each block's median, in ms.

    On a shared CPU the speed drifts by 10% or more within seconds, so timing one model after the other
    compares two different machines; alternating makes the drift hit every callable alike, while each block
    still measures back-to-back calls (the steady state of a sampling loop).
    """
    names = list(calls)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            fn = calls[name]
            fn()
            times = []
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1000.0)
            per_round[name].append(statistics.median(times))
    return {
        n: {
            "median_ms": statistics.median(v),
            "min_ms": min(v),
            "max_ms": max(v),
            "rounds": rounds,
            "block": block,
        }
        for n, v in per_round.items()
    }


def time_once(device: torch.device, fn: Callable[[], object]) -> tuple[object, float, float | None]:
    """Wall-clock seconds of one whole call (host work such as tokenizing counts) and its peak GPU memory."""
    free_memory(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    t0 = time.perf_counter()
    result = fn()
    synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return result, seconds, peak
