"""Each pass, as a before/expected graph on a small layer, and as an exact rewrite: the
reference executor gives the same result before and after every pass, equal to torch's op."""
from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings

from oracle import random_inputs, torch_result
from strategies import EXECUTABLE, specs
from zeroskip import LayerSpec
from zeroskip.codegen import frontend, pipeline, reference
from zeroskip.codegen.ir import (Affine, Assemble, AxisLoop, Contract, Input, Output, Subsample,
                                 ZeroInsert, add_node, new_graph, nodes_of, op, to_json, verify)
from zeroskip.codegen.passes import (choose_strategy, densify_zeros, skip_dilation,
                                     trim_padding)
from zeroskip.codegen.passes.choose_strategy import decide


def canonical(graph) -> set:
    """The graph as a set of (node, payload) and edges, with Contract regions named by their
    payload (region numbering is an implementation detail, the regions are not)."""
    def key(node):
        payload = op(graph, node)
        if isinstance(payload, Contract):
            return json.dumps(to_json_payload(payload), sort_keys=True)
        return node

    nodes = {(key(n), json.dumps(to_json_payload(op(graph, n)), sort_keys=True))
             for n in graph}
    edges = {(key(a), key(b), p) for a, b, p in graph.edges(data="port")}
    return nodes | edges


def to_json_payload(payload):
    g = new_graph(LayerSpec.conv(1, 1, 1, input_size=(1,)))
    g.add_node("x", op=payload)
    return to_json(g)["nodes"][0]


def assert_same_graph(actual, expected):
    verify(expected)
    assert canonical(actual) == canonical(expected)


def loop(u, v, out, lhs, rhs):
    return AxisLoop(u=u, v=v, out=Affine(*out), lhs=Affine(*lhs), rhs=Affine(*rhs))


def graph_with(spec, inputs, contracts, lhs, rhs):
    """A graph of ``inputs`` (name -> Input payload), the Contracts (name -> payload) reading
    ``lhs`` and ``rhs``, the Assemble of their blocks and the Output."""
    g = new_graph(spec)
    for name, payload in inputs.items():
        add_node(g, name, payload)
    for name, payload in contracts.items():
        add_node(g, name, payload, lhs=lhs, rhs=rhs)
    add_node(g, "assemble", Assemble(spec.output_shape), part=list(contracts))
    add_node(g, "output", Output("output", spec.output_shape), src="assemble")
    return g


# --------------------------------------------------------------------------- trim_padding
def test_trim_padding_conv1d_k3_p1():
    """conv1d k3 p1 on 5: output 0 loses tap 0, output 4 loses tap 2, 1..3 keep all."""
    spec = LayerSpec.conv(1, 2, 3, padding=1, input_size=(5,), bias=False)
    before = frontend.lower(spec)
    assert [type(op(before, n)).__name__ for n in ("pad_input", "contract")] == ["Pad", "Contract"]
    block = lambda n: (1, 2, n)  # noqa: E731
    expected = graph_with(
        spec,
        {"input": Input("input", (1, 1, 5)), "weight": Input("weight", (2, 1, 3))},
        {"left": Contract(block(1), "forward", 1,
                          (loop((0, 1), (1, 3), (1, 0, 0), (1, 1, -1), (0, 1, 0)),), "border"),
         "mid": Contract(block(3), "forward", 1,
                         (loop((1, 4), (0, 3), (1, 0, 0), (1, 1, -1), (0, 1, 0)),), "interior"),
         "right": Contract(block(1), "forward", 1,
                           (loop((4, 5), (0, 2), (1, 0, 0), (1, 1, -1), (0, 1, 0)),), "border")},
        lhs="input", rhs="weight")
    assert_same_graph(trim_padding(before), expected)


def test_trim_padding_leaves_reflect_padding():
    spec = LayerSpec.conv(1, 1, 3, padding=1, padding_mode="reflect", input_size=(5,))
    before = frontend.lower(spec)
    assert canonical(trim_padding(before)) == canonical(before)


def test_trim_padding_empty_border_when_padding_exceeds_kernel():
    """k1 p1: the two border outputs read only padding; they become empty-tap regions."""
    spec = LayerSpec.conv(1, 1, 1, padding=1, input_size=(3,), bias=False)
    after = trim_padding(frontend.lower(spec))
    taps = sorted((op(after, n).loops[0].u, op(after, n).loops[0].v_len)
                  for n in nodes_of(after, Contract))
    assert taps == [((0, 1), 0), ((1, 4), 1), ((4, 5), 0)]


# --------------------------------------------------------------------------- densify_zeros
def test_densify_zeros_conv_transpose1d_k4_s2_p1():
    """conv_transpose1d k4 s2 p1, length 3 -> 6, derived by hand: even outputs 2t use taps
    k = 3 - 2j of input t + j - 1, odd outputs 2t+1 taps k = 2 - 2j of input t + j. Output 0
    loses its input -1, output 5 its input 3: one border region per phase."""
    spec = LayerSpec.conv_transpose(1, 1, 4, 2, 1, input_size=(3,), bias=False)
    before = trim_padding(frontend.lower(spec))
    even = ((2, 0, 0), (1, 1, -1), (0, -2, 3))
    odd = ((2, 0, 1), (1, 1, 0), (0, -2, 2))
    c = lambda n, u, v, maps, region: Contract((1, 1, n), "grad_input", 1,  # noqa: E731
                                                (loop(u, v, *maps),), region)
    expected = graph_with(
        spec,
        {"input": Input("input", (1, 1, 3)), "weight": Input("weight", (1, 1, 4))},
        {"a": c(1, (0, 1), (1, 2), even, "border phase(0,)"),
         "b": c(2, (1, 3), (0, 2), even, "interior phase(0,)"),
         "c": c(2, (0, 2), (0, 2), odd, "interior phase(1,)"),
         "d": c(1, (2, 3), (0, 1), odd, "border phase(1,)")},
        lhs="input", rhs="weight")
    assert_same_graph(densify_zeros(before), expected)


def test_densify_zeros_empty_phase_when_kernel_smaller_than_stride():
    """k1 s3: two of every three outputs receive no product at all."""
    spec = LayerSpec.conv_transpose(1, 1, 1, 3, input_size=(4,), bias=False)
    after = pipeline.run(spec)[2][1]
    regions = sorted((op(after, n).loops[0].out.c, op(after, n).loops[0].v_len)
                     for n in nodes_of(after, Contract))
    assert regions == [(0, 1), (1, 0), (2, 0)]
    assert not list(nodes_of(after, ZeroInsert))


# --------------------------------------------------------------------------- skip_dilation
def test_skip_dilation_conv1d_k2_d3():
    """conv1d k2 d3 on 5: y[u] = x[u] w[0] + x[u + 3] w[1]; the two holes are never read."""
    spec = LayerSpec.conv(1, 1, 2, dilation=3, input_size=(5,), bias=False)
    before = densify_zeros(trim_padding(frontend.lower(spec)))
    assert isinstance(op(before, "dilate_weight"), ZeroInsert)
    expected = graph_with(
        spec,
        {"input": Input("input", (1, 1, 5)), "weight": Input("weight", (1, 1, 2))},
        {"c": Contract((1, 1, 2), "forward", 1,
                       (loop((0, 2), (0, 2), (1, 0, 0), (1, 3, 0), (0, 1, 0)),), "all")},
        lhs="input", rhs="weight")
    assert_same_graph(skip_dilation(before), expected)


def test_skip_dilation_grad_weight_of_strided_dilated_conv():
    """Sk-dilated: grad_weight of conv1d k2 s2 d2 on 6 is gw[k] = sum_o x[2o + 2k] gy[o]: the
    stride holes of gy and the dilation holes of the kernel are both gone."""
    spec = LayerSpec.conv(1, 1, 2, stride=2, dilation=2, input_size=(6,), bias=False)
    spec = spec.grad_weight()
    before = densify_zeros(trim_padding(frontend.lower(spec)))
    assert isinstance(op(before, "subsample"), Subsample)
    expected = graph_with(
        spec,
        {"input": Input("input", (1, 1, 6)),
         "grad_output": Input("grad_output", (1, 1, 2))},
        {"c": Contract((1, 1, 2), "grad_weight", 1,
                       (loop((0, 2), (0, 2), (1, 0, 0), (2, 2, 0), (0, 1, 0)),), "all")},
        lhs="input", rhs="grad_output")
    assert_same_graph(skip_dilation(before), expected)


# --------------------------------------------------------------------------- choose_strategy
def test_decide_crossover():
    assert decide(10**7, 1.0, 100)[0] == "dense"
    assert decide(10**7, 0.1, 100)[0] == "sparse"
    assert decide(10**7, 0.6, 100)[0] == "dense"
    assert decide(100, 0.01, 100)[0] == "dense"        # too small to repay a sparse pass
    assert decide(0, 0.01, 100)[0] == "dense"
    # The crossover moves down when each input feeds few MACs (scan cost dominates).
    crossover = [min(d / 100 for d in range(1, 101) if decide(10**7, d / 100, r)[0] == "dense")
                 for r in (2, 8, 512)]
    assert crossover == sorted(crossover) and 0.3 < crossover[-1] < 0.5


def test_choose_strategy_marks_every_contract():
    sparse = LayerSpec.conv(64, 64, 3, padding=1, input_size=(28, 28), density=0.1)
    dense = LayerSpec.conv(64, 64, 3, padding=1, input_size=(28, 28), density=0.9)
    for spec, interior in ((sparse, "sparse"), (dense, "dense")):
        graph = choose_strategy(pipeline.run(spec)[3][1])
        strategies = {op(graph, n).region: op(graph, n).strategy for n in nodes_of(graph, Contract)}
        assert strategies["interior"] == interior
        assert all(op(graph, n).reason for n in nodes_of(graph, Contract))


# --------------------------------------------------------------------------- exactness
def check_against_torch(spec: LayerSpec, seed: int = 0) -> None:
    arrays = random_inputs(spec, seed)
    expected = torch_result(spec, arrays)
    for name, graph in pipeline.run(spec):
        got = reference.execute(graph, arrays)
        assert got.shape == expected.shape, name
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9, err_msg=name)


@settings(max_examples=250, deadline=None)
@given(specs(limits=EXECUTABLE))
def test_every_pass_keeps_the_result_equal_to_torch(spec):
    check_against_torch(spec)


@pytest.mark.parametrize("spec", [
    LayerSpec.conv(4, 6, 3, 2, 1, groups=2, input_size=(9, 8), batch=2),
    LayerSpec.conv(3, 3, 3, padding="same", groups=3, dilation=2, input_size=(7, 6)),
    LayerSpec.conv(2, 2, (2, 3), padding=((0, 3), (2, 1)), input_size=(4, 5)),
    LayerSpec.conv(2, 4, 3, 2, 2, padding_mode="circular", input_size=(5, 5)).grad_input(),
    LayerSpec.conv(2, 4, 4, 3, 1, 2, padding_mode="reflect", input_size=(11,)).grad_weight(),
    LayerSpec.conv_transpose(4, 2, 4, 2, 1, groups=2, input_size=(4, 4), batch=2),
    LayerSpec.conv_transpose(2, 3, 3, 3, 4, output_padding=2, dilation=2, input_size=(5,)),
    LayerSpec.conv_transpose(2, 2, 2, 2, 0, input_size=(2, 3, 2)),
    LayerSpec.conv_transpose(2, 2, 5, 4, 2, output_padding=1, input_size=(3, 2)).grad_weight(),
    LayerSpec.conv(2, 3, 1, input_size=(1, 1, 1)),
    LayerSpec.conv(2, 3, 3, padding=1, input_size=(4, 4), batch=0),
], ids=lambda s: f"{s.op}:{s.describe()}")
def test_examples_equal_torch(spec):
    check_against_torch(spec)
