"""Ahead-of-time kernels: ``zeroskip generate`` compiles every kernel some layers need into a
bundle (:func:`make_bundle`; served by :mod:`zeroskip.runtime.bundle`): C kernels for this
machine, and Triton kernels for GPU targets written out with what they use (:func:`generate`).

For every layer, dtype and target, :func:`generate` builds the layer's Triton kernels (the
dense ``direct`` family and the ``block_sparse`` one for a forward conv or transposed conv,
and with ``include_grads`` the input- and weight-gradient kernels), compiles each with its
default config for the target (no GPU needed, :func:`zeroskip.runtime.triton_kernel.compile_for_target`)
and writes::

    <out>/<target>/<layer>/<kernel>.py       the generated Triton module
    <out>/<target>/<layer>/<kernel>.ptx
    <out>/<target>/<layer>/<kernel>.cubin
    <out>/meta.json                          every kernel: config, registers, shared memory,
                                             spills, whether it fits, files and their sha256

``<kernel>`` is ``<role>-<family>-<dtype>``, e.g. ``forward-block_sparse-float16`` (and
``-channels_last`` for kernels specialized on channels-last tensors); ``<role>`` is
``forward``, ``grad_input`` or ``grad_weight``. Kernels compile in worker processes. A kernel
that fails to build or compile is recorded with its error; one that spills registers or needs
more shared memory than the target has is *reported* (``meta["reported"]``).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import multiprocessing
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

from . import __version__
from .spec import LayerSpec, Workload

GENERATE_BACKENDS = ("triton",)
FORWARD = ("conv", "conv_transpose")
ROLES = ("forward", "grad_input", "grad_weight")
LAYOUTS = ("contiguous", "channels_last")
MAX_ERROR = 8000                      # characters of a compile error kept in meta.json


@dataclasses.dataclass(frozen=True)
class Task:
    """One kernel to compile for one target."""

    layer: str            # the layer's name
    folder: str           # its folder name under <out>/<target>/
    role: str             # forward, grad_input or grad_weight
    strategy: str         # dense or sparse (kernel_for's strategy)
    spec: LayerSpec
    target: str
    layout: str = "contiguous"    # or channels_last: the tensors' memory layout

    @property
    def family(self) -> str:
        if self.spec.op == "conv_grad_weight":
            return "weight_grad"
        return "block_sparse" if self.strategy == "sparse" else "direct"

    @property
    def name(self) -> str:
        suffix = "" if self.layout == "contiguous" else f"-{self.layout}"
        return f"{self.role}-{self.family}-{self.spec.dtype}{suffix}"


def slug(name: str) -> str:
    """A folder name for a layer name: letters, digits, '.', '_' and '-' only."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")
    return text or "layer"


def _folders(names: list[str]) -> list[str]:
    """A distinct :func:`slug` per layer (a numeric suffix where two collide)."""
    seen: set[str] = set()          # case-insensitively: folders on macOS and Windows
    folders = []
    for name in names:
        base = slug(name)
        folder, n = base, 1
        while folder.lower() in seen:
            n += 1
            folder = f"{base}-{n}"
        seen.add(folder.lower())
        folders.append(folder)
    return folders


def plan(layers: Iterable[tuple[str, LayerSpec]], targets: Iterable[str] = ("sm_90",),
         dtypes: Iterable[str] | None = ("float32",), include_grads: bool = True,
         layouts: Iterable[str] = ("contiguous",)) -> tuple[list[Task], list[dict]]:
    """The kernels to compile, in the order meta.json lists them, and the kernels skipped
    (a gradient no spec can state, a dtype Triton has no kernels for) with the reason.
    ``dtypes`` None: each layer's own."""
    from .runtime.triton_kernel import TORCH_DTYPES
    layers = list(layers)
    targets, layouts = list(targets), list(layouts)
    tasks: list[Task] = []
    skipped: list[dict] = []
    for (name, spec), folder in zip(layers, _folders([n for n, _ in layers])):
        for dtype in (spec.dtype,) if dtypes is None else dtypes:
            typed = dataclasses.replace(spec, dtype=dtype)
            if dtype not in TORCH_DTYPES:
                skipped.append({"layer": name, "role": "every", "dtype": dtype,
                                "spec": typed.describe(),
                                "reason": f"Triton kernels cover {', '.join(TORCH_DTYPES)}"})
                continue
            kernels: list[tuple[str, str, LayerSpec]] = []
            if typed.op in FORWARD:
                kernels += [("forward", "dense", typed), ("forward", "sparse", typed)]
                if include_grads:
                    for role, derive in (("grad_input", typed.grad_input),
                                         ("grad_weight", typed.grad_weight)):
                        try:
                            kernels.append((role, "dense", derive()))
                        except ValueError as exc:
                            skipped.append({"layer": name, "role": role, "dtype": dtype,
                                            "spec": typed.describe(),
                                            "reason": f"{type(exc).__name__}: {exc}"})
            else:       # a gradient operator named in the layers file: its dense kernel
                role = {"conv_grad_input": "grad_input",
                        "conv_grad_weight": "grad_weight"}.get(typed.op, "forward")
                kernels.append((role, "dense", typed))
            for target in targets:
                tasks += [Task(name, folder, role, strategy, kspec, target, layout)
                          for role, strategy, kspec in kernels for layout in layouts]
    return tasks, skipped


# --------------------------------------------------------------------------------- compiling
# Triton picks its interpreter or its compiler once, when first imported (TRITON_INTERPRET): a
# process that imported it for the interpreter (as the test suite does) cannot compile for a
# GPU, so kernels compile in worker processes started without TRITON_INTERPRET, or here only
# where Triton is (or will be) imported for compiling.
_QUIET = ".*TRITON_DEFAULT_FP_FUSION.*"


def compile_task(task: Task) -> dict[str, Any]:
    """Build and compile one kernel (in a worker process or in this one): ``ptx``, ``cubin``,
    ``source`` and ``meta``, or ``error`` where building or compiling it failed."""
    from .codegen.variant import Variant
    from .runtime import loader, triton_kernel
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_QUIET)
        start = time.perf_counter()
        try:
            kernel = loader.kernel_for(task.spec, "triton", Variant(task.strategy))
            done = triton_kernel.compile_for_target(kernel, task.target,
                                         channels_last=task.layout == "channels_last")
            done["source"] = kernel.source.read_text()
            done["seconds"] = time.perf_counter() - start
            return done
        except Exception as exc:     # IRError, TemplateError, CompilationError, backends' own
            text = f"{type(exc).__name__}: {exc}".strip()
            if len(text) > MAX_ERROR:
                text = text[:MAX_ERROR // 2] + "\n...\n" + text[-MAX_ERROR // 2:]
            return {"error": text}


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)        # before this worker imports triton
    warnings.filterwarnings("ignore", message=_QUIET)


@contextlib.contextmanager
def _without_interpreter():
    """TRITON_INTERPRET unset while worker processes start (they inherit the environment)."""
    saved = os.environ.pop("TRITON_INTERPRET", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["TRITON_INTERPRET"] = saved


def compile_all(tasks: list[Task], jobs: int = 2, progress: bool = False) -> list[dict]:
    """Every task's :func:`compile_task` result, in order: on ``jobs`` worker processes (spawned:
    nothing of this process is forked into them), or in this one where ``jobs`` is 1 and
    Triton here is not the interpreter's (else on one worker)."""
    from tqdm import tqdm

    from .runtime import tritonenv
    results: list[dict | None] = [None] * len(tasks)
    bar = tqdm(total=len(tasks), desc="compiling", unit="kernel", disable=not progress,
               file=sys.stderr)

    def done(i: int, result: dict) -> None:
        results[i] = result
        bar.set_postfix_str(f"{tasks[i].layer} {tasks[i].name} {tasks[i].target}",
                            refresh=False)
        bar.update()

    with bar:
        if jobs <= 1 and not tritonenv.interpreting():
            for i, task in enumerate(tasks):
                done(i, compile_task(task))
            return results
        context = multiprocessing.get_context("spawn")
        with _without_interpreter():
            pool = concurrent.futures.ProcessPoolExecutor(
                max(1, min(jobs, len(tasks))), mp_context=context, initializer=_worker_init)
            futures = {pool.submit(compile_task, task): i for i, task in enumerate(tasks)}
        try:
            for future in concurrent.futures.as_completed(futures):
                try:
                    result = future.result()
                except Exception as exc:      # a worker died (BrokenProcessPool): record it
                    result = {"error": f"{type(exc).__name__}: {exc}"}
                done(futures[future], result)
        except BaseException:                 # Ctrl-C: drop the queued compiles, not wait
            pool.shutdown(wait=False, cancel_futures=True)
            raise
        pool.shutdown()
    return results


# --------------------------------------------------------------------------------- writing
def _write(path: Path, data: bytes, out_dir: Path) -> dict[str, Any]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"path": path.relative_to(out_dir).as_posix(),
            "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def problems(record: dict) -> list[str]:
    """Why a compiled kernel is reported: it spills registers, or needs more shared memory
    than its target has."""
    found = []
    if record.get("spill_bytes"):
        found.append(f"spills {record['spill_bytes']} bytes")
    if record.get("shared_bytes", 0) > record.get("shared_limit", float("inf")):
        found.append(f"needs {record['shared_bytes']} bytes of shared memory, "
                     f"{record['target']} has {record['shared_limit']}")
    return found


def generate(layers: Iterable[tuple[str, LayerSpec]], out_dir: Path | str,
             backend: str = "triton", targets: Iterable[str] = ("sm_90",),
             dtypes: Iterable[str] | None = ("float32",), include_grads: bool = True,
             progress: bool = True, jobs: int = 2,
             layouts: Iterable[str] = ("contiguous",)) -> dict[str, Any]:
    """Compile every kernel of ``layers`` (``(name, spec)`` pairs) for every target and dtype
    (``dtypes`` None: each layer's own) into ``out_dir`` and write ``out_dir/meta.json``;
    returns what it holds.

    ``layouts``: 'contiguous' and/or 'channels_last', the tensors' memory layout (a kernel is
    specialized on its strides). ``jobs``: worker processes compiling. ``meta["kernels"]``
    lists each kernel (``status`` 'ok' or 'error' with the ``error``),
    ``meta["failed"]`` counts those that did not compile, ``meta["reported"]`` names those that
    spill or exceed shared memory, ``meta["skipped"]`` the gradients no spec can state.
    Raises ValueError for an unknown backend, target, dtype or layout (before compiling), or
    :class:`~zeroskip.runtime.tritonenv.TritonUnavailable`.
    """
    from .runtime import tritonenv
    from .runtime.triton_kernel import TARGETS, TORCH_DTYPES
    from .spec import DTYPES
    if backend not in GENERATE_BACKENDS:
        raise ValueError(f"backend must be one of {list(GENERATE_BACKENDS)}, "
                         f"got {backend!r}")
    targets = list(dict.fromkeys(targets))
    dtypes = None if dtypes is None else list(dict.fromkeys(dtypes))
    for target in targets:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    for dtype in dtypes or ():
        if dtype not in TORCH_DTYPES or dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(TORCH_DTYPES)}, got {dtype!r}")
    layouts = list(dict.fromkeys(layouts))
    for layout in layouts:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {list(LAYOUTS)}, got {layout!r}")
    triton_version = tritonenv.triton_version()
    out_dir = Path(out_dir)
    layers = list(layers)
    tasks, skipped = plan(layers, targets, dtypes, include_grads, layouts)
    results = compile_all(tasks, jobs, progress)

    kernels = []
    for task, result in zip(tasks, results):
        record: dict[str, Any] = {
            "layer": task.layer, "folder": task.folder, "kernel": task.name, "role": task.role,
            "family": task.family, "dtype": task.spec.dtype, "target": task.target,
            "layout": task.layout, "spec": task.spec.describe(),
            "spec_fields": task.spec.to_dict(),
            "triton": triton_version, "zeroskip": __version__}
        if "error" in result:
            record.update(status="error", error=result["error"])
            kernels.append(record)
            continue
        meta = result["meta"]
        record.update({key: meta[key] for key in ("config", "layout", "registers",
                                                  "shared_bytes", "shared_limit",
                                                  "spill_bytes", "fits")})
        record["status"] = "ok"
        if "seconds" in result:         # building and compiling, Triton's cache cold or warm
            record["compile_seconds"] = round(result["seconds"], 2)
        folder = out_dir / task.target / task.folder
        record["files"] = {
            kind: _write(folder / f"{task.name}.{ext}", data, out_dir)
            for kind, ext, data in (("source", "py", result["source"].encode()),
                                    ("ptx", "ptx", result["ptx"].encode()),
                                    ("cubin", "cubin", result["cubin"]))}
        record["problems"] = problems(record)
        kernels.append(record)

    meta = {
        "backend": backend, "targets": targets,
        "dtypes": dtypes or sorted({t.spec.dtype for t in tasks}), "layouts": layouts,
        "include_grads": include_grads, "triton": triton_version, "zeroskip": __version__,
        "layers": [{"name": name, "folder": folder, "spec": spec.describe()}
                   for (name, spec), folder in zip(layers, _folders([n for n, _ in layers]))],
        "kernels": kernels,
        "failed": sum(k["status"] == "error" for k in kernels),
        "reported": [f"{k['target']}/{k['folder']}/{k['kernel']}" for k in kernels
                     if k.get("problems")],
        "skipped": skipped,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return meta


# --------------------------------------------------------------------------------- bundles
def c_kernels(spec: LayerSpec, choices: dict[str, Iterable[str]] | Iterable[str] = (),
              include_grads: bool = True) -> tuple[list[tuple[str, str, LayerSpec]], list[dict]]:
    """``(role, variant name, spec)`` of every C kernel a layer's calls may load: the forward
    dense kernel, its sparse variant where the cost model may pick it, and the input and
    weight gradients', each with the tuned ``choices`` (by role; an iterable: the forward's);
    and the gradients no spec can state, with the reason."""
    from .codegen import lower
    from .runtime import dispatch, loader
    served = spec       # the layer's shape: what the runtime compiles for its calls
    if served.op not in FORWARD:
        role = {"conv_grad_input": "grad_input", "conv_grad_weight": "grad_weight"}[served.op]
        return [(role, lower.DEFAULT.name, served)], []
    if not isinstance(choices, dict):
        choices = {"forward": choices}
    tuned = {role: {c for c in choices.get(role, ()) if c not in ("torch", lower.DEFAULT.name,
                                                                  "dense")}
             for role in ROLES}
    names = set(dispatch.next_variants(served, loader.kernel_for(served))) | tuned["forward"]
    kernels = [("forward", lower.DEFAULT.name, served)]
    kernels += [("forward", name, served) for name in sorted(names)]
    skipped = []
    if include_grads:
        for role, derive in (("grad_input", served.grad_input), ("grad_weight",
                                                                   served.grad_weight)):
            try:
                grad = derive()
            except ValueError as exc:
                skipped.append({"role": role, "spec": served.describe(),
                                "reason": f"{type(exc).__name__}: {exc}"})
                continue
            kernels.append((role, lower.DEFAULT.name, grad))
            # What dispatch may load for it untuned.
            kernels += [(role, name, grad) for name in sorted(
                set(dispatch.next_variants(grad, loader.kernel_for(grad))) | tuned[role])]
    return kernels, skipped


def _private(path: Path) -> None:
    """Folders 0755 and files 0644 under ``path``: readable by a service user, writable only
    by their owner (a bundle with a group- or world-writable file is refused)."""
    for item in [path, *path.rglob("*")]:
        item.chmod(0o755 if item.is_dir() else 0o644)


def make_bundle(layers: Iterable[tuple[str, LayerSpec, Workload]], out_dir: Path | str,
                backends: Iterable[str] = ("c",), targets: Iterable[str] = ("sm_90",),
                tune: bool = False, include_grads: bool = True, progress: bool = True,
                jobs: int = 2, layouts: Iterable[str] = ("contiguous",),
                dtypes: Iterable[str] | None = None) -> dict[str, Any]:
    """Compile (and with ``tune``, tune on this machine at each layer's traced workload) every
    kernel ``layers`` (``(name, spec, workload)``, as ``trace.read_layers`` gives them) need
    into the bundle directory ``out_dir`` (see :mod:`zeroskip.runtime.bundle`); returns its
    manifest.

    The bundle is written beside ``out_dir`` and moved into place when complete; an existing
    ``out_dir`` is replaced only if it is an empty folder or a bundle. A C kernel that fails to
    build raises (:data:`zeroskip.runtime.loader.BUILD_ERRORS`); Triton kernels that fail to
    compile for a target are listed in ``triton/meta.json`` as ``generate`` does. ``dtypes``:
    the Triton kernels' (None: each layer's own); C kernels cover float32 and float64 layers
    (others are listed as skipped)."""
    import datetime
    import shutil
    import tempfile

    import torch

    from .runtime import bundle
    from .trace import FORMAT, VERSION, write_layers
    backends = list(dict.fromkeys(backends))
    for backend in backends:
        if backend not in bundle.KERNEL_BACKENDS:
            raise ValueError(f"backend must be among {list(bundle.KERNEL_BACKENDS)}, "
                             f"got {backend!r}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / bundle.MANIFEST).is_file() and \
            (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir} exists and is not a bundle: not replacing it")
    layers = [(name, spec, work) for name, spec, work in layers]
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        manifest: dict[str, Any] = {
            "format": bundle.FORMAT, "version": bundle.VERSION, "zeroskip": __version__,
            "torch": torch.__version__,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                timespec="seconds"),
            "machine": bundle.machine(), "backends": backends, "targets": [],
            "layers": [{"name": name, "spec": spec.to_dict(), **work.to_dict()}
                       for name, spec, work in layers],
            "kernels": [], "skipped": [], "tuning_machine": None}
        write_layers({"format": FORMAT, "version": VERSION,
                      "layers": [{"name": name, "batch": work.batch,
                                  "density": {"mean": work.density},
                                  "grad_density": {"mean": work.grad_density},
                                  "spec": spec.to_dict()}
                                 for name, spec, work in layers]}, tmp / "layers.json")
        if "c" in backends:
            _bundle_c(tmp, layers, manifest, tune, include_grads, progress)
        if "triton" in backends:
            _bundle_triton(tmp, layers, manifest, list(dict.fromkeys(targets)),
                           None if dtypes is None else list(dtypes), include_grads, progress,
                           jobs, list(layouts))
            if tune:
                _tune_triton(tmp, layers, manifest, include_grads, progress)
        _private(tmp)
        manifest["files"] = {path.relative_to(tmp).as_posix(): hashlib.sha256(
            path.read_bytes()).hexdigest() for path in sorted(tmp.rglob("*")) if path.is_file()}
        (tmp / bundle.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        (tmp / bundle.MANIFEST).chmod(0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _bundle_c(tmp: Path, layers: list[tuple[str, LayerSpec, Workload]], manifest: dict,
              tune: bool,
              include_grads: bool, progress: bool) -> None:
    """Build (tune) every C kernel of ``layers`` on this machine into ``tmp/c/<key>/``."""
    import shutil

    from tqdm import tqdm

    from .codegen.variant import Variant
    from .runtime import autotune, bundle, cc, loader, tuning
    from .runtime.arguments import COVERED_DTYPES
    command, flags = cc.compiler()
    manifest["machine"].update(compiler=cc.identity(command), flags=list(flags))
    db = tuning.TuningDB(tmp / "tuning.json") if tune else None
    for name, spec, work in tqdm(layers, desc="C kernels", unit="layer", disable=not progress,
                           file=sys.stderr):
        if spec.dtype not in COVERED_DTYPES['c'].values():
            manifest["skipped"].append({
                "layer": name, "role": "every", "spec": spec.describe(),
                "reason": f"C kernels cover {', '.join(COVERED_DTYPES['c'].values())}"})
            continue
        choices: dict[str, set[str]] = {role: set() for role in ROLES}
        if db is not None and spec.op in FORWARD:   # at the batch and densities traced
            for role, op_spec, density in autotune.operator_cases(spec, work, include_grads):
                result = autotune.tune(op_spec, density, batch=work.batch)
                db.record(op_spec, density, result.choice, result.ms, batch=work.batch,
                          kernels=result.kernels)
                choices[role].add(result.choice)
        kernels, skipped = c_kernels(spec, choices, include_grads)
        manifest["skipped"] += [{"layer": name, **s} for s in skipped]
        for role, variant, kspec in kernels:
            kernel = loader.kernel_for(kspec, "c", Variant.parse(variant))
            source = kernel.source.read_text()
            key = bundle.kernel_key("c", source)
            folder = tmp / "c" / key
            if not folder.exists():
                folder.mkdir(parents=True)
                (folder / "kernel.c").write_text(source)
                shutil.copyfile(kernel.folder / "kernel.so", folder / "kernel.so")
            manifest["kernels"].append({
                "backend": "c", "layer": name, "role": role, "variant": variant,
                "spec": kspec.to_dict(), "key": key,
                "files": [f"c/{key}/kernel.c", f"c/{key}/kernel.so"],
                "load": f"c/{key}/kernel.so"})
    if db is not None:
        db.save()
        (tmp / "tuning.json.lock").unlink(missing_ok=True)
        manifest["tuning_machine"] = db.here
        manifest.setdefault("tuning_machines", {})["c"] = db.here


def _tune_triton(tmp: Path, layers: list[tuple[str, LayerSpec, Workload]], manifest: dict,
                 include_grads: bool, progress: bool) -> None:
    """Tune each layer's Triton operators (forward and gradients, at the traced workload) on
    this machine's GPU, or under Triton's interpreter where it runs (``TRITON_INTERPRET=1``:
    how tests run it), into the bundle's ``tuning.json`` under the GPU's fingerprint; where
    neither runs, the manifest says why none was tuned."""
    import torch
    from tqdm import tqdm

    from .runtime import autotune, tritonenv, tuning
    from .runtime.triton_kernel import TORCH_DTYPES
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    problem = tritonenv.problem(device)
    if problem:
        manifest["triton_tuning"] = f"not tuned: {problem}"
        return
    db = tuning.TuningDB(tmp / "tuning.json")
    cases = [(name, role, op_spec, density, work.batch) for name, spec, work in layers
             if spec.op in FORWARD and spec.dtype in TORCH_DTYPES
             for role, op_spec, density in autotune.operator_cases(spec, work, include_grads)]
    for name, role, op_spec, density, batch in tqdm(cases, desc="Triton tuning", unit="case",
                                                    disable=not progress, file=sys.stderr):
        autotune.tune_triton(op_spec, density, device, db=db, save=False, batch=batch)
    db.save()
    (tmp / "tuning.json.lock").unlink(missing_ok=True)
    machine, print_ = tuning.machine_of("triton", device)
    manifest.setdefault("tuning_machines", {})["triton"] = machine
    manifest["triton_tuning"] = f"tuned on {print_['gpu']}"


def _bundle_triton(tmp: Path, layers: list[tuple[str, LayerSpec, Workload]], manifest: dict,
                   targets: list[str], dtypes: list[str] | None, include_grads: bool,
                   progress: bool, jobs: int, layouts: list[str]) -> None:
    """Compile every Triton kernel of ``layers`` for ``targets`` into ``tmp/triton/``
    (:func:`generate`), each indexed by the key of its source."""
    from .runtime import bundle, tritonenv
    manifest["machine"]["triton"] = tritonenv.triton_version()
    manifest["targets"] = targets
    meta = generate([(name, spec) for name, spec, _ in layers], tmp / "triton",
                    targets=targets, dtypes=dtypes, include_grads=include_grads,
                    progress=progress, jobs=jobs, layouts=layouts)
    manifest["skipped"] += meta["skipped"]
    manifest["triton_failed"] = meta["failed"]
    for k in meta["kernels"]:
        if k["status"] != "ok":
            continue
        source = f"triton/{k['files']['source']['path']}"
        manifest["kernels"].append({
            "backend": "triton", "layer": k["layer"], "role": k["role"],
            "variant": k["family"], "target": k["target"], "layout": k["layout"],
            "spec": k["spec_fields"], "files": [f"triton/{f['path']}"
                                                for f in k["files"].values()],
            "load": source, "key": bundle.kernel_key("triton", (tmp / source).read_text())})


# --------------------------------------------------------------------------------- report
def table(meta: dict[str, Any]) -> str:
    """Every kernel as a markdown row, then the kernels reported and those that failed."""
    lines = ["| layer | kernel | family | dtype | target | config | regs | smem KB | spills "
             "| fits |", "|---|---|---|---|---|---|---:|---:|---:|---|"]
    for k in meta["kernels"]:
        role = k["role"] + (f" ({k['layout']})" if k["layout"] != "contiguous" else "")
        if k["status"] != "ok":
            lines.append(f"| {k['layer']} | {role} | {k['family']} | {k['dtype']} | "
                         f"{k['target']} | | | | | FAILED |")
            continue
        lines.append(f"| {k['layer']} | {role} | {k['family']} | {k['dtype']} | "
                     f"{k['target']} | {k['config']} | {k['registers']} | "
                     f"{k['shared_bytes'] / 1024:.1f} | {k['spill_bytes']} | "
                     f"{'yes' if k['fits'] else 'NO'} |")
    ok = sum(k["status"] == "ok" for k in meta["kernels"])
    lines.append(f"\n{ok} of {len(meta['kernels'])} kernels compiled "
                 f"(Triton {meta['triton']}, zeroskip {meta['zeroskip']})")
    reported = [k for k in meta["kernels"] if k.get("problems")]
    if reported:
        lines.append(f"\nreported: {len(reported)} kernel(s) spill registers or exceed shared "
                     "memory:")
        lines += [f"  {k['target']}/{k['folder']}/{k['kernel']}: {'; '.join(k['problems'])}"
                  for k in reported]
    failed = [k for k in meta["kernels"] if k["status"] != "ok"]
    if failed:
        lines.append(f"\nfailed: {len(failed)} kernel(s) did not compile:")
        for k in failed:
            first = k["error"].strip().splitlines()[0] if k["error"].strip() else "?"
            lines.append(f"  {k['target']}/{k['folder']}/{k['kernel']}: {first[:300]}")
    for s in meta["skipped"]:
        what = "kernels" if s["role"] == "every" else f"{s['role']} kernel"
        lines.append(f"note: skipped the {what} of {s['layer']} ({s['dtype']}): {s['reason']}")
    return "\n".join(lines)


__all__ = ["generate", "make_bundle", "c_kernels", "plan", "compile_all",
           "compile_task", "table", "problems", "Task", "GENERATE_BACKENDS", "LAYOUTS"]
