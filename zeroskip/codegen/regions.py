"""Per-axis rewrites of a Contract's loop box, shared by the passes.

Each function maps one :class:`AxisLoop` to the list of loops that replace it; a pass takes the
product over axes (:func:`split_contract`) to get the new regions. Both rewrites are exact:

* :func:`clip` keeps, for every output position, exactly the taps whose data index lies in
  ``[0, size)``; output positions with the same tap range form one region.
* :func:`restrict` keeps exactly the ``(u, v)`` pairs at which one index map is a multiple of a
  factor (the real elements of a zero-inserted tensor), re-indexing that map by the factor. The
  pairs form ``f_u`` phases of the output, each a dense sub-box (a phase sub-convolution).
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from typing import Callable

import networkx as nx
import numpy as np

from .ir import (Affine, Assemble, AxisLoop, Contract, ZeroInsert, add_node, nodes_of, op,
                 operand, parts, replace_payload)


def _ceil_div(a, b):
    return -(-a // b)


@functools.lru_cache(maxsize=4096)
def clip(loop: AxisLoop, shift: int, size: int) -> tuple[tuple[AxisLoop, bool], ...]:
    """Split ``loop`` so the lhs index minus ``shift`` stays in ``[0, size)``.

    Returns ``(loop, full)`` pairs in output order; ``full`` says the region keeps every tap of
    the original box (an interior region). The new lhs map reads the unshifted tensor.
    """
    lhs = dataclasses.replace(loop.lhs, c=loop.lhs.c - shift)
    u = np.arange(*loop.u)
    base = lhs.u * u + lhs.c                        # lhs index at v = 0
    v0, v1 = loop.v
    if lhs.v > 0:
        first = _ceil_div(-base, lhs.v)
        stop = (size - 1 - base) // lhs.v + 1
    elif lhs.v < 0:
        first = _ceil_div(size - 1 - base, lhs.v)
        stop = (-base) // lhs.v + 1
    else:
        inside = (base >= 0) & (base < size)
        first = np.where(inside, v0, v1)
        stop = np.full_like(u, v1)
    first = np.clip(first, v0, v1)
    stop = np.clip(stop, v0, v1)
    empty = stop <= first
    first = np.where(empty, v0, first)
    stop = np.where(empty, v0, stop)
    # A new region starts wherever the tap range changes.
    change = np.flatnonzero((np.diff(first) != 0) | (np.diff(stop) != 0)) + 1
    starts = np.concatenate(([0], change))
    ends = np.concatenate((change, [len(u)]))
    loops = []
    for a, b in zip(starts, ends):
        taps = (int(first[a]), int(stop[a]))
        new = dataclasses.replace(loop, u=(int(u[a]), int(u[b - 1]) + 1), v=taps, lhs=lhs)
        loops.append((new, taps == (v0, v1)))
    return tuple(loops)


@functools.lru_cache(maxsize=4096)
def restrict(loop: AxisLoop, target: str, factor: int) -> tuple[tuple[AxisLoop, int], ...]:
    """Keep the pairs where index map ``target`` ('lhs', 'rhs' or 'out') is a multiple of
    ``factor``, and divide that map by ``factor``.

    Returns ``(loop, phase)`` pairs. For 'lhs'/'rhs' every output position stays (a phase with
    no real tap becomes an empty-tap region, whose block is zero); for 'out' the positions that
    are not multiples are dropped (they are not part of the result).
    """
    if factor == 1 or (target != "out" and loop.v_len == 0):
        return ((loop, 0),)
    f = getattr(loop, target)
    period_u = factor // math.gcd(f.u, factor)
    period_v = factor // math.gcd(f.v, factor)
    loops = []
    for r in range(period_u):
        t0, t1 = _ceil_div(loop.u[0] - r, period_u), _ceil_div(loop.u[1] - r, period_u)
        if t1 <= t0:
            continue
        c = next((c for c in range(period_v) if (f.u * r + f.v * c + f.c) % factor == 0), None)
        if c is None and target == "out":
            continue
        if c is None:
            c, j0, j1 = 0, 0, 0
        else:
            j0, j1 = _ceil_div(loop.v[0] - c, period_v), _ceil_div(loop.v[1] - c, period_v)
            if j1 <= j0:
                j0 = j1 = 0

        def sub(m: Affine) -> Affine:
            return Affine(u=m.u * period_u, v=m.v * period_v, c=m.u * r + m.v * c + m.c)

        maps = {name: sub(getattr(loop, name)) for name in ("out", "lhs", "rhs")}
        t = maps[target]
        if j1 > j0 or target == "out":
            maps[target] = Affine(u=t.u // factor, v=t.v // factor, c=t.c // factor)
        loops.append((AxisLoop(u=(t0, t1), v=(j0, j1), **maps), r))
    return tuple(loops)


def split_contract(graph: nx.DiGraph, node: str,
                   per_axis: Callable[[int, AxisLoop], tuple[tuple[AxisLoop, object], ...]],
                   label: Callable[[str, tuple], str], **rewire: str) -> list[str]:
    """Replace Contract ``node`` by the product over axes of ``per_axis(axis, loop)``.

    Each new Contract keeps the old one's operands except those named in ``rewire`` (port ->
    new source) and feeds the same Assemble. ``label(old_region, tags)`` names its region from
    the per-axis tags. Returns the new node names.
    """
    old: Contract = op(graph, node)
    ports = {p: rewire.get(p, operand(graph, node, p)) for p in old.ports}
    (assemble,) = graph.successors(node)
    choices = [per_axis(axis, loop) for axis, loop in enumerate(old.loops)]
    graph.remove_node(node)
    names = []
    for i, combo in enumerate(itertools.product(*choices)):
        loops = tuple(loop for loop, _ in combo)
        payload = dataclasses.replace(
            old, loops=loops, shape=(*old.shape[:2], *(l.u_len for l in loops)),
            region=label(old.region, tuple(tag for _, tag in combo)))
        name = add_node(graph, f"{node}.{i}", payload, **ports)
        graph.add_edge(name, assemble, port="part")
        names.append(name)
    return names


def fold_zero_inserts(graph: nx.DiGraph, port: str,
                      label: Callable[[str, tuple], str] = lambda region, _: region) -> None:
    """Make every Contract whose ``port`` operand is a :class:`ZeroInsert` read the original
    tensor, keeping only the pairs that meet its real elements (:func:`restrict`)."""
    for node in list(nodes_of(graph, Contract)):
        inserted = operand(graph, node, port)
        payload = op(graph, inserted)
        if not isinstance(payload, ZeroInsert):
            continue
        split_contract(graph, node,
                       lambda axis, loop, f=payload.factor: restrict(loop, port, f[axis]),
                       label, **{port: operand(graph, inserted, "src")})
        drop_if_unused(graph, inserted)


def drop_if_unused(graph: nx.DiGraph, node: str) -> None:
    if graph.has_node(node) and graph.out_degree(node) == 0:
        graph.remove_node(node)


def coalesce(graph: nx.DiGraph) -> nx.DiGraph:
    """Merge regions that differ only in adjacent output ranges along one axis.

    After densify_zeros a border region often keeps the whole sub-kernel of its phase (the taps
    it lost to padding were inserted zeros anyway); merging it into the phase's interior leaves
    one region per distinct tap set, which is what a kernel should loop over.
    """
    for assemble in list(nodes_of(graph, Assemble)):
        merged = True
        while merged:
            merged = False
            for axis in range(len(op(graph, assemble).shape) - 2):
                merged |= _coalesce_axis(graph, assemble, axis)
    return graph


def _coalesce_axis(graph: nx.DiGraph, assemble: str, axis: int) -> bool:
    runs: dict[tuple, list[str]] = {}
    for node in parts(graph, assemble):
        c: Contract = op(graph, node)
        others = c.loops[:axis] + c.loops[axis + 1:]
        this = c.loops[axis]
        key = (tuple(graph.pred[node]), c.pattern, c.groups, c.strategy, others,
               this.v, this.out, this.lhs, this.rhs)
        runs.setdefault(key, []).append(node)
    merged = False
    for nodes in runs.values():
        nodes.sort(key=lambda n: op(graph, n).loops[axis].u[0])
        keep = nodes[0]
        for node in nodes[1:]:
            a, b = op(graph, keep), op(graph, node)
            if a.loops[axis].u[1] != b.loops[axis].u[0]:
                keep = node
                continue
            loops = list(a.loops)
            loops[axis] = dataclasses.replace(loops[axis], u=(a.loops[axis].u[0],
                                                              b.loops[axis].u[1]))
            region = a.region if "interior" in a.region or "interior" not in b.region \
                else b.region
            replace_payload(graph, keep, loops=tuple(loops),
                            shape=(*a.shape[:2], *(l.u_len for l in loops)), region=region)
            graph.remove_node(node)
            merged = True
    return merged
