"""Reliability scenarios of the on-disk kernel cache, each run in fresh processes as a user meets
them: a cold-cache race, a long-running soak, and the faults of a crash (truncated library,
garbage metadata, a half-written build directory, a compiler or a builder killed by SIGKILL).

Shared by ``tests/test_load.py``, ``tests/test_faults.py`` and ``benchmarks/reliability.py``.
Each scenario returns ``{"checks": {name: bool}, "figures": {...}}``: the tests assert every
check, the benchmark reports the figures. Counts are small by default (CI) and the report's with
``ZEROSKIP_FULL_COUNTS=1``.

Run as a script, this file is the child process: ``python reliability_helpers.py WORKLOAD
OPTIONS_JSON`` prints one JSON line (its ``zeroskip.stats()``, its errors against torch, the
fallback warnings it saw, its RSS and open files).
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

FULL_COUNTS = os.environ.get("ZEROSKIP_FULL_COUNTS", "") not in ("", "0")
# Race: processes; soak: forward calls and forward+backward calls (a tenth: each is ~5x dearer).
RACE_PROCESSES = 8 if FULL_COUNTS else 3
SOAK_CALLS = 100_000 if FULL_COUNTS else 5_000
SOAK_GRAD_CALLS = SOAK_CALLS // 10
WARMUP_CALLS = 1_000
# RSS noise: a process that keeps nothing per call stays flat (measured: +0 KiB over 100k calls);
# the threshold leaves room for a new glibc or Python arena or a torch allocator cache (a few
# MiB at most). Over 100k calls 8 MiB is 84 bytes a call, so keeping any tensor, ctypes or Python
# object per call fails; at CI counts it is 1.7 KiB a call (this layer's output is 6.4 KB).
RSS_NOISE_BYTES = 8 << 20
TOLERANCE = 1e-4            # max abs error, relative to the largest magnitude of torch's result
BUILDER_DEADLINE_S = 60     # a waiting builder must serve within this of the holder's death
WAITER_HEADSTART_S = 2      # from its first call to the key's lock, a builder takes < 1 s
HERE = Path(__file__).resolve()


# ---------------------------------------------------------------------------------- parent side
def child_env(cache_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of a child: this one, on ``cache_dir``, without test-only switches."""
    env = dict(os.environ, ZEROSKIP_CACHE_DIR=str(cache_dir))
    for name in ("ZEROSKIP_STRICT", "ZEROSKIP_DUMP", "ZEROSKIP_BACKEND", "TRITON_INTERPRET"):
        env.pop(name, None)
    env.update(extra)
    return env


def start_child(workload: str, cache_dir: Path, options: dict | None = None,
                session: bool = False, **env: str) -> subprocess.Popen:
    """Start ``workload`` in a fresh Python (``session``: in its own process group)."""
    return subprocess.Popen([sys.executable, str(HERE), workload, json.dumps(options or {})],
                            env=child_env(cache_dir, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=session)


def finish_child(child: subprocess.Popen, timeout: float = 300) -> dict:
    """The child's JSON report, with its exit status and stderr's tail added (killed after
    ``timeout`` seconds: its status is then the kill's)."""
    try:
        out, err = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        child.kill()
        out, err = child.communicate()
        err += f"\n(killed after {timeout} s)"
    lines = out.strip().splitlines()
    report = json.loads(lines[-1]) if child.returncode == 0 and lines else {}
    return {**report, "returncode": child.returncode, "stderr": err[-3000:]}


def run_child(workload: str, cache_dir: Path, options: dict | None = None, **env: str) -> dict:
    return finish_child(start_child(workload, cache_dir, options, **env))


def entry_dirs(cache_dir: Path) -> list[Path]:
    """Folders that look like entries: ``<cache>/<2 hex>/<64 hex>/``."""
    return sorted(p for p in cache_dir.glob("??/*") if p.is_dir() and len(p.name) == 64
                  and p.name[:2] == p.parent.name)


def build_dirs(cache_dir: Path) -> list[Path]:
    """Temporary build folders (``.tmp-<key16>-*``), live or left by a dead builder."""
    return sorted(cache_dir.glob("??/.tmp-*"))


def valid_keys(cache_dir: Path) -> list[str]:
    """Keys of the complete, intact entries, as ``cache.lookup`` judges them."""
    from zeroskip.bench import _cache_dir
    from zeroskip.runtime import cache
    with _cache_dir(str(cache_dir)):
        return [p.name for p in entry_dirs(cache_dir) if cache.lookup(p.name) is not None]


def served_correctly(report: dict) -> bool:
    """Exit 0, no fallback to torch, every result within :data:`TOLERANCE` of torch's."""
    return (report.get("returncode") == 0 and not report.get("warnings")
            and report.get("stats", {}).get("fallback_calls") == 0
            and max_error(report) <= TOLERANCE)


def max_error(report: dict) -> float:
    errors = report.get("errors") or {"missing": float("inf")}
    return max(errors.values())


# ---------------------------------------------------------------------------------- load
def race(cache_dir: Path, processes: int = RACE_PROCESSES) -> dict:
    """``processes`` fresh Pythons released together on one cold cache, each converting the same
    model and running forward and backward: every kernel compiled once in total, every result
    equal to torch's, no build folder left."""
    barrier = cache_dir.parent / f"{cache_dir.name}-barrier"
    barrier.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    children = [start_child("model", cache_dir, {"barrier": str(barrier), "count": processes})
                for _ in range(processes)]
    reports = [finish_child(child) for child in children]
    wall = time.perf_counter() - start
    keys = valid_keys(cache_dir)
    compiles = [r.get("stats", {}).get("compiles", -1) for r in reports]
    # Each process asks for every kernel once: it compiles it or finds it on disk.
    loaded = [r.get("stats", {}).get("compiles", 0) + r.get("stats", {}).get("cache_hits", 0)
              for r in reports]
    checks = {
        "every process exits 0": all(r["returncode"] == 0 for r in reports),
        "every process equals torch, no fallback": all(map(served_correctly, reports)),
        "compiles in total == entries": sum(compiles) == len(keys) > 0,
        "every entry intact": len(keys) == len(entry_dirs(cache_dir)),
        "each process loads every kernel": all(n == len(keys) for n in loaded),
        "no build folder left": not build_dirs(cache_dir),
    }
    return {"checks": checks, "figures": {
        "processes": processes, "kernels": len(keys), "compiles_total": sum(compiles),
        "compiles_per_process": compiles, "max_error": max(map(max_error, reports)),
        "wall_s": wall, "child_seconds": [r.get("seconds") for r in reports],
        "warnings": [w for r in reports for w in r.get("warnings", [])[:1]],
        "stderr": [r["stderr"] for r in reports if r["returncode"] != 0]}}


def soak(cache_dir: Path, calls: int = SOAK_CALLS, grad_calls: int = SOAK_GRAD_CALLS) -> dict:
    """One cached layer called ``calls`` times (and ``grad_calls`` times forward and backward)
    in a fresh process: RSS grows less than :data:`RSS_NOISE_BYTES`, no file descriptor leaks,
    the last results still equal torch's."""
    report = run_child("soak", cache_dir, {"calls": calls, "grad_calls": grad_calls})
    checks = {"exits 0": report["returncode"] == 0}
    loops = report.get("loops", {})
    for name, loop in loops.items():
        checks[f"{name}: RSS growth < {RSS_NOISE_BYTES >> 20} MiB"] = \
            loop["rss_after"] - loop["rss_before"] < RSS_NOISE_BYTES
        checks[f"{name}: open fds unchanged"] = loop["fds_after"] == loop["fds_before"]
    checks["equals torch, no fallback"] = checks["exits 0"] and served_correctly(report)
    return {"checks": checks, "figures": {"loops": loops, "stderr": report["stderr"],
                                          "max_error": max_error(report) if loops else None}}


# ---------------------------------------------------------------------------------- faults
def _warm(cache_dir: Path) -> tuple[str, Path]:
    """Build the fault workload's one kernel into ``cache_dir``; its key and entry."""
    report = run_child("layer", cache_dir)
    assert served_correctly(report) and report["stats"]["compiles"] == 1, report
    (key,) = valid_keys(cache_dir)
    return key, cache_dir / key[:2] / key


# The corruptions test_cache.py inflicts within one process (its functions' names), met here by
# a new process.
CORRUPTIONS = {"truncated kernel.so": "truncate_so", "garbage meta.json": "garbage_meta",
               "half-written build folder": "crashed_build"}


def corrupted_entry(cache_dir: Path, scratch: Path, fault: str) -> dict:
    """Warm the cache, inflict ``fault`` on the entry, then a new process must detect it
    (compile, not hit), rebuild the same key and serve torch's results."""
    import test_cache      # not at the top: children need none of its imports
    key, entry = _warm(cache_dir)
    getattr(test_cache, CORRUPTIONS[fault])(entry)
    injected = valid_keys(cache_dir) == []
    report = run_child("layer", cache_dir)
    stats = report.get("stats", {})
    checks = {
        "injected: the entry is invalid": injected,
        "detected: compiled, not a cache hit": (stats.get("compiles"), stats.get("cache_hits"))
        == (1, 0),
        "rebuilt: the same key is intact": valid_keys(cache_dir) == [key],
        "correct: equal to torch, no fallback": served_correctly(report),
        "clean: no build folder left": not build_dirs(cache_dir),
    }
    return {"checks": checks, "figures": {"fault": fault, "stats": stats,
                                          "max_error": max_error(report),
                                          "stderr": report["stderr"]}}


# A stand-in for the C compiler (ZEROSKIP_CC). `--version` (the compiler's identity, part of
# every cache key) is the real compiler's, so the key is the same whether the stand-in builds,
# dies, or is later replaced by REPAIRED at the same path.
COMPILER_HEADER = """#!/bin/sh
for arg in "$@"; do [ "$arg" = --version ] && exec {real} "$@"; done
"""
KILLED_COMPILER = COMPILER_HEADER + """out=; prev=
for arg in "$@"; do [ "$prev" = -o ] && out=$arg; prev=$arg; done
{real} "$@" || exit
size=$(wc -c < "$out")
truncate -s $((size / 2)) "$out"    # half the library written ...
echo $$ >> {marker}
kill -9 $$                          # ... when the compiler is killed
"""
SLOW_COMPILER = COMPILER_HEADER + """echo $$ >> {marker}      # the build has started
sleep "${{ZEROSKIP_TEST_CC_DELAY:-0}}"
exec {real} "$@"
"""
REPAIRED = COMPILER_HEADER + """exec {real} "$@"
"""


def write_compiler(path: Path, template: str, **fields: str) -> str:
    """Write a stand-in compiler script at ``path``; the ZEROSKIP_CC that runs it."""
    from zeroskip.runtime import cc
    real = shlex.join(cc.compiler()[0])
    path.write_text(template.format(real=real, **{k: shlex.quote(v) for k, v in fields.items()}))
    path.chmod(0o755)
    return shlex.quote(str(path))


def compiler_killed(cache_dir: Path, scratch: Path) -> dict:
    """The C compiler dies by SIGKILL after writing half the library: the call falls back to
    torch with a ZeroskipFallbackWarning and torch's result; no entry, no build folder is left.
    A later process, the compiler repaired, builds that key and serves correct results."""
    wrapper, marker = scratch / "killed-cc", scratch / "compiler-killed"
    compiler = write_compiler(wrapper, KILLED_COMPILER, marker=str(marker))
    killed = run_child("layer", cache_dir, ZEROSKIP_CC=compiler)
    failed = sorted(p.stem for p in (cache_dir / "failed").glob("*.c"))
    warned = killed.get("warnings", [])
    checks = {
        "injected: the compiler died by SIGKILL": marker.exists(),
        "detected: a ZeroskipFallbackWarning, and exit 0": killed["returncode"] == 0
        and bool(warned) and all(w["category"] == "ZeroskipFallbackWarning" for w in warned),
        "detected: the source is kept for the report": len(failed) == 1,
        "correct: the fallback gives torch's result":
        killed.get("stats", {}).get("fallback_calls", 0) >= 1 and max_error(killed) <= TOLERANCE,
        "clean: no entry from the killed build": not entry_dirs(cache_dir),
        "clean: no build folder left": not build_dirs(cache_dir),
    }
    write_compiler(wrapper, REPAIRED)
    later = run_child("layer", cache_dir, ZEROSKIP_CC=compiler)
    checks.update({
        "rebuilt: the later process compiles once": later.get("stats", {}).get("compiles") == 1,
        "rebuilt: the same key is intact": valid_keys(cache_dir) == failed,
        "correct: the rebuilt kernel equals torch, no fallback": served_correctly(later),
        "clean: no build folder left after the rebuild": not build_dirs(cache_dir),
    })
    return {"checks": checks, "figures": {
        "fault": "compiler SIGKILLed mid-compile", "warning": warned[:1],
        "fallback_error": max_error(killed), "stats": later.get("stats"),
        "max_error": max_error(later), "stderr": killed["stderr"] + later["stderr"]}}


def builder_killed(cache_dir: Path, scratch: Path) -> dict:
    """A Python process is SIGKILLed while it holds the key's lock and compiles (a slow
    compiler). A second process, already waiting, gets the lock (an OS lock: the kernel releases
    it), clears the dead builder's folder, builds and serves correct results in bounded time."""
    marker = scratch / "compile-started"
    compiler = write_compiler(scratch / "slow-cc", SLOW_COMPILER, marker=str(marker))
    holder = start_child("layer", cache_dir, session=True, ZEROSKIP_CC=compiler,
                         ZEROSKIP_TEST_CC_DELAY="600")
    waiter = None
    try:
        compiling = _wait_for(marker.exists, BUILDER_DEADLINE_S)
        dead_folders = build_dirs(cache_dir)
        ready = scratch / "waiter-ready"
        waiter = start_child("layer", cache_dir, {"ready": str(ready)}, ZEROSKIP_CC=compiler)
        _wait_for(ready.exists, BUILDER_DEADLINE_S)
        time.sleep(WAITER_HEADSTART_S)       # enough to reach the lock (filelock polls it)
        blocked = waiter.poll() is None and not entry_dirs(cache_dir)
        os.kill(holder.pid, signal.SIGKILL)
        killed_at = time.perf_counter()
        holder.wait(timeout=30)
        report = finish_child(waiter, timeout=BUILDER_DEADLINE_S + 60)
        served_after = time.perf_counter() - killed_at
    finally:
        # The dead builder's compiler (a sleeping orphan in its process group) goes too.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=30)
        if waiter is not None and waiter.poll() is None:    # only if something above raised
            waiter.kill()
            waiter.wait(timeout=30)
    stats = report.get("stats", {})
    checks = {
        "injected: the holder was compiling": compiling and len(dead_folders) == 1,
        "injected: the holder died by SIGKILL": holder.returncode == -signal.SIGKILL,
        "detected: the waiter waited while the holder lived": blocked,
        "rebuilt: the waiter compiled once": (stats.get("compiles"), stats.get("cache_hits"))
        == (1, 0),
        f"rebuilt: served within {BUILDER_DEADLINE_S} s of the kill":
        served_after < BUILDER_DEADLINE_S,
        "rebuilt: one intact entry": len(valid_keys(cache_dir)) == 1 == len(entry_dirs(cache_dir)),
        "clean: the dead builder's folder is cleared": not build_dirs(cache_dir),
        "correct: equal to torch, no fallback": served_correctly(report),
    }
    return {"checks": checks, "figures": {
        "fault": "builder process SIGKILLed holding the lock", "stats": stats,
        "served_after_kill_s": served_after, "max_error": max_error(report),
        "stderr": report["stderr"]}}


# Each fault: (cache_dir, scratch folder) -> result.
FAULTS = {**{name: functools.partial(corrupted_entry, fault=name) for name in CORRUPTIONS},
          "compiler SIGKILLed mid-compile": compiler_killed,
          "builder SIGKILLed holding the lock": builder_killed}


def _wait_for(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def failed_checks(result: dict) -> str:
    """The checks that failed, with the figures, as an assertion message."""
    failed = [name for name, ok in result["checks"].items() if not ok]
    return f"failed: {failed}\nfigures: {json.dumps(result['figures'], indent=1, default=str)}"


# ---------------------------------------------------------------------------------- child side
def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _error(got, want) -> float:
    """Max abs error relative to the largest magnitude of ``want`` (at least 1)."""
    scale = max(1.0, float(want.abs().max()))
    return float((got.detach() - want.detach()).abs().max()) / scale


def _race_model():
    """A small network of several kernel families: ResNet blocks (strided 3x3 and 1x1 convs,
    BatchNorm in eval mode), a transposed conv, a conv whose ReLU ``convert`` fuses."""
    import torch
    from torch import nn

    from zeroskip.models import resnet_stage
    torch.manual_seed(0)
    return nn.Sequential(resnet_stage(8, 16), nn.ConvTranspose2d(16, 8, 4, 2, 1),
                         nn.Conv2d(8, 4, 3, padding=1), nn.ReLU()).eval()


def _model(options: dict) -> dict:
    """Convert the race model, run it forward and backward after the barrier, and compare the
    output, the input gradient and every parameter gradient with torch's."""
    import copy

    import torch

    import zeroskip
    reference = _race_model()
    converted = zeroskip.convert(copy.deepcopy(reference))
    gen = torch.Generator().manual_seed(1)
    x = torch.relu(torch.randn(2, 8, 16, 16, generator=gen))
    _barrier(Path(options["barrier"]), options["count"])
    results = {}
    for name, model in (("torch", reference), ("zeroskip", converted)):
        xi = x.clone().requires_grad_()
        out = model(xi)
        out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(2)))
        results[name] = {"output": out, "input grad": xi.grad,
                         **{f"grad {n}": p.grad for n, p in model.named_parameters()}}
    return {"errors": {name: _error(got, results["torch"][name])
                       for name, got in results["zeroskip"].items()}}


def _barrier(folder: Path, count: int) -> None:
    """Wait until ``count`` processes have arrived (each leaves a file in ``folder``)."""
    (folder / str(os.getpid())).touch()
    if not _wait_for(lambda: len(os.listdir(folder)) >= count, 120):
        raise TimeoutError(f"only {len(os.listdir(folder))} of {count} processes arrived")


LAYER = {"stride": 1, "padding": 1}


def _layer_operands():
    import torch
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, 10, 10, generator=gen), torch.randn(8, 4, 3, 3, generator=gen),
            torch.randn(8, generator=gen))


def _layer(options: dict) -> dict:
    """One conv2d forward call (dense only: one kernel) compared with torch's."""
    import torch.nn.functional as F

    import zeroskip.functional as ZF
    x, w, b = _layer_operands()
    if options.get("ready"):           # about to call: the builder-killed scenario waits on it
        Path(options["ready"]).touch()
    return {"errors": {"output": _error(ZF.conv2d(x, w, b, **LAYER),
                                        F.conv2d(x, w, b, **LAYER))}}


def _soak(options: dict) -> dict:
    """The layer called many times in two loops: plain forward (the direct path) and forward +
    backward through the custom ops; RSS and open files measured around each loop."""
    import gc

    import torch
    import torch.nn.functional as F

    import zeroskip.functional as ZF
    x, w, b = _layer_operands()
    wp, bp = torch.nn.Parameter(w.clone()), torch.nn.Parameter(b.clone())
    xg = x.clone().requires_grad_()
    grad = torch.ones(2, 8, 10, 10)

    def forward():
        return ZF.conv2d(x, w, b, **LAYER)

    def backward():
        xg.grad = wp.grad = bp.grad = None
        ZF.conv2d(xg, wp, bp, **LAYER).backward(grad)

    loops, errors = {}, {}
    for name, step, calls in (("forward", forward, options["calls"]),
                              ("forward+backward", backward, options["grad_calls"])):
        for _ in range(WARMUP_CALLS):
            step()
        gc.collect()
        rss_before, fds_before = _rss_bytes(), _open_fds()
        start = time.perf_counter()
        for _ in range(calls):
            step()
        seconds = time.perf_counter() - start
        gc.collect()
        loops[name] = {"calls": calls, "rss_before": rss_before, "rss_after": _rss_bytes(),
                       "fds_before": fds_before, "fds_after": _open_fds(),
                       "calls_per_s": calls / seconds}
    errors["output"] = _error(forward(), F.conv2d(x, w, b, **LAYER))
    backward()
    xr, wr, br = (t.detach().clone().requires_grad_() for t in (x, w, b))
    F.conv2d(xr, wr, br, **LAYER).backward(grad)
    for name, got, want in (("input grad", xg.grad, xr.grad), ("weight grad", wp.grad, wr.grad),
                            ("bias grad", bp.grad, br.grad)):
        errors[name] = _error(got, want)
    return {"errors": errors, "loops": loops}


WORKLOADS = {"model": _model, "layer": _layer, "soak": _soak}


def child_main(workload: str, options: dict) -> None:
    import warnings

    import zeroskip
    from zeroskip.runtime.stats import ZeroskipFallbackWarning
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ZeroskipFallbackWarning)
        report = WORKLOADS[workload](options)
    report.update(stats=zeroskip.stats(), seconds=time.perf_counter() - start,
                  warnings=[{"category": w.category.__name__, "message": str(w.message)[:500]}
                            for w in caught if issubclass(w.category, ZeroskipFallbackWarning)])
    print(json.dumps(report))


if __name__ == "__main__":
    child_main(sys.argv[1], json.loads(sys.argv[2]))
