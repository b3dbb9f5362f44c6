"""LayerSpec against torch: shapes, operand roles, errors, immutability and serialization."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st

from oracle import random_inputs, torch_result
from zeroskip import LayerSpec, Workload

pytestmark = [pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning"),
              pytest.mark.filterwarnings("ignore:Initializing zero-element:UserWarning")]


def _module_class(kind: str, rank: int) -> type:
    return getattr(nn, f"{'ConvTranspose' if kind == 'conv_transpose' else 'Conv'}{rank}d")


def _spec(kind: str, kw: dict, size) -> LayerSpec:
    return getattr(LayerSpec, kind)(**kw, input_size=size)


def _run_torch(kind: str, kw: dict, size, batch: int = 1):
    """Build torch's module with the same arguments and run it on a random input."""
    module = _module_class(kind, len(size))(**kw)
    return module, module(torch.randn(batch, kw["in_channels"], *size))


def _field(name: str) -> str:
    """A regex matching ``name`` as a whole word ('padding' must not match 'output_padding')."""
    return rf"\b{name}\b"


# (kind, torch constructor arguments, spatial input size, batch)
CASES = [
    ("conv", dict(in_channels=3, out_channels=6, kernel_size=5, stride=2, padding=1), (17,), 2),
    ("conv", dict(in_channels=2, out_channels=2, kernel_size=4, padding="same", dilation=3,
                  padding_mode="reflect"), (16,), 1),
    ("conv", dict(in_channels=2, out_channels=4, kernel_size=3, padding="valid", groups=2), (5,), 0),
    ("conv", dict(in_channels=4, out_channels=6, kernel_size=(3, 4), stride=(2, 1),
                  padding=(1, 2), dilation=(1, 2), groups=2), (9, 11), 1),
    ("conv", dict(in_channels=2, out_channels=3, kernel_size=(2, 4), padding="same",
                  padding_mode="circular"), (5, 6), 2),
    ("conv", dict(in_channels=3, out_channels=3, kernel_size=3, stride=3, padding=2,
                  padding_mode="replicate"), (7, 8), 1),
    ("conv", dict(in_channels=3, out_channels=6, kernel_size=(4, 2), padding="same",
                  dilation=(1, 3), groups=3), (6, 6), 1),
    ("conv", dict(in_channels=2, out_channels=4, kernel_size=(1, 2, 3), stride=(1, 2, 3),
                  padding=(0, 1, 2), dilation=(2, 1, 1)), (4, 5, 7), 1),
    ("conv", dict(in_channels=2, out_channels=2, kernel_size=2, padding="same", dilation=2,
                  padding_mode="reflect"), (3, 4, 5), 1),
    ("conv", dict(in_channels=2, out_channels=2, kernel_size=3, stride=2), (5, 5, 5), 0),
    ("conv_transpose", dict(in_channels=4, out_channels=2, kernel_size=3, stride=2, padding=1,
                            output_padding=1), (5,), 2),
    # output_padding >= stride is legal when dilation > stride.
    ("conv_transpose", dict(in_channels=2, out_channels=3, kernel_size=2, padding=1,
                            output_padding=1, dilation=2), (5,), 1),
    ("conv_transpose", dict(in_channels=6, out_channels=4, kernel_size=(3, 2), stride=(2, 3),
                            padding=(1, 0), output_padding=(1, 2), groups=2, dilation=(1, 2)),
     (4, 5), 1),
    ("conv_transpose", dict(in_channels=2, out_channels=2, kernel_size=3, stride=2), (3, 4), 0),
    ("conv_transpose", dict(in_channels=3, out_channels=6, kernel_size=3, stride=2,
                            padding=(0, 1, 2), output_padding=(1, 0, 1), groups=3,
                            dilation=(1, 1, 2)), (3, 4, 2), 1),
    ("conv_transpose", dict(in_channels=2, out_channels=2, kernel_size=(1, 3, 2),
                            padding=(2, 1, 1), output_padding=(2, 1, 1), dilation=(3, 2, 2)),
     (4, 3, 4), 1),
]
CASE_IDS = [f"{kind}{len(size)}d-{i}" for i, (kind, _, size, _) in enumerate(CASES)]


@pytest.mark.parametrize("kind, kw, size, batch", CASES, ids=CASE_IDS)
def test_shapes_match_torch_module_and_autograd(kind, kw, size, batch):
    spec = _spec(kind, kw, size)
    module = _module_class(kind, len(size))(**kw)
    x = torch.randn(spec.input_shapes(batch)["input"], requires_grad=True)
    assert spec.input_shapes(batch)["input"] == (batch, kw["in_channels"], *size)
    out = module(x)
    assert spec.output_shape(batch) == tuple(out.shape)
    assert spec.weight_shape == tuple(module.weight.shape)
    assert spec.input_shapes(batch)["bias"] == tuple(module.bias.shape)

    out.backward(torch.randn_like(out))
    gi, gw = spec.grad_input(), spec.grad_weight()
    assert gi.output_shape(batch) == tuple(x.grad.shape)
    assert gw.output_shape(batch) == tuple(module.weight.grad.shape)
    assert gi.weight_shape == tuple(module.weight.shape)
    if kind == "conv":
        assert gi.op == "conv_grad_input"
        assert gi.input_shapes(batch) == {"grad_output": tuple(out.shape), "weight": spec.weight_shape}
        assert gw.input_shapes(batch) == {"input": tuple(x.shape), "grad_output": tuple(out.shape)}
    else:
        # A transposed conv's input gradient is a plain conv of its output gradient.
        assert gi.op == "conv" and not gi.bias
        assert gi.input_shapes(batch) == {"input": tuple(out.shape), "weight": spec.weight_shape}
        assert gw.input_shapes(batch) == {"input": tuple(out.shape), "grad_output": tuple(x.shape)}


@pytest.mark.parametrize("kind, kw, size, batch", CASES, ids=CASE_IDS)
def test_forward_values_match_torch_module(kind, kw, size, batch):
    """Pins the placement of asymmetric 'same' padding and the padding modes."""
    spec = _spec(kind, kw, size)
    module = _module_class(kind, len(size))(**kw).double()
    arrays = random_inputs(spec, seed=1, workload=Workload(batch))
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(arrays["weight"]))
        module.bias.copy_(torch.from_numpy(arrays["bias"]))
        expected = module(torch.from_numpy(arrays["input"]))
    np.testing.assert_allclose(torch_result(spec, arrays), expected.numpy(), rtol=1e-10,
                               atol=1e-10)


@pytest.mark.parametrize("kind, kw, size, batch",
                         [c for c in CASES if c[0] == "conv_transpose" and c[3] > 0],
                         ids=[i for i, c in zip(CASE_IDS, CASES)
                              if c[0] == "conv_transpose" and c[3] > 0])
def test_conv_transpose_backward_operand_roles(kind, kw, size, batch):
    """torch_result of grad_input()/grad_weight() equals autograd of F.conv_transposeNd."""
    spec = _spec(kind, kw, size)
    arrays = random_inputs(spec, seed=2, workload=Workload(batch))
    x = torch.from_numpy(arrays["input"]).requires_grad_()
    w = torch.from_numpy(arrays["weight"]).requires_grad_()
    fn = getattr(F, f"conv_transpose{spec.rank}d")
    y = fn(x, w, None, kw.get("stride", 1), kw.get("padding", 0), kw.get("output_padding", 0),
           kw.get("groups", 1), kw.get("dilation", 1))
    g = torch.from_numpy(np.random.default_rng(3).standard_normal(tuple(y.shape)))
    y.backward(g)
    torch.testing.assert_close(
        torch.from_numpy(torch_result(spec.grad_input(), {"input": g.numpy(),
                                                          "weight": arrays["weight"]})),
        x.grad)
    torch.testing.assert_close(
        torch.from_numpy(torch_result(spec.grad_weight(), {"input": g.numpy(),
                                                           "grad_output": arrays["input"]})),
        w.grad)


def test_conv_transpose_grad_crops_unreached_outputs():
    # output_padding - stride + 1 > padding: the last outputs meet no input, so the gradient
    # operators read the output gradient cropped (gradient_crop) and yield input_size outputs.
    spec = LayerSpec.conv_transpose(2, 3, 2, padding=0, output_padding=1, dilation=2,
                                    input_size=(5,))
    assert spec.output_size == (8,) and spec.gradient_crop == (1,)
    grad_input = spec.grad_input()
    assert grad_input.input_size == (7,) and grad_input.padding == ((0, 0),)
    assert grad_input.output_size == spec.input_size
    assert spec.grad_weight().input_size == (7,)
    uncropped = LayerSpec.conv_transpose(2, 3, 2, stride=2, padding=1, output_padding=1,
                                         input_size=(5,))
    assert uncropped.gradient_crop == (0,) and uncropped.grad_input().input_size == (9,)


C2 = dict(in_channels=4, out_channels=4, kernel_size=3)
# (kind, arguments, input size, field the message must name)
INVALID = [
    ("conv", {**C2, "padding": -1}, (8, 8), "padding"),
    ("conv", {**C2, "padding": (1, -1)}, (8, 8), "padding"),
    ("conv_transpose", {**C2, "padding": -1}, (8, 8), "padding"),
    ("conv", {**C2, "stride": 0}, (8, 8), "stride"),
    ("conv", {**C2, "stride": (1, -2)}, (8, 8), "stride"),
    ("conv_transpose", {**C2, "stride": 0}, (8, 8), "stride"),
    ("conv", {**C2, "dilation": 0}, (8, 8), "dilation"),
    ("conv", {**C2, "dilation": -1}, (8, 8), "dilation"),
    ("conv_transpose", {**C2, "dilation": 0}, (8, 8), "dilation"),
    ("conv", {**C2, "groups": 3, "out_channels": 6}, (8, 8), "in_channels"),
    ("conv_transpose", {**C2, "groups": 3, "out_channels": 6}, (8, 8), "in_channels"),
    ("conv", {**C2, "in_channels": 6, "groups": 3}, (8, 8), "out_channels"),
    ("conv_transpose", {**C2, "in_channels": 6, "groups": 3}, (8, 8), "out_channels"),
    ("conv", {**C2, "groups": 0}, (8, 8), "groups"),
    ("conv", {**C2, "groups": -2}, (8, 8), "groups"),
    ("conv_transpose", {**C2, "groups": 0}, (8, 8), "groups"),
    ("conv", {**C2, "padding": "same", "stride": 2}, (8, 8), "stride"),
    ("conv", {**C2, "padding": "same", "stride": (1, 2)}, (8, 8), "stride"),
    ("conv", {**C2, "padding": "full"}, (8, 8), "padding"),
    # torch's ConvTranspose accepts a padding string at construction, its forward raises TypeError.
    ("conv_transpose", {**C2, "padding": "same"}, (8, 8), "padding"),
    ("conv_transpose", {**C2, "stride": 2, "output_padding": 2}, (8, 8), "output_padding"),
    ("conv_transpose", {**C2, "dilation": 2, "output_padding": (0, 2)}, (8, 8), "output_padding"),
    ("conv_transpose", {**C2, "stride": 3, "dilation": 2, "output_padding": 3}, (8, 8),
     "output_padding"),
    ("conv_transpose", {**C2, "stride": 2, "output_padding": -1}, (8, 8), "output_padding"),
    ("conv", {**C2, "kernel_size": 9}, (8, 8), "kernel_size"),
    ("conv", {**C2, "kernel_size": (3, 11), "padding": 1}, (8, 8), "kernel_size"),
    ("conv", {**C2, "kernel_size": 3, "dilation": 4}, (8, 8), "kernel_size"),
    ("conv", {**C2, "kernel_size": 5, "padding": "valid"}, (4,), "kernel_size"),
    ("conv", {**C2, "kernel_size": 0}, (8, 8), "kernel_size"),
    ("conv", {**C2, "padding_mode": "mirror"}, (8, 8), "padding_mode"),
    ("conv_transpose", {**C2, "padding_mode": "reflect"}, (8, 8), "padding_mode"),
    ("conv_transpose", {**C2, "padding_mode": "circular"}, (8, 8), "padding_mode"),
    ("conv", {**C2, "padding": 8, "padding_mode": "reflect"}, (8, 8), "padding"),
    ("conv", {**C2, "padding": 9, "padding_mode": "circular"}, (8, 8), "padding"),
    ("conv_transpose", {**C2, "kernel_size": 1, "padding": 2}, (2, 2), "padding"),
    ("conv", {**C2, "kernel_size": 1, "padding": 1}, (0, 8), "input_size"),
    # wrong types
    ("conv", {**C2, "kernel_size": 1.5}, (8, 8), "kernel_size"),
    ("conv", {**C2, "stride": "2"}, (8, 8), "stride"),
    ("conv", {**C2, "padding": [1, "a"]}, (8, 8), "padding"),
    ("conv_transpose", {**C2, "stride": 1.0}, (8, 8), "stride"),
    ("conv", {**C2, "in_channels": 4.0}, (8, 8), "in_channels"),
]


@pytest.mark.parametrize("kind, kw, size, field", INVALID,
                         ids=[f"{k}-{'-'.join(f'{a}={v}' for a, v in kw.items() if a not in C2 or C2[a] != v)}"
                              for k, kw, _, _ in INVALID])
def test_invalid_raises_torch_exception_type(kind, kw, size, field):
    with pytest.raises(Exception) as torch_exc:
        _run_torch(kind, kw, size)
    with pytest.raises(torch_exc.type, match=_field(field)) as spec_exc:
        Workload(1).check(_spec(kind, kw, size))    # torch's module ran a batch of one
    assert type(spec_exc.value) is torch_exc.type


@pytest.mark.parametrize("kw, field", [
    ({"kernel_size": 1.5}, "kernel_size"),
    ({"stride": "2"}, "stride"),
    ({"padding": [1, "a"]}, "padding"),
    ({"dilation": (1, None)}, "dilation"),
    ({"groups": 1.0}, "groups"),
    ({"dtype": "int8"}, "dtype"),
    # torch accepts any truthy/falsy bias; LayerSpec insists on a bool.
    ({"bias": "yes"}, "bias"),
])
def test_wrong_type_raises_type_error(kw, field):
    with pytest.raises(TypeError, match=_field(field)):
        LayerSpec.conv(**{**C2, **kw}, input_size=(8, 8))


@pytest.mark.parametrize("kind, kw, field", [
    ("conv", {"stride": (1, 1, 1)}, "stride"),
    ("conv", {"kernel_size": (3,)}, "kernel_size"),
    ("conv", {"padding": (1, 1, 1)}, "padding"),
    ("conv_transpose", {"output_padding": (0, 0, 0)}, "output_padding"),
    ("conv_transpose", {"dilation": (1,)}, "dilation"),
])
def test_wrong_length_tuple_raises_value_error(kind, kw, field):
    # torch raises RuntimeError in the forward ("expected stride to be a single integer value or
    # a list of 2 values"); LayerSpec deliberately reports it as a ValueError at construction.
    with pytest.raises(ValueError, match=_field(field)):
        _spec(kind, {**C2, **kw}, (8, 8))


@pytest.mark.parametrize("kw, exc, field", [
    # No torch equivalent: density is the workload's own field (documented ValueError).
    ({"density": -0.1}, ValueError, "density"),
    ({"density": 1.5}, ValueError, "density"),
    ({"density": "0.5"}, ValueError, "density"),
    # Negative sizes: torch fails creating such a tensor, with RuntimeError.
    ({"batch": -1}, RuntimeError, "batch"),
    ({"input_size": (-1, 8)}, RuntimeError, "input_size"),
])
def test_invalid_without_torch_equivalent(kw, exc, field):
    with pytest.raises(exc, match=_field(field)):
        work = {k: kw.pop(k) for k in ("batch", "density") if k in kw}
        Workload(**work).check(LayerSpec.conv(**C2, **{"input_size": (8, 8), **kw}))


def test_batch_zero_allows_empty_input_like_torch():
    kw = {**C2, "kernel_size": 1, "padding": 1}
    _, out = _run_torch("conv", kw, (0, 8), batch=0)
    spec = _spec("conv", kw, (0, 8))
    assert Workload(0).check(spec) and spec.output_shape(0) == tuple(out.shape)
    with pytest.raises(RuntimeError, match="Only zero batch"):
        Workload(1).check(spec)


def test_grad_of_grad_spec_raises():
    spec = LayerSpec.conv(2, 2, 3, input_size=(5,))
    for derived in (spec.grad_input(), spec.grad_weight()):
        with pytest.raises(ValueError, match=derived.op):
            derived.grad_input()
        with pytest.raises(ValueError, match=derived.op):
            derived.grad_weight()


SERIAL = [
    LayerSpec.conv(4, 6, (3, 4), 2, 1, (1, 2), 2, False, "reflect", input_size=(9, 11)),
    LayerSpec.conv(2, 2, 4, padding="same", padding_mode="circular", dtype="double",
                   input_size=(6, 7, 8)),
    LayerSpec.conv_transpose(6, 4, (3, 2), (2, 3), (1, 0), (1, 2), 2, True, (1, 2),
                             input_size=(4, 5), dtype=torch.float16),
    LayerSpec.conv(3, 6, 5, 2, 1, input_size=(17,)).grad_input(),
    LayerSpec.conv_transpose(2, 3, 2, 1, 1, 1, dilation=2, input_size=(5,)).grad_weight(),
]


@pytest.mark.parametrize("spec", SERIAL, ids=lambda s: s.describe())
def test_dict_round_trip(spec):
    assert LayerSpec.from_dict(spec.to_dict()) == spec
    restored = LayerSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert restored == spec and hash(restored) == hash(spec)
    assert restored.output_shape() == spec.output_shape()


def test_from_dict_rejects_unknown_field():
    with pytest.raises(ValueError, match="colour"):
        LayerSpec.from_dict({**SERIAL[0].to_dict(), "colour": "red"})


def test_frozen():
    spec = SERIAL[0]
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.stride = (1, 1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        Workload(3, 0.25).density = 0.5


@pytest.mark.parametrize("dtype, name", [
    (None, "float32"), ("float", "float32"), (torch.float32, "float32"),
    ("torch.float64", "float64"), ("double", "float64"), (torch.float64, "float64"),
    ("half", "float16"), (torch.bfloat16, "bfloat16"),
])
def test_dtype_normalization(dtype, name):
    spec = LayerSpec.conv(1, 1, 1, dtype=dtype, input_size=(3,))
    assert spec.dtype == name
    assert spec == LayerSpec.conv(1, 1, 1, dtype=name, input_size=(3,))


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@st.composite
def conv_arguments(draw):
    """Valid (kind, torch arguments, input size, batch), sizes constructed to be valid."""
    kind = draw(st.sampled_from(["conv", "conv_transpose"]))
    rank = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 2, 3]))
    kw = dict(in_channels=groups * draw(st.integers(1, 2)),
              out_channels=groups * draw(st.integers(1, 2)), groups=groups)
    mode = "int" if kind == "conv_transpose" else draw(st.sampled_from(["int", "int", "same",
                                                                          "valid"]))
    ks, ss, ds, ps, ops, sizes = [], [], [], [], [], []
    for _ in range(rank):
        k = draw(st.integers(1, 7))
        # 'valid' needs size >= extent: keep the extent within 12.
        d = draw(st.integers(1, 3 if mode != "valid" or k == 1 else min(3, 11 // (k - 1))))
        s = 1 if mode == "same" else draw(st.integers(1, 4))
        extent = d * (k - 1) + 1
        if kind == "conv":
            # padding >= (extent - 12) / 2 keeps a valid size within 1..12.
            p = draw(st.integers(max(0, _ceil_div(extent - 12, 2)), k)) if mode == "int" else 0
            pad_total = d * (k - 1) if mode == "same" else 2 * p
            n = draw(st.integers(max(1, extent - pad_total), 12))
            op = 0
        else:
            p = draw(st.integers(0, k))
            op = draw(st.integers(0, max(s, d) - 1))
            # (n - 1) * s - 2p + extent + op >= 1
            n = draw(st.integers(max(1, 1 + _ceil_div(2 * p - extent - op + 1, s)), 12))
        ks.append(k), ss.append(s), ds.append(d), ps.append(p), ops.append(op), sizes.append(n)
    kw.update(kernel_size=tuple(ks), stride=tuple(ss), dilation=tuple(ds),
              padding=mode if mode in ("same", "valid") else tuple(ps))
    if kind == "conv_transpose":
        kw["output_padding"] = tuple(ops)
    return kind, kw, tuple(sizes), draw(st.integers(0, 2))


@settings(max_examples=150, deadline=None)
@given(conv_arguments())
def test_output_shape_matches_torch_on_meta(args):
    kind, kw, size, batch = args
    spec = _spec(kind, kw, size)
    transpose = kind == "conv_transpose"
    c_in, c_out, g = kw["in_channels"], kw["out_channels"], kw["groups"]
    w_shape = (c_in, c_out // g, *kw["kernel_size"]) if transpose else \
        (c_out, c_in // g, *kw["kernel_size"])
    x = torch.empty(batch, c_in, *size, device="meta", requires_grad=True)
    w = torch.empty(w_shape, device="meta", requires_grad=True)
    if transpose:
        y = getattr(F, f"conv_transpose{len(size)}d")(
            x, w, None, kw["stride"], kw["padding"], kw["output_padding"], g, kw["dilation"])
    else:
        y = getattr(F, f"conv{len(size)}d")(x, w, None, kw["stride"], kw["padding"],
                                            kw["dilation"], g)
    assert spec.input_shapes(batch)["input"] == tuple(x.shape)
    assert spec.weight_shape == w_shape
    assert spec.output_shape(batch) == tuple(y.shape)

    if transpose and any(op - s + 1 > p for op, s, p in
                         zip(kw["output_padding"], kw["stride"], kw["padding"])):
        return  # see test_conv_transpose_grad_input_unrepresentable_raises
    y.backward(torch.empty_like(y))
    assert spec.grad_input().output_shape(batch) == tuple(x.grad.shape)
    assert spec.grad_weight().output_shape(batch) == tuple(w.grad.shape)
    assert spec.grad_weight().input_shapes(batch)["grad_output" if transpose else "input"] == \
        tuple(x.shape)
