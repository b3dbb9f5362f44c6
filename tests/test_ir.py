"""The IR contract: verify accepts every pipeline step and rejects each broken invariant with an
IRError naming the node; JSON, DOT and text serialization; ZEROSKIP_DUMP."""
from __future__ import annotations

import dataclasses
import json
import random
import re

import networkx as nx
import pytest

from zeroskip import LayerSpec
from zeroskip.codegen import frontend, pipeline
from zeroskip.codegen.ir import (Affine, AxisLoop, Contract, IRError, Output, add_node,
                                 from_json, nodes_of, op, operand, parts, replace_payload, to_dot,
                                 to_json, verify)
from zeroskip.codegen.text import (format_affine, from_text, parse_affine, text_names,
                                   to_text)

STEPS = ["frontend", *(name for name, _ in pipeline.PIPELINE)]

SPECS = {
    "conv2d_k3_s2_p1": LayerSpec.conv(8, 16, 3, 2, 1, input_size=(9, 9)),
    "conv_transpose2d_k4_s2_p1": LayerSpec.conv_transpose(8, 4, 4, 2, 1, input_size=(5, 5)),
    "conv1d_d2_reflect": LayerSpec.conv(4, 6, 3, 1, 2, dilation=2, padding_mode="reflect",
                                        input_size=(11,)),
    "grad_input_s2": LayerSpec.conv(4, 6, 3, 2, 1, input_size=(9, 9)).grad_input(),
    "grad_weight_s2": LayerSpec.conv(4, 6, 3, 2, 1, input_size=(9, 9)).grad_weight(),
}
CONV = SPECS["conv2d_k3_s2_p1"]


def steps_of(spec):
    return pipeline.run(spec)


@pytest.mark.parametrize("spec", SPECS.values(), ids=SPECS.keys())
def test_verify_accepts_every_step(spec):
    steps = steps_of(spec)
    assert [name for name, _ in steps] == STEPS
    # Verified after the whole pipeline ran: a pass that mutated an earlier step's graph in
    # place would show up here.
    for i, (name, graph) in enumerate(steps):
        assert verify(graph) is graph
        assert graph.graph["history"] == tuple(STEPS[:i + 1])
        assert graph.graph["spec"] == spec


# ------------------------------------------------------------------------------ rejections
def after(step: str, spec=CONV) -> nx.DiGraph:
    return dict(steps_of(spec))[step].copy()


def test_rejects_contract_reading_out_of_bounds():
    graph = frontend.lower(CONV)
    c = op(graph, "contract")
    first = c.loops[0]
    shifted = dataclasses.replace(first, lhs=dataclasses.replace(first.lhs, c=first.lhs.c + 1))
    replace_payload(graph, "contract", loops=(shifted, *c.loops[1:]))
    with pytest.raises(IRError, match=r"node 'contract': lhs index .* outside \[0, 11\)"):
        verify(graph)


def test_rejects_overlapping_regions():
    graph = after("trim_padding")
    part = parts(graph, "assemble")[0]
    add_node(graph, "duplicate", op(graph, part), lhs=operand(graph, part, "lhs"),
             rhs=operand(graph, part, "rhs"))
    graph.add_edge("duplicate", "assemble", port="part")
    with pytest.raises(IRError, match=r"node 'assemble': .*covered 2 times"):
        verify(graph)


def test_rejects_missing_region():
    graph = after("trim_padding")
    graph.remove_node(parts(graph, "assemble")[0])
    with pytest.raises(IRError, match=r"node 'assemble': .*covered 0 times"):
        verify(graph)


def test_rejects_missing_operand_port():
    graph = frontend.lower(CONV)
    graph.remove_edge("weight", "contract")
    with pytest.raises(IRError, match=r"node 'contract' \(Contract\): operands on ports "
                                      r"\['lhs'\], expected \['lhs', 'rhs'\]"):
        verify(graph)


def test_rejects_wrong_pad_shape():
    graph = frontend.lower(CONV)
    shape = op(graph, "pad_input").shape
    replace_payload(graph, "pad_input", shape=(*shape[:2], shape[2] + 1, shape[3]))
    with pytest.raises(IRError, match=r"node 'pad_input': shape .* padding its source"):
        verify(graph)


def test_rejects_unknown_strategy():
    graph = after("choose_strategy")
    node = next(nodes_of(graph, Contract))
    replace_payload(graph, node, strategy="fastest")
    with pytest.raises(IRError, match=rf"node '{re.escape(node)}': unknown strategy 'fastest'"):
        verify(graph)


def test_rejects_two_outputs():
    graph = frontend.lower(CONV)
    add_node(graph, "output2", Output("output2", op(graph, "output").shape), src="bias_add")
    with pytest.raises(IRError, match="exactly one Output") as info:
        verify(graph)
    assert "'output'" in str(info.value) and "'output2'" in str(info.value)


def test_rejects_cycle_naming_its_nodes():
    graph = frontend.lower(CONV)
    graph.add_edge("output", "pad_input", port="src")
    cycle = {a for a, _ in nx.find_cycle(graph)}
    with pytest.raises(IRError, match="cycle") as info:
        verify(graph)
    # IRError promises "the message names the node".
    assert any(repr(node) in str(info.value) for node in cycle), str(info.value)


# ------------------------------------------------------------------------------ serialization
ROUND_TRIP = ["conv_transpose2d_k4_s2_p1", "conv1d_d2_reflect", "grad_weight_s2"]


def round_trip(graph: nx.DiGraph) -> nx.DiGraph:
    return from_json(json.loads(json.dumps(to_json(graph))))


@pytest.mark.parametrize("key", ROUND_TRIP)
def test_json_round_trip_preserves_graph(key):
    for name, graph in steps_of(SPECS[key]):
        back = round_trip(graph)
        assert back.graph == graph.graph, name
        assert dict(back.nodes(data="op")) == dict(graph.nodes(data="op")), name
        assert set(back.edges(data="port")) == set(graph.edges(data="port")), name
        verify(back)


@pytest.mark.parametrize("key", ROUND_TRIP)
def test_json_round_trip_is_a_fixed_point(key):
    for name, graph in steps_of(SPECS[key]):
        assert to_json(round_trip(graph)) == json.loads(json.dumps(to_json(graph))), name


NODE_LINE = re.compile(r'  (n\d+) \[label="([^"]*)"\];')
EDGE_LINE = re.compile(r'  (n\d+) -> (n\d+) \[label="([^"]*)"\];')


@pytest.mark.parametrize("key", ["conv_transpose2d_k4_s2_p1", "grad_weight_s2"])
def test_to_dot_has_one_line_per_node_and_edge(key):
    for name, graph in steps_of(SPECS[key]):
        lines = to_dot(graph).splitlines()
        assert lines[0] == "digraph zeroskip {" and lines[-1] == "}"
        nodes = [m.groups() for m in map(NODE_LINE.fullmatch, lines) if m]
        edges = [m.groups() for m in map(EDGE_LINE.fullmatch, lines) if m]
        assert len(nodes) == graph.number_of_nodes() and len(edges) == graph.number_of_edges()
        assert len(lines) == 4 + len(nodes) + len(edges) + 1  # header, body, closing brace
        names = {key_: label.split("\\n")[0] for key_, label in nodes}
        assert set(names.values()) == set(graph.nodes)
        assert {(names[a], names[b], port) for a, b, port in edges} == \
            set(graph.edges(data="port"))
        assert name in lines[3]  # the graph label names the step


def test_zeroskip_dump_env_writes_every_step(monkeypatch, tmp_path):
    monkeypatch.setenv("ZEROSKIP_DUMP", str(tmp_path))
    steps = pipeline.run(CONV)
    (folder,) = tmp_path.iterdir()
    assert folder.is_dir() and "conv2d" in folder.name
    expected = sorted(f"{i:02d}-{name}.{ext}" for i, name in enumerate(STEPS)
                      for ext in ("json", "dot"))
    assert sorted(p.name for p in folder.iterdir()) == expected
    for i, (name, graph) in enumerate(steps):
        data = json.loads((folder / f"{i:02d}-{name}.json").read_text())
        assert data == json.loads(json.dumps(to_json(graph)))
        loaded = verify(from_json(data))
        assert loaded.graph["history"] == tuple(STEPS[:i + 1])
        assert dict(loaded.nodes(data="op")) == dict(graph.nodes(data="op"))
        assert (folder / f"{i:02d}-{name}.dot").read_text() == to_dot(graph)


# ------------------------------------------------------------------------------ text form
@pytest.mark.parametrize("key", SPECS.keys())
def test_text_round_trip(key):
    """from_text(to_text(g)) is g with its Contracts renamed c0, c1, ...: every field and edge
    survives the text."""
    for name, graph in steps_of(SPECS[key]):
        text = to_text(graph)
        back = verify(from_text(text, graph.graph["spec"]))
        assert to_text(back) == text, name
        renamed = nx.relabel_nodes(graph, text_names(graph))
        assert dict(back.nodes(data="op")) == dict(renamed.nodes(data="op")), name
        assert set(back.edges(data="port")) == set(renamed.edges(data="port")), name
        assert back.graph == {"spec": graph.graph["spec"], "history": ("text",)}


def test_text_is_stable_under_region_renumbering():
    """Region names and the order nodes and edges were added do not show in the text."""
    graph = after("densify_zeros", SPECS["conv_transpose2d_k4_s2_p1"])
    contracts = list(nodes_of(graph, Contract))
    assert len(contracts) > 2
    names = [f"region.{i}" for i in range(len(contracts))]
    random.Random(0).shuffle(names)
    renamed = nx.relabel_nodes(graph, dict(zip(contracts, names)))
    rebuilt = nx.DiGraph(**graph.graph)
    rebuilt.add_nodes_from(reversed(list(renamed.nodes(data=True))))
    rebuilt.add_edges_from(reversed(list(renamed.edges(data=True))))
    text = to_text(graph)
    assert to_text(renamed) == to_text(rebuilt) == text
    # Lines in any order, Contracts under any name, comments: the same graph.
    lines = text.splitlines()
    random.Random(1).shuffle(lines)
    assert to_text(from_text("# shuffled\n" + "\n".join(lines))) == text


def test_text_shows_a_changed_index_map():
    graph = frontend.lower(CONV)
    c = op(graph, "contract")
    loop = c.loops[1]
    replace_payload(graph, "contract",
                    loops=(c.loops[0], dataclasses.replace(loop, rhs=Affine(v=1, c=1))))
    assert to_text(graph) != to_text(frontend.lower(CONV))


def test_text_of_a_frontend_graph():
    assert to_text(frontend.lower(CONV)) == """\
bias = Input[16] name=bias
input = Input[1x8x9x9] name=input
weight = Input[16x8x3x3] name=weight
pad_input = Pad[1x8x11x11](src=input) lo=1,1 hi=1,1
c0 = Contract[1x16x5x5](lhs=pad_input, rhs=weight) pattern=forward groups=1 \
{u=0:5 v=0:3 out=u lhs=2*u+v rhs=v} {u=0:5 v=0:3 out=u lhs=2*u+v rhs=v}
assemble = Assemble[1x16x5x5](part=c0)
bias_add = BiasAdd[1x16x5x5](src=assemble, bias=bias)
output = Output[1x16x5x5](src=bias_add) name=output
"""


def test_from_text_reads_fields_by_name():
    graph = from_text("""
        x = Input[2x4x5x3] name=x
        w = Input[6x2x3x2] name=w
        # any node name; fields in any order; a quoted string keeps its spaces and quotes
        part = Contract[2x6x3x2](rhs=w, lhs=x) groups=2 pattern=forward \
        region="border phase(1, 0)" strategy=sparse reason="say \\"why\\"" \
        {u=0:3 v=1:3 out=2*u+1 lhs=u+v-1 rhs=v} {u=0:2 v=0:2 out=-u+1 lhs=3*u rhs=-v+1}
    """)
    assert op(graph, "part") == Contract(
        shape=(2, 6, 3, 2), pattern="forward", groups=2, region="border phase(1, 0)",
        strategy="sparse", reason='say "why"',
        loops=(AxisLoop(u=(0, 3), v=(1, 3), out=Affine(2, 0, 1), lhs=Affine(1, 1, -1),
                        rhs=Affine(v=1)),
               AxisLoop(u=(0, 2), v=(0, 2), out=Affine(-1, 0, 1), lhs=Affine(u=3),
                        rhs=Affine(0, -1, 1))))
    assert set(graph.in_edges("part", data="port")) == {("x", "part", "lhs"),
                                                        ("w", "part", "rhs")}
    assert 'region="border phase(1, 0)" strategy=sparse reason="say \\"why\\""' in \
        to_text(graph)


@pytest.mark.parametrize("affine, text", [
    (Affine(), "0"), (Affine(c=-3), "-3"), (Affine(u=1), "u"), (Affine(v=-1, c=3), "-v+3"),
    (Affine(2, 1, -1), "2*u+v-1"), (Affine(0, -2, 0), "-2*v"), (Affine(-1, 3, 2), "-u+3*v+2"),
])
def test_affine_text(affine, text):
    assert format_affine(affine) == text
    assert parse_affine(text) == affine


@pytest.mark.parametrize("text, message", [
    ("x = Tensor[1] name=x", r"line 1: unknown kind 'Tensor'"),
    ("x = Input[1]", r"line 1: .*missing 1 required positional argument: 'name'"),
    ("x = Input[1] name=x size=3", r"line 1: Input has no field 'size'"),
    ("x = Input[1] name=x name=y", r"line 1: field 'name' given twice"),
    ("x = Input[1] name=x\nx = Input[1] name=x", r"line 2: node 'x' defined twice"),
    ("y = Output[1](src=x) name=y", r"line 1: operand 'x' is not a node"),
    ("y = Output[1](x) name=y", r"line 1: bad operand 'x', expected port=source"),
    ("x = Input[1x2] name=x {u=0:1 v=0:1 out=u lhs=u rhs=v}", r"line 1: Input has no loops"),
    ("x = Input[1] name=x garbage", r"line 1: cannot read 'garbage'"),
    ("input x", r"line 1: expected 'name = Kind\[shape\]"),
    ("c = Contract[1x1x1] pattern=forward groups=1 {u=0:1 v=0:1 out=u lhs=u+ rhs=v}",
     r"line 1: bad index map 'u\+'"),
    ("c = Contract[1x1x1] pattern=forward groups=1 {u=0:1 v=0 out=u lhs=u rhs=v}",
     r"line 1: bad range v='0'"),
    ("c = Contract[1x1x1] pattern=forward groups=1 {u=0:1 out=u lhs=u rhs=v}",
     r"line 1: an axis needs u, v, out, lhs, rhs"),
])
def test_from_text_names_the_bad_line(text, message):
    with pytest.raises(ValueError, match=message):
        from_text(text)


def test_to_text_refuses_a_contract_name_on_another_node():
    graph = frontend.lower(CONV)
    graph = nx.relabel_nodes(graph, {"pad_input": "c3"})
    with pytest.raises(ValueError, match=r"\['c3'\] are not Contracts"):
        to_text(graph)


# ------------------------------------------------------------------------------ robustness
def _stray_node(graph):
    graph.add_node("stray")
    return "stray"


def _edge_without_port(graph):
    graph.remove_edge("weight", "contract")
    graph.add_edge("weight", "contract")
    return "contract"


@pytest.mark.parametrize("breakage", [_stray_node, _edge_without_port])
def test_malformed_graph_raises_irerror(breakage):
    """verify's contract is an IRError naming the node for any broken graph, also a node with no
    payload or an edge with no port (easy to make by hand with graph.add_node / add_edge)."""
    graph = frontend.lower(CONV)
    node = breakage(graph)
    with pytest.raises(IRError, match=f"'{node}'"):
        verify(graph)
