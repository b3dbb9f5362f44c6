"""The training-step runner (``zeroskip bench --backward``): each layer timed as a training
step: forward with input, weight and bias requiring gradients, ``backward`` of a fixed output
gradient, then an SGD step (momentum 0.9) on the weight and bias. The step changes the weights,
so zeroskip repacks them every step, as in a training loop. The output and the three gradients
are checked against torch first. For strided convs, whose input gradient is a strided
transposed convolution, that operator is also timed alone."""
from __future__ import annotations

from typing import Callable, TextIO

import torch
import torch.nn.functional as F

from .. import functional as Z
from ..codegen.macs import dense_macs, nonzero_macs
from ..spec import LayerSpec
from ..runtime import autotune, launcher, loader, stats
from ..runtime.timing import MIN_TIME_S, REPEATS, busy, steady_allocator, time_interleaved
from .common import (BenchError, _checked_call, _each_layer, call_args, check, machine)
from .reports import BackwardReport
from .rows import BackwardRow
from .suite import Layer, strided_conv

GRADS = ("output", "input gradient", "weight gradient", "bias gradient")


def train_operands(spec: LayerSpec, seed: int = 0, batch: int = 1,
                   density: float = 1.0) -> tuple:
    """Random ``(input, weight, bias or None, grad_output)`` for one training step at ``batch``:
    the input requires grad (below density 1 it is ReLU-like, :func:`autotune.sparse_input`),
    the weight and bias are trainable ``nn.Parameter``s (zeroskip caches their packing while
    they are unchanged), ``grad_output`` has the output's shape."""
    gen = torch.Generator().manual_seed(seed)
    shapes = spec.input_shapes(batch)
    x = torch.randn(shapes["input"], generator=gen)
    if density < 1.0:
        x = autotune.sparse_input(tuple(x.shape), density, seed)
    x = x.requires_grad_()
    w, b = (torch.nn.Parameter(torch.randn(shapes[n], generator=gen)) if n in shapes else None
            for n in ("weight", "bias"))
    return x, w, b, torch.randn(spec.output_shape(batch), generator=gen)


LR = 1e-5   # small: the weights drift over thousands of timed steps and must stay finite


def _step(fn: Callable, kwargs: dict, x, w, b, g) -> Callable[[], tuple]:
    """One training step of ``fn`` alone: forward, ``backward(g)``, an SGD step on ``w`` and
    ``b``, then the gradients set to None (as ``zero_grad`` does) so that the next step
    accumulates nothing. Returns the output and the three gradients (the bias one None without
    a bias)."""
    weights = [w] if b is None else [w, b]
    optimizer = torch.optim.SGD(weights, lr=LR, momentum=0.9)

    def step() -> tuple:
        out = fn(x, w, b, **kwargs)
        out.backward(g)
        grads = (x.grad, *(p.grad for p in weights))
        optimizer.step()
        x.grad = None
        optimizer.zero_grad(set_to_none=True)
        return (out.detach(), *grads, None)[:4]
    return step


def _copy(p: torch.nn.Parameter | None) -> torch.nn.Parameter | None:
    return None if p is None else torch.nn.Parameter(p.detach().clone())


def grad_input_calls(spec: LayerSpec, w: torch.Tensor, g: torch.Tensor) -> tuple:
    """``(torch's call, zeroskip's call)`` of the input gradient alone:
    ``torch.nn.grad.conv{N}d_input`` and the kernel of ``spec.grad_input()``."""
    kwargs = call_args(spec)
    torch_fn = getattr(torch.nn.grad, f"conv{spec.rank}d_input")
    size = spec.input_shapes(g.shape[0])["input"]
    w_plain, grad_spec = w.detach(), spec.grad_input()
    return ((lambda: torch_fn(size, w_plain, g, **kwargs)),
            (lambda: loader.run_spec(grad_spec, {"grad_output": g, "weight": w})))


def _checked_step(name: str, step: Callable[[], tuple], want: tuple) -> tuple[float, int]:
    """Run zeroskip's training ``step`` once: the output and every gradient must match torch's
    ``want``, and the forward and both gradients must have run generated kernels (or torch's op
    where tuning chose it). Returns the worst error and how many operators ran torch's op."""
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
    ran = sum(after[k] - before[k] for k in ("kernel_calls", "torch_choices"))
    if after["fallback_calls"] > before["fallback_calls"] or ran < 3:
        raise BenchError(f"{name}: zeroskip did not run generated kernels (or torch's op where "
                         "tuning chose it) for the forward and both gradients: it fell back "
                         "to torch's op")
    return max(errors), after["torch_choices"] - before["torch_choices"]


def bench_backward_layer(layer: Layer, batch: int = 1, repeats: int = REPEATS,
                         min_time: float = MIN_TIME_S, density: float = 1.0) -> BackwardRow:
    """Check, then time, one training step of the layer against torch, on an input of
    ``density`` (ReLU-like below 1: the forward and the weight gradient may skip its zeros);
    for strided convs also the input gradient alone."""
    spec = layer.spec
    x, w, b, g = train_operands(spec, batch=batch, density=density)
    kwargs = call_args(spec)
    # Each side trains its own copy of the weights, from the same values: the first step, which
    # is checked, sees equal weights.
    torch_step = _step(getattr(F, spec.torch_name), kwargs, x, w, b, g)
    zs_step = _step(getattr(Z, spec.torch_name), kwargs, x, _copy(w), _copy(b), g)
    error, torch_ops = _checked_step(layer.name, zs_step, torch_step())
    timing = time_interleaved({"torch": torch_step, "zeroskip": zs_step}, repeats, min_time)
    specs = (spec, spec.grad_input(), spec.grad_weight())
    row = BackwardRow(_row_name(layer, density), layer.family, layer.dense, spec.describe(batch),
                      timing.seconds["torch"] * 1e3, timing.seconds["zeroskip"] * 1e3,
                      sum(nonzero_macs(s, batch) for s in specs),
                      sum(dense_macs(s, batch) for s in specs), error, timing.contention,
                      nonzero_macs(specs[1], batch), dense_macs(specs[1], batch),
                      torch_ops=torch_ops)
    if strided_conv(spec):
        torch_call, zs_call = grad_input_calls(spec, w, g)
        row.error = max(error, _checked_call(f"{layer.name}: input gradient alone", zs_call,
                                             torch_call()))
        timing = time_interleaved({"torch": torch_call, "zeroskip": zs_call}, repeats, min_time)
        row.grad_input_torch_ms = timing.seconds["torch"] * 1e3
        row.grad_input_zeroskip_ms = timing.seconds["zeroskip"] * 1e3
        row.grad_input_contention = timing.contention
    return row


def _row_name(layer: Layer, density: float) -> str:
    """A row's name: the layer's, and ``@density`` below density 1."""
    return layer.name if density >= 1.0 else f"{layer.name}@{density:g}"


def _backward_note(row: BackwardRow) -> str:
    notes = [f"others took {c:.0%} of its CPUs" for c in
             (row.contention, row.grad_input_contention) if busy(c)][:1]
    if row.torch_ops:
        notes.append(f"{row.torch_ops} of 3 operators on torch's op (tuned)")
    if row.grad_input_ratio is not None:
        notes.insert(0, f"grad_input {row.grad_input_ratio:.2f}x")
    return f"fwd+bwd {row.ratio:.2f}x{''.join(', ' + n for n in notes)}"


def run_backward(layers: list[Layer], batch: int = 1, repeats: int = REPEATS,
                 min_time: float = MIN_TIME_S, log: TextIO | None = None,
                 densities: list[float] | None = None) -> BackwardReport:
    """Benchmark one training step of each of ``layers`` (with :func:`steady_allocator`), on
    dense inputs or, with ``densities``, on ReLU-like inputs of each (rows named
    ``layer@density``); ``log`` gets one line per row."""
    pinned = steady_allocator()
    launcher.ready()        # calls run through the compiled launcher from the first timing
    cases = [(layer, d) for layer in layers for d in (densities or [1.0])]
    rows = _each_layer(cases,
                       lambda case: bench_backward_layer(case[0], batch, repeats, min_time,
                                                         case[1]),
                       _backward_note, log,
                       label=lambda case: _row_name(*case))
    return BackwardReport(rows, {**machine(), "malloc_pinned": pinned}, batch, repeats)
