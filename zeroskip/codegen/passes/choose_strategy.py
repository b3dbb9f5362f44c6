"""choose_strategy: mark each Contract ``dense`` or ``sparse`` from a cost model.

The data operand (lhs) of a layer after a ReLU is mostly zero. A *sparse* kernel scans it and
scatters only its non-zeros; a *dense* kernel multiplies everything it reads. Per Contract, in
units of one dense multiply-accumulate::

    dense  = macs
    sparse = macs * density * SCATTER_COST + macs / reuse * SCAN_COST

``reuse`` is how many multiplications each data element feeds (output channels per group times
the Contract's pairs per distinct data index); scanning costs once per element read. Contracts
too small to repay a sparse pass stay dense. The autotuner overrides these choices with
measurements; the constants here only need the crossover in the right place (density ~0.4).
"""
from __future__ import annotations

import networkx as nx

from ..ir import (Contract, contract_channels, nodes_of, op, operand, replace_payload,
                  with_history)
from ..macs import contract_macs

SCATTER_COST = 2.4     # a scattered MAC: indirect addressing, shorter vectors than a dense one
SCAN_COST = 1.0        # reading one data element and testing it for zero
MIN_SPARSE_MACS = 4096  # below this, the sparse setup does not pay off


def _reuse(graph: nx.DiGraph, node: str, c: Contract) -> float:
    lhs = op(graph, operand(graph, node, "lhs")).shape
    rhs = op(graph, operand(graph, node, "rhs")).shape
    _, c_x, c_y = contract_channels(c, lhs, rhs)
    per_element = (c_x if c.pattern == "grad_input" else c_y) // c.groups
    for loop in c.loops:
        if loop.u_len and loop.v_len:
            ends = [loop.lhs(u, v) for u in (loop.u[0], loop.u[1] - 1)
                    for v in (loop.v[0], loop.v[1] - 1)]
            span = max(ends) - min(ends) + 1
            per_element *= loop.u_len * loop.v_len / span
    return max(per_element, 1.0)


def decide(macs: int, density: float, reuse: float) -> tuple[str, str]:
    """``(strategy, reason)`` for a Contract of ``macs`` multiplications."""
    if macs == 0:
        return "dense", "no multiplications (zero fill)"
    if density >= 1.0:
        return "dense", "dense input (density 1)"
    if macs < MIN_SPARSE_MACS:
        return "dense", f"{macs} MACs are too few to repay a sparse pass"
    sparse = density * SCATTER_COST + SCAN_COST / reuse
    crossover = (1.0 - SCAN_COST / reuse) / SCATTER_COST
    choice = "sparse" if sparse < 1.0 else "dense"
    return choice, (f"density {density:g}: sparse costs {sparse:.2f} of dense per MAC "
                    f"(each input feeds {reuse:.0f} MACs; crossover at density {crossover:.2f})")


def choose_strategy(graph: nx.DiGraph) -> nx.DiGraph:
    graph = graph.copy()
    density = graph.graph["spec"].density
    for node in nodes_of(graph, Contract):
        c = op(graph, node)
        strategy, reason = decide(contract_macs(graph, node), density, _reuse(graph, node, c))
        replace_payload(graph, node, strategy=strategy, reason=reason)
    return with_history(graph, "choose_strategy")
