"""The compiled launcher (runtime/launcher.py): a C kernel's call on cached packs in one call,
proving the packs by content as the ctypes path does. Every route of writing to a weight is
replayed with the launcher loaded: no call may run on old weights."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import zeroskip
from zeroskip import functional as ZF
from zeroskip.runtime import launcher

import test_stale_weights as stale


@pytest.fixture(scope="module")
def launched():
    """The launcher, built (or found) in this run's cache and loaded."""
    try:
        return launcher.load()
    except Exception as exc:        # noqa: BLE001 - no C++ compiler here: nothing to test
        pytest.skip(f"the launcher cannot be built here: {exc}")


def _ran(launched) -> int:
    return launched.calls(False)


def test_it_runs_the_call_and_counts_it(launched, monkeypatch):
    monkeypatch.delenv("ZEROSKIP_LAUNCHER", raising=False)
    spec = stale.SPECS[1]
    x = torch.randn(spec[1])
    w = torch.nn.Parameter(torch.randn(spec[2]), requires_grad=False)
    b = torch.nn.Parameter(torch.randn(spec[2][0]), requires_grad=False)
    with torch.no_grad():
        for _ in range(2):                   # the first two calls pack (and copy) in Python
            ZF.conv2d(x, w, b, **spec[3])
        before, kernels = _ran(launched), zeroskip.stats()["kernel_calls"]
        got = ZF.conv2d(x, w, b, **spec[3])
    torch.testing.assert_close(got, F.conv2d(x, w, b, **spec[3]))
    assert _ran(launched) == before + 1 and zeroskip.stats()["kernel_calls"] == kernels + 1
    monkeypatch.setenv("ZEROSKIP_LAUNCHER", "0")           # off: the ctypes path
    assert launcher.module() is None and launcher.status() == "off"
    with torch.no_grad():
        torch.testing.assert_close(ZF.conv2d(x, w, b, **spec[3]), got)
    assert _ran(launched) == before + 1


@pytest.mark.parametrize("route", sorted(stale.ROUTES))
@pytest.mark.parametrize("spec", [stale.SPECS[1], stale.SPECS[4]], ids=["conv2d", "conv_transpose2d"])
def test_every_route_of_writing_is_seen(launched, monkeypatch, route, spec):
    monkeypatch.setenv("ZEROSKIP_STRICT", "1")
    monkeypatch.delenv("ZEROSKIP_LAUNCHER", raising=False)
    before = _ran(launched)
    stale._calls_then_a_write(spec, route, calls=3)
    assert _ran(launched) > before           # the calls after the second went through it


def test_any_sequence_of_calls_and_writes(launched, monkeypatch):
    monkeypatch.setenv("ZEROSKIP_STRICT", "1")
    monkeypatch.delenv("ZEROSKIP_LAUNCHER", raising=False)
    before = _ran(launched)
    stale.test_no_route_of_writing_leaves_a_stale_result(None)
    assert _ran(launched) > before


def test_packs_are_kept_and_proven_as_before(launched, monkeypatch):
    """Two packs, then comparisons; a write behind torch's back repacks; frozen weights are
    packed once and see the writes torch counts."""
    monkeypatch.delenv("ZEROSKIP_LAUNCHER", raising=False)
    stale.test_an_unchanged_weight_is_packed_twice_then_compared(monkeypatch)
    stale.test_frozen_weights_are_packed_once_and_see_counted_writes(monkeypatch)
