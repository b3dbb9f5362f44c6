"""A zero padding kept as a zero-padded copy (trim_padding's cost rule): where it is chosen and
why, the exact MAC accounting, and the kernels against torch."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracle import random_inputs
from strategies import EXECUTABLE, specs, workloads
from test_kernels import plan_of, run_and_compare
from zeroskip import LayerSpec, Workload, explain
from zeroskip import functional as zf
from zeroskip.codegen import cost, lower, pipeline
from zeroskip.codegen.ir import Pad, nodes_of, op
from zeroskip.codegen.macs import graph_macs, nonzero_macs
from zeroskip.runtime import loader

# 3x3 convs on small maps: the diffusion UNet's middle block (59 MB of weights on 4x4) and a
# ResNet's last stage (9.4 MB on 7x7).
MID = LayerSpec.conv(1280, 1280, 3, padding=1, input_size=(4, 4))
STAGE4 = LayerSpec.conv(512, 512, 3, padding=1, input_size=(7, 7))


def _kept(spec: LayerSpec, **run) -> bool:
    graph = pipeline.run(spec, **run)[-1][1]
    return any(isinstance(op(graph, n), Pad) for n in graph.nodes)


def test_weight_traffic_keeps_the_padding():
    report = explain(MID)
    assert "kept as a zero-padded copy" in report.padding and "64%" in report.padding
    # The accounting stays exact: the non-zero MACs are the closed form's, and the kernel's
    # MACs (every tap of every output) are reported beside them, as is what it skips.
    assert report.nonzero_macs == nonzero_macs(MID) == 1280 * 1280 * 10 * 10
    assert report.executed_macs == graph_macs(report.graph) == 1280 * 1280 * 16 * 9
    assert report.skipped == 0.0
    assert "executed MACs" in str(report) and "padding" in str(report)
    plan = plan_of(MID)
    assert plan.pad is not None and plan.pad.mode == "zeros" and len(plan.regions) == 1
    assert plan.lhs_size == (6, 6)


def test_trimmed_where_the_border_is_cheap():
    for spec, why in ((LayerSpec.conv(1024, 1024, 3, padding=1, input_size=(56, 56)),
                       "border regions hold 5%"),
                      (LayerSpec.conv(256, 256, 3, padding=1, input_size=(4, 4)), "MiB of weights"),
                      (LayerSpec.conv(512, 256, 3, padding=6, dilation=6, input_size=(33, 33)),
                       "12 outputs wide"),
                      (LayerSpec.conv(64, 64, 3, padding=1, groups=32, input_size=(4, 4)),
                       "output channels per group"),
                      (LayerSpec.conv(32, 32, 3, padding=1, groups=32, input_size=(160, 160)),
                       "KiB costs more to copy"),
                      (LayerSpec.conv(96, 96, 3, stride=2, padding=1, groups=96,
                                      input_size=(112, 112)), "KiB costs more to copy")):
        report = explain(spec)
        assert why in report.padding and not _kept(spec)
        assert report.executed_macs == report.nonzero_macs
    # Sparse kernels skip padded zeros for free; Triton kernels mask their loads; the weight
    # gradient and a strided input gradient (its data has zeros inserted) always trim.
    assert _kept(MID) and not _kept(MID, strategy="sparse")
    assert not _kept(MID, workload=Workload(1, 0.5)) and _kept(MID, strategy="dense",
                                                                 workload=Workload(1, 0.5))
    assert not _kept(MID, target="triton")
    assert not _kept(dataclasses.replace(MID, op="conv_grad_weight"))
    assert _kept(dataclasses.replace(MID, op="conv_grad_input"))
    strided = LayerSpec.conv(1280, 1280, 3, stride=2, padding=1, input_size=(8, 8))
    assert not _kept(dataclasses.replace(strided, op="conv_grad_input"))


@pytest.mark.parametrize("spec", [STAGE4, dataclasses.replace(STAGE4, op="conv_grad_input"),
                                  LayerSpec.conv(512, 512, 3, stride=2, padding=1,
                                                 input_size=(8, 8), activation="relu")])
def test_kept_padding_kernels_match_torch(spec):
    assert plan_of(spec).pad is not None
    run_and_compare(spec, random_inputs(spec, workload=Workload(2)))


def test_functional_conv_with_kept_padding():
    x = torch.randn(2, 512, 7, 7, requires_grad=True)
    w = (torch.randn(512, 512, 3, 3) * 0.02).requires_grad_()
    got = zf.conv2d(x, w, padding=1)
    want = F.conv2d(x, w, padding=1)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    g = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, (x, w), g)
    want_grads = torch.autograd.grad(want, (x, w), g)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


# Depthwise layers keep their padding where a padded plane is small: the kernel pads each plane
# in L1 as its tiles, several whole rows each, read it.
DEPTHWISE = LayerSpec.conv(960, 960, 3, padding=1, groups=960, bias=False, input_size=(7, 7))


def test_depthwise_pads_planes_in_the_kernel():
    report = explain(DEPTHWISE)
    assert report.padding.startswith("depthwise:") and "kept as planes padded" in report.padding
    assert report.nonzero_macs == nonzero_macs(DEPTHWISE) == 960 * (7 * 3 - 2) ** 2
    assert report.executed_macs == 960 * 49 * 9
    plan = plan_of(DEPTHWISE)
    (region,) = plan.regions
    assert plan.plane_pad and plan.lhs_size == (9, 9)
    assert (region.vectorize, region.tile_axis, region.row_axis) == ("positions", 1, 0)
    assert region.tile_rows in (7, 4)     # balanced: 7 rows (32 vector registers), or 4 + 3
    assert "per-plane" in lower.to_text(plan) and f"positions@1x{region.tile_rows}@0" in \
        lower.to_text(plan)
    # At any density: a depthwise layer has no sparse kernel to skip the padding with.
    assert plan_of(DEPTHWISE, Workload(1, 0.5)).plane_pad
    # Its weight gradient too (unit stride: flat runs over the planes), not a strided one's.
    assert plan_of(DEPTHWISE.grad_weight()).plane_pad
    strided = LayerSpec.conv(96, 96, 3, stride=2, padding=1, groups=96, input_size=(14, 14))
    assert not plan_of(strided.grad_weight()).pad


@pytest.mark.parametrize("spec", [
    DEPTHWISE, dataclasses.replace(DEPTHWISE, op="conv_grad_input"),
    LayerSpec.conv(24, 24, 5, padding=2, groups=24, input_size=(14, 14), activation="relu"),
    LayerSpec.conv(24, 48, 3, stride=2, padding=1, groups=24, input_size=(15, 15)),
    LayerSpec.conv(8, 8, 3, padding=(1, 2), groups=8, input_size=(5, 17), dtype="float64"),
    LayerSpec.conv(16, 16, 3, padding=1, groups=16, input_size=(40,)),
    LayerSpec.conv(8, 8, 3, padding=1, groups=8, input_size=(6, 5, 7)),
    LayerSpec.conv(8, 8, 3, padding=1, groups=8, padding_mode="reflect", input_size=(9, 9)),
    DEPTHWISE.grad_weight(),
    LayerSpec.conv(8, 8, 3, padding=1, groups=8, padding_mode="circular",
                   input_size=(9, 9)).grad_weight(),
    LayerSpec.conv(24, 24, 5, padding=2, groups=24, input_size=(14, 14)).grad_weight(),
    LayerSpec.conv(8, 8, 7, padding=3, groups=8, input_size=(9, 12),
                   dtype="float64").grad_weight(),
    LayerSpec.conv(8, 8, 3, padding=2, dilation=2, groups=8, input_size=(10, 10)).grad_weight(),
    LayerSpec.conv(16, 16, 3, padding=1, groups=16, input_size=(40,)).grad_weight(),
    LayerSpec.conv(8, 8, 3, padding=1, groups=8, input_size=(6, 5, 7)).grad_weight()])
def test_depthwise_planes_match_torch(spec):
    plan = plan_of(spec)
    assert plan.plane_pad
    if spec.op != "conv_grad_weight":
        assert any(r.tile_rows > 1 for r in plan.regions) == (spec.rank > 1)
    run_and_compare(spec, random_inputs(spec, workload=Workload(3)))


def test_row_tiles_where_rows_are_short():
    """Trimmed regions whose rows fit one tile hold several rows (as many as the vector
    registers allow): a 3-D depthwise interior (rows of 38), a few-channel conv's (3 channels
    per tile); a row too long for one tile keeps tiles of one row."""
    spec = LayerSpec.conv(4, 4, 3, padding=1, groups=4, input_size=(40, 40, 40))
    interior = max(plan_of(spec).regions, key=lambda r: r.macs_per_sample)
    assert not plan_of(spec).pad and interior.tile_rows > 1 and interior.row_axis == 1
    few = LayerSpec.conv(64, 3, 3, padding=1, input_size=(12, 12))
    interior = max(plan_of(few).regions, key=lambda r: r.macs_per_sample)
    assert interior.vectorize == "positions" and interior.tile_rows > 1
    long = LayerSpec.conv(64, 3, 3, padding=1, input_size=(70, 70))
    assert all(r.tile_rows == 1 for r in plan_of(long).regions)
    for s in (spec, few):
        run_and_compare(s, random_inputs(s, workload=Workload(2)))


@pytest.fixture
def always_keep(monkeypatch):
    """The cost rule keeps every zero padding it may (small test shapes exercise the copy)."""
    monkeypatch.setattr(cost, "PAD_WEIGHT_BYTES", 0)
    monkeypatch.setattr(cost, "PAD_BORDER_SHARE", 0.0)
    monkeypatch.setattr(cost, "PAD_WASTE", float("inf"))
    monkeypatch.setattr(cost, "PAD_MIN_CHANNELS", 0)
    monkeypatch.setattr(loader, "_kernels", {})   # no kernel memoized with trimmed regions


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(specs(ops=("conv", "conv_grad_input", "conv_grad_weight"), limits=EXECUTABLE,
             channels=(1, 40)),
       workloads(), st.sampled_from(("float32", "float64")))
def test_every_kept_padding_matches_torch(always_keep, spec, workload, dtype):
    """Forward and input gradients of any stride, dilation, groups, rank and epilogue, their
    zero padding kept (and depthwise weight gradients of unit stride): the kernels against
    torch, the MACs against the closed form."""
    spec = dataclasses.replace(spec, dtype=dtype)
    report = explain(spec, Workload(workload.batch))     # raises if the count is not exact
    assert report.executed_macs >= report.nonzero_macs
    run_and_compare(spec, random_inputs(spec, workload=workload), lower.Variant("dense"))


def test_always_keep_reaches_small_shapes(always_keep):
    spec = LayerSpec.conv(3, 5, 3, padding=1, input_size=(6, 6))
    assert _kept(spec) and plan_of(spec).pad.mode == "zeros"
    assert len(list(nodes_of(pipeline.run(spec)[-1][1], Pad))) == 1


@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
@given(specs(ops=("conv", "conv_grad_input", "conv_grad_weight"), limits=EXECUTABLE,
             channels=(1, 1), modes=False),
       workloads(), st.sampled_from(("float32", "float64")))
def test_every_depthwise_layer_matches_torch(spec, workload, dtype):
    """Depthwise layers (one channel per group) under the cost rule as it stands: planes padded
    in the kernel where it keeps the padding, row tiles, flat weight-gradient runs."""
    spec = dataclasses.replace(spec, dtype=dtype)
    report = explain(spec, Workload(workload.batch))
    assert report.executed_macs >= report.nonzero_macs
    run_and_compare(spec, random_inputs(spec, workload=workload), lower.Variant("dense"))
