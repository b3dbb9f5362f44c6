"""What the bench's runners share: the runtime they drive, operands, result checks, the
observation of zeroskip's dispatch, the machine's description, and the per-layer loop."""
from __future__ import annotations

import contextlib
import datetime
import math
import os
import platform
import statistics
import time
from typing import Callable, Iterator, TextIO

import torch

from .. import __version__
from ..runtime import cc, reference, stats
from ..runtime.autotune import sparse_input
from ..runtime.timing import busy
from ..spec import LayerSpec

RTOL = reference.TOLERANCE   # max |zeroskip - torch| allowed, relative to max |torch|


class BenchError(RuntimeError):
    """zeroskip gave a wrong result, or ran torch's op instead of a kernel."""


@contextlib.contextmanager
def _environ(name: str, value: str) -> Iterator[None]:
    """The environment variable ``name`` set to ``value`` meanwhile, then as it was."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _cache_dir(path: str) -> contextlib.AbstractContextManager:
    return _environ("ZEROSKIP_CACHE_DIR", path)


# --------------------------------------------------------------------------------- operands
def call_args(spec: LayerSpec) -> dict:
    """Keyword arguments of the spec's ``torch.nn.functional`` op (bias aside)."""
    if spec.padding_mode != "zeros" or any(lo != hi for lo, hi in spec.padding):
        raise ValueError(f"the bench runs zero, symmetric padding only: {spec.describe()}")
    kwargs = dict(stride=spec.stride, padding=tuple(lo for lo, _ in spec.padding),
                  dilation=spec.dilation, groups=spec.groups)
    if spec.op == "conv_transpose":
        kwargs["output_padding"] = spec.output_padding
    return kwargs


def operands(spec: LayerSpec, seed: int = 0, density: float = 1.0, batch: int = 1
             ) -> tuple[torch.Tensor, ...]:
    """Random ``(input, weight, bias or None)`` of the spec's shapes at ``batch``; the weight
    and bias are
    frozen ``nn.Parameter``s, as in a model at inference (zeroskip caches their packing). At
    density 1 the input is random normal (no zeros); below, it is ReLU-like, with exactly that
    share of positive values (:func:`sparse_input`). The weights are the same at every density."""
    gen = torch.Generator().manual_seed(seed)
    shapes = spec.input_shapes(batch)
    x = torch.randn(shapes["input"], generator=gen)
    w, b = (torch.nn.Parameter(torch.randn(shapes[n], generator=gen), requires_grad=False)
            if n in shapes else None for n in ("weight", "bias"))
    if density < 1.0:
        x = sparse_input(shapes["input"], density, seed)
    return x, w, b


# --------------------------------------------------------------------------------- checks
def check(name: str, got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest error relative to the largest magnitude; raises if above :data:`RTOL`."""
    if got.shape != want.shape:
        raise BenchError(f"{name}: zeroskip returned shape {tuple(got.shape)}, torch "
                         f"{tuple(want.shape)}")
    error = reference.relative_error(got, want)
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


# --------------------------------------------------------------------------------- figures
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


def _mark(contention: float | None) -> str:
    return " *" if busy(contention) else ""


def _each_layer(layers: list, bench_one: Callable, note: Callable, log: TextIO | None,
                label: Callable[[object], str] = lambda layer: layer.name) -> list:
    """``bench_one(layer)`` for each layer (or job); ``log`` gets one line per layer:
    ``label(layer)`` (its name), then ``note(row)`` and the seconds it took."""
    rows = []
    for i, layer in enumerate(layers, 1):
        start = time.perf_counter()
        rows.append(bench_one(layer))
        if log:
            print(f"[{i}/{len(layers)}] {label(layer)}: {note(rows[-1])} "
                  f"({time.perf_counter() - start:.1f} s)", file=log, flush=True)
    return rows

