"""Whole real models (zeroskip.models, zeroskip.bench.models): the written-out layouts match
torchvision's, and the bench checks a converted model's output and gradients before timing."""
from __future__ import annotations

import pytest
from torch import nn

from zeroskip import models
from zeroskip.bench import models as bench


@pytest.mark.parametrize("build, parameters, convs", [
    (models.ResNet, 11_689_512, 20),          # torchvision's resnet18
    (models.MobileNetV2, 3_504_872, 52),      # torchvision's mobilenet_v2
])
def test_layouts_match_torchvision(build, parameters, convs):
    net = build()
    assert sum(p.numel() for p in net.parameters()) == parameters
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == convs


@pytest.mark.parametrize("model", [
    bench.Model("tiny-resnet", "a small ResNet", lambda: models.ResNet(10, (1, 1), 8),
                (3, 32, 32)),
    bench.Model("tiny-fcn", "a small FCN-32s form", lambda: models.FCN32s(3, 4), (3, 64, 64)),
], ids=lambda m: m.name)
def test_bench_checks_then_times_a_converted_model(model):
    row = bench.run_model(model, eval_batch=1, train_batch=2, repeats=1, min_time=0.001)
    assert bench.problems(row) == []
    assert row.kernel_calls > 0 and row.fallbacks == 0
    assert row.eval_torch_ms > 0 and row.train_zs_ms > 0
    text = bench.markdown({"machine": bench.machine(), "eval_batch": 1, "train_batch": 2,
                           "rows": [row]})
    assert f"| {model.description} |" in text and "Geomean" in text
