"""The on-disk kernel cache: keys, layout, validation, atomic writes and per-key file locks.

Layout: ``<cache>/<key[:2]>/<key>/{kernel.c, kernel.so, meta.json}``, where ``<cache>`` is
``ZEROSKIP_CACHE_DIR``, else ``$XDG_CACHE_HOME/zeroskip``, else ``~/.cache/zeroskip``.
``meta.json`` records the sha256 of every file: an entry whose files are missing, truncated or
altered is treated as absent and rebuilt. Entries are built in a temporary directory beside
their final place and moved there with one ``os.replace``, so readers never see half an entry;
builders of one key serialize on an OS file lock (released by the kernel if a holder dies).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock

META = "meta.json"
LOCK_TIMEOUT_S = 900


def cache_dir() -> Path:
    root = os.environ.get("ZEROSKIP_CACHE_DIR")
    if not root:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
        root = os.path.join(base, "zeroskip")
    path = Path(root)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def make_key(**parts: Any) -> str:
    """sha256 of the parts (JSON, sorted keys)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def entry_dir(key: str) -> Path:
    return cache_dir() / key[:2] / key


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def lookup(key: str) -> dict[str, Any] | None:
    """The entry's metadata if it is complete and intact, else None."""
    folder = entry_dir(key)
    try:
        meta = json.loads((folder / META).read_text())
        if not isinstance(meta, dict) or meta.get("key") != key:
            return None
        files = meta.get("files")
        if not isinstance(files, dict) or not files:
            return None
        for name, digest in files.items():
            if "/" in name or sha256_file(folder / name) != digest:
                return None
    except (OSError, ValueError):
        return None
    return meta


def lock(key: str) -> FileLock:
    folder = cache_dir() / key[:2]
    folder.mkdir(mode=0o700, exist_ok=True)
    return FileLock(str(folder / f"{key}.lock"), timeout=LOCK_TIMEOUT_S)


def build(key: str, meta: dict[str, Any], make: Callable[[Path], list[str]]) -> dict[str, Any]:
    """Create the entry: ``make(tmpdir)`` writes files into a fresh directory and returns their
    names; their hashes go into ``meta.json``; the directory then replaces any stale entry.
    Call under :func:`lock`. If ``make`` raises, nothing is left behind."""
    final = entry_dir(key)
    prefix = f".tmp-{key[:16]}-"
    for stale in final.parent.glob(prefix + "*"):   # a builder of this key that died: we
        shutil.rmtree(stale, ignore_errors=True)     # hold the key's lock, so none is alive
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=final.parent))
    try:
        names = make(tmp)
        meta = {**meta, "key": key,
                "files": {name: sha256_file(tmp / name) for name in names}}
        (tmp / META).write_text(json.dumps(meta, indent=1, sort_keys=True))
        if final.exists():              # a stale or broken entry: we hold the lock
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return meta
