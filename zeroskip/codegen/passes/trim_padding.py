"""trim_padding: no padded zero is multiplied.

A Contract reading a zero :class:`Pad` (or a crop) is split along each axis into output regions
whose tap ranges are constant: the interior keeps every tap and needs no bounds checks; each
border region keeps only the taps that land inside the unpadded tensor (ConvV2 of the C-K-S
paper). Output positions whose taps all land in padding become empty-tap regions (zeros). The
Contract then reads the unpadded tensor and the Pad disappears.

Pads in ``reflect``, ``replicate`` or ``circular`` mode hold real data and are left alone.
"""
from __future__ import annotations

import networkx as nx

from ..ir import Contract, Pad, nodes_of, op, operand, with_history
from ..regions import clip, drop_if_unused, split_contract


def trim_padding(graph: nx.DiGraph) -> nx.DiGraph:
    graph = graph.copy()
    for node in list(nodes_of(graph, Contract)):
        pad_node = operand(graph, node, "lhs")
        pad = op(graph, pad_node)
        if not isinstance(pad, Pad) or pad.mode != "zeros":
            continue
        source = operand(graph, pad_node, "src")
        sizes = op(graph, source).shape[2:]

        def per_axis(axis, loop, pad=pad, sizes=sizes):
            return clip(loop, pad.lo[axis], sizes[axis])

        def label(region, full):
            return "interior" if all(full) else "border"

        split_contract(graph, node, per_axis, label, lhs=source)
        drop_if_unused(graph, pad_node)
    return with_history(graph, "trim_padding")
