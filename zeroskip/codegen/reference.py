"""A numpy executor of any graph: the semantics of the IR, used to prove each pass exact.

``execute(graph, inputs)`` evaluates the nodes in topological order on float64 arrays. A
Contract gathers its operands through its index maps and contracts them with ``einsum``; it is
slow and memory-hungry by design (it materializes every (u, v) pair) and meant for small shapes.
"""
from __future__ import annotations

import networkx as nx
import numpy as np

from .ir import (Assemble, BiasAdd, Contract, Input, Output, Pad, PadAdjoint, Relu, Subsample,
                 ZeroInsert, op, operand, parts)


def pad_index(size: int, lo: int, hi: int, mode: str) -> np.ndarray:
    """For each position of the padded axis, the source index it copies (-1: a zero)."""
    i = np.arange(-lo, size + hi)
    if mode == "zeros":
        return np.where((i >= 0) & (i < size), i, -1)
    if mode == "reflect":
        i = np.abs(i)
        return np.where(i >= size, 2 * (size - 1) - i, i)
    if mode == "replicate":
        return np.clip(i, 0, size - 1)
    if mode == "circular":
        return np.mod(i, size)
    raise ValueError(f"unknown padding mode {mode!r}")


def _pad(x: np.ndarray, lo, hi, mode: str) -> np.ndarray:
    for axis, (a, b) in enumerate(zip(lo, hi), start=2):
        index = pad_index(x.shape[axis], a, b, mode)
        x = np.take(x, np.maximum(index, 0), axis=axis)
        if (index < 0).any():
            mask = np.expand_dims(index >= 0, tuple(i for i in range(x.ndim) if i != axis))
            x = np.where(mask, x, 0.0)
    return x


def _pad_adjoint(g: np.ndarray, lo, hi, mode: str) -> np.ndarray:
    for axis, (a, b) in enumerate(zip(lo, hi), start=2):
        size = g.shape[axis] - a - b
        index = pad_index(size, a, b, mode)
        moved = np.moveaxis(g, axis, 0)
        out = np.zeros((size, *moved.shape[1:]))
        np.add.at(out, index[index >= 0], moved[index >= 0])
        g = np.moveaxis(out, 0, axis)
    return g


def _gather(x: np.ndarray, maps: list[np.ndarray]) -> np.ndarray:
    """``x[:, :, maps[0], maps[1], ...]`` with each (U, V) index grid on its own pair of axes:
    the result has shape ``(x0, x1, U0, V0, U1, V1, ...)``."""
    rank = len(maps)
    index = []
    for axis, grid in enumerate(maps):
        shape = [1] * (2 * rank)
        shape[2 * axis:2 * axis + 2] = grid.shape
        index.append(grid.reshape(shape))
    return x[(slice(None), slice(None), *index)]


def _contract(c: Contract, lhs: np.ndarray, rhs: np.ndarray) -> np.ndarray:
    grids = {name: [] for name in ("lhs", "rhs")}
    for loop in c.loops:
        u = np.arange(*loop.u)[:, None]
        v = np.arange(*loop.v)[None, :]
        for name in grids:
            grids[name].append(np.broadcast_to(getattr(loop, name)(u, v),
                                               (len(u), v.shape[1])))
    a = _gather(lhs, grids["lhs"])
    b = _gather(rhs, grids["rhs"])
    g = c.groups
    a = a.reshape(a.shape[0], g, a.shape[1] // g, *a.shape[2:])
    b = b.reshape(b.shape[0], g, b.shape[1] // g, *b.shape[2:]) if c.pattern == "grad_weight" \
        else b.reshape(g, b.shape[0] // g, *b.shape[1:])
    uv = [("ABCDEF"[2 * axis], "ABCDEF"[2 * axis + 1]) for axis in range(len(c.loops))]
    pairs = "".join(u + v for u, v in uv)
    us = "".join(u for u, _ in uv)
    spec = {"forward": f"ngi{pairs},gwi{pairs}->ngw{us}",
            "grad_input": f"ngw{pairs},gwi{pairs}->ngi{us}",
            "grad_weight": f"ngi{pairs},ngw{pairs}->gwi{us}"}[c.pattern]
    out = np.einsum(spec, a, b, optimize=True)
    return out.reshape(c.shape)


def execute(graph: nx.DiGraph, inputs: dict[str, np.ndarray]) -> np.ndarray:
    """Evaluate ``graph`` on ``inputs`` (by Input name); return the Output's value."""
    values: dict[str, np.ndarray] = {}
    result = None
    for node in nx.topological_sort(graph):
        p = op(graph, node)

        def arg(port: str = "src") -> np.ndarray:
            return values[operand(graph, node, port)]

        if isinstance(p, Input):
            value = np.asarray(inputs[p.name], dtype=np.float64)
            if value.shape != tuple(p.shape):
                raise ValueError(f"input {p.name!r} has shape {value.shape}, expected {p.shape}")
        elif isinstance(p, Pad):
            value = _pad(arg(), p.lo, p.hi, p.mode)
        elif isinstance(p, PadAdjoint):
            value = _pad_adjoint(arg(), p.lo, p.hi, p.mode)
        elif isinstance(p, ZeroInsert):
            value = np.zeros(p.shape)
            value[(slice(None), slice(None), *(slice(None, None, f) for f in p.factor))] = arg()
        elif isinstance(p, Subsample):
            value = arg()[(slice(None), slice(None), *(slice(None, None, f) for f in p.factor))]
        elif isinstance(p, Contract):
            value = _contract(p, arg("lhs"), arg("rhs"))
        elif isinstance(p, Assemble):
            value = np.zeros(p.shape)
            for part in parts(graph, node):
                positions = [loop.out_positions() for loop in op(graph, part).loops]
                value[(slice(None), slice(None), *np.ix_(*positions))] = values[part]
        elif isinstance(p, BiasAdd):
            bias = arg("bias")
            value = arg() + bias.reshape(1, -1, *([1] * (arg().ndim - 2)))
        elif isinstance(p, Relu):
            value = np.maximum(arg(), 0.0)
        elif isinstance(p, Output):
            value = result = arg()
        else:  # pragma: no cover - verify() rejects unknown payloads
            raise TypeError(f"cannot execute {p!r}")
        values[node] = value
    return result
