"""Autotuning in the loop, as ``torch.backends.cudnn.benchmark`` does it for cuDNN.

With it on (:func:`set_mode`, or ``ZEROSKIP_AUTOTUNE``), the first call of a layer's operator
(forward, input gradient or weight gradient) at a (batch bucket, density bucket) that the
tuning database holds no record for runs every candidate on the call's own operands: torch's op
first, whose result the call returns, then each generated candidate, checked against it; the
candidates that agree are timed in alternating rounds (a noisy machine then slows all of them
alike), and the fastest is recorded in the tuning database, which the dispatch follows from then
on. Modes: 'on' weighs torch's op, the layer's default kernel and its sparse kernels; 'all'
every variant the target offers (each one built first: slower to settle).

The cost is bounded: a case's timed rounds stop after :data:`CASE_S` seconds (at least
:data:`MIN_ROUNDS` rounds), and the process tunes for at most ``ZEROSKIP_AUTOTUNE_BUDGET``
seconds (default :data:`BUDGET_S`) in all, then says so once and follows the cost model. The
time spent is in ``zeroskip.stats()`` (``tuned_cases``, ``tuning_seconds``); a case that takes
over a second shows a progress line. Under ``torch.distributed``, rank 0 tunes and saves; the
other ranks read what it saved (:func:`.tuning.refresh`).
"""
from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
import warnings
from typing import Callable, Iterator

import torch

from . import env, reference, stats

MODES = ("off", "on", "all")
_ENV_MODES = {"": "off", "0": "off", "off": "off", "1": "on", "on": "on", "all": "all"}
MIN_ROUNDS, MAX_ROUNDS = 3, 7
CASE_S = 0.5            # timed rounds of one case stop after this long (MIN_ROUNDS done)
SAMPLE_S = 1e-3         # each timed sample repeats a call until it lasts about this long
BUDGET_S = 600.0        # default of ZEROSKIP_AUTOTUNE_BUDGET: seconds of tuning per process

_mode: list[str | None] = [None]      # set_mode's; None: the environment decides
_over_budget = [False]


def set_mode(mode: bool | str = True) -> str:
    """Turn autotuning in the loop on (True or 'on'), to every variant ('all'), or off (False
    or 'off'); returns the mode before. It overrides ``ZEROSKIP_AUTOTUNE`` (None: follow it
    again)."""
    try:
        before = current_mode()
    except ValueError:          # a bad ZEROSKIP_AUTOTUNE: the call may still set a mode
        before = "off"
    if mode is None:
        _mode[0] = None
    elif mode is True or mode is False:
        _mode[0] = "on" if mode else "off"
    elif mode in MODES:
        _mode[0] = mode
    else:
        raise ValueError(f"autotune mode must be True, False or one of {MODES}, got {mode!r}")
    return before


@contextlib.contextmanager
def autotuning(mode: bool | str = True) -> Iterator[None]:
    """:func:`set_mode` ``(mode)`` meanwhile; after, the setting before (a call's, or the
    environment's) again."""
    saved = _mode[0]
    set_mode(mode)
    try:
        yield
    finally:
        _mode[0] = saved


def current_mode() -> str:
    """The mode now: :func:`set_mode`'s, else ``ZEROSKIP_AUTOTUNE`` (0/off, 1/on, all)."""
    chosen = _mode[0]
    if chosen is not None:
        return chosen
    value = env.get("ZEROSKIP_AUTOTUNE")
    seen = _read[0]
    if seen[0] == value:        # (read on every call: the last value's mode is kept)
        return seen[1]
    found = _ENV_MODES.get((value or "").strip().lower())
    if found is None:
        raise ValueError(f"ZEROSKIP_AUTOTUNE must be one of 0, 1, on, off, all; got {value!r}")
    _read[0] = (value, found)
    return found


_read: list[tuple[str | None, str]] = [(None, "off")]


def tuner() -> bool:
    """Whether this process tunes: not a ``torch.distributed`` rank other than 0 (those read
    what rank 0 records)."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def budget_left() -> bool:
    """Whether the process may tune more (``ZEROSKIP_AUTOTUNE_BUDGET`` seconds in all); warns
    once when it may not."""
    if _over_budget[0]:
        return False
    try:
        budget = float(env.get("ZEROSKIP_AUTOTUNE_BUDGET", "") or BUDGET_S)
    except ValueError:
        raise ValueError("ZEROSKIP_AUTOTUNE_BUDGET must be a number of seconds, got "
                         f"{env.get('ZEROSKIP_AUTOTUNE_BUDGET')!r}") from None
    if stats.stats()["tuning_seconds"] < budget:
        return True
    _over_budget[0] = True
    warnings.warn(f"zeroskip: autotuning spent its budget of {budget:g} s "
                  "(ZEROSKIP_AUTOTUNE_BUDGET); layers not tuned yet follow the cost model",
                  RuntimeWarning, stacklevel=5)
    return False


def cannot_save(path, exc: OSError) -> None:
    """Warn once that the tuning database cannot be written (its choices last this process)."""
    if not _unsaved:
        _unsaved.append(path)
        warnings.warn(f"zeroskip: cannot save the tuning database {path} ({exc}); autotuned "
                      "choices last this process only", RuntimeWarning, stacklevel=4)


_unsaved: list = []


def tune(label: str, runs: dict[str, Callable[[], torch.Tensor]], first: str,
         dtype: str, device: torch.device) -> tuple[torch.Tensor, dict[str, float],
                                                    dict[str, str]]:
    """Run ``runs[first]`` (torch's op, else the default kernel: the result the call returns),
    then each other candidate once, checked against it; time those that agree in alternating
    rounds. Returns ``(first's result, median milliseconds by name (inf: failed), why each
    failed one failed)``. ``label`` names the case on the progress line."""
    from tqdm import tqdm
    cuda = device.type == "cuda"
    tolerance = reference.tolerance(dtype, device)
    once: dict[str, float] = {}
    errors: dict[str, str] = {}

    def timed(run: Callable[[], torch.Tensor], calls: int = 1) -> tuple[torch.Tensor, float]:
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(calls):
            out = run()
        if cuda:
            torch.cuda.synchronize(device)
        return out, (time.perf_counter() - start) / calls

    with tqdm(total=len(runs) + MAX_ROUNDS, desc=f"zeroskip: tuning {label}", delay=1.0,
              leave=False, file=sys.stderr, unit="step") as bar:
        want, once[first] = timed(runs[first])
        bar.update()
        for name, run in runs.items():
            if name == first:
                continue
            try:
                got, once[name] = timed(run)
                error = reference.relative_error(got, want)
                if not error <= tolerance:
                    raise ArithmeticError(f"differs from torch by {error:.3g} of the largest "
                                          f"magnitude (tolerance {tolerance:g})")
            except Exception as exc:   # noqa: BLE001 - a failing candidate scores inf
                errors[name] = f"{type(exc).__name__}: {exc}"
                once.pop(name, None)
                stats.add("tune_failures")
            bar.update()
        calls = {name: max(1, min(64, round(SAMPLE_S / max(t, 1e-7))))
                 for name, t in once.items()}
        samples: dict[str, list[float]] = {name: [] for name in once}
        order, start = list(once), time.perf_counter()
        for round_ in range(MAX_ROUNDS):
            for name in order if round_ % 2 == 0 else order[::-1]:
                samples[name].append(timed(runs[name], calls[name])[1])
            bar.update()
            if round_ + 1 >= MIN_ROUNDS and time.perf_counter() - start > CASE_S:
                break
    ms = {name: (statistics.median(samples[name]) * 1e3 if name in samples else math.inf)
          for name in runs}
    return want, ms, errors
