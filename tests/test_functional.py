"""zeroskip.functional, zeroskip.nn and convert() against PyTorch: values, gradients, layouts,
module state, and the per-shape call memo (a smaller batch does not recompile)."""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import functional_call

import zeroskip
import zeroskip.functional as ZF
import zeroskip.nn as ZN
from zeroskip import LayerSpec, Workload

from oracle import random_inputs
from strategies import EXECUTABLE, specs, workloads

TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9}


# ----------------------------------------------------------------------------------- helper
def _close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal shape and dtype; values within the dtype's tolerance, the absolute part scaled by
    the largest magnitude of the expected tensor (sums of many products grow with it)."""
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{name}: dtype {actual.dtype} != {expected.dtype}"
    tol = TOLERANCE[expected.dtype]
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol * scale, msg=lambda m:
                               f"{name}: {m}")


def _leaf(t, grad: bool):
    if t is None:
        return None
    # A detached alias keeps the strides (a clone would densify a sliced view).
    return t.detach().requires_grad_(grad)


def assert_matches_torch(zs_fn, torch_fn, *inputs, backward: bool = False):
    """Call ``zs_fn(*inputs)`` and ``torch_fn(*inputs)`` on separate leaf copies of the inputs
    (``None`` passes through) and compare outputs; with ``backward``, also the gradients of every
    tensor input for one random ``grad_output``. zeroskip must have run its kernels, with no
    fallback (the gradients of an empty output are zeros, no kernel's). Returns both
    outputs."""
    zs_in = [_leaf(t, backward) for t in inputs]
    th_in = [_leaf(t, backward) for t in inputs]
    zeroskip.stats(reset=True)
    zs_out = zs_fn(*zs_in)
    forward = zeroskip.stats(reset=True)
    th_out = torch_fn(*th_in)
    _close("output", zs_out, th_out)
    assert forward["kernel_calls"] > 0 and forward["fallback_calls"] == 0, forward
    if backward:
        grad_output = torch.randn_like(th_out)
        zs_out.backward(grad_output)
        th_out.backward(grad_output)
        for i, (z, t) in enumerate(zip(zs_in, th_in)):
            if t is not None:
                assert z.grad is not None, f"no gradient for input {i}"
                _close(f"grad of input {i}", z.grad, t.grad)
        counts = zeroskip.stats(reset=True)
        assert counts["fallback_calls"] == 0, counts
        # The input and weight gradients run generated kernels (the bias gradient is a sum).
        assert counts["kernel_calls"] == (2 if th_out.numel() else 0), counts
    return zs_out, th_out


def module_fn(module: torch.nn.Module, **kwargs):
    """``(x, weight, bias) -> module(x)`` with those tensors as the module's parameters."""
    def call(x, weight, bias):
        params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
        return functional_call(module, params, (x,), kwargs)
    return call


# ----------------------------------------------------------------------------------- specs
def _same_pairs(spec: LayerSpec) -> tuple:
    return tuple(((d * (k - 1)) // 2, d * (k - 1) - (d * (k - 1)) // 2)
                 for k, d in zip(spec.kernel_size, spec.dilation))


def _conv_padding(spec: LayerSpec, named: bool):
    """torch's ``padding`` argument for a conv spec: 'same' and 'valid' where they state the
    pairs (``named``: prefer them), else ints. Asymmetric pairs other than 'same' have no torch
    spelling: they become max(lo, hi) on both sides, valid for every padding mode and size the
    strategy draws (the kernel fits, reflect pads < size, circular pads <= size)."""
    pairs = spec.padding
    if all(s == 1 for s in spec.stride) and pairs == _same_pairs(spec) and (
            named or any(lo != hi for lo, hi in pairs)):
        return "same"
    if named and all(lo == hi == 0 for lo, hi in pairs):
        return "valid"
    return tuple(max(lo, hi) for lo, hi in pairs)


def make_case(spec: LayerSpec, dtype: torch.dtype, via_module: bool, named: bool, seed: int,
              workload: Workload = Workload()):
    """``(zs_fn, torch_fn, x, weight, bias)`` for a conv or conv_transpose spec at a workload;
    a padding mode other than zeros always goes through the modules."""
    arrays = random_inputs(spec, seed, workload)
    x, w = (torch.tensor(arrays[k], dtype=dtype) for k in ("input", "weight"))
    b = torch.tensor(arrays["bias"], dtype=dtype) if spec.bias else None
    r = spec.rank
    if spec.op == "conv_transpose":
        args = dict(stride=spec.stride, padding=tuple(lo for lo, _ in spec.padding),
                    output_padding=spec.output_padding, groups=spec.groups,
                    dilation=spec.dilation)
        zs_cls, th_cls = getattr(ZN, f"ConvTranspose{r}d"), getattr(torch.nn, f"ConvTranspose{r}d")
        zs_f, th_f = getattr(ZF, f"conv_transpose{r}d"), getattr(F, f"conv_transpose{r}d")
    else:
        args = dict(stride=spec.stride, padding=_conv_padding(spec, named),
                    dilation=spec.dilation, groups=spec.groups)
        zs_cls, th_cls = getattr(ZN, f"Conv{r}d"), getattr(torch.nn, f"Conv{r}d")
        zs_f, th_f = getattr(ZF, f"conv{r}d"), getattr(F, f"conv{r}d")
        via_module = via_module or spec.padding_mode != "zeros"
        if via_module:
            args["padding_mode"] = spec.padding_mode
    if not via_module:
        return (lambda x, w, b: zs_f(x, w, b, **args)), (lambda x, w, b: th_f(x, w, b, **args)), \
            x, w, b
    common = dict(kernel_size=spec.kernel_size, bias=spec.bias, dtype=dtype, **args)
    zs_mod = zs_cls(spec.in_channels, spec.out_channels, **common)
    th_mod = th_cls(spec.in_channels, spec.out_channels, **common)
    return module_fn(zs_mod), module_fn(th_mod), x, w, b


def _noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values with the last two dimensions' strides swapped."""
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


def apply_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "noncontiguous":
        return _noncontiguous(x)
    if layout == "sliced":   # every other channel of a twice-as-wide tensor
        wide = torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:], dtype=x.dtype)
        wide[:, ::2] = x
        return wide[:, ::2]
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "unbatched" and x.shape[0] >= 1:
        return x[0]
    return x


CONV_SPECS = specs(ops=("conv", "conv_transpose"), limits=EXECUTABLE, channels=(1, 20))
LAYOUTS = ("contiguous", "noncontiguous", "sliced", "channels_last", "unbatched")
DTYPES = (torch.float32, torch.float64)


@settings(max_examples=60, deadline=None)
@given(spec=CONV_SPECS, dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
       via_module=st.booleans(), named=st.booleans(), seed=st.integers(0, 2**16),
       workload=workloads())
def test_forward_matches_torch(spec, dtype, layout, via_module, named, seed, workload):
    zs_fn, th_fn, x, w, b = make_case(spec, dtype, via_module, named, seed, workload)
    assert_matches_torch(zs_fn, th_fn, apply_layout(x, layout), w, b)


@settings(max_examples=30, deadline=None)
@given(spec=CONV_SPECS, dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
       via_module=st.booleans(), named=st.booleans(), seed=st.integers(0, 2**16),
       workload=workloads())
def test_backward_matches_torch(spec, dtype, layout, via_module, named, seed, workload):
    zs_fn, th_fn, x, w, b = make_case(spec, dtype, via_module, named, seed, workload)
    assert_matches_torch(zs_fn, th_fn, apply_layout(x, layout), w, b, backward=True)


# ----------------------------------------------------------------------------------- explicit
DEPTHWISE = [  # (fn name, input shape, weight shape, kwargs): groups == channels
    ("conv2d", (2, 8, 9, 9), (8, 1, 3, 3), dict(padding=1, groups=8)),
    ("conv2d", (2, 8, 9, 9), (8, 1, 3, 3), dict(stride=2, padding=1, groups=8)),
    ("conv2d", (1, 6, 7, 7), (12, 1, 5, 5), dict(padding=2, dilation=1, groups=6)),  # x2 mult
    ("conv2d", (2, 5, 8, 8), (5, 1, 3, 3), dict(padding="same", dilation=2, groups=5)),
    ("conv1d", (3, 16, 20), (16, 1, 7), dict(padding=3, groups=16)),
    ("conv3d", (1, 4, 5, 6, 6), (4, 1, 3, 3, 3), dict(padding=1, groups=4)),
    ("conv_transpose2d", (2, 8, 5, 5), (8, 1, 4, 4), dict(stride=2, padding=1, groups=8)),
    ("conv_transpose1d", (2, 6, 7), (6, 2, 3), dict(stride=3, groups=6)),
]


@pytest.mark.parametrize("name, x_shape, w_shape, kwargs, dtype", [
    *((*case, torch.float32) for case in DEPTHWISE), (*DEPTHWISE[1], torch.float64)],
    ids=[f"{case[0]}-{i}" for i, case in enumerate(DEPTHWISE)] + ["conv2d-1-float64"])
def test_depthwise(name, x_shape, w_shape, kwargs, dtype):
    torch.manual_seed(0)
    x, w = torch.randn(x_shape, dtype=dtype), torch.randn(w_shape, dtype=dtype)
    channels_out = w_shape[0] if "transpose" not in name else w_shape[1] * kwargs["groups"]
    b = torch.randn(channels_out, dtype=dtype)
    zs_fn = lambda x, w, b: getattr(ZF, name)(x, w, b, **kwargs)  # noqa: E731
    th_fn = lambda x, w, b: getattr(F, name)(x, w, b, **kwargs)   # noqa: E731
    assert_matches_torch(zs_fn, th_fn, x, w, b, backward=True)


def test_channels_last_output_keeps_torch_memory_format():
    torch.manual_seed(1)
    x = torch.randn(2, 6, 10, 10).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(5, 6, 3, 3), torch.randn(5)
    zs, th = assert_matches_torch(lambda x, w, b: ZF.conv2d(x, w, b, padding=1),
                                  lambda x, w, b: F.conv2d(x, w, b, padding=1), x, w, b)
    assert th.is_contiguous(memory_format=torch.channels_last)
    assert zs.is_contiguous(memory_format=torch.channels_last)


def test_noncontiguous_weight_and_bias():
    torch.manual_seed(2)
    x = torch.randn(2, 4, 9, 9)
    w = _noncontiguous(torch.randn(6, 4, 3, 3))
    b = torch.randn(12)[::2]
    assert not w.is_contiguous() and not b.is_contiguous()
    assert_matches_torch(lambda x, w, b: ZF.conv2d(x, w, b, stride=2),
                         lambda x, w, b: F.conv2d(x, w, b, stride=2), x, w, b, backward=True)


def test_gradcheck_float64():
    torch.manual_seed(3)
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: ZF.conv2d(x, w, b, stride=(2, 1), padding=(1, 0)), (x, w, b))
    w_t = torch.randn(2, 3, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, w, b: ZF.conv_transpose2d(x, w, b, stride=2, output_padding=1), (x, w_t, b))


@pytest.mark.parametrize("rank, kwargs", [
    (1, dict(stride=2, output_padding=2, dilation=3)),            # crop 1
    (2, dict(stride=(2, 1), padding=(1, 0), output_padding=(3, 1), dilation=(4, 2))),
    (3, dict(stride=1, output_padding=1, dilation=2)),
])
def test_transposed_output_padding_past_stride_trains_on_kernels(rank, kwargs, monkeypatch):
    """output_padding >= stride (dilation > stride) appends outputs no input reaches: the
    gradient operators read the output gradient cropped (LayerSpec.gradient_crop), on kernels
    (strict mode: no fallback)."""
    monkeypatch.setenv("ZEROSKIP_STRICT", "1")
    torch.manual_seed(5)
    x, w, b = torch.randn(2, 3, *(4,) * rank), torch.randn(3, 4, *(3,) * rank), torch.randn(4)
    name = f"conv_transpose{rank}d"
    assert_matches_torch(lambda x, w, b: getattr(ZF, name)(x, w, b, **kwargs),
                         lambda x, w, b: getattr(F, name)(x, w, b, **kwargs), x, w, b,
                         backward=True)
    x64, w64 = x.double().requires_grad_(), w.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda x, w: getattr(ZF, name)(x, w, **kwargs), (x64, w64))


def test_partial_requires_grad_and_no_grad():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(4, 3, 3, 3)   # frozen weight: only the input gradient is computed
    ZF.conv2d(x, w, padding=1).sum().backward()
    ref = x.detach().requires_grad_()
    F.conv2d(ref, w, padding=1).sum().backward()
    _close("grad input", x.grad, ref.grad)
    with torch.no_grad():
        assert not ZF.conv2d(x, w, padding=1).requires_grad
    assert ZF.conv2d(x, w, padding=1).requires_grad


def _update_in_place(p):
    with torch.no_grad():
        p.mul_(-2).add_(0.5)


def _update_data(p):
    # .data edits do not bump the tensor's version counter: the packs' content check sees them.
    p.data.mul_(-2).add_(0.5)


def _update_copy(p):
    with torch.no_grad():
        p.copy_(p * -2 + 0.5)


@pytest.mark.parametrize("update", [_update_in_place, _update_data, _update_copy])
@pytest.mark.parametrize("which", ["weight", "bias"])
def test_parameter_updates_are_seen(update, which):
    """A module keeps no stale copy (e.g. packed weights) of a parameter changed in place, as
    optimizers, initializers and EMA updates do between calls."""
    torch.manual_seed(11)
    conv = ZN.Conv2d(3, 16, 3, padding=1)
    reference = torch.nn.Conv2d(3, 16, 3, padding=1)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        conv(x)   # the first call packs the weights
        update(getattr(conv, which))
        reference.load_state_dict(conv.state_dict())
        _close("after update", conv(x), reference(x))


def test_a_new_parameter_version_replaces_its_pack():
    """An optimizer step bumps the weight's version: the kernel repacks it and drops the old
    pack, so a training loop holds one pack per layer (not one per step, up to the cache size)."""
    torch.manual_seed(12)
    conv = ZN.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(1, 3, 6, 6)
    kernel = zeroskip.runtime.loader.kernel_for(LayerSpec.conv(3, 8, 3, padding=1, input_size=(6, 6)))
    kernel.forget_packed()
    with torch.no_grad():
        for _ in range(3):
            conv(x)
            conv.weight.add_(0.1)
            conv.bias.add_(0.1)
        _close("after three updates", conv(x), torch.nn.functional.conv2d(
            x, conv.weight, conv.bias, padding=1))
    assert len(kernel._packs) == 1


def _counting_packs(kernel, monkeypatch) -> list:
    packed = []
    pack = kernel._pack
    monkeypatch.setattr(kernel, "_pack", lambda w, b: packed.append(1) or pack(w, b))
    return packed


def test_plain_tensor_weights_are_packed_twice_per_version(monkeypatch):
    """Weights passed as plain tensors (not Parameters) are reused like a Parameter's: packed
    on the first call, packed with a copy of their bytes on the second, then reused while
    their bytes are the same; an in-place change repacks."""
    torch.manual_seed(13)
    x, w, b = torch.randn(1, 3, 6, 6), torch.randn(8, 3, 3, 3), torch.randn(8)
    kernel = zeroskip.runtime.loader.kernel_for(LayerSpec.conv(3, 8, 3, padding=1,
                                                               input_size=(6, 6)))
    kernel.forget_packed()
    packed = _counting_packs(kernel, monkeypatch)
    with torch.no_grad():
        for _ in range(3):
            ZF.conv2d(x, w, b, padding=1)
        ZF.conv2d(x, w.view(8, 3, 3, 3), b, padding=1)    # a view: same storage, same version
        assert len(packed) == 2
        w.mul_(-1)
        _close("after an in-place change", ZF.conv2d(x, w, b, padding=1),
               F.conv2d(x, w, b, padding=1))
    assert len(packed) == 3 and len(kernel._packs) == 1


def test_no_stale_pack_after_a_storage_is_freed_and_its_memory_reused():
    """A new tensor over the memory of a freed one (same data pointer, strides and version 0)
    gets its own pack: the cache holds a weak reference to the storage it packed."""
    torch.manual_seed(14)
    x = torch.randn(1, 3, 6, 6)
    memory = np.empty((8, 3, 3, 3), dtype=np.float32)
    for step in range(3):
        memory[:] = np.random.default_rng(step).standard_normal(memory.shape)
        w = torch.from_numpy(memory)             # a new storage over the same memory
        assert w._version == 0
        _close(f"tensor {step}", ZF.conv2d(x, w, padding=1), F.conv2d(x, w, padding=1))
        del w


# ----------------------------------------------------------------------------------- nn modules
MODULES = [  # (name, positional args, keyword args): the torch constructor's own
    ("Conv1d", (4, 6, 3), dict(stride=2, padding=1, bias=False)),
    ("Conv2d", (4, 6, (3, 2)), dict(padding="same", dilation=(1, 2), groups=2)),
    ("Conv3d", (2, 4, 2), dict(stride=(1, 2, 1), padding_mode="replicate", padding=1)),
    ("ConvTranspose1d", (4, 6, 3), dict(stride=2, output_padding=1)),
    ("ConvTranspose2d", (4, 6, 3), dict(stride=2, padding=1, groups=2, dilation=2)),
    ("ConvTranspose3d", (2, 3, (2, 3, 1)), dict(stride=(2, 1, 1), bias=False)),
]


@pytest.mark.parametrize("name, args, kwargs", MODULES, ids=[m[0] for m in MODULES])
def test_module_matches_torch_module(name, args, kwargs):
    torch.manual_seed(5)
    zs_mod = getattr(ZN, name)(*args, **kwargs)
    torch.manual_seed(5)
    th_mod = getattr(torch.nn, name)(*args, **kwargs)
    assert isinstance(zs_mod, getattr(torch.nn, name))
    assert zs_mod.extra_repr() == th_mod.extra_repr()
    # Same initialization, same state_dict (keys, order, values), loadable both ways.
    zs_sd = {k: v.clone() for k, v in zs_mod.state_dict().items()}
    th_sd = th_mod.state_dict()
    assert list(zs_sd) == list(th_sd)
    for key in th_sd:
        assert torch.equal(zs_sd[key], th_sd[key]), key
    th_mod.load_state_dict({k: v * 2 for k, v in zs_sd.items()})
    zs_mod.load_state_dict(th_mod.state_dict())
    assert torch.equal(zs_mod.weight, zs_sd["weight"] * 2)
    rank = int(name[-2])
    x = torch.randn(2, args[0], *(5,) * rank)
    zs_fn, th_fn = module_fn(zs_mod), module_fn(th_mod)
    assert_matches_torch(zs_fn, th_fn, x, zs_mod.weight, zs_mod.bias, backward=True)
    # And the plain module call (parameters of the module itself) runs the kernels too.
    zeroskip.stats(reset=True)
    _close("module call", zs_mod(x), th_mod(x))
    assert zeroskip.stats()["kernel_calls"] == 1


@pytest.mark.parametrize("mode, rank, padding", [
    ("reflect", 1, 2), ("replicate", 1, 1), ("circular", 1, 3),
    ("reflect", 2, (1, 2)), ("replicate", 2, "same"), ("circular", 2, (2, 1)),
    ("reflect", 3, 1), ("circular", 3, (1, 2, 1)),
    # Padding narrower than half the kernel (the padded input is still wide enough).
    ("reflect", 1, 0), ("replicate", 2, (0, 1)), ("circular", 2, (1, 0)),
], ids=lambda v: str(v).replace(" ", ""))
def test_padding_modes(mode, rank, padding):
    torch.manual_seed(6)
    kwargs = dict(kernel_size=3 if padding != "same" else (3, 4), padding=padding,
                  padding_mode=mode)
    zs_mod = getattr(ZN, f"Conv{rank}d")(3, 4, **kwargs)
    th_mod = getattr(torch.nn, f"Conv{rank}d")(3, 4, **kwargs)
    th_mod.load_state_dict(zs_mod.state_dict())
    x = torch.randn(2, 3, *(6,) * rank)
    assert_matches_torch(module_fn(zs_mod), module_fn(th_mod), x, zs_mod.weight, zs_mod.bias,
                         backward=True)


@pytest.mark.parametrize("rank, output_size", [
    (2, (10, 10)), (2, [2, 3, 9, 10]), (1, [10]), (3, (4, 10, 9))],
    ids=lambda v: str(v).replace(" ", ""))
def test_conv_transpose_output_size(rank, output_size):
    torch.manual_seed(7)
    kwargs = dict(kernel_size=3, stride=(1, 2, 2)[-rank:] if rank > 1 else 2,
                  padding=1)
    zs_mod = getattr(ZN, f"ConvTranspose{rank}d")(3, 2, **kwargs)
    th_mod = getattr(torch.nn, f"ConvTranspose{rank}d")(3, 2, **kwargs)
    th_mod.load_state_dict(zs_mod.state_dict())
    x = torch.randn(2, 3, *((4, 5, 5)[-rank:]))
    zs, th = assert_matches_torch(module_fn(zs_mod, output_size=output_size),
                                  module_fn(th_mod, output_size=output_size), x,
                                  zs_mod.weight, zs_mod.bias, backward=True)
    assert tuple(zs.shape[-rank:]) == tuple(output_size)[-rank:]


class _Residual(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")

    def forward(self, x):
        return x + self.conv(x)


class _CustomConv(torch.nn.Conv2d):
    """A subclass of torch's module: convert() must leave it alone."""


def test_convert_swaps_modules_in_place():
    torch.manual_seed(8)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), _Residual(),
        torch.nn.ConvTranspose2d(8, 4, 2, stride=2), _CustomConv(4, 2, 1))
    reference = copy.deepcopy(model)
    params = list(model.parameters())
    hooked = []
    model[0].register_forward_hook(lambda module, args, out: hooked.append(type(module)))
    assert zeroskip.convert(model) is model
    assert type(model[0]) is ZN.Conv2d
    assert type(model[2].conv) is ZN.Conv2d
    assert type(model[3]) is ZN.ConvTranspose2d
    assert type(model[4]) is _CustomConv and type(model[1]) is torch.nn.ReLU
    # The very same parameters, the same state_dict.
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert list(model.state_dict()) == list(reference.state_dict())
    x = torch.randn(2, 3, 6, 6)
    zeroskip.stats(reset=True)
    out = model(x)
    assert zeroskip.stats()["kernel_calls"] == 3      # the three converted convolutions
    _close("model output", out, reference(x))
    assert hooked == [ZN.Conv2d]                      # hooks survive the swap
    _close("deep copy", copy.deepcopy(model)(x), reference(x))
    # Gradients flow to every parameter as torch's.
    out.square().sum().backward()
    reference(x).square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        _close(f"grad {name}", p.grad, q.grad)


# ----------------------------------------------------------------------------------- memo
def test_smaller_last_batch_does_not_recompile():
    torch.manual_seed(9)
    # An odd shape no other test uses, so the first call does build (or find) its kernels.
    conv = ZN.Conv2d(5, 7, (3, 2), stride=(2, 1), padding=(1, 0))
    reference = torch.nn.Conv2d(5, 7, (3, 2), stride=(2, 1), padding=(1, 0))
    reference.load_state_dict(conv.state_dict())
    full = torch.randn(8, 5, 11, 9, requires_grad=True)
    last = torch.randn(3, 5, 11, 9, requires_grad=True)
    conv(full).sum().backward()                     # forward and both gradient kernels
    zeroskip.stats(reset=True)
    out = conv(last)
    out.sum().backward()
    counts = zeroskip.stats(reset=True)
    assert counts["compiles"] == 0 and counts["cache_hits"] == 0, counts
    assert counts["kernel_calls"] == 3 and counts["fallback_calls"] == 0, counts
    _close("last batch", out, reference(last))
    # A batch of one, and unbatched input, reuse the kernels as well.
    with torch.no_grad():
        _close("batch 1", conv(last[:1]), reference(last[:1]))
        _close("unbatched", conv(last[0]), reference(last[0]))
    counts = zeroskip.stats()
    assert counts["compiles"] == 0 and counts["kernel_calls"] == 2, counts


# ----------------------------------------------------------------------------------- sum().backward
@pytest.mark.parametrize("name, x_shape, w_shape", [
    ("conv2d", (2, 3, 9, 8), (4, 3, 3, 3)),
    ("conv_transpose2d", (2, 3, 5, 4), (3, 4, 3, 3)),
])
def test_sum_backward_stride2_with_bias(name, x_shape, w_shape):
    torch.manual_seed(10)
    tensors = [torch.randn(x_shape), torch.randn(w_shape), torch.randn(4)]
    grads = []
    for fn in (getattr(ZF, name), getattr(F, name)):
        x, w, b = (t.clone().requires_grad_() for t in tensors)
        fn(x, w, b, stride=2, padding=1).sum().backward()
        grads.append((x.grad, w.grad, b.grad))
    for label, z, t in zip(("input", "weight", "bias"), *grads):
        _close(f"grad {label}", z, t)
    # d(sum)/d(bias) is the number of output positions per channel.
    out = getattr(F, name)(tensors[0], tensors[1], stride=2, padding=1)
    assert torch.allclose(grads[0][2], torch.full((4,), float(math.prod(out.shape) / 4)))


# ----------------------------------------------------------------------------- fused ReLU
@pytest.mark.parametrize("rank", [1, 2, 3])
def test_fused_relu_matches_torch_forward_and_backward(rank):
    torch.manual_seed(rank)
    size = (7,) * rank
    x = torch.randn(2, 5, *size, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 5, *(3,) * rank, dtype=torch.float64, requires_grad=True)
    b = torch.randn(6, dtype=torch.float64, requires_grad=True)
    fused = getattr(zeroskip.functional, f"conv{rank}d_relu")
    plain = getattr(F, f"conv{rank}d")
    got, want = fused(x, w, b, padding=1), F.relu(plain(x, w, b, padding=1))
    assert torch.allclose(got, want, atol=1e-10)
    assert (got == 0).any() and (got > 0).any()
    g = torch.randn_like(want)
    assert all(torch.allclose(a, e, atol=1e-10) for a, e in
               zip(torch.autograd.grad(got, (x, w, b), g), torch.autograd.grad(want, (x, w, b), g)))


def test_convert_fuses_conv_relu_in_sequential_unless_hooked():
    """Conv-ReLU and ReLU-Conv pairs of an nn.Sequential fuse, except with a hooked module."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(inplace=True),
                                torch.nn.Conv2d(8, 4, 1))
    x = torch.randn(2, 3, 9, 9)
    want, state = model(x), {k: v.clone() for k, v in model.state_dict().items()}
    seen = []
    model[2].register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    zeroskip.convert(model)
    assert type(model[0]) is zeroskip.nn.ConvReLU2d and type(model[1]) is torch.nn.Identity
    # The hooked conv keeps its ReLU after it to itself; that ReLU fuses into the next conv.
    assert type(model[2]) is zeroskip.nn.Conv2d and type(model[3]) is torch.nn.Identity
    assert type(model[4]) is zeroskip.nn.ReLUConv2d
    assert model.state_dict().keys() == state.keys()
    assert torch.allclose(model(x), want, atol=1e-5)
    assert (seen[-1] < 0).any()       # the hook still sees the conv's own output


def test_convert_fuses_relu_pairs_of_residual_blocks_by_tracing():
    """Pairs a forward makes outside nn.Sequential (a ResNet block's relu(bn1(conv1(x))) into
    conv2) are found with torch.fx: the returned GraphModule keeps module names, state_dict and
    results; a ReLU with two users (the block's output, read by conv1 and the shortcut) stays."""
    from zeroskip.models import CifarResNet
    torch.manual_seed(0)
    reference = CifarResNet(widths=(8, 16), classes=3)
    model = copy.deepcopy(reference)
    converted = zeroskip.convert(model)
    assert isinstance(converted, torch.fx.GraphModule)
    assert converted.state_dict().keys() == reference.state_dict().keys()
    assert type(converted.get_submodule("stages.0.conv2")) is zeroskip.nn.ReLUConv2d
    assert type(converted.get_submodule("stages.1.conv1")) is zeroskip.nn.Conv2d
    x = torch.randn(2, 3, 16, 16)
    want, got = reference(x), converted(x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    want.square().sum().backward()
    got.square().sum().backward()
    grads = dict(reference.named_parameters())
    for name, p in converted.named_parameters():
        torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-4, atol=1e-4)


def test_convert_skips_untraceable_models_with_a_warning():
    """A forward torch.fx cannot trace (control flow on values) keeps its Sequential fusions
    and warns that it was not traced."""
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return self.conv(torch.relu(x)) if x.sum() > 0 else self.conv(x)

    model = Branchy()
    with pytest.warns(UserWarning, match="not traceable by torch.fx"):
        converted = zeroskip.convert(model)
    assert converted is model and type(model.conv) is zeroskip.nn.Conv2d
