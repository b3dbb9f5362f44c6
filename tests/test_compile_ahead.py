"""Compiling ahead (``loader.ahead``, ``dispatch.build_variants_ahead``,
``gradients.build_ahead``): a layer's gradients and sparse variants build on background threads
while its forward runs; a kernel is built once however many threads ask for it. In the background (``ZEROSKIP_COMPILE=background``), torch's
op serves a call until its kernels are built. Results are torch's throughout."""
from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

import zeroskip
import zeroskip.functional as ZF
from zeroskip import LayerSpec
from zeroskip.codegen.variant import Variant
from zeroskip.runtime import dispatch, loader, stats


@pytest.fixture
def ahead(fresh_cache, monkeypatch):
    monkeypatch.setenv("ZEROSKIP_COMPILE_AHEAD", "1")
    monkeypatch.setattr(loader, "_building", {})
    yield fresh_cache
    _settle()       # nothing of this test's builds in flight past its cache


def _settle(timeout: float = 120.0) -> None:
    assert loader.wait_ahead(timeout), "builds still in flight"
    assert not loader._building


def _memoized(spec: LayerSpec, variant: str | None = None) -> bool:
    target = loader.RUNTIMES["c"].target()
    wanted = loader.DEFAULT if variant is None else Variant.parse(variant)
    return (spec, "c", target.source_variant(wanted), False) in loader._kernels


def test_gradients_build_ahead_and_match_torch(ahead):
    x = torch.randn(2, 8, 9, 9).relu_().requires_grad_()
    w = torch.randn(16, 8, 3, 3, requires_grad=True)
    stats.stats(reset=True)
    out = ZF.conv2d(x, w, None, padding=1)
    spec = LayerSpec.conv(8, 16, 3, padding=1, bias=False, input_size=(9, 9))
    _settle()
    # Built before the backward asks: the gradients' kernels and what dispatch may load.
    assert _memoized(spec.grad_input()) and _memoized(spec.grad_weight())
    for s in (spec, spec.grad_input(), spec.grad_weight()):
        for name in dispatch.next_variants(s, loader.kernel_for(s)):
            assert _memoized(s, name), (s.describe(), name)
    built = stats.stats()["compiles"]
    out.square().sum().backward()
    assert stats.stats()["compiles"] == built          # the backward found them all built
    xt, wt = x.detach().requires_grad_(), w.detach().requires_grad_()
    torch.nn.functional.conv2d(xt, wt, None, padding=1).square().sum().backward()
    torch.testing.assert_close(x.grad, xt.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(w.grad, wt.grad, rtol=1e-4, atol=1e-4)


def test_no_gradients_ahead_without_autograd(ahead):
    with torch.no_grad():
        ZF.conv2d(torch.randn(1, 4, 6, 6), torch.randn(4, 4, 3, 3), None, padding=1)
    _settle()
    spec = LayerSpec.conv(4, 4, 3, padding=1, bias=False, input_size=(6, 6))
    assert not _memoized(spec.grad_input()) and not _memoized(spec.grad_weight())


def test_threads_asking_for_one_kernel_build_it_once(fresh_cache):
    spec = LayerSpec.conv(5, 7, 3, padding=1, input_size=(6, 6))
    stats.stats(reset=True)
    found, start = [], threading.Barrier(4)

    def ask():
        start.wait()
        found.append(loader.kernel_for(spec))
    threads = [threading.Thread(target=ask) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(found) == 4 and all(k is found[0] for k in found)
    assert stats.stats()["compiles"] == 1


def test_failed_build_is_reported_to_every_waiter_and_retried(fresh_cache, monkeypatch):
    spec = LayerSpec.conv(3, 3, 3, input_size=(5, 5))
    calls = []

    def broken(*args, **kwargs):
        calls.append(1)
        time.sleep(0.2)
        raise loader.IRError("no template")
    monkeypatch.setattr(loader, "load", broken)
    errors, start = [], threading.Barrier(3)

    def ask():
        start.wait()
        try:
            loader.kernel_for(spec)
        except loader.IRError as exc:
            errors.append(exc)
    threads = [threading.Thread(target=ask) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 3 and not loader._building
    with pytest.raises(loader.IRError):
        loader.kernel_for(spec)         # tried again, not answered from a stale failure
    assert len(calls) >= 2


@pytest.fixture
def background(fresh_cache, monkeypatch):
    monkeypatch.setenv("ZEROSKIP_COMPILE", "background")
    monkeypatch.setattr(loader, "_building", {})
    monkeypatch.setattr(loader, "_ahead_failed", set())    # this test's failures stay here
    stats.stats(reset=True)
    yield fresh_cache
    _settle()


def test_background_serves_torch_until_the_kernel_is_built(background):
    x, w, b = torch.randn(2, 6, 8, 8), torch.randn(10, 6, 3, 3), torch.randn(10)
    want = torch.nn.functional.conv2d(x, w, b, padding=1)
    first = ZF.conv2d(x, w, b, padding=1)
    torch.testing.assert_close(first, want, rtol=0, atol=0)         # torch's own op
    assert stats.stats()["compiling_calls"] == 1 and stats.stats()["kernel_calls"] == 0
    _settle()
    later = ZF.conv2d(x, w, b, padding=1)
    torch.testing.assert_close(later, want, rtol=1e-4, atol=1e-4)
    counts = stats.stats()
    assert counts["kernel_calls"] == 1 and counts["compiling_calls"] == 1
    assert counts["fallback_calls"] == 0


def test_background_training_matches_torch_at_every_step(background):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 4, 3, stride=2, padding=1))
    ref = copy.deepcopy(net)
    model = zeroskip.convert(net)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (model, ref)]
    x = torch.randn(4, 3, 10, 10)
    served = []
    for step in range(40):
        losses = []
        for m, opt in zip((model, ref), opts):
            opt.zero_grad()
            loss = m(x).square().mean()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-4), step
        served.append(dict(stats.stats()))
        if step in (20, 25):
            # Built: what the calls asked for so far; then what the layers on kernels ask
            # for next (a layer's gradients are asked for once its forward runs a kernel).
            _settle()
    counts = stats.stats()
    assert counts["compiling_calls"] > 0 and counts["fallback_calls"] == 0
    # A step on kernels: two forwards, the second conv's input gradient, both weight gradients.
    last = {k: served[-1][k] - served[-2].get(k, 0) for k in served[-1]}
    assert last["kernel_calls"] == 5, {k: v for k, v in last.items() if v}
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4)


def test_strict_mode_waits_for_the_kernel(background, monkeypatch):
    monkeypatch.setenv("ZEROSKIP_STRICT", "1")
    x, w = torch.randn(1, 3, 6, 6), torch.randn(4, 3, 3, 3)
    torch.testing.assert_close(ZF.conv2d(x, w, None, padding=1),
                               torch.nn.functional.conv2d(x, w, None, padding=1),
                               rtol=1e-4, atol=1e-4)
    assert stats.stats()["kernel_calls"] == 1 and stats.stats()["compiling_calls"] == 0


def test_background_build_that_fails_falls_back_with_the_warning(background, monkeypatch):
    """A kernel whose build fails in the background: torch's op serves the call that started
    it; the next call, finding the build failed, falls back with the one-time warning, as it
    would have waiting; the call is not built again and again."""
    builds = []

    def broken(*args, **kwargs):
        builds.append(1)
        raise loader.IRError("no template for this")
    monkeypatch.setattr(loader, "load", broken)
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
    want = torch.nn.functional.conv2d(x, w)
    torch.testing.assert_close(ZF.conv2d(x, w), want, rtol=0, atol=0)
    _settle()
    with pytest.warns(stats.ZeroskipFallbackWarning, match="failed to build"):
        torch.testing.assert_close(ZF.conv2d(x, w), want, rtol=0, atol=0)
    for _ in range(3):
        ZF.conv2d(x, w)
    counts = stats.stats()
    assert counts["compiling_calls"] == 1 and counts["fallback_calls"] == 4
    assert len(builds) == 2         # the background's, and the retry that reported it
