"""Each pass, as a before/expected graph on a small layer stated in the IR's text form
(:mod:`zeroskip.codegen.text`), and as an exact rewrite: the reference executor gives the same
result before and after every pass, equal to torch's op."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings

from ir_helpers import assert_ir
from oracle import random_inputs, torch_result
from strategies import EXECUTABLE, specs, workloads
from zeroskip import LayerSpec, Workload
from zeroskip.codegen import frontend, pipeline, reference
from zeroskip.codegen.ir import Contract, nodes_of, op
from zeroskip.codegen.passes import (choose_strategy, densify_zeros, skip_dilation,
                                     trim_padding)
from zeroskip.codegen.cost import decide


# --------------------------------------------------------------------------- trim_padding
def test_trim_padding_conv1d_k3_p1():
    """conv1d k3 p1 on 5: output 0 loses tap 0, output 4 loses tap 2, 1..3 keep all (two
    input channels: one would be a depthwise-like layer, whose padding the cost rule keeps)."""
    spec = LayerSpec.conv(2, 2, 3, padding=1, input_size=(5,), bias=False)
    before = frontend.lower(spec)
    assert_ir(before, """
        input = Input[1x2x5] name=input
        weight = Input[2x2x3] name=weight
        pad_input = Pad[1x2x7](src=input) lo=1 hi=1
        c0 = Contract[1x2x5](lhs=pad_input, rhs=weight) pattern=forward groups=1 {u=0:5 v=0:3 out=u lhs=u+v rhs=v}
        assemble = Assemble[1x2x5](part=c0)
        output = Output[1x2x5](src=assemble) name=output
    """)
    assert isinstance(op(before, "contract"), Contract)  # the text calls every region c<i>
    assert_ir(trim_padding(before), """
        input = Input[1x2x5] name=input
        weight = Input[2x2x3] name=weight
        c0 = Contract[1x2x1](lhs=input, rhs=weight) pattern=forward groups=1 region=border {u=0:1 v=1:3 out=u lhs=u+v-1 rhs=v}
        c1 = Contract[1x2x3](lhs=input, rhs=weight) pattern=forward groups=1 region=interior {u=1:4 v=0:3 out=u lhs=u+v-1 rhs=v}
        c2 = Contract[1x2x1](lhs=input, rhs=weight) pattern=forward groups=1 region=border {u=4:5 v=0:2 out=u lhs=u+v-1 rhs=v}
        assemble = Assemble[1x2x5](part=c0, part=c1, part=c2)
        output = Output[1x2x5](src=assemble) name=output
    """)


def test_trim_padding_leaves_reflect_padding():
    spec = LayerSpec.conv(1, 1, 3, padding=1, padding_mode="reflect", input_size=(5,))
    before = frontend.lower(spec)
    unchanged = """
        bias = Input[1] name=bias
        input = Input[1x1x5] name=input
        weight = Input[1x1x3] name=weight
        pad_input = Pad[1x1x7](src=input) lo=1 hi=1 mode=reflect
        c0 = Contract[1x1x5](lhs=pad_input, rhs=weight) pattern=forward groups=1 {u=0:5 v=0:3 out=u lhs=u+v rhs=v}
        assemble = Assemble[1x1x5](part=c0)
        bias_add = BiasAdd[1x1x5](src=assemble, bias=bias)
        output = Output[1x1x5](src=bias_add) name=output
    """
    assert_ir(before, unchanged)
    assert_ir(trim_padding(before), unchanged)


def test_trim_padding_empty_border_when_padding_exceeds_kernel():
    """k1 p1: the two border outputs read only padding; they become empty-tap regions."""
    spec = LayerSpec.conv(1, 1, 1, padding=1, input_size=(3,), bias=False)
    assert_ir(trim_padding(frontend.lower(spec)), """
        input = Input[1x1x3] name=input
        weight = Input[1x1x1] name=weight
        c0 = Contract[1x1x1](lhs=input, rhs=weight) pattern=forward groups=1 region=border {u=0:1 v=0:0 out=u lhs=u+v-1 rhs=v}
        c1 = Contract[1x1x3](lhs=input, rhs=weight) pattern=forward groups=1 region=interior {u=1:4 v=0:1 out=u lhs=u+v-1 rhs=v}
        c2 = Contract[1x1x1](lhs=input, rhs=weight) pattern=forward groups=1 region=border {u=4:5 v=0:0 out=u lhs=u+v-1 rhs=v}
        assemble = Assemble[1x1x5](part=c0, part=c1, part=c2)
        output = Output[1x1x5](src=assemble) name=output
    """)


# --------------------------------------------------------------------------- densify_zeros
def test_densify_zeros_conv_transpose1d_k4_s2_p1():
    """conv_transpose1d k4 s2 p1, length 3 -> 6, derived by hand: even outputs 2t use taps
    k = 3 - 2j of input t + j - 1, odd outputs 2t+1 taps k = 2 - 2j of input t + j. Output 0
    loses its input -1, output 5 its input 3: one border region per phase."""
    spec = LayerSpec.conv_transpose(1, 1, 4, 2, 1, input_size=(3,), bias=False)
    before = trim_padding(frontend.lower(spec))
    assert_ir(before, """
        input = Input[1x1x3] name=input
        weight = Input[1x1x4] name=weight
        insert_zeros_input = ZeroInsert[1x1x5](src=input) factor=2 why=stride
        c0 = Contract[1x1x1](lhs=insert_zeros_input, rhs=weight) pattern=grad_input groups=1 region=border {u=0:1 v=2:4 out=u lhs=u+v-2 rhs=-v+3}
        c1 = Contract[1x1x1](lhs=insert_zeros_input, rhs=weight) pattern=grad_input groups=1 region=border {u=1:2 v=1:4 out=u lhs=u+v-2 rhs=-v+3}
        c2 = Contract[1x1x2](lhs=insert_zeros_input, rhs=weight) pattern=grad_input groups=1 region=interior {u=2:4 v=0:4 out=u lhs=u+v-2 rhs=-v+3}
        c3 = Contract[1x1x1](lhs=insert_zeros_input, rhs=weight) pattern=grad_input groups=1 region=border {u=4:5 v=0:3 out=u lhs=u+v-2 rhs=-v+3}
        c4 = Contract[1x1x1](lhs=insert_zeros_input, rhs=weight) pattern=grad_input groups=1 region=border {u=5:6 v=0:2 out=u lhs=u+v-2 rhs=-v+3}
        assemble = Assemble[1x1x6](part=c0, part=c1, part=c2, part=c3, part=c4)
        output = Output[1x1x6](src=assemble) name=output
    """)
    assert_ir(densify_zeros(before), """
        input = Input[1x1x3] name=input
        weight = Input[1x1x4] name=weight
        c0 = Contract[1x1x1](lhs=input, rhs=weight) pattern=grad_input groups=1 region="border phase(0,)" {u=0:1 v=1:2 out=2*u lhs=u+v-1 rhs=-2*v+3}
        c1 = Contract[1x1x2](lhs=input, rhs=weight) pattern=grad_input groups=1 region="interior phase(0,)" {u=1:3 v=0:2 out=2*u lhs=u+v-1 rhs=-2*v+3}
        c2 = Contract[1x1x2](lhs=input, rhs=weight) pattern=grad_input groups=1 region="interior phase(1,)" {u=0:2 v=0:2 out=2*u+1 lhs=u+v rhs=-2*v+2}
        c3 = Contract[1x1x1](lhs=input, rhs=weight) pattern=grad_input groups=1 region="border phase(1,)" {u=2:3 v=0:1 out=2*u+1 lhs=u+v rhs=-2*v+2}
        assemble = Assemble[1x1x6](part=c0, part=c1, part=c2, part=c3)
        output = Output[1x1x6](src=assemble) name=output
    """)


def test_densify_zeros_empty_phase_when_kernel_smaller_than_stride():
    """k1 s3: two of every three outputs receive no product at all (phases 1 and 2 have no
    taps, v=0:0), and no ZeroInsert is left."""
    spec = LayerSpec.conv_transpose(1, 1, 1, 3, input_size=(4,), bias=False)
    assert_ir(dict(pipeline.run(spec))["densify_zeros"], """
        input = Input[1x1x4] name=input
        weight = Input[1x1x1] name=weight
        c0 = Contract[1x1x4](lhs=input, rhs=weight) pattern=grad_input groups=1 region="all phase(0,)" {u=0:4 v=0:1 out=3*u lhs=u+v rhs=-3*v}
        c1 = Contract[1x1x3](lhs=input, rhs=weight) pattern=grad_input groups=1 region="all phase(1,)" {u=0:3 v=0:0 out=3*u+1 lhs=3*u+3*v+3 rhs=-3*v-2}
        c2 = Contract[1x1x3](lhs=input, rhs=weight) pattern=grad_input groups=1 region="all phase(2,)" {u=0:3 v=0:0 out=3*u+2 lhs=3*u+3*v+3 rhs=-3*v-1}
        assemble = Assemble[1x1x10](part=c0, part=c1, part=c2)
        output = Output[1x1x10](src=assemble) name=output
    """)


# --------------------------------------------------------------------------- skip_dilation
def test_skip_dilation_conv1d_k2_d3():
    """conv1d k2 d3 on 5: y[u] = x[u] w[0] + x[u + 3] w[1]; the two holes are never read."""
    spec = LayerSpec.conv(1, 1, 2, dilation=3, input_size=(5,), bias=False)
    before = densify_zeros(trim_padding(frontend.lower(spec)))
    assert_ir(before, """
        input = Input[1x1x5] name=input
        weight = Input[1x1x2] name=weight
        dilate_weight = ZeroInsert[1x1x4](src=weight) factor=3 why=dilation
        c0 = Contract[1x1x2](lhs=input, rhs=dilate_weight) pattern=forward groups=1 {u=0:2 v=0:4 out=u lhs=u+v rhs=v}
        assemble = Assemble[1x1x2](part=c0)
        output = Output[1x1x2](src=assemble) name=output
    """)
    assert_ir(skip_dilation(before), """
        input = Input[1x1x5] name=input
        weight = Input[1x1x2] name=weight
        c0 = Contract[1x1x2](lhs=input, rhs=weight) pattern=forward groups=1 {u=0:2 v=0:2 out=u lhs=u+3*v rhs=v}
        assemble = Assemble[1x1x2](part=c0)
        output = Output[1x1x2](src=assemble) name=output
    """)


def test_skip_dilation_grad_weight_of_strided_dilated_conv():
    """Sk-dilated: grad_weight of conv1d k2 s2 d2 on 6 is gw[k] = sum_o x[2o + 2k] gy[o]: the
    stride holes of gy and the dilation holes of the kernel are both gone."""
    spec = LayerSpec.conv(1, 1, 2, stride=2, dilation=2, input_size=(6,), bias=False)
    spec = spec.grad_weight()
    before = densify_zeros(trim_padding(frontend.lower(spec)))
    assert_ir(before, """
        grad_output = Input[1x1x2] name=grad_output
        input = Input[1x1x6] name=input
        insert_zeros_grad_output = ZeroInsert[1x1x3](src=grad_output) factor=2 why=stride
        c0 = Contract[1x1x3](lhs=input, rhs=insert_zeros_grad_output) pattern=grad_weight groups=1 {u=0:3 v=0:3 out=u lhs=u+v rhs=v}
        assemble = Assemble[1x1x3](part=c0)
        subsample = Subsample[1x1x2](src=assemble) factor=2
        output = Output[1x1x2](src=subsample) name=output
    """)
    assert_ir(skip_dilation(before), """
        grad_output = Input[1x1x2] name=grad_output
        input = Input[1x1x6] name=input
        c0 = Contract[1x1x2](lhs=input, rhs=grad_output) pattern=grad_weight groups=1 {u=0:2 v=0:2 out=u lhs=2*u+2*v rhs=v}
        assemble = Assemble[1x1x2](part=c0)
        output = Output[1x1x2](src=assemble) name=output
    """)


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
    assert crossover == sorted(crossover) and 0.15 < crossover[-1] < 0.3


def test_choose_strategy_marks_every_contract():
    spec = LayerSpec.conv(64, 64, 3, padding=1, input_size=(28, 28))
    for density, interior in ((0.1, "sparse"), (0.9, "dense")):
        graph = choose_strategy(pipeline.run(spec, workload=Workload(density=density))[3][1])
        strategies = {op(graph, n).region: op(graph, n).strategy for n in nodes_of(graph, Contract)}
        assert strategies["interior"] == interior
        assert all(op(graph, n).reason for n in nodes_of(graph, Contract))


# --------------------------------------------------------------------------- exactness
def check_against_torch(spec: LayerSpec, seed: int = 0, workload: Workload = Workload()
                        ) -> None:
    arrays = random_inputs(spec, seed, workload)
    expected = torch_result(spec, arrays)
    for name, graph in pipeline.run(spec, workload=workload):
        got = reference.execute(graph, arrays)
        assert got.shape == expected.shape, name
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9, err_msg=name)


@settings(max_examples=250, deadline=None)
@given(specs(limits=EXECUTABLE), workloads())
def test_every_pass_keeps_the_result_equal_to_torch(spec, workload):
    check_against_torch(spec, workload=workload)


@pytest.mark.parametrize("spec, batch", [
    (LayerSpec.conv(4, 6, 3, 2, 1, groups=2, input_size=(9, 8)), 2),
    (LayerSpec.conv(3, 3, 3, padding="same", groups=3, dilation=2, input_size=(7, 6)), 1),
    (LayerSpec.conv(2, 2, (2, 3), padding=((0, 3), (2, 1)), input_size=(4, 5)), 1),
    (LayerSpec.conv(2, 4, 3, 2, 2, padding_mode="circular", input_size=(5, 5)).grad_input(), 1),
    (LayerSpec.conv(2, 4, 4, 3, 1, 2, padding_mode="reflect", input_size=(11,)).grad_weight(), 1),
    (LayerSpec.conv_transpose(4, 2, 4, 2, 1, groups=2, input_size=(4, 4)), 2),
    (LayerSpec.conv_transpose(2, 3, 3, 3, 4, output_padding=2, dilation=2, input_size=(5,)), 1),
    (LayerSpec.conv_transpose(2, 2, 2, 2, 0, input_size=(2, 3, 2)), 1),
    (LayerSpec.conv_transpose(2, 2, 5, 4, 2, output_padding=1, input_size=(3, 2)).grad_weight(),
     1),
    (LayerSpec.conv(2, 3, 1, input_size=(1, 1, 1)), 1),
    (LayerSpec.conv(2, 3, 3, padding=1, input_size=(4, 4)), 0),
], ids=lambda s: f"{s.op}:{s.describe()}" if isinstance(s, LayerSpec) else f"batch{s}")
def test_examples_equal_torch(spec, batch):
    check_against_torch(spec, workload=Workload(batch))
