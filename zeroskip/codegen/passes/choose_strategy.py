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

A weight gradient's sparse kernel walks the non-zeros of its data operand (the layer's input,
the ReLU's zeros) and adds each, times a vector of output-gradient channels, into register
accumulators of every kernel column it meets; it costs ``WEIGHT_GRAD_SCATTER_COST`` dense MACs
per non-zero MAC (one operand load per multiply-add where the dense tiles share their loads),
plus the zero margins its rows read at the borders. It serves weight gradients whose axes map
alike in every region (the plain and strided convs' and the transposed convs'), with enough
output channels per group to fill vector lanes.

The autotuner measures instead of modelling: it compiles each layer with the strategy forced
(``graph.graph["strategy"]``: ``dense`` or ``sparse``, on every region that multiplies), and the
constants here only need the crossover in the right place for untuned layers.
"""
from __future__ import annotations

import networkx as nx

from ..ir import (Contract, contract_channels, nodes_of, op, operand, replace_payload,
                  with_history)
from ..macs import contract_macs

SCATTER_COST = 5.0     # a sparse MAC: one position's weights per load, no register reuse
                       # (measured over the suite at batch 1, 2026-11-30: the sparse kernel
                       # overtakes the dense one between density 0.1 and 0.3, near 0.2)
SCAN_COST = 1.0        # reading one data element and testing it for zero
MIN_SPARSE_MACS = 4096  # below this, the sparse setup does not pay off
MIN_SPARSE_CHANNELS = 8  # output channels per group a scattered input must feed
# The variant that walks the output gradient's zeros instead (its rows are the output's;
# short rows cost a loop exit per few non-zeros): measured at batch 16 with a half-dense input,
# on rows of 32 it beats the dense kernel from density 0.2 down; on rows of 16 or 8 it only
# ties it at 0.1. Dispatch runs it below this density, on rows this long.
WEIGHT_GRAD_RHS_CROSSOVER = 0.25
WEIGHT_GRAD_RHS_MIN_ROW = 24
WEIGHT_GRAD_SCATTER_COST = 4.0   # a sparse weight-gradient MAC, where each input feeds 3 or
                                 # more kernel columns (measured at batch 16-32 over the suite:
                                 # the sparse kernel overtakes the dense one near density 0.25;
                                 # feeding fewer, each non-zero's overhead is shared by fewer
                                 # multiply-adds: 1x1 and stride-2 layers cross lower)


def sparse_weight_grad_fits(axes: list[list[tuple[int, ...]]]) -> bool:
    """Whether the sparse weight-gradient kernel serves a weight gradient whose regions have
    these axes, each ``(lu, lv, lc, ru, rv, rc, ou, oc)``: every region maps each axis alike,
    the input index rises with the tap and the position (``lu, lv > 0``), and the output
    gradient is read at the position itself (``rhs = v``), the weight gradient at the tap."""
    if not axes:
        return False
    first = axes[0]
    return all(region == first for region in axes) and all(
        lu > 0 and lv > 0 and (ru, rv, rc, ou, oc) == (0, 1, 0, 1, 0)
        for lu, lv, lc, ru, rv, rc, ou, oc in first)


def _maps(c: Contract) -> list[tuple[int, ...]]:
    return [(l.lhs.u, l.lhs.v, l.lhs.c, l.rhs.u, l.rhs.v, l.rhs.c, l.out.u, l.out.c)
            for l in c.loops]


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


def weight_grad_crossover(columns: float) -> float:
    """The sparse weight gradient's crossover density where each input element feeds
    ``columns`` kernel columns (taps along the last axis over its stride)."""
    return min(1.0, columns / 3.0) / WEIGHT_GRAD_SCATTER_COST


def decide_weight_grad(macs: int, density: float, channels: int, columns: float = 3.0,
                       forced: str = "auto") -> tuple[str, str]:
    """``(strategy, reason)`` for a weight gradient the sparse kernel serves, each of whose
    input elements feeds ``columns`` kernel columns."""
    if forced != "auto" or macs < MIN_SPARSE_MACS or channels < MIN_SPARSE_CHANNELS:
        return decide(macs, density, 1.0, channels, forced)
    crossover = weight_grad_crossover(columns)
    choice = "sparse" if density < crossover else "dense"
    return choice, (f"density {density:g}: a sparse weight-gradient MAC costs "
                    f"{WEIGHT_GRAD_SCATTER_COST:g} dense ones, each input feeding {columns:g} "
                    f"kernel columns (crossover at density {crossover:.2f})")


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
    if not weight_grad or not sparse_weight_grad_fits([_maps(c) for c in weight_grad]):
        return None
    return (sum(contract_macs(graph, node) for node in nodes),
            _channels(graph, nodes[0], weight_grad[0]), _columns(weight_grad))


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
        wg_strategy, wg_reason = decide_weight_grad(macs, density, channels, columns, forced)
    for node in nodes:
        c = op(graph, node)
        if c.pattern == "grad_weight":
            strategy, reason = wg_strategy, wg_reason
        else:
            strategy, reason = decide(contract_macs(graph, node), density,
                                      _reuse(graph, node, c), _channels(graph, node, c), forced)
        replace_payload(graph, node, strategy=strategy, reason=reason)
    return with_history(graph, "choose_strategy")


def crossover(graph: nx.DiGraph) -> float:
    """The density below which the cost model runs the graph's largest Contract sparse (0 when
    it never does): what per-call dispatch uses for a layer the autotuner has not measured."""
    best, macs = 0.0, -1
    nodes = list(nodes_of(graph, Contract))
    if any(op(graph, node).pattern == "grad_weight" for node in nodes):
        served = _weight_grad(graph, nodes)
        if served is None or served[0] < MIN_SPARSE_MACS or served[1] < MIN_SPARSE_CHANNELS:
            return 0.0
        return weight_grad_crossover(served[2])
    for node in nodes:
        c = op(graph, node)
        m = contract_macs(graph, node)
        if m <= macs:
            continue
        macs = m
        if m < MIN_SPARSE_MACS or _channels(graph, node, c) < MIN_SPARSE_CHANNELS:
            best = 0.0
        else:
            best = max(0.0, (1.0 - SCAN_COST / _reuse(graph, node, c)) / SCATTER_COST)
    return best
