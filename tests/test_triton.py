"""The Triton backend, verified without a GPU: every kernel family runs under Triton's
interpreter (TRITON_INTERPRET=1) on CPU tensors and is compared with torch, forward and
backward; the dispatcher sends CUDA tensors to Triton (the device check is patched) and CPU
tensors to C. Shapes are small: the interpreter runs each program instance in numpy."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import zeroskip  # noqa: E402
from zeroskip import functional as zf  # noqa: E402
from zeroskip.codegen import emit, lower, pipeline  # noqa: E402
from zeroskip.codegen.variant import Config, Variant  # noqa: E402
from zeroskip.runtime import calls, dispatch, loader, stats, triton_kernel, tritonenv  # noqa: E402,E501
from zeroskip.spec import LayerSpec  # noqa: E402

TOL = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}


@pytest.fixture
def interpreter(monkeypatch):
    """CPU tensors run the Triton kernels under Triton's interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ZEROSKIP_BACKEND", "triton")
    monkeypatch.setattr(calls, "_calls", {})
    stats.stats(reset=True)
    yield


def close(got: torch.Tensor, want: torch.Tensor, dtype=torch.float32) -> None:
    assert got.shape == want.shape
    scale = want.abs().max().item() + 1.0
    err = (got.double() - want.double()).abs().max().item()
    assert err <= TOL[dtype] * scale, f"max error {err} (scale {scale})"


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_(True) for t in tensors]


def run_both(zs_fn, torch_fn, x, w, b, backward=True):
    """Compare forward and (with ``backward``) every gradient; the Triton kernels must have
    run with no fallback."""
    before = stats.stats()
    zx, zw, zb = leaves(x, w, b)
    tx, tw, tb = leaves(x, w, b)
    out, want = zs_fn(zx, zw, zb), torch_fn(tx, tw, tb)
    close(out, want, x.dtype)
    if backward:
        grad = torch.randn_like(want)
        got_grads = torch.autograd.grad(out, [t for t in (zx, zw, zb) if t is not None], grad)
        want_grads = torch.autograd.grad(want, [t for t in (tx, tw, tb) if t is not None], grad)
        for g, e in zip(got_grads, want_grads):
            close(g, e, x.dtype)
    after = stats.stats()
    assert after["fallback_calls"] == before["fallback_calls"]
    assert after["kernel_calls"] - before["kernel_calls"] == (3 if backward else 1)
    return out


CASES = [
    # name, functional name, input shape, weight shape, kwargs
    ("conv2d padded strided (trimmed borders)", "conv2d", (2, 16, 7, 7), (32, 16, 3, 3),
     dict(stride=2, padding=1)),
    ("conv2d few channels (CUDA-core tiles)", "conv2d", (1, 3, 9, 8), (8, 3, 3, 3),
     dict(padding=(1, 2))),
    ("conv2d depthwise", "conv2d", (2, 8, 6, 6), (8, 1, 3, 3), dict(padding=1, groups=8)),
    ("conv1d dilated grouped", "conv1d", (2, 32, 19), (32, 16, 3),
     dict(padding=4, dilation=4, groups=2)),
    ("conv3d", "conv3d", (1, 16, 4, 5, 5), (16, 16, 2, 3, 3), dict(stride=(1, 2, 2), padding=1)),
    ("conv2d 1x1 (flattened positions)", "conv2d", (2, 32, 5, 5), (16, 32, 1, 1), {}),
    ("conv_transpose2d (phase sub-convolutions)", "conv_transpose2d", (2, 32, 4, 4),
     (32, 16, 4, 4), dict(stride=2, padding=1)),
    ("conv_transpose1d output_padding", "conv_transpose1d", (1, 16, 9), (16, 8, 3),
     dict(stride=2, padding=1, output_padding=1)),
    ("conv_transpose1d output_padding >= stride (cropped gradient)", "conv_transpose1d",
     (1, 16, 5), (16, 8, 3), dict(stride=2, output_padding=2, dilation=3)),
]


@pytest.mark.parametrize("name,fn,xs,ws,kwargs", CASES, ids=[c[0] for c in CASES])
def test_families_match_torch_forward_and_backward(interpreter, name, fn, xs, ws, kwargs):
    torch.manual_seed(0)
    x, w = torch.randn(xs), torch.randn(ws)
    channels = ws[1] * kwargs.get("groups", 1) if fn.startswith("conv_transpose") else ws[0]
    b = torch.randn(channels)
    zs_fn = getattr(zf, fn)
    torch_fn = getattr(F, fn)
    run_both(lambda x, w, b: zs_fn(x, w, b, **kwargs), lambda x, w, b: torch_fn(x, w, b, **kwargs),
             x, w, b)
    (call,) = [c for c in calls._calls.values() if isinstance(c, dispatch.Operator)]
    assert call.last.startswith("dense/")


def test_fused_relu_and_channels_last(interpreter):
    torch.manual_seed(1)
    x = torch.randn(2, 16, 6, 6).contiguous(memory_format=torch.channels_last)
    w, b = torch.randn(16, 16, 3, 3), torch.randn(16)
    out = run_both(lambda x, w, b: zf.conv2d_relu(x, w, b, padding=1),
                   lambda x, w, b: F.relu(F.conv2d(x, w, b, padding=1)), x, w, b)
    assert out.is_contiguous(memory_format=torch.channels_last)


def test_relu_before_the_conv(interpreter):
    """``relu_conv2d`` on the Triton kernels: the conv of relu(z), the pre-activation's
    gradient masked where z <= 0, the weight gradient on relu(z)."""
    torch.manual_seed(2)
    z = torch.randn(2, 16, 6, 6)
    w, b = torch.randn(16, 16, 3, 3), torch.randn(16)
    run_both(lambda x, w, b: zf.relu_conv2d(x, w, b, padding=1),
             lambda x, w, b: F.conv2d(F.relu(x), w, b, padding=1), z, w, b)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_forward(interpreter, dtype):
    torch.manual_seed(2)
    x = torch.randn(1, 16, 5, 5, dtype=dtype)
    w = torch.randn(16, 16, 3, 3, dtype=dtype)
    out = zf.conv2d(x, w, None, padding=1)
    assert out.dtype == dtype
    close(out.float(), F.conv2d(x.float(), w.float(), None, padding=1), dtype)


def _operands(spec: LayerSpec, density: float = 1.0, seed: int = 0, batch: int = 2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(spec.input_shapes(batch)["input"], generator=g)
    if density < 1:
        x = x * (torch.rand(x.shape, generator=g) < density)
    w = torch.randn(spec.input_shapes()["weight"], generator=g)
    return x, w


@pytest.mark.parametrize("pattern", ["channels", "random", "zero", "dense"])
def test_block_sparse_matches_torch(interpreter, pattern):
    """The block-sparse family skips k-blocks whose flags are clear; whatever the zeros'
    structure, the result is torch's."""
    spec = LayerSpec.conv(32, 16, (3, 3), padding=1, bias=True, input_size=(6, 6))
    x, w = _operands(spec)
    if pattern == "channels":       # whole channel blocks zero: their k-blocks are skipped
        x[:, :16] = 0
        x[1, 16:] = 0
    elif pattern == "random":
        x = x * (torch.rand(x.shape) < 0.1)
    elif pattern == "zero":
        x.zero_()
    b = torch.randn(16)
    kernel = loader.kernel_for(spec, "triton", Variant("sparse"))
    assert kernel.family == "block_sparse"
    out = torch.empty(spec.output_shape(2))
    kernel.launch(x, kernel.pack(w), out, b, Config(16, 16, 16, 4, 1))
    close(out, F.conv2d(x, w, b, padding=1))


def test_weight_gradient_split_k(interpreter):
    """Split-K partial sums add atomically into a float32 buffer; any split gives torch's."""
    spec = LayerSpec.conv(16, 16, (3, 3), stride=2, padding=1, input_size=(7, 7))
    x, w = _operands(spec)
    x.requires_grad_(True)
    w.requires_grad_(True)
    y = F.conv2d(x, w, None, stride=2, padding=1)
    grad = torch.randn_like(y)
    (want,) = torch.autograd.grad(y, (w,), grad)
    kernel = loader.kernel_for(spec.grad_weight(), "triton", Variant("dense"))
    assert kernel.family == "weight_grad"
    for split in (1, 3):
        out = torch.empty(w.shape)
        kernel.launch(x.detach(), grad, out, None, Config(16, 16, 16, 4, 1, split))
        close(out, want)


def test_generated_source_is_a_real_imported_file(interpreter):
    spec = LayerSpec.conv(8, 8, (3, 3), padding=1, input_size=(5, 5))
    kernel = loader.kernel_for(spec, "triton", Variant("dense"))
    text = kernel.source.read_text()
    assert kernel.module.__file__ == str(kernel.source)
    assert text.startswith("# zeroskip generated Triton kernels")
    assert spec.describe().rsplit(" on ", 1)[0] in text.splitlines()[1]
    assert "interior" in text and "border" in text


def test_interior_regions_load_without_bounds_masks():
    """The data loads of the dot path carry no spatial masks: with channels a multiple of
    BLOCK_K the load is unmasked, and each region's taps are only those in range."""
    spec = LayerSpec.conv(32, 32, (3, 3), padding=1, input_size=(8, 8))
    plan = lower.plan(pipeline.run(spec, strategy="dense")[-1][1], backend="triton")
    source = emit.render_triton(plan, "direct")
    assert "a = tl.load(a_ptrs)\n" in source
    interior = [r for r in plan.regions if r.label == "interior"]
    assert interior and all(emit.taps_of(r) == 9 for r in interior)
    assert all(emit.taps_of(r) < 9 for r in plan.regions if r.label != "interior")


def test_cuda_tensors_dispatch_to_triton(interpreter, monkeypatch):
    """With the device check patched to report CUDA, a CPU tensor takes the Triton path even
    with ZEROSKIP_BACKEND unset; unpatched, CPU tensors take the C kernels."""
    monkeypatch.delenv("ZEROSKIP_BACKEND")
    x, w = torch.randn(1, 16, 5, 5), torch.randn(16, 16, 3, 3)
    zf.conv2d(x, w, None, padding=1)
    assert [type(c) for c in calls._calls.values()] == [dispatch.Operator]
    monkeypatch.setattr(calls, "_calls", {})
    monkeypatch.setattr(calls, "_device_type", lambda t: "cuda")
    out = zf.conv2d(x, w, None, padding=1)
    assert [type(c) for c in calls._calls.values()] == [dispatch.Operator]
    close(out, F.conv2d(x, w, None, padding=1))


def test_triton_backend_on_cpu_needs_the_interpreter(monkeypatch):
    monkeypatch.setenv("ZEROSKIP_BACKEND", "triton")
    monkeypatch.setattr(tritonenv, "interpreting", lambda: False)
    monkeypatch.setattr(calls, "_calls", {})
    monkeypatch.setattr(stats, "_warned", set())
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3)
    with pytest.warns(stats.ZeroskipFallbackWarning, match="TRITON_INTERPRET=1"):
        out = zf.conv2d(x, w, padding=1)
    close(out, F.conv2d(x, w, padding=1))


def test_unknown_backend_is_named(monkeypatch):
    monkeypatch.setenv("ZEROSKIP_BACKEND", "cuda-graphs")
    monkeypatch.setattr(calls, "_calls", {})
    monkeypatch.setattr(stats, "_warned", set())
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 3, 3)
    with pytest.warns(stats.ZeroskipFallbackWarning, match="ZEROSKIP_BACKEND"):
        zf.conv2d(x, w, padding=1)


def test_uncovered_padding_mode_falls_back_with_reason(interpreter, monkeypatch):
    monkeypatch.setattr(stats, "_warned", set())
    conv = zeroskip.nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")
    x = torch.randn(1, 4, 6, 6)
    with pytest.warns(stats.ZeroskipFallbackWarning, match="Triton"):
        out = conv(x)
    close(out, torch.nn.functional.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"),
                                          conv.weight, conv.bias))


def test_kernel_failing_at_first_launch_falls_back_once(interpreter, monkeypatch):
    """Triton compiles on the first launch: a failure there warns once, names the kernel,
    and torch's op serves that layer from then on (ZEROSKIP_STRICT=1 raises instead)."""
    monkeypatch.setattr(stats, "_warned", set())

    def broken(self, *args, **kwargs):
        raise RuntimeError("PassManager::run failed")

    monkeypatch.setattr(triton_kernel.Kernel, "launch", broken)
    x, w = torch.randn(1, 8, 5, 5), torch.randn(8, 8, 3, 3)
    with pytest.warns(stats.ZeroskipFallbackWarning, match="failed to compile or launch"):
        out = zf.conv2d(x, w, padding=1)
    close(out, F.conv2d(x, w, padding=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        zf.conv2d(x, w, padding=1)          # no second warning
    monkeypatch.setattr(calls, "_calls", {})
    monkeypatch.setenv("ZEROSKIP_STRICT", "1")
    with pytest.raises(stats.FallbackError, match="PassManager"):
        zf.conv2d(x, w, padding=1)


def test_config_names_round_trip_and_validate():
    config = Config(64, 32, 16, 4, 3, 2)
    assert Config.parse(config.name) == config
    parsed = Variant.parse(Variant("sparse", config=config).name)
    assert (parsed.strategy, parsed.config) == ("sparse", config)
    for bad in (dict(block_m=48), dict(warps=3), dict(stages=0), dict(split=-1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            Config(**bad)
    with pytest.raises(ValueError, match="not a kernel variant"):
        Variant.parse("dense/m48n64k32w4s3")


def test_plan_rejects_dtypes_and_pad_modes_triton_lacks():
    from zeroskip.codegen.ir import IRError
    spec = LayerSpec.conv(4, 4, (3, 3), padding=1, input_size=(5, 5), dtype="float64")
    with pytest.raises(IRError, match="float64"):
        lower.plan(pipeline.run(spec)[-1][1], backend="triton")
    spec = dataclasses.replace(spec, dtype="float32", padding_mode="circular")
    with pytest.raises(IRError, match="circular"):
        lower.plan(pipeline.run(spec)[-1][1], backend="triton")
