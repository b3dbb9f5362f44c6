"""Counters of what ran: generated kernels, fallbacks to torch, compiles, cache hits.

Fallbacks go through :func:`fallback`, which warns once per reason (or raises under
``ZEROSKIP_STRICT=1``) and counts the call, so no path can run torch's op unaccounted.
"""
from __future__ import annotations

import dataclasses
import os
import threading
import warnings
from collections import Counter

COUNTERS = ("kernel_calls", "fallback_calls", "compiles", "cache_hits", "memo_hits",
            "bundle_hits", "compile_seconds", "sparse_calls", "variant_calls", "torch_choices",
            "tune_failures", "compiling_calls", "tuned_cases", "tuning_seconds",
            "stale_records")

_counts: Counter = Counter()
_lock = threading.Lock()
# Counters kept elsewhere (the compiled launcher counts its own calls): each is called with
# ``reset`` and returns counts to add.
SOURCES: list = []
_warned: set[str] = set()


@dataclasses.dataclass(frozen=True)
class Fallback:
    """Why a call runs on torch's op (``reason``: short and stable, one warning per reason)."""

    reason: str
    detail: str = ""


class ZeroskipFallbackWarning(RuntimeWarning):
    """A call ran on torch's own op instead of a generated kernel; the message says why."""


class FallbackError(RuntimeError):
    """Raised instead of falling back when ``ZEROSKIP_STRICT=1``."""


def add(name: str, amount: float = 1) -> None:
    with _lock:
        _counts[name] += amount


def stats(reset: bool = False) -> dict[str, float]:
    """The counters since start (or the last reset): ``kernel_calls``, ``fallback_calls``,
    ``compiles``, ``cache_hits`` (kernels found on disk), ``memo_hits`` (found in this process),
    ``bundle_hits`` (kernels loaded from a bundle),
    ``compile_seconds``; from per-call dispatch ``sparse_calls`` and ``variant_calls`` (kernels
    other than the layer's dense one), ``torch_choices`` (calls the tuning database sent to
    torch's op); ``tune_failures`` (autotuning candidates that failed); from autotuning in the
    loop ``tuned_cases`` (a layer's operator tuned at a batch and density) and
    ``tuning_seconds`` (the calls' time spent tuning, kernel builds included);
    ``stale_records`` (tuning records ignored: the kernels they timed have changed);
    ``compiling_calls`` (calls torch's op served while their kernels built in the background).
    ``reset=True`` zeroes them after reading."""
    with _lock:
        result = {name: _counts.get(name, 0) for name in COUNTERS}
        if reset:
            _counts.clear()
        for source in SOURCES:
            for name, count in source(reset).items():
                result[name] += count
    return result


def strict() -> bool:
    return os.environ.get("ZEROSKIP_STRICT", "") not in ("", "0")


def fallback(reason: str, detail: str = "") -> None:
    """Account for one call that runs on torch's op because of ``reason`` (a short, stable
    phrase: one warning per reason and process). Raises :class:`FallbackError` when strict."""
    message = f"zeroskip: running torch's own op: {reason}" + (f"\n{detail}" if detail else "")
    if strict():
        raise FallbackError(message + "\n(ZEROSKIP_STRICT=1 turns fallbacks into errors)")
    add("fallback_calls")
    with _lock:
        first = reason not in _warned
        _warned.add(reason)
    if first:
        warnings.warn(message, ZeroskipFallbackWarning, stacklevel=4)
