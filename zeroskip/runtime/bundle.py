"""Kernel bundles: every kernel a model needs, compiled ahead of time, served with no compiler.

``zeroskip generate layers.json --backend c[,triton] --out DIR`` writes a bundle::

    DIR/manifest.json    format, versions, the machine it was built for, its layers, its
                         kernels, and the sha256 of every other file
    DIR/layers.json      the layers it was generated from
    DIR/tuning.json      tuned choices (with --tune): a tuning database
    DIR/c/<key>/         kernel.c and kernel.so of one C kernel
    DIR/triton/          Triton sources, PTX and cubin per GPU target, and their meta.json

:func:`load_bundle` (or ``ZEROSKIP_BUNDLE=DIR``, several joined by ``:``) checks a bundle
before anything in it is used, and refuses it (:class:`BundleError`) if it was built for
another machine (CPU model and ISA, zeroskip version; Triton's version for Triton kernels), if
any file's sha256 differs from the manifest's, or if any file or folder is a symlink, writable
by group or others, or owned by a user other than this one or root. Once loaded, a kernel whose
rendered source matches one of the bundle's (``<key>`` = sha256 of the zeroskip version, the
backend and the source) is loaded from the bundle (its files hashed again just before
``ctypes`` or the import sees them) instead of being compiled, and the bundle's tuned choices
decide the per-call dispatch of its layers. Nothing runs a compiler for a kernel the bundle
holds; a kernel it lacks is compiled as usual (and falls back to torch's op with a warning
where no compiler works).
"""
from __future__ import annotations

import json
import os
import threading
from pathlib import Path, PurePosixPath
from typing import Any

from .. import __version__
from ..spec import LayerSpec
from . import cache, cc, env, tritonenv
from .tuning import TuningDB, spec_key

FORMAT = "zeroskip-bundle"
VERSION = 2            # 2: layers carry their spec and workload (batch, density) apart
MANIFEST = "manifest.json"
KERNEL_BACKENDS = ("c", "triton")
OWNERS = (os.geteuid(), 0)     # files of this user, or root's (deployed read-only by root)


class BundleError(RuntimeError):
    """A bundle was refused: another machine's, altered, damaged or writable by others."""


class BundleNotFoundError(BundleError, FileNotFoundError):
    """No bundle where one was asked for: the path does not exist (a :class:`BundleError`, and
    the ``FileNotFoundError`` that ``open`` raises for a missing path)."""


def kernel_key(backend: str, source: str) -> str:
    """The name of a kernel in a bundle: what it is, not how or where it was compiled."""
    return cache.make_key(version=__version__, backend=backend, source=source)


def machine() -> dict[str, str]:
    """What a bundle's C kernels need of the machine that runs them (they are built with
    ``-march=native``): the CPU, and the zeroskip that renders the sources it looks up."""
    return {"cpu": cc.cpu_target(), "zeroskip": __version__}


class Bundle:
    """A verified bundle: its kernels by (backend, key), its layers, its tuned choices."""

    def __init__(self, path: Path | str):
        self.path = Path(path).resolve()
        self.manifest = _read_manifest(self.path)
        self.files: dict[str, str] = self.manifest["files"]
        _verify_files(self.path, self.files)
        _check_machine(self.path, self.manifest)
        self.kernels: dict[tuple[str, str], dict] = {}
        for i, kernel in enumerate(self.manifest["kernels"]):
            where = f"{self.path / MANIFEST}: kernels[{i}]"
            if not isinstance(kernel, dict) or kernel.get("backend") not in KERNEL_BACKENDS or \
                    not isinstance(kernel.get("key"), str) or \
                    kernel.get("load") not in self.files or \
                    not all(f in self.files for f in kernel.get("files", [None])):
                raise BundleError(f"{where} is malformed or names a file the manifest does "
                                  "not list")
            self.kernels[kernel["backend"], kernel["key"]] = kernel
        try:
            self.layers = {spec_key(LayerSpec.from_dict(layer["spec"])): layer
                           for layer in self.manifest["layers"]}
        except (TypeError, ValueError, KeyError, RuntimeError, AttributeError) as exc:
            raise BundleError(f"{self.path / MANIFEST}: a layer's spec is malformed: "
                              f"{exc}") from exc
        self.tuning = self._read_tuning()

    def _read_tuning(self) -> dict[str, tuple[str | None, dict[str, dict]]]:
        """By backend, ``(the machine that tuned, its records by spec key)``: this CPU's for
        the C kernels, the GPU's (or Triton's interpreter's) for the Triton kernels."""
        if "tuning.json" not in self.files:
            return {}
        machines = self.manifest.get("tuning_machines") or \
            {"c": self.manifest.get("tuning_machine")}
        try:
            data = json.loads((self.path / "tuning.json").read_text())
            _, records = TuningDB._validate(data)
            if not isinstance(machines, dict):
                raise TypeError("the manifest's 'tuning_machines' must be an object")
            return {backend: (machine, records.get(machine, {}))
                    for backend, machine in machines.items()}
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise BundleError(f"{self.path / 'tuning.json'} is not a tuning database: "
                              f"{exc}") from exc

    def find(self, backend: str, key: str) -> Path | None:
        """The file to load for kernel ``key`` (hashed again now), or None if not held."""
        kernel = self.kernels.get((backend, key))
        if kernel is None:
            return None
        _verify_files(self.path, {name: self.files[name] for name in kernel["files"]})
        return self.path / kernel["load"]

    def covers(self, spec: LayerSpec) -> bool:
        return spec_key(spec) in self.layers

    def density(self, spec: LayerSpec, of: str = "density") -> float | None:
        """The input density (``of='grad_density'``: the output gradient's) traced for a layer
        the bundle was generated for, or None."""
        layer = self.layers.get(spec_key(spec))
        density = layer.get(of) if isinstance(layer, dict) else None
        ok = isinstance(density, (int, float)) and not isinstance(density, bool) and \
            0.0 <= density <= 1.0
        return float(density) if ok else None

    def records(self, spec: LayerSpec, backend: str = "c", machine: str | None = None
                ) -> dict[str, dict] | None:
        """The bundle's tuned records of an operator (``spec``: a forward layer's, or its
        gradient's) on ``backend`` (by bucket), or None; Triton's only for ``machine`` (a
        GPU's fingerprint id) the one they were tuned on."""
        tuned, records = self.tuning.get(backend, (None, {}))
        if backend != "c" and machine != tuned:
            return None
        return records.get(spec_key(spec)) or None

    def __repr__(self) -> str:
        return (f"Bundle({str(self.path)!r}, {len(self.kernels)} kernels, "
                f"{len(self.layers)} layers)")


def _read_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise BundleNotFoundError(f"the bundle {path} does not exist")
    if not path.is_dir():
        raise BundleError(f"{path} is not a bundle directory (not a directory)")
    if not (path / MANIFEST).exists() and not (path / MANIFEST).is_symlink():
        raise BundleError(f"{path} is not a bundle directory (it has no {MANIFEST}; "
                          "zeroskip generate writes one)")
    try:
        problem = cache.unsafe(path, OWNERS) or cache.unsafe(path / MANIFEST, OWNERS)
        if problem:
            raise BundleError(f"refused the bundle {path}: {problem}")
        manifest = json.loads((path / MANIFEST).read_text())
    except OSError as exc:
        raise BundleError(f"{path} has no readable {MANIFEST}: {exc.strerror or exc}") from exc
    except ValueError as exc:
        raise BundleError(f"{path / MANIFEST} is not JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BundleError(f"{path / MANIFEST} is not a zeroskip bundle manifest")
    if manifest.get("version") != VERSION:
        raise BundleError(f"{path / MANIFEST}: bundle format version "
                          f"{manifest.get('version')!r}, this zeroskip reads {VERSION}")
    for field, kind in (("files", dict), ("kernels", list), ("layers", list),
                        ("machine", dict)):
        if not isinstance(manifest.get(field), kind):
            raise BundleError(f"{path / MANIFEST}: '{field}' missing or not a "
                              f"{kind.__name__}")
    return manifest


def _verify_files(root: Path, files: dict[str, Any]) -> None:
    """Every listed file and the folders leading to it are trusted, and match their sha256."""
    checked: set[Path] = set()
    for name, digest in files.items():
        parts = PurePosixPath(name).parts if isinstance(name, str) else ()
        if not parts or name.startswith("/") or any(p in ("..", ".", "") for p in parts) \
                or not isinstance(digest, str):
            raise BundleError(f"{root / MANIFEST}: bad file entry {name!r}")
        folder = root
        try:
            for part in parts[:-1]:
                folder = folder / part
                if folder not in checked:
                    problem = cache.unsafe(folder, OWNERS)
                    if problem:
                        raise BundleError(f"refused the bundle {root}: {problem}")
                    checked.add(folder)
            path = root / name
            problem = cache.unsafe(path, OWNERS)
            if problem:
                raise BundleError(f"refused the bundle {root}: {problem}")
            if cache.sha256_file(path) != digest:
                raise BundleError(f"refused the bundle {root}: {name} does not match the "
                                  "sha256 its manifest records (altered or damaged)")
        except OSError as exc:
            raise BundleError(f"refused the bundle {root}: {name}: "
                              f"{exc.strerror or exc}") from exc


def _check_machine(path: Path, manifest: dict) -> None:
    built, here = manifest["machine"], machine()
    backends = {k.get("backend") for k in manifest["kernels"] if isinstance(k, dict)}
    wanted = dict(here) if "c" in backends else {"zeroskip": here["zeroskip"]}
    if "triton" in backends:
        wanted["triton"] = tritonenv.triton_version() if tritonenv.available() else \
            "not installed"
    differ = [f"{field}: bundle {built.get(field)!r}, this machine {value!r}"
              for field, value in wanted.items() if built.get(field) != value]
    if differ:
        raise BundleError(f"refused the bundle {path}: it was built for another machine "
                          f"({'; '.join(differ)}); generate it on this one")


# --------------------------------------------------------------------------------- active set
_lock = threading.Lock()
_loaded: list[Bundle] = []         # by load_bundle, latest first
_env: tuple[str, list[Bundle]] = ("", [])
_generation = 0


def load_bundle(path: Path | str) -> Bundle:
    """Verify the bundle at ``path`` and serve its kernels from now on (before any other
    bundle's). Raises :class:`BundleError` if it is refused."""
    global _generation
    bundle = Bundle(path)
    with _lock:
        _loaded[:] = [bundle] + [b for b in _loaded if b.path != bundle.path]
        _generation += 1
    return bundle


def unload_bundles() -> None:
    """Stop serving the bundles :func:`load_bundle` loaded (``ZEROSKIP_BUNDLE``'s stay)."""
    global _generation
    with _lock:
        _loaded.clear()
        _generation += 1


def active() -> list[Bundle]:
    """The bundles in use: :func:`load_bundle`'s, then ``ZEROSKIP_BUNDLE``'s (loaded, and
    verified, when the variable is first seen or changes)."""
    global _env, _generation
    wanted = env.get("ZEROSKIP_BUNDLE", "")
    if wanted != _env[0]:
        with _lock:
            if wanted != _env[0]:
                found = [Bundle(p) for p in wanted.split(os.pathsep) if p]
                _env = (wanted, found)
                _generation += 1
    return _loaded + _env[1]


def generation() -> int:
    """Changes whenever the active bundles do."""
    if env.get("ZEROSKIP_BUNDLE", "") != _env[0]:
        active()
    return _generation


def find(backend: str, source: str) -> Path | None:
    """The verified file of the kernel rendered as ``source`` in an active bundle, or None."""
    bundles = active()
    if not bundles:
        return None
    key = kernel_key(backend, source)
    for bundle in bundles:
        path = bundle.find(backend, key)
        if path is not None:
            return path
    return None


def covering(spec: LayerSpec) -> Bundle | None:
    """The active bundle generated for this layer (its dispatch follows that bundle)."""
    for bundle in active():
        if bundle.covers(spec):
            return bundle
    return None


__all__ = ["Bundle", "BundleError", "load_bundle", "unload_bundles", "active", "find",
           "covering", "kernel_key", "machine", "FORMAT", "VERSION"]
