"""densify_zeros: no inserted zero is multiplied (KS-deconv).

A Contract reading a :class:`ZeroInsert` of its data operand (a transposed convolution or the
input gradient of a strided convolution: ``s - 1`` zeros between elements) is split, per axis,
into the ``s`` output phases; in each phase only the taps that meet a real element remain, a
dense sub-kernel, and the Contract reads the original tensor. Phases whose sub-kernel is empty
(kernel smaller than the stride, dilation sharing a factor with it) become empty-tap regions.
Runs after trim_padding, so each trimmed border region is split into its phases too.
"""
from __future__ import annotations

import networkx as nx

from ..ir import Contract, ZeroInsert, nodes_of, op, operand, with_history
from ..regions import coalesce, drop_if_unused, restrict, split_contract


def densify_zeros(graph: nx.DiGraph) -> nx.DiGraph:
    graph = graph.copy()
    for node in list(nodes_of(graph, Contract)):
        inserted = operand(graph, node, "lhs")
        payload = op(graph, inserted)
        if not isinstance(payload, ZeroInsert):
            continue

        def per_axis(axis, loop, factor=payload.factor):
            return restrict(loop, "lhs", factor[axis])

        def label(region, phase, factor=payload.factor):
            return f"{region} phase{phase}" if any(f > 1 for f in factor) else region

        split_contract(graph, node, per_axis, label, lhs=operand(graph, inserted, "src"))
        drop_if_unused(graph, inserted)
    return with_history(coalesce(graph), "densify_zeros")
