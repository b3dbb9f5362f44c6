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

import math

import networkx as nx

from ..spec import Axis, LayerSpec
from .ir import AxisLoop, Contract, Pad, contract_channels, nodes_of, op, operand


def contract_macs(graph: nx.DiGraph, node: str, nonzero: bool = False) -> int:
    """Multiplications performed by one Contract node; with ``nonzero`` only those whose data
    element is not a padded zero (a Contract that reads a zero :class:`Pad`, which
    trim_padding keeps where a padded copy costs less, multiplies its zeros too)."""
    c: Contract = op(graph, node)
    lhs_node = operand(graph, node, "lhs")
    lhs = op(graph, lhs_node).shape
    rhs = op(graph, operand(graph, node, "rhs")).shape
    batch, c_x, c_y = contract_channels(c, lhs, rhs)
    pad = op(graph, lhs_node)
    if nonzero and isinstance(pad, Pad) and pad.mode == "zeros":
        sizes = op(graph, operand(graph, lhs_node, "src")).shape[2:]
        pairs = math.prod(_pairs_inside(loop, lo, size)
                          for loop, lo, size in zip(c.loops, pad.lo, sizes))
    else:
        pairs = c.pairs
    return batch * c_x * (c_y // c.groups) * pairs


def _pairs_inside(loop: AxisLoop, lo: int, size: int) -> int:
    """The loop's (u, v) pairs whose data index, in a tensor padded by ``lo`` in front, lands
    in the ``size`` real elements: per tap, the positions that do form one interval."""
    total = 0
    for v in range(*loop.v):
        base = loop.lhs.v * v + loop.lhs.c - lo      # 0 <= lhs.u * u + base < size
        if loop.lhs.u == 0:
            total += loop.u_len if 0 <= base < size else 0
            continue
        a, b = -base, size - 1 - base
        if loop.lhs.u < 0:
            a, b = -b, -a
        step = abs(loop.lhs.u)
        first, last = max(loop.u[0], -(-a // step)), min(loop.u[1] - 1, b // step)
        total += max(0, last - first + 1)
    return total


def graph_macs(graph: nx.DiGraph, nonzero: bool = False) -> int:
    """Multiplications performed by every Contract of the graph (with ``nonzero``, those not
    multiplying a padded zero: see :func:`contract_macs`)."""
    return sum(contract_macs(graph, node, nonzero) for node in nodes_of(graph, Contract))


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
