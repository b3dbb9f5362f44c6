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
checked, then timed as above, with the strategy zeroskip's per-call dispatch chose (``Call.last``:
the dense or sparse kernel, a tuned variant, or torch's op where the tuning database found torch
fastest; the one case where zeroskip may run torch's op). Non-zero MACs then skip the activation
zeros too. :class:`SweepReport` computes the issue's goals for sparse inputs from the rows, and
:func:`plot` draws speed-up against density.

With ``--device cuda`` (:func:`run_gpu`), the layers' Triton kernels run on a GPU against torch's
ops (cuDNN) in float32, float16 and bfloat16 at a GPU batch size: the forward, the input and the
weight gradient, and the block-sparse kernel at 90% zeros on a block-structured input and on
random zeros. Each result is checked against torch, then both are timed with
``triton.testing.do_bench``; :class:`GpuReport` computes the issue's GPU goals from the rows.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, TextIO

import torch
import torch.nn.functional as F

from . import __version__
from . import functional as Z
from .codegen.macs import dense_macs, nonzero_macs
from .runtime import cc, ops, stats
from .runtime.autotune import (BUSY, MIN_TIME_S, REPEATS, Timing, _calibrate,  # noqa: F401
                               _loop, busy, sparse_input, steady_allocator,
                               time_interleaved)
from .spec import LayerSpec

RTOL = 1e-4            # max |zeroskip - torch| allowed, relative to max |torch|
SWEEP_DENSITIES = (1.0, 0.5, 0.3, 0.1, 0.05)    # input densities of ``--densities``


@dataclass(frozen=True)
class Layer:
    """One benchmark layer: ``name`` is ``<network>.<layer>``; ``dense`` marks an ordinary dense
    conv (counted in the dense geomean); ``quick`` puts it in the quick subset."""

    name: str
    family: str
    spec: LayerSpec
    dense: bool = False
    quick: bool = False


def _conv(name: str, family: str, *args, dense: bool = False, quick: bool = False,
          **kwargs) -> Layer:
    return Layer(name, family, LayerSpec.conv(*args, **kwargs), dense, quick)


def _deconv(name: str, family: str, *args, quick: bool = False, **kwargs) -> Layer:
    return Layer(name, family, LayerSpec.conv_transpose(*args, **kwargs), quick=quick)


# Real layer shapes at batch 1 (ImageNet 224x224 inputs unless noted).
SUITE: list[Layer] = [
    _conv("resnet18.conv1", "resnet18", 3, 64, 7, 2, 3, bias=False, input_size=(224, 224),
          dense=True),
    _conv("resnet18.layer1.conv", "resnet18", 64, 64, 3, 1, 1, bias=False,
          input_size=(56, 56), dense=True),
    _conv("resnet18.layer2.down", "resnet18", 64, 128, 3, 2, 1, bias=False,
          input_size=(56, 56), dense=True),
    _conv("resnet18.layer4.proj", "resnet18", 256, 512, 1, 2, bias=False,
          input_size=(14, 14), dense=True, quick=True),
    _conv("resnet50.layer1.reduce", "resnet50", 256, 64, 1, bias=False, input_size=(56, 56),
          dense=True),
    _conv("resnet50.layer3.conv2", "resnet50", 256, 256, 3, 1, 1, bias=False,
          input_size=(14, 14), dense=True),
    _conv("resnet50.layer4.expand", "resnet50", 512, 2048, 1, bias=False, input_size=(7, 7),
          dense=True),
    _conv("vgg16.conv2_1", "vgg16", 64, 128, 3, 1, 1, input_size=(112, 112), dense=True),
    _conv("vgg16.conv5_2", "vgg16", 512, 512, 3, 1, 1, input_size=(14, 14), dense=True),
    _conv("mobilenetv2.block2.dw", "mobilenetv2-dw", 144, 144, 3, 1, 1, groups=144,
          bias=False, input_size=(56, 56)),
    _conv("mobilenetv2.block3.dw-s2", "mobilenetv2-dw", 144, 144, 3, 2, 1, groups=144,
          bias=False, input_size=(56, 56), quick=True),
    _conv("mobilenetv2.block14.dw", "mobilenetv2-dw", 960, 960, 3, 1, 1, groups=960,
          bias=False, input_size=(7, 7)),
    # DCGAN generator for 64x64 images: 4x4 -> 8x8, and the last layer 32x32 -> 64x64.
    _deconv("dcgan.up2", "dcgan", 512, 256, 4, 2, 1, bias=False, input_size=(4, 4),
            quick=True),
    _deconv("dcgan.out", "dcgan", 64, 3, 4, 2, 1, bias=False, input_size=(32, 32)),
    # U-Net decoder on 128x128 images: the 2x2 up-conv out of the bottleneck, and a 3x3 one
    # (output_padding 1) as many decoders use.
    _deconv("unet.up1", "unet-dec", 1024, 512, 2, 2, input_size=(8, 8)),
    _deconv("unet.up3-k3", "unet-dec", 256, 128, 3, 2, 1, 1, input_size=(16, 16)),
    # Non-causal WaveNet residual convs (Parallel WaveGAN) on 4000 samples, dilation 1 to 512.
    _conv("wavenet.d1", "wavenet", 64, 128, 3, 1, 1, 1, input_size=(4000,)),
    _conv("wavenet.d16", "wavenet", 64, 128, 3, 1, 16, 16, input_size=(4000,), quick=True),
    _conv("wavenet.d512", "wavenet", 64, 128, 3, 1, 512, 512, input_size=(4000,)),
    # DeepLabv3 ASPP branch, rate 12, on the 33x33 output-stride-16 map of a 513x513 image.
    _conv("deeplab.aspp-r12", "deeplab", 512, 256, 3, 1, 12, 12, bias=False,
          input_size=(33, 33)),
    # 3-D U-Net decoder up-conv on a 16^3 feature volume.
    _deconv("unet3d.up", "unet3d", 128, 64, 2, 2, input_size=(16, 16, 16)),
    _deconv("convT1d-long", "convT1d-long", 64, 32, 4, 2, 1, input_size=(40000,), quick=True),
]

# A layer small enough that a call is all overhead.
TINY = LayerSpec.conv(4, 4, 3, 1, 1, input_size=(8, 8))


def select(quick: bool = False, patterns: list[str] | None = None) -> list[Layer]:
    """The suite (or its quick subset), keeping layers whose name or family contains one of
    ``patterns`` when given."""
    layers = [layer for layer in SUITE if layer.quick or not quick]
    if patterns:
        layers = [layer for layer in layers
                  if any(p in layer.name or p in layer.family for p in patterns)]
    return layers


class BenchError(RuntimeError):
    """zeroskip gave a wrong result, or ran torch's op instead of a kernel."""


# --------------------------------------------------------------------------------- timing
@contextlib.contextmanager
def _cache_dir(path: str) -> Iterator[None]:
    old = os.environ.get("ZEROSKIP_CACHE_DIR")
    os.environ["ZEROSKIP_CACHE_DIR"] = path
    try:
        yield
    finally:
        if old is None:
            del os.environ["ZEROSKIP_CACHE_DIR"]
        else:
            os.environ["ZEROSKIP_CACHE_DIR"] = old


def cold_compile_seconds(spec: LayerSpec) -> float:
    """Seconds from a spec to a loaded kernel (passes, plan, C, compiler, dlopen) on an empty
    cache; the process's kernel memo and the normal cache are left alone."""
    spec = dataclasses.replace(spec, batch=1)
    with tempfile.TemporaryDirectory(prefix="zeroskip-bench-") as tmp, _cache_dir(tmp):
        start = time.perf_counter()
        ops._compile(spec)
        return time.perf_counter() - start


# --------------------------------------------------------------------------------- layers
def call_args(spec: LayerSpec) -> dict:
    """Keyword arguments of the spec's ``torch.nn.functional`` op (bias aside)."""
    if spec.padding_mode != "zeros" or any(lo != hi for lo, hi in spec.padding):
        raise ValueError(f"the bench runs zero, symmetric padding only: {spec.describe()}")
    kwargs = dict(stride=spec.stride, padding=tuple(lo for lo, _ in spec.padding),
                  dilation=spec.dilation, groups=spec.groups)
    if spec.op == "conv_transpose":
        kwargs["output_padding"] = spec.output_padding
    return kwargs


def operands(spec: LayerSpec, seed: int = 0, density: float = 1.0) -> tuple[torch.Tensor, ...]:
    """Random ``(input, weight, bias or None)`` of the spec's shapes; the weight and bias are
    frozen ``nn.Parameter``s, as in a model at inference (zeroskip caches their packing). At
    density 1 the input is random normal (no zeros); below, it is ReLU-like, with exactly that
    share of positive values (:func:`sparse_input`). The weights are the same at every density."""
    gen = torch.Generator().manual_seed(seed)
    shapes = spec.input_shapes
    x = torch.randn(shapes["input"], generator=gen)
    w, b = (torch.nn.Parameter(torch.randn(shapes[n], generator=gen), requires_grad=False)
            if n in shapes else None for n in ("weight", "bias"))
    if density < 1.0:
        x = sparse_input(shapes["input"], density, seed)
    return x, w, b


def check(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest error relative to the largest magnitude; raises if above :data:`RTOL`."""
    if got.shape != want.shape:
        raise BenchError(f"{name}: zeroskip returned shape {tuple(got.shape)}, torch "
                         f"{tuple(want.shape)}")
    error = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    if not error <= RTOL:
        raise BenchError(f"{name}: zeroskip differs from torch by {error:.3g} of the largest "
                         f"magnitude (tolerance {RTOL:g})")
    return error


def _require_kernel(name: str, before: dict, after: dict) -> None:
    """Between the ``stats`` snapshots, a generated kernel ran and nothing fell back."""
    if after["fallback_calls"] > before["fallback_calls"] or \
            after["kernel_calls"] == before["kernel_calls"]:
        raise BenchError(f"{name}: zeroskip did not run a generated kernel (it fell back to "
                         "torch's op)")


def _checked_call(name: str, fn: Callable[[], torch.Tensor], want: torch.Tensor) -> float:
    """Run zeroskip's ``fn`` once: its result must match ``want`` and come from a kernel."""
    before = stats.stats()
    error = check(name, fn(), want)
    _require_kernel(name, before, stats.stats())
    return error


@contextlib.contextmanager
def _spied_calls() -> Iterator[list[ops.Call]]:
    """Collect the prepared operators (``ops.Call``) that run meanwhile. The one a call ran
    through says in ``last`` what its dispatch chose; spying finds that operator exactly, where
    matching the entries of ``ops._calls`` by spec could find several."""
    ran: list[ops.Call] = []
    run = ops.Call.run

    def spy(call: ops.Call, *args):
        ran.append(call)
        return run(call, *args)
    ops.Call.run = spy
    try:
        yield ran
    finally:
        ops.Call.run = run


def _checked_dispatch(name: str, fn: Callable[[], torch.Tensor],
                      want: torch.Tensor) -> tuple[float, ops.Call]:
    """Run zeroskip's ``fn`` once: its result must match ``want`` and come from its layer's
    dispatch, which must have run a generated kernel, or torch's op where the tuning database
    chose torch for this input (then zeroskip legitimately is torch). Returns the error and the
    operator that ran, whose ``last`` says what it ran."""
    with _spied_calls() as ran:
        before = stats.stats()
        got = fn()
        after = stats.stats()
    error = check(name, got, want)
    if not ran:
        raise BenchError(f"{name}: zeroskip did not run a generated kernel (it fell back to "
                         "torch's op)")
    if ran[-1].last != "torch":
        _require_kernel(name, before, after)
    return error, ran[-1]


def wide_3x3(spec: LayerSpec) -> bool:
    """A 2-D 3x3 layer (ungrouped) with at least 64 channels in and out: the layers the issue's
    goals for the sparse kernel are about."""
    return spec.kernel_size == (3, 3) and spec.groups == 1 and \
        min(spec.in_channels, spec.out_channels) >= 64


@dataclass
class Row:
    """The figures of one layer on an input of one density (times in milliseconds, per call,
    medians). Non-zero MACs skip the activation zeros too: ``nonzero_macs(spec) * density``."""

    name: str
    family: str
    dense: bool
    shape: str
    torch_ms: float
    zeroskip_ms: float
    gflops: float           # 2 * non-zero MACs / zeroskip time
    skipped: float          # 1 - non-zero MACs / dense MACs
    compile_s: float | None     # spec -> loaded kernel on an empty cache (None in sweeps)
    nonzero_macs: int
    dense_macs: int
    error: float            # max |zeroskip - torch| / max |torch|
    contention: float | None    # share of the bench's CPUs others took while timing
    density: float          # share of non-zeros in the input (1: random normal)
    strategy: str           # what zeroskip's dispatch ran: dense, sparse, a variant, torch
    dense_ms: float | None  # the generated dense kernel, timed at density 1 only
    wide_3x3: bool          # see :func:`wide_3x3`

    @property
    def ratio(self) -> float:
        """torch time / zeroskip time: above 1, zeroskip is faster."""
        return self.torch_ms / self.zeroskip_ms

    @property
    def dense_ratio(self) -> float | None:
        """torch time / the generated dense kernel's time (density 1 only)."""
        return None if self.dense_ms is None else self.torch_ms / self.dense_ms


def _calls(spec: LayerSpec, x, w, b) -> tuple[Callable[[], torch.Tensor], ...]:
    """``(torch's call, zeroskip's call)`` of the spec's op on the operands."""
    kwargs = call_args(spec)
    torch_fn, zs_fn = getattr(F, spec.torch_name), getattr(Z, spec.torch_name)
    return (lambda: torch_fn(x, w, b, **kwargs)), (lambda: zs_fn(x, w, b, **kwargs))


def _dense_kernel_call(call: ops.Call, x, w, b) -> Callable[[], torch.Tensor]:
    """The layer's generated dense kernel launched as ``Call.run`` launches it, the dispatch
    bypassed: what the dense goal measures where the dispatch chose something else."""
    return lambda: call.launch(call.forward, x, w, b)


def _timed_row(layer: Layer, spec: LayerSpec, density: float, compile_s: float | None,
               repeats: int, min_time: float) -> Row:
    """Check, then time, the layer against torch on an input of ``density``; at density 1,
    where the dispatch ran something other than the dense kernel, that kernel is timed too."""
    x, w, b = operands(spec, density=density)
    torch_call, zs_call = _calls(spec, x, w, b)
    error, call = _checked_dispatch(layer.name, zs_call, torch_call())
    strategy = call.last
    fns = {"torch": torch_call, "zeroskip": zs_call}
    if density == 1.0 and strategy != "dense":
        fns["dense kernel"] = _dense_kernel_call(call, x, w, b)
    timing = time_interleaved(fns, repeats, min_time)
    times = timing.seconds
    dense_s = times.get("dense kernel", times["zeroskip"]) if density == 1.0 else None
    nonzero, dense = round(nonzero_macs(spec) * density), dense_macs(spec)
    return Row(layer.name, layer.family, layer.dense, spec.describe(),
               torch_ms=times["torch"] * 1e3, zeroskip_ms=times["zeroskip"] * 1e3,
               gflops=2 * nonzero / times["zeroskip"] / 1e9, skipped=1 - nonzero / dense,
               compile_s=compile_s, nonzero_macs=nonzero, dense_macs=dense, error=error,
               contention=timing.contention, density=density, strategy=strategy,
               dense_ms=None if dense_s is None else dense_s * 1e3,
               wide_3x3=wide_3x3(spec))


def bench_layer(layer: Layer, batch: int = 1, repeats: int = REPEATS,
                min_time: float = MIN_TIME_S, density: float = 1.0) -> Row:
    """Check, then time, one layer against torch on an input of ``density``, with the cold
    compile time of its kernel."""
    spec = dataclasses.replace(layer.spec, batch=batch)
    return _timed_row(layer, spec, density, cold_compile_seconds(spec), repeats, min_time)


def sweep_layer(layer: Layer, densities: tuple[float, ...] = SWEEP_DENSITIES, batch: int = 1,
                repeats: int = REPEATS, min_time: float = MIN_TIME_S) -> list[Row]:
    """Check, then time, one layer against torch at each input density (no cold compile: that
    is :func:`bench_layer`'s figure, the same at every density)."""
    spec = dataclasses.replace(layer.spec, batch=batch)
    return [_timed_row(layer, spec, density, None, repeats, min_time) for density in densities]


@dataclass
class Overhead:
    """Per-call times (microseconds) of a tiny layer: ``zeroskip.functional``, its bare kernel
    (``lib.run`` on preallocated tensors, with ``kernel_threads`` threads) and torch."""

    shape: str
    functional_us: float
    kernel_us: float
    torch_us: float
    kernel_threads: int
    contention: float | None

    @property
    def overhead_us(self) -> float:
        return self.functional_us - self.kernel_us


def _launch_threads(kernel: ops.Kernel, call: Callable[[], object]) -> int:
    """The thread count that ``call`` passes to ``kernel``'s entry point."""
    seen = []
    run = kernel.lib.run
    kernel.lib.run = lambda *args: seen.append(args[1]) or run(*args)
    try:
        call()
    finally:
        kernel.lib.run = run
    return seen[0]


def measure_overhead(repeats: int = REPEATS, min_time: float = MIN_TIME_S,
                     spec: LayerSpec = TINY) -> Overhead:
    """Time ``zeroskip.functional`` against its bare kernel (run as ``functional`` runs it, on
    preallocated tensors) and torch on ``spec``."""
    x, w, b = operands(spec)
    torch_call, zs_call = _calls(spec, x, w, b)
    want = torch_call()
    _checked_call("overhead layer", zs_call, want)
    kernel = ops.kernel_for(spec)
    packed, out = kernel.pack(w, b), torch.empty(spec.output_shape)
    run = kernel.lib.run
    args = (spec.batch, _launch_threads(kernel, zs_call), x.data_ptr(), packed.data_ptr(),
            w.data_ptr(), out.data_ptr())
    run(*args)
    check("overhead layer (bare kernel)", out, want)
    timing = time_interleaved({"functional": zs_call, "kernel": lambda: run(*args),
                               "torch": torch_call}, repeats, min_time)
    times = timing.seconds
    return Overhead(spec.describe(), times["functional"] * 1e6, times["kernel"] * 1e6,
                    times["torch"] * 1e6, args[1], timing.contention)


# --------------------------------------------------------------------------------- report
def machine() -> dict:
    """Where the figures were taken."""
    command, flags = cc.compiler()
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu": cc.cpu_target(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "load_avg": round(os.getloadavg()[0], 2),
            "torch": torch.__version__,
            "zeroskip": __version__, "python": platform.python_version(),
            "compiler": cc.identity(command).splitlines()[0], "flags": list(flags)}


def geomean(values: list[float]) -> float | None:
    return math.exp(statistics.fmean(map(math.log, values))) if values else None


def _header(m: dict, batch: int, repeats: int) -> str:
    """The first line of a table: what ran, where and how."""
    return (f"zeroskip {m['zeroskip']} vs torch {m['torch']}, {m['date']}, {m['cpu']}, "
            f"{m['threads']} threads (load average {m['load_avg']} on {m['cpu_count']} "
            f"CPUs), batch {batch}, median of {repeats}"
            + ("" if m.get("malloc_pinned") else ", malloc thresholds not pinned"))


@dataclass
class Report:
    rows: list[Row]
    overhead: Overhead
    machine: dict
    batch: int
    repeats: int

    @property
    def geomean_dense(self) -> float | None:
        """Geometric mean of the ratios over the ordinary dense convs."""
        return geomean([r.ratio for r in self.rows if r.dense])

    @property
    def geomean_all(self) -> float | None:
        return geomean([r.ratio for r in self.rows])

    def goals(self) -> list[tuple[str, float, bool, bool]]:
        """``(goal, measured value, met, measured under load)`` for each speed goal the run
        measured."""
        o = self.overhead
        found = [("per-call overhead <= 20 us above the kernel", o.overhead_us,
                  o.overhead_us <= 20, busy(o.contention))]
        if self.rows:
            worst = max(self.rows, key=lambda r: r.compile_s)
            found.append(("cold compile <= 2 s per kernel (slowest)", worst.compile_s,
                          worst.compile_s <= 2, False))
        for r in self.rows:
            if r.family == "convT1d-long":
                found.append((f"{r.name} >= 2x torch", r.ratio, r.ratio >= 2,
                              busy(r.contention)))
        if self.geomean_dense is not None:
            found.append(("geomean over dense layers >= 0.5x torch", self.geomean_dense,
                          self.geomean_dense >= 0.5,
                          any(busy(r.contention) for r in self.rows if r.dense)))
        return found

    def to_json(self) -> str:
        rows = [{**dataclasses.asdict(r), "ratio": r.ratio} for r in self.rows]
        overhead = {**dataclasses.asdict(self.overhead), "overhead_us": self.overhead.overhead_us}
        return json.dumps({"machine": self.machine, "batch": self.batch, "repeats": self.repeats,
                           "rows": rows, "geomean_dense": self.geomean_dense,
                           "geomean_all": self.geomean_all, "overhead": overhead,
                           "goals": [{"goal": g, "value": v, "met": m, "under_load": u}
                                     for g, v, m, u in self.goals()]}, indent=1)

    def markdown(self) -> str:
        lines = [_header(self.machine, self.batch, self.repeats), "",
                 "| layer | shape | torch ms | zeroskip ms | ratio | GFLOP/s | skipped "
                 "| compile s | strategy |",
                 "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for r in self.rows:
            lines.append(f"| {r.name} | {r.shape} | {r.torch_ms:.3f} | {r.zeroskip_ms:.3f} "
                         f"| {r.ratio:.2f}x{_mark(r.contention)} | {r.gflops:.1f} "
                         f"| {r.skipped:.1%} "
                         f"| {r.compile_s:.2f} | {r.strategy} |")
        lines.append("")
        for label, value, count in (("dense layers", self.geomean_dense,
                                     sum(r.dense for r in self.rows)),
                                    ("all layers", self.geomean_all, len(self.rows))):
            if value is not None:
                lines.append(f"- geomean ratio over {label} ({count}): {value:.2f}x")
        o = self.overhead
        lines.append(f"- per-call overhead on {o.shape}: zeroskip.functional "
                     f"{o.functional_us:.1f} us, bare kernel {o.kernel_us:.1f} us "
                     f"({o.kernel_threads} thread{'s' if o.kernel_threads > 1 else ''}) -> "
                     f"{o.overhead_us:.1f} us overhead{_mark(o.contention)}; torch "
                     f"{o.torch_us:.1f} us")
        if self.rows:
            times = [r.compile_s for r in self.rows]
            lines.append(f"- cold compile: median {statistics.median(times):.2f} s, "
                         f"max {max(times):.2f} s")
        lines += _load_note([x.contention for x in (*self.rows, o)])
        lines += _goal_table(self.goals())
        return "\n".join(lines)


def _load_note(contentions: list[float | None]) -> list[str]:
    """The footnote for timings marked '*' (none when no timing was disturbed)."""
    shares = [c for c in contentions if busy(c)]
    if not shares:
        return []
    return [f"- *: other processes took up to {max(shares):.0%} of the bench's CPUs while this "
            f"was timed ({len(shares)} of {len(contentions)}): unreliable, rerun on a quiet "
            "machine"]


def _goal_table(goals) -> list[str]:
    """The goals as a markdown table: goal, measured, met ('*': measured under load)."""
    return ["", "| goal | measured | met |", "|---|---:|---|"] + [
        f"| {g} | {v:.2f} | {'yes' if met else 'NO'}{' *' if load else ''} |"
        for g, v, met, load in goals]


def _mark(contention: float | None) -> str:
    return " *" if busy(contention) else ""


def _each_layer(layers: list[Layer], bench_one: Callable, note: Callable,
                log: TextIO | None) -> list:
    """``bench_one(layer)`` for each layer; ``log`` gets one line per layer: its name, then
    ``note(row)`` and the seconds it took."""
    rows = []
    for i, layer in enumerate(layers, 1):
        start = time.perf_counter()
        rows.append(bench_one(layer))
        if log:
            print(f"[{i}/{len(layers)}] {layer.name}: {note(rows[-1])} "
                  f"({time.perf_counter() - start:.1f} s)", file=log, flush=True)
    return rows


def _forward_note(row) -> str:
    busy_note = f", others took {row.contention:.0%} of its CPUs" if busy(row.contention) else ""
    return f"{row.ratio:.2f}x{busy_note}"


def _backward_note(row) -> str:
    notes = [f"others took {c:.0%} of its CPUs" for c in
             (row.contention, row.grad_input_contention) if busy(c)][:1]
    if row.grad_input_ratio is not None:
        notes.insert(0, f"grad_input {row.grad_input_ratio:.2f}x")
    return f"fwd+bwd {row.ratio:.2f}x{''.join(', ' + n for n in notes)}"


def run(layers: list[Layer], batch: int = 1, repeats: int = REPEATS,
        min_time: float = MIN_TIME_S, log: TextIO | None = None) -> Report:
    """Benchmark ``layers`` and the per-call overhead (with :func:`steady_allocator`); ``log``
    gets one line per layer."""
    pinned = steady_allocator()
    rows = _each_layer(layers, lambda layer: bench_layer(layer, batch, repeats, min_time),
                       _forward_note, log)
    overhead = measure_overhead(repeats, min_time)
    return Report(rows, overhead, {**machine(), "malloc_pinned": pinned}, batch, repeats)


# --------------------------------------------------------------------------------- densities
def _at(rows: list[Row], density: float) -> list[Row]:
    return [r for r in rows if math.isclose(r.density, density)]


def _goal(goal: str, value: float, met: bool, rows: list[Row]) -> tuple[str, float, bool, bool]:
    """A goal's line: measured under load when any of the ``rows`` it comes from was."""
    return goal, value, met, any(busy(r.contention) for r in rows)


@dataclass
class SweepReport:
    """A density sweep: one row per layer and input density, in the order they ran."""

    rows: list[Row]
    machine: dict
    batch: int
    repeats: int

    @property
    def densities(self) -> list[float]:
        """The swept densities, highest first."""
        return sorted({r.density for r in self.rows}, reverse=True)

    def geomean_at(self, density: float) -> float | None:
        """Geometric mean of the ratios at ``density`` over every layer."""
        return geomean([r.ratio for r in _at(self.rows, density)])

    def crossovers(self) -> dict[str, float]:
        """Per :func:`wide_3x3` layer: the highest swept density at which its dispatch ran the
        sparse kernel and was at least as fast as torch (0: at none)."""
        found: dict[str, float] = {}
        for r in self.rows:
            if r.wide_3x3:
                won = r.strategy.startswith("sparse") and r.ratio >= 1
                found[r.name] = max(found.get(r.name, 0.0), r.density if won else 0.0)
        return found

    def goals(self) -> list[tuple[str, float, bool, bool]]:
        """``(goal, measured value, met, measured under load)`` for each of the issue's goals
        that the swept layers and densities measure, computed from the rows."""
        found = []
        if self.rows:
            worst = min(self.rows, key=lambda r: r.ratio)
            found.append(_goal("tuned dispatch >= 0.95x torch at every density on every layer "
                               "(worst)", worst.ratio, worst.ratio >= 0.95, [worst]))
        sparse = _at(self.rows, 0.3)
        if sparse:
            value = self.geomean_at(0.3)
            found.append(_goal("geomean at density 0.3 >= 1.5x", value, value >= 1.5, sparse))
        wide = [r for r in self.rows if r.wide_3x3]
        for density, target in ((0.1, 4), (0.05, 6)):
            rows = _at(wide, density)
            if rows:
                worst = min(rows, key=lambda r: r.ratio)
                found.append(_goal(f"3x3 layers with >= 64 channels: >= {target}x at density "
                                   f"{density:g} (worst)", worst.ratio, worst.ratio >= target,
                                   [worst]))
        crossovers = self.crossovers()
        if crossovers:
            lowest = min(crossovers.values())
            found.append(_goal("crossover of the sparse kernel vs torch at density >= 0.4 "
                               "(lowest over 3x3 layers with >= 64 channels)", lowest,
                               lowest >= 0.4, wide))
        dense = [r for r in _at(self.rows, 1.0) if r.dense and r.dense_ratio]
        if dense:
            value = geomean([r.dense_ratio for r in dense])
            found.append(_goal("generated dense kernel geomean >= 0.7x torch on dense layers "
                               "(density 1)", value, value >= 0.7, dense))
        return found

    def to_json(self) -> str:
        rows = [{**dataclasses.asdict(r), "ratio": r.ratio} for r in self.rows]
        return json.dumps({"machine": self.machine, "batch": self.batch, "repeats": self.repeats,
                           "densities": self.densities, "rows": rows,
                           "geomean_by_density": {f"{d:g}": self.geomean_at(d)
                                                  for d in self.densities},
                           "crossovers": self.crossovers(),
                           "goals": [{"goal": g, "value": v, "met": m, "under_load": u}
                                     for g, v, m, u in self.goals()]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "SweepReport":
        """A report read back from :meth:`to_json` (to plot or compare a saved run)."""
        data = json.loads(text)
        names = [f.name for f in dataclasses.fields(Row)]
        return cls([Row(**{n: row[n] for n in names}) for row in data["rows"]],
                   data["machine"], data["batch"], data["repeats"])

    def markdown(self) -> str:
        lines = [_header(self.machine, self.batch, self.repeats)
                 + "; ReLU-like inputs of each density (1: random normal)", "",
                 "| layer | density | torch ms | zeroskip ms | ratio | strategy | GFLOP/s "
                 "| MACs skipped |",
                 "|---|---:|---:|---:|---:|---|---:|---:|"]
        for r in self.rows:
            lines.append(f"| {r.name} | {r.density:g} | {r.torch_ms:.3f} | {r.zeroskip_ms:.3f} "
                         f"| {r.ratio:.2f}x{_mark(r.contention)} | {r.strategy} "
                         f"| {r.gflops:.1f} | {r.skipped:.1%} |")
        lines.append("")
        for density in self.densities:
            count = len(_at(self.rows, density))
            lines.append(f"- geomean ratio at density {density:g} over {count} layer"
                         f"{'s' if count > 1 else ''}: {self.geomean_at(density):.2f}x")
        crossovers = self.crossovers()
        if crossovers:
            lines.append("- crossover of the sparse kernel vs torch (highest swept density at "
                         "which it ran and was at least as fast): "
                         + ", ".join(f"{name} {d:g}" for name, d in crossovers.items()))
        lines += _load_note([r.contention for r in self.rows])
        lines += _goal_table(self.goals())
        return "\n".join(lines)


SPEEDUP_TICKS = (0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 7, 10, 15, 20, 30, 50, 100)


def plot(report: SweepReport, path: Path | str) -> Path:
    """Write a PNG of the speed-up over torch against input density, one line per layer:
    density falls from 1 on the left, both axes logarithmic (2x and 0.5x equally far from the
    dashed line at 1, as fast as torch). Drawn on a bare ``Figure`` (the Agg canvas), so no
    pyplot state or display is involved."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    fig = Figure(figsize=(11, 6), layout="constrained")
    ax = fig.subplots()
    names = list(dict.fromkeys(r.name for r in report.rows))
    for i, name in enumerate(names):
        rows = sorted((r for r in report.rows if r.name == name), key=lambda r: -r.density)
        ax.plot([r.density for r in rows], [r.ratio for r in rows], label=name,
                marker="os^Dv"[i // 10 % 5], markersize=4, linewidth=1.2)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    densities = report.densities
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(max(densities) * 1.1, min(densities) / 1.1)
    ax.xaxis.set_major_locator(FixedLocator(densities))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_major_locator(FixedLocator(SPEEDUP_TICKS))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xlabel("input density (share of non-zeros)")
    ax.set_ylabel("speed-up over torch (torch ms / zeroskip ms)")
    m = report.machine
    ax.set_title(f"zeroskip {m['zeroskip']} vs torch {m['torch']}, {m['cpu']}, "
                 f"{m['threads']} threads, batch {report.batch}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


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
    per_layer = _each_layer(
        layers, lambda layer: sweep_layer(layer, densities, batch, repeats, min_time),
        _sweep_note, log)
    return SweepReport([row for rows in per_layer for row in rows],
                       {**machine(), "malloc_pinned": pinned}, batch, repeats)


# --------------------------------------------------------------------------------- backward
def train_operands(spec: LayerSpec, seed: int = 0) -> tuple:
    """Random ``(input, weight, bias or None, grad_output)`` for one training step: the input
    requires grad, the weight and bias are trainable ``nn.Parameter``s (zeroskip caches their
    packing while they are unchanged), ``grad_output`` has the output's shape."""
    gen = torch.Generator().manual_seed(seed)
    shapes = spec.input_shapes
    x = torch.randn(shapes["input"], generator=gen).requires_grad_()
    w, b = (torch.nn.Parameter(torch.randn(shapes[n], generator=gen)) if n in shapes else None
            for n in ("weight", "bias"))
    return x, w, b, torch.randn(spec.output_shape, generator=gen)


GRADS = ("output", "input gradient", "weight gradient", "bias gradient")


def _step(fn: Callable, kwargs: dict, x, w, b, g) -> Callable[[], tuple]:
    """One training step of ``fn`` alone: forward, ``backward(g)``, then the gradients set to
    None (as ``zero_grad`` does) so that the next step accumulates nothing. Returns the output
    and the three gradients (the bias one None without a bias)."""
    params = (x, w) if b is None else (x, w, b)

    def step() -> tuple:
        out = fn(x, w, b, **kwargs)
        out.backward(g)
        grads = tuple(p.grad for p in params)
        for p in params:
            p.grad = None
        return (out.detach(), *grads, None)[:4]
    return step


def strided_conv(spec: LayerSpec) -> bool:
    """The transposed case: a conv with a stride above 1, whose input gradient is a strided
    transposed convolution (``conv_grad_input``: zeros between the gradient's elements)."""
    return spec.op == "conv" and any(s > 1 for s in spec.stride)


def grad_input_calls(spec: LayerSpec, w: torch.Tensor, g: torch.Tensor) -> tuple:
    """``(torch's call, zeroskip's call)`` of the input gradient alone:
    ``torch.nn.grad.conv{N}d_input`` and the kernel of ``spec.grad_input()``."""
    kwargs = call_args(spec)
    torch_fn = getattr(torch.nn.grad, f"conv{spec.rank}d_input")
    size, w_plain, grad_spec = spec.input_shapes["input"], w.detach(), spec.grad_input()
    return ((lambda: torch_fn(size, w_plain, g, **kwargs)),
            (lambda: ops.run_spec(grad_spec, {"grad_output": g, "weight": w})))


@dataclass
class BackwardRow:
    """The figures of one layer's training step (times in milliseconds, medians). MACs count
    the forward, the input gradient and the weight gradient together; ``grad_input_*`` is the
    input gradient alone, timed for :func:`strided_conv` layers only (None elsewhere)."""

    name: str
    family: str
    dense: bool
    shape: str
    torch_ms: float
    zeroskip_ms: float
    nonzero_macs: int
    dense_macs: int
    error: float            # worst of the output and the gradients, relative to torch's max
    contention: float | None
    grad_input_nonzero_macs: int
    grad_input_dense_macs: int
    grad_input_torch_ms: float | None = None
    grad_input_zeroskip_ms: float | None = None
    grad_input_contention: float | None = None

    @property
    def ratio(self) -> float:
        """torch time / zeroskip time of the step: above 1, zeroskip is faster."""
        return self.torch_ms / self.zeroskip_ms

    @property
    def skipped(self) -> float:
        return 1 - self.nonzero_macs / self.dense_macs

    @property
    def grad_input_skipped(self) -> float:
        return 1 - self.grad_input_nonzero_macs / self.grad_input_dense_macs

    @property
    def grad_input_ratio(self) -> float | None:
        if self.grad_input_zeroskip_ms is None or self.grad_input_torch_ms is None:
            return None
        return self.grad_input_torch_ms / self.grad_input_zeroskip_ms


def _checked_step(name: str, step: Callable[[], tuple], want: tuple) -> float:
    """Run zeroskip's training ``step`` once: the output and every gradient must match torch's
    ``want``, and the forward and both gradients must have run generated kernels."""
    before = stats.stats()
    got = step()
    after = stats.stats()
    errors = []
    for what, a, b in zip(GRADS, got, want):
        if (a is None) != (b is None):
            raise BenchError(f"{name}: zeroskip returned {'no' if a is None else 'a'} {what}, "
                             f"torch {'none' if b is None else 'one'}")
        if a is not None:
            errors.append(check(f"{name}: {what}", a, b))
    if after["fallback_calls"] > before["fallback_calls"] or \
            after["kernel_calls"] - before["kernel_calls"] < 3:
        raise BenchError(f"{name}: zeroskip did not run generated kernels for the forward and "
                         "both gradients (it fell back to torch's op)")
    return max(errors)


def bench_backward_layer(layer: Layer, batch: int = 1, repeats: int = REPEATS,
                         min_time: float = MIN_TIME_S) -> BackwardRow:
    """Check, then time, one training step of the layer against torch; for strided convs also
    the input gradient alone."""
    spec = dataclasses.replace(layer.spec, batch=batch)
    x, w, b, g = train_operands(spec)
    kwargs = call_args(spec)
    torch_step = _step(getattr(F, spec.torch_name), kwargs, x, w, b, g)
    zs_step = _step(getattr(Z, spec.torch_name), kwargs, x, w, b, g)
    error = _checked_step(layer.name, zs_step, torch_step())
    timing = time_interleaved({"torch": torch_step, "zeroskip": zs_step}, repeats, min_time)
    specs = (spec, spec.grad_input(), spec.grad_weight())
    row = BackwardRow(layer.name, layer.family, layer.dense, spec.describe(),
                      timing.seconds["torch"] * 1e3, timing.seconds["zeroskip"] * 1e3,
                      sum(map(nonzero_macs, specs)), sum(map(dense_macs, specs)), error,
                      timing.contention, nonzero_macs(specs[1]), dense_macs(specs[1]))
    if strided_conv(spec):
        torch_call, zs_call = grad_input_calls(spec, w, g)
        row.error = max(error, _checked_call(f"{layer.name}: input gradient alone", zs_call,
                                             torch_call()))
        timing = time_interleaved({"torch": torch_call, "zeroskip": zs_call}, repeats, min_time)
        row.grad_input_torch_ms = timing.seconds["torch"] * 1e3
        row.grad_input_zeroskip_ms = timing.seconds["zeroskip"] * 1e3
        row.grad_input_contention = timing.contention
    return row


@dataclass
class BackwardReport:
    rows: list[BackwardRow]
    machine: dict
    batch: int
    repeats: int

    @property
    def geomean_all(self) -> float | None:
        """Geometric mean of the training-step ratios over every layer."""
        return geomean([r.ratio for r in self.rows])

    @property
    def geomean_dense(self) -> float | None:
        return geomean([r.ratio for r in self.rows if r.dense])

    @property
    def geomean_grad_input(self) -> float | None:
        """Geometric mean of the input-gradient ratios over the strided convs."""
        return geomean([r.grad_input_ratio for r in self.rows if r.grad_input_ratio])

    def to_json(self) -> str:
        rows = [{**dataclasses.asdict(r), "ratio": r.ratio, "skipped": r.skipped,
                 "grad_input_skipped": r.grad_input_skipped,
                 "grad_input_ratio": r.grad_input_ratio} for r in self.rows]
        return json.dumps({"machine": self.machine, "batch": self.batch, "repeats": self.repeats,
                           "backward": {"rows": rows, "geomean_all": self.geomean_all,
                                        "geomean_dense": self.geomean_dense,
                                        "geomean_grad_input": self.geomean_grad_input}},
                          indent=1)

    def markdown(self) -> str:
        lines = [_header(self.machine, self.batch, self.repeats)
                 + "; one training step per call: forward + backward", "",
                 "| layer | shape | torch ms | zeroskip ms | ratio | skipped "
                 "| grad_input skipped | grad_input ratio |",
                 "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in self.rows:
            gi = ("| - | - |" if r.grad_input_ratio is None else
                  f"| {r.grad_input_skipped:.1%} "
                  f"| {r.grad_input_ratio:.2f}x{_mark(r.grad_input_contention)} |")
            lines.append(f"| {r.name} | {r.shape} | {r.torch_ms:.3f} | {r.zeroskip_ms:.3f} "
                         f"| {r.ratio:.2f}x{_mark(r.contention)} | {r.skipped:.1%} {gi}")
        lines.append("")
        for label, value, count in (
                ("dense layers", self.geomean_dense, sum(r.dense for r in self.rows)),
                ("all layers", self.geomean_all, len(self.rows))):
            if value is not None:
                lines.append(f"- geomean fwd+bwd ratio over {label} ({count}): {value:.2f}x")
        strided = [r for r in self.rows if r.grad_input_ratio is not None]
        if strided:
            lines.append(f"- geomean grad_input ratio over strided convs ({len(strided)}): "
                         f"{self.geomean_grad_input:.2f}x")
        lines.append("- the weights are the same in every step, so zeroskip reuses their packed "
                     "layouts (forward and grad_input kernels); after a real optimizer step it "
                     "repacks them once per step, which these times leave out")
        lines += _load_note([r.contention for r in self.rows] +
                            [r.grad_input_contention for r in strided])
        return "\n".join(lines)


def run_backward(layers: list[Layer], batch: int = 1, repeats: int = REPEATS,
                 min_time: float = MIN_TIME_S, log: TextIO | None = None) -> BackwardReport:
    """Benchmark one training step of each of ``layers`` (with :func:`steady_allocator`);
    ``log`` gets one line per layer."""
    pinned = steady_allocator()
    rows = _each_layer(layers,
                       lambda layer: bench_backward_layer(layer, batch, repeats, min_time),
                       _backward_note, log)
    return BackwardReport(rows, {**machine(), "malloc_pinned": pinned}, batch, repeats)


# --------------------------------------------------------------------------------- GPU
# ``zeroskip bench --device cuda``: the suite's Triton kernels against torch (cuDNN) on a GPU.
GPU_DTYPES = ("float32", "float16", "bfloat16")
GPU_BATCH = 32
SPARSE_DENSITY = 0.1        # the block-sparse rows: 90% zeros
SPARSE_BLOCK = 64           # channels per block of the structured pattern
GPU_KINDS = ("forward", "grad_input", "grad_weight", "sparse-blocks", "sparse-random")
GPU_PATTERN_NOTE = (
    f"sparse-blocks: the block-sparse kernel on a structured input with "
    f"{1 - SPARSE_DENSITY:.0%} zeros: at each (sample, position), each block of "
    f"{SPARSE_BLOCK} input channels (all of them where fewer) is zero with probability "
    f"{1 - SPARSE_DENSITY:.0%} and random normal otherwise, so {1 - SPARSE_DENSITY:.0%} of the "
    f"(BLOCK_K channels x position) blocks the kernel tests are zero (BLOCK_K <= "
    f"{SPARSE_BLOCK}); sparse-random: the same kernel on {1 - SPARSE_DENSITY:.0%} zeros at "
    "random places (ReLU-like, unstructured: almost no block is all zeros, so it shows the "
    "kernel's cost where its skipping does not apply); torch runs its dense op on the same "
    "input in both")


class GpuUnavailable(BenchError):
    """The GPU bench cannot run here (no CUDA GPU, no Triton, or Triton's interpreter)."""


@dataclass
class GpuRow:
    """One Triton kernel of one layer in one dtype against torch's op (milliseconds per call:
    the median over rounds of ``triton.testing.do_bench``'s median). ``kind``: see
    :data:`GPU_KINDS`; ``op``, ``kernel_size``, ``stride`` and ``dense`` describe the suite's
    layer, ``shape`` the operator timed. ``failure`` says why a row has no times."""

    name: str
    family: str
    kind: str
    dtype: str
    shape: str
    op: str
    kernel_size: tuple
    stride: tuple
    dense: bool
    density: float
    torch_ms: float | None
    zeroskip_ms: float | None
    config: str             # the Triton choice timed: 'dense/m64n64k32w4s3', 'sparse/...'
    tuned: bool             # the config came from the tuning database (else: the default)
    error: float | None     # max |zeroskip - torch| / max |torch|
    failure: str | None = None

    @property
    def ratio(self) -> float | None:
        """torch time / zeroskip time: above 1, zeroskip is faster."""
        if self.failure or not self.torch_ms or not self.zeroskip_ms:
            return None
        return self.torch_ms / self.zeroskip_ms


def _gpu_goals() -> list[tuple[str, float, Callable[[GpuRow], bool]]]:
    """The issue's GPU goals: ``(goal, target ratio, which rows it is about)``."""
    return [
        ("transposed conv on small feature maps (DCGAN and U-Net decoder layers)", 1.3,
         lambda r: r.kind == "forward" and r.op == "conv_transpose"
         and r.family in ("dcgan", "unet-dec")),
        ("conv_grad_input of stride-2 convs", 1.2,
         lambda r: r.kind == "grad_input" and r.op == "conv" and 2 in tuple(r.stride)),
        ("dense 3x3 layers", 0.8,
         lambda r: r.kind == "forward" and r.dense and tuple(r.kernel_size) == (3, 3)),
        (f"block-sparse at {1 - SPARSE_DENSITY:.0%} zeros (block-structured)", 2.0,
         lambda r: r.kind == "sparse-blocks"),
    ]


@dataclass
class GpuReport:
    rows: list[GpuRow]
    machine: dict
    batch: int
    repeats: int

    @property
    def dtypes(self) -> list[str]:
        return list(dict.fromkeys(r.dtype for r in self.rows))

    @property
    def failures(self) -> list[GpuRow]:
        return [r for r in self.rows if r.failure]

    def geomean(self, kind: str, dtype: str) -> float | None:
        return geomean([r.ratio for r in self.rows
                        if r.kind == kind and r.dtype == dtype and r.ratio])

    def goals(self) -> list[tuple[str, float, bool, bool]]:
        """``(goal, measured value, met, measured under load)`` for each of the issue's GPU
        goals the rows measure, per dtype: the geometric mean of torch/zeroskip over the rows
        the goal is about. A goal with a failed row among them is not met."""
        found = []
        for goal, target, about in _gpu_goals():
            for dtype in self.dtypes:
                rows = [r for r in self.rows if r.dtype == dtype and about(r)]
                timed = [r.ratio for r in rows if r.ratio]
                if not timed:
                    continue
                value = geomean(timed)
                failed = len(rows) - len(timed)
                note = f", {failed} failed" if failed else ""
                found.append((f"{goal} >= {target:g}x cuDNN ({dtype}, geomean over "
                              f"{len(timed)}{note})", value, value >= target and not failed,
                              False))
        return found

    def to_json(self) -> str:
        rows = [{**dataclasses.asdict(r), "ratio": r.ratio} for r in self.rows]
        return json.dumps({"machine": self.machine, "batch": self.batch, "repeats": self.repeats,
                           "device": "cuda", "patterns": GPU_PATTERN_NOTE, "rows": rows,
                           "geomeans": {f"{kind}/{dtype}": self.geomean(kind, dtype)
                                        for kind in GPU_KINDS for dtype in self.dtypes},
                           "goals": [{"goal": g, "value": v, "met": m, "under_load": u}
                                     for g, v, m, u in self.goals()]}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "GpuReport":
        data = json.loads(text)
        names = [f.name for f in dataclasses.fields(GpuRow)]
        rows = []
        for row in data["rows"]:
            values = {n: row.get(n) for n in names}
            values["kernel_size"] = tuple(values["kernel_size"])
            values["stride"] = tuple(values["stride"])
            rows.append(GpuRow(**values))
        return cls(rows, data["machine"], data["batch"], data["repeats"])

    def markdown(self) -> str:
        m = self.machine
        tf32 = "TF32" if m.get("tf32") else "IEEE float32"
        lines = [f"zeroskip {m.get('zeroskip')} Triton kernels vs torch {m.get('torch')} "
                 f"(cuDNN {m.get('cudnn')}), {m.get('date')}, {m.get('gpu')} (compute "
                 f"capability {m.get('capability')}, {m.get('sms')} SMs), CUDA {m.get('cuda')}, "
                 f"Triton {m.get('triton')}, batch {self.batch}, float32 as {tf32} on both "
                 f"sides; per call: median of {self.repeats} rounds of triton.testing.do_bench's "
                 "median (L2 flushed before each call); every result checked against torch "
                 "first", "",
                 "| layer | kind | dtype | torch ms | zeroskip ms | ratio | config |",
                 "|---|---|---|---:|---:|---:|---|"]
        for r in self.rows:
            if r.failure:
                lines.append(f"| {r.name} | {r.kind} | {r.dtype} | - | - | FAILED | "
                             f"{_cell(r.failure)} |")
                continue
            config = r.config + ("" if r.tuned else " (default)")
            lines.append(f"| {r.name} | {r.kind} | {r.dtype} | {r.torch_ms:.4f} "
                         f"| {r.zeroskip_ms:.4f} | {r.ratio:.2f}x | {config} |")
        lines.append("")
        for dtype in self.dtypes:
            means = [f"{kind} {value:.2f}x" for kind in GPU_KINDS
                     for value in [self.geomean(kind, dtype)] if value]
            if means:
                lines.append(f"- geomean ratio, {dtype}: " + ", ".join(means))
        lines.append(f"- {GPU_PATTERN_NOTE}")
        lines.append("- zeroskip times are the Triton kernel launched as zeroskip's dispatch "
                     "launches it (output allocated per call, the weight packed once as its "
                     "cache keeps it), with the config tuned for this GPU where the tuning "
                     "database has one (else the default, marked)")
        if self.failures:
            lines.append(f"- {len(self.failures)} of {len(self.rows)} kernels FAILED (see the "
                         "table): no times for them")
        lines += _goal_table(self.goals())
        return "\n".join(lines)


def _cell(text: str) -> str:
    """Text made safe for one markdown table cell."""
    return " ".join(text.replace("|", "/").split())[:300]


def gpu_problem(device: str = "cuda") -> str | None:
    """Why the GPU bench cannot run on ``device`` here, or None."""
    from .runtime import autotune
    return autotune._triton_problem(torch.device(device))


def gpu_machine(device: str = "cuda") -> dict:
    """Where the GPU figures were taken: the device's tuning fingerprint, cuDNN, the date."""
    from .runtime import autotune
    cudnn = torch.backends.cudnn.version() if torch.device(device).type == "cuda" else None
    return {**autotune.gpu_fingerprint(device), "cudnn": cudnn,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "python": platform.python_version()}


def gpu_choice(spec: LayerSpec, density: float, device, strategy: str) -> tuple[str, bool]:
    """``(Triton choice, tuned)``: of the record tuned for ``spec`` on this GPU nearest
    ``density``, the fastest candidate of ``strategy`` ('dense' or 'sparse'); else that
    family's default config."""
    from .runtime import autotune
    from .runtime import triton as zt
    record = autotune.nearest(autotune.gpu_records(spec, device), density)
    if record:
        ms = {name: v for name, v in record.get("ms", {}).items()
              if name.startswith(strategy + "/") and v is not None and math.isfinite(v)}
        if ms:
            return min(ms, key=ms.get), True
    return zt.choice_name(strategy, zt.kernel_for(spec, strategy).default), False


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
    against torch's op, then both timed (:func:`autotune.time_device`: ``do_bench`` on a GPU;
    ``device`` 'cpu' runs Triton's interpreter, for tests). With ``tune``, each kernel is
    tuned for this GPU first (:func:`autotune.tune_triton`, recorded in the database). A row
    that fails keeps the reason in ``failure``; the others still run."""
    from .runtime import autotune
    base = dataclasses.replace(layer.spec, batch=batch, dtype=dtype)
    rows = []
    for kind, make, density, pattern, strategy in _gpu_jobs(base):
        row = GpuRow(layer.name, layer.family, kind, dtype, "", layer.spec.op,
                     tuple(layer.spec.kernel_size), tuple(layer.spec.stride), layer.dense,
                     density, None, None, "", False, None)
        try:
            spec = make()
            row.shape = spec.describe()
            if tune and kind != "sparse-random":     # sparse-random reuses the blocks tuning
                autotune.tune_triton(spec, density, device, repeats, min_time=min_time,
                                     pattern=pattern)
            t = autotune.triton_operands(spec, density, device, pattern)
            torch_call = autotune.torch_op(spec, t)
            row.config, row.tuned = gpu_choice(spec, density, device, strategy)
            _, zs_call = autotune.triton_call(spec, row.config, t)
            row.error = autotune.relative_error(zs_call(), torch_call())
            tolerance = autotune.triton_tolerance(dtype, device)
            if not row.error <= tolerance:
                raise BenchError(f"zeroskip differs from torch by {row.error:.3g} of the "
                                 f"largest magnitude (tolerance {tolerance:g})")
            times, _ = autotune.time_device({"torch": torch_call, "zeroskip": zs_call}, device,
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
    rows: list[GpuRow] = []
    for i, (layer, dtype) in enumerate(jobs, 1):
        start = time.perf_counter()
        found = bench_gpu_layer(layer, dtype, batch, repeats, device, tune, min_time)
        rows += found
        if log:
            print(f"[{i}/{len(jobs)}] {layer.name} {dtype}: {_gpu_note(found)} "
                  f"({time.perf_counter() - start:.1f} s)", file=log, flush=True)
    return GpuReport(rows, gpu_machine(device), batch, repeats)
