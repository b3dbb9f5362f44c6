"""The GPU runner (``zeroskip bench --device cuda``): the suite's Triton kernels against torch's
ops (cuDNN) in float32, float16 and bfloat16 at a GPU batch size: the forward, the input and
the weight gradient, and the block-sparse kernel at 90% zeros on a block-structured input and on
random zeros. Each result is checked against torch, then both are timed with
``triton.testing.do_bench``."""
from __future__ import annotations

import dataclasses
import datetime
import math
import platform
from typing import Callable, TextIO

import torch

from ..codegen.variant import Variant
from ..spec import LayerSpec
from ..runtime import autotune, loader, reference, timing, tritonenv, tuning
from ..runtime.timing import MIN_TIME_S, REPEATS
from .common import (BenchError, _each_layer)
from .reports import GpuReport
from .rows import SPARSE_DENSITY, GpuRow
from .suite import Layer

GPU_DTYPES = ("float32", "float16", "bfloat16")
GPU_BATCH = 32


class GpuUnavailable(BenchError):
    """The GPU bench cannot run here (no CUDA GPU, no Triton, or Triton's interpreter)."""


def gpu_problem(device: str = "cuda") -> str | None:
    """Why the GPU bench cannot run on ``device`` here, or None."""
    return tritonenv.problem(torch.device(device))


def gpu_machine(device: str = "cuda") -> dict:
    """Where the GPU figures were taken: the device's tuning fingerprint, cuDNN, the date."""
    cudnn = torch.backends.cudnn.version() if torch.device(device).type == "cuda" else None
    return {**tuning.gpu_fingerprint(device), "cudnn": cudnn,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version()}


def gpu_choice(spec: LayerSpec, density: float, device, strategy: str) -> tuple[str, bool]:
    """``(Triton choice, tuned)``: of the record tuned for ``spec`` on this GPU nearest
    ``density``, the fastest candidate of ``strategy`` ('dense' or 'sparse'); else that
    family's default config."""
    record = tuning.nearest(tuning.records(spec, "triton", device), density)
    if record:
        ms = {name: v for name, v in record.get("ms", {}).items()
              if name.startswith(strategy + "/") and v is not None and math.isfinite(v)}
        if ms:
            return min(ms, key=ms.get), True
    return loader.kernel_for(spec, "triton", Variant(strategy)).default.name, False


def _gpu_jobs(spec: LayerSpec) -> list[tuple[str, Callable[[], LayerSpec], float, str, str]]:
    """``(kind, the operator's spec, density, input pattern, strategy)`` of one layer's rows."""
    return [("forward", lambda: spec, 1.0, "random", "dense"),
            ("grad_input", spec.grad_input, 1.0, "random", "dense"),
            ("grad_weight", spec.grad_weight, 1.0, "random", "dense"),
            ("sparse-blocks", lambda: spec, SPARSE_DENSITY, "blocks", "sparse"),
            ("sparse-random", lambda: spec, SPARSE_DENSITY, "random", "sparse")]


def bench_gpu_layer(layer: Layer, dtype: str = "float32", batch: int = GPU_BATCH,
                    repeats: int = REPEATS, device: str = "cuda", tune: bool = False,
                    min_time: float = MIN_TIME_S) -> list[GpuRow]:
    """Every :data:`GPU_KINDS` row of one layer in one dtype: each Triton kernel checked
    against torch's op, then both timed (:func:`timing.time_device`: ``do_bench`` on a GPU;
    ``device`` 'cpu' runs Triton's interpreter, for tests). With ``tune``, each kernel is
    tuned for this GPU first (:func:`autotune.tune_triton`, recorded in the database). A row
    that fails keeps the reason in ``failure``; the others still run."""
    base = dataclasses.replace(layer.spec, dtype=dtype)
    rows = []
    for kind, make, density, pattern, strategy in _gpu_jobs(base):
        row = GpuRow(layer.name, layer.family, kind, dtype, "", layer.spec.op,
                     tuple(layer.spec.kernel_size), tuple(layer.spec.stride), layer.dense,
                     density, None, None, "", False, None)
        try:
            spec = make()
            row.shape = spec.describe(batch)
            if tune and kind != "sparse-random":     # sparse-random reuses the blocks tuning
                autotune.tune_triton(spec, density, device, repeats, min_time=min_time,
                                     pattern=pattern, batch=batch)
            t = autotune.operands(spec, density, device, pattern, batch=batch)
            torch_call = reference.op(spec, t)
            row.config, row.tuned = gpu_choice(spec, density, device, strategy)
            _, zs_call = autotune.call(spec, row.config, t, "triton")
            row.error = reference.relative_error(zs_call(), torch_call())
            tolerance = reference.tolerance(dtype, device)
            if not row.error <= tolerance:
                raise BenchError(f"zeroskip differs from torch by {row.error:.3g} of the "
                                 f"largest magnitude (tolerance {tolerance:g})")
            times, _ = timing.time_device({"torch": torch_call, "zeroskip": zs_call}, device,
                                            repeats, min_time)
            row.torch_ms, row.zeroskip_ms = times["torch"], times["zeroskip"]
        except Exception as exc:     # build, compile, launch or check: the row says why
            row.failure = f"{type(exc).__name__}: {exc}"
        rows.append(row)
    return rows


def _gpu_note(rows: list[GpuRow]) -> str:
    short = {"forward": "fwd", "grad_input": "gi", "grad_weight": "gw",
             "sparse-blocks": "blocks90", "sparse-random": "random90"}
    return ", ".join(f"{short.get(r.kind, r.kind)} " +
                     (f"{r.ratio:.2f}x" if r.ratio else "FAILED") for r in rows)


def run_gpu(layers: list[Layer], dtypes: tuple[str, ...] = GPU_DTYPES, batch: int = GPU_BATCH,
            repeats: int = REPEATS, device: str = "cuda", tune: bool = False,
            min_time: float = MIN_TIME_S, log: TextIO | None = None) -> GpuReport:
    """Benchmark the Triton kernels of ``layers`` in each of ``dtypes`` against torch on the
    GPU (:func:`bench_gpu_layer`); ``log`` gets one line per layer and dtype. Raises
    :class:`GpuUnavailable` where it cannot run."""
    problem = gpu_problem(device)
    if problem:
        raise GpuUnavailable(problem)
    for dtype in dtypes:
        if dtype not in GPU_DTYPES:
            raise ValueError(f"dtypes must be among {GPU_DTYPES}, got {dtype!r}")
    jobs = [(layer, dtype) for layer in layers for dtype in dtypes]
    per_job = _each_layer(
        jobs, lambda job: bench_gpu_layer(job[0], job[1], batch, repeats, device, tune, min_time),
        _gpu_note, log, label=lambda job: f"{job[0].name} {job[1]}")
    return GpuReport([row for rows in per_job for row in rows], gpu_machine(device), batch,
                     repeats)
