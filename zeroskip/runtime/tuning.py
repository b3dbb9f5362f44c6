"""Tuning records and their database: format, keys, density buckets, machine fingerprints.

Choices persist in a :class:`TuningDB`: one JSON file (``ZEROSKIP_TUNING_DB``, by default
``tuning.json`` in the cache directory), readable and mergeable across machines. Records are
filed under a machine fingerprint: for C kernels the CPU model and ISA, threads, compiler,
zeroskip and torch versions (:func:`fingerprint`); for Triton kernels the GPU, its compute
capability and SMs, Triton, CUDA, torch, zeroskip and TF32 (:func:`gpu_fingerprint`; Triton's
interpreter on CPU tensors is a machine of its own). Lookups see only the fingerprint of this
process, so a record tuned elsewhere is kept but never used here. A corrupt file is set aside
(``.corrupt``) with a warning and rebuilt.

A record's key is the layer's shape (:func:`spec_key`), its bucket the density it was tuned at
(:data:`BUCKETS`, the smallest at or above it) and the batch size (the nearest power of two:
``"0.5"`` at batch 1, ``"0.5@16"`` at 12 to 22). A call uses the records of the batch bucket
nearest its batch, and of those the one tuned nearest its density (:func:`nearest`): the best
kernel of a layer at batch 1 and at batch 32 may differ.
"""
from __future__ import annotations

import datetime
import functools
import hashlib
import itertools
import json
import math
import os
import threading
import time
import warnings
from pathlib import Path

import torch

from .. import __version__
from ..spec import LayerSpec
from . import cache, cc, env, tritonenv

BUCKETS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0)
FORMAT = 2          # 2: records name the kernels they timed ("kernels")
READABLE = (1, 2)   # a format-1 record names none: it is read, and never trusted


class ZeroskipTuningWarning(UserWarning):
    """The tuning database could not be read and was rebuilt."""


def bucket(density: float) -> float:
    """The smallest bucket at or above ``density``."""
    return next((b for b in BUCKETS if density <= b + 1e-9), 1.0)


def batch_bucket(batch: int) -> int:
    """The power of two nearest ``batch`` (by ratio)."""
    return 1 << max(0, round(math.log2(max(int(batch), 1))))


def bucket_key(density: float, batch: int = 1) -> str:
    """A record's bucket: ``"0.5"`` (batch 1) or ``"0.5@16"``."""
    b = batch_bucket(batch)
    return f"{bucket(density):g}" + (f"@{b}" if b != 1 else "")


@functools.lru_cache(maxsize=1024)
def parse_bucket(key: str) -> tuple[float, int]:
    """``(density, batch)`` of a bucket key (ValueError where it is none); cached, as the
    dispatch reads a layer's keys on every call that measures a density."""
    density, _, batch = key.partition("@")
    found = (float(density), int(batch) if batch else 1)
    if not (0.0 <= found[0] <= 1.0 and found[1] >= 1):
        raise ValueError(f"bad tuning bucket {key!r}")
    return found


def nearest(layer: dict[str, dict] | None, density: float, batch: int = 1) -> dict | None:
    """Of a layer's records (by bucket), the one of the batch bucket nearest ``batch`` tuned at
    the density nearest ``density``, both by ratio: a measured 0.302 uses the record of 0.3, not
    the untuned bucket 0.4; batch 24 uses the records of 32 where there are, else of 16."""
    if not layer:
        return None
    buckets = {key: parse_bucket(key) for key in layer}
    n = max(int(batch), 1)
    b = min({v[1] for v in buckets.values()}, key=lambda v: (abs(math.log(v / n)), v))
    d = max(density, 1e-3)
    return layer[min((k for k, v in buckets.items() if v[1] == b),
                     key=lambda k: abs(math.log(max(buckets[k][0], 1e-3) / d)))]



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
    return tritonenv.triton_version() if tritonenv.available() else None


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
    """The layer's shape as a record key (the workload is the record's bucket)."""
    return json.dumps(spec.to_dict(), sort_keys=True, separators=(",", ":"))


def default_path() -> Path:
    path = env.get("ZEROSKIP_TUNING_DB")
    return Path(path).expanduser() if path else cache.cache_dir() / "tuning.json"


_generations = itertools.count(1)


class TuningDB:
    """Tuned choices: ``{fingerprint id: {spec key: {bucket: record}}}`` with the fingerprints
    themselves, as one JSON file. A record is ``{"choice": candidate name, "ms": {candidate:
    milliseconds or null for failed}, "kernels": {candidate: the kernel's identity}, "date": ISO
    date}``: ``kernels`` names what was timed (``Compiled.identity``; torch's op has none), so
    that a record whose kernels the compiler no longer makes is known stale
    (:func:`zeroskip.runtime.autotune.fresh`)."""

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
        self.stamp = _stamp(self.path)          # the file as read (see :func:`refresh`)
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
        if not isinstance(data, dict) or data.get("format") not in READABLE:
            raise ValueError(f"not a zeroskip tuning database of format "
                             f"{' or '.join(map(str, READABLE))}")
        machines, records = data["machines"], data["records"]
        if not isinstance(machines, dict) or not isinstance(records, dict):
            raise TypeError("'machines' and 'records' must be objects")
        for fp, layers in records.items():
            if fp not in machines:
                raise KeyError(f"records of unknown machine {fp!r}")
            for key, buckets in layers.items():
                LayerSpec.from_dict(json.loads(key))
                for b, record in buckets.items():
                    parse_bucket(b)
                    if not isinstance(record.get("choice"), str):
                        raise TypeError(f"record {key} @ {b} has no choice")
                    kernels = record.get("kernels", {})
                    if not isinstance(kernels, dict) or not all(
                            isinstance(v, str) for v in kernels.values()):
                        raise TypeError(f"record {key} @ {b}: 'kernels' must map names to "
                                        "identities")
        return machines, records

    def layer(self, spec: LayerSpec, machine: str | None = None) -> dict[str, dict] | None:
        """The records of ``spec`` (by bucket) on ``machine`` (a fingerprint id: by default this
        process's CPU, :attr:`here`; :func:`gpu_fingerprint_id` names a GPU), or None."""
        return self.records.get(machine or self.here, {}).get(spec_key(spec)) or None

    def lookup(self, spec: LayerSpec, density: float, machine: str | None = None,
               batch: int = 1) -> str | None:
        """The choice tuned for ``spec`` on this machine (or ``machine``) nearest ``batch`` and
        ``density``, or None if the layer was not tuned there."""
        record = nearest(self.layer(spec, machine), density, batch)
        return record["choice"] if record else None

    def crossover(self, spec: LayerSpec, machine: str | None = None) -> float | None:
        """The highest tuned density at which a sparse kernel won on this machine (or
        ``machine``) (None: no record, 0: sparse never won)."""
        layer = self.layer(spec, machine)
        if not layer:
            return None
        won = [parse_bucket(b)[0] for b, r in layer.items() if r["choice"].startswith("sparse")]
        return max(won, default=0.0)

    # writing
    def record(self, spec: LayerSpec, density: float, choice: str, ms: dict[str, float],
               machine: str | None = None, print_: dict | None = None, batch: int = 1,
               kernels: dict[str, str] | None = None) -> None:
        """File a choice tuned at ``density`` and ``batch`` under this process's CPU
        fingerprint, or under ``machine`` (a fingerprint id, e.g. :func:`gpu_fingerprint_id`)
        described by ``print_`` (needed the first time the database sees that machine);
        ``kernels``: the identities of the kernels timed, by candidate name."""
        with self._lock:
            if machine is None:
                machine, print_ = self.here, fingerprint()
            if print_ is not None:
                self.machines[machine] = print_
            elif machine not in self.machines:
                raise ValueError(f"machine {machine!r} is not in the tuning database: pass its "
                                 "fingerprint as print_")
            layer = self.records.setdefault(machine, {}).setdefault(spec_key(spec), {})
            layer[bucket_key(density, batch)] = {
                "choice": choice, "date": datetime.date.today().isoformat(),
                "kernels": dict(kernels or {}),
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

    def prune(self, keep) -> int:
        """Drop every record for which ``keep(machine id, spec, record)`` is false (and the
        layers and machines left without any). Returns the number dropped."""
        dropped = 0
        with self._lock:
            for fp in list(self.records):
                layers = self.records[fp]
                for key in list(layers):
                    spec = LayerSpec.from_dict(json.loads(key))
                    for b in list(layers[key]):
                        if not keep(fp, spec, layers[key][b]):
                            del layers[key][b]
                            dropped += 1
                    if not layers[key]:
                        del layers[key]
                if not layers:
                    del self.records[fp]
            self.generation = next(_generations)
        return dropped

    def to_json(self) -> dict:
        return {"format": FORMAT, "machines": self.machines, "records": self.records}

    def save(self, keep=None) -> Path:
        """Write atomically (a temp file, then ``os.replace``) under a file lock, merging what
        another process saved meanwhile; with ``keep`` (as :meth:`prune` takes it), the merged
        records it rejects are dropped, here and on disk."""
        from filelock import FileLock
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.path) + ".lock"):
            if self.path.exists():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ZeroskipTuningWarning)
                    disk = TuningDB(self.path)
                disk.merge(self)
            else:
                disk = self
            if keep is not None:
                disk.prune(keep)
                if disk is not self:
                    self.prune(keep)
            data = disk.to_json()
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
    where = (env.get(_ENV[0]), env.get(_ENV[1]), env.get(_ENV[2]), torch.get_num_threads())
    found = _db
    if found is not None and found[0] == where:
        return found[1]
    with _db_lock:
        if _db is None or _db[0] != where:
            _db = (where, TuningDB())
        return _db[1]


def _stamp(path: Path) -> tuple | None:
    try:
        found = path.stat()
    except OSError:
        return None
    return (found.st_mtime_ns, found.st_size, found.st_ino)


_refreshed = [0.0]
REFRESH_S = 2.0


def refresh() -> bool:
    """Read the database again where another process (the rank that tunes) saved it since it
    was read; checked at most every :data:`REFRESH_S` seconds. Returns whether it was read."""
    now = time.monotonic()
    if now - _refreshed[0] < REFRESH_S:
        return False
    _refreshed[0] = now
    found = _db
    if found is None or _stamp(found[1].path) == found[1].stamp:
        return False
    reset()
    return True


def reset() -> None:
    """Forget the loaded database (it is read again on next use)."""
    global _db
    with _db_lock:
        _db = None


@functools.lru_cache(maxsize=4096)
def _spec_key_cached(spec: LayerSpec) -> str:
    return spec_key(spec)


def machine_of(backend: str, device: torch.device | str = "cpu") -> tuple[str, dict]:
    """``(fingerprint id, fingerprint)`` of the machine whose records a backend's kernels on
    ``device`` use: this CPU for C kernels, the GPU (or Triton's interpreter) for Triton's."""
    if backend == "c":
        return database().here, fingerprint()
    return _gpu_print(device)


def records(spec: LayerSpec, backend: str = "c", device: torch.device | str = "cpu"
            ) -> dict[str, dict] | None:
    """The tuning records of ``spec`` on this machine for ``backend`` ('c', or 'triton' on
    ``device``: its GPU, or Triton's interpreter for a CPU device) in the process's
    :func:`database`: ``{bucket: record}`` with records as :meth:`TuningDB.record` files them
    (``record["choice"]``: 'torch' or a variant name), or None where the layer was not tuned
    there. Pick one with :func:`nearest` ``(records, density)``."""
    db = database()
    machine = db.here if backend == "c" else _gpu_print(device)[0]
    return db.records.get(machine, {}).get(_spec_key_cached(spec)) or None
