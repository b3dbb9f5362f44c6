"""Timing side by side: interleaved rounds on the CPU, ``triton.testing.do_bench`` on a GPU.

The bench and the autotuner both time through here. Each function is calibrated to run at least
:data:`MIN_TIME_S` a loop (the calibration is also the warm-up), then the functions run in
alternating rounds and the median per function is kept; the CPU time other processes took
meanwhile is reported as ``contention`` (above :data:`BUSY`, the figures are unreliable).
"""
from __future__ import annotations

import ctypes
import gc
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

MIN_TIME_S = 0.02      # every timed loop lasts at least this long
REPEATS = 7
BUSY = 0.1             # share of the CPUs other processes may take while timing
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # glibc's mallopt parameters
# Waits for background work that would share the cores, run before the timed rounds (the
# loader registers its wait for kernels being compiled ahead).
QUIET: list[Callable[[], object]] = []


def _loop(fn: Callable[[], object], calls: int) -> float:
    """Seconds taken by ``calls`` calls of ``fn``, with the garbage collector off."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


def _calibrate(fn: Callable[[], object], min_time: float) -> int:
    """Calls per loop so that a loop lasts ``min_time`` (doubling: also the warm-up)."""
    calls = 1
    while _loop(fn, calls) < min_time:
        calls *= 2
    return calls


def _cpu_seconds() -> tuple[float, float] | None:
    """``(CPU seconds every process used, CPU seconds this process used)`` so far; None where
    ``/proc/stat`` is missing."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), \
        own.user + own.system


def busy(contention: float | None) -> bool:
    """Whether other processes took so much CPU during a timing that it is unreliable."""
    return contention is not None and contention > BUSY


@dataclass
class Timing:
    """Median seconds per call of each function, and the contention meanwhile: the share of
    the CPUs the timed threads needed that other processes (or the hypervisor) took, beyond
    the CPUs the timed threads leave idle; above :data:`BUSY`, the figures are unreliable."""

    seconds: dict[str, float]
    contention: float | None


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = REPEATS,
                     min_time: float = MIN_TIME_S) -> Timing:
    """Time each function in alternating rounds, after a warm-up."""
    calls = {name: _calibrate(fn, min_time) for name, fn in fns.items()}
    for wait in QUIET:      # the first calls may have started background builds
        wait()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    cpu, start = _cpu_seconds(), time.perf_counter()
    for round_ in range(repeats):
        for name in order if round_ % 2 == 0 else order[::-1]:
            samples[name].append(_loop(fns[name], calls[name]) / calls[name])
    wall, cpu_end = time.perf_counter() - start, _cpu_seconds()
    contention = None
    if cpu and cpu_end:
        threads = torch.get_num_threads()
        others = ((cpu_end[0] - cpu[0]) - (cpu_end[1] - cpu[1])) / wall
        spare = max(0, (os.cpu_count() or 1) - threads)
        contention = min(1.0, max(0.0, (others - spare) / threads))
    return Timing({name: statistics.median(s) for name, s in samples.items()}, contention)


def steady_allocator() -> bool:
    """Pin glibc malloc's thresholds (mmap at its 32 MiB maximum, no trimming below 1 GiB), so
    that large temporaries (torch's column buffers, outputs) are reused from the heap instead of
    being mapped and page-faulted afresh on every call. Left dynamic, glibc's thresholds end up
    in a different state in each process, and times of layers with large buffers vary up to 4x
    between runs. Returns whether it applied (glibc only)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    applied = [mallopt(M_MMAP_THRESHOLD, 32 << 20), mallopt(M_TRIM_THRESHOLD, 1 << 30)]
    return all(applied)




def time_cuda(fns: dict[str, Callable[[], object]], repeats: int = REPEATS,
              rep_ms: float = 20) -> dict[str, float]:
    """Milliseconds per call of each function on the GPU: ``triton.testing.do_bench``'s median
    (L2 flushed before each call, CUDA events), in ``repeats`` interleaved rounds whose median
    is kept (rounds alternate the order, so no function always follows the same one)."""
    from triton.testing import do_bench
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for round_ in range(repeats):
        for name in order if round_ % 2 == 0 else order[::-1]:
            samples[name].append(float(do_bench(fns[name], warmup=5, rep=rep_ms,
                                                return_mode="median")))
    return {name: statistics.median(s) for name, s in samples.items()}


def time_device(fns: dict[str, Callable[[], object]], device: torch.device | str,
                repeats: int = REPEATS, min_time: float = MIN_TIME_S
                ) -> tuple[dict[str, float], float | None]:
    """``(milliseconds per call by name, contention)``: :func:`time_cuda` on a GPU (contention
    None), :func:`time_interleaved` elsewhere (Triton's interpreter)."""
    if torch.device(device).type == "cuda":
        return time_cuda(fns, repeats), None
    timing = time_interleaved(fns, repeats, min_time)
    return {name: s * 1e3 for name, s in timing.seconds.items()}, timing.contention

