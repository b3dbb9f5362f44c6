"""One loader for every target: memo -> dump -> bundle -> cache -> build -> load.

:func:`kernel_for` turns ``(spec, target, variant)`` into a loaded kernel: the compiler
(``codegen.targets.compile``: frontend, passes, plan, source), then an active bundle that holds
that source, else the kernel cache (building it there on a miss), then the target's launcher
loads it. Kernels are memoized per (spec, target, the part of the variant that shapes the
source), so a repeated call skips rendering and hashing. ``ZEROSKIP_DUMP`` writes each source
beside the pipeline's graphs.

A target's runtime half is a module (:mod:`.c_kernel`, :mod:`.triton_kernel`) with
``target()``, ``cache_parts()``, ``build(tmp, compiled)``, ``load(compiled, path)`` and the
``ERRORS`` its build raises; that is all the loader knows of it.
"""
from __future__ import annotations

import os
import queue
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Callable

import torch

from .. import __version__
from ..codegen import emit, pipeline, targets
from ..codegen.ir import IRError
from ..codegen.variant import DEFAULT, Variant
from ..spec import LayerSpec
from . import bundle, c_kernel, cache, env, kernels, stats, timing, triton_kernel, tritonenv
from .kernels import Kernel

# Each target's runtime half (see the module docstring), by backend name.
RUNTIMES = {"c": c_kernel, "triton": triton_kernel}
# Why a kernel could not be built: the call then falls back to torch's op with a warning.
BUILD_ERRORS = (cache.CacheError, emit.TemplateError, IRError, *c_kernel.ERRORS,
                *triton_kernel.ERRORS)


_kernels: dict[tuple, Kernel] = {}
# (identity, default choice) of kernels rendered but not loaded, by memo key (_rendered)
_identities: dict[tuple, tuple[str, str] | None] = {}
_building: dict[tuple, Future] = {}      # kernels some thread is building, by memo key
_lock = threading.Lock()


def _normal(spec: LayerSpec, backend: str, variant: Variant) -> tuple:
    """The memo key of a kernel: the part of the variant that shapes its source."""
    return (spec, backend, RUNTIMES[backend].target().source_variant(variant),
            backend == "triton" and tritonenv.interpreting())


def kernel_for(spec: LayerSpec, backend: str = "c", variant: Variant = DEFAULT) -> Kernel:
    """The loaded kernel of ``spec`` on ``backend`` ('c' or 'triton') as ``variant`` says
    (launch-time knobs aside; kernels take the batch at run time). Threads build different
    kernels at once; one that asks for a kernel another thread is building waits for it.
    Raises one of :data:`BUILD_ERRORS`, or :class:`bundle.BundleError` where an active bundle
    holds it but is refused."""
    key = (spec, backend, variant)   # keyed by the variant as given too: no re-parsing
    kernel = _kernels.get(key)
    if kernel is not None:
        stats.add("memo_hits")
        return kernel
    normal = _normal(spec, backend, variant)
    with _lock:
        kernel = _kernels.get(normal)
        building = _building.get(normal)
        mine = kernel is None and building is None
        if kernel is not None:
            stats.add("memo_hits")
        elif mine:
            building = _building[normal] = Future()
    if kernel is None and not mine:
        kernel = building.result()      # the builder's error, if it failed
    elif mine:
        try:
            kernel = load(normal[0], backend, normal[2])
        except BaseException as exc:
            with _lock:
                del _building[normal]   # a later call tries again (and reports its error)
            building.set_exception(exc)
            raise
        with _lock:
            _kernels[normal] = kernel
            del _building[normal]
        building.set_result(kernel)
    with _lock:
        _kernels[key] = kernel
    return kernel


def _rendered(spec: LayerSpec, backend: str, variant: Variant) -> tuple[str, str] | None:
    """``(identity, default choice)`` of the kernel the compiler makes today for ``spec`` as
    ``variant`` (``Compiled.identity``, ``Target.default_choice``): the loaded kernel's, else
    its source rendered (milliseconds, no compiler), memoized; None where it makes none."""
    normal = _normal(spec, backend, variant)
    target = RUNTIMES[backend].target()
    kernel = _kernels.get(normal)
    if kernel is not None:
        return kernel.identity, target.default_choice(kernel.compiled)
    if normal not in _identities:
        try:
            compiled = targets.compile(spec, target, normal[2])
            _identities[normal] = (compiled.identity, target.default_choice(compiled))
        except (IRError, emit.TemplateError, ValueError):
            _identities[normal] = None
    return _identities[normal]


def identity(spec: LayerSpec, backend: str, variant: Variant) -> str | None:
    """The identity (``Compiled.identity``) of the kernel the compiler makes today for
    ``spec`` as ``variant``, or None where it makes none (:func:`_rendered`). Tuning records
    are true while the kernels they timed have these identities."""
    found = _rendered(spec, backend, variant)
    return None if found is None else found[0]


def default_choice(spec: LayerSpec, backend: str) -> str | None:
    """The variant name an untuned call of ``spec`` runs on ``backend`` ('dense' on C, the
    default config's family on Triton), or None where no kernel covers it."""
    found = _rendered(spec, backend, DEFAULT)
    return None if found is None else found[1]


# Compiling ahead: kernels a layer's next calls may load (its gradients while the forward runs,
# its sparse variant) are built by daemon threads, one per core (each waits on a compiler
# process), so that a call finds them built or waits less. Daemons: a process that ends does
# not wait for them (a build cut short leaves a temporary folder the cache discards).
_ahead: queue.SimpleQueue = queue.SimpleQueue()
_ahead_started: list[threading.Thread] = []
_ahead_left = 0                          # builds queued or running
_ahead_queued: set[tuple] = set()       # their memo keys
_ahead_failed: set[tuple] = set()       # memo keys whose build ahead failed
_ahead_done = threading.Condition(_lock)


def _ahead_worker() -> None:
    global _ahead_left
    while True:
        spec, backend, variant, then = _ahead.get()
        try:
            kernel = kernel_for(spec, backend, variant)
            if then is not None:
                then(kernel)
        except Exception:       # noqa: BLE001 - the call that needs it reports its error
            with _lock:
                _ahead_failed.add(_normal(spec, backend, variant))
        finally:
            with _ahead_done:
                _ahead_left -= 1
                _ahead_queued.discard(_normal(spec, backend, variant))
                _ahead_done.notify_all()


def wait_ahead(timeout: float | None = None) -> bool:
    """Wait until the kernels being compiled ahead are built (for benchmarks and tests);
    False if ``timeout`` seconds passed first."""
    with _ahead_done:
        return _ahead_done.wait_for(lambda: _ahead_left == 0, timeout)


timing.QUIET.append(wait_ahead)     # nothing times a kernel while others compile


def quiet() -> bool:
    """Whether no kernel is being compiled ahead (timings would share the cores with it)."""
    return _ahead_left == 0


def background() -> bool:
    """Whether calls run torch's op while their kernels compile in the background
    (``ZEROSKIP_COMPILE=background``, unless ``ZEROSKIP_STRICT=1``)."""
    return env.get("ZEROSKIP_COMPILE") == "background" and not stats.strict()


def ready(spec: LayerSpec, backend: str = "c", variant: Variant = DEFAULT,
          then: Callable[[Kernel], object] | None = None) -> Kernel | None:
    """The kernel if it is loaded, else None, having started its build in the background
    (``then`` called with it when built). Where a build in the background failed, this builds
    it here: the kernel, or the error :func:`kernel_for` raises (the caller falls back to
    torch's op with its warning, as for any build that fails)."""
    normal = _normal(spec, backend, variant)
    kernel = _kernels.get(normal)
    if kernel is None and normal in _ahead_failed:
        kernel = kernel_for(spec, backend, variant)
        with _lock:
            _ahead_failed.discard(normal)
    elif kernel is None:
        ahead(spec, backend, variant, then, always=True)
    return kernel


def settled(spec: LayerSpec, backend: str = "c", variant: Variant = DEFAULT) -> bool:
    """Whether the kernel is built, or its build in the background failed (:func:`ready`
    then answers at once)."""
    normal = _normal(spec, backend, variant)
    return normal in _kernels or normal in _ahead_failed


def ahead(spec: LayerSpec, backend: str = "c", variant: Variant = DEFAULT,
          then: Callable[[Kernel], object] | None = None, always: bool = False) -> None:
    """Build ``spec``'s kernel in the background unless it is built or being built, then call
    ``then`` with it there (``ZEROSKIP_COMPILE_AHEAD=0``: never, unless ``always``)."""
    if not always and env.get("ZEROSKIP_COMPILE_AHEAD", "1") == "0":
        return
    normal = _normal(spec, backend, variant)
    global _ahead_left
    with _lock:
        if normal in _kernels or normal in _building or normal in _ahead_queued:
            return
        _ahead_queued.add(normal)
        _ahead_left += 1
        if not _ahead_started:
            for _ in range(max(1, os.cpu_count() or 1)):
                worker = threading.Thread(target=_ahead_worker, name="zeroskip-compile-ahead",
                                          daemon=True)
                worker.start()
                _ahead_started.append(worker)
    _ahead.put((spec, backend, variant, then))


def load(spec: LayerSpec, backend: str = "c", variant: Variant = DEFAULT) -> Kernel:
    """:func:`kernel_for` without the memo: compile, then load from a bundle or the cache
    (building it there on a miss)."""
    side = RUNTIMES[backend]
    target = side.target()
    variant = target.source_variant(variant)
    if target.name == "triton":
        tritonenv.triton_version()      # TritonUnavailable before any work where not installed
    dump = os.environ.get("ZEROSKIP_DUMP")
    compiled = targets.compile(spec, target, variant, dump_dir=dump)
    if dump:
        folder = pipeline.dump_folder(spec, Path(dump))
        folder.mkdir(parents=True, exist_ok=True)
        suffix = Path(target.source_file).suffix
        name = "kernel" if target.name == "c" else f"kernel-triton-{compiled.family}"
        if variant != DEFAULT and target.name == "c":
            name += "-" + variant.name.replace("/", "-")
        (folder / f"{name}{suffix}").write_text(compiled.source)
    served = bundle.find(target.name, compiled.source)   # before anything asks for a compiler
    if served is not None:
        stats.add("bundle_hits")
        return side.load(compiled, served)
    parts = side.cache_parts()
    key = cache.make_key(version=__version__, templates=target.template_hash(),
                         source=compiled.source, **parts)
    meta = {"spec": spec.to_dict(), "variant": variant.name, "family": compiled.family,
            "backend": target.name, "version": __version__, **parts}
    try:
        folder, built = cache.fetch(key, meta, lambda tmp: side.build(tmp, compiled))
    except c_kernel.ERRORS as exc:
        raise type(exc)(f"{exc}\n{_keep_failed(key, compiled.source, target)}") from exc
    if not built:
        stats.add("cache_hits")
    return side.load(compiled, folder)


def _keep_failed(key: str, source: str, target: targets.Target) -> str:
    """Keep a source that failed to build where the error message can point (the build
    directory is gone)."""
    kept = cache.cache_dir() / "failed" / f"{key}{Path(target.source_file).suffix}"
    try:
        kept.parent.mkdir(mode=0o700, exist_ok=True)
        kept.write_text(source)
    except OSError as exc:
        return f"(the source could not be kept: {exc.strerror or exc})"
    return f"the source is kept at {kept}"


def loaded() -> list[Kernel]:
    """Every kernel this process has loaded, once each."""
    return list({id(k): k for k in list(_kernels.values())}.values())


def forget_packed() -> None:
    """Drop every cached weight pack (needed only after writing to a frozen weight's memory
    behind torch's back: :func:`.packs.freeze`)."""
    for kernel in loaded():
        kernel.forget_packed()


def run_spec(spec: LayerSpec, tensors: dict[str, torch.Tensor], variant: Variant = DEFAULT,
             backend: str = "c") -> torch.Tensor:
    """Run the kernel of ``spec`` (as ``variant``) on its operands, named as in
    ``spec.input_shapes()``."""
    return kernels.run_named(kernel_for(spec, backend, variant), tensors, variant)
