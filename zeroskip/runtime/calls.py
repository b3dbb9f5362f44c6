"""Call preparation: from a call's arguments to what runs it, once per layer shape.

:func:`lookup` is the per-call lookup: one dict lookup keyed by everything but the batch size.
On a miss (the first call of a shape) :func:`prepare` validates the arguments exactly as torch
does (:mod:`.arguments`, torch's checks in torch's order) and prepares an
:class:`~.dispatch.Operator` on the tensors' backend: CPU tensors run the C kernels, CUDA
tensors the Triton kernels, and ``ZEROSKIP_BACKEND=triton`` with ``TRITON_INTERPRET=1`` runs CPU
tensors through the Triton kernels under Triton's interpreter (how they are tested without a
GPU). What no kernel covers gets a :class:`~.stats.Fallback` (torch's op answers it, with its
one warning); a kernel still compiling in the background a :class:`Building`; a transposed conv
that torch accepts for some batch sizes only a :class:`PerBatch`.
"""
from __future__ import annotations

import torch

from ..spec import LimitError
from . import env, loader, reference, tritonenv
from .arguments import (COVERED_DTYPES, TorchDecides, check_arguments, check_call, config_of,
                        degenerate_transpose, key_of, overflows_int64, spec_of_call)
from .dispatch import Operator, build_variants_ahead
from .stats import Fallback

BACKEND_CHOICES = tuple(COVERED_DTYPES)      # what ZEROSKIP_BACKEND may name
_calls: dict[tuple, "Operator | Fallback | Building | PerBatch"] = {}


def forget() -> None:
    """Forget every prepared call (each is prepared again on its next call)."""
    _calls.clear()


def settle(key: tuple | None, call: Fallback) -> None:
    """From now on the calls of ``key`` (:func:`lookup`'s) run torch's op, as ``call`` says
    why (a kernel that failed to launch)."""
    if key is not None:
        _calls[key] = call


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
    wanted = env.get("ZEROSKIP_BACKEND", "") or "c"
    if wanted not in BACKEND_CHOICES:
        raise ValueError(f"ZEROSKIP_BACKEND must be one of {BACKEND_CHOICES}, got {wanted!r}")
    return wanted


def covered_dtypes(backend: str | None) -> dict:
    return COVERED_DTYPES.get(backend, {})


def lookup(op: str, rank: int, input, weight, bias, args: tuple
           ) -> tuple[tuple | None, Operator | Fallback]:
    """The key and the prepared :class:`Operator` (or :class:`Fallback`) of a call: one dict
    lookup keyed by everything but the batch size, else :func:`prepare` (which raises what
    torch raises). The key is None where the arguments are not hashable."""
    stride, padding, dilation, groups, output_padding, padding_mode, activation = args
    try:
        key = (op, rank, input.dtype, input.device, env.get("ZEROSKIP_BACKEND"),
               input.dim(), input.shape[1:], weight.dtype, weight.device, weight.shape,
               None if bias is None else (bias.dtype, bias.device, bias.shape),
               # (key_of keeps 1, True and 1.0 apart; a plain int is its own key)
               stride if type(stride) is int else key_of(stride),
               padding if type(padding) is int else key_of(padding),
               dilation if type(dilation) is int else key_of(dilation),
               groups if type(groups) is int else key_of(groups),
               output_padding if type(output_padding) is int else key_of(output_padding),
               padding_mode, activation)
        call = _calls.get(key)
    except (AttributeError, TypeError):   # not tensors, unhashable arguments: torch says why
        key, call = None, None
    if call is None or (type(call) is Building and call.built()):
        call = prepare(op, rank, input, weight, bias, args, torch_op_of(op, rank, args))
        if key is not None:
            _calls[key] = call
    return key, call


class Building:
    """A call whose kernel compiles in the background (``ZEROSKIP_COMPILE=background``):
    torch's op serves it meanwhile, with torch's autograd (counted in ``compiling_calls``, no
    warning: nothing failed), and the call is prepared again once the kernel is built."""

    def __init__(self, spec, backend: str):
        self.spec, self.backend = spec, backend

    def built(self) -> bool:
        return loader.settled(self.spec, self.backend)


def torch_op_of(op: str, rank: int, args: tuple):
    """torch's op for a call's arguments, as ``(x, weight, bias) -> output``."""
    def torch_op(x, w, b):
        return reference.convolution(op, rank, x, w, b, *args)
    return torch_op


def prepare(op, rank, input, weight, bias, args, torch_op) -> Operator | Fallback:
    """Validate a new call as torch would (its checks in its order, by
    :func:`.arguments.check_call`); return its :class:`Operator`, or the reason it runs on
    torch's op instead."""
    name = f"{'conv_transpose' if op == 'conv_transpose' else 'conv'}{rank}d"
    for position, (arg, value) in enumerate((("input", input), ("weight", weight),
                                             ("bias", bias)), start=1):
        if not isinstance(value, torch.Tensor) and not (arg == "bias" and value is None):
            raise TypeError(f"{name}(): argument '{arg}' (position {position}) must be Tensor, "
                            f"not {type(value).__name__}")
    parsed = check_arguments(op, rank, *args[:5], expand=False)
    if isinstance(parsed, Fallback):
        return parsed
    unmodelled = _unmodelled(input, weight, bias)
    if unmodelled is not None:
        return unmodelled
    checked = check_call(name, op, rank, input, weight, bias, parsed, args[5])
    if isinstance(checked, TorchDecides):
        torch_op(input, weight, bias)   # raises what torch raises for this call, if anything:
        return checked                  # else its op answers such calls
    args = (*checked, *args[5:])
    try:
        call = _prepare_call(name, op, rank, input, weight, bias, args, torch_op)
        if isinstance(call, Operator) and not call.config:
            call.config = config_of(op, rank, *args)
        return call
    except (TypeError, ValueError, RuntimeError, IndexError):
        if input.dim() == rank + 2 and input.shape[0] == 0:
            # torch's op skips most checks for an empty batch (a dilation of 0, a weight of
            # another dtype pass): it answers this call. Valid calls are still prepared.
            return Fallback("an empty batch that torch's op checks less than zeroskip")
        raise


def _unmodelled(input, weight, bias) -> Fallback | None:
    """Why torch checks this call along another path than :func:`.arguments.check_call` takes,
    if it does: a tensor subclass (its __torch_function__), a non-strided or nested tensor, a
    complex input (complex_convolution checks the operands' types first), a device off the CPU
    and CUDA (meta kernels). torch's op answers these."""
    tensors = [t for t in (input, weight, bias) if t is not None]
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in tensors):
        return Fallback("tensor subclasses are not covered by the C kernels")
    if any(t.layout != torch.strided or t.is_nested for t in tensors):
        return Fallback("sparse or non-strided tensors are not covered by the kernels")
    if input.is_complex():
        return Fallback(f"dtype {input.dtype} is not covered by the kernels")
    for t in tensors:
        if t.device.type not in ("cpu", "cuda"):
            return Fallback(f"device {t.device.type} is not covered (CPU tensors run C kernels, "
                            "CUDA tensors Triton kernels)")
    return None


def _prepare_call(name, op, rank, input, weight, bias, args, torch_op) -> Operator | Fallback:
    """:func:`prepare` once the call passed torch's checks (the transposed conv's faults torch's
    verdict on depends on the batch aside)."""
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
        problem = tritonenv.problem(input.device)
        if problem:
            return Fallback(problem)
    if any(t.layout != torch.strided for t in tensors):
        return Fallback("sparse or non-strided tensors are not covered by the kernels")
    if input.dtype not in covered_dtypes(backend):
        names = ", ".join(covered_dtypes(backend).values())
        return Fallback(f"dtype {input.dtype} has no {backend} kernel ({names} do)")
    if weight.shape[1] == 0 or (input.dim() == rank + 2 and not input.shape[0] and
                                0 in input.shape[2:]):
        # No channels to contract, or an empty batch of empty inputs: torch accepts some of
        # these (a spec states none), and its op answers them at once.
        return Fallback("empty operands (no contracted channels, or an empty batch of empty "
                        "inputs)")
    if overflows_int64(op, rank, input, weight, args):
        # torch computes sizes in int64 and wraps (a dilation of 2**62 may pass its checks):
        # what it then does is its own.
        return Fallback("arguments whose sizes overflow int64")
    groups = args[3]
    try:
        spec = spec_of_call(op, rank, input.shape, weight.shape, bias is not None, input.dtype,
                           args)
    except LimitError as exc:   # valid, but past what the kernels index: torch's op serves it
        return Fallback("a layer beyond the kernels' limits (zeroskip.spec.LimitError)",
                        str(exc))
    except (ValueError, RuntimeError) as exc:
        if op == "conv_transpose":
            degenerate = degenerate_transpose(rank, input, weight, args)
            if degenerate is not None:
                plain, check, out = degenerate
                if not all(out):
                    return PerBatch(None, check, (weight.shape[1] * groups, *out),
                                    config_of(op, rank, *args))
                call = _prepare_call(name, op, rank, input, weight, bias, plain, torch_op)
                if isinstance(call, Operator):
                    call.config = config_of(op, rank, *plain)
                    return PerBatch(call, check, call.out_shape, call.config)
                return call
            # Other faults torch's CPU op checks per batch size (its message differs for a
            # batch of one and a larger one): its op answers each call as it would.
            return Fallback("a transposed conv zeroskip rejects (torch's op decides per batch)")
        if isinstance(exc, RuntimeError):
            raise
        raise RuntimeError(f"{name}: {exc}") from exc   # torch raises RuntimeError for these
    # A last cross-check: torch's own shape function on meta tensors.
    meta = torch_op(input.to("meta"), weight.to("meta"), None if bias is None else
                    bias.to("meta"))
    out_shape = spec.output_shape()[1:]
    if tuple(meta.shape[-rank - 1:]) != out_shape:
        raise AssertionError(f"zeroskip computed output shape {out_shape} for {spec.describe()}"
                             f", torch {tuple(meta.shape)}")
    try:
        if backend == "c" and loader.background() and loader.ready(
                spec, backend, then=lambda built: build_variants_ahead(spec, built)) is None:
            return Building(spec, backend)
        kernel = loader.kernel_for(spec, backend)
    except (tritonenv.TritonUnavailable, *loader.BUILD_ERRORS) as exc:
        what = "Triton kernel" if backend == "triton" else "kernel"
        return Fallback(f"the {what} of {spec.describe()} failed to build",
                        f"{type(exc).__name__}: {exc}")
    if backend == "c":      # its sparse variant (its gradients: at the first call needing them)
        build_variants_ahead(spec, kernel)
    return Operator(spec, kernel, out_shape, torch_op=torch_op)


class PerBatch:
    """A call torch's op accepts for some batches only (:func:`.arguments.degenerate_transpose`):
    ``check`` raises torch's error where torch would, else this runs ``operator`` (the same
    conv, stated as a spec) or, where the output is empty, returns it (no kernel has work)."""

    def __init__(self, operator: Operator | None, check, out_shape: tuple, config: str):
        self.operator, self.check, self.out_shape, self.config = operator, check, out_shape, \
            config
        self.backend = "c" if operator is None else operator.backend
        self.spec = None if operator is None else operator.spec

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.operator is None else self.operator.prepare(x)

    def run(self, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        self.check(x)
        if self.operator is None:
            return x.new_empty((x.shape[0], *self.out_shape))
        return self.operator.run(x, weight, bias)
