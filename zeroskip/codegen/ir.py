"""The IR: frozen node payloads on a ``networkx.DiGraph``, checked by :func:`verify`.

Nodes are operations; each carries its payload under the ``"op"`` attribute and the shape of the
tensor it produces. Edges carry a ``"port"`` naming the operand (``src``, ``lhs``, ``rhs``,
``bias``, ``part``). The graph attributes hold the ``spec`` and the ``history`` of passes.

The one compute node is :class:`Contract`: a box of output positions ``u`` and taps ``v`` per
spatial axis, with affine index maps for the output, the data operand (``lhs``) and the second
operand (``rhs``)::

    out[out(u)] = sum over v in box, channels:  lhs[lhs(u, v)] * rhs[rhs(u, v)]

Every index a Contract reads lies inside its operands (:func:`verify` proves it), so a Contract
multiplies only what its operands hold; the zeros of padding, inserted zeros and kernel holes
are separate nodes (:class:`Pad`, :class:`ZeroInsert`, :class:`Subsample`) that the passes fold
away. The Contracts feeding an :class:`Assemble` partition its output.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

import networkx as nx
import numpy as np

PATTERNS = ("forward", "grad_input", "grad_weight")
STRATEGIES = ("dense", "sparse")


class IRError(ValueError):
    """A graph breaks an IR invariant; the message names the node."""


@dataclass(frozen=True)
class Affine:
    """``u * u + v * v + c``: an index as a function of the output position and the tap."""

    u: int = 0
    v: int = 0
    c: int = 0

    def __call__(self, u, v=0):
        return self.u * u + self.v * v + self.c

    def __str__(self) -> str:
        terms = [f"{coef}*{name}" if coef not in (1, -1) else ("-" if coef < 0 else "") + name
                 for coef, name in ((self.u, "u"), (self.v, "v")) if coef]
        if self.c or not terms:
            terms.append(str(self.c))
        return " + ".join(terms).replace("+ -", "- ")


@dataclass(frozen=True)
class AxisLoop:
    """One spatial axis of a Contract: ``u in range(*u)``, ``v in range(*v)`` and index maps."""

    u: tuple[int, int]
    v: tuple[int, int]
    out: Affine
    lhs: Affine
    rhs: Affine

    @property
    def u_len(self) -> int:
        return max(0, self.u[1] - self.u[0])

    @property
    def v_len(self) -> int:
        return max(0, self.v[1] - self.v[0])

    def out_positions(self) -> np.ndarray:
        return self.out(np.arange(*self.u))


# --------------------------------------------------------------------------------- node payloads
@dataclass(frozen=True)
class Input:
    name: str
    shape: tuple[int, ...]
    ports = ()


@dataclass(frozen=True)
class Output:
    name: str
    shape: tuple[int, ...]
    ports = ("src",)


@dataclass(frozen=True)
class Pad:
    """Pad the spatial axes by ``lo``/``hi`` (negative: crop) with zeros or a torch padding mode."""

    shape: tuple[int, ...]
    lo: tuple[int, ...]
    hi: tuple[int, ...]
    mode: str = "zeros"
    ports = ("src",)


@dataclass(frozen=True)
class PadAdjoint:
    """Adjoint of a :class:`Pad`: adds each padded position's value to the element it copied."""

    shape: tuple[int, ...]
    lo: tuple[int, ...]
    hi: tuple[int, ...]
    mode: str
    ports = ("src",)


@dataclass(frozen=True)
class ZeroInsert:
    """Insert ``factor - 1`` zeros between neighbours on each spatial axis (``why``: stride of a
    transposed conv, dilation of a kernel)."""

    shape: tuple[int, ...]
    factor: tuple[int, ...]
    why: str
    ports = ("src",)


@dataclass(frozen=True)
class Subsample:
    """Keep every ``factor``-th element of each spatial axis (the taps of a dilated kernel)."""

    shape: tuple[int, ...]
    factor: tuple[int, ...]
    ports = ("src",)


@dataclass(frozen=True)
class Contract:
    """A region of a convolution-like contraction; see the module docstring.

    ``pattern`` fixes the channel contraction (``C_x``/``C_y`` of the associated conv, ``g``
    groups): ``forward`` lhs (N, C_x) x weight (C_y, C_x/g) -> (N, C_y); ``grad_input`` lhs
    (N, C_y) x weight -> (N, C_x); ``grad_weight`` lhs (N, C_x) x rhs (N, C_y) -> (C_y, C_x/g).
    ``shape`` is the shape of the region's block, whose spatial extents are the ``u`` ranges.
    """

    shape: tuple[int, ...]
    pattern: str
    groups: int
    loops: tuple[AxisLoop, ...]
    region: str = "all"
    strategy: str | None = None
    reason: str = ""
    ports = ("lhs", "rhs")

    @property
    def pairs(self) -> int:
        """Number of (output position, tap) pairs: the spatial part of the MAC count."""
        n = 1
        for loop in self.loops:
            n *= loop.u_len * loop.v_len
        return n


@dataclass(frozen=True)
class Assemble:
    """The full output from the blocks of the Contracts feeding it (port ``part``)."""

    shape: tuple[int, ...]
    ports = ("part",)


@dataclass(frozen=True)
class BiasAdd:
    shape: tuple[int, ...]
    ports = ("src", "bias")


@dataclass(frozen=True)
class Relu:
    """max(x, 0) of its source: a fused epilogue of the layer."""

    shape: tuple[int, ...]
    ports = ("src",)


PAYLOADS = {cls.__name__: cls for cls in
            (Input, Output, Pad, PadAdjoint, ZeroInsert, Subsample, Contract, Assemble, BiasAdd,
             Relu)}


# --------------------------------------------------------------------------------- graph helpers
def new_graph(spec, workload=None) -> nx.DiGraph:
    """An empty graph of ``spec`` at ``workload`` (a :class:`~zeroskip.spec.Workload`; None:
    batch 1, dense input)."""
    from ..spec import DENSE
    return nx.DiGraph(spec=spec, workload=workload or DENSE, history=("frontend",))


def add_node(graph: nx.DiGraph, node: str, payload: Any, **operands: str | list[str]) -> str:
    """Add ``node`` with ``payload`` and an edge from each operand (``port=source``)."""
    graph.add_node(node, op=payload)
    for port, sources in operands.items():
        for source in (sources if isinstance(sources, list) else [sources]):
            graph.add_edge(source, node, port=port)
    return node


def op(graph: nx.DiGraph, node: str) -> Any:
    return graph.nodes[node]["op"]


def operand(graph: nx.DiGraph, node: str, port: str) -> str:
    """The single node feeding ``port`` of ``node``."""
    found = [src for src, edge in graph.pred[node].items() if edge["port"] == port]
    if len(found) != 1:
        raise IRError(f"node {node!r}: expected one operand on port {port!r}, found {found}")
    return found[0]


def parts(graph: nx.DiGraph, node: str) -> list[str]:
    """The Contracts feeding an Assemble node, in a stable order."""
    return sorted(src for src, edge in graph.pred[node].items() if edge["port"] == "part")


def nodes_of(graph: nx.DiGraph, kind: type) -> Iterator[str]:
    for node in nx.topological_sort(graph):
        if isinstance(graph.nodes[node]["op"], kind):
            yield node


def replace_payload(graph: nx.DiGraph, node: str, **changes: Any) -> None:
    graph.nodes[node]["op"] = dataclasses.replace(graph.nodes[node]["op"], **changes)


def bypass(graph: nx.DiGraph, node: str) -> None:
    """Remove a one-input node, wiring its source to each of its users on the same port."""
    source = operand(graph, node, "src")
    for _, user, port in list(graph.out_edges(node, data="port")):
        graph.add_edge(source, user, port=port)
    graph.remove_node(node)


def with_history(graph: nx.DiGraph, name: str) -> nx.DiGraph:
    graph.graph["history"] = (*graph.graph["history"], name)
    return graph


# --------------------------------------------------------------------------------- verify
def verify(graph: nx.DiGraph) -> nx.DiGraph:
    """Check the IR invariants; raise :class:`IRError` naming the node that breaks one."""
    if not nx.is_directed_acyclic_graph(graph):
        cycle = [a for a, _ in nx.find_cycle(graph)]
        raise IRError(f"graph has a cycle through nodes {cycle}")
    for node in graph:
        payload = graph.nodes[node].get("op")
        if type(payload) not in PAYLOADS.values():
            raise IRError(f"node {node!r}: unknown payload {payload!r}")
    outputs = [n for n in graph if isinstance(op(graph, n), Output)]
    if len(outputs) != 1:
        raise IRError(f"graph must have exactly one Output node, found {outputs}")
    for node in graph:
        payload = op(graph, node)
        ports = sorted(str(p) for _, _, p in graph.in_edges(node, data="port"))
        expected = sorted(payload.ports)
        if isinstance(payload, Assemble):
            ok = ports and set(ports) == {"part"}
        else:
            ok = ports == expected
        if not ok:
            raise IRError(f"node {node!r} ({type(payload).__name__}): operands on ports "
                          f"{ports}, expected {expected}")
        _check_node(graph, node, payload)
    return graph


def _spatial(shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[2:]


def _check_node(graph: nx.DiGraph, node: str, payload: Any) -> None:
    def src_shape(port: str = "src") -> tuple[int, ...]:
        return op(graph, operand(graph, node, port)).shape

    def expect(shape: tuple[int, ...], what: str) -> None:
        if tuple(payload.shape) != tuple(shape):
            raise IRError(f"node {node!r}: shape {payload.shape} but {what} gives {shape}")

    if isinstance(payload, Output):
        expect(src_shape(), "its source")
    elif isinstance(payload, Pad):
        src = src_shape()
        expect((*src[:2], *(n + lo + hi for n, lo, hi in zip(_spatial(src), payload.lo,
                                                           payload.hi))), "padding its source")
        if payload.mode != "zeros" and min(*payload.lo, *payload.hi) < 0:
            raise IRError(f"node {node!r}: a {payload.mode} pad cannot crop")
    elif isinstance(payload, PadAdjoint):
        src = src_shape()
        expect((*src[:2], *(n - lo - hi for n, lo, hi in zip(_spatial(src), payload.lo,
                                                           payload.hi))), "un-padding its source")
    elif isinstance(payload, ZeroInsert):
        src = src_shape()
        expect((*src[:2], *((n - 1) * f + 1 if n else 0 for n, f in zip(_spatial(src),
                                                                        payload.factor))),
               "inserting zeros into its source")
    elif isinstance(payload, Subsample):
        src = src_shape()
        expect((*src[:2], *(-(-n // f) for n, f in zip(_spatial(src), payload.factor))),
               "subsampling its source")
    elif isinstance(payload, BiasAdd):
        expect(src_shape(), "its source")
        if src_shape("bias") != (payload.shape[1],):
            raise IRError(f"node {node!r}: bias shape {src_shape('bias')} does not match "
                          f"{payload.shape[1]} channels")
    elif isinstance(payload, Relu):
        expect(src_shape(), "its source")
    elif isinstance(payload, Contract):
        _check_contract(graph, node, payload, src_shape("lhs"), src_shape("rhs"))
    elif isinstance(payload, Assemble):
        _check_assemble(graph, node, payload)


def contract_channels(payload: Contract, lhs: tuple[int, ...], rhs: tuple[int, ...]
                      ) -> tuple[int, int, int]:
    """``(batch, C_x, C_y)`` of a Contract from its operand shapes."""
    if payload.pattern == "forward":
        return lhs[0], lhs[1], rhs[0]
    if payload.pattern == "grad_input":
        return lhs[0], rhs[1] * payload.groups, lhs[1]
    return lhs[0], lhs[1], rhs[1]


def output_channels(graph: nx.DiGraph, node: str) -> int:
    """Output channels per group of Contract ``node``: what one data element is multiplied
    into."""
    c: Contract = op(graph, node)
    _, c_x, c_y = contract_channels(c, op(graph, operand(graph, node, "lhs")).shape,
                                    op(graph, operand(graph, node, "rhs")).shape)
    return (c_x if c.pattern == "grad_input" else c_y) // c.groups


def _check_contract(graph, node, c: Contract, lhs, rhs) -> None:
    if c.pattern not in PATTERNS:
        raise IRError(f"node {node!r}: unknown pattern {c.pattern!r}")
    if c.strategy is not None and c.strategy not in STRATEGIES:
        raise IRError(f"node {node!r}: unknown strategy {c.strategy!r}")
    rank = len(c.loops)
    if len(lhs) != rank + 2 or len(rhs) != rank + 2:
        raise IRError(f"node {node!r}: operand ranks {len(lhs)}, {len(rhs)} for {rank} loops")
    n, c_x, c_y = contract_channels(c, lhs, rhs)
    g = c.groups
    if g <= 0 or c_x % g or c_y % g:
        raise IRError(f"node {node!r}: channels {c_x}, {c_y} not divisible by groups {g}")
    weight = (c_y, c_x // g)
    operands = {"forward": ((n, c_x), weight), "grad_input": ((n, c_y), weight),
                "grad_weight": ((n, c_x), (n, c_y))}[c.pattern]
    if (tuple(lhs[:2]), tuple(rhs[:2])) != operands:
        raise IRError(f"node {node!r}: operand shapes {lhs}, {rhs} do not fit pattern "
                      f"{c.pattern!r} with {g} groups")
    block = {"forward": (n, c_y), "grad_input": (n, c_x), "grad_weight": weight}[c.pattern]
    expected = (*block, *(loop.u_len for loop in c.loops))
    if tuple(c.shape) != expected:
        raise IRError(f"node {node!r}: block shape {c.shape}, loops give {expected}")
    for axis, loop in enumerate(c.loops):
        if loop.out.v:
            raise IRError(f"node {node!r}: output index depends on the tap on axis {axis}")
        if loop.u_len == 0 or loop.v_len == 0:
            continue
        for name, size in (("lhs", lhs[2 + axis]), ("rhs", rhs[2 + axis])):
            lo, hi = _affine_range(getattr(loop, name), loop)
            if lo < 0 or hi >= size:
                raise IRError(f"node {node!r}: {name} index {getattr(loop, name)} spans "
                              f"[{lo}, {hi}] on axis {axis}, outside [0, {size})")


def _affine_range(f: Affine, loop: AxisLoop) -> tuple[int, int]:
    values = [f(u, v) for u in (loop.u[0], loop.u[1] - 1) for v in (loop.v[0], loop.v[1] - 1)]
    return min(values), max(values)


def _check_assemble(graph, node, payload: Assemble) -> None:
    spatial = _spatial(payload.shape) if len(payload.shape) > 2 else ()
    cover = np.zeros(spatial, dtype=np.int32)
    for part in parts(graph, node):
        c = op(graph, part)
        if not isinstance(c, Contract):
            raise IRError(f"node {node!r}: part {part!r} is not a Contract")
        if tuple(c.shape[:2]) != tuple(payload.shape[:2]):
            raise IRError(f"node {node!r}: part {part!r} has channels {c.shape[:2]}, "
                          f"output has {payload.shape[:2]}")
        index = []
        for axis, loop in enumerate(c.loops):
            pos = loop.out_positions()
            if pos.size and (pos.min() < 0 or pos.max() >= spatial[axis]):
                raise IRError(f"node {node!r}: part {part!r} writes outside the output on axis "
                              f"{axis}")
            index.append(pos)
        np.add.at(cover, np.ix_(*index), 1)
    if cover.size and (cover.min() != 1 or cover.max() != 1):
        where = tuple(int(i) for i in np.argwhere(cover != 1)[0])
        raise IRError(f"node {node!r}: its parts must cover every output position exactly once; "
                      f"position {where} is covered {int(cover[where])} times")


# --------------------------------------------------------------------------------- serialization
def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_encode(v) for v in value]
    return value


# Graph attributes beside spec, workload and history: a forced strategy, the target the graph is
# for (pipeline.run), trim_padding's choice for a zero padding.
OPTIONAL_ATTRIBUTES = ("strategy", "target", "padding")


def to_json(graph: nx.DiGraph) -> dict[str, Any]:
    """A JSON-ready dict of the graph: spec, pass history, nodes (kind + fields) and edges, in
    topological order, so that ``to_json(from_json(d)) == d``."""
    order = list(nx.lexicographical_topological_sort(graph))
    return {
        "spec": graph.graph["spec"].to_dict(),
        "workload": graph.graph["workload"].to_dict(),
        "history": list(graph.graph["history"]),
        "nodes": [{"id": n, "kind": type(op(graph, n)).__name__, **_encode(op(graph, n))}
                  for n in order],
        "edges": [{"src": a, "dst": b, "port": p} for a in order
                  for _, b, p in sorted(graph.out_edges(a, data="port"))],
        **{key: graph.graph[key] for key in OPTIONAL_ATTRIBUTES if key in graph.graph},
    }


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


def from_json(data: dict[str, Any]) -> nx.DiGraph:
    """Inverse of :func:`to_json`."""
    from ..spec import LayerSpec, Workload

    graph = nx.DiGraph(spec=LayerSpec.from_dict(data["spec"]),
                       workload=Workload(**data.get("workload", {})),
                       history=tuple(data["history"]),
                       **{key: str(data[key]) for key in OPTIONAL_ATTRIBUTES if key in data})
    for entry in data["nodes"]:
        fields = {k: v for k, v in entry.items() if k not in ("id", "kind")}
        cls = PAYLOADS[entry["kind"]]
        if cls is Contract:
            fields["loops"] = tuple(
                AxisLoop(u=tuple(l["u"]), v=tuple(l["v"]), out=Affine(**l["out"]),
                         lhs=Affine(**l["lhs"]), rhs=Affine(**l["rhs"]))
                for l in fields["loops"])
        graph.add_node(entry["id"], op=cls(**{k: _tuples(v) if k != "loops" else v
                                             for k, v in fields.items()}))
    for edge in data["edges"]:
        graph.add_edge(edge["src"], edge["dst"], port=edge["port"])
    return graph


def node_label(payload: Any) -> str:
    """A short human-readable description of a node, for DOT and text dumps."""
    name = type(payload).__name__
    shape = "x".join(map(str, payload.shape))
    if isinstance(payload, (Input, Output)):
        return f"{name} {payload.name} [{shape}]"
    if isinstance(payload, (Pad, PadAdjoint)):
        return f"{name} {payload.mode} lo={payload.lo} hi={payload.hi} -> [{shape}]"
    if isinstance(payload, ZeroInsert):
        return f"ZeroInsert x{payload.factor} ({payload.why}) -> [{shape}]"
    if isinstance(payload, Subsample):
        return f"Subsample /{payload.factor} -> [{shape}]"
    if isinstance(payload, Contract):
        taps = "x".join(str(l.v_len) for l in payload.loops)
        text = f"Contract {payload.pattern} {payload.region}: block [{shape}], taps {taps}"
        if payload.strategy:
            text += f", {payload.strategy}"
        for loop in payload.loops:
            text += (f"\nu in [{loop.u[0]}, {loop.u[1]}), v in [{loop.v[0]}, {loop.v[1]}): "
                     f"out[{loop.out}] "
                     f"lhs[{loop.lhs}] rhs[{loop.rhs}]")
        return text
    return f"{name} [{shape}]"


def to_dot(graph: nx.DiGraph) -> str:
    """Graphviz DOT text of the graph."""
    spec = graph.graph["spec"]
    lines = ["digraph zeroskip {", "  rankdir=TB;", "  node [shape=box, fontname=monospace];",
             f'  label="{spec.describe()} after {graph.graph["history"][-1]}";']
    ids = {n: f"n{i}" for i, n in enumerate(nx.lexicographical_topological_sort(graph))}
    for node, key in ids.items():
        text = node_label(op(graph, node)).replace("\n", "\\n")
        label = f"{node}\\n{text}".replace('"', "'")
        lines.append(f'  {key} [label="{label}"];')
    for a, b, port in graph.edges(data="port"):
        lines.append(f'  {ids[a]} -> {ids[b]} [label="{port}"];')
    lines.append("}")
    return "\n".join(lines) + "\n"

