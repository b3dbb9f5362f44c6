"""The custom ops behind autograd and torch.compile: opcheck, compiled models vs eager,
gradcheck across drawn specs, and double backward."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import strategies as st
from hypothesis import HealthCheck, assume, given, settings
from strategies import EXECUTABLE, specs

import zeroskip
from zeroskip.models import dcgan_generator, resnet_stage
from zeroskip.runtime.arguments import config_of
from zeroskip.runtime.binding import convolution

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
    ("conv", 2, (2, 4, 7, 7), (6, 4, 3, 3), True, dict(padding=1, activation="relu")),
]


def _config(op, rank, stride=1, padding=0, dilation=1, groups=1, output_padding=0,
            padding_mode="zeros", activation="none"):
    return config_of(op, rank, stride, padding, dilation, groups, output_padding, padding_mode,
                     activation)


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


# ----------------------------------------------------------------------------- gradcheck
def _operands(spec, seed=0, batch=2):
    gen = torch.Generator().manual_seed(seed)
    shapes = spec.input_shapes(batch)
    return tuple(torch.randn(shapes[name], generator=gen, dtype=torch.float64,
                             requires_grad=True) if name in shapes else None
                 for name in ("input", "weight", "bias"))


def _call(spec):
    """The spec as a call of zeroskip's entry point (torch's argument conventions)."""
    assume(all(lo == hi for lo, hi in spec.padding))
    padding = tuple(lo for lo, _ in spec.padding)
    op = "conv_transpose" if spec.op == "conv_transpose" else "conv"
    return lambda x, w, b: convolution(op, spec.rank, x, w, b, spec.stride, padding,
                                       spec.dilation, spec.groups, spec.output_padding,
                                       spec.padding_mode)


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(specs(ops=("conv", "conv_transpose"), limits=EXECUTABLE), st.sampled_from((1, 2)))
def test_gradcheck_float64(spec, batch):
    """Numerical vs analytical gradients of input, weight and bias, every variant."""
    spec = dataclasses.replace(spec, dtype="float64")
    fn = _call(spec)
    x, w, b = _operands(spec, batch=batch)
    zeroskip.stats(reset=True)
    assert torch.autograd.gradcheck(lambda x, w, *b: fn(x, w, b[0] if b else None),
                                    (x, w) if b is None else (x, w, b))
    assert zeroskip.stats()["kernel_calls"] > 0


@pytest.mark.parametrize("spec", [
    zeroskip.LayerSpec.conv(3, 4, 3, stride=2, padding=1, input_size=(7, 6)),
    zeroskip.LayerSpec.conv(2, 4, 3, padding=2, dilation=2, groups=2, input_size=(9,),
                            padding_mode="circular"),
    zeroskip.LayerSpec.conv_transpose(4, 3, 3, stride=2, padding=1, output_padding=1,
                                      input_size=(4, 5)),
], ids=lambda s: s.describe())
def test_double_backward_on_generated_kernels(spec):
    """Second derivatives: the gradient ops' own gradients are the three ops again."""
    spec = dataclasses.replace(spec, dtype="float64")
    fn = _call(spec)
    x, w, b = _operands(spec)
    zeroskip.stats(reset=True)
    assert torch.autograd.gradgradcheck(fn, (x, w, b))
    counts = zeroskip.stats()
    assert counts["kernel_calls"] > 0 and counts["fallback_calls"] == 0


# ------------------------------------------------------------------ ReLU fused before the conv
@pytest.mark.parametrize("activation", ["none", "relu"])
def test_relu_convolution_opcheck(activation):
    """``zeroskip::relu_convolution`` (the conv of relu(input)): schema, fake function,
    autograd registration and AOT dispatch."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((2, 4, 7, 6), generator=gen, dtype=torch.float64, requires_grad=True)
    w = torch.randn((6, 4, 3, 3), generator=gen, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, generator=gen, dtype=torch.float64, requires_grad=True)
    config = _config("conv", 2, padding=1, activation=activation)
    torch.library.opcheck(torch.ops.zeroskip.relu_convolution.default, (x, w, b, config))


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(specs(ops=("conv",), limits=EXECUTABLE), st.sampled_from((1, 2)),
       st.sampled_from(("none", "relu")))
def test_relu_conv_gradcheck(spec, batch, activation):
    """Numerical vs analytical gradients of ``conv(relu(z))`` (and with a ReLU after too):
    the pre-activation's gradient is the input gradient passed where z > 0; the weight
    gradient is the conv's on relu(z)."""
    spec = dataclasses.replace(spec, dtype="float64")
    assume(all(lo == hi for lo, hi in spec.padding))
    padding = tuple(lo for lo, _ in spec.padding)
    x, w, b = _operands(spec, batch=batch)
    # Keep z away from 0, where relu has no derivative for finite differences to agree on.
    with torch.no_grad():
        x.add_(torch.where(x >= 0, 0.1, -0.1))

    def fn(x, w, *b):
        return convolution("conv", spec.rank, x, w, b[0] if b else None, spec.stride,
                           padding, spec.dilation, spec.groups, 0, spec.padding_mode,
                           activation, relu_input=True)
    zeroskip.stats(reset=True)
    assert torch.autograd.gradcheck(fn, (x, w) if b is None else (x, w, b))
    counts = zeroskip.stats()
    assert counts["kernel_calls"] > 0 and counts["fallback_calls"] == 0


def test_relu_conv_modules_compile_fullgraph():
    """``nn.ReLUConv2d`` and ``nn.ReLUConvReLU2d`` match torch's ReLU + Conv2d (+ ReLU),
    output and gradients, and compile with ``fullgraph=True`` (no graph break)."""
    torch.manual_seed(0)
    for cls, after in ((zeroskip.nn.ReLUConv2d, False), (zeroskip.nn.ReLUConvReLU2d, True)):
        ours = cls(5, 7, 3, padding=1)
        ref = torch.nn.Conv2d(5, 7, 3, padding=1)
        ref.load_state_dict(ours.state_dict())
        z1 = torch.randn(2, 5, 9, 8, requires_grad=True)
        z2 = z1.detach().clone().requires_grad_()
        want = ref(torch.relu(z2))
        want = torch.relu(want) if after else want
        compiled = torch.compile(ours, fullgraph=True)
        got = compiled(z1)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        got.square().sum().backward()
        want.square().sum().backward()
        torch.testing.assert_close(z1.grad, z2.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
