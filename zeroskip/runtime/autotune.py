"""Autotuning: candidates, timing, and the tuning database.

For a layer and a density, the candidates are torch's own op and each generated kernel variant
that applies: the dense kernel at its heuristic tile and at other tile widths, and the sparse
kernel (compressed-pattern gather) at several channel-tile sizes. Each candidate runs once on
an input of that density and is compared with torch; a candidate that fails to build, raises or
differs scores ``inf`` (with the reason kept), never stopping the tuning. The rest are timed in
interleaved rounds after a warm-up, and the median decides.

Choices persist in a :class:`TuningDB`: one JSON file (``ZEROSKIP_TUNING_DB``, by default
``tuning.json`` in the cache directory), readable and mergeable across machines. Records are
filed under a machine fingerprint (CPU model and ISA, threads, compiler, zeroskip and torch
versions); lookups see only the fingerprint of this process, so a record tuned elsewhere is kept
but never used here. A corrupt file is set aside (``.corrupt``) with a warning and rebuilt.

Densities are recorded in :data:`BUCKETS` (the smallest at or above the tuned density); a
measured density uses the record tuned nearest to it.

Triton kernels are tuned per GPU (:func:`tune_triton`): the candidates are torch's op (cuDNN)
and each (family, config) of the layer's Triton kernels (:func:`triton_candidates`), checked
against torch, dropped where the compiled kernel spills registers or exceeds shared memory,
and timed with ``triton.testing.do_bench``. Their choices go into the same database, filed under
a GPU fingerprint (:func:`gpu_fingerprint`: GPU, compute capability, SMs, Triton, CUDA, torch,
zeroskip, TF32); :func:`gpu_records` is what the GPU dispatch reads. Under Triton's interpreter
(``TRITON_INTERPRET=1``, CPU tensors) the same runs on a CPU device, filed under a machine of
its own (``{"gpu": "triton-interpreter"}``): that is how it is tested without a GPU.
"""
from __future__ import annotations

import dataclasses
import datetime
import ctypes
import functools
import gc
import hashlib
import itertools
import json
import math
import os
import statistics
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

from .. import __version__
from ..codegen import lower
from ..spec import LayerSpec
from . import cache, cc, stats

BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
FORMAT = 1
MIN_TIME_S = 0.02      # every timed loop lasts at least this long
REPEATS = 7
BUSY = 0.1             # share of the CPUs other processes may take while timing
TOLERANCE = 1e-4       # a candidate's max error, relative to the largest magnitude of torch's
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3     # glibc's mallopt parameters


class ZeroskipTuningWarning(UserWarning):
    """The tuning database could not be read and was rebuilt."""


def bucket(density: float) -> float:
    """The smallest bucket at or above ``density``."""
    return next((b for b in BUCKETS if density <= b + 1e-9), 1.0)


def nearest(layer: dict[str, dict] | None, density: float) -> dict | None:
    """Of a layer's records (by bucket), the one tuned at the density nearest ``density`` by
    ratio: a measured 0.302 uses the record of 0.3, not the untuned bucket 0.4."""
    if not layer:
        return None
    d = max(density, 1e-3)
    return layer[min(layer, key=lambda b: abs(math.log(max(float(b), 1e-3) / d)))]


# --------------------------------------------------------------------------------- timing
def _loop(fn: Callable[[], object], calls: int) -> float:
    """Seconds taken by ``calls`` calls of ``fn``, with the garbage collector off."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        return time.perf_counter() - start
    finally:
        if enabled:
            gc.enable()


def _calibrate(fn: Callable[[], object], min_time: float) -> int:
    """Calls per loop so that a loop lasts ``min_time`` (doubling: also the warm-up)."""
    calls = 1
    while _loop(fn, calls) < min_time:
        calls *= 2
    return calls


def _cpu_seconds() -> tuple[float, float] | None:
    """``(CPU seconds every process used, CPU seconds this process used)`` so far; None where
    ``/proc/stat`` is missing."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    own = os.times()
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK"), \
        own.user + own.system


def busy(contention: float | None) -> bool:
    """Whether other processes took so much CPU during a timing that it is unreliable."""
    return contention is not None and contention > BUSY


@dataclass
class Timing:
    """Median seconds per call of each function, and the contention meanwhile: the share of
    the CPUs the timed threads needed that other processes (or the hypervisor) took, beyond
    the CPUs the timed threads leave idle; above :data:`BUSY`, the figures are unreliable."""

    seconds: dict[str, float]
    contention: float | None


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int = REPEATS,
                     min_time: float = MIN_TIME_S) -> Timing:
    """Time each function in alternating rounds, after a warm-up."""
    calls = {name: _calibrate(fn, min_time) for name, fn in fns.items()}
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    cpu, start = _cpu_seconds(), time.perf_counter()
    for round_ in range(repeats):
        for name in order if round_ % 2 == 0 else order[::-1]:
            samples[name].append(_loop(fns[name], calls[name]) / calls[name])
    wall, cpu_end = time.perf_counter() - start, _cpu_seconds()
    contention = None
    if cpu and cpu_end:
        threads = torch.get_num_threads()
        others = ((cpu_end[0] - cpu[0]) - (cpu_end[1] - cpu[1])) / wall
        spare = max(0, (os.cpu_count() or 1) - threads)
        contention = min(1.0, max(0.0, (others - spare) / threads))
    return Timing({name: statistics.median(s) for name, s in samples.items()}, contention)


def steady_allocator() -> bool:
    """Pin glibc malloc's thresholds (mmap at its 32 MiB maximum, no trimming below 1 GiB), so
    that large temporaries (torch's column buffers, outputs) are reused from the heap instead of
    being mapped and page-faulted afresh on every call. Left dynamic, glibc's thresholds end up
    in a different state in each process, and times of layers with large buffers vary up to 4x
    between runs. Returns whether it applied (glibc only)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    applied = [mallopt(M_MMAP_THRESHOLD, 32 << 20), mallopt(M_TRIM_THRESHOLD, 1 << 30)]
    return all(applied)


# --------------------------------------------------------------------------------- database
def fingerprint() -> dict:
    """What makes timings comparable: the machine, the thread count and the software."""
    command, flags = cc.compiler()
    return {"cpu": cc.cpu_target(), "threads": torch.get_num_threads(),
            "compiler": cc.identity(command), "flags": " ".join(flags),
            "zeroskip": __version__, "torch": torch.__version__}


def fingerprint_id(print_: dict) -> str:
    return hashlib.sha256(json.dumps(print_, sort_keys=True).encode()).hexdigest()[:16]


INTERPRETER = "triton-interpreter"      # the "gpu" of Triton kernels run under its interpreter


def _triton_version() -> str | None:
    from . import triton as zt
    return zt.triton_version() if zt.available() else None


def gpu_fingerprint(device: torch.device | str = "cuda") -> dict:
    """What makes Triton timings comparable: the GPU (name, compute capability, SM count), the
    software (Triton, torch, CUDA, zeroskip) and whether float32 runs as TF32 (torch's
    ``cudnn.allow_tf32``, which the Triton kernels follow). A CPU device stands for Triton's
    interpreter (``TRITON_INTERPRET=1``), a distinct machine ``{"gpu": "triton-interpreter"}``
    whose timings say nothing about a GPU."""
    device = torch.device(device)
    common = {"triton": _triton_version(), "torch": torch.__version__, "zeroskip": __version__}
    if device.type == "cuda":
        index = torch.cuda.current_device() if device.index is None else device.index
        props = torch.cuda.get_device_properties(index)
        return {"gpu": props.name, "capability": f"{props.major}.{props.minor}",
                "sms": props.multi_processor_count, "cuda": torch.version.cuda,
                "tf32": bool(torch.backends.cudnn.allow_tf32), **common}
    if device.type == "cpu":
        return {"gpu": INTERPRETER, "capability": None, "sms": None, "cuda": None,
                "tf32": False, **common}
    raise ValueError(f"Triton kernels run on CUDA devices (or on 'cpu' under Triton's "
                     f"interpreter), not on {device.type!r}")


@functools.lru_cache(maxsize=64)
def _gpu_ids(kind: str, index: int | None, tf32: bool) -> tuple[str, dict]:
    print_ = gpu_fingerprint(torch.device(kind, index) if index is not None else kind)
    return fingerprint_id(print_), print_


def _gpu_print(device: torch.device | str) -> tuple[str, dict]:
    """``(id, fingerprint)`` of a device, cached (the dispatch asks on every call)."""
    device = torch.device(device)
    index = device.index
    if device.type == "cuda" and index is None:
        index = torch.cuda.current_device()
    tf32 = device.type == "cuda" and bool(torch.backends.cudnn.allow_tf32)
    return _gpu_ids(device.type, index, tf32)


def gpu_fingerprint_id(device: torch.device | str = "cuda") -> str:
    """The id of :func:`gpu_fingerprint` (the scheme of :func:`fingerprint_id`)."""
    return _gpu_print(device)[0]


def spec_key(spec: LayerSpec) -> str:
    """The layer without its batch size and density (those are run-time properties)."""
    data = spec.to_dict()
    data.pop("batch", None)
    data.pop("density", None)
    return json.dumps(data, sort_keys=True, separators=(",", ":"))


def default_path() -> Path:
    path = os.environ.get("ZEROSKIP_TUNING_DB")
    return Path(path).expanduser() if path else cache.cache_dir() / "tuning.json"


_generations = itertools.count(1)


class TuningDB:
    """Tuned choices: ``{fingerprint id: {spec key: {bucket: record}}}`` with the fingerprints
    themselves, as one JSON file. A record is ``{"choice": candidate name, "ms": {candidate:
    milliseconds or null for failed}, "date": ISO date}``."""

    def __init__(self, path: Path | str | None = None, strict: bool = False):
        """``strict``: raise (OSError, ValueError) where the file is missing, unreadable or
        corrupt, instead of starting empty and setting it aside: for a file merged in, which is
        not ours to rebuild."""
        self.path = Path(path) if path is not None else default_path()
        self.machines: dict[str, dict] = {}
        self.records: dict[str, dict[str, dict[str, dict]]] = {}
        self.here = fingerprint_id(fingerprint())
        self.generation = next(_generations)   # changes whenever the records do
        self._lock = threading.Lock()
        self._load(strict)

    # reading
    def _load(self, strict: bool) -> None:
        try:
            text = self.path.read_bytes()   # undecodable bytes then fail in json.loads: corrupt
        except OSError as exc:
            if strict:
                raise
            if not isinstance(exc, FileNotFoundError):
                warnings.warn(f"zeroskip: cannot read the tuning database {self.path}: {exc}; "
                              "tuned choices are not used", ZeroskipTuningWarning, stacklevel=3)
            return
        try:
            data = json.loads(text)
            machines, records = self._validate(data)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            if strict:
                raise ValueError(f"{self.path} is not a zeroskip tuning database: {exc}") from exc
            aside = self.path.with_name(self.path.name + ".corrupt")
            try:
                os.replace(self.path, aside)
            except OSError:
                aside = None
            warnings.warn(f"zeroskip: the tuning database {self.path} is corrupt ({exc}); it "
                          f"was {'moved to ' + str(aside) if aside else 'left as it is'} and a "
                          "new one is started", ZeroskipTuningWarning, stacklevel=3)
            return
        self.machines, self.records = machines, records

    @staticmethod
    def _validate(data) -> tuple[dict, dict]:
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a zeroskip tuning database of format {FORMAT}")
        machines, records = data["machines"], data["records"]
        if not isinstance(machines, dict) or not isinstance(records, dict):
            raise TypeError("'machines' and 'records' must be objects")
        for fp, layers in records.items():
            if fp not in machines:
                raise KeyError(f"records of unknown machine {fp!r}")
            for key, buckets in layers.items():
                LayerSpec.from_dict(json.loads(key))
                for b, record in buckets.items():
                    float(b)
                    if not isinstance(record.get("choice"), str):
                        raise TypeError(f"record {key} @ {b} has no choice")
        return machines, records

    def layer(self, spec: LayerSpec, machine: str | None = None) -> dict[str, dict] | None:
        """The records of ``spec`` (by bucket) on ``machine`` (a fingerprint id: by default this
        process's CPU, :attr:`here`; :func:`gpu_fingerprint_id` names a GPU), or None."""
        return self.records.get(machine or self.here, {}).get(spec_key(spec)) or None

    def lookup(self, spec: LayerSpec, density: float, machine: str | None = None) -> str | None:
        """The choice tuned for ``spec`` on this machine (or ``machine``) at the density nearest
        ``density``, or None if the layer was not tuned there."""
        record = nearest(self.layer(spec, machine), density)
        return record["choice"] if record else None

    def crossover(self, spec: LayerSpec, machine: str | None = None) -> float | None:
        """The highest tuned density at which a sparse kernel won on this machine (or
        ``machine``) (None: no record, 0: sparse never won)."""
        layer = self.layer(spec, machine)
        if not layer:
            return None
        won = [float(b) for b, r in layer.items() if r["choice"].startswith("sparse")]
        return max(won, default=0.0)

    # writing
    def record(self, spec: LayerSpec, density: float, choice: str, ms: dict[str, float],
               machine: str | None = None, print_: dict | None = None) -> None:
        """File a choice under this process's CPU fingerprint, or under ``machine`` (a
        fingerprint id, e.g. :func:`gpu_fingerprint_id`) described by ``print_`` (needed the
        first time the database sees that machine)."""
        with self._lock:
            if machine is None:
                machine, print_ = self.here, fingerprint()
            if print_ is not None:
                self.machines[machine] = print_
            elif machine not in self.machines:
                raise ValueError(f"machine {machine!r} is not in the tuning database: pass its "
                                 "fingerprint as print_")
            layer = self.records.setdefault(machine, {}).setdefault(spec_key(spec), {})
            layer[f"{bucket(density):g}"] = {
                "choice": choice, "date": datetime.date.today().isoformat(),
                "ms": {k: (round(v, 5) if math.isfinite(v) else None) for k, v in ms.items()}}
            self.generation = next(_generations)

    def merge(self, other: "TuningDB") -> int:
        """Add ``other``'s records (any machine); on a clash the newer record wins. Returns the
        number of records taken."""
        taken = 0
        with self._lock:
            for fp, layers in other.records.items():
                self.machines.setdefault(fp, other.machines[fp])
                for key, buckets in layers.items():
                    mine = self.records.setdefault(fp, {}).setdefault(key, {})
                    for b, record in buckets.items():
                        if b not in mine or record.get("date", "") >= mine[b].get("date", ""):
                            mine[b] = record
                            taken += 1
            self.generation = next(_generations)
        return taken

    def to_json(self) -> dict:
        return {"format": FORMAT, "machines": self.machines, "records": self.records}

    def save(self) -> Path:
        """Write atomically (a temp file, then ``os.replace``), merging what another process
        saved meanwhile."""
        from filelock import FileLock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            if self.path.exists():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ZeroskipTuningWarning)
                    disk = TuningDB(self.path)
                disk.merge(self)
                data = disk.to_json()
            else:
                data = self.to_json()
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
            os.replace(tmp, self.path)
        return self.path


_db: tuple[tuple, TuningDB] | None = None
_db_lock = threading.Lock()
_ENV = ("ZEROSKIP_TUNING_DB", "ZEROSKIP_CACHE_DIR", "XDG_CACHE_HOME")


def database() -> TuningDB:
    """The process's tuning database (loaded on first use, and again when the environment
    variables that locate it or the thread count, part of the fingerprint, change)."""
    global _db
    where = (*(os.environ.get(name) for name in _ENV), torch.get_num_threads())
    found = _db
    if found is not None and found[0] == where:
        return found[1]
    with _db_lock:
        if _db is None or _db[0] != where:
            _db = (where, TuningDB())
        return _db[1]


def reset() -> None:
    """Forget the loaded database (it is read again on next use)."""
    global _db
    with _db_lock:
        _db = None


@functools.lru_cache(maxsize=4096)
def _spec_key_cached(spec: LayerSpec) -> str:
    return spec_key(spec)


def gpu_records(spec: LayerSpec, device: torch.device | str) -> dict[str, dict] | None:
    """The Triton tuning records of ``spec`` for ``device`` (its GPU, or Triton's interpreter
    for a CPU device) in the process's :func:`database`: ``{bucket: record}`` with records as
    :meth:`TuningDB.record` files them (``record["choice"]``: 'torch', 'dense/<config>' or
    'sparse/<config>'), or None where the layer was not tuned for it. Pick a record with
    :func:`nearest` ``(records, density)``. Cheap enough to call per launch."""
    return database().records.get(_gpu_print(device)[0], {}).get(_spec_key_cached(spec)) or None


# --------------------------------------------------------------------------------- candidates
@dataclass(frozen=True)
class Candidate:
    """One way to run a layer: ``torch``, or a generated kernel variant (its name)."""

    name: str

    @property
    def variant(self) -> lower.Variant | None:
        return None if self.name == "torch" else lower.Variant.parse(self.name)


def candidates(spec: LayerSpec, density: float) -> list[Candidate]:
    """torch, the dense kernel at its own tile and at two other widths, and the sparse kernel at
    its own and a smaller channel tile (only below density 1: it cannot win on dense data)."""
    from .ops import kernel_for
    names = ["torch", "dense"]
    width = kernel_for(spec, lower.Variant("dense")).plan.tile_width
    names += [f"dense/w{w}" for w in sorted({max(2, width // 2), min(16, width + 4)} - {width})]
    if density < 1.0:
        names += ["sparse", "sparse/v2"]
    return [Candidate(n) for n in names]


@dataclass
class Result:
    """The tuning of one layer at one density: every candidate's milliseconds (inf: failed,
    with ``errors[name]`` saying why) and the winner."""

    spec: LayerSpec
    density: float
    ms: dict[str, float]
    errors: dict[str, str]
    contention: float | None

    @property
    def choice(self) -> str:
        return min(self.ms, key=lambda n: (self.ms[n], n != "torch"))

    def speedup(self, name: str | None = None) -> float:
        return self.ms["torch"] / self.ms[name or self.choice]


def sparse_input(shape: tuple[int, ...], density: float, seed: int = 0) -> torch.Tensor:
    """A ReLU-like input: exactly ``round(density * size)`` positive values at random places."""
    gen = torch.Generator().manual_seed(seed)
    size = math.prod(shape)
    flat = torch.zeros(size)
    count = round(density * size)
    where = torch.randperm(size, generator=gen)[:count]
    flat[where] = torch.rand(count, generator=gen) + 0.1
    return flat.reshape(shape)


def _runner(spec: LayerSpec, candidate: Candidate, x, w, b) -> Callable[[], torch.Tensor]:
    from . import ops
    if candidate.name == "torch":
        return lambda: ops.torch_reference(spec, x, w, b)
    kernel = ops.kernel_for(spec, candidate.variant)
    out_shape = (x.shape[0], *spec.output_shape[1:])

    def run():
        out = torch.empty(out_shape, dtype=x.dtype)
        return kernel.launch(x, kernel.pack(w, b), w, out)
    return run


def tune(spec: LayerSpec, density: float, repeats: int = REPEATS,
         min_time: float = MIN_TIME_S) -> Result:
    """Verify, then time, every candidate for ``spec`` on an input of ``density``."""
    if spec.op not in ("conv", "conv_transpose"):
        raise ValueError(f"tuning covers forward ops (conv, conv_transpose), not {spec.op!r}")
    shapes = spec.input_shapes
    dtype = getattr(torch, spec.dtype)
    gen = torch.Generator().manual_seed(1)
    x = sparse_input(shapes["input"], density).to(dtype)
    w = torch.nn.Parameter(torch.randn(shapes["weight"], generator=gen, dtype=dtype),
                           requires_grad=False)
    b = torch.nn.Parameter(torch.randn(shapes["bias"], generator=gen, dtype=dtype),
                           requires_grad=False) if "bias" in shapes else None
    from . import ops
    want = ops.torch_reference(spec, x, w, b)
    scale = max(float(want.abs().max()) if want.numel() else 0.0, 1e-30)
    runs, errors = {}, {}
    for candidate in candidates(spec, density):
        try:
            run = _runner(spec, candidate, x, w, b)
            error = float((run() - want).abs().max()) / scale if want.numel() else 0.0
            if not error <= TOLERANCE:
                raise ArithmeticError(f"differs from torch by {error:.3g} of the largest "
                                      "magnitude")
            runs[candidate.name] = run
        except Exception as exc:   # a failing candidate scores inf; the tuning goes on
            errors[candidate.name] = f"{type(exc).__name__}: {exc}"
            stats.add("tune_failures")
    timing = time_interleaved(runs, repeats, min_time)
    ms = {name: timing.seconds[name] * 1e3 if name in timing.seconds else math.inf
          for name in [c.name for c in candidates(spec, density)]}
    return Result(dataclasses.replace(spec, density=density), density, ms, errors,
                  timing.contention)


def tune_all(specs: Iterable[LayerSpec], densities: Iterable[float], db: TuningDB | None = None,
             repeats: int = REPEATS, min_time: float = MIN_TIME_S, progress: bool = True
             ) -> list[Result]:
    """Tune every spec at every density, recording each winner in ``db`` (saved at the end)."""
    from tqdm import tqdm
    steady_allocator()      # as the bench does: torch's large buffers otherwise vary 4x
    db = db if db is not None else database()
    jobs = [(s, d) for s in specs for d in densities]
    results = []
    with tqdm(jobs, desc="tuning", unit="case", disable=not progress) as bar:
        for spec, density in bar:
            bar.set_postfix_str(f"{spec.torch_name} {spec.describe()[:40]} @ {density:g}")
            result = tune(spec, density, repeats, min_time)
            db.record(spec, density, result.choice, result.ms)
            results.append(result)
    db.save()
    return results


# --------------------------------------------------------------------------------- Triton
# Triton candidates are 'torch' (cuDNN on a GPU) and (strategy, config) pairs of the layer's
# Triton kernels, named by ``triton.choice_name``: 'dense/m64n64k32w4s3', 'sparse/...' (the
# block-sparse family). They are checked against torch, then timed with Triton's ``do_bench``
# on a GPU (or the CPU timing above under Triton's interpreter), and the choice is filed under
# the GPU's fingerprint in the same database as the CPU choices.
TRITON_TOLERANCE = {"float32": TOLERANCE, "float16": 1e-2, "bfloat16": 2e-2}
TF32_TOLERANCE = 1e-2       # float32 on a GPU where torch (and so the kernels) use TF32
PATTERNS = ("random", "blocks")


def triton_tolerance(dtype: str, device: torch.device | str) -> float:
    """The largest error a Triton candidate may show, relative to the largest magnitude of
    torch's result: 1e-4 for float32 in IEEE precision, 1e-2 where float32 multiplies as TF32
    (on a GPU with ``torch.backends.cudnn.allow_tf32``, torch's default), 1e-2 for float16 and
    2e-2 for bfloat16 (8 significant bits: one rounding of the output is up to 0.8%)."""
    if dtype == "float32" and torch.device(device).type == "cuda" and \
            torch.backends.cudnn.allow_tf32:
        return TF32_TOLERANCE
    return TRITON_TOLERANCE[dtype]


def block_sparse_input(shape: tuple[int, ...], density: float, block: int = 64,
                       seed: int = 0) -> torch.Tensor:
    """A block-structured input: at each (sample, position), each block of ``block``
    consecutive channels (all of them where fewer) is kept with probability ``density`` (random
    normal values) and is otherwise all zeros. A block-sparse kernel whose channel block
    (BLOCK_K) divides ``block`` skips ``1 - density`` of its blocks."""
    gen = torch.Generator().manual_seed(seed)
    n, c, *size = shape
    block = max(1, min(block, c))
    blocks = -(-c // block)
    keep = torch.rand((n, blocks, *size), generator=gen) < density
    keep = keep.repeat_interleave(block, dim=1)[:, :c]
    return torch.randn(shape, generator=gen) * keep


def triton_operands(spec: LayerSpec, density: float = 1.0, device: torch.device | str = "cpu",
                    pattern: str = "random", seed: int = 0) -> dict[str, torch.Tensor]:
    """The operands of ``spec`` (named as in ``spec.input_shapes``) on ``device`` in the spec's
    dtype: the data operand (input, or the output gradient of ``conv_grad_input``) random
    normal at density 1, below it ReLU-like (``pattern`` 'random': :func:`sparse_input`) or
    block-structured ('blocks': :func:`block_sparse_input`); the others random normal. The
    weight is a frozen ``nn.Parameter``, as in a model."""
    from . import ops
    from . import triton as zt
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    dtype = zt.TORCH_DTYPES[spec.dtype]
    gen = torch.Generator().manual_seed(seed + 1)
    data = ops.OPERANDS[spec.op][0]
    found = {}
    for name, shape in spec.input_shapes.items():
        if name == data and density < 1.0:
            value = sparse_input(shape, density, seed) if pattern == "random" else \
                block_sparse_input(shape, density, seed=seed)
        else:
            value = torch.randn(shape, generator=gen)
        value = value.to(device=device, dtype=dtype)
        found[name] = torch.nn.Parameter(value, requires_grad=False) if name == "weight" \
            else value
    return found


def _zero_padded_conv(spec: LayerSpec, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The associated forward conv of a gradient spec, padded as torch's modules pad."""
    import torch.nn.functional as F
    conv = getattr(F, f"conv{spec.rank}d")
    flat = [p for pair in reversed(spec.padding) for p in pair]
    mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
    return conv(F.pad(x, flat, mode=mode), w, None, spec.stride, 0, spec.dilation, spec.groups)


def torch_op(spec: LayerSpec, t: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """torch's own op for ``spec`` on the operands ``t`` (as :func:`triton_operands` names
    them), as a call: the forward through ``torch.nn.functional``, the gradients through
    ``aten.convolution_backward`` (cuDNN on a GPU) of the associated conv."""
    from . import ops
    if spec.op in ("conv", "conv_transpose"):
        return lambda: ops.torch_reference(spec, t["input"], t["weight"], t.get("bias"))
    c_x = spec.conv_channels[0]
    like = t["grad_output"]
    x = t.get("input")
    if x is None:
        x = torch.zeros((like.shape[0], c_x, *spec.input_size), dtype=like.dtype,
                        device=like.device)
    w = t.get("weight")
    if w is None:
        w = torch.zeros(spec.weight_shape, dtype=like.dtype, device=like.device)
    w = w.detach()
    which = 0 if spec.op == "conv_grad_input" else 1
    if spec.padding_mode == "zeros" and all(lo == hi for lo, hi in spec.padding):
        mask = [which == 0, which == 1, False]
        args = (None, list(spec.stride), [lo for lo, _ in spec.padding], list(spec.dilation),
                False, [0] * spec.rank, spec.groups, mask)
        return lambda: torch.ops.aten.convolution_backward(like, x, w, *args)[which]

    def through_autograd() -> torch.Tensor:
        with torch.enable_grad():
            leaves = (x.detach().requires_grad_(which == 0), w.detach().requires_grad_(which == 1))
            y = _zero_padded_conv(spec, *leaves)
            return torch.autograd.grad(y, leaves[which], like)[0]
    return through_autograd


def _triton_problem(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device`` here (None: they can)."""
    from . import triton as zt
    if not zt.available():
        return "Triton is not installed (pip install triton)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return (f"no CUDA GPU is visible to torch {torch.__version__} (torch.cuda."
                    "is_available() is False)")
        if zt.interpreting():
            return "Triton was imported with TRITON_INTERPRET=1, so it cannot run CUDA kernels"
        return None
    if device.type == "cpu":
        if not zt.interpreting():
            return ("Triton kernels run on CPU tensors only under Triton's interpreter: set "
                    "TRITON_INTERPRET=1 before triton is imported")
        return None
    return f"Triton kernels do not run on {device.type} tensors"


def _strategies(spec: LayerSpec, density: float) -> list[str]:
    """The Triton families of a layer: the dense one (the weight gradient's only one), and the
    block-sparse one for the other ops below density 1 (it cannot win on dense data)."""
    if spec.op == "conv_grad_weight":
        return ["dense"]
    return ["dense", "sparse"] if density < 1.0 else ["dense"]


def triton_candidates(spec: LayerSpec, density: float,
                      target: str | None = None) -> list[Candidate]:
    """'torch' and, for each config of ``triton.configs(plan)``, 'dense/<config>' and (below
    density 1, forward and input-gradient ops) 'sparse/<config>'. With ``target`` (e.g.
    'sm_90'), the configs whose kernel, compiled for that GPU target (no GPU needed: see
    :func:`target_usage`), spills registers or needs more shared memory than the target has
    are dropped. Raises what ``triton.kernel_for`` raises for a layer no template covers."""
    return _triton_candidates(spec, density, target)[0]


def _triton_candidates(spec: LayerSpec, density: float, target: str | None
                       ) -> tuple[list[Candidate], dict[str, str]]:
    """:func:`triton_candidates` and, by name, why each dropped one was dropped."""
    from . import triton as zt
    names = ["torch"]
    for strategy in _strategies(spec, density):
        plan = zt.kernel_for(spec, strategy).plan
        names += [zt.choice_name(strategy, config) for config in zt.configs(plan)]
    dropped: dict[str, str] = {}
    if target is not None:
        for name, meta in target_usage(spec, names[1:], target).items():
            problem = _misfit(meta)
            if problem:
                dropped[name] = f"does not fit {target}: {problem}"
    return [Candidate(n) for n in names if n not in dropped], dropped


def _misfit(meta: dict | str) -> str | None:
    """Why a kernel compiled for a target does not fit it (None: it does)."""
    if isinstance(meta, str):
        return f"it failed to compile ({meta[:500]})"
    problems = []
    if meta.get("spill_bytes"):
        problems.append(f"it spills {meta['spill_bytes']} bytes of registers "
                        f"({meta.get('registers')} registers)")
    if meta.get("shared_bytes", 0) > meta.get("shared_limit", math.inf):
        problems.append(f"it needs {meta['shared_bytes']} bytes of shared memory, the target "
                        f"has {meta['shared_limit']}")
    return "; ".join(problems) or None


def target_usage(spec: LayerSpec, choices: list[str], target: str) -> dict[str, dict | str]:
    """``triton.compile_for_target``'s ``meta`` (registers, spills, shared memory) of each
    Triton choice of ``spec`` compiled for ``target``, or the error where it failed. Needs no
    GPU; under Triton's interpreter, which cannot compile, it runs in a subprocess."""
    from . import triton as zt
    if not zt.interpreting():
        return _compile_choices(spec.to_dict(), choices, target)
    import subprocess
    import sys
    import tempfile
    import zeroskip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(zeroskip.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    code = ("import json, sys\n"
            "from zeroskip.runtime.autotune import _compile_choices\n"
            "args = json.load(open(sys.argv[1]))\n"
            "json.dump(_compile_choices(**args), open(sys.argv[2], 'w'))\n")
    with tempfile.TemporaryDirectory(prefix="zeroskip-target-") as tmp:
        args, out = Path(tmp) / "args.json", Path(tmp) / "out.json"
        args.write_text(json.dumps({"spec": spec.to_dict(), "choices": choices,
                                    "target": target}))
        done = subprocess.run([sys.executable, "-c", code, str(args), str(out)], env=env,
                              capture_output=True, text=True, timeout=600 + 120 * len(choices))
        if done.returncode or not out.exists():
            raise RuntimeError(f"compiling for {target} failed ({done.returncode}): "
                               f"{done.stderr.strip()[-2000:]}")
        return json.loads(out.read_text())


def _compile_choices(spec: dict, choices: list[str], target: str) -> dict[str, dict | str]:
    from . import triton as zt
    layer = LayerSpec.from_dict(spec)
    found: dict[str, dict | str] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
        for name in choices:
            strategy, config = zt.parse_choice(name)
            try:
                kernel = zt.kernel_for(layer, strategy)
                found[name] = zt.compile_for_target(kernel, target, config)["meta"]
            except Exception as exc:     # CompilationError and what Triton's backends raise
                found[name] = f"{type(exc).__name__}: {exc}"
    return found


class DoesNotFit(RuntimeError):
    """A Triton candidate's kernel spills registers (or does not fit the GPU otherwise)."""


class _CompiledSpy:
    """Stands in for a generated module's ``conv_kernel`` while a candidate is verified,
    keeping what each launch returned: on a GPU, Triton's ``CompiledKernel`` (``n_regs``,
    ``n_spills``, ``metadata.shared``)."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, []

    def __getitem__(self, grid):
        launch = self.fn[grid]

        def run(*args, **kwargs):
            result = launch(*args, **kwargs)
            self.compiled.append(result)
            return result
        return run

    def __getattr__(self, name):
        return getattr(self.fn, name)


def _launch_compiled(kernel, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list]:
    """Run ``run`` once, returning its result and what the kernel's launches returned."""
    module = kernel.module
    real = module.conv_kernel
    spy = module.conv_kernel = _CompiledSpy(real)
    try:
        return run(), spy.compiled
    finally:
        module.conv_kernel = real


def resource_problem(compiled) -> str | None:
    """Why a kernel Triton compiled for this GPU should not run (it spills registers), or
    None. (One that needs more shared memory than the GPU has fails to launch already.)"""
    spills = getattr(compiled, "n_spills", None)
    if spills:
        return (f"it spills registers ({spills} spill slots, {getattr(compiled, 'n_regs', '?')} "
                "registers)")
    return None


def triton_call(spec: LayerSpec, name: str, t: dict[str, torch.Tensor]):
    """``(kernel, call)`` of a Triton choice on the operands ``t``: the call allocates the
    output and launches, as the dispatch does (the weight is packed once, as its cache does)."""
    from . import ops
    from . import triton as zt
    strategy, config = zt.parse_choice(name)
    kernel = zt.kernel_for(spec, strategy)
    lhs_name, rhs_name = ops.OPERANDS[spec.op]
    lhs, bias = t[lhs_name], t.get("bias")
    if spec.op == "conv_grad_weight":
        rhs, shape = t[rhs_name], spec.output_shape
    else:
        rhs, shape = kernel.pack(t[rhs_name]), (lhs.shape[0], *spec.output_shape[1:])

    def run() -> torch.Tensor:
        out = torch.empty(shape, dtype=lhs.dtype, device=lhs.device)
        return kernel.launch(lhs, rhs, out, bias, config)
    return kernel, run


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (in float32), inf where the shapes differ."""
    if got.shape != want.shape:
        return math.inf
    if not want.numel():
        return 0.0
    want32 = want.float()
    scale = max(float(want32.abs().max()), 1e-30)
    return float((got.float() - want32).abs().max()) / scale


def time_cuda(fns: dict[str, Callable[[], object]], repeats: int = REPEATS,
              rep_ms: float = 20) -> dict[str, float]:
    """Milliseconds per call of each function on the GPU: ``triton.testing.do_bench``'s median
    (L2 flushed before each call, CUDA events), in ``repeats`` interleaved rounds whose median
    is kept (rounds alternate the order, so no function always follows the same one)."""
    from triton.testing import do_bench
    samples: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for round_ in range(repeats):
        for name in order if round_ % 2 == 0 else order[::-1]:
            samples[name].append(float(do_bench(fns[name], warmup=5, rep=rep_ms,
                                                return_mode="median")))
    return {name: statistics.median(s) for name, s in samples.items()}


def time_device(fns: dict[str, Callable[[], object]], device: torch.device | str,
                repeats: int = REPEATS, min_time: float = MIN_TIME_S
                ) -> tuple[dict[str, float], float | None]:
    """``(milliseconds per call by name, contention)``: :func:`time_cuda` on a GPU (contention
    None), :func:`time_interleaved` elsewhere (Triton's interpreter)."""
    if torch.device(device).type == "cuda":
        return time_cuda(fns, repeats), None
    timing = time_interleaved(fns, repeats, min_time)
    return {name: s * 1e3 for name, s in timing.seconds.items()}, timing.contention


def tune_triton(spec: LayerSpec, density: float = 1.0, device: torch.device | str = "cuda",
                repeats: int = REPEATS, *, min_time: float = MIN_TIME_S,
                target: str | None = None, pattern: str = "random",
                db: TuningDB | None = None, save: bool = True) -> Result:
    """Verify, then time, every Triton candidate of ``spec`` (:func:`triton_candidates`) on
    ``device`` at the spec's batch size, on operands of ``density`` (``pattern``: see
    :func:`triton_operands`), and record the winner in ``db`` (the process's database by
    default; saved unless ``save`` is False) under the device's :func:`gpu_fingerprint`.

    Each candidate runs once and is compared with torch (:func:`triton_tolerance`); one that
    fails to build or launch, differs, or (on a GPU) spills registers scores ``inf`` with the
    reason in ``Result.errors``, never stopping the tuning; so do the configs ``target`` drops.
    The rest are timed with ``triton.testing.do_bench`` on a GPU (:func:`time_cuda`); on a CPU
    device, under Triton's interpreter (``TRITON_INTERPRET=1``), with the CPU timing."""
    device = torch.device(device)
    problem = _triton_problem(device)
    if problem:
        from . import triton as zt
        raise zt.TritonUnavailable(problem)
    from . import triton as zt
    if spec.dtype not in zt.TORCH_DTYPES:
        raise ValueError(f"Triton kernels cover {', '.join(zt.TORCH_DTYPES)}, not {spec.dtype}")
    t = triton_operands(spec, density, device, pattern)
    reference = torch_op(spec, t)
    want = reference()
    tolerance = triton_tolerance(spec.dtype, device)
    names, errors = ["torch"], {}
    try:
        candidates, dropped = _triton_candidates(spec, density, target)
        names = [c.name for c in candidates] + list(dropped)
        errors.update(dropped)
    except Exception as exc:     # no Triton kernel for this layer: torch is all there is
        candidates = [Candidate("torch")]
        names.append("triton")
        errors["triton"] = f"{type(exc).__name__}: {exc}"
    runs: dict[str, Callable[[], object]] = {}
    for candidate in candidates:
        try:
            if candidate.name == "torch":
                run, got, compiled = reference, reference(), []
            else:
                kernel, run = triton_call(spec, candidate.name, t)
                got, compiled = _launch_compiled(kernel, run)
            error = relative_error(got, want)
            if not error <= tolerance:
                raise ArithmeticError(f"differs from torch by {error:.3g} of the largest "
                                      f"magnitude (tolerance {tolerance:g})")
            if device.type == "cuda":
                found = next(filter(None, map(resource_problem, compiled)), None)
                if found:
                    raise DoesNotFit(found)
            runs[candidate.name] = run
        except Exception as exc:   # a failing candidate scores inf; the tuning goes on
            errors[candidate.name] = f"{type(exc).__name__}: {exc}"
            stats.add("tune_failures")
    times, contention = time_device(runs, device, repeats, min_time) if runs else ({}, None)
    ms = {name: times.get(name, math.inf) for name in names}
    result = Result(dataclasses.replace(spec, density=density), density, ms, errors, contention)
    db = db if db is not None else database()
    machine, print_ = _gpu_print(device)
    db.record(spec, density, result.choice, ms, machine=machine, print_=print_)
    if save:
        db.save()
    return result
