"""Multiplication counts: of a graph's Contracts, and in closed form from a spec.

Every operator of a spec multiplies along the same (output position, tap) pairs of its
associated convolution: a forward conv pairs ``y[o]`` with ``x[o*s - p + k*d]`` through ``w[k]``;
its input gradient scatters the same products back; its weight gradient sums them over ``o``.
So the non-zero multiplications of all of them are, per axis,

    pairs = sum over outputs o of #{k : 0 <= o*s - p + k*d < H}

times ``batch * C_x * C_y / groups`` (with a non-``zeros`` padding mode the padded elements are
data, and every pair of the padded input counts).
"""
from __future__ import annotations

import networkx as nx

from ..spec import Axis, LayerSpec
from .ir import Contract, contract_channels, nodes_of, op, operand


def contract_macs(graph: nx.DiGraph, node: str) -> int:
    """Multiplications performed by one Contract node."""
    c: Contract = op(graph, node)
    lhs = op(graph, operand(graph, node, "lhs")).shape
    rhs = op(graph, operand(graph, node, "rhs")).shape
    batch, c_x, c_y = contract_channels(c, lhs, rhs)
    return batch * c_x * (c_y // c.groups) * c.pairs


def graph_macs(graph: nx.DiGraph) -> int:
    """Multiplications performed by every Contract of the graph."""
    return sum(contract_macs(graph, node) for node in nodes_of(graph, Contract))


def nonzero_pairs(axis: Axis, zero_padding: bool = True) -> int:
    """``#{(o, k) : 0 <= o*s - pad_lo + k*d < size}`` in O(kernel): for each tap, the outputs
    that read inside the input form one interval."""
    size, pad = (axis.size, axis.pad_lo) if zero_padding else (axis.padded_size, 0)
    total = 0
    for k in range(axis.kernel):
        shift = pad - k * axis.dilation
        first = max(0, -(-shift // axis.stride))
        last = min(axis.out_size - 1, (size - 1 + shift) // axis.stride)
        total += max(0, last - first + 1)
    return total


def _channels(spec: LayerSpec, batch: int) -> int:
    c_x, c_y = spec.conv_channels
    return batch * c_x * (c_y // spec.groups)


def nonzero_macs(spec: LayerSpec, batch: int = 1) -> int:
    """Multiplications of two elements that are not structural zeros, in closed form."""
    total = _channels(spec, batch)
    for axis in spec.axes:
        total *= nonzero_pairs(axis, spec.padding_mode == "zeros")
    return total


def dense_macs(spec: LayerSpec, batch: int = 1) -> int:
    """Multiplications of the naive graph, where every structural zero is multiplied."""
    total = _channels(spec, batch)
    for axis in spec.axes:
        if spec.op == "conv":
            total *= axis.out_size * axis.extent
        elif spec.op == "conv_grad_weight":
            total *= axis.extent * ((axis.out_size - 1) * axis.stride + 1)
        else:
            length = axis.size if spec.padding_mode == "zeros" else axis.padded_size
            total *= length * axis.extent
    return total
