"""trim_padding: no padded zero is multiplied, unless multiplying a few costs less.

A Contract reading a zero :class:`Pad` (or a crop) is split along each axis into output regions
whose tap ranges are constant: the interior keeps every tap and needs no bounds checks; each
border region keeps only the taps that land inside the unpadded tensor (ConvV2 of the C-K-S
paper). Output positions whose taps all land in padding become empty-tap regions (zeros). The
Contract then reads the unpadded tensor and the Pad disappears.

Where the border would hold much of the work (small maps: a 3x3 conv on 4x4 has 9 regions
and 49 tap slices of weights to stream instead of 9), the cost model
(:func:`..cost.keep_zero_padding`) may keep the Pad: the C kernel then copies the data into a
zero-padded buffer and runs one box; a depthwise layer's pads each plane as it reads it, in
L1. Only a dense forward or input gradient of the C target reading its data operand directly
keeps it, or a depthwise weight gradient of unit stride (a sparse kernel skips padded zeros for
free, Triton kernels mask their loads). The choice and its reason go to
``graph.graph["padding"]``.

Pads in ``reflect``, ``replicate`` or ``circular`` mode hold real data and are left alone.
"""
from __future__ import annotations

import math

import networkx as nx

from .. import cost
from ..ir import Contract, Input, Pad, contract_channels, nodes_of, op, operand, with_history
from ..regions import clip, drop_if_unused, split_contract


def _keeps(graph: nx.DiGraph, node: str, pad: Pad, source: str, sizes) -> tuple[bool, str]:
    """Whether the Contract ``node`` keeps reading ``pad`` (a zero padding of ``source``), and
    why."""
    c: Contract = op(graph, node)
    strategy = graph.graph.get("strategy", "auto")
    padded_shape = op(graph, operand(graph, node, "lhs")).shape
    rhs = operand(graph, node, "rhs")
    _, c_x, c_y = contract_channels(c, padded_shape, op(graph, rhs).shape)
    # Output channels per group (what one data element is multiplied into), and contracted.
    channels, contracted = ((c_x, c_y) if c.pattern == "grad_input" else (c_y, c_x))
    channels, contracted = channels // c.groups, contracted // c.groups
    if graph.graph.get("target", "c") != "c" or min(pad.lo + pad.hi) < 0 or \
            not isinstance(op(graph, source), Input):
        return False, "trimmed into border regions"
    if c.pattern == "grad_weight" and not (
            channels == 1 and all(l.lhs.v == 1 for l in c.loops) and
            isinstance(op(graph, rhs), Input)):
        # (A strided one reads its output gradient with zeros inserted.)
        return False, "trimmed into border regions"
    if strategy == "sparse" or (strategy == "auto" and graph.graph["workload"].density < 1.0
                                and channels >= cost.MIN_SPARSE_CHANNELS):
        # (Fewer output channels have no sparse kernel: choose_strategy keeps them dense.)
        return False, "a sparse kernel skips padded zeros: border regions trimmed"
    nonzero = interior = padded = 1
    width = 0
    for axis, loop in enumerate(c.loops):
        parts = clip(loop, pad.lo[axis], sizes[axis])
        nonzero *= sum(p.u_len * p.v_len for p, _ in parts)
        interior *= sum(p.u_len * p.v_len for p, full in parts if full)
        padded *= loop.u_len * loop.v_len
        width = max(width, sum(p.u_len for p, full in parts if not full))
    spec = graph.graph["spec"]
    element = 8 if spec.dtype == "float64" else 4
    weight_bytes = spec.in_channels * spec.out_channels // spec.groups * \
        math.prod(spec.kernel_size) * element
    # Outputs step over the input by the stride: a weight gradient's v, the others' u.
    strided = any(abs(loop.lhs.v if c.pattern == "grad_weight" else loop.lhs.u) > 1
                  for loop in c.loops)
    return cost.keep_zero_padding(nonzero, padded, interior, channels, weight_bytes, width,
                                  contracted, math.prod(padded_shape[2:]) * element, strided)


def trim_padding(graph: nx.DiGraph) -> nx.DiGraph:
    graph = graph.copy()
    for node in list(nodes_of(graph, Contract)):
        pad_node = operand(graph, node, "lhs")
        pad = op(graph, pad_node)
        if not isinstance(pad, Pad) or pad.mode != "zeros":
            continue
        source = operand(graph, pad_node, "src")
        sizes = op(graph, source).shape[2:]
        keep, reason = _keeps(graph, node, pad, source, sizes)
        graph.graph["padding"] = reason
        if keep:
            continue

        def per_axis(axis, loop, pad=pad, sizes=sizes):
            return clip(loop, pad.lo[axis], sizes[axis])

        def label(region, full):
            return "interior" if all(full) else "border"

        split_contract(graph, node, per_axis, label, lhs=source)
        drop_if_unused(graph, pad_node)
    return with_history(graph, "trim_padding")
