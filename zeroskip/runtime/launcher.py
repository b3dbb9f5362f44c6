"""The compiled launcher: a C kernel's call in one step from Python, where ctypes takes three.

A call on cached packed weights proves them current (its weight's bytes against the copy the
pack was made from, :mod:`.packs`), allocates the output and runs the kernel. Through ctypes
that is two comparisons and a launch, each a foreign call converting its arguments, plus the
allocation: most of a small layer's call. The launcher is a small C++ extension of torch doing
all of it in one call: it compares (calling the kernel library's own ``zs_same``), allocates
with ``at::empty``, and calls ``zs_run`` with the GIL released. Where a comparison fails it
returns None and the caller takes the ctypes path, which repacks.

It is built once per machine into the kernel cache (:func:`.cache.fetch`, keyed by its source,
the C++ compiler, torch and Python), on a background thread at the first call that could use
it; calls take the ctypes path until it is loaded, and for good where it cannot be built (no
C++ compiler: a deployment serving a bundle) or ``ZEROSKIP_LAUNCHER=0``.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import shlex
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import torch

from .. import __version__
from . import cache, env, stats

NAME = "zeroskip_launcher"
SOURCE = r"""
// zeroskip's launcher: prove a C kernel's packed weights current, allocate, run; one call.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <atomic>
#include <new>

static std::atomic<int64_t> launched{0};     // kernel calls: zeroskip.stats()'s kernel_calls

typedef int (*run_fn)(int64_t, int, const void *, const void *, const void *, void *);
typedef int (*same_fn)(int, const void *, const void *, int64_t);

// None where a comparison fails (the caller repacks); else the output of `shape`.
static at::Tensor run(int64_t run_address, int64_t same_address, int64_t macs_per_sample,
                      int64_t macs_per_thread, const at::Tensor &x, const at::Tensor &packed,
                      const at::Tensor &w, const c10::optional<at::Tensor> &w_copy,
                      const c10::optional<at::Tensor> &b, const c10::optional<at::Tensor> &b_copy,
                      std::vector<int64_t> shape)
{
    auto same = reinterpret_cast<same_fn>(same_address);
    const int threads = at::get_num_threads();
    if (w_copy && !same(threads, w.data_ptr(), w_copy->data_ptr(), w_copy->numel()))
        return at::Tensor();
    if (b && b_copy && !same(1, b->data_ptr(), b_copy->data_ptr(), b_copy->numel()))
        return at::Tensor();
    at::Tensor out = at::empty(shape, x.options());
    if (out.numel()) {
        const int64_t batch = x.size(0);
        const int64_t wanted = 1 + batch * macs_per_sample / macs_per_thread;
        const int use = (int)(wanted < threads ? wanted : threads);
        int status;
        {
            pybind11::gil_scoped_release released;
            status = reinterpret_cast<run_fn>(run_address)(
                batch, use, x.data_ptr(), packed.data_ptr(), w.data_ptr(), out.data_ptr());
        }
        if (status) throw std::bad_alloc();     // MemoryError: out of scratch memory
    }
    launched.fetch_add(1, std::memory_order_relaxed);
    return out;
}

static int64_t calls(bool reset) { return reset ? launched.exchange(0) : launched.load(); }

PYBIND11_MODULE(zeroskip_launcher, m)
{
    m.def("run", &run);
    m.def("calls", &calls);
}
"""

_state: dict = {"module": None, "thread": None, "error": None}
_lock = threading.Lock()


def module():
    """The loaded launcher, or None (not built yet: its build is started in the background;
    unbuildable; or ``ZEROSKIP_LAUNCHER=0``)."""
    if env.get("ZEROSKIP_LAUNCHER") == "0":
        return None
    found = _state["module"]
    if found is not None or _state["error"] is not None:
        return found
    with _lock:
        if _state["thread"] is None:
            _state["thread"] = threading.Thread(target=_build_quietly, daemon=True,
                                                name="zeroskip-launcher")
            _state["thread"].start()
    return None


def _build_quietly() -> None:
    try:
        load()
    except Exception as exc:        # noqa: BLE001 - the ctypes path serves; status() says why
        _state["error"] = f"{type(exc).__name__}: {exc}"


def status() -> str:
    """'off' (``ZEROSKIP_LAUNCHER=0``), 'loaded', 'building', 'not started', or why it could
    not be built."""
    if env.get("ZEROSKIP_LAUNCHER") == "0":
        return "off"
    if _state["module"] is not None:
        return "loaded"
    if _state["error"] is not None:
        return _state["error"]
    thread = _state["thread"]
    return "building" if thread is not None and thread.is_alive() else "not started"


def wait(timeout: float | None = None) -> bool:
    """Wait for a build in the background to end; whether the launcher is loaded."""
    thread = _state["thread"]
    if thread is not None:
        thread.join(timeout)
    return _state["module"] is not None


def ready(timeout: float = 300.0) -> str:
    """Start the build if it has not started and wait for it (benchmarks time the calls as
    they will run); :func:`status` after."""
    module()
    wait(timeout)
    return status()


def _compiler() -> tuple[str, ...]:
    return tuple(shlex.split(os.environ.get("CXX", "") or "c++"))


def _flags() -> list[str]:
    from torch.utils import cpp_extension
    libraries = cpp_extension.library_paths()
    return ["-O2", "-std=c++17", "-shared", "-fPIC", "-w",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            "-DTORCH_API_INCLUDE_EXTENSION_H", f"-DTORCH_EXTENSION_NAME={NAME}",
            *(f"-I{p}" for p in cpp_extension.include_paths()),
            f"-I{sysconfig.get_paths()['include']}",
            *(f"-L{p}" for p in libraries), *(f"-Wl,-rpath,{p}" for p in libraries),
            "-lc10", "-ltorch", "-ltorch_cpu", "-ltorch_python"]


def load():
    """Build the launcher into the kernel cache (or find it there) and load it."""
    compiler, flags = _compiler(), _flags()
    parts = {"version": __version__, "source": SOURCE, "compiler": list(compiler),
             "flags": flags, "torch": torch.__version__, "python": sys.version}
    key = cache.make_key(launcher=True, **parts)

    def build(tmp: Path) -> list[str]:
        (tmp / "launcher.cpp").write_text(SOURCE)
        done = subprocess.run([*compiler, str(tmp / "launcher.cpp"), "-o",
                               str(tmp / f"{NAME}.so"), *flags],
                              capture_output=True, text=True, timeout=600)
        if done.returncode:
            raise RuntimeError(f"building the launcher failed: {done.stderr[-2000:]}")
        return ["launcher.cpp", f"{NAME}.so"]
    folder, _ = cache.fetch(key, {"launcher": True, "torch": torch.__version__}, build)
    path = folder / f"{NAME}.so"
    spec = importlib.util.spec_from_loader(
        NAME, importlib.machinery.ExtensionFileLoader(NAME, str(path)))
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    with _lock:
        if _state["module"] is None:     # its calls count as kernel_calls (once)
            stats.SOURCES.append(lambda reset: {"kernel_calls": loaded.calls(reset)})
            _state["module"] = loaded
    return _state["module"]
