"""How long a call takes: warm-up calls, then ``repeats`` timed ones.

On CUDA each call is timed with CUDA events after the L2 cache is flushed and behind a queued
GPU busy-wait (so the host's launch cost stays outside the timed region); on the CPU with
time.perf_counter. A benchmark row reports the median.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List

import torch

#: Timed calls per implementation when --repeats is not given.
DEFAULT_REPEATS = {"cpu": 5, "cuda": 100}

# Zeroed before each timed CUDA call: larger than any GPU's L2 cache (50 MB on an H100).
_L2_FLUSH_BYTES = 256 * 1024 * 1024
# GPU clock cycles of busy-waiting queued ahead of each timed CUDA call (~0.5 ms at 2 GHz).
_HOST_AHEAD_CYCLES = 1_000_000


def call_seconds(fn: Callable[[], Any], device, repeats: int) -> List[float]:
    """Times of ``repeats`` calls of ``fn()``, after max(1, repeats // 5) warm-up calls.

    Parameters
    ----------
    fn : callable
        Called with no arguments.
    device : str or torch.device
        On CUDA, each call is timed with CUDA events on the current stream, after a buffer
        larger than the L2 cache is zeroed, so no call finds the previous one's data in
        cache, and after a queued busy-wait (``torch.cuda._sleep``) that keeps the GPU
        occupied while the host launches the call: the time is the call's GPU work, not
        its Python launch cost (a call that synchronises with the host still pays it).
        Elsewhere, time.perf_counter around each call.
    repeats : int
        Timed calls, >= 1.

    Returns
    -------
    list of float
        Seconds, one per timed call.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    for _ in range(max(1, repeats // 5)):
        fn()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times
    flush = torch.empty(_L2_FLUSH_BYTES, dtype=torch.int8, device=device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    sleep = getattr(torch.cuda, "_sleep", None)
    for start, end in events:
        flush.zero_()
        if sleep is not None:
            # Keep the GPU busy while the host launches the call, so the timed region holds
            # the call's GPU work and not Python's launch cost (as a CUDA-graph replay would).
            sleep(_HOST_AHEAD_CYCLES)
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def median_seconds(fn: Callable[[], Any], device, repeats: int) -> float:
    """Median of ``call_seconds(fn, device, repeats)``: what a benchmark row reports."""
    return statistics.median(call_seconds(fn, device, repeats))


def interleaved_median_seconds(functions: Dict[str, Callable[[], Any]], device, rounds: int,
                               calls_per_round: int = 5) -> Dict[str, float]:
    """Median seconds per call of each function, timed in turn ``rounds`` times
    (``calls_per_round`` calls each), so load from other processes hits every function alike."""
    times: Dict[str, List[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, fn in functions.items():
            times[name] += call_seconds(fn, device, calls_per_round)
    return {name: statistics.median(spent) for name, spent in times.items()}
