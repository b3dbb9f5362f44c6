"""LayerSpec -> the naive graph, in which every structural zero is an explicit tensor element.

* ``conv``: the input is padded (:class:`Pad`), the kernel dilated with holes
  (:class:`ZeroInsert`), and one dense stride-``s`` correlation reads both.
* ``conv_transpose`` / ``conv_grad_input``: the data gets ``s - 1`` zeros between elements, is
  padded by ``extent - 1 - pad_lo`` (negative: cropped), and a stride-1 correlation with the
  flipped, dilated kernel produces the output.
* ``conv_grad_weight``: the padded input is correlated with the output gradient dilated by the
  stride, giving the gradient of every position of the dilated kernel; a :class:`Subsample`
  keeps the real taps.

A non-``zeros`` padding mode pads with real data: its :class:`Pad` (and the adjoint,
:class:`PadAdjoint`, for ``conv_grad_input``) stays, and no pass trims it.
"""
from __future__ import annotations

import networkx as nx

from ..spec import DENSE, LayerSpec, Workload
from .ir import (Affine, Assemble, AxisLoop, BiasAdd, Contract, Input, Output, Pad, PadAdjoint,
                 Relu, Subsample, ZeroInsert, add_node, new_graph, op, verify)


def lower(spec: LayerSpec, workload: Workload = DENSE) -> nx.DiGraph:
    """The naive graph of ``spec`` at the workload's batch, verified. The workload is kept in
    ``graph.graph["workload"]`` (choose_strategy reads its density)."""
    graph = new_graph(spec, workload)
    build = {"conv": _forward, "conv_transpose": _transposed, "conv_grad_input": _transposed,
             "conv_grad_weight": _grad_weight}[spec.op]
    build(graph, spec)
    return verify(graph)


def _inputs(graph: nx.DiGraph, spec: LayerSpec) -> dict[str, str]:
    return {name: add_node(graph, name, Input(name, shape))
            for name, shape in spec.input_shapes(graph.graph["workload"].batch).items()}


def _pad(graph, src: str, lo, hi, mode: str) -> str:
    if not any(lo) and not any(hi):
        return src
    shape = op(graph, src).shape
    padded = (*shape[:2], *(n + a + b for n, a, b in zip(shape[2:], lo, hi)))
    return add_node(graph, f"pad_{src}", Pad(padded, tuple(lo), tuple(hi), mode), src=src)


def _zero_insert(graph, src: str, factor, why: str) -> str:
    if all(f == 1 for f in factor):
        return src
    shape = op(graph, src).shape
    grown = (*shape[:2], *((n - 1) * f + 1 for n, f in zip(shape[2:], factor)))
    name = "dilate" if why == "dilation" else "insert_zeros"
    return add_node(graph, f"{name}_{src}", ZeroInsert(grown, tuple(factor), why), src=src)


def _finish(graph, contract: Contract, lhs: str, rhs: str) -> str:
    """Add the single Contract and the Assemble that holds its block; return the Assemble."""
    add_node(graph, "contract", contract, lhs=lhs, rhs=rhs)
    return add_node(graph, "assemble", Assemble(contract.shape), part="contract")


def _output(graph, spec: LayerSpec, result: str, inputs: dict[str, str]) -> None:
    if "bias" in inputs:
        result = add_node(graph, "bias_add", BiasAdd(op(graph, result).shape), src=result,
                          bias=inputs["bias"])
    if spec.activation == "relu":
        result = add_node(graph, "relu", Relu(op(graph, result).shape), src=result)
    add_node(graph, "output", Output("output", op(graph, result).shape), src=result)


def _forward(graph: nx.DiGraph, spec: LayerSpec) -> None:
    inputs = _inputs(graph, spec)
    axes = spec.axes
    x = _pad(graph, inputs["input"], [a.pad_lo for a in axes], [a.pad_hi for a in axes],
             spec.padding_mode)
    w = _zero_insert(graph, inputs["weight"], spec.dilation, "dilation")
    loops = tuple(AxisLoop(u=(0, a.out_size), v=(0, a.extent), out=Affine(u=1),
                           lhs=Affine(u=a.stride, v=1), rhs=Affine(v=1)) for a in axes)
    shape = (graph.graph["workload"].batch, spec.conv_channels[1], *(a.out_size for a in axes))
    result = _finish(graph, Contract(shape, "forward", spec.groups, loops), x, w)
    _output(graph, spec, result, inputs)


def _transposed(graph: nx.DiGraph, spec: LayerSpec) -> None:
    inputs = _inputs(graph, spec)
    data = inputs["grad_output" if spec.op == "conv_grad_input" else "input"]
    axes = spec.axes
    zeros = spec.padding_mode == "zeros"
    # With zero padding the correlation produces the unpadded gradient directly; otherwise it
    # produces the gradient of the padded input, which PadAdjoint folds back.
    length = [a.size if zeros else a.padded_size for a in axes]
    lo = [a.extent - 1 - (a.pad_lo if zeros else 0) for a in axes]
    hi = [n + a.extent - 1 - first - ((a.out_size - 1) * a.stride + 1)
          for n, a, first in zip(length, axes, lo)]
    z = _pad(graph, _zero_insert(graph, data, spec.stride, "stride"), lo, hi, "zeros")
    w = _zero_insert(graph, inputs["weight"], spec.dilation, "dilation")
    loops = tuple(AxisLoop(u=(0, n), v=(0, a.extent), out=Affine(u=1), lhs=Affine(u=1, v=1),
                           rhs=Affine(v=-1, c=a.extent - 1)) for n, a in zip(length, axes))
    shape = (graph.graph["workload"].batch, spec.conv_channels[0], *length)
    result = _finish(graph, Contract(shape, "grad_input", spec.groups, loops), z, w)
    if not zeros:
        unpadded = (*shape[:2], *(a.size for a in axes))
        result = add_node(graph, "pad_adjoint",
                          PadAdjoint(unpadded, tuple(a.pad_lo for a in axes),
                                     tuple(a.pad_hi for a in axes), spec.padding_mode),
                          src=result)
    _output(graph, spec, result, inputs)


def _grad_weight(graph: nx.DiGraph, spec: LayerSpec) -> None:
    inputs = _inputs(graph, spec)
    axes = spec.axes
    x = _pad(graph, inputs["input"], [a.pad_lo for a in axes], [a.pad_hi for a in axes],
             spec.padding_mode)
    gy = _zero_insert(graph, inputs["grad_output"], spec.stride, "stride")
    loops = tuple(AxisLoop(u=(0, a.extent), v=(0, (a.out_size - 1) * a.stride + 1),
                           out=Affine(u=1), lhs=Affine(u=1, v=1), rhs=Affine(v=1)) for a in axes)
    shape = (*spec.weight_shape[:2], *(a.extent for a in axes))
    result = _finish(graph, Contract(shape, "grad_weight", spec.groups, loops), x, gy)
    if any(d > 1 for d in spec.dilation):
        result = add_node(graph, "subsample", Subsample(spec.weight_shape, spec.dilation),
                          src=result)
    _output(graph, spec, result, inputs)
