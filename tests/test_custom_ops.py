"""The custom ops behind autograd and torch.compile: opcheck, and compiled models vs eager."""
from __future__ import annotations

import copy

import pytest
import torch

import zeroskip
from zeroskip.models import dcgan_generator, resnet_stage
from zeroskip.runtime.ops import config_of

# (input shape, weight shape, bias, config arguments after op and rank)
CASES = [
    ("conv", 2, (2, 4, 9, 7), (6, 4, 3, 3), True, dict(stride=2, padding=1)),
    ("conv", 2, (2, 6, 8, 8), (6, 1, 3, 3), False, dict(padding="same", groups=6)),
    ("conv", 1, (2, 3, 12), (5, 3, 3), True, dict(padding=2, dilation=2,
                                                    padding_mode="reflect")),
    ("conv", 3, (4, 5, 5, 5), (2, 4, 3, 3, 3), True, dict(padding=1)),   # unbatched
    ("conv_transpose", 2, (2, 4, 5, 5), (4, 3, 4, 4), True, dict(stride=2, padding=1)),
    ("conv_transpose", 1, (2, 4, 7), (4, 2, 3), False, dict(stride=3, output_padding=1,
                                                            groups=2)),
]


def _config(op, rank, stride=1, padding=0, dilation=1, groups=1, output_padding=0,
            padding_mode="zeros"):
    return config_of(op, rank, stride, padding, dilation, groups, output_padding, padding_mode)


@pytest.mark.parametrize("op, rank, x_shape, w_shape, bias, kwargs", CASES,
                         ids=[f"{c[0]}{c[1]}d-{i}" for i, c in enumerate(CASES)])
def test_opcheck(op, rank, x_shape, w_shape, bias, kwargs):
    """Schema, fake (shape) function, autograd registration and AOT dispatch of the ops."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(x_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn(w_shape, generator=gen, dtype=torch.float64, requires_grad=True)
    out_channels = w_shape[1] * kwargs.get("groups", 1) if op == "conv_transpose" \
        else w_shape[0]
    b = torch.randn(out_channels, generator=gen, dtype=torch.float64, requires_grad=True) \
        if bias else None
    config = _config(op, rank, **kwargs)
    torch.library.opcheck(torch.ops.zeroskip.convolution.default, (x, w, b, config))
    y = torch.ops.zeroskip.convolution(x, w, b, config)
    g = torch.randn_like(y)
    with torch.no_grad():
        torch.library.opcheck(torch.ops.zeroskip.convolution_grad_input.default,
                              (g, w.detach(), list(x.shape), config))
        torch.library.opcheck(torch.ops.zeroskip.convolution_grad_weight.default,
                              (x.detach(), g, list(w.shape), config))


def _models():
    torch.manual_seed(0)
    return [(dcgan_generator(nz=16, ngf=8), torch.randn(2, 16, 1, 1)),
            (resnet_stage(8, 16), torch.relu(torch.randn(2, 8, 12, 12)))]


@pytest.mark.parametrize("index", [0, 1], ids=["dcgan", "resnet"])
def test_compiled_model_matches_eager(index):
    """torch.compile(fullgraph=True) of a converted model: no graph break, the same outputs and
    gradients as eager zeroskip and as torch, and every conv on generated kernels."""
    model, x = _models()[index]
    reference = copy.deepcopy(model)
    converted = zeroskip.convert(copy.deepcopy(model))
    compiled = torch.compile(copy.deepcopy(converted), fullgraph=True)
    zeroskip.stats(reset=True)
    y = compiled(x)
    counts = zeroskip.stats()
    assert counts["kernel_calls"] > 0 and counts["fallback_calls"] == 0
    for other in (converted(x), reference(x)):
        torch.testing.assert_close(y, other, rtol=1e-4, atol=1e-4 * float(other.detach().abs().max()))
    y.square().sum().backward()
    reference(x).square().sum().backward()
    for (name, p), q in zip(compiled.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3,
                                   atol=1e-3 * float(q.grad.abs().max()) + 1e-6, msg=name)
    assert zeroskip.stats()["fallback_calls"] == 0
