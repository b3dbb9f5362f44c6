"""The C compiler: which one, with which flags, for which CPU; compiling and loading with ctypes.

``ZEROSKIP_CC`` overrides the compiler (default ``cc``; it may carry a launcher, e.g.
``"ccache gcc"``), ``ZEROSKIP_CFLAGS`` the flags (default :data:`DEFAULT_FLAGS`).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import subprocess
import time
from pathlib import Path

DEFAULT_FLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared")
TIMEOUT_S = 600


class CompileError(RuntimeError):
    """The C compiler failed; the message holds its command, stderr and the source path."""


def compiler() -> tuple[tuple[str, ...], tuple[str, ...]]:
    """``(command, flags)`` from the environment."""
    command = tuple(shlex.split(os.environ.get("ZEROSKIP_CC", "") or "cc"))
    flags = os.environ.get("ZEROSKIP_CFLAGS")
    return command, tuple(shlex.split(flags)) if flags is not None else DEFAULT_FLAGS


@functools.lru_cache(maxsize=16)
def identity(command: tuple[str, ...]) -> str:
    """The compiler's ``--version`` banner: part of every cache key."""
    try:
        done = subprocess.run([*command, "--version"], capture_output=True, text=True,
                              timeout=60)
        return f"{' '.join(command)}: {done.stdout.strip() or done.stderr.strip()}"
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{' '.join(command)}: unavailable ({exc})"


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


@functools.lru_cache(maxsize=1)
def cpu_target() -> str:
    """Machine, CPU model and ISA flags: kernels built with -march=native run only there."""
    model = ""
    try:
        model = next((line.split(":", 1)[1].strip() for line in
                      Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    except OSError:
        pass
    isa = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:16]
    return f"{platform.machine()} {model} isa:{isa}"


def vector_bytes(flags: tuple[str, ...]) -> int:
    """Width of the vectors the kernels are written in: the widest the target CPU has."""
    if not any(f in ("-march=native", "-mavx2", "-mavx512f") or f.startswith("-march=x86-64-v")
               for f in flags):
        return 16
    have = cpu_flags()
    if "avx512f" in have:
        return 64
    if "avx2" in have or "avx" in have:
        return 32
    return 16


def compile_library(command: tuple[str, ...], flags: tuple[str, ...], source: Path,
                    output: Path) -> float:
    """Compile ``source`` into the shared library ``output``; return the seconds it took."""
    argv = [*command, *flags, str(source), "-o", str(output)]
    start = time.perf_counter()
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        raise CompileError(f"cannot run the C compiler {shlex.join(argv)}: {exc}\n"
                           f"source: {source}") from exc
    if done.returncode != 0 or not output.exists():
        raise CompileError(f"the C compiler failed (exit {done.returncode}): {shlex.join(argv)}\n"
                           f"source: {source}\n{done.stderr.strip()}")
    return time.perf_counter() - start


ABI_VERSION = 4   # the entry points' signatures (zs_abi_version in layer.c.jinja)


class Library:
    """A loaded kernel library and its entry points."""

    def __init__(self, path: Path):
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        ptr = ctypes.c_void_p
        self.run = self._lib.zs_run
        self.run.argtypes = [ctypes.c_int64, ctypes.c_int, ptr, ptr, ptr, ptr]
        self.run.restype = ctypes.c_int
        self.pack = self._lib.zs_pack
        self.pack.argtypes = [ctypes.c_int, ptr, ptr, ptr]
        self.pack.restype = None
        self._lib.zs_packed_elems.restype = ctypes.c_int64
        self.packed_elems = int(self._lib.zs_packed_elems())
        self.abi_version = int(self._lib.zs_abi_version())
        if self.abi_version != ABI_VERSION:
            raise CompileError(f"{path}: kernel ABI version {self.abi_version}, this zeroskip "
                               f"calls version {ABI_VERSION}")
        self.density = self._lib.zs_density
        self.density.argtypes = [ctypes.c_int64, ptr]
        self.density.restype = ctypes.c_double
        self.same = self._lib.zs_same
        self.same.argtypes = [ctypes.c_int, ptr, ptr, ctypes.c_int64]
        self.same.restype = ctypes.c_int
        # For the compiled launcher (runtime/launcher.py), which calls them without ctypes.
        self.run_address = ctypes.cast(self.run, ctypes.c_void_p).value
        self.same_address = ctypes.cast(self.same, ctypes.c_void_p).value
