"""The CPU forward runner: each layer checked, then timed against torch (:func:`run`), at each
input density (:func:`run_sweep`), and the per-call overhead of ``zeroskip.functional``."""
from __future__ import annotations

import tempfile
import time
from typing import Callable, TextIO

import torch
import torch.nn.functional as F

from .. import freezing
from .. import functional as Z
from ..codegen.macs import dense_macs, nonzero_macs
from ..spec import LayerSpec
from ..runtime import dispatch, launcher, loader, stats
from ..runtime.timing import MIN_TIME_S, REPEATS, busy, steady_allocator, time_interleaved
from .common import (BenchError, _cache_dir, _checked_call, _each_layer, _mark, _require_kernel,
                     call_args, check, machine, operands)
from .reports import Report, SweepReport
from .rows import Overhead, Row
from .suite import TINY, Layer, wide_3x3

SWEEP_DENSITIES = (1.0, 0.5, 0.3, 0.1, 0.05)    # input densities of ``--densities``


def cold_compile_seconds(spec: LayerSpec) -> float:
    """Seconds from a spec to a loaded kernel (passes, plan, C, compiler, dlopen) on an empty
    cache; the process's kernel memo and the normal cache are left alone."""
    with tempfile.TemporaryDirectory(prefix="zeroskip-bench-") as tmp, _cache_dir(tmp):
        start = time.perf_counter()
        loader.load(spec)
        return time.perf_counter() - start


def _checked_dispatch(name: str, fn: Callable[[], torch.Tensor],
                      want: torch.Tensor) -> tuple[float, dispatch.Operator]:
    """Run zeroskip's ``fn`` once: its result must match ``want`` and come from its layer's
    dispatch, which must have run a generated kernel, or torch's op where the tuning database
    chose torch for this input (then zeroskip legitimately is torch). Returns the error and the
    operator that ran, whose ``last`` says what it ran."""
    with dispatch.observe() as ran:
        before = stats.stats()
        got = fn()
        after = stats.stats()
    error = check(name, got, want)
    if not ran:
        raise BenchError(f"{name}: zeroskip did not run a generated kernel (it fell back to "
                         "torch's op)")
    if ran[-1].choice != "torch":
        _require_kernel(name, before, after)
    return error, ran[-1].operator


def _calls(spec: LayerSpec, x, w, b) -> tuple[Callable[[], torch.Tensor], ...]:
    """``(torch's call, zeroskip's call)`` of the spec's op on the operands."""
    kwargs = call_args(spec)
    torch_fn, zs_fn = getattr(F, spec.torch_name), getattr(Z, spec.torch_name)
    return (lambda: torch_fn(x, w, b, **kwargs)), (lambda: zs_fn(x, w, b, **kwargs))


def _dense_kernel_call(call: dispatch.Operator, x, w, b) -> Callable[[], torch.Tensor]:
    """The layer's generated dense kernel launched as ``Operator.run`` launches it, the dispatch
    bypassed: what the dense goal measures where the dispatch chose something else."""
    return lambda: call.launch(call.forward, x, w, b)


def _timed_row(layer: Layer, batch: int, density: float, compile_s: float | None,
               repeats: int, min_time: float) -> Row:
    """Check, then time, the layer against torch on an input of ``batch`` and ``density``; at
    density 1 also on frozen copies of the weights (packs kept with no comparison, as a server
    that called ``zeroskip.freeze`` runs), and where the dispatch ran something other than the
    dense kernel, that kernel is timed too."""
    spec = layer.spec
    x, w, b = operands(spec, density=density, batch=batch)
    torch_call, zs_call = _calls(spec, x, w, b)
    error, call = _checked_dispatch(layer.name, zs_call, torch_call())
    strategy = call.last
    fns = {"torch": torch_call, "zeroskip": zs_call}
    frozen = _frozen_copies(w, b) if density == 1.0 else ()
    if frozen:
        fns["frozen"] = _calls(spec, x, *frozen)[1]
        _checked_dispatch(f"{layer.name} (frozen weights)", fns["frozen"], torch_call())
    if density == 1.0 and strategy != "dense":
        fns["dense kernel"] = _dense_kernel_call(call, x, w, b)
    timing = time_interleaved(fns, repeats, min_time)
    times = timing.seconds
    for t in frozen:
        if t is not None:
            freezing.unfreeze(t)
    dense_s = times.get("dense kernel", times["zeroskip"]) if density == 1.0 else None
    nonzero, dense = round(nonzero_macs(spec, batch) * density), dense_macs(spec, batch)
    executed = nonzero
    pad = call.forward.plan.pad
    if strategy == "dense" and pad and pad.mode == "zeros":
        # A padding kept as a zero-padded copy: the kernel multiplies its zeros too.
        executed = call.forward.macs_per_sample * batch
    return Row(layer.name, layer.family, layer.dense, spec.describe(batch),
               torch_ms=times["torch"] * 1e3, zeroskip_ms=times["zeroskip"] * 1e3,
               gflops=2 * nonzero / times["zeroskip"] / 1e9, skipped=1 - executed / dense,
               compile_s=compile_s, nonzero_macs=nonzero, dense_macs=dense, error=error,
               contention=timing.contention, density=density, strategy=strategy,
               dense_ms=None if dense_s is None else dense_s * 1e3,
               wide_3x3=wide_3x3(spec), wide=layer.wide,
               frozen_ms=times["frozen"] * 1e3 if "frozen" in times else None)


def _frozen_copies(w: torch.Tensor, b: torch.Tensor | None) -> tuple:
    """Copies of the weight and bias, frozen (:func:`zeroskip.freeze`): what a server that
    promised its weights will not change runs."""
    return tuple(t if t is None else freezing.freeze(
        torch.nn.Parameter(t.detach().clone(), requires_grad=False)) for t in (w, b))


def bench_layer(layer: Layer, batch: int = 1, repeats: int = REPEATS,
                min_time: float = MIN_TIME_S, density: float = 1.0) -> Row:
    """Check, then time, one layer against torch on an input of ``density``, with the cold
    compile time of its kernel."""
    return _timed_row(layer, batch, density, cold_compile_seconds(layer.spec), repeats,
                      min_time)


def sweep_layer(layer: Layer, densities: tuple[float, ...] = SWEEP_DENSITIES, batch: int = 1,
                repeats: int = REPEATS, min_time: float = MIN_TIME_S) -> list[Row]:
    """Check, then time, one layer against torch at each input density (no cold compile: that
    is :func:`bench_layer`'s figure, the same at every density)."""
    return [_timed_row(layer, batch, density, None, repeats, min_time) for density in densities]


def measure_overhead(repeats: int = REPEATS, min_time: float = MIN_TIME_S,
                     spec: LayerSpec = TINY) -> Overhead:
    """Time ``zeroskip.functional`` against its bare kernel (run as ``functional`` runs it, on
    preallocated tensors) and torch on ``spec``."""
    launcher.ready()                # the call times through it where it can be built
    x, w, b = operands(spec)
    torch_call, zs_call = _calls(spec, x, w, b)
    want = torch_call()
    _checked_call("overhead layer", zs_call, want)
    kernel = loader.kernel_for(spec)
    packed, out = kernel.pack(w, b), torch.empty(spec.output_shape())
    run = kernel.lib.run
    args = (x.shape[0], kernel.threads_for(x.shape[0]), x.data_ptr(), packed.data_ptr(),
            w.data_ptr(), out.data_ptr())
    run(*args)
    check("overhead layer (bare kernel)", out, want)
    timing = time_interleaved({"functional": zs_call, "kernel": lambda: run(*args),
                               "torch": torch_call}, repeats, min_time)
    times = timing.seconds
    return Overhead(spec.describe(), times["functional"] * 1e6, times["kernel"] * 1e6,
                    times["torch"] * 1e6, args[1], timing.contention, launcher.status())


def _forward_note(row: Row) -> str:
    busy_note = f", others took {row.contention:.0%} of its CPUs" if busy(row.contention) else ""
    return f"{row.ratio:.2f}x{busy_note}"


def run(layers: list[Layer], batch: int = 1, repeats: int = REPEATS,
        min_time: float = MIN_TIME_S, log: TextIO | None = None) -> Report:
    """Benchmark ``layers`` and the per-call overhead (with :func:`steady_allocator`); ``log``
    gets one line per layer."""
    pinned = steady_allocator()
    launcher.ready()        # calls run through the compiled launcher from the first timing
    rows = _each_layer(layers, lambda layer: bench_layer(layer, batch, repeats, min_time),
                       _forward_note, log)
    overhead = measure_overhead(repeats, min_time)
    return Report(rows, {**machine(), "malloc_pinned": pinned}, batch, repeats, overhead=overhead)


def _sweep_note(rows: list[Row]) -> str:
    notes = ", ".join(f"{r.density:g}: {r.ratio:.2f}x {r.strategy}{_mark(r.contention)}"
                      for r in rows)
    return notes + (" (*: others took its CPUs)" if any(busy(r.contention) for r in rows) else "")


def run_sweep(layers: list[Layer], densities: tuple[float, ...] = SWEEP_DENSITIES,
              batch: int = 1, repeats: int = REPEATS, min_time: float = MIN_TIME_S,
              log: TextIO | None = None) -> SweepReport:
    """Benchmark ``layers`` at each input density (with :func:`steady_allocator`); ``log``
    gets one line per layer."""
    pinned = steady_allocator()
    launcher.ready()        # calls run through the compiled launcher from the first timing
    per_layer = _each_layer(
        layers, lambda layer: sweep_layer(layer, densities, batch, repeats, min_time),
        _sweep_note, log)
    return SweepReport([row for rows in per_layer for row in rows],
                       {**machine(), "malloc_pinned": pinned}, batch, repeats)
