"""choose_strategy: mark each Contract ``dense`` or ``sparse`` from a cost model.

The data operand (lhs) of a layer after a ReLU is mostly zero. A *sparse* kernel scans it and
scatters only its non-zeros; a *dense* kernel multiplies everything it reads. Per Contract, in
units of one dense multiply-accumulate::

    dense  = macs
    sparse = macs * density * SCATTER_COST + macs / reuse * SCAN_COST

``reuse`` is how many multiplications each data element feeds (output channels per group times
the Contract's pairs per distinct data index); scanning costs once per element read. Contracts
too small to repay a sparse pass stay dense, and so do Contracts with few output channels per
group (a sparse MAC broadcasts one input over them: too few fill too few vector lanes).

The autotuner measures instead of modelling: it compiles each layer with the strategy forced
(``graph.graph["strategy"]``: ``dense`` or ``sparse``, on every region that multiplies), and the
constants here only need the crossover in the right place for untuned layers.
"""
from __future__ import annotations

import networkx as nx

from ..ir import (Contract, contract_channels, nodes_of, op, operand, replace_payload,
                  with_history)
from ..macs import contract_macs

SCATTER_COST = 3.0     # a sparse MAC: one position's weights per load, no register reuse
SCAN_COST = 1.0        # reading one data element and testing it for zero
MIN_SPARSE_MACS = 4096  # below this, the sparse setup does not pay off
MIN_SPARSE_CHANNELS = 8  # output channels per group a scattered input must feed


def _channels(graph: nx.DiGraph, node: str, c: Contract) -> int:
    """Output channels per group of the Contract (what one data element is multiplied into)."""
    lhs = op(graph, operand(graph, node, "lhs")).shape
    rhs = op(graph, operand(graph, node, "rhs")).shape
    _, c_x, c_y = contract_channels(c, lhs, rhs)
    return (c_x if c.pattern == "grad_input" else c_y) // c.groups


def _reuse(graph: nx.DiGraph, node: str, c: Contract) -> float:
    per_element = _channels(graph, node, c)
    for loop in c.loops:
        if loop.u_len and loop.v_len:
            ends = [loop.lhs(u, v) for u in (loop.u[0], loop.u[1] - 1)
                    for v in (loop.v[0], loop.v[1] - 1)]
            span = max(ends) - min(ends) + 1
            per_element *= loop.u_len * loop.v_len / span
    return max(per_element, 1.0)


def decide(macs: int, density: float, reuse: float, channels: int = MIN_SPARSE_CHANNELS,
           forced: str = "auto") -> tuple[str, str]:
    """``(strategy, reason)`` for a Contract of ``macs`` multiplications whose data elements
    each feed ``reuse`` MACs over ``channels`` output channels per group; ``forced`` ('dense' or
    'sparse') overrides the cost model."""
    if macs == 0:
        return "dense", "no multiplications (zero fill)"
    if forced != "auto":
        return forced, f"{forced} forced"
    if macs < MIN_SPARSE_MACS:
        return "dense", f"{macs} MACs are too few to repay a sparse pass"
    if channels < MIN_SPARSE_CHANNELS:
        return "dense", f"{channels} output channels per group are too few for a sparse pass"
    if density >= 1.0:
        return "dense", "dense input (density 1)"
    sparse = density * SCATTER_COST + SCAN_COST / reuse
    crossover = (1.0 - SCAN_COST / reuse) / SCATTER_COST
    choice = "sparse" if sparse < 1.0 else "dense"
    return choice, (f"density {density:g}: sparse costs {sparse:.2f} of dense per MAC "
                    f"(each input feeds {reuse:.0f} MACs; crossover at density {crossover:.2f})")


def choose_strategy(graph: nx.DiGraph) -> nx.DiGraph:
    graph = graph.copy()
    density = graph.graph["workload"].density
    forced = graph.graph.get("strategy", "auto")
    if forced not in ("auto", "dense", "sparse"):
        raise ValueError(f"strategy must be 'auto', 'dense' or 'sparse', got {forced!r}")
    for node in nodes_of(graph, Contract):
        c = op(graph, node)
        if c.pattern == "grad_weight":
            strategy, reason = "dense", "weight gradients run dense"
        else:
            strategy, reason = decide(contract_macs(graph, node), density,
                                      _reuse(graph, node, c), _channels(graph, node, c), forced)
        replace_payload(graph, node, strategy=strategy, reason=reason)
    return with_history(graph, "choose_strategy")


def crossover(graph: nx.DiGraph) -> float:
    """The density below which the cost model runs the graph's largest Contract sparse (0 when
    it never does): what per-call dispatch uses for a layer the autotuner has not measured."""
    best, macs = 0.0, -1
    for node in nodes_of(graph, Contract):
        c = op(graph, node)
        m = contract_macs(graph, node)
        if c.pattern == "grad_weight" or m <= macs:
            continue
        macs = m
        if m < MIN_SPARSE_MACS or _channels(graph, node, c) < MIN_SPARSE_CHANNELS:
            best = 0.0
        else:
            best = max(0.0, (1.0 - SCAN_COST / _reuse(graph, node, c)) / SCATTER_COST)
    return best
