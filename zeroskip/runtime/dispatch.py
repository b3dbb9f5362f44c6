"""Dispatch: per call, which of a layer's candidates runs; the one place that decides.

An :class:`Operator` is a prepared forward operator on one backend (C on CPU tensors, Triton on
CUDA tensors or under Triton's interpreter): its spec, its dense kernel and, built on first
use, the variants the decision picks. A layer's gradient operators
(:class:`.gradients.GradientOperator`) are decided the same way. Per call it runs

* what the operator's tuning records on this machine chose (an active bundle's records for a
  layer the bundle was generated for, else the tuning database's), at the batch bucket nearest
  the call's and the density nearest the input's; an operator tuned alike everywhere needs no
  density at all; records that timed kernels the compiler no longer makes are ignored
  (:func:`.autotune.fresh`);
* with autotuning in the loop on (:mod:`.online`), where no record covers the call's batch and
  density, every candidate on the call's own operands, recording the fastest;
* untuned, on the C backend the sparse kernel below the cost model's crossover density and
  the dense one above (forward and gradients alike: the weight gradient's data operand is the
  layer's input, the input gradient's the output gradient, sparse where the layer's own ReLU
  masked it); on the Triton backend the dense kernel (the block-sparse family pays off on
  structured zeros only, which only a measurement can tell).

The input's density: on the CPU it is measured per call (sampled in C, microseconds). On a GPU
reading it back synchronizes, so it is the density declared for the layer (by the caller with
:func:`declare_density`, or traced into an active bundle), else one measured on the first call
and every :data:`MEASURE_EVERY` calls after. ``ZEROSKIP_SPARSE=0`` always runs the dense kernel.

What ran is observable: :func:`observe` collects a :class:`Dispatched` per call.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import threading
import time
from typing import Any, Callable, Iterator

import torch

from ..codegen.lower import walks_output_gradient
from ..codegen.variant import Variant
from ..spec import LayerSpec
from . import autotune, bundle, env, kernels, loader, online, stats, tuning
from .kernels import Kernel

MEASURE_EVERY = 256        # GPU calls between two density measurements (each one syncs)
TUNE = "<tune>"            # what choose() answers where autotuning in the loop tunes the call


@dataclasses.dataclass(frozen=True)
class Dispatched:
    """What one call ran: ``choice`` is 'torch' or a variant name ('dense', 'sparse/v2',
    'dense/m64n64k32w4s3'); ``density`` the input density it decided on (1.0 where the
    decision needed none)."""

    spec: LayerSpec
    backend: str
    choice: str
    density: float
    operator: "Operator"


_observers: list[list[Dispatched]] = []
_observers_lock = threading.Lock()


@contextlib.contextmanager
def observe() -> Iterator[list[Dispatched]]:
    """Collect what every call of an operator (forward or gradient) dispatched meanwhile (in
    this process)::

        with dispatch.observe() as ran:
            model(x)
        print([d.choice for d in ran])
    """
    seen: list[Dispatched] = []
    with _observers_lock:
        _observers.append(seen)
    try:
        yield seen
    finally:
        with _observers_lock:
            _observers.remove(seen)


_declared: dict[str, float] = {}


def declare_density(spec: LayerSpec, density: float | None) -> None:
    """Declare the input density of a layer's calls (None: forget it): the GPU dispatch uses it
    instead of measuring."""
    key = tuning.spec_key(spec)
    if density is None:
        _declared.pop(key, None)
    elif not 0.0 <= float(density) <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density!r}")
    else:
        _declared[key] = float(density)


SAMPLE_RUN = 16        # contiguous elements per sample of a contiguous tensor: a cache line


def sampled_density(t: torch.Tensor, samples: int = 16384) -> float:
    """The share of non-zeros in ``t`` from about ``samples`` elements (tens of microseconds):
    of a contiguous tensor, runs of :data:`SAMPLE_RUN` contiguous elements at a fixed stride
    (a cache line each, where single elements at that stride would touch one line apiece);
    else single elements at a fixed stride."""
    n = t.numel()
    if t.is_contiguous() and n > samples:
        runs = samples // SAMPLE_RUN
        picked = t.reshape(-1).as_strided((runs, SAMPLE_RUN), (n // runs, 1))
        return float(picked.ne(0).sum()) / picked.numel()
    flat = t.reshape(-1)
    picked = flat[::max(1, n // samples)]
    return float(torch.count_nonzero(picked)) / max(1, picked.numel())


def next_variants(spec: LayerSpec, kernel: Kernel) -> list[str]:
    """The variants besides the dense kernel (``kernel``, C) that untuned dispatch may load for
    ``spec``: the sparse one where the cost model may pick it (a crossover above 0), and a
    weight gradient's walk of the output gradient's zeros."""
    names = ["sparse"] if kernel.crossover > 0 else []
    if spec.op == "conv_grad_weight" and walks_output_gradient(kernel.plan):
        names.append("sparse/rhs")
    return names


def variants_of(spec: LayerSpec, always: bool = False) -> Callable[[Kernel], None]:
    """What to do once ``spec``'s dense kernel is built: build its :func:`next_variants`."""
    def then(dense: Kernel) -> None:
        for name in next_variants(spec, dense):
            loader.ahead(spec, "c", Variant.parse(name), always=always)
    return then


def build_variants_ahead(spec: LayerSpec, kernel: Kernel) -> None:
    """Start building in the background (:func:`.loader.ahead`) the variants of
    :func:`next_variants` of ``spec``, whose dense C kernel is ``kernel``: a layer's next calls
    may load them."""
    variants_of(spec)(kernel)


class Operator:
    """A prepared forward operator; see the module docstring for what :meth:`run` decides.
    ``torch_op(x, weight, bias)``: torch's op for the same call, run where tuning chose it."""

    def __init__(self, spec: LayerSpec, kernel: Kernel, out_shape: tuple[int, ...],
                 torch_op: Callable | None = None, layer: LayerSpec | None = None):
        self.spec, self.forward, self.out_shape, self.torch_op = spec, kernel, out_shape, torch_op
        self.layer = layer or spec        # the forward layer: what a bundle is generated for
        self.backend = kernel.backend
        self.default = "dense" if self.backend == "c" else kernel.default.name
        self.config = ""                  # the arguments as the custom op takes them
        self.last = self.default          # what the latest call ran
        self.last_density = 1.0           # the density the latest call decided on
        self.gradients_asked = False      # its gradients' kernels asked for (and, building
                                          # in the background, built)
        self._resolved: dict[str, tuple[Variant | None, Kernel]] = {
            self.default: (kernel.default, kernel)}
        self._tuned: tuple = (None, None, None)  # (records' source, records, their one choice)
        self._bundled: tuple = (None, None)      # (its key, a covering bundle's records)
        # (bundles' generation, the covering bundle, the density it traced for this layer)
        self._served: tuple = (None, None, None)
        self._measured: tuple[int, float] = (0, 1.0)   # (GPU calls since measured, density)
        self._key = tuning.spec_key(spec)        # the layer's shape, as densities are declared

    # ------------------------------------------------------------------ the decision
    def choose(self, x: torch.Tensor, other: torch.Tensor | None = None) -> str:
        """The candidate to run on ``x`` (batched, as the kernel reads it; ``other``: the second
        operand): a variant name, 'torch', or :data:`TUNE` where autotuning in the loop tunes
        this call."""
        self.last_density = 1.0
        if env.get("ZEROSKIP_SPARSE", "1") == "0":
            return self.default
        online_on = online.current_mode() != "off"
        tuner = online_on and online.tuner()
        if online_on and not tuner:
            tuning.refresh()        # another rank tunes: read what it saved
        records, same = self._records(x.device)
        # Calls without a record are tuned here unless a bundle, whose records are final,
        # serves the layer (_records has just looked for one).
        tunes = tuner and self._served[1] is None
        if same is not None and not tunes:   # tuned alike at every density: no need to measure
            return same
        if not x.numel():
            return self.default
        if not records and not tunes and not self._untuned_measures():
            return self.default
        density = self.last_density = self.density(x)
        if tunes and (not records or
                      tuning.bucket_key(density, x.shape[0]) not in records):
            return TUNE
        if records:
            return tuning.nearest(records, density, x.shape[0])["choice"]
        return self.untuned(x, other)

    def _untuned_measures(self) -> bool:
        """Whether the untuned decision needs the input's density: only the C sparse kernel has
        a cost model."""
        return self.backend == "c" and self.forward.crossover > 0

    def untuned(self, x: torch.Tensor, other: torch.Tensor | None = None) -> str:
        """The cost model's choice (``last_density`` measured): the sparse kernel below its
        crossover density."""
        if self.backend == "c" and self.last_density < self.forward.crossover:
            return "sparse"
        return self.default

    def density(self, x: torch.Tensor) -> float:
        """The density the decision uses (see the module docstring)."""
        if self.backend == "c":
            return self.forward.density(x)
        declared = _declared.get(self._key)
        if declared is None:
            declared = self._served[2]
        if declared is not None:
            return declared
        calls, density = self._measured
        if calls % MEASURE_EVERY == 0:
            density = self.forward.density(x)
        self._measured = (calls + 1, density)
        return density

    def _records(self, device: torch.device) -> tuple[dict | None, str | None]:
        """This operator's tuned records on this machine, and their choice if they all agree:
        an active bundle's for a layer it was generated for (the tuning database is not read
        then, for the layer's gradients either), else the tuning database's."""
        generation = bundle.generation()
        if self._served[0] != generation:
            served = self._covering()
            self._served = (generation, served,
                            None if served is None else self._traced_density(served))
        served = self._served[1]
        if served is not None:
            key: Any = ("bundle", generation) if self.backend == "c" else \
                ("bundle", generation, device, torch.backends.cudnn.allow_tf32)
            if self._bundled[0] != key:
                # Triton's records only where tuned on this GPU (else the database's are read)
                machine = None if self.backend == "c" else \
                    tuning.machine_of(self.backend, device)[0]
                self._bundled = (key, served.records(self.spec, self.backend, machine))
            if self.backend == "c" or self._bundled[1] is not None:
                if self._tuned[0] != key:
                    self._adopt(key, self._bundled[1])
                return self._tuned[1], self._tuned[2]
        db = tuning.database()
        key = db.generation if self.backend == "c" else \
            (db.generation, device, torch.backends.cudnn.allow_tf32)
        if self._tuned[0] != key:
            self._adopt(key, tuning.records(self.spec, self.backend, device))
        return self._tuned[1], self._tuned[2]

    def _covering(self) -> Any:
        """The active bundle generated for this operator's layer, or None."""
        return bundle.covering(self.layer)

    def _traced_density(self, served: Any) -> float | None:
        """The density a covering bundle traced for this operator's data operand."""
        return served.density(self.layer)

    def _adopt(self, key: Any, records: dict | None) -> None:
        """Follow ``records`` (from the source ``key`` names) from now on, less those that
        timed kernels the compiler no longer makes (:func:`.autotune.fresh`)."""
        records = autotune.fresh(self.spec, self.backend, records, self.default,
                                 retuned=online.current_mode() != "off")
        choices = {r["choice"] for r in records.values()} if records else set()
        self._tuned = (key, records, choices.pop() if len(choices) == 1 else None)

    def resolve(self, name: str) -> tuple[Variant | None, Kernel]:
        """The variant and kernel of choice ``name`` (built on first use); one that cannot be
        built warns once and resolves to the dense kernel."""
        found = self._resolved.get(name)
        if found is None:
            try:
                variant = Variant.parse(name)
                if self.backend == "c" and loader.background():
                    kernel = loader.ready(self.spec, self.backend, variant)
                    if kernel is None:      # compiling in the background: dense meanwhile
                        return self._resolved[self.default]
                    found = (variant, kernel)
                else:
                    found = (variant, loader.kernel_for(self.spec, self.backend, variant))
            except (ValueError, *loader.BUILD_ERRORS) as exc:
                stats.fallback(f"variant {name} of {self.spec.describe()} failed to build; the "
                               "dense kernel runs instead", f"{type(exc).__name__}: {exc}")
                found = self._resolved[self.default]
            self._resolved[name] = found
        return found

    # ------------------------------------------------------------------ running
    def run(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        """The layer on ``x`` (batched, as :meth:`prepare` gives it)."""
        choice = self.choose(x, weight)
        if choice is TUNE:
            out = self._tune_here(x, weight, bias)
            if out is not None:
                return out
            choice = self.untuned(x, weight)
        if choice == "torch" and self.torch_op is None:
            choice = self.default     # torch's op cannot run this call's arguments
        if choice == "torch":
            self.last = "torch"
            stats.add("torch_choices")
            self._notify("torch")
            return self.torch_op(x, weight, bias)
        variant, kernel = self.resolve(choice)
        if variant is self._resolved[self.default][0]:
            choice = self.default
        elif variant.strategy == "sparse":
            stats.add("sparse_calls")
        else:
            stats.add("variant_calls")
        self.last = choice
        self._notify(choice)
        return self.launch(kernel, x, weight, bias, variant)

    # ------------------------------------------------------------------ tuning in the loop
    def candidates(self, density: float) -> list[str]:
        """What autotuning in the loop weighs at ``density``: torch's op (where it runs this
        call's arguments), the default kernel and the target's variants (mode 'on': only the
        sparse kernels among them; 'all': every one)."""
        side = loader.RUNTIMES[self.backend].target()
        names = [v.name for v in side.variants(self.forward.plan, density)]
        if online.current_mode() != "all":
            names = [n for n in names if n in ("sparse", "sparse/rhs")]
        first = ["torch"] if self.torch_op is not None else []
        return first + [self.default] + [n for n in names if n != self.default]

    def _tune_here(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
                   ) -> torch.Tensor | None:
        """Tune this call's case on its operands (see :mod:`.online`), record the winner and
        return the first candidate's result; None where it cannot tune now (kernels still
        building in the background, the budget spent): the cost model decides this call."""
        if not loader.quiet() or not online.budget_left():
            return None
        start = time.perf_counter()
        density, batch = self.last_density, x.shape[0]
        runs: dict[str, Callable[[], torch.Tensor]] = {}
        identities: dict[str, str] = {}
        for name in self.candidates(density):
            if name == "torch":
                runs[name] = functools.partial(self.torch_op, x, weight, bias)
                continue
            try:
                variant = Variant.parse(name)
                if name in self._resolved:
                    kernel = self._resolved[name][1]
                elif self.backend == "c" and loader.background():
                    kernel = loader.ready(self.spec, self.backend, variant)
                    if kernel is None:
                        return None     # building in the background: tune on a later call
                else:
                    kernel = loader.kernel_for(self.spec, self.backend, variant)
            except (ValueError, *loader.BUILD_ERRORS):
                continue                # not built here: not a candidate
            runs[name] = functools.partial(self.launch, kernel, x, weight, bias, variant)
            identities[name] = kernel.identity
        first = next(iter(runs))
        label = f"{self.spec.describe()} at batch {batch}, density {density:.2f}"
        launched = stats.stats()["kernel_calls"]
        out, ms, errors = online.tune(label, runs, first, self.spec.dtype, x.device)
        # kernel_calls counts the calls' kernels, not the tuning's runs of them
        stats.add("kernel_calls", launched - stats.stats()["kernel_calls"])
        choice = min(ms, key=lambda n: (ms[n], n != "torch"))
        machine, print_ = tuning.machine_of(self.backend, x.device)
        db = tuning.database()
        db.record(self.spec, density, choice, ms, machine=machine, print_=print_,
                  batch=batch, kernels={n: k for n, k in identities.items() if n not in errors})
        try:
            db.save()
        except OSError as exc:          # a read-only cache: the choice holds in this process
            online.cannot_save(db.path, exc)
        stats.add("tuned_cases")
        stats.add("tuning_seconds", time.perf_counter() - start)
        self.last = first
        self._notify(first)
        return out

    def _notify(self, choice: str) -> None:
        if _observers:
            record = Dispatched(self.spec, self.backend, choice, self.last_density, self)
            for seen in list(_observers):
                seen.append(record)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward.prepare(x)

    def launch(self, kernel: Kernel, x: torch.Tensor, weight: torch.Tensor,
               bias: torch.Tensor | None, variant: Variant | None = None) -> torch.Tensor:
        """Run one of this operator's kernels on ``x`` (batched, prepared)."""
        return kernels.launch(kernel, x, weight, bias, variant)
