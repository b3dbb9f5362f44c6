"""The torch binding: ``convolution`` (what ``zeroskip.functional`` and ``zeroskip.nn`` call),
the custom ops with their fake kernels and their autograd formulas.

A call finds what runs it through :func:`.calls.lookup` (prepared once per layer shape) and,
for gradients, :func:`.gradients.of` (one lookup per gradient op). A call that needs no
gradient runs its kernel directly; one that does goes through the custom op
``zeroskip::convolution`` (``zeroskip::relu_convolution`` with a ReLU before), whose backward
calls ``zeroskip::convolution_grad_input`` and ``zeroskip::convolution_grad_weight``; those
are differentiable again (double backward). Their non-tensor arguments travel as one config
string (:func:`.arguments.config_of`), as a custom op's schema and ``torch.compile``'s guards
need.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from . import calls, gradients, loader, reference, stats
from .arguments import check_arguments, config_of, parse_config, spec_from_config
from .calls import Building, PerBatch, backend_for
from .stats import Fallback
from .triton_kernel import TritonLaunchError


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
    _, call = calls.lookup(op, rank, input, weight, bias, args)
    if isinstance(call, Fallback):
        return _fall_back(call, op, rank, args, _relu(input, relu_input), weight, bias)
    if isinstance(call, Building):
        gradients.ready(call.spec)      # a backward will ask for them: start them too
        return _while_building(op, rank, args, _relu(input, relu_input), weight, bias)
    if isinstance(call, PerBatch):
        call.check(input if input.dim() == rank + 2 else input.unsqueeze(0))
    operator = call.operator if isinstance(call, PerBatch) else call
    if operator is not None and operator.backend == "c" and not operator.gradients_asked:
        # The backward will ask for its gradients' kernels: build them now.
        if not loader.background():
            gradients.build_ahead(operator.spec)
        elif not gradients.ready(operator.spec):
            # Its backward would wait for them: torch's autograd until they are built.
            return _while_building(op, rank, args, _relu(input, relu_input), weight, bias)
        operator.gradients_asked = True
    return custom(input, weight, bias, call.config)


def _relu(input, relu_input: bool):
    """The conv's data operand: ``relu(input)`` for a ReLU fused before the conv (torch's
    ReLU: a pointwise op, whose zeros the conv's sparse kernels then skip)."""
    return torch.relu(input) if relu_input and isinstance(input, torch.Tensor) else input


def _needs_autograd(input, weight, bias) -> bool:
    """A call whose result needs a gradient, on tensors a backend covers (other calls run
    torch's op with torch's own autograd)."""
    if not torch.is_grad_enabled():
        return False
    try:        # the common case first: nothing needs a gradient
        if not (input.requires_grad or weight.requires_grad or
                bias is not None and bias.requires_grad):
            return False
    except AttributeError:      # not tensors: the forward call says what torch says
        return False
    tensors = (input, weight) if bias is None else (input, weight, bias)
    if not (all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in tensors)
            and any(t.requires_grad for t in tensors)):
        return False
    try:
        return input.dtype in calls.covered_dtypes(backend_for(input))
    except ValueError:      # a bad ZEROSKIP_BACKEND: the forward call reports it
        return False


def _while_building(op: str, rank: int, args: tuple, input, weight, bias) -> torch.Tensor:
    stats.add("compiling_calls")
    return reference.convolution(op, rank, input, weight, bias, *args)


def _fall_back(why: Fallback, op: str, rank: int, args: tuple, input, weight, bias
               ) -> torch.Tensor:
    stats.fallback(why.reason, why.detail)
    return reference.convolution(op, rank, input, weight, bias, *args)


def _forward(op: str, rank: int, input, weight, bias, args: tuple,
             relu_input: bool = False) -> torch.Tensor:
    key, call = calls.lookup(op, rank, input, weight, bias, args)
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
        calls.settle(key, failed)     # from now on this layer runs torch's op
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
    size = tuple(input_size)
    return gradients.of(config, size, weight.shape, grad.dtype, backend_for(grad)).run(
        "input", grad, weight, size)


@_grad_input_op.register_fake
def _grad_input_fake(grad, weight, input_size, config):
    return grad.new_empty(input_size)


@torch.library.custom_op("zeroskip::convolution_grad_weight", mutates_args=())
def _grad_weight_op(input: torch.Tensor, grad: torch.Tensor, weight_size: List[int],
                    config: str) -> torch.Tensor:
    size = tuple(weight_size)
    return gradients.of(config, input.shape, size, grad.dtype, backend_for(grad)).run(
        "weight", grad, input, size)


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
