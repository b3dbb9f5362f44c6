"""The back half: ``lower.plan`` in its stages, stated as before/expected text (the plan's text
form, :func:`zeroskip.codegen.plan.to_text`), as the passes' tests state graphs."""
from __future__ import annotations

import textwrap

import pytest

from zeroskip import LayerSpec
from zeroskip.codegen import lower, pipeline
from zeroskip.codegen.ir import IRError
from zeroskip.codegen.variant import Variant


def optimized(spec: LayerSpec, strategy: str = "auto"):
    return pipeline.run(spec, strategy=strategy)[-1][1]


def assert_plan(spec: LayerSpec, expected: str, strategy: str = "auto",
                vector_bytes: int = 64) -> lower.KernelPlan:
    plan = lower.plan(optimized(spec, strategy), vector_bytes=vector_bytes,
                      variant=Variant(strategy))
    assert lower.to_text(plan) == textwrap.dedent(expected).lstrip("\n")
    return plan


def test_dense_conv1d_regions_and_tiles():
    """conv1d k3 p1 on 5: the trimmed borders and the interior, each a direct region with its
    own tap box; tiles of 2 vectors of output channels."""
    assert_plan(LayerSpec.conv(4, 32, 3, padding=1, input_size=(5,), bias=False), """
        forward float rank=1 groups=1 c_red=4 c_out=32 lanes=16
        tiles vectors=2 width=12 c_out_padded=32 red_block=4 positions=4x4 sparse=2
        region_0 direct border channels@0 {u=0:1 v=1:3 out=u lhs=u+v-1 rhs=v}
        region_1 direct interior channels@0 {u=1:4 v=0:3 out=u lhs=u+v-1 rhs=v}
        region_2 direct border channels@0 {u=4:5 v=0:2 out=u lhs=u+v-1 rhs=v}
    """)


def test_sparse_conv_merges_its_borders_into_one_phase():
    """Forced sparse, a padded 3x3 conv's nine regions (interior, edges, corners) merge back
    into one sparse_rows box over every output and tap; bias and ReLU stay fused."""
    spec = LayerSpec.conv(16, 32, 3, padding=1, input_size=(6, 7), activation="relu")
    assert len(optimized(spec, "sparse").graph["history"]) > 1
    assert_plan(spec, """
        forward float rank=2 groups=1 c_red=16 c_out=32 lanes=16 bias relu
        tiles vectors=2 width=12 c_out_padded=32 red_block=16 positions=4x4 sparse=2 block=16 rows=8
        region_0 sparse_rows phase channels@1 {u=0:6 v=0:3 out=u lhs=u+v-1 rhs=v} {u=0:7 v=0:3 out=u lhs=u+v-1 rhs=v}
    """, strategy="sparse")


def test_sparse_transposed_conv_phases():
    """A stride-2 transposed conv's four phases, each a stride-1 sub-convolution of two taps per
    axis (the kernel's every other tap, flipped) writing every other output: one sparse_rows
    region each, on 8-lane vectors."""
    spec = LayerSpec.conv_transpose(16, 8, 4, 2, 1, bias=False, input_size=(3, 3))
    assert_plan(spec, """
        grad_input float rank=2 groups=1 c_red=16 c_out=8 lanes=8
        tiles vectors=1 width=12 c_out_padded=8 red_block=16 positions=4x2 sparse=1 block=16 rows=8
        region_0 sparse_rows phase channels@1 {u=0:3 v=0:2 out=2u lhs=u+v-1 rhs=-2v+3} {u=0:3 v=0:2 out=2u lhs=u+v-1 rhs=-2v+3}
        region_1 sparse_rows phase channels@1 {u=0:3 v=0:2 out=2u lhs=u+v-1 rhs=-2v+3} {u=0:3 v=0:2 out=2u+1 lhs=u+v rhs=-2v+2}
        region_2 sparse_rows phase channels@1 {u=0:3 v=0:2 out=2u+1 lhs=u+v rhs=-2v+2} {u=0:3 v=0:2 out=2u lhs=u+v-1 rhs=-2v+3}
        region_3 sparse_rows phase channels@1 {u=0:3 v=0:2 out=2u+1 lhs=u+v rhs=-2v+2} {u=0:3 v=0:2 out=2u+1 lhs=u+v rhs=-2v+2}
    """, strategy="sparse", vector_bytes=32)


def test_stages():
    """Each stage on its own: the operands and channels, the epilogue, a family per region."""
    spec = LayerSpec.conv(8, 24, 3, padding=1, groups=2, input_size=(5, 6), activation="relu",
                          padding_mode="reflect")
    graph = optimized(spec)
    ops = lower.operands(graph, "c")
    assert (ops.pattern, ops.groups, ops.c_red, ops.c_out) == ("forward", 2, 4, 12)
    assert ops.pad.mode == "reflect" and ops.lhs_shape[2:] == (7, 8)
    assert lower.epilogue(graph, "c") == lower.Epilogue(bias=True, relu=True, adjoint=None)
    regions = lower.regions(graph, ops, 16)
    assert [r.family for r in regions] == ["direct"]
    with pytest.raises(IRError, match="padding mode 'reflect' has no Triton kernel"):
        lower.operands(graph, "triton")


def test_many_regions_share_functions():
    """A transposed conv's 225 regions (k=11, s=4: 16 stride phases, each trimmed at its
    borders): the 16 with the most MACs (the phases' interiors) keep functions of their own;
    the rest share one function per kind (tile axis and index maps' coefficients), whose
    table holds their boxes. A plan of few regions has no classes."""
    spec = LayerSpec.conv_transpose(96, 3, 11, 4, 2, 1, input_size=(55, 55), bias=False)
    plan = lower.plan(optimized(spec), vector_bytes=64)
    tabled = [name for c in plan.classes for name in c.members]
    assert len(tabled) == len(set(tabled)) == len(plan.regions) - lower.OWN_FUNCTIONS == 209
    regions = {r.name: r for r in plan.regions}
    own = [r for r in plan.regions if r.name not in tabled]
    assert min(r.macs_per_sample for r in own) >= \
        max(regions[name].macs_per_sample for name in tabled)
    for c in plan.classes:
        kinds = {(regions[m].family, regions[m].vectorize, regions[m].tile_axis,
                  tuple((a.ou, a.lu, a.lv, a.ru, a.rv) for a in regions[m].axes))
                 for m in c.members}
        assert len(kinds) == 1 and len(c.members) > 1
        assert plan.region_class(c.members[-1]) == c
        assert f"{c.name} serves {len(c.members)} regions: {c.members[0]} " in \
            lower.to_text(plan)
    few = lower.plan(optimized(LayerSpec.conv(8, 8, 5, padding=2, input_size=(9, 9))))
    assert len(few.regions) == 25 and few.classes and \
        lower.plan(optimized(LayerSpec.conv(8, 8, 3, padding=1, input_size=(9, 9)))).classes == ()


def test_regions_holding_most_macs_keep_their_functions():
    """ResNet's 7x7 s2 stem's input gradient (49 regions): its 4 largest regions hold 97% of
    the MACs and keep functions of their own (lower.OWN_SHARE); the other 45 share."""
    spec = LayerSpec.conv(3, 64, 7, 2, 3, input_size=(224, 224)).grad_input()
    plan = lower.plan(optimized(spec), vector_bytes=64)
    tabled = {name for c in plan.classes for name in c.members}
    own = sorted((r for r in plan.regions if r.name not in tabled),
                 key=lambda r: -r.macs_per_sample)
    total = sum(r.macs_per_sample for r in plan.regions)
    held = sum(r.macs_per_sample for r in own)
    assert len(plan.regions) == 49 and len(own) == 4
    assert held >= lower.OWN_SHARE * total > held - own[-1].macs_per_sample
