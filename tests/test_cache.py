"""The on-disk kernel cache: layout and validation, hits across processes, recovery from
corrupt entries, concurrent builders, what the key depends on, and directory permissions."""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from oracle import random_inputs, torch_result
from zeroskip.codegen import emit
from zeroskip import LayerSpec, Workload
from zeroskip.runtime import cache, cc, loader, stats

SPEC = LayerSpec.conv(4, 8, 3, padding=1, input_size=(10, 10))
BATCH = Workload(2)
TESTS = Path(__file__).parent


def counts_since(before: dict) -> dict:
    """Counter increments since ``before`` (a stats.stats() snapshot)."""
    now = stats.stats()
    return {name: now[name] - before[name] for name in ("compiles", "cache_hits", "memo_hits")}


def assert_correct(spec: LayerSpec) -> None:
    arrays = random_inputs(spec, workload=BATCH)
    want = torch_result(spec, arrays)
    got = loader.run_spec(spec, {k: torch.tensor(v, dtype=torch.float32)
                              for k, v in arrays.items()}).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def entries(root: Path) -> list[Path]:
    """Complete-looking entry folders: ``<root>/<xx>/<key>`` with a 64-hex name."""
    return sorted(p for p in root.glob("*/*") if p.is_dir() and len(p.name) == 64)


# ----------------------------------------------------------------------------- layout
def test_layout_meta_and_memo(fresh_cache, monkeypatch):
    before = stats.stats()
    kernel = loader.kernel_for(SPEC)
    key = kernel.folder.name
    assert counts_since(before) == {"compiles": 1, "cache_hits": 0, "memo_hits": 0}

    # Exactly one entry, at <cache>/<key[:2]>/<key>/, holding the three files.
    assert entries(fresh_cache) == [fresh_cache / key[:2] / key] == [kernel.folder]
    assert sorted(p.name for p in kernel.folder.iterdir()) == ["kernel.c", "kernel.so",
                                                               "meta.json"]
    meta = json.loads((kernel.folder / "meta.json").read_text())
    assert meta["key"] == key and sorted(meta["files"]) == ["kernel.c", "kernel.so"]
    for name, digest in meta["files"].items():
        assert hashlib.sha256((kernel.folder / name).read_bytes()).hexdigest() == digest
    assert LayerSpec.from_dict(meta["spec"]) == SPEC
    assert cache.lookup(key) == meta

    # Same spec again: the in-process memo, without even looking at the disk.
    def no_disk(key):
        raise AssertionError("a memo hit must not look the cache up")
    with monkeypatch.context() as m:
        m.setattr(cache, "lookup", no_disk)
        before = stats.stats()
        assert loader.kernel_for(SPEC) is kernel
        assert counts_since(before) == {"compiles": 0, "cache_hits": 0, "memo_hits": 1}

    # An empty memo: found on disk, not compiled.
    monkeypatch.setattr(loader, "_kernels", {})
    before = stats.stats()
    again = loader.kernel_for(SPEC)
    assert counts_since(before) == {"compiles": 0, "cache_hits": 1, "memo_hits": 0}
    assert again is not kernel and again.folder == kernel.folder
    assert_correct(SPEC)


# ----------------------------------------------------------------------------- other processes
# Builds SPEC, after waiting until argv[2] processes are ready (files <argv[1]>.<pid>), and
# prints its stats and its error against torch as JSON.
CHILD = textwrap.dedent("""
    import glob, json, os, sys, time
    sys.path.insert(0, {tests!r})
    import numpy as np, torch
    import zeroskip
    from oracle import random_inputs, torch_result
    from zeroskip import LayerSpec, Workload
    from zeroskip.runtime.loader import run_spec
    spec = LayerSpec.from_dict({spec!r})
    arrays = random_inputs(spec, workload=zeroskip.Workload(2))
    want = torch_result(spec, arrays)
    barrier, count = sys.argv[1], int(sys.argv[2])
    open(f"{{barrier}}.{{os.getpid()}}", "w").close()
    deadline = time.time() + 60
    while len(glob.glob(barrier + ".*")) < count and time.time() < deadline:
        time.sleep(0.002)
    got = run_spec(spec, {{k: torch.tensor(v, dtype=torch.float32) for k, v in arrays.items()}})
    print(json.dumps({{"stats": zeroskip.stats(),
                      "error": float(np.abs(got.numpy() - want).max())}}))
""")


def start_children(cache_dir: Path, count: int, barrier: Path) -> list[subprocess.Popen]:
    script = CHILD.format(tests=str(TESTS), spec=SPEC.to_dict())
    env = dict(os.environ, ZEROSKIP_CACHE_DIR=str(cache_dir))
    return [subprocess.Popen([sys.executable, "-c", script, str(barrier), str(count)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(count)]


def results(children: list[subprocess.Popen]) -> list[dict]:
    found = []
    for child in children:
        out, err = child.communicate(timeout=120)
        assert child.returncode == 0, err
        found.append(json.loads(out.strip().splitlines()[-1]))
    return found


def test_second_process_hits_cache(fresh_cache, tmp_path):
    key = loader.kernel_for(SPEC).folder.name
    (child,) = results(start_children(fresh_cache, 1, tmp_path / "barrier"))
    assert child["stats"]["compiles"] == 0 and child["stats"]["cache_hits"] == 1
    assert child["error"] < 1e-4
    assert entries(fresh_cache) == [fresh_cache / key[:2] / key]


def test_concurrent_cold_builds_compile_once(fresh_cache, tmp_path):
    children = start_children(fresh_cache, 2, tmp_path / "barrier")
    found = results(children)
    assert sorted((r["stats"]["compiles"], r["stats"]["cache_hits"]) for r in found) == \
        [(0, 1), (1, 0)]
    assert all(r["error"] < 1e-4 for r in found)
    (entry,) = entries(fresh_cache)
    assert cache.lookup(entry.name) is not None
    assert not list(fresh_cache.glob("*/.tmp-*"))   # no build directory left behind


# ----------------------------------------------------------------------------- corruption
def truncate_so(entry: Path) -> None:
    with open(entry / "kernel.so", "r+b") as f:
        f.truncate(100)


def flip_byte_so(entry: Path) -> None:
    data = bytearray((entry / "kernel.so").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (entry / "kernel.so").write_bytes(bytes(data))


def garbage_meta(entry: Path) -> None:
    (entry / "meta.json").write_bytes(b"\x00{not json")


def delete_so(entry: Path) -> None:
    (entry / "kernel.so").unlink()


def edit_source(entry: Path) -> None:
    with open(entry / "kernel.c", "a") as f:
        f.write("/* edited */\n")


def crashed_build(entry: Path) -> None:
    """A builder died before its final rename: only a half-written temp dir is left."""
    key = entry.name
    tmp = entry.parent / f".tmp-{key[:16]}-crashed"
    tmp.mkdir()
    (tmp / "kernel.c").write_text((entry / "kernel.c").read_text()[:200])
    (tmp / "kernel.so").write_bytes((entry / "kernel.so").read_bytes()[:100])
    for path in entry.iterdir():
        path.unlink()
    entry.rmdir()


@pytest.mark.parametrize("corrupt", [truncate_so, flip_byte_so, garbage_meta, delete_so,
                                     edit_source, crashed_build], ids=lambda f: f.__name__)
def test_corrupt_entry_is_rebuilt(fresh_cache, monkeypatch, corrupt):
    # Build the entry without loading its library: a process that has a library mapped may not
    # truncate it in place (SIGBUS), and dlopen would return that stale handle for the path.
    with monkeypatch.context() as m:
        m.setattr(cc, "Library", lambda path: None)
        key = loader.kernel_for(SPEC).folder.name
    entry = fresh_cache / key[:2] / key
    assert cache.lookup(key) is not None
    corrupt(entry)
    assert cache.lookup(key) is None

    loader._kernels.clear()                           # a fresh memo
    before = stats.stats()
    kernel = loader.kernel_for(SPEC)
    assert counts_since(before) == {"compiles": 1, "cache_hits": 0, "memo_hits": 0}
    assert kernel.folder == entry and cache.lookup(key) is not None
    assert not list(entry.parent.glob(".tmp-*"))   # a dead builder's directory is cleared too
    assert_correct(SPEC)


# ----------------------------------------------------------------------------- keys
def test_key_depends_on_flags_and_source_not_batch(fresh_cache, monkeypatch):
    base = loader.kernel_for(SPEC)

    # The same spec again (any batch size runs on it): the same entry, found on disk.
    monkeypatch.setattr(loader, "_kernels", {})
    before = stats.stats()
    assert loader.kernel_for(LayerSpec.from_dict(SPEC.to_dict())).folder == base.folder
    assert counts_since(before)["cache_hits"] == 1

    # Other compiler flags, same source: another key.
    flags = cc.compiler()[1]
    monkeypatch.setenv("ZEROSKIP_CFLAGS", shlex.join((*flags, "-DZEROSKIP_TEST_FLAG=1")))
    monkeypatch.setattr(loader, "_kernels", {})
    flagged = loader.kernel_for(SPEC)
    assert flagged.source.read_text() == base.source.read_text()
    assert flagged.folder.name != base.folder.name
    assert "-DZEROSKIP_TEST_FLAG=1" in json.loads((flagged.folder / "meta.json").read_text())[
        "flags"]
    monkeypatch.delenv("ZEROSKIP_CFLAGS")

    # Other source, same flags: another key.
    render = emit.render
    monkeypatch.setattr(emit, "render", lambda plan: render(plan) + "/* variant */\n")
    monkeypatch.setattr(loader, "_kernels", {})
    variant = loader.kernel_for(SPEC)
    assert variant.source.read_text() == base.source.read_text() + "/* variant */\n"
    assert len({base.folder.name, flagged.folder.name, variant.folder.name}) == 3
    assert len(entries(fresh_cache)) == 3


# ----------------------------------------------------------------------------- permissions
def test_cache_dir_created_private(tmp_path, monkeypatch):
    root = tmp_path / "not" / "yet" / "cache"
    monkeypatch.setenv("ZEROSKIP_CACHE_DIR", str(root))
    monkeypatch.setattr(loader, "_kernels", {})
    assert cache.cache_dir() == root
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    # Every folder the cache makes for an entry is private too.
    loader.kernel_for(SPEC)
    folders = [p for p in root.rglob("*") if p.is_dir()]
    assert folders and all(stat.S_IMODE(p.stat().st_mode) == 0o700 for p in folders)
