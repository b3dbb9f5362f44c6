"""choose_strategy: mark each Contract ``dense`` or ``sparse`` by the cost model (:mod:`..cost`).

The pass reads what the cost model needs off the graph (MACs, output channels per group, how
many MACs each data element feeds, which sparse kernel the Contract's index maps allow) and
records each decision with its reason. The sparse weight gradient runs all its regions at once:
they go sparse together or not at all.

The autotuner measures instead of modelling: it compiles each layer with the strategy forced
(``graph.graph["strategy"]``: ``dense`` or ``sparse``, on every region that multiplies).
"""
from __future__ import annotations

import networkx as nx

from .. import cost
from ..ir import (Contract, nodes_of, op, output_channels, replace_payload,
                  with_history)
from ..macs import contract_macs


def _maps(c: Contract) -> list[tuple[int, ...]]:
    return [(l.lhs.u, l.lhs.v, l.lhs.c, l.rhs.u, l.rhs.v, l.rhs.c, l.out.u, l.out.c)
            for l in c.loops]


def _reuse(graph: nx.DiGraph, node: str, c: Contract) -> float:
    per_element = output_channels(graph, node)
    for loop in c.loops:
        if loop.u_len and loop.v_len:
            ends = [loop.lhs(u, v) for u in (loop.u[0], loop.u[1] - 1)
                    for v in (loop.v[0], loop.v[1] - 1)]
            span = max(ends) - min(ends) + 1
            per_element *= loop.u_len * loop.v_len / span
    return max(per_element, 1.0)


def _columns(contracts: list[Contract]) -> float:
    """Kernel columns each input element of a weight gradient feeds: the last axis's taps
    over its stride."""
    last = [c.loops[-1] for c in contracts]
    taps = max(l.u[1] for l in last) - min(l.u[0] for l in last)
    return taps / max(1, last[0].lhs.v)


def _weight_grad(graph: nx.DiGraph, nodes: list[str]) -> tuple[int, int, float] | None:
    """``(MACs, output channels per group, kernel columns per input)`` of a weight gradient the
    sparse kernel serves (all its regions at once), else None."""
    weight_grad = [op(graph, node) for node in nodes if op(graph, node).pattern == "grad_weight"]
    if not weight_grad or not cost.sparse_weight_grad_fits([_maps(c) for c in weight_grad]):
        return None
    return (sum(contract_macs(graph, node) for node in nodes),
            output_channels(graph, nodes[0]), _columns(weight_grad))


def choose_strategy(graph: nx.DiGraph) -> nx.DiGraph:
    graph = graph.copy()
    density = graph.graph["workload"].density
    forced = graph.graph.get("strategy", "auto")
    if forced not in ("auto", "dense", "sparse"):
        raise ValueError(f"strategy must be 'auto', 'dense' or 'sparse', got {forced!r}")
    nodes = list(nodes_of(graph, Contract))
    # The sparse weight gradient runs every region at once: they all go sparse or none.
    wg_strategy, wg_reason = "dense", "no sparse kernel for this weight gradient"
    served = _weight_grad(graph, nodes)
    if served is not None:
        macs, channels, columns = served
        wg_strategy, wg_reason = cost.decide_weight_grad(macs, density, channels, columns,
                                                          forced)
    for node in nodes:
        c = op(graph, node)
        if c.pattern == "grad_weight":
            strategy, reason = wg_strategy, wg_reason
        else:
            strategy, reason = cost.decide(contract_macs(graph, node), density,
                                           _reuse(graph, node, c), output_channels(graph, node),
                                           forced, cost.rows_serve(_maps(c)))
        replace_payload(graph, node, strategy=strategy, reason=reason)
    return with_history(graph, "choose_strategy")


def crossover(graph: nx.DiGraph) -> float:
    """The density below which the cost model runs the graph's largest Contract sparse (0 when
    it never does): what per-call dispatch uses for a layer the autotuner has not measured."""
    nodes = list(nodes_of(graph, Contract))
    if any(op(graph, node).pattern == "grad_weight" for node in nodes):
        served = _weight_grad(graph, nodes)
        if served is None or served[0] < cost.MIN_SPARSE_MACS or \
                served[1] < cost.MIN_SPARSE_CHANNELS:
            return 0.0
        return cost.weight_grad_crossover(served[2])
    if not nodes:
        return 0.0
    node = max(nodes, key=lambda n: contract_macs(graph, n))
    c = op(graph, node)
    return cost.crossover(contract_macs(graph, node), _reuse(graph, node, c),
                          output_channels(graph, node), cost.rows_serve(_maps(c)))
