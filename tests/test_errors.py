"""Mistakes raise what torch raises; what the kernels do not cover falls back to torch's op with
one warning per reason (or FallbackError under ZEROSKIP_STRICT=1); a failed compile falls back
and leaves no cache entry."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zeroskip
import zeroskip.functional as ZF
from zeroskip.runtime import stats
from zeroskip.runtime.stats import FallbackError, ZeroskipFallbackWarning


@pytest.fixture
def no_warned(monkeypatch):
    """Forget which fallback reasons have warned already, so this test sees its warnings."""
    monkeypatch.setattr(stats, "_warned", set())
    zeroskip.stats(reset=True)


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


X, W, B = _t(2, 4, 8, 8), _t(6, 4, 3, 3), _t(6)
W_T = _t(4, 3, 3, 3)   # a conv_transpose2d weight for X: 4 -> 3 channels

# (id, function name, args, kwargs, a word torch's message holds, which ours must hold too)
MISTAKES = [
    ("input 5-d", "conv2d", (_t(2, 4, 8, 8, 1), W), {}, "input"),
    ("input 2-d", "conv2d", (_t(8, 8), W), {}, "input"),
    ("channels", "conv2d", (_t(2, 5, 8, 8), W), {}, "input"),
    # torch blames the stride (its parser made it 2 ints, the weight has 1 spatial axis): so
    # does zeroskip, word for word (tests/test_error_order.py).
    ("weight 3-d", "conv2d", (X, _t(6, 4, 3)), {}, "stride"),
    ("bias size", "conv2d", (X, W, _t(5)), {}, "bias"),
    ("bias 2-d", "conv2d", (X, W, _t(6, 1)), {}, "bias"),
    ("dtype input/weight", "conv2d", (X, W.double()), {}, "weight"),
    ("dtype bias", "conv2d", (X, W, B.double()), {}, "bias"),
    ("stride 0", "conv2d", (X, W), dict(stride=0), "stride"),
    ("stride negative", "conv2d", (X, W), dict(stride=(1, -1)), "stride"),
    ("stride length", "conv2d", (X, W), dict(stride=(1, 1, 1)), "stride"),
    ("padding negative", "conv2d", (X, W), dict(padding=-1), "padding"),
    ("padding length", "conv2d", (X, W), dict(padding=(1, 1, 1)), "padding"),
    ("padding string", "conv2d", (X, W), dict(padding="full"), "padding"),
    ("dilation 0", "conv2d", (X, W), dict(dilation=0), "dilation"),
    ("groups not dividing", "conv2d", (X, _t(6, 2, 3, 3)), dict(groups=3), "groups"),
    ("groups 0", "conv2d", (X, W), dict(groups=0), "groups"),
    ("kernel larger than input", "conv2d", (_t(2, 4, 2, 2), W), {}, "Kernel size"),
    ("empty map, padded", "conv2d", (_t(2, 4, 0, 8), _t(6, 4, 1, 1)), dict(padding=1),
     "[2, 4, 0, 8]"),
    ("empty map, 1-d", "conv1d", (_t(1, 2, 0), _t(3, 2, 1)), dict(padding=1), "[1, 2, 1, 0]"),
    ("input not a tensor", "conv2d", ([[1.0]], W), {}, "conv2d"),
    ("weight not a tensor", "conv1d", (_t(1, 2, 5), 3.0), {}, "conv1d"),
    ("same with stride 2", "conv2d", (X, W), dict(padding="same", stride=2), "same"),
    ("output_padding too large", "conv_transpose2d", (X, W_T), dict(stride=2, output_padding=2),
     "output padding"),
    ("transposed channels", "conv_transpose2d", (X, _t(5, 3, 3, 3)), {}, "input"),
    ("transposed bias size", "conv_transpose2d", (X, W_T, _t(7)), {}, "bias"),
    ("transposed too small", "conv_transpose2d", (_t(1, 4, 1, 1), _t(4, 3, 1, 1)),
     dict(padding=1), "too small"),
    ("transposed padding string", "conv_transpose2d", (X, W_T), dict(padding="same"),
     "padding"),
    ("conv3d channels", "conv3d", (_t(1, 3, 4, 4, 4), _t(2, 2, 3, 3, 3)), {}, "input"),
]


def _raised(fn, *args, **kwargs) -> BaseException | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ZeroskipFallbackWarning)
            fn(*args, **kwargs)
    except Exception as exc:   # noqa: BLE001 - the exception is the result under test
        return exc
    return None


MISTAKE_PARAMS = dict(argnames="name, args, kwargs, word", argvalues=[m[1:] for m in MISTAKES],
                      ids=[m[0] for m in MISTAKES])


def _both(name, args, kwargs):
    """torch's exception and zeroskip's for the same call."""
    torch_exc = _raised(getattr(F, name), *args, **kwargs)
    assert torch_exc is not None, "not a mistake for torch"
    zs_exc = _raised(getattr(ZF, name), *args, **kwargs)
    assert zs_exc is not None, f"zeroskip accepted what torch rejects with: {torch_exc}"
    return torch_exc, zs_exc


@pytest.mark.parametrize(**MISTAKE_PARAMS)
def test_mistake_raises_torch_exception_type(name, args, kwargs, word):
    torch_exc, zs_exc = _both(name, args, kwargs)
    assert type(zs_exc) is type(torch_exc), f"zeroskip: {zs_exc!r}; torch: {torch_exc!r}"


@pytest.mark.parametrize(**MISTAKE_PARAMS)
def test_mistake_message_names_what_torch_names(name, args, kwargs, word):
    torch_exc, zs_exc = _both(name, args, kwargs)
    assert word in str(torch_exc), f"case out of date: torch says {torch_exc}"
    assert word in str(zs_exc), f"zeroskip: {zs_exc!r}; torch: {torch_exc!r}"


def test_transposed_module_rejects_padding_mode_as_torch():
    with pytest.raises(ValueError, match="zeros"):
        torch.nn.ConvTranspose2d(2, 2, 3, padding_mode="reflect")
    with pytest.raises(ValueError, match="zeros"):
        zeroskip.nn.ConvTranspose2d(2, 2, 3, padding_mode="reflect")


# ----------------------------------------------------------------------------------- fallbacks
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.complex64])
def test_unsupported_dtype_falls_back_once_per_reason(dtype, no_warned):
    torch.manual_seed(0)
    x, w, b = _t(2, 3, 6, 6, dtype=dtype), _t(4, 3, 3, 3, dtype=dtype), _t(4, dtype=dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = ZF.conv2d(x, w, b, padding=1)
        second = ZF.conv2d(x[:1], w, b, padding=1)
    fallbacks = [c for c in caught if issubclass(c.category, ZeroskipFallbackWarning)]
    assert len(fallbacks) == 1, [str(c.message) for c in caught]
    assert str(dtype) in str(fallbacks[0].message)
    counts = zeroskip.stats()
    assert counts["fallback_calls"] == 2 and counts["kernel_calls"] == 0, counts
    assert torch.equal(first, F.conv2d(x, w, b, padding=1))
    assert torch.equal(second, F.conv2d(x[:1], w, b, padding=1))


def test_strict_raises_instead_of_falling_back(monkeypatch, no_warned):
    monkeypatch.setenv("ZEROSKIP_STRICT", "1")
    x, w = _t(1, 3, 6, 6, dtype=torch.float16), _t(4, 3, 3, 3, dtype=torch.float16)
    for _ in range(2):   # also once the fallback decision is memoized
        with pytest.raises(FallbackError, match="float16"):
            ZF.conv2d(x, w)
    assert zeroskip.stats()["fallback_calls"] == 0


def test_strict_off_when_zero(monkeypatch, no_warned):
    monkeypatch.setenv("ZEROSKIP_STRICT", "0")
    x, w = _t(1, 3, 6, 6, dtype=torch.float16), _t(4, 3, 3, 3, dtype=torch.float16)
    with pytest.warns(ZeroskipFallbackWarning):
        ZF.conv2d(x, w)
    assert zeroskip.stats()["fallback_calls"] == 1


def test_meta_device_falls_back(no_warned):
    x, w, b = (t.to("meta") for t in (_t(2, 3, 7, 7), _t(5, 3, 3, 3), _t(5)))
    with pytest.warns(ZeroskipFallbackWarning, match="meta"):
        out = ZF.conv2d(x, w, b, stride=2)
    assert out.device.type == "meta"
    assert out.shape == F.conv2d(x, w, b, stride=2).shape == (2, 5, 3, 3)
    out = ZF.conv_transpose2d(x, _t(3, 2, 2, 2).to("meta"), stride=2)   # warned already
    assert out.shape == (2, 2, 14, 14)
    assert zeroskip.stats()["fallback_calls"] == 2


class _MyTensor(torch.Tensor):
    pass


def test_tensor_subclass_falls_back(no_warned):
    torch.manual_seed(1)
    x, w = _t(2, 3, 6, 6), _t(4, 3, 3, 3)
    with pytest.warns(ZeroskipFallbackWarning, match="subclass"):
        out = ZF.conv2d(x.as_subclass(_MyTensor), w)
    expected = F.conv2d(x.as_subclass(_MyTensor), w)
    assert type(out) is type(expected) is _MyTensor
    assert torch.equal(out, expected)
    assert zeroskip.stats()["fallback_calls"] == 1


def test_strict_meta_device_raises(monkeypatch, no_warned):
    monkeypatch.setenv("ZEROSKIP_STRICT", "1")
    with pytest.raises(FallbackError, match="meta"):
        ZF.conv1d(_t(1, 2, 5).to("meta"), _t(3, 2, 2).to("meta"))


# ----------------------------------------------------------------------------------- compiler
def _entries(cache: Path) -> list[Path]:
    """Cache entries: ``<xx>/<key>/`` directories (anything under ``failed/`` is not one)."""
    if not cache.exists():
        return []
    return [p for p in cache.glob("*/*") if p.is_dir() and p.parts[-2] != "failed"]


# A fake compiler: prints a line to stderr (not written as such in its own command line) and
# exits 3.
FAKE_CC = "sh -c 'printf \"%s-%s\\n\" fake-cc broke >&2; exit 3' sh"


@pytest.mark.parametrize("compiler, flags, says", [
    ("/bin/false", None, "exit 1"),
    (FAKE_CC, None, "fake-cc-broke"),
    # The compiler's own complaint (gcc: unrecognized, clang: unknown).
    (None, "-O2 -fPIC -shared --zeroskip-bogus-flag", "(unrecognized|unknown).*bogus-flag"),
])
def test_compile_failure_falls_back(compiler, flags, says, fresh_cache, monkeypatch, no_warned):
    if compiler is not None:
        monkeypatch.setenv("ZEROSKIP_CC", compiler)
    if flags is not None:
        monkeypatch.setenv("ZEROSKIP_CFLAGS", flags)
    torch.manual_seed(2)
    x, w, b = _t(2, 3, 9, 7), _t(5, 3, 3, 2), _t(5)
    with pytest.warns(ZeroskipFallbackWarning) as caught:
        out = ZF.conv2d(x, w, b, padding=(1, 0))
    message = "\n".join(str(c.message) for c in caught)
    assert "failed" in message and re.search(says, message), message
    # The source is kept where the message says, under <cache>/failed/.
    kept = re.search(r"source is kept at (\S+)", message)
    assert kept, message
    source = Path(kept.group(1))
    assert source.parent == fresh_cache / "failed" and source.is_file()
    assert "zs_run" in source.read_text()
    torch.testing.assert_close(out, F.conv2d(x, w, b, padding=(1, 0)))
    assert _entries(fresh_cache) == []
    counts = zeroskip.stats()
    assert counts["fallback_calls"] == 1 and counts["compiles"] == 0, counts
    # The failure is remembered: no second attempt, no second warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(ZF.conv2d(x, w, b, padding=(1, 0)),
                                   F.conv2d(x, w, b, padding=(1, 0)))
    assert zeroskip.stats()["fallback_calls"] == 2


def test_compile_failure_strict_raises(fresh_cache, monkeypatch):
    monkeypatch.setenv("ZEROSKIP_CC", "/bin/false")
    monkeypatch.setenv("ZEROSKIP_STRICT", "1")
    with pytest.raises(FallbackError, match="failed"):
        ZF.conv1d(_t(1, 3, 10), _t(2, 3, 4))
    assert _entries(fresh_cache) == []


def test_gradient_compile_failure_falls_back(fresh_cache, monkeypatch, no_warned):
    """The forward kernel builds; the gradient kernels cannot: backward runs torch's gradients."""
    torch.manual_seed(3)
    x = _t(2, 3, 8, 8).requires_grad_()
    w = _t(4, 3, 3, 3).requires_grad_()
    out = ZF.conv2d(x, w, padding=1, stride=2)
    built = _entries(fresh_cache)
    assert len(built) == 1
    monkeypatch.setenv("ZEROSKIP_CC", "/bin/false")
    grad = torch.randn_like(out)
    with pytest.warns(ZeroskipFallbackWarning, match="gradient"):
        out.backward(grad)
    xr, wr = x.detach().requires_grad_(), w.detach().requires_grad_()
    F.conv2d(xr, wr, padding=1, stride=2).backward(grad)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(w.grad, wr.grad)
    assert _entries(fresh_cache) == built
    assert zeroskip.stats()["fallback_calls"] == 2
