"""The torch binding: ``convolution`` (what ``zeroskip.functional`` and ``zeroskip.nn`` call),
the custom ops with their fake kernels and autograd formulas, and the per-call lookup.

The fast path of a call is one dict lookup keyed by everything but the batch size; the slow
path (first call of a shape) validates the arguments exactly as torch does
(:mod:`.arguments`) and prepares a :class:`~.dispatch.Operator` on the tensors' backend: CPU
tensors run the C kernels, CUDA tensors the Triton kernels, and ``ZEROSKIP_BACKEND=triton``
with ``TRITON_INTERPRET=1`` runs CPU tensors through the Triton kernels under Triton's
interpreter (how they are tested without a GPU). Gradient kernels are loaded on the first
backward. What no kernel covers runs on torch's op (:mod:`.reference`) through
:func:`stats.fallback`.
"""
from __future__ import annotations

import functools
from typing import List, Optional

import torch

from ..spec import LimitError
from . import env, loader, reference, stats, tritonenv
from .arguments import (COVERED_DTYPES, TorchDecides, check_arguments, check_call, config_of,
                        degenerate_transpose, key_of, overflows_int64, parse_config,
                        spec_from_config, spec_of_call)
from .dispatch import GradientOperator, Operator, compile_ahead, gradients_ready
from .stats import Fallback
from .triton_kernel import TritonLaunchError

BACKENDS = tuple(COVERED_DTYPES)
_calls: dict[tuple, Operator | Fallback] = {}


def convolution(op: str, rank: int, input, weight, bias, stride, padding, dilation, groups,
                output_padding=0, padding_mode: str = "zeros",
                activation: str = "none", relu_input: bool = False) -> torch.Tensor:
    """``torch.nn.functional.conv{rank}d`` (op ``conv``) or ``conv_transpose{rank}d``, plus a
    ``padding_mode`` as ``torch.nn.Conv{rank}d`` applies it, an optional fused ReLU after
    (``activation='relu'``) and before (``relu_input``: the conv of ``relu(input)``), on
    generated kernels.

    Under ``torch.compile``, and when a covered call needs gradients, this is the custom op
    ``zeroskip::convolution`` (or ``zeroskip::relu_convolution``; shape function and autograd
    formula registered); otherwise the kernel is called directly, which saves the dispatcher's
    few microseconds."""
    args = (stride, padding, dilation, groups, output_padding, padding_mode, activation)
    compiling = torch.compiler.is_compiling()
    if not compiling and not _needs_autograd(input, weight, bias):
        return _forward(op, rank, input, weight, bias, args, relu_input)   # the fast path
    custom = torch.ops.zeroskip.relu_convolution if relu_input else \
        torch.ops.zeroskip.convolution
    if compiling:
        # The config is parsed back with ast.literal_eval: only plain values go into it.
        checked = check_arguments(op, rank, *args[:5])
        if isinstance(checked, Fallback):
            stats.fallback(checked.reason, checked.detail)
            return reference.convolution(op, rank, _relu(input, relu_input), weight, bias,
                                         *args)
        return custom(input, weight, bias, config_of(op, rank, *checked, *args[5:]))
    # A call torch's op serves runs it with torch's autograd: the custom op's backward needs
    # the spec (and kernels) such a call does not have. A prepared call holds its arguments
    # checked and written as the custom op's config.
    _, call = _lookup(op, rank, input, weight, bias, args)
    if isinstance(call, Fallback):
        return _fall_back(call, op, rank, args, _relu(input, relu_input), weight, bias)
    if isinstance(call, Building):
        gradients_ready(call.spec)      # a backward will ask for them: start them too
        return _while_building(op, rank, args, _relu(input, relu_input), weight, bias)
    if isinstance(call, PerBatch):
        call.check(input if input.dim() == rank + 2 else input.unsqueeze(0))
    operator = call.operator if isinstance(call, PerBatch) else call
    if operator is not None and operator.backend == "c" and not operator.gradients_asked:
        # The backward will ask for its gradients' kernels: build them now.
        if not loader.background():
            compile_ahead(operator.spec, operator.forward, gradients=True)
        elif not gradients_ready(operator.spec):
            # Its backward would wait for them: torch's autograd until they are built.
            return _while_building(op, rank, args, _relu(input, relu_input), weight, bias)
        operator.gradients_asked = True
    return custom(input, weight, bias, call.config)


def _relu(input, relu_input: bool):
    """The conv's data operand: ``relu(input)`` for a ReLU fused before the conv (torch's
    ReLU: a pointwise op, whose zeros the conv's sparse kernels then skip)."""
    return torch.relu(input) if relu_input and isinstance(input, torch.Tensor) else input


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
    if wanted not in BACKENDS:
        raise ValueError(f"ZEROSKIP_BACKEND must be one of {BACKENDS}, got {wanted!r}")
    return wanted


def _covered_dtypes(backend: str | None) -> dict:
    return COVERED_DTYPES.get(backend, {})


def _needs_autograd(input, weight, bias) -> bool:
    """A call whose result needs a gradient, on tensors a backend covers (other calls run
    torch's op with torch's own autograd)."""
    if not torch.is_grad_enabled():
        return False
    tensors = (input, weight) if bias is None else (input, weight, bias)
    if not (all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)
            and any(t.requires_grad for t in tensors)):
        return False
    try:
        return input.dtype in _covered_dtypes(backend_for(input))
    except ValueError:      # a bad ZEROSKIP_BACKEND: the forward call reports it
        return False


def _lookup(op: str, rank: int, input, weight, bias, args: tuple
            ) -> tuple[tuple | None, Operator | Fallback]:
    """The key and the prepared :class:`Operator` (or :class:`Fallback`) of a call: one dict
    lookup keyed by everything but the batch size, else :func:`_prepare` (which raises what
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
        call = _prepare(op, rank, input, weight, bias, args, _torch_op(op, rank, args))
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


def _while_building(op: str, rank: int, args: tuple, input, weight, bias) -> torch.Tensor:
    stats.add("compiling_calls")
    return reference.convolution(op, rank, input, weight, bias, *args)


def _torch_op(op: str, rank: int, args: tuple):
    """torch's op for a call's arguments, as ``(x, weight, bias) -> output``."""
    def torch_op(x, w, b):
        return reference.convolution(op, rank, x, w, b, *args)
    return torch_op


def _fall_back(why: Fallback, op: str, rank: int, args: tuple, input, weight, bias
               ) -> torch.Tensor:
    stats.fallback(why.reason, why.detail)
    return reference.convolution(op, rank, input, weight, bias, *args)


def _forward(op: str, rank: int, input, weight, bias, args: tuple,
             relu_input: bool = False) -> torch.Tensor:
    key, call = _lookup(op, rank, input, weight, bias, args)
    if relu_input:
        input = _relu(input, relu_input)
    if isinstance(call, Fallback):
        return _fall_back(call, op, rank, args, input, weight, bias)
    if isinstance(call, Building):
        return _while_building(op, rank, args, input, weight, bias)
    batched = input.dim() == rank + 2
    x = input if batched else input.unsqueeze(0)
    try:
        out = call.run(call.prepare(x), weight, bias)
    except TritonLaunchError as exc:
        failed = Fallback(f"the Triton kernel of {call.spec.describe()} failed to compile or "
                          "launch", str(exc))
        if key is not None:       # from now on this layer runs torch's op
            _calls[key] = failed
        return _fall_back(failed, op, rank, args, input, weight, bias)
    if not batched:
        return out.squeeze(0)
    if call.backend == "c" and _channels_last(input, rank):
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _channels_last(input: torch.Tensor, rank: int) -> bool:
    """torch returns channels_last results for channels_last 4-D inputs; so do we."""
    return rank == 2 and input.dim() == 4 and not input.is_contiguous() and \
        input.is_contiguous(memory_format=torch.channels_last)



@torch.library.custom_op("zeroskip::convolution", mutates_args=())
def _convolution_op(input: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    config: str) -> torch.Tensor:
    op, rank, *args = parse_config(config)
    return _forward(op, rank, input, weight, bias, tuple(args))


@_convolution_op.register_fake
def _convolution_fake(input, weight, bias, config):
    rank = parse_config(config)[1]
    spec = spec_from_config(config, input.shape, weight.shape, bias is not None, input.dtype)
    batched = input.dim() == rank + 2
    shape = ((input.shape[0],) if batched else ()) + tuple(spec.output_shape()[1:])
    memory_format = torch.channels_last if _channels_last(input, rank) else torch.contiguous_format
    return torch.empty(shape, dtype=input.dtype, device=input.device,
                       memory_format=memory_format)


@torch.library.custom_op("zeroskip::relu_convolution", mutates_args=())
def _relu_convolution_op(input: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor], config: str) -> torch.Tensor:
    op, rank, *args = parse_config(config)
    return _forward(op, rank, input, weight, bias, tuple(args), relu_input=True)


@_relu_convolution_op.register_fake
def _relu_convolution_fake(input, weight, bias, config):
    return _convolution_fake(input, weight, bias, config)


def _setup_context(ctx, inputs, output):
    input, weight, bias, config = inputs
    relu = parse_config(config)[-1] == "relu"
    ctx.save_for_backward(input, weight, output if relu else None)
    ctx.config, ctx.has_bias = config, bias is not None


def _relu_backward(ctx, grad):
    """The gradient of ``conv(relu(z))``: the weight gradient of the conv on ``relu(z)`` (its
    zeros skipped by the sparse weight gradient), and the pre-activation's gradient ``dz``,
    the input gradient passed where ``z > 0``."""
    z, weight, output = ctx.saved_tensors
    input = torch.relu(z)
    gx, gw, gb, _ = _gradients(ctx, grad, input, weight, output)
    if gx is not None:
        gx = torch.ops.aten.threshold_backward(gx, input, 0)
    return gx, gw, gb, None


def _backward(ctx, grad):
    input, weight, output = ctx.saved_tensors
    return _gradients(ctx, grad, input, weight, output)


def _gradients(ctx, grad, input, weight, output):
    if output is not None:           # the fused ReLU passes gradients where it passed values
        grad = torch.ops.aten.threshold_backward(grad, output, 0)   # as torch's ReLU does
    gx = gw = gb = None
    if ctx.needs_input_grad[0]:
        gx = torch.ops.zeroskip.convolution_grad_input(grad, weight, list(input.shape),
                                                       ctx.config)
    if ctx.needs_input_grad[1]:
        gw = torch.ops.zeroskip.convolution_grad_weight(input, grad, list(weight.shape),
                                                        ctx.config)
    if ctx.has_bias and ctx.needs_input_grad[2]:
        rank = parse_config(ctx.config)[1]
        gb = grad.sum(dim=tuple(range(grad.dim() - rank - 1)) + tuple(range(-rank, 0)))
    return gx, gw, gb, None


_convolution_op.register_autograd(_backward, setup_context=_setup_context)
_relu_convolution_op.register_autograd(_relu_backward, setup_context=_setup_context)


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
    (``other``: the input, ``size``: the weight's) of a call, on its gradient operator."""
    op, rank = parse_config(config)[:2]
    input_shape, weight_shape = (size, other.shape) if which == "input" else (other.shape, size)
    batched = len(input_shape) == rank + 2
    if not grad.numel() or not other.numel():
        # An empty output (or operand) meets nothing: its gradients are zeros, no kernel's.
        return grad.new_zeros(size)
    operator = _gradient_operator(which, config, tuple(input_shape[-rank - 1:]),
                                  tuple(weight_shape), grad.dtype, backend_for(grad))
    if isinstance(operator, Fallback):
        stats.fallback(operator.reason, operator.detail)
        return reference.gradient(which, grad, other, size, config)
    if any(operator.crop):      # trailing outputs no input reaches (LayerSpec.gradient_crop)
        grad = grad[(..., *(slice(0, n - c) for n, c in zip(grad.shape[-rank:],
                                                            operator.crop)))]
    g = operator.prepare(grad if batched else grad.unsqueeze(0))
    try:
        if which == "input":
            out = operator.run(g, other, None)
            return out if batched else out.squeeze(0)
        x = operator.prepare(other if batched else other.unsqueeze(0))
        return operator.run(*((g, x) if op == "conv_transpose" else (x, g)), None)
    except TritonLaunchError as exc:
        stats.fallback(f"no Triton kernel for the {which} gradient of this layer",
                       f"{type(exc).__name__}: {exc}")
        return reference.gradient(which, grad, other, size, config)


@functools.lru_cache(maxsize=4096)
def _gradient_operator(which: str, config: str, input_shape: tuple, weight_shape: tuple,
                       dtype, backend: str) -> GradientOperator | Fallback:
    """The :class:`GradientOperator` of a call's input or weight gradient on ``backend``
    (memoized: a training step asks for it every time; ``input_shape``: the input's per-sample
    shape), or why there is none."""
    spec = spec_from_config(config, input_shape[1:], weight_shape, False, dtype)
    try:
        grad_spec = spec.grad_input() if which == "input" else spec.grad_weight()
        kernel = loader.kernel_for(grad_spec, backend)
    except (LimitError, *loader.BUILD_ERRORS) as exc:
        where = "Triton kernel" if backend == "triton" else "generated kernel"
        return Fallback(f"no {where} for the {which} gradient of {spec.torch_name}",
                        f"{type(exc).__name__}: {exc}")
    torch_op = None
    crop = spec.gradient_crop
    if reference.has_gradient(spec):
        run = reference.gradient_of(which, spec, spec.op == "conv_transpose")
        # torch's op reads the whole output gradient: the cropped elements come back as zeros.
        whole = [p for c in reversed(crop) for p in (0, c)] if any(crop) else None

        def uncrop(g):
            return g if whole is None else torch.nn.functional.pad(g, whole)
        if which == "input":
            def torch_op(g, w, _bias):
                return run(uncrop(g), w, (g.shape[0], *input_shape))
        else:
            def torch_op(lhs, rhs, _bias):
                x, g = (rhs, lhs) if spec.op == "conv_transpose" else (lhs, rhs)
                return run(uncrop(g), x, weight_shape)
    out_shape = input_shape if which == "input" else weight_shape
    operator = GradientOperator(grad_spec, kernel, out_shape, torch_op, layer=spec, crop=crop)
    operator.config = config
    return operator


def _prepare(op, rank, input, weight, bias, args, torch_op) -> Operator | Fallback:
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
            # another dtype pass): it answers this call. Valid calls still get their Call.
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
    """:func:`_prepare` once the call passed torch's checks (the transposed conv's faults torch's
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
    if input.dtype not in _covered_dtypes(backend):
        names = ", ".join(_covered_dtypes(backend).values())
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
                spec, backend, then=lambda built: compile_ahead(spec, built, gradients=False)
        ) is None:
            return Building(spec, backend)
        kernel = loader.kernel_for(spec, backend)
    except (tritonenv.TritonUnavailable, *loader.BUILD_ERRORS) as exc:
        what = "Triton kernel" if backend == "triton" else "kernel"
        return Fallback(f"the {what} of {spec.describe()} failed to build",
                        f"{type(exc).__name__}: {exc}")
    if backend == "c":      # its sparse variant (its gradients: at the first call needing them)
        compile_ahead(spec, kernel, gradients=False)
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
