"""densify_zeros: no inserted zero is multiplied (KS-deconv).

A Contract reading a :class:`ZeroInsert` of its data operand (a transposed convolution or the
input gradient of a strided convolution: ``s - 1`` zeros between elements) is split, per axis,
into the ``s`` output phases; in each phase only the taps that meet a real element remain, a
dense sub-kernel, and the Contract reads the original tensor. Phases whose sub-kernel is empty
(kernel smaller than the stride, dilation sharing a factor with it) become empty-tap regions.
Runs after trim_padding, so each trimmed border region is split into its phases too; regions
left with the same sub-kernel are merged again (:func:`coalesce`).
"""
from __future__ import annotations

import networkx as nx

from ..ir import with_history
from ..regions import coalesce, fold_zero_inserts


def _phase_label(region: str, phase: tuple[int, ...]) -> str:
    return f"{region} phase{phase}"


def densify_zeros(graph: nx.DiGraph) -> nx.DiGraph:
    graph = graph.copy()
    fold_zero_inserts(graph, "lhs", _phase_label)
    return with_history(coalesce(graph), "densify_zeros")
