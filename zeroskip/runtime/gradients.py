"""A layer's gradients, in one home.

The input gradient and the weight gradient of a convolution are convolutions again
(``LayerSpec.grad_input()`` and ``grad_weight()``: a transposed convolution split into its
phases, a weight gradient over only the real taps). Here they become operators
(:class:`GradientOperator`, decided per call as the forward is, :mod:`.dispatch`); a call's pair
is found by its config in one lookup (:func:`of`) and run (:meth:`LayerGradients.run`); their
kernels are built ahead while the forward runs (:func:`build_ahead`, :func:`ready`). The
autograd formulas that call them are in :mod:`.binding`; torch's own gradient ops, which serve
what no kernel covers, in :mod:`.reference`.
"""
from __future__ import annotations

import dataclasses
import threading

import torch

from ..codegen.cost import WEIGHT_GRAD_RHS_CROSSOVER
from ..codegen.lower import walks_output_gradient
from ..spec import LayerSpec, LimitError
from . import bundle, loader, reference, stats
from .arguments import parse_config, spec_from_config
from .dispatch import Operator, sampled_density, variants_of
from .stats import Fallback
from .triton_kernel import TritonLaunchError

WHICH = ("input", "weight")


def specs(spec: LayerSpec) -> list[LayerSpec]:
    """The input and weight gradients of ``spec`` that a spec states (torch's op computes the
    others)."""
    found = []
    for derive in (spec.grad_input, spec.grad_weight):
        try:
            found.append(derive())
        except ValueError:
            pass
    return found


def build_ahead(spec: LayerSpec) -> None:
    """Start building the C kernels of ``spec``'s gradients in the background (then the
    variants the dispatch may load for them): its backward will ask for them."""
    for grad in specs(spec):
        loader.ahead(grad, "c", then=variants_of(grad))


def ready(spec: LayerSpec) -> bool:
    """Whether the input and weight gradients' kernels of ``spec`` (C) are loaded; those not
    are being built in the background (then the variants dispatch may load for them)."""
    done = True
    for grad in specs(spec):
        try:
            done = loader.ready(grad, "c", then=variants_of(grad, always=True)) is not None \
                and done
        except loader.BUILD_ERRORS:
            pass        # its gradient operator falls back to torch's op, with the warning
    return done


class GradientOperator(Operator):
    """The input or the weight gradient of a layer as an operator: ``spec`` is the layer's
    ``grad_input()`` or ``grad_weight()``, ``run(lhs, rhs, None)`` takes the gradient kernel's
    operands (the output gradient and the weight; the input and the output gradient, in the
    order the spec contracts them), ``out_shape`` is the input gradient's per-sample shape or
    the weight gradient's whole one, ``layer`` the forward layer, ``crop`` the layer's
    :attr:`~zeroskip.spec.LayerSpec.gradient_crop` (trailing output-gradient elements the
    kernels do not read)."""

    def __init__(self, *args, crop: tuple[int, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.crop = crop
        plan = getattr(self.forward, "plan", None)
        # A weight gradient whose sparse kernel can walk the output gradient's zeros instead.
        self.rhs_walk = self.backend == "c" and plan is not None and \
            walks_output_gradient(plan)

    def _untuned_measures(self) -> bool:
        return self.rhs_walk or super()._untuned_measures()

    def untuned(self, x: torch.Tensor, other: torch.Tensor | None = None) -> str:
        """As :meth:`Operator.untuned`; and a weight gradient whose output gradient
        (``other``) is sparser than its input and than ``WEIGHT_GRAD_RHS_CROSSOVER`` (where a
        ReLU masked it) runs the sparse kernel that walks the output gradient
        (``sparse/rhs``)."""
        choice = super().untuned(x)
        if self.rhs_walk and other is not None and other.numel():
            density = sampled_density(other)
            if density < WEIGHT_GRAD_RHS_CROSSOVER and density < self.last_density:
                self.last_density = density
                return "sparse/rhs"
        return choice

    def _covering(self):
        # The backward does not know whether the layer has a bias: either spec is the layer.
        return bundle.covering(self.layer) or \
            bundle.covering(dataclasses.replace(self.layer, bias=not self.layer.bias))

    def _traced_density(self, served) -> float | None:
        """The input gradient runs on the output gradient (its traced density), the weight
        gradient on the layer's input."""
        of = "grad_density" if self.spec.op == "conv_grad_input" else "density"
        return served.density(self.layer, of) if served.covers(self.layer) else \
            served.density(dataclasses.replace(self.layer, bias=not self.layer.bias), of)


class LayerGradients:
    """The gradients of one call's layer (its config, the input's shape less the batch, the
    weight's shape, the dtype and the backend): each :class:`GradientOperator` built on first
    use (or the :class:`~.stats.Fallback` saying why there is none)."""

    def __init__(self, config: str, input_shape: tuple, weight_shape: tuple, dtype,
                 backend: str):
        self.config, self.backend, self.dtype = config, backend, dtype
        self.op, self.rank = parse_config(config)[:2]
        self.batched = len(input_shape) == self.rank + 2
        self.input_shape = tuple(input_shape[-self.rank - 1:])     # one sample's
        self.weight_shape = tuple(weight_shape)
        self._operators: dict[str, GradientOperator | Fallback] = {}

    def operator(self, which: str) -> GradientOperator | Fallback:
        """The operator of the ``which`` ('input' or 'weight') gradient, or why none runs."""
        found = self._operators.get(which)
        if found is None:
            found = self._operators[which] = self._make(which)
        return found

    def _make(self, which: str) -> GradientOperator | Fallback:
        spec = spec_from_config(self.config, self.input_shape[1:], self.weight_shape, False,
                                self.dtype)
        try:
            grad_spec = spec.grad_input() if which == "input" else spec.grad_weight()
            kernel = loader.kernel_for(grad_spec, self.backend)
        except (LimitError, *loader.BUILD_ERRORS) as exc:
            where = "Triton kernel" if self.backend == "triton" else "generated kernel"
            return Fallback(f"no {where} for the {which} gradient of {spec.torch_name}",
                            f"{type(exc).__name__}: {exc}")
        out_shape = self.input_shape if which == "input" else self.weight_shape
        return GradientOperator(grad_spec, kernel, out_shape, self._torch_op(which, spec),
                                layer=spec, crop=spec.gradient_crop)

    def _torch_op(self, which: str, spec: LayerSpec):
        """torch's own gradient op as a candidate of the operator (None where torch has
        none for this call): it reads the whole output gradient, so the cropped elements come
        back as zeros."""
        if not reference.has_gradient(spec):
            return None
        run = reference.gradient_of(which, spec, spec.op == "conv_transpose")
        crop = spec.gradient_crop
        whole = [p for c in reversed(crop) for p in (0, c)] if any(crop) else None
        input_shape, weight_shape = self.input_shape, self.weight_shape

        def uncrop(g):
            return g if whole is None else torch.nn.functional.pad(g, whole)
        if which == "input":
            def torch_op(g, w, _bias):
                return run(uncrop(g), w, (g.shape[0], *input_shape))
        else:
            def torch_op(lhs, rhs, _bias):
                x, g = (rhs, lhs) if spec.op == "conv_transpose" else (lhs, rhs)
                return run(uncrop(g), x, weight_shape)
        return torch_op

    def run(self, which: str, grad: torch.Tensor, other: torch.Tensor, size: tuple
            ) -> torch.Tensor:
        """The input gradient (``other``: the weight, ``size``: the input's shape) or the
        weight gradient (``other``: the input, ``size``: the weight's shape) of the call."""
        if not grad.numel() or not other.numel():
            # An empty output (or operand) meets nothing: its gradients are zeros, no kernel's.
            return grad.new_zeros(size)
        operator = self.operator(which)
        if isinstance(operator, Fallback):
            stats.fallback(operator.reason, operator.detail)
            return reference.gradient(which, grad, other, size, self.config)
        rank = self.rank
        if any(operator.crop):      # trailing outputs no input reaches (LayerSpec.gradient_crop)
            grad = grad[(..., *(slice(0, n - c) for n, c in zip(grad.shape[-rank:],
                                                                operator.crop)))]
        g = operator.prepare(grad if self.batched else grad.unsqueeze(0))
        try:
            if which == "input":
                out = operator.run(g, other, None)
                return out if self.batched else out.squeeze(0)
            x = operator.prepare(other if self.batched else other.unsqueeze(0))
            return operator.run(*((g, x) if self.op == "conv_transpose" else (x, g)), None)
        except TritonLaunchError as exc:
            stats.fallback(f"no Triton kernel for the {which} gradient of this layer",
                           f"{type(exc).__name__}: {exc}")
            return reference.gradient(which, grad, other, size, self.config)


_layers: dict[tuple, LayerGradients] = {}
_lock = threading.Lock()
MAX_LAYERS = 4096


def of(config: str, input_shape: tuple, weight_shape: tuple, dtype, backend: str
       ) -> LayerGradients:
    """The :class:`LayerGradients` of a call (``input_shape``: the input's, batched or not):
    one dict lookup on a training step's path, made on the first."""
    key = (config, tuple(input_shape[1:]), tuple(weight_shape), dtype, backend)
    found = _layers.get(key)
    if found is None:
        found = LayerGradients(config, tuple(input_shape), tuple(weight_shape), dtype, backend)
        with _lock:
            if len(_layers) >= MAX_LAYERS:
                _layers.clear()
            found = _layers.setdefault(key, found)
    return found


def forget() -> None:
    """Forget every call's gradient operators (they are made again on next use)."""
    with _lock:
        _layers.clear()
