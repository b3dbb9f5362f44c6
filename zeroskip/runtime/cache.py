"""The on-disk kernel cache: keys, layout, validation, atomic writes and per-key file locks.

Layout: ``<cache>/<key[:2]>/<key>/{kernel.c, kernel.so, meta.json}``, where ``<cache>`` is
``ZEROSKIP_CACHE_DIR``, else ``$XDG_CACHE_HOME/zeroskip``, else ``~/.cache/zeroskip``, created
0700. ``meta.json`` records the sha256 of every file: an entry whose files are missing,
truncated or altered is treated as absent and rebuilt. Entries are built in a temporary
directory beside their final place and moved there with one ``os.replace``, so readers never see
half an entry; builders of one key serialize on an OS file lock (released by the kernel if a
holder dies).

What gets loaded is code, so nothing is trusted that another user could have written: a cache
directory, entry or file that is a symlink, owned by another user or writable by group or
others is refused (never passed to ctypes or imported), with a warning; a refused entry is
rebuilt. Where the cache cannot be written (a read-only file system, a full disk, a refused
cache directory) kernels are built in a private temporary directory for the rest of the process
(``/dev/shm`` if the temporary directory fails too), with one warning: they still run.
"""
from __future__ import annotations

import atexit
import errno
import hashlib
import json
import os
import shutil
import stat
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock, Timeout

META = "meta.json"
LOCK_TIMEOUT_S = 900
# Errors that mean "this place cannot hold files", not "this kernel is wrong".
STORAGE_ERRNOS = (errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EFBIG, errno.EACCES,
                  errno.EPERM)


class ZeroskipCacheWarning(RuntimeWarning):
    """The kernel cache (or an entry or bundle file) was refused or cannot be written; the
    message says what, why, and where kernels are built instead."""


class CacheError(RuntimeError):
    """No place could hold a kernel's build: the cache and every fallback directory failed."""


class UnsafeFile(PermissionError):
    """A file or directory another user could have written: refused, never loaded."""


def configured_dir() -> Path:
    """The cache directory the environment names (not created)."""
    root = os.environ.get("ZEROSKIP_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        root = os.path.join(base, "zeroskip")
    return Path(root)


def unsafe(path: Path, owners: tuple[int, ...] | None = None) -> str | None:
    """Why ``path`` must not be trusted (a symlink; owned by a user not in ``owners``, by
    default only this one; writable by group or others), or None. Missing: OSError."""
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        return f"{path} is a symbolic link"
    allowed = (os.geteuid(),) if owners is None else owners
    if info.st_uid not in allowed:
        return f"{path} is owned by uid {info.st_uid}, not by this user (uid {os.geteuid()})"
    if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"{path} is writable by {'others' if info.st_mode & stat.S_IWOTH else 'its group'}"
                f" (mode {stat.S_IMODE(info.st_mode):o})")
    return None


_state_lock = threading.RLock()
_fallbacks: dict[str, Path] = {}      # configured root -> the private directory used instead
_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    with _state_lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, ZeroskipCacheWarning, stacklevel=3)


def _root_problem(root: Path) -> str | None:
    """Why the configured root cannot be read from (created 0700 if missing), or None."""
    try:
        root.mkdir(mode=0o700, parents=True, exist_ok=True)
        return unsafe(root)
    except OSError as exc:
        return f"{root}: {exc.strerror or exc}"


def cache_dir() -> Path:
    """The directory kernels are built in: the configured cache (created 0700), or this
    process's fallback directory once the cache was found unusable."""
    root = configured_dir()
    fallback = _fallbacks.get(str(root))
    if fallback is not None:
        return fallback
    problem = _root_problem(root)
    if problem:
        return _fall_back(root, problem)
    return root


def roots() -> list[Path]:
    """Where entries are looked up: the configured cache (if trusted) and the fallback."""
    root = configured_dir()
    found = [] if _root_problem(root) else [root]
    fallback = _fallbacks.get(str(root))
    return found + [fallback] if fallback is not None else found


def _fall_back(root: Path, why: str) -> Path:
    """Switch this process's builds for ``root`` to a private temporary directory."""
    with _state_lock:
        if str(root) in _fallbacks:
            return _fallbacks[str(root)]
        tried = []
        for parent in (None, "/dev/shm"):
            try:
                place = Path(tempfile.mkdtemp(prefix="zeroskip-cache-", dir=parent))
                probe = place / ".probe"
                probe.write_bytes(b"\0" * 4096)   # a full disk fails here, not later
                probe.unlink()
            except OSError as exc:
                tried.append(f"{parent or tempfile.gettempdir()}: {exc.strerror or exc}")
                continue
            atexit.register(shutil.rmtree, place, ignore_errors=True)
            _fallbacks[str(root)] = place
            _warn_once(f"fallback:{root}",
                       f"zeroskip: the kernel cache {root} cannot be used ({why}); kernels are "
                       f"built in {place} for this process and removed at exit")
            return place
        raise CacheError(f"the kernel cache {root} cannot be used ({why}), nor can a temporary "
                         f"directory ({'; '.join(tried)})")


def storage_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk cannot take the files (full, read-only, not permitted),
    directly or in a compiler's message."""
    if isinstance(exc, UnsafeFile):
        return True
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return True
    text = str(exc)
    return any(os.strerror(code) in text for code in STORAGE_ERRNOS)


def make_key(**parts: Any) -> str:
    """sha256 of the parts (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check(folder: Path, files: Any) -> tuple[str, bool] | None:
    """Why the entry ``folder`` with files ``{name: sha256}`` must not be loaded, as
    ``(problem, untrusted)``, or None: untrusted files (see :func:`unsafe`) are refused with a
    warning, damaged ones (missing, altered) simply rebuilt."""
    if not isinstance(files, dict) or not files:
        return f"{folder}: no file list", False
    for name in files:
        if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
            return f"{folder}: bad file name {name!r}", True
    try:
        for path in (folder, folder / META, *(folder / name for name in files)):
            problem = unsafe(path)
            if problem:
                return problem, True
        for name, digest in files.items():
            if sha256_file(folder / name) != digest:
                return f"{folder / name}: sha256 does not match", False
    except OSError as exc:
        return f"{folder}: {exc.strerror or exc}", False
    return None


def _lookup_in(root: Path, key: str) -> dict[str, Any] | None:
    folder = root / key[:2] / key
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key:
        return None
    found = _check(folder, meta.get("files"))
    if found is None:
        return meta
    problem, untrusted = found
    if untrusted:
        _warn_once(f"entry:{folder}", f"zeroskip: refused the cache entry {folder}: "
                                      f"{problem}; it is rebuilt")
    return None


def _search(key: str) -> tuple[Path, dict[str, Any]] | None:
    for root in roots():
        meta = _lookup_in(root, key)
        if meta is not None:
            return root / key[:2] / key, meta
    return None


def find(key: str) -> Path | None:
    """The folder of the complete, intact and trusted entry ``key``, or None."""
    found = _search(key)
    return found and found[0]


def lookup(key: str) -> dict[str, Any] | None:
    """The entry's metadata if it is complete, intact and trusted, else None."""
    found = _search(key)
    return found and found[1]


def lock(key: str) -> FileLock:
    folder = cache_dir() / key[:2]
    folder.mkdir(mode=0o700, exist_ok=True)
    problem = unsafe(folder)
    if problem:
        raise UnsafeFile(errno.EACCES, problem)
    return FileLock(str(folder / f"{key}.lock"), timeout=LOCK_TIMEOUT_S)


def build(key: str, meta: dict[str, Any], make: Callable[[Path], list[str]]) -> dict[str, Any]:
    """Create the entry: ``make(tmpdir)`` writes files into a fresh directory and returns their
    names; their hashes go into ``meta.json``; the directory then replaces any stale entry.
    Call under :func:`lock`. If ``make`` raises, nothing is left behind."""
    final = cache_dir() / key[:2] / key
    prefix = f".tmp-{key[:16]}-"
    for stale in final.parent.glob(prefix + "*"):   # a builder of this key that died: we
        shutil.rmtree(stale, ignore_errors=True)     # hold the key's lock, so none is alive
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        names = make(tmp)
        meta = {**meta, "key": key,
                "files": {name: sha256_file(tmp / name) for name in names}}
        (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if final.exists() or final.is_symlink():   # a stale, broken or refused entry
            if final.is_symlink() or not final.is_dir():
                final.unlink()
            else:
                shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta


def fetch(key: str, meta: dict[str, Any], make: Callable[[Path], list[str]]
          ) -> tuple[Path, bool]:
    """``(folder, built)`` of entry ``key``: found, or built by ``make`` under the key's lock
    (see :func:`build`). Where the cache cannot take the files, the build is retried once in
    this process's fallback directory (a warning says so); :class:`CacheError` if that fails
    too, or if the lock is not acquired in ``LOCK_TIMEOUT_S``. Errors of ``make`` itself (a
    compile error) propagate."""
    found = find(key)
    if found is not None:
        return found, False
    for attempt in (1, 2):
        try:
            with lock(key):
                found = find(key)
                if found is not None:
                    return found, False
                build(key, meta, make)
                return cache_dir() / key[:2] / key, True
        except Timeout as exc:          # a builder holding the key hangs (stopped, stuck)
            raise CacheError(f"waited {LOCK_TIMEOUT_S} s for the lock of kernel {key[:16]}, "
                             f"which another process holds ({exc.lock_file})") from exc
        except Exception as exc:
            if not storage_error(exc):
                raise
            if attempt == 2:
                raise CacheError(f"cannot build kernel {key[:16]} in {cache_dir()}: "
                                 f"{exc}") from exc
            _fall_back(configured_dir(), f"{type(exc).__name__}: {exc}")
    raise AssertionError("unreachable")
