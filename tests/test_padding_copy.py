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
                      (LayerSpec.conv(1280, 1280, 3, padding=1, groups=1280,
                                      input_size=(4, 4)), "output channels per group")):
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


@pytest.fixture
def always_keep(monkeypatch):
    """The cost rule keeps every zero padding it may (small test shapes exercise the copy)."""
    monkeypatch.setattr(cost, "PAD_WEIGHT_BYTES", 0)
    monkeypatch.setattr(cost, "PAD_BORDER_SHARE", 0.0)
    monkeypatch.setattr(cost, "PAD_WASTE", float("inf"))
    monkeypatch.setattr(cost, "PAD_MIN_CHANNELS", 0)
    monkeypatch.setattr(loader, "_kernels", {})   # no kernel memoized with trimmed regions


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(specs(ops=("conv", "conv_grad_input"), limits=EXECUTABLE, channels=(1, 40)),
       workloads(), st.sampled_from(("float32", "float64")))
def test_every_kept_padding_matches_torch(always_keep, spec, workload, dtype):
    """Forward and input gradients of any stride, dilation, groups, rank and epilogue, their
    zero padding kept: the kernels against torch, the MACs against the closed form."""
    spec = dataclasses.replace(spec, dtype=dtype)
    report = explain(spec, Workload(workload.batch))     # raises if the count is not exact
    assert report.executed_macs >= report.nonzero_macs
    run_and_compare(spec, random_inputs(spec, workload=workload), lower.Variant("dense"))


def test_always_keep_reaches_small_shapes(always_keep):
    spec = LayerSpec.conv(3, 5, 3, padding=1, input_size=(6, 6))
    assert _kept(spec) and plan_of(spec).pad.mode == "zeros"
    assert len(list(nodes_of(pipeline.run(spec)[-1][1], Pad))) == 1
