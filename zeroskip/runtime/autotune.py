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
"""
from __future__ import annotations

import dataclasses
import datetime
import ctypes
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

    def lookup(self, spec: LayerSpec, density: float) -> str | None:
        """The choice tuned for ``spec`` on this machine at the density nearest ``density``, or
        None if the layer was not tuned here."""
        record = nearest(self.records.get(self.here, {}).get(spec_key(spec)), density)
        return record["choice"] if record else None

    def crossover(self, spec: LayerSpec) -> float | None:
        """The highest tuned density at which a sparse kernel won on this machine (None: no
        record, 0: sparse never won)."""
        layer = self.records.get(self.here, {}).get(spec_key(spec))
        if not layer:
            return None
        won = [float(b) for b, r in layer.items() if r["choice"].startswith("sparse")]
        return max(won, default=0.0)

    # writing
    def record(self, spec: LayerSpec, density: float, choice: str,
               ms: dict[str, float]) -> None:
        with self._lock:
            self.machines[self.here] = fingerprint()
            layer = self.records.setdefault(self.here, {}).setdefault(spec_key(spec), {})
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
