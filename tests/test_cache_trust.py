"""What the kernel cache refuses to load (files another user could have written) and how kernels
still run where the cache cannot be written: a read-only file system, a full disk."""
from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import zeroskip.functional as ZF
from test_cache import SPEC, assert_correct
from zeroskip.runtime import cache, cc, loader

OTHER_UID = 65534        # nobody


@pytest.fixture
def loads(monkeypatch):
    """Every path handed to ctypes, with its owner and mode at that moment."""
    seen: list[tuple[Path, int, int]] = []
    real = cc.Library

    def spy(path):
        info = os.lstat(path)
        seen.append((Path(path), info.st_uid, info.st_mode))
        return real(path)
    monkeypatch.setattr(cc, "Library", spy)
    return seen


@pytest.fixture
def fresh_state(monkeypatch):
    """No fallback directory or warning left from another test."""
    monkeypatch.setattr(cache, "_fallbacks", {})
    monkeypatch.setattr(cache, "_warned", set())


def built_entry(fresh_cache, monkeypatch) -> Path:
    """The entry of SPEC, built without loading it (so it can be altered and reloaded)."""
    with monkeypatch.context() as m:
        m.setattr(cc, "Library", lambda path: None)
        key = loader.kernel_for(SPEC).folder.name
    loader._kernels.clear()
    return fresh_cache / key[:2] / key


def owned_by_other(entry: Path) -> None:
    os.chown(entry / "kernel.so", OTHER_UID, OTHER_UID)


def writable_by_others(entry: Path) -> None:
    (entry / "kernel.so").chmod(0o666)


def group_writable_dir(entry: Path) -> None:
    entry.chmod(0o770)


def symlinked_library(entry: Path) -> None:
    real = entry.parent / "elsewhere.so"
    shutil.copyfile(entry / "kernel.so", real)
    (entry / "kernel.so").unlink()
    (entry / "kernel.so").symlink_to(real)


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_file_of_another_user_is_refused_and_rebuilt(fresh_cache, fresh_state, monkeypatch,
                                                     loads):
    check_refused(fresh_cache, monkeypatch, loads, owned_by_other, "owned by uid")


@pytest.mark.parametrize("tamper, says", [(writable_by_others, "writable by others"),
                                          (group_writable_dir, "writable by its group"),
                                          (symlinked_library, "symbolic link")],
                         ids=lambda v: getattr(v, "__name__", None))
def test_untrusted_entry_is_refused_and_rebuilt(fresh_cache, fresh_state, monkeypatch, loads,
                                                tamper, says):
    check_refused(fresh_cache, monkeypatch, loads, tamper, says)


def check_refused(fresh_cache, monkeypatch, loads, tamper, says) -> None:
    entry = built_entry(fresh_cache, monkeypatch)
    tamper(entry)
    with pytest.warns(cache.ZeroskipCacheWarning, match=f"refused the cache entry .*{says}"):
        assert cache.lookup(entry.name) is None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", cache.ZeroskipCacheWarning)
        kernel = loader.kernel_for(SPEC)
    assert kernel.folder == entry and cache.lookup(entry.name) is not None
    # What ctypes was given is this user's, writable by no one else, and not a link.
    (path, uid, mode), = loads
    assert path == entry / "kernel.so" and uid == os.geteuid()
    assert not stat.S_ISLNK(mode) and not mode & (stat.S_IWGRP | stat.S_IWOTH)
    assert_correct(SPEC)


def test_untrusted_cache_dir_is_not_used(tmp_path, fresh_state, monkeypatch, loads):
    root = tmp_path / "shared-cache"
    root.mkdir(mode=0o777)
    root.chmod(0o777)
    monkeypatch.setenv("ZEROSKIP_CACHE_DIR", str(root))
    monkeypatch.setattr(loader, "_kernels", {})
    with pytest.warns(cache.ZeroskipCacheWarning, match="cannot be used .*writable by others"):
        kernel = loader.kernel_for(SPEC)
    assert not any(root.iterdir())                     # nothing written into it
    assert root not in kernel.folder.parents
    assert stat.S_IMODE(kernel.folder.parents[1].stat().st_mode) == 0o700
    assert_correct(SPEC)


def test_storage_errors_are_told_apart_from_compile_errors():
    assert cache.storage_error(OSError(errno.ENOSPC, "No space left on device"))
    assert cache.storage_error(OSError(errno.EROFS, "Read-only file system"))
    assert cache.storage_error(cc.CompileError("the C compiler failed (exit 1): cc ...\n"
                                               "kernel.so: No space left on device"))
    assert not cache.storage_error(cc.CompileError("kernel.c:3: error: expected ';'"))
    assert not cache.storage_error(OSError(errno.ENOENT, "No such file or directory"))


def test_full_disk_simulated_falls_back_to_temp(fresh_cache, fresh_state, monkeypatch):
    """A build whose writes fail with ENOSPC is redone in a private temporary directory (the
    real full disk is the subprocess test below; this one runs everywhere)."""
    real = cache.build
    calls = []

    def full(key, meta, make):
        calls.append(cache.cache_dir())
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(key, meta, make)
    monkeypatch.setattr(cache, "build", full)
    with pytest.warns(cache.ZeroskipCacheWarning, match="No space left on device"):
        kernel = loader.kernel_for(SPEC)
    assert calls[0] == fresh_cache and calls[1] != fresh_cache
    assert fresh_cache not in kernel.folder.parents
    assert_correct(SPEC)


# --------------------------------------------------------------- real read-only and full disks
CHILD = textwrap.dedent("""
    import json, sys, warnings
    import torch
    import zeroskip.functional as ZF
    from zeroskip.runtime import stats
    torch.manual_seed(0)
    x, w, b = torch.randn(2, 4, 10, 10), torch.randn(8, 4, 3, 3), torch.randn(8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = ZF.conv2d(x, w, b, padding=1)
    want = torch.nn.functional.conv2d(x, w, b, padding=1)
    print(json.dumps({"error": float((y - want).abs().max()), "stats": stats.stats(),
                      "warnings": [str(c.message) for c in caught]}))
""")


def unshare_works() -> bool:
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True,
                              timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


needs_mounts = pytest.mark.skipif(not unshare_works(),
                                  reason="needs unshare -rm (user and mount namespaces)")


def run_mounted(tmp_path: Path, mount: str, cache_dir: Path) -> dict:
    """CHILD in a private mount namespace where ``mount`` (a shell command) ran first."""
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "ZEROSKIP_CACHE_DIR": str(cache_dir)}
    env.pop("TRITON_INTERPRET", None)
    command = f"{mount} && exec {sys.executable} {script}"
    done = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


# A read-only file system (the cache folder cannot even be created), and a full one: 32 KiB
# hold the cache's folders but not a kernel library.
UNWRITABLE = {"read-only": ("ro,size=1m", "cache", "Read-only file system"),
              "full": ("size=32k,mode=0700", "", "No space left on device")}


@needs_mounts
@pytest.mark.parametrize("case", UNWRITABLE)
def test_unwritable_cache_still_runs(tmp_path, case):
    options, below, says = UNWRITABLE[case]
    root = tmp_path / "mount"
    root.mkdir()
    found = run_mounted(tmp_path, f"mount -t tmpfs -o {options} tmpfs {root}", root / below)
    assert found["error"] < 1e-4
    assert found["stats"]["kernel_calls"] == 1 and found["stats"]["fallback_calls"] == 0
    assert any("cannot be used" in w and says in w for w in found["warnings"]), \
        found["warnings"]


@needs_mounts
def test_read_only_cache_with_entries_serves_them(tmp_path):
    warm = tmp_path / "warm"
    env = {**os.environ, "ZEROSKIP_CACHE_DIR": str(warm)}
    env.pop("TRITON_INTERPRET", None)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    subprocess.run([sys.executable, script], check=True, env=env, capture_output=True,
                   timeout=300)
    found = run_mounted(tmp_path, f"mount --bind {warm} {warm} && "
                                  f"mount -o remount,ro,bind {warm}", warm)
    assert found["error"] < 1e-4
    assert found["stats"]["compiles"] == 0 and found["stats"]["cache_hits"] == 1
    assert not found["warnings"]


def test_lock_held_too_long_falls_back(fresh_cache, fresh_state, monkeypatch):
    """A builder that hangs while holding a kernel's lock: the waiter gives up after
    LOCK_TIMEOUT_S and the call runs torch's op with a warning, not an exception."""
    from filelock import FileLock
    from zeroskip.runtime import stats
    monkeypatch.setattr(cache, "LOCK_TIMEOUT_S", 0.2)
    monkeypatch.setattr(stats, "_warned", set())
    real_lock = cache.lock
    held = []

    def lock(key):
        if not held:       # another process's lock on the same file, held throughout
            holder = FileLock(real_lock(key).lock_file, thread_local=False, is_singleton=False)
            holder.acquire()
            held.append(holder)
        return real_lock(key)
    monkeypatch.setattr(cache, "lock", lock)
    x, w = torch.randn(1, 4, 10, 10), torch.randn(8, 4, 3, 3)
    with pytest.warns(stats.ZeroskipFallbackWarning, match="waited 0.2 s for the lock"):
        y = ZF.conv2d(x, w, padding=1)
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, padding=1))
    held[0].release()
