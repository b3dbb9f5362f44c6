"""Launching generated kernels on torch tensors: spec -> kernel, and the convolution entry point.

:func:`kernel_for` turns a :class:`LayerSpec` into a loaded :class:`Kernel`: the compiler's
passes, the plan, the rendered C, the cache (compiling on a miss), ``ctypes``. It is memoized
per (spec, variant) in the process, so a repeated call skips rendering and hashing.

:func:`convolution` is what ``zeroskip.functional`` and ``zeroskip.nn`` call. Its fast path is
one dict lookup keyed by everything but the batch size; the slow path (first call of a shape)
validates the arguments exactly as torch does and prepares a :class:`Call`, whose dispatch picks
per call between the layer's dense and sparse kernels (or torch's op, where tuned so). Gradient
kernels are compiled on the first backward. What the C kernels do not cover runs on torch's op
through :func:`stats.fallback`.

Backends: CPU tensors run the C kernels, CUDA tensors the Triton kernels
(:mod:`.triton`, a :class:`TritonCall`); ``ZEROSKIP_BACKEND=triton`` with ``TRITON_INTERPRET=1``
runs CPU tensors through the Triton kernels under Triton's interpreter, which is how they are
tested without a GPU.
"""
from __future__ import annotations

import ast
import collections
import dataclasses
import functools
import numbers
import operator
import os
import threading
from pathlib import Path
from typing import Any, List, Optional

import torch
import torch.nn.functional as F

from .. import __version__
from ..codegen import emit, lower, pipeline
from ..codegen.ir import IRError
from ..codegen.passes.choose_strategy import crossover as model_crossover
from ..spec import LayerSpec, LimitError, normalize_padding
from . import autotune, bundle, cache, cc, stats
from . import triton as zt

DTYPES = {torch.float32: "float32", torch.float64: "float64"}
TRITON_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
BACKENDS = ("c", "triton")
PACK_CACHE_SIZE = 16
MACS_PER_THREAD = 1 << 16   # below this much work per thread, waking another costs more
# Why a kernel could not be built: it then falls back to torch's op with a warning.
BUILD_ERRORS = (cc.CompileError, cache.CacheError, emit.TemplateError, IRError)
TRITON_BUILD_ERRORS = (cache.CacheError, emit.TemplateError, IRError, zt.TritonUnavailable)


class Kernel:
    """One compiled operator. ``launch`` runs it on contiguous tensors of any batch size."""

    def __init__(self, spec: LayerSpec, plan: lower.KernelPlan, folder: Path,
                 variant: lower.Variant = lower.DEFAULT):
        self.spec, self.plan, self.folder, self.variant = spec, plan, folder, variant
        self.source = folder / "kernel.c"
        self.lib = cc.Library(folder / "kernel.so")
        self._packs: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()
        self.macs_per_sample = sum(r.macs_per_sample for r in plan.regions)
        self.crossover = 0.0     # the cost model's sparse/dense crossover density (set by _compile)

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """The weights (and bias) in the kernel's layout.

        Packs of ``nn.Parameter`` weights are cached per tensor version, which optimizers and
        in-place ops under ``no_grad`` advance; edits through ``.data`` do not (call
        :func:`forget_packed` after them). Plain tensors are packed on every call."""
        if self.lib.packed_elems == 0:
            return weight
        cached = isinstance(weight, torch.nn.Parameter) and (
            bias is None or isinstance(bias, torch.nn.Parameter))
        if cached:
            key = (id(weight), weight._version, weight.data_ptr(),
                   None if bias is None else (id(bias), bias._version, bias.data_ptr()))
            with self._lock:
                hit = self._packs.get(key)
                if hit is not None:
                    self._packs.move_to_end(key)
                    return hit[0]
        w = weight.detach().contiguous()
        b = None if bias is None else bias.detach().contiguous()
        packed = torch.empty(self.lib.packed_elems, dtype=weight.dtype)
        self.lib.pack(w.data_ptr(), 0 if b is None else b.data_ptr(), packed.data_ptr())
        if cached:
            with self._lock:
                # The entry holds the tensors, so their ids and storage stay theirs while cached.
                self._packs[key] = (packed, weight, bias)
                while len(self._packs) > PACK_CACHE_SIZE:
                    self._packs.popitem(last=False)
        return packed

    def launch(self, lhs: torch.Tensor, packed: torch.Tensor, rhs: torch.Tensor,
               out: torch.Tensor) -> torch.Tensor:
        if out.numel():
            batch = lhs.shape[0]
            threads = min(torch.get_num_threads(),
                          1 + batch * self.macs_per_sample // MACS_PER_THREAD)
            status = self.lib.run(batch, threads, lhs.data_ptr(), packed.data_ptr(),
                                  rhs.data_ptr(), out.data_ptr())
            if status:
                raise MemoryError(f"zeroskip kernel {self.source}: out of scratch memory")
        stats.add("kernel_calls")
        return out


def forget_packed() -> None:
    """Drop every cached weight pack (needed only after editing a Parameter through ``.data``)."""
    for kernel in list(_kernels.values()):
        with kernel._lock:
            kernel._packs.clear()


# --------------------------------------------------------------------------------- compiling
_kernels: dict[tuple[LayerSpec, lower.Variant], Kernel] = {}
_kernels_lock = threading.Lock()


def kernel_for(spec: LayerSpec, variant: lower.Variant = lower.DEFAULT) -> Kernel:
    """The compiled kernel of ``spec`` (its batch size is ignored: kernels take it at run time),
    generated as ``variant`` says. Raises one of :data:`BUILD_ERRORS`, or
    :class:`bundle.BundleError` where an active bundle holds it but is refused."""
    kernel = _kernels.get((spec, variant))   # keyed by the spec as given too: no re-validation
    if kernel is not None:
        stats.add("memo_hits")
        return kernel
    normal = dataclasses.replace(spec, batch=1)
    with _kernels_lock:
        kernel = _kernels.get((normal, variant))
        if kernel is not None:
            stats.add("memo_hits")
        else:
            kernel = _compile(normal, variant)
        _kernels[normal, variant] = _kernels[spec, variant] = kernel
    return kernel


def _compile(spec: LayerSpec, variant: lower.Variant = lower.DEFAULT) -> Kernel:
    flags = cc.compiler()[1]
    steps = pipeline.run(spec, dump_dir=os.environ.get("ZEROSKIP_DUMP"),
                         strategy=variant.strategy)
    plan = lower.plan(steps[-1][1], vector_bytes=cc.vector_bytes(flags), variant=variant)
    kernel = _build(spec, variant, plan)
    kernel.crossover = model_crossover(steps[-1][1])
    return kernel


def _build(spec: LayerSpec, variant: lower.Variant, plan: lower.KernelPlan) -> Kernel:
    """Render the plan, then load it from an active bundle, or from the cache, compiling it
    there on a miss."""
    dump = os.environ.get("ZEROSKIP_DUMP")
    source = emit.render(plan)
    if dump:
        folder = pipeline.dump_folder(spec, Path(dump))
        folder.mkdir(parents=True, exist_ok=True)
        name = "kernel.c" if variant == lower.DEFAULT else \
            f"kernel-{variant.name.replace('/', '-')}.c"
        (folder / name).write_text(source)
    served = bundle.find("c", source)       # before anything asks the compiler for its name
    if served is not None:
        stats.add("bundle_hits")
        return Kernel(spec, plan, served.parent, variant)
    command, flags = cc.compiler()
    key = cache.make_key(version=__version__, templates=emit.template_hash(), source=source,
                         compiler=cc.identity(command), flags=flags, target=cc.cpu_target())

    def make(tmp: Path) -> list[str]:
        (tmp / "kernel.c").write_text(source)
        seconds = cc.compile_library(command, flags, tmp / "kernel.c", tmp / "kernel.so")
        stats.add("compiles")
        stats.add("compile_seconds", seconds)
        return ["kernel.c", "kernel.so"]
    try:
        folder, built = cache.fetch(key, {"spec": spec.to_dict(), "variant": variant.name,
                                          "version": __version__,
                                          "compiler": cc.identity(command), "flags": list(flags),
                                          "target": cc.cpu_target()}, make)
    except cc.CompileError as exc:
        raise cc.CompileError(f"{exc}\n{_keep_failed(key, source)}") from exc
    if not built:
        stats.add("cache_hits")
    return Kernel(spec, plan, folder, variant)


def _keep_failed(key: str, source: str) -> str:
    """Keep a source that failed to compile where the error message can point (the build
    directory is gone)."""
    kept = cache.cache_dir() / "failed" / f"{key}.c"
    try:
        kept.parent.mkdir(mode=0o700, exist_ok=True)
        kept.write_text(source)
    except OSError as exc:
        return f"(the source could not be kept: {exc.strerror or exc})"
    return f"the source is kept at {kept}"


OPERANDS = {"conv": ("input", "weight"), "conv_transpose": ("input", "weight"),
            "conv_grad_input": ("grad_output", "weight"),
            "conv_grad_weight": ("input", "grad_output")}


def run_spec(spec: LayerSpec, tensors: dict[str, torch.Tensor],
             variant: lower.Variant = lower.DEFAULT) -> torch.Tensor:
    """Run the kernel of ``spec`` (as ``variant``) on its operands, named as in
    ``spec.input_shapes``."""
    kernel = kernel_for(spec, variant)
    lhs_name, rhs_name = OPERANDS[spec.op]
    lhs, rhs = tensors[lhs_name].contiguous(), tensors[rhs_name].contiguous()
    shape = spec.output_shape if spec.op == "conv_grad_weight" else \
        (lhs.shape[0], *spec.output_shape[1:])
    packed = kernel.pack(rhs, tensors.get("bias"))
    return kernel.launch(lhs, packed, rhs, torch.empty(shape, dtype=lhs.dtype))


# --------------------------------------------------------------------------------- calls
@dataclasses.dataclass
class Call:
    """A prepared forward operator: its spec, its dense kernel and, compiled on first use, the
    variants its dispatch picks (gradients: :func:`_gradient_kernel`).

    Per call, a layer that could run sparse measures its input's density (sampled in C, a few
    microseconds) and runs what the tuning database chose for that density on this machine, or,
    untuned, the sparse kernel below the cost model's crossover and the dense one above it."""

    spec: LayerSpec
    forward: Kernel                       # the dense kernel
    out_shape: tuple[int, ...]            # output shape without the batch dimension
    channels_last: bool = False
    torch_op: Any = None                  # torch's op on (x, weight, bias): a tuned choice
    config: str = ""                      # the arguments as the custom op takes them
    last: str = "dense"                   # what the latest call ran: dense, sparse, torch, ...
    last_density: float = 1.0             # the density the latest call measured
    _variants: dict = dataclasses.field(default_factory=dict)
    _tuned: tuple = (None, None, None)    # (database generation, its records, their one choice)
    _served: tuple = (None, None)         # (bundles' generation, the bundle made for this layer)

    def choose(self, x: torch.Tensor) -> str:
        """The candidate to run on ``x`` (contiguous, batched): a variant name or 'torch'."""
        self.last_density = 1.0
        if os.environ.get("ZEROSKIP_SPARSE", "1") == "0":
            return "dense"
        records, same = self._records()
        if same is not None:             # tuned alike at every density: no need to measure
            return same
        if (not records and self.forward.crossover <= 0) or not x.numel():
            return "dense"
        density = self.forward.lib.density(x.shape[0], x.data_ptr())
        self.last_density = density
        if records:
            return autotune.nearest(records, density)["choice"]
        return "sparse" if density < self.forward.crossover else "dense"

    def _records(self) -> tuple[dict | None, str | None]:
        """This layer's tuned records on this machine, and their choice if they all agree: an
        active bundle's for a layer it was generated for (the tuning database is not read
        then), else the tuning database's."""
        generation = bundle.generation()
        if self._served[0] != generation:
            self._served = (generation, bundle.covering(self.spec))
        served = self._served[1]
        if served is not None:
            key: Any = ("bundle", generation)
            if self._tuned[0] != key:
                self._tune(key, served.records(self.spec))
        else:
            db = autotune.database()
            if self._tuned[0] != db.generation:
                self._tune(db.generation,
                           db.records.get(db.here, {}).get(autotune.spec_key(self.spec)))
        return self._tuned[1], self._tuned[2]

    def _tune(self, key: Any, records: dict | None) -> None:
        choices = {r["choice"] for r in records.values()} if records else set()
        self._tuned = (key, records, choices.pop() if len(choices) == 1 else None)

    def kernel(self, name: str) -> Kernel | None:
        """The kernel of variant ``name`` (compiled on first use); None if it cannot be built,
        with a one-time warning, after which the dense kernel serves."""
        if name == "dense":
            return self.forward
        if name not in self._variants:
            try:
                self._variants[name] = kernel_for(self.spec, lower.Variant.parse(name))
            except (ValueError, *BUILD_ERRORS) as exc:
                self._variants[name] = None
                stats.fallback(f"variant {name} of {self.spec.describe()} failed to build; "
                               "the dense kernel runs instead", f"{type(exc).__name__}: {exc}")
        return self._variants[name]

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        choice = self.choose(x)
        if choice == "torch" and self.torch_op is not None:
            self.last = "torch"
            stats.add("torch_choices")
            return self.torch_op(x, weight, bias)
        kernel = self.kernel(choice) or self.forward
        self.last = choice if kernel is not self.forward else "dense"
        if kernel is not self.forward:
            stats.add("sparse_calls" if choice.startswith("sparse") else "variant_calls")
        return self.launch(kernel, x, weight, bias)

    def launch(self, kernel: Kernel, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None) -> torch.Tensor:
        """Run one of this operator's kernels on ``x`` (contiguous, batched)."""
        out = torch.empty((x.shape[0], *self.out_shape), dtype=x.dtype)
        return kernel.launch(x, kernel.pack(weight, bias), weight.detach().contiguous(), out)


@dataclasses.dataclass
class TritonCall:
    """A prepared forward operator on the Triton backend. Per call it runs the tuning
    database's choice for this GPU (nearest the layer's declared density: measuring a CUDA
    tensor's density would synchronize), else the dense kernel at its default config."""

    spec: LayerSpec
    forward: zt.Kernel                    # the dense kernel
    out_shape: tuple[int, ...]
    torch_op: Any = None
    config: str = ""                      # the arguments as the custom op takes them
    last: str = "dense"
    last_density: float = 1.0
    _resolved: dict = dataclasses.field(default_factory=dict)
    _tuned: tuple = (None, None)          # ((db generation, device, tf32), the layer's records)
    _ran: set = dataclasses.field(default_factory=set)

    def __post_init__(self):
        self.default = zt.choice_name("dense", self.forward.default)
        self._resolved[self.default] = ("dense", self.forward.default, self.forward)

    def choose(self, x: torch.Tensor) -> str:
        """'torch', or a Triton choice name ('dense/m64n64k32w4s3', 'sparse/...')."""
        if os.environ.get("ZEROSKIP_SPARSE", "1") == "0":
            return self.default
        records = self._records(x.device)
        return autotune.nearest(records, self.spec.density)["choice"] if records else \
            self.default

    def _records(self, device: torch.device) -> dict | None:
        """This layer's tuned records for ``device``, looked up again only when the database
        or the GPU fingerprint's TF32 setting changes."""
        key = (autotune.database().generation, device, torch.backends.cudnn.allow_tf32)
        if self._tuned[0] != key:
            self._tuned = (key, autotune.gpu_records(self.spec, device))
        return self._tuned[1]

    def _resolve(self, choice: str) -> tuple[str, zt.Config, zt.Kernel]:
        """The strategy, config and kernel of a choice, parsed and built once; a choice that
        cannot be built warns once and resolves to the default."""
        found = self._resolved.get(choice)
        if found is None:
            try:
                strategy, config = zt.parse_choice(choice)
                kernel = self.forward if strategy == "dense" else \
                    zt.kernel_for(self.spec, strategy)
                found = (strategy, config, kernel)
            except (ValueError, *TRITON_BUILD_ERRORS) as exc:
                stats.fallback(f"Triton choice {choice} of {self.spec.describe()} failed to "
                               "build; the default runs instead", f"{type(exc).__name__}: {exc}")
                found = self._resolved[self.default]
            self._resolved[choice] = found
        return found

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        choice = self.choose(x)
        if choice == "torch":
            self.last = "torch"
            stats.add("torch_choices")
            return self.torch_op(x, weight, bias)
        strategy, config, kernel = self._resolve(choice)
        self.last = choice
        if strategy == "sparse":
            stats.add("sparse_calls")
        return self.launch(kernel, x, weight, bias, config)

    def launch(self, kernel: zt.Kernel, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, config: zt.Config | None = None) -> torch.Tensor:
        """Run one of this operator's Triton kernels on ``x`` (batched, contiguous or
        channels_last: the result has the same layout)."""
        out = torch.empty((x.shape[0], *self.out_shape), dtype=x.dtype, device=x.device,
                          memory_format=_memory_format(x))
        b = None if bias is None else bias.detach().contiguous()
        return _launch_triton(kernel, x, kernel.pack(weight), out, b, config, self._ran)


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() in (4, 5) and not x.is_contiguous():
        return torch.channels_last if x.dim() == 4 else torch.channels_last_3d
    return torch.contiguous_format


def _launch_triton(kernel: zt.Kernel, lhs, rhs, out, bias, config, ran: set) -> torch.Tensor:
    """Launch a Triton kernel. Triton compiles a kernel on its first launch; a compile error
    there is a :class:`zt.TritonLaunchError` (the caller falls back), later errors propagate."""
    key = (id(kernel), config)
    if key in ran:
        return kernel.launch(lhs, rhs, out, bias, config)
    try:
        result = kernel.launch(lhs, rhs, out, bias, config)
    except (ValueError, TypeError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:      # triton.CompilationError and what its backends raise
        raise zt.TritonLaunchError(f"the Triton kernel {kernel.source} "
                                   f"({(config or kernel.default).name}) failed: "
                                   f"{type(exc).__name__}: {exc}") from exc
    ran.add(key)
    return result


@dataclasses.dataclass(frozen=True)
class Fallback:
    """Why a call runs on torch's op (``reason``: short and stable, one warning per reason)."""

    reason: str
    detail: str = ""


_calls: dict[tuple, Call | Fallback] = {}


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def _key_of(value: Any) -> Any:
    """An argument as part of a call's key: hashable, and apart wherever torch's parser tells
    values apart that Python finds equal (``1``, ``True`` and ``1.0``)."""
    if isinstance(value, (list, tuple)):
        return tuple(_key_of(v) for v in value)
    return value if type(value) is int or type(value) is str else (type(value), value)


def convolution(op: str, rank: int, input, weight, bias, stride, padding, dilation, groups,
                output_padding=0, padding_mode: str = "zeros",
                activation: str = "none") -> torch.Tensor:
    """``torch.nn.functional.conv{rank}d`` (op ``conv``) or ``conv_transpose{rank}d``, plus a
    ``padding_mode`` as ``torch.nn.Conv{rank}d`` applies it and an optional fused ReLU
    (``activation='relu'``), on generated kernels.

    Under ``torch.compile``, and when a covered call needs gradients, this is the custom op
    ``zeroskip::convolution`` (shape function and autograd formula registered); otherwise the
    kernel is called directly, which saves the dispatcher's few microseconds."""
    args = (stride, padding, dilation, groups, output_padding, padding_mode, activation)
    if torch.compiler.is_compiling():
        # The config is parsed back with ast.literal_eval: only plain values go into it.
        checked = _check_arguments(op, rank, *args[:5])
        if isinstance(checked, Fallback):
            stats.fallback(checked.reason, checked.detail)
            return _torch_convolution(op, rank, input, weight, bias, *args)
        return torch.ops.zeroskip.convolution(input, weight, bias,
                                              config_of(op, rank, *checked, *args[5:]))
    if _needs_autograd(input, weight, bias):
        # A call torch's op serves runs it with torch's autograd: the custom op's backward
        # needs the spec (and kernels) such a call does not have. A prepared call holds its
        # arguments checked and written as the custom op's config.
        _, call, torch_op = _lookup(op, rank, input, weight, bias, args)
        if isinstance(call, Fallback):
            return _fall_back(call, torch_op, input, weight, bias)
        return torch.ops.zeroskip.convolution(input, weight, bias, call.config)
    return _forward(op, rank, input, weight, bias, args)


def _device_type(t: torch.Tensor) -> str:
    """The device type that picks the backend (a seam for tests: no GPU is on CI)."""
    return t.device.type


def backend_for(t: torch.Tensor) -> str | None:
    """'c' or 'triton' for a tensor on this device (``ZEROSKIP_BACKEND`` picks for CPU
    tensors: 'c', the default, or 'triton' under Triton's interpreter), None where no backend
    runs. ValueError for an unknown ``ZEROSKIP_BACKEND``."""
    device = _device_type(t)
    if device == "cuda":
        return "triton"
    if device != "cpu":
        return None
    wanted = os.environ.get("ZEROSKIP_BACKEND", "") or "c"
    if wanted not in BACKENDS:
        raise ValueError(f"ZEROSKIP_BACKEND must be one of {BACKENDS}, got {wanted!r}")
    return wanted


def _covered_dtypes(backend: str | None) -> dict:
    return {"c": DTYPES, "triton": TRITON_DTYPES}.get(backend, {})


def _needs_autograd(input, weight, bias) -> bool:
    """A call whose result needs a gradient, on tensors a backend covers (other calls run
    torch's op with torch's own autograd)."""
    tensors = (input, weight) if bias is None else (input, weight, bias)
    if not (torch.is_grad_enabled()
            and all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)
            and any(t.requires_grad for t in tensors)):
        return False
    try:
        return input.dtype in _covered_dtypes(backend_for(input))
    except ValueError:      # a bad ZEROSKIP_BACKEND: the forward call reports it
        return False


def _lookup(op: str, rank: int, input, weight, bias, args: tuple
            ) -> tuple[tuple | None, Call | Fallback, Any]:
    """The key, the prepared :class:`Call` (or :class:`Fallback`) and torch's op of a call:
    one dict lookup keyed by everything but the batch size, else :func:`_prepare` (which
    raises what torch raises). The key is None where the arguments are not hashable."""
    def torch_op(x, w, b):
        return _torch_convolution(op, rank, x, w, b, *args)

    stride, padding, dilation, groups, output_padding, padding_mode, activation = args
    try:
        key = (op, rank, input.dtype, input.device, os.environ.get("ZEROSKIP_BACKEND"),
               input.dim(), tuple(input.shape[1:]),
               weight.dtype, weight.device, tuple(weight.shape),
               None if bias is None else (bias.dtype, bias.device, tuple(bias.shape)),
               _key_of(stride), _key_of(padding), _key_of(dilation), _key_of(groups),
               _key_of(output_padding), padding_mode, activation)
        call = _calls.get(key)
    except (AttributeError, TypeError):   # not tensors, unhashable arguments: torch says why
        key, call = None, None
    if call is None:
        call = _prepare(op, rank, input, weight, bias, args, torch_op)
        if key is not None:
            _calls[key] = call
    return key, call, torch_op


def _fall_back(why: Fallback, torch_op, input, weight, bias) -> torch.Tensor:
    stats.fallback(why.reason, why.detail)
    return torch_op(input, weight, bias)


def _forward(op: str, rank: int, input, weight, bias, args: tuple) -> torch.Tensor:
    key, call, torch_op = _lookup(op, rank, input, weight, bias, args)
    if isinstance(call, Fallback):
        return _fall_back(call, torch_op, input, weight, bias)
    batched = input.dim() == rank + 2
    x = input if batched else input.unsqueeze(0)
    if isinstance(call, TritonCall):     # channels_last in, channels_last out, no copies
        try:
            out = call.run(zt.normalize_layout(x), weight, bias)
        except zt.TritonLaunchError as exc:
            failed = Fallback(f"the Triton kernel of {call.spec.describe()} failed to compile "
                              "or launch", str(exc))
            if key is not None:       # from now on this layer runs torch's op
                _calls[key] = failed
            stats.fallback(failed.reason, failed.detail)
            return torch_op(input, weight, bias)
        return out if batched else out.squeeze(0)
    out = call.run(x.contiguous(), weight, bias)
    if not batched:
        out = out.squeeze(0)
    elif _channels_last(input, rank):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _channels_last(input: torch.Tensor, rank: int) -> bool:
    """torch returns channels_last results for channels_last 4-D inputs; so do we."""
    return rank == 2 and input.dim() == 4 and not input.is_contiguous() and \
        input.is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------- custom ops
def config_of(op, rank, stride, padding, dilation, groups, output_padding, padding_mode,
              activation="none") -> str:
    """The non-tensor arguments as one string: a custom op's schema has no type for an int, a
    tuple of ints or of pairs, or 'same'; and torch.compile guards on a constant string."""
    return (f"{op};{rank};{_freeze(stride)!r};{_freeze(padding)!r};{_freeze(dilation)!r};"
            f"{groups!r};{_freeze(output_padding)!r};{padding_mode};{activation}")


@functools.lru_cache(maxsize=4096)
def _parse(config: str) -> tuple:
    op, rank, *values, mode, activation = config.split(";")
    return (op, int(rank), *(ast.literal_eval(v) for v in values), mode, activation)


def _spec_of(config: str, input_shape, weight_shape, has_bias: bool, dtype) -> LayerSpec:
    """The LayerSpec (batch 1) of a call, from its config and tensor shapes."""
    op, rank, *args = _parse(config)
    return _build_spec(op, rank, input_shape, weight_shape, has_bias, dtype, tuple(args))


def _build_spec(op: str, rank: int, input_shape, weight_shape, has_bias: bool, dtype,
                args: tuple) -> LayerSpec:
    """The LayerSpec (batch 1) of a call, from torch's arguments and the tensor shapes."""
    stride, padding, dilation, groups, output_padding, mode, activation = args
    size = tuple(int(n) for n in input_shape[-rank:])
    weight_shape = tuple(int(n) for n in weight_shape)
    dtype = DTYPES.get(dtype, str(dtype).removeprefix("torch."))
    if op == "conv_transpose":
        return LayerSpec.conv_transpose(weight_shape[0], weight_shape[1] * groups,
                                        weight_shape[2:], stride, padding, output_padding,
                                        groups, has_bias, dilation, mode, dtype,
                                        input_size=size, activation=activation)
    return LayerSpec.conv(weight_shape[1] * groups, weight_shape[0], weight_shape[2:], stride,
                          padding, dilation, groups, has_bias, mode, dtype, input_size=size,
                          activation=activation)


@torch.library.custom_op("zeroskip::convolution", mutates_args=())
def _convolution_op(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    config: str) -> torch.Tensor:
    op, rank, *args = _parse(config)
    return _forward(op, rank, input, weight, bias, tuple(args))


@_convolution_op.register_fake
def _convolution_fake(input, weight, bias, config):
    rank = _parse(config)[1]
    spec = _spec_of(config, input.shape, weight.shape, bias is not None, input.dtype)
    batched = input.dim() == rank + 2
    shape = ((input.shape[0],) if batched else ()) + tuple(spec.output_shape[1:])
    memory_format = torch.channels_last if _channels_last(input, rank) else torch.contiguous_format
    return torch.empty(shape, dtype=input.dtype, device=input.device,
                       memory_format=memory_format)


def _setup_context(ctx, inputs, output):
    input, weight, bias, config = inputs
    relu = _parse(config)[-1] == "relu"
    ctx.save_for_backward(input, weight, output if relu else None)
    ctx.config, ctx.has_bias = config, bias is not None


def _backward(ctx, grad):
    input, weight, output = ctx.saved_tensors
    if output is not None:           # the fused ReLU passes gradients where it passed values
        grad = grad * (output > 0)
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.zeroskip.convolution_grad_input(grad, weight, list(input.shape),
                                                       ctx.config)
    if ctx.needs_input_grad[1]:
        gw = torch.ops.zeroskip.convolution_grad_weight(input, grad, list(weight.shape),
                                                        ctx.config)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        rank = _parse(ctx.config)[1]
        gb = grad.sum(dim=tuple(range(grad.dim() - rank - 1)) + tuple(range(-rank, 0)))
    return gx, gw, gb, None


_convolution_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("zeroskip::convolution_grad_input", mutates_args=())
def _grad_input_op(grad: torch.Tensor, weight: torch.Tensor, input_size: List[int],
                   config: str) -> torch.Tensor:
    return _gradient("input", grad, weight, tuple(input_size), config)


@_grad_input_op.register_fake
def _grad_input_fake(grad, weight, input_size, config):
    return grad.new_empty(input_size)


@torch.library.custom_op("zeroskip::convolution_grad_weight", mutates_args=())
def _grad_weight_op(input: torch.Tensor, grad: torch.Tensor, weight_size: List[int],
                    config: str) -> torch.Tensor:
    return _gradient("weight", grad, input, tuple(weight_size), config)


@_grad_weight_op.register_fake
def _grad_weight_fake(input, grad, weight_size, config):
    return input.new_empty(weight_size)


# Double backward. With F(x, w) the convolution without bias, the gradient ops are
# GI(g, w) = (dF/dx)^T g and GW(x, g) = (dF/dw)^T g, both bilinear, so by <u, GI(g, w)> =
# <F(u, w), g> and <U, GW(x, g)> = <F(x, U), g> their gradients are the three ops again.
def _linear(config: str) -> str:
    """The config without its activation: the gradient ops are linear in each operand."""
    return config.rsplit(";", 1)[0] + ";none"


def _setup_grad_input(ctx, inputs, output):
    grad, weight, _, config = inputs
    ctx.save_for_backward(grad, weight)
    ctx.config = config


def _backward_grad_input(ctx, upstream):
    grad, weight = ctx.saved_tensors
    d_grad = d_weight = None
    if ctx.needs_input_grad[0]:
        d_grad = torch.ops.zeroskip.convolution(upstream, weight, None, _linear(ctx.config))
    if ctx.needs_input_grad[1]:
        d_weight = torch.ops.zeroskip.convolution_grad_weight(upstream, grad, list(weight.shape),
                                                              ctx.config)
    return d_grad, d_weight, None, None


def _setup_grad_weight(ctx, inputs, output):
    input, grad, _, config = inputs
    ctx.save_for_backward(input, grad)
    ctx.config = config


def _backward_grad_weight(ctx, upstream):
    input, grad = ctx.saved_tensors
    d_input = d_grad = None
    if ctx.needs_input_grad[0]:
        d_input = torch.ops.zeroskip.convolution_grad_input(grad, upstream, list(input.shape),
                                                            ctx.config)
    if ctx.needs_input_grad[1]:
        d_grad = torch.ops.zeroskip.convolution(input, upstream, None, _linear(ctx.config))
    return d_input, d_grad, None, None


_grad_input_op.register_autograd(_backward_grad_input, setup_context=_setup_grad_input)
_grad_weight_op.register_autograd(_backward_grad_weight, setup_context=_setup_grad_weight)


def _gradient(which: str, grad: torch.Tensor, other: torch.Tensor, size: tuple,
              config: str) -> torch.Tensor:
    """The input gradient (``other``: the weight, ``size``: the input's) or the weight gradient
    (``other``: the input, ``size``: the weight's) of a call, on a generated kernel."""
    op, rank = _parse(config)[:2]
    input_shape, weight_shape = (size, other.shape) if which == "input" else (other.shape, size)
    batched = len(input_shape) == rank + 2
    if backend_for(grad) == "triton":
        return _triton_gradient(which, grad, other, size, config, tuple(input_shape),
                                tuple(weight_shape), batched)
    g = (grad if batched else grad.unsqueeze(0)).contiguous()
    kernel = _gradient_kernel(which, config, tuple(input_shape[-rank:]), tuple(weight_shape),
                              grad.dtype)
    if isinstance(kernel, Fallback):
        stats.fallback(kernel.reason, kernel.detail)
        return _torch_gradient(which, grad, other, size, config)
    if which == "input":
        w = other.contiguous()
        out = kernel.launch(g, kernel.pack(other, None), w,
                            torch.empty((g.shape[0], *input_shape[-rank - 1:]), dtype=g.dtype))
        return out if batched else out.squeeze(0)
    x = (other if batched else other.unsqueeze(0)).contiguous()
    lhs, rhs = (g, x) if op == "conv_transpose" else (x, g)
    return kernel.launch(lhs, rhs, rhs, torch.empty(size, dtype=g.dtype))


def _triton_gradient(which: str, grad, other, size, config: str, input_shape: tuple,
                     weight_shape: tuple, batched: bool) -> torch.Tensor:
    rank = _parse(config)[1]
    kernel = _triton_gradient_kernel(which, config, input_shape[-rank:], weight_shape,
                                     grad.dtype)
    g = zt.normalize_layout(grad if batched else grad.unsqueeze(0))
    try:
        if isinstance(kernel, Fallback):
            raise zt.TritonLaunchError(kernel.detail)
        if which == "input":
            out = torch.empty((g.shape[0], *input_shape[-rank - 1:]), dtype=g.dtype,
                              device=g.device, memory_format=_memory_format(g))
            out = _launch_triton(kernel, g, kernel.pack(other), out, None, None, _ran_gradients)
            return out if batched else out.squeeze(0)
        x = zt.normalize_layout(other if batched else other.unsqueeze(0))
        lhs, rhs = (g, x) if _parse(config)[0] == "conv_transpose" else (x, g)
        out = torch.empty(size, dtype=g.dtype, device=g.device)
        return _launch_triton(kernel, lhs, rhs, out, None, None, _ran_gradients)
    except zt.TritonLaunchError as exc:
        stats.fallback(f"no Triton kernel for the {which} gradient of this layer",
                       f"{type(exc).__name__}: {exc}")
        return _torch_gradient(which, grad, other, size, config)


_ran_gradients: set = set()


@functools.lru_cache(maxsize=4096)
def _triton_gradient_kernel(which: str, config: str, input_size: tuple, weight_shape: tuple,
                            dtype) -> zt.Kernel | Fallback:
    spec = _spec_of(config, input_size, weight_shape, False, dtype)
    try:
        return zt.kernel_for(spec.grad_input() if which == "input" else spec.grad_weight())
    except (NotImplementedError, LimitError, *TRITON_BUILD_ERRORS) as exc:
        return Fallback(f"no Triton kernel for the {which} gradient of {spec.torch_name}",
                        f"{type(exc).__name__}: {exc}")


@functools.lru_cache(maxsize=4096)
def _gradient_kernel(which: str, config: str, input_size: tuple, weight_shape: tuple,
                     dtype) -> Kernel | Fallback:
    """The kernel of a call's input or weight gradient (memoized: a training step asks for it
    every time; ``input_size``: the input's spatial size), or why there is none."""
    spec = _spec_of(config, input_size, weight_shape, False, dtype)
    try:
        return kernel_for(spec.grad_input() if which == "input" else spec.grad_weight())
    except (NotImplementedError, LimitError, *BUILD_ERRORS) as exc:
        return Fallback(f"no generated kernel for the {which} gradient of {spec.torch_name}",
                        f"{type(exc).__name__}: {exc}")


def _torch_gradient(which: str, grad, other, size, config: str) -> torch.Tensor:
    """torch's own gradient (aten.convolution_backward), for what no kernel covers."""
    op, rank, stride, padding, dilation, groups, output_padding, mode, _ = _parse(config)
    input_shape, weight = (size, other) if which == "input" else (other.shape, None)
    x = other if which == "weight" else grad.new_zeros(size)
    w = weight if weight is not None else grad.new_zeros(size)
    spec = _spec_of(config, x.shape, w.shape, False, grad.dtype)
    if mode != "zeros" or any(lo != hi for lo, hi in spec.padding):
        raise stats.FallbackError(f"no gradient for {spec.describe()}: its kernel failed to "
                                  "build and torch's fallback needs symmetric zero padding")
    batched = x.dim() == rank + 2
    if not batched:
        x, grad = x.unsqueeze(0), grad.unsqueeze(0)
    gx, gw, _ = torch.ops.aten.convolution_backward(
        grad, x, w, None, list(spec.stride), [lo for lo, _ in spec.padding],
        list(spec.dilation), op == "conv_transpose", list(spec.output_padding), spec.groups,
        [which == "input", which == "weight", False])
    if which == "input":
        return gx if batched else gx.squeeze(0)
    return gw


def torch_reference(spec: LayerSpec, x: torch.Tensor, w: torch.Tensor,
                    b: torch.Tensor | None) -> torch.Tensor:
    """torch's own result for a forward spec (conv or conv_transpose) on its operands."""
    out = _torch_reference_linear(spec, x, w, b)
    return F.relu(out) if spec.activation == "relu" else out


def _torch_reference_linear(spec: LayerSpec, x, w, b) -> torch.Tensor:
    rank, pads = spec.rank, spec.padding
    if spec.op == "conv_transpose":
        fn = getattr(F, f"conv_transpose{rank}d")
        return fn(x, w, b, spec.stride, [lo for lo, _ in pads], spec.output_padding,
                  spec.groups, spec.dilation)
    if spec.op != "conv":
        raise ValueError(f"torch_reference covers conv and conv_transpose, not {spec.op!r}")
    fn = getattr(F, f"conv{rank}d")
    if spec.padding_mode == "zeros" and all(lo == hi for lo, hi in pads):
        return fn(x, w, b, spec.stride, [lo for lo, _ in pads], spec.dilation, spec.groups)
    mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
    x = F.pad(x, [p for pair in reversed(pads) for p in pair], mode=mode)
    return fn(x, w, b, spec.stride, 0, spec.dilation, spec.groups)


def _tuple(value, rank: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * rank


def _torch_convolution(op, rank, x, w, b, stride, padding, dilation, groups, output_padding,
                       padding_mode, activation="none"):
    out = _torch_linear(op, rank, x, w, b, stride, padding, dilation, groups, output_padding,
                        padding_mode)
    return F.relu(out) if activation == "relu" else out


def _torch_linear(op, rank, x, w, b, stride, padding, dilation, groups, output_padding,
                  padding_mode):
    if op == "conv_transpose":
        fn = getattr(F, f"conv_transpose{rank}d")
        return fn(x, w, b, stride, padding, output_padding, groups, dilation)
    fn = getattr(F, f"conv{rank}d")
    if padding_mode != "zeros":
        pad = normalize_padding(padding, tuple(w.shape[2:]), _tuple(dilation, rank),
                                _tuple(stride, rank))
        x = F.pad(x, [p for pair in reversed(pad) for p in pair], mode=padding_mode)
        padding = 0
    return fn(x, w, b, stride, padding, dilation, groups)


def _prepare(op, rank, input, weight, bias, args, torch_op) -> Call | Fallback:
    """Validate a new call as torch would; return its :class:`Call`, or the reason it runs on
    torch's op instead."""
    name = f"{'conv_transpose' if op == 'conv_transpose' else 'conv'}{rank}d"
    for position, (arg, value) in enumerate((("input", input), ("weight", weight),
                                             ("bias", bias)), start=1):
        if not isinstance(value, torch.Tensor) and not (arg == "bias" and value is None):
            raise TypeError(f"{name}(): argument '{arg}' (position {position}) must be Tensor, "
                            f"not {type(value).__name__}")
    checked = _check_arguments(op, rank, *args[:5])
    if isinstance(checked, Fallback):
        return checked
    args = (*checked, *args[5:])
    try:
        call = _prepare_call(name, op, rank, input, weight, bias, args, torch_op)
        if not isinstance(call, Fallback):
            call.config = config_of(op, rank, *args)
        return call
    except (TypeError, ValueError, RuntimeError, IndexError):
        if input.dim() == rank + 2 and input.shape[0] == 0:
            # torch's op skips most checks for an empty batch (a dilation of 0, a weight of
            # another dtype pass): it answers this call. Valid calls still get their Call.
            return Fallback("an empty batch that torch's op checks less than zeroskip")
        raise


def _prepare_call(name, op, rank, input, weight, bias, args, torch_op) -> Call | Fallback:
    """:func:`_prepare` once the arguments parsed as torch parses them."""
    tensors = [t for t in (input, weight, bias) if t is not None]
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):
        return Fallback("tensor subclasses are not covered by the C kernels")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        return Fallback("tensors on different devices")      # torch's op says which
    try:
        backend = backend_for(input)
    except ValueError as exc:
        return Fallback(str(exc))
    if backend is None:
        return Fallback(f"device {input.device.type} is not covered (CPU tensors run C kernels, "
                        "CUDA tensors Triton kernels)")
    if backend == "triton":
        problem = zt.unavailable_reason(input.device)
        if problem:
            return Fallback(problem)
    if any(t.layout != torch.strided for t in tensors):
        return Fallback("sparse or non-strided tensors are not covered by the kernels")
    if weight.dtype != input.dtype:
        raise RuntimeError(f"{name}: expected scalar type {_scalar(input.dtype)} but found "
                           f"{_scalar(weight.dtype)} (input is {input.dtype}, weight is "
                           f"{weight.dtype}; they must be the same)")
    if bias is not None and bias.dtype != input.dtype:
        if op == "conv_transpose":   # torch's CPU conv_transpose1d/2d cast it, 3d raises
            return Fallback("a transposed conv's bias of another dtype than its input")
        raise RuntimeError(f"{name}: Input type ({_scalar(input.dtype).lower()}) and bias type "
                           f"({_scalar(bias.dtype).lower()}) should be the same")
    if input.dtype not in _covered_dtypes(backend):
        names = ", ".join(_covered_dtypes(backend).values())
        return Fallback(f"dtype {input.dtype} has no {backend} kernel ({names} do)")
    _check_shapes(name, op, rank, input, weight, bias, args[3])
    if weight.shape[1] == 0 or (input.dim() == rank + 2 and not input.shape[0] and
                                0 in input.shape[2:]):
        # No channels to contract, or an empty batch of empty inputs: torch accepts some of
        # these (a spec states none), and its op answers them at once.
        return Fallback("empty operands (no contracted channels, or an empty batch of empty "
                        "inputs)")
    if _overflows_int64(op, rank, input, weight, args):
        # torch computes sizes in int64 and wraps (a dilation of 2**62 may pass its checks):
        # what it then does is its own.
        return Fallback("arguments whose sizes overflow int64")
    try:
        spec = _build_spec(op, rank, input.shape, weight.shape, bias is not None, input.dtype,
                           args)
    except LimitError as exc:   # valid, but past what the kernels index: torch's op serves it
        return Fallback("a layer beyond the kernels' limits (zeroskip.spec.LimitError)",
                        str(exc))
    except (ValueError, RuntimeError) as exc:
        if op == "conv_transpose":
            # torch's CPU op checks a batch of one and a larger batch (oneDNN) differently: a
            # dilation of 0 with a 1-tap kernel, an output size below 1 pass for 2 samples and
            # raise for 1. Its op answers each call as it would.
            return Fallback("a transposed conv zeroskip rejects (torch's op decides per batch)")
        if isinstance(exc, RuntimeError):
            raise
        raise RuntimeError(f"{name}: {exc}") from exc   # torch raises RuntimeError for these
    # A last cross-check: torch's own shape function on meta tensors.
    meta = torch_op(input.to("meta"), weight.to("meta"), None if bias is None else
                    bias.to("meta"))
    out_shape = spec.output_shape[1:]
    if tuple(meta.shape[-rank - 1:]) != out_shape:
        raise AssertionError(f"zeroskip computed output shape {out_shape} for {spec.describe()}"
                             f", torch {tuple(meta.shape)}")
    if backend == "triton":
        try:
            return TritonCall(spec, zt.kernel_for(spec), out_shape, torch_op=torch_op)
        except TRITON_BUILD_ERRORS as exc:
            return Fallback(f"the Triton kernel of {spec.describe()} failed to build",
                            f"{type(exc).__name__}: {exc}")
    try:
        kernel = kernel_for(spec)
    except BUILD_ERRORS as exc:
        return Fallback(f"the kernel of {spec.describe()} failed to build",
                        f"{type(exc).__name__}: {exc}")
    return Call(spec, kernel, out_shape, channels_last=rank == 2, torch_op=torch_op)


_INT64 = range(-2 ** 63, 2 ** 63)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_arguments(op, rank, stride, padding, dilation, groups, output_padding
                     ) -> tuple | Fallback:
    """torch's argument parser on the non-tensor arguments. First the overloads: TypeError where
    an argument has a type torch takes for none of them (a bool, a float, None, a string but
    conv's padding; of a list torch looks at the first element only). Then each argument in the
    reverse of the signature's order (as torch's C++ evaluates them): ValueError for an int
    beyond int64, TypeError for a list element that is no int (after the first a bool is one)
    or beyond int64. Returns ``(stride, padding,
    dilation, groups, output_padding)`` as plain ints, tuples of plain ints (a 1-element list
    stands for every axis, as in torch) or a padding string; or a :class:`Fallback` for what
    torch takes and this does not model (tensors, bytes)."""
    name = f"{'conv_transpose' if op == 'conv_transpose' else 'conv'}{rank}d"
    order = [("stride", stride), ("padding", padding)]
    if op == "conv_transpose":
        order += [("output_padding", output_padding), ("groups", groups), ("dilation", dilation)]
    else:
        order += [("dilation", dilation), ("groups", groups)]
    for arg, value in order:
        items = value if isinstance(value, (list, tuple)) else (value,)
        if any(isinstance(v, (torch.Tensor, bytes)) for v in items):
            return Fallback(f"a tensor or bytes as a conv's '{arg}' argument")
        ok = _is_int(value) or (arg != "groups" and isinstance(value, (list, tuple)) and
                                (not value or _is_int(value[0]))) or \
            (arg == "padding" and op != "conv_transpose" and isinstance(value, str))
        if not ok:
            raise TypeError(f"{name}() received an invalid combination of arguments: argument "
                            f"'{arg}' must be {'int' if arg == 'groups' else 'tuple of ints'}"
                            f", not {type(value).__name__}")
    plain = {}
    for arg, value in reversed(order):   # torch unpacks them last to first
        if isinstance(value, str):
            plain[arg] = str.__str__(value)
        elif _is_int(value):
            plain[arg] = operator.index(value)
            if plain[arg] not in _INT64:
                raise ValueError(f"{name}(): argument '{arg}': Overflow when unpacking long long")
        else:
            items = []
            for i, v in enumerate(value, start=1):
                if not isinstance(v, numbers.Integral):
                    raise TypeError(f"{name}(): argument '{arg}' failed to unpack the object at "
                                    f"pos {i} with error \"type must be tuple of ints,but got "
                                    f"{type(v).__name__}\"")
                items.append(operator.index(v))
                if items[-1] not in _INT64:
                    raise TypeError(f"{name}(): argument '{arg}' failed to unpack the object at "
                                    f"pos {i} with error \"Overflow when unpacking long long\"")
            plain[arg] = tuple(items * rank if len(items) == 1 else items)
    return (plain["stride"], plain["padding"], plain["dilation"], plain["groups"],
            plain.get("output_padding", output_padding))


def _per_axis(rank, args) -> list[tuple[int, ...]] | None:
    """(stride, padding, dilation, output_padding) per axis, or None where they are not
    ``rank`` ints each (a padding string, a wrong length: the spec reports those)."""
    per_axis = [v if isinstance(v, tuple) else (v,) * rank
                for v in (args[0], args[1], args[2], args[4])]
    if any(len(v) != rank or not all(isinstance(n, int) for n in v) for v in per_axis):
        return None
    return per_axis


def _overflows_int64(op, rank, input, weight, args) -> bool:
    """Whether a size torch computes from the arguments (kernel extent, padded input, output)
    leaves int64."""
    per_axis = _per_axis(rank, args)
    if per_axis is None:
        return False
    for n, k, s, p, d, o in zip(input.shape[-rank:], weight.shape[2:], *per_axis):
        extent = d * (k - 1) + 1
        sizes = (extent, n + 2 * p, (n - 1) * s - 2 * p + extent + o) if op == "conv_transpose" \
            else (extent, n + 2 * p, n + 2 * p - extent)
        if any(v not in _INT64 for v in sizes):
            return True
    return False


def _check_shapes(name, op, rank, input, weight, bias, groups) -> None:
    """torch's checks of the tensors' shapes, with torch's messages (RuntimeError)."""
    if input.dim() not in (rank + 1, rank + 2):
        raise RuntimeError(f"Expected {rank + 1}D (unbatched) or {rank + 2}D (batched) input to "
                           f"{name}, but got input of size: {list(input.shape)}")
    if weight.dim() != rank + 2:
        raise RuntimeError(f"{name}: expected weight to be {rank + 2}-dimensional, but got "
                           f"weight of size {list(weight.shape)}")
    if not isinstance(groups, int) or isinstance(groups, bool):
        raise TypeError(f"{name}(): argument 'groups' must be int, not {type(groups).__name__}")
    if groups <= 0:
        raise RuntimeError(f"non-positive groups is not supported (groups={groups})")
    if weight.shape[0] % groups:
        raise RuntimeError(f"Given groups={groups}, expected weight to be divisible by {groups} "
                           f"at dimension 0, but got weight of size {list(weight.shape)} instead")
    channels = input.shape[-rank - 1]
    if op == "conv_transpose":
        expected, out = weight.shape[0], weight.shape[1] * groups
        what = "transposed=1"
    else:
        expected, out = weight.shape[1] * groups, weight.shape[0]
        what = f"groups={groups}"
    if channels != expected:
        raise RuntimeError(f"Given {what}, weight of size {list(weight.shape)}, expected "
                           f"input{list(input.shape)} to have {expected} channels, but got "
                           f"{channels} channels instead")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out):
        raise RuntimeError(f"Given weight of size {list(weight.shape)}, expected bias to be "
                           f"1-dimensional with {out} elements, but got bias of size "
                           f"{list(bias.shape)} instead")


def _scalar(dtype: torch.dtype) -> str:
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
            torch.bfloat16: "BFloat16"}.get(dtype, str(dtype).removeprefix("torch."))
