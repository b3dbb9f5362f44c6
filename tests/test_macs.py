"""MAC accounting: the passes leave exactly the closed-form count of non-zero products."""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
from hypothesis import given, settings

from oracle import torch_result
from strategies import specs, workloads
from zeroskip import LayerSpec, Workload, explain
from zeroskip.codegen import frontend
from zeroskip.codegen.macs import dense_macs, graph_macs, nonzero_macs, nonzero_pairs


def brute_force_pairs(axis, zero_padding: bool) -> int:
    """The issue's definition, literally: sum over o of #{k : 0 <= o*s - p + k*d < H}."""
    size, pad = (axis.size, axis.pad_lo) if zero_padding else (axis.padded_size, 0)
    return sum(1 for o in range(axis.out_size) for k in range(axis.kernel)
               if 0 <= o * axis.stride - pad + k * axis.dilation < size)


def counted_by_torch(spec: LayerSpec, batch: int = 1) -> int:
    """Products of two non-zero elements at ``batch``, counted by running torch's own op on
    all-ones operands: every product then contributes exactly 1 to the sum of the result."""
    ones = {name: np.ones(shape) for name, shape in spec.input_shapes(batch).items()
            if name != "bias"}
    return int(round(torch_result(dataclasses.replace(spec, bias=False), ones).sum()))


@settings(max_examples=300, deadline=None)
@given(specs(), workloads())
def test_nonzero_macs_match_brute_force_and_graph(spec, workload):
    zero = spec.padding_mode == "zeros"
    pairs = [nonzero_pairs(a, zero) for a in spec.axes]
    assert pairs == [brute_force_pairs(a, zero) for a in spec.axes]
    batch = workload.batch
    report = explain(spec, workload)
    assert report.nonzero_macs == nonzero_macs(spec, batch) == \
        graph_macs(report.graph, nonzero=True)
    # A padding kept as a padded copy multiplies its zeros too (cost.keep_zero_padding).
    assert report.executed_macs == graph_macs(report.graph) >= report.nonzero_macs
    assert report.dense_macs == dense_macs(spec, batch) == \
        graph_macs(frontend.lower(spec, workload))
    assert report.nonzero_macs <= report.dense_macs


@settings(max_examples=120, deadline=None)
@given(specs(ranks=(1, 2)), workloads())
def test_nonzero_macs_equal_products_counted_by_torch(spec, workload):
    batch = max(workload.batch, 1)
    torch.set_num_threads(1)
    assert nonzero_macs(spec, batch) == counted_by_torch(spec, batch)


def test_known_counts():
    # 3x3, pad 1 on 4x4: each axis has 4*3 - 2 = 10 in-range pairs.
    spec = LayerSpec.conv(2, 3, 3, padding=1, input_size=(4, 4))
    assert nonzero_macs(spec, 2) == 2 * 2 * 3 * 10 * 10
    assert dense_macs(spec, 2) == 2 * 2 * 3 * (4 * 3) ** 2
    assert explain(spec, Workload(2)).nonzero_macs == nonzero_macs(spec, 2)
    # Transposed conv, k4 s2 p1 on length 3 -> 6: 10 real pairs (hand count in test_passes).
    t = LayerSpec.conv_transpose(1, 1, 4, 2, 1, input_size=(3,))
    assert nonzero_macs(t) == 10
    # Its naive graph convolves the 6 outputs with all 4 taps of the zero-inserted input.
    assert dense_macs(t) == 6 * 4
    # Reflect padding pads with data: every pair of the padded input counts.
    r = LayerSpec.conv(1, 1, 3, padding=1, padding_mode="reflect", input_size=(5,))
    assert nonzero_macs(r) == dense_macs(r) == 5 * 3
