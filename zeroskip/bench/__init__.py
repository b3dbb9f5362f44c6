"""``zeroskip bench``: each layer of a suite timed against torch, side by side in one run.

For every layer, random float32 operands go through ``torch.nn.functional``'s op and through
``zeroskip.functional``'s drop-in; the results must agree (and zeroskip must have run a generated
kernel, not torch's op) before anything is timed. Both are then timed interleaved: after a
warm-up, each of ``repeats`` rounds times a loop of enough calls to last ``min_time`` seconds,
torch and zeroskip alternating; the report holds the medians. The kernel cache is warm for the
timed calls; the compile time is measured apart, on a fresh cache. A tiny layer measures the
per-call overhead of ``zeroskip.functional`` above its bare kernel. Timings are marked when
other processes took the bench's CPUs meanwhile; malloc's thresholds are pinned so that large
buffers cost the same in every process (:func:`steady_allocator`).

With ``--backward`` (:func:`run_backward`), each layer is timed as one training step instead:
forward with input, weight and bias requiring gradients, then ``backward`` of a fixed output
gradient (the output and the three gradients checked against torch first); for strided convs,
whose input gradient is a strided transposed convolution, that operator is also timed alone.

With ``--densities`` (:func:`run_sweep`), each layer runs on ReLU-like inputs of each density
(exactly that share of positive values, the rest zeros; density 1 is the random normal input):
checked, then timed as above, with the strategy zeroskip's per-call dispatch chose (``Operator.last``:
the dense or sparse kernel, a tuned variant, or torch's op where the tuning database found torch
fastest; the one case where zeroskip may run torch's op). Non-zero MACs then skip the activation
zeros too. :class:`SweepReport` computes the speed goals for sparse inputs from the rows, and
:func:`plot` draws speed-up against density.

With ``--device cuda`` (:func:`run_gpu`), the layers' Triton kernels run on a GPU against torch's
ops (cuDNN) in float32, float16 and bfloat16 at a GPU batch size: the forward, the input and the
weight gradient, and the block-sparse kernel at 90% zeros on a block-structured input and on
random zeros. Each result is checked against torch, then both are timed with
``triton.testing.do_bench``; :class:`GpuReport` computes the GPU speed goals from the rows.

The package: :mod:`.suite` (the layers), :mod:`.common` (operands, checks, the dispatch
observed, the machine), the runners :mod:`.cpu` (forward, density sweep, overhead),
:mod:`.backward` (training step) and :mod:`.gpu`, the rows they measure (:mod:`.rows`), and the
reports (:mod:`.reports`: figures, goals, one JSON serialization; :mod:`.report_text`: markdown
and the plot). Everything other code takes from ``zeroskip.bench`` is re-exported here.
"""
from __future__ import annotations

from .backward import (GRADS, bench_backward_layer, grad_input_calls, run_backward,
                       train_operands)
from .common import (RTOL, BenchError, _cache_dir, _mark, call_args, check, geomean, machine,
                     operands)
from .cpu import (SWEEP_DENSITIES, bench_layer, cold_compile_seconds, measure_overhead, run,
                  run_sweep, sweep_layer)
from .gpu import (GPU_BATCH, GPU_DTYPES, GpuUnavailable, bench_gpu_layer, gpu_choice,
                  gpu_machine, gpu_problem, run_gpu)
from .report_text import SPEEDUP_TICKS, plot
from .reports import BackwardReport, GpuReport, JsonReport, Report, SweepReport
from .rows import (GPU_KINDS, GPU_PATTERN_NOTE, SPARSE_BLOCK, SPARSE_DENSITY, BackwardRow,
                   GpuRow, Overhead, Row)
from .suite import SUITE, TINY, Layer, select, strided_conv, wide_3x3

__all__ = [
    # the suite
    "SUITE", "TINY", "Layer", "select", "strided_conv", "wide_3x3",
    # shared by the runners
    "RTOL", "BenchError", "_cache_dir", "_mark", "call_args", "check", "geomean", "machine",
    "operands",
    # the runners
    "SWEEP_DENSITIES", "bench_layer", "cold_compile_seconds", "measure_overhead", "run",
    "run_sweep", "sweep_layer",
    "GRADS", "bench_backward_layer", "grad_input_calls", "run_backward", "train_operands",
    "GPU_BATCH", "GPU_DTYPES", "GpuUnavailable", "bench_gpu_layer", "gpu_choice",
    "gpu_machine", "gpu_problem", "run_gpu",
    # rows and reports
    "GPU_KINDS", "GPU_PATTERN_NOTE", "SPARSE_BLOCK", "SPARSE_DENSITY", "BackwardRow", "GpuRow",
    "Overhead", "Row",
    "BackwardReport", "GpuReport", "JsonReport", "Report", "SweepReport", "SPEEDUP_TICKS",
    "plot",
]
