"""The IR as text, one line per node: what pass tests state as before/expected graphs.

A line is ``name = Kind[shape](port=source, ...) field=value ...``: the payload's shape, its
operands on their ports, then its other fields by name, leaving out fields at their default.
A Contract ends with one ``{u=a:b v=a:b out=... lhs=... rhs=...}`` per spatial axis: the
half-open ranges of ``u`` and ``v`` and the three index maps, written like ``2*u+v-1``::

    input = Input[1x1x5] name=input
    weight = Input[2x1x3] name=weight
    c0 = Contract[1x2x1](lhs=input, rhs=weight) pattern=forward groups=1 region=border {u=0:1 ...}
    ...
    assemble = Assemble[1x2x5](part=c0, part=c1, part=c2)
    output = Output[1x2x5](src=assemble) name=output

Strings that are not one word are JSON-quoted. Region numbering is an implementation detail, so
:func:`to_text` renames the Contracts ``c0``, ``c1``, ... in an order fixed by their content
(per axis: output map, then first position), and two equal graphs print equal text. Lines are
in topological order, Inputs first. The graph attributes (spec, history) are not printed.
:func:`from_text` reads the text back; it also takes ``# comments``, blank lines, any node
names and any line order.
"""
from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Callable

import networkx as nx

from .ir import PAYLOADS, Affine, AxisLoop, Contract, Input, op

_WORD = re.compile(r"[A-Za-z_][\w.-]*")
_CONTRACT_NAME = re.compile(r"c\d+")
_HEAD = re.compile(r"(?P<name>[^\s=#]+)\s*=\s*(?P<kind>\w+)\[(?P<shape>[^\]]*)\]"
                   r"(?:\((?P<operands>[^)]*)\))?(?P<rest>.*)")
_TOKEN = re.compile(r'\s+(?:(?P<key>\w+)=(?P<value>"(?:[^"\\]|\\.)*"|[^\s"{}]+)'
                    r"|\{(?P<loop>[^}]*)\}|(?P<comment>#.*))")
_TERM = re.compile(r"([+-]?)(?:(\d+)\*)?([uv])|([+-]?\d+)")
_RANGE = re.compile(r"(-?\d+):(-?\d+)")
_LOOP_KEYS = ("u", "v", "out", "lhs", "rhs")


# --------------------------------------------------------------------------------- printing
def format_affine(f: Affine) -> str:
    """``Affine(2, 1, -1)`` as ``2*u+v-1``; the zero map as ``0``."""
    text = ""
    for coef, var in ((f.u, "u"), (f.v, "v")):
        if coef:
            term = var if abs(coef) == 1 else f"{abs(coef)}*{var}"
            text += ("-" if coef < 0 else "+" if text else "") + term
    if f.c or not text:
        text += f"{f.c:+d}" if text else str(f.c)
    return text


def _format_loop(loop: AxisLoop) -> str:
    return (f"{{u={loop.u[0]}:{loop.u[1]} v={loop.v[0]}:{loop.v[1]} out={format_affine(loop.out)}"
            f" lhs={format_affine(loop.lhs)} rhs={format_affine(loop.rhs)}}}")


def _format_value(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(map(str, value)) or "()"
    if isinstance(value, str):
        return value if _WORD.fullmatch(value) else json.dumps(value)
    return str(value)


def _body(graph: nx.DiGraph, node: Any, names: dict, rank: Callable[[Any], Any]) -> str:
    """The line of ``node`` after ``name = ``; operands named by ``names``, each port's sources
    in ``rank`` order."""
    payload = op(graph, node)
    ports = list(payload.ports)
    operands = sorted(graph.in_edges(node, data="port"),
                      key=lambda e: (ports.index(e[2]) if e[2] in ports else len(ports),
                                     str(e[2]), rank(e[0])))
    text = f"{type(payload).__name__}[{'x'.join(map(str, payload.shape))}]"
    if operands:
        text += "(" + ", ".join(f"{port}={names[src]}" for src, _, port in operands) + ")"
    for field in dataclasses.fields(payload):
        value = getattr(payload, field.name)
        if field.name not in ("shape", "loops") and value != field.default:
            text += f" {field.name}={_format_value(value)}"
    if isinstance(payload, Contract):
        text += "".join(" " + _format_loop(loop) for loop in payload.loops)
    return text


def text_names(graph: nx.DiGraph) -> dict:
    """The name of each node in :func:`to_text`: its own, or ``c<i>`` for the Contracts in the
    order of their content."""
    contracts = {n for n in graph if isinstance(op(graph, n), Contract)}
    clash = sorted(str(n) for n in graph if n not in contracts and _CONTRACT_NAME.fullmatch(str(n)))
    if clash:
        raise ValueError(f"nodes {clash} are not Contracts; the text names Contracts c0, c1, ...")
    raw = {n: str(n) for n in graph}

    def content(node):
        # A Contract's operands and users are not Contracts (the frontend and passes never
        # chain them), so their own names are canonical; the line breaks remaining ties.
        loops = op(graph, node).loops
        return (sorted(raw[s] for s in graph.successors(node)),
                [(l.out.u, l.out.c, l.u[0]) for l in loops], _body(graph, node, raw, raw.get))

    return {**raw, **{n: f"c{i}" for i, n in enumerate(sorted(contracts, key=content))}}


def to_text(graph: nx.DiGraph) -> str:
    """The graph as text, one line per node; see the module docstring."""
    names = text_names(graph)

    def order_key(node):
        payload = op(graph, node)
        kind = 0 if isinstance(payload, Input) else 1
        if isinstance(payload, Contract):
            return kind, "c", int(names[node][1:])
        return kind, names[node], -1

    order = list(nx.lexicographical_topological_sort(graph, key=order_key))
    position = {n: i for i, n in enumerate(order)}
    return "".join(f"{names[n]} = {_body(graph, n, names, position.get)}\n" for n in order)


# --------------------------------------------------------------------------------- parsing
def parse_affine(text: str) -> Affine:
    """Inverse of :func:`format_affine`."""
    terms = re.findall(r"[+-]?[^+-]+", text)
    if not terms or "".join(terms) != text:
        raise ValueError(f"bad index map {text!r}")
    coef = {"u": 0, "v": 0, "c": 0}
    for term in terms:
        m = _TERM.fullmatch(term)
        if not m:
            raise ValueError(f"bad term {term!r} in index map {text!r}")
        if m[3]:
            coef[m[3]] += (-1 if m[1] == "-" else 1) * int(m[2] or 1)
        else:
            coef["c"] += int(m[4])
    return Affine(**coef)


def _parse_ints(text: str) -> tuple[int, ...]:
    return () if text in ("", "()") else tuple(int(t) for t in text.split(","))


def _parse_loop(text: str) -> AxisLoop:
    items = dict(item.split("=", 1) if "=" in item else (item, "") for item in text.split())
    if sorted(items) != sorted(_LOOP_KEYS):
        raise ValueError(f"an axis needs {', '.join(_LOOP_KEYS)}, got {{{text}}}")
    ranges = {k: _RANGE.fullmatch(items[k]) for k in ("u", "v")}
    for k, m in ranges.items():
        if not m:
            raise ValueError(f"bad range {k}={items[k]!r}, expected start:stop")
    return AxisLoop(**{k: (int(m[1]), int(m[2])) for k, m in ranges.items()},
                    **{k: parse_affine(items[k]) for k in ("out", "lhs", "rhs")})


_FIELD_TYPES: dict[str, Callable[[str], Any]] = {
    "tuple[int, ...]": _parse_ints, "int": int, "str": str, "str | None": str}


def _parse_line(line: str) -> tuple[str, Any, list[tuple[str, str]]]:
    """``(name, payload, [(port, source), ...])`` of one line."""
    head = _HEAD.fullmatch(line)
    if not head:
        raise ValueError("expected 'name = Kind[shape](port=source, ...) field=value ...'")
    cls = PAYLOADS.get(head["kind"])
    if cls is None:
        raise ValueError(f"unknown kind {head['kind']!r}; known: {', '.join(PAYLOADS)}")
    types = {f.name: f.type for f in dataclasses.fields(cls)}
    fields: dict[str, Any] = {"shape": _parse_ints(head["shape"].replace("x", ","))}
    loops = []
    rest, pos = head["rest"], 0
    while rest[pos:].strip():
        token = _TOKEN.match(rest, pos)
        if not token:
            raise ValueError(f"cannot read {rest[pos:].strip()!r}")
        pos = token.end()
        if token["comment"]:
            break
        if token["loop"] is not None:
            loops.append(_parse_loop(token["loop"]))
            continue
        key, value = token["key"], token["value"]
        if key not in types or key in ("shape", "loops"):
            raise ValueError(f"{cls.__name__} has no field {key!r} to write as key=value")
        if key in fields:
            raise ValueError(f"field {key!r} given twice")
        fields[key] = _FIELD_TYPES[types[key]](json.loads(value) if value[0] == '"' else value)
    if "loops" in types:
        fields["loops"] = tuple(loops)
    elif loops:
        raise ValueError(f"{cls.__name__} has no loops")
    try:
        payload = cls(**fields)
    except TypeError as err:
        raise ValueError(str(err)) from None
    operands = []
    for item in filter(None, (s.strip() for s in (head["operands"] or "").split(","))):
        port, sep, source = (s.strip() for s in item.partition("="))
        if not sep or not port or not source:
            raise ValueError(f"bad operand {item!r}, expected port=source")
        operands.append((port, source))
    return head["name"], payload, operands


def from_text(text: str, spec: Any = None) -> nx.DiGraph:
    """The graph that ``text`` states (the inverse of :func:`to_text`), with graph attributes
    ``spec`` and history ``("text",)``; not verified. Raises ``ValueError`` naming the line."""
    graph = nx.DiGraph(spec=spec, history=("text",))
    edges = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            name, payload, operands = _parse_line(line)
            if name in graph:
                raise ValueError(f"node {name!r} defined twice")
        except ValueError as err:
            raise ValueError(f"line {number}: {err}: {line!r}") from None
        graph.add_node(name, op=payload)
        edges += [(number, line, source, name, port) for port, source in operands]
    for number, line, source, name, port in edges:
        if source not in graph:
            raise ValueError(f"line {number}: operand {source!r} is not a node: {line!r}")
        if graph.has_edge(source, name):
            raise ValueError(f"line {number}: {source!r} feeds {name!r} twice: {line!r}")
        graph.add_edge(source, name, port=port)
    return graph
