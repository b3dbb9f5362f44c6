"""skip_dilation: kernel holes and stride holes of a weight gradient are never touched.

* A Contract whose second operand is a :class:`ZeroInsert` (a dilated kernel's holes, or the
  output gradient dilated by the stride in ``conv_grad_weight``, the "Sk-dilated" case) keeps
  only the taps on real elements and reads the original tensor.
* A :class:`Subsample` of an Assemble (``conv_grad_weight`` of a dilated conv keeps every
  ``d``-th kernel position) is folded into the Contracts: positions it would discard are never
  computed.
"""
from __future__ import annotations

import networkx as nx

from ..ir import (Assemble, Subsample, bypass, nodes_of, op, operand, parts, replace_payload,
                  with_history)
from ..regions import coalesce, fold_zero_inserts, restrict, split_contract


def skip_dilation(graph: nx.DiGraph) -> nx.DiGraph:
    graph = graph.copy()
    fold_zero_inserts(graph, "rhs")
    for node in list(nodes_of(graph, Subsample)):
        assemble = operand(graph, node, "src")
        if not isinstance(op(graph, assemble), Assemble) or graph.out_degree(assemble) != 1:
            continue
        factor = op(graph, node).factor
        for part in parts(graph, assemble):
            split_contract(graph, part, lambda axis, loop: restrict(loop, "out", factor[axis]),
                           lambda region, _: region)
        replace_payload(graph, assemble, shape=op(graph, node).shape)
        bypass(graph, node)
    return with_history(coalesce(graph), "skip_dilation")
