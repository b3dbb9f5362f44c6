"""Bundles: ``zeroskip trace`` then ``zeroskip generate`` then a run with no compiler, and every
way a bundle is refused (another machine, a hash mismatch, files others could have written)
without anything of it reaching ctypes or the import system."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest
import torch

import zeroskip
import zeroskip.functional as ZF
from zeroskip import LayerSpec, Workload, generate
from zeroskip.runtime import autotune, bundle, calls, cc, dispatch, loader, stats, tuning

NET = textwrap.dedent("""
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.ReLU(),
                             nn.ConvTranspose2d(8, 4, 4, 2, 1))
""")

# Runs the converted network forward and backward and compares it with torch's.
CHILD = textwrap.dedent("""
    import copy, json, sys, warnings
    import torch, zeroskip
    from bundlenet import build
    if len(sys.argv) > 1:
        zeroskip.load_bundle(sys.argv[1])
    model = build()
    reference = copy.deepcopy(model)
    zeroskip.convert(model)
    torch.manual_seed(1)
    x = torch.randn(2, 4, 12, 12)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y = model(xa)
        y.square().sum().backward()
    want = reference(xb)
    want.square().sum().backward()
    error = max(float((y - want).abs().max()), float((xa.grad - xb.grad).abs().max()),
                *(float((p.grad - q.grad).abs().max())
                  for p, q in zip(model.parameters(), reference.parameters())))
    print(json.dumps({"error": error, "stats": zeroskip.stats(),
                      "warnings": [str(c.message) for c in caught]}))
""")


def cli(*args: str, env: dict, cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "zeroskip.cli", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def child_env(tmp: Path, **extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp), *sys.path])}
    for name in ("TRITON_INTERPRET", "ZEROSKIP_BUNDLE", "ZEROSKIP_BACKEND"):
        env.pop(name, None)
    return {**env, **extra}


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A traced network's bundle, made by the two commands of the README."""
    tmp = tmp_path_factory.mktemp("bundle")
    (tmp / "bundlenet.py").write_text(NET)
    (tmp / "child.py").write_text(CHILD)
    env = child_env(tmp, ZEROSKIP_CACHE_DIR=str(tmp / "build-cache"))
    traced = cli("trace", "bundlenet:build", "--input-shape", "2,4,12,12", "--batches", "2",
                 "-o", str(tmp / "layers.json"), env=env, cwd=tmp)
    assert "layers.json" in traced.stdout
    cli("generate", str(tmp / "layers.json"), "--out", str(tmp / "bundle"), "--no-progress",
        env=env, cwd=tmp)
    return tmp


def run_child(tmp: Path, *args: str, **extra: str) -> dict:
    done = subprocess.run([sys.executable, str(tmp / "child.py"), *args], capture_output=True,
                          text=True, env=child_env(tmp, **extra), cwd=tmp, timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_bundle_runs_without_a_compiler(made, tmp_path):
    manifest = json.loads((made / "bundle" / "manifest.json").read_text())
    layers = json.loads((made / "layers.json").read_text())["layers"]
    assert [layer["spec"]["activation"] for layer in layers] == ["relu", "relu", "none"]
    kernels = [k for k in manifest["kernels"] if k["backend"] == "c"]
    assert {k["role"] for k in kernels} == {"forward", "grad_input", "grad_weight"}
    # ZEROSKIP_CC=/bin/false: any compile would fail and fall back to torch with a warning.
    found = run_child(made, ZEROSKIP_CC="/bin/false", ZEROSKIP_BUNDLE=str(made / "bundle"),
                      ZEROSKIP_CACHE_DIR=str(tmp_path / "empty-cache"))
    assert found["error"] < 1e-3
    assert found["stats"]["fallback_calls"] == 0, found["warnings"]
    assert found["stats"]["compiles"] == 0
    assert found["stats"]["bundle_hits"] >= 7 and not found["warnings"]
    assert not list((tmp_path / "empty-cache").rglob("*.so"))


def test_no_compiler_is_even_asked_its_version(made, tmp_path):
    """A compiler that records every invocation: a bundle-served run never starts it (not even
    for ``--version``), loaded here with load_bundle rather than the variable."""
    log = tmp_path / "invoked"
    spy = tmp_path / "cc-spy"
    spy.write_text(f"#!/bin/sh\necho \"$@\" >> {log}\nexit 1\n")
    spy.chmod(0o755)
    found = run_child(made, str(made / "bundle"), ZEROSKIP_CC=str(spy),
                      ZEROSKIP_CACHE_DIR=str(tmp_path / "empty-cache"))
    assert found["error"] < 1e-3 and found["stats"]["fallback_calls"] == 0
    assert not log.exists()


def test_without_bundle_the_same_run_has_no_kernels(made, tmp_path):
    """The control: the same run with no bundle and no compiler falls back to torch."""
    found = run_child(made, ZEROSKIP_CC="/bin/false",
                      ZEROSKIP_CACHE_DIR=str(tmp_path / "empty-cache"))
    assert found["error"] < 1e-3
    assert found["stats"]["fallback_calls"] > 0 and found["stats"]["bundle_hits"] == 0


# ----------------------------------------------------------------------------- refusals
@pytest.fixture
def served(fresh_cache, monkeypatch):
    """No bundle loaded before or after; every path ctypes is given, recorded."""
    bundle.unload_bundles()
    loaded: list[Path] = []
    real = cc.Library
    monkeypatch.setattr(cc, "Library", lambda path: loaded.append(Path(path)) or real(path))
    monkeypatch.delenv("ZEROSKIP_BUNDLE", raising=False)
    yield loaded
    bundle.unload_bundles()


def copy_of(made: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "copy"
    shutil.copytree(made / "bundle", copy)
    return copy


def c_file(root: Path, name: str = "kernel.so") -> Path:
    return sorted((root / "c").glob(f"*/{name}"))[0]


def edit_manifest(root: Path, change) -> None:
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def other_cpu(root):
    edit_manifest(root, lambda m: m["machine"].update(cpu="aarch64 Neoverse-V2 isa:0"))


def other_version(root):
    edit_manifest(root, lambda m: m["machine"].update(zeroskip="0.0.1"))


def flipped_byte(root):
    path = c_file(root)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


def truncated(root):
    with open(c_file(root), "r+b") as f:
        f.truncate(64)


def edited_source(root):
    with open(c_file(root, "kernel.c"), "a") as f:
        f.write("/* edited */\n")


def missing_file(root):
    c_file(root).unlink()


def writable_by_others(root):
    c_file(root).chmod(0o666)


def group_writable_folder(root):
    c_file(root).parent.chmod(0o775)


def owned_by_another_user(root):
    os.chown(c_file(root), 65534, 65534)


def symlink(root):
    path = c_file(root)
    shutil.copyfile(path, root / "elsewhere.so")
    path.unlink()
    path.symlink_to(root / "elsewhere.so")


def escaping_path(root):
    edit_manifest(root, lambda m: m["files"].update({"../outside": "0" * 64}))


def garbage_manifest(root):
    (root / "manifest.json").write_bytes(b"\x00 not json")


def other_format(root):
    edit_manifest(root, lambda m: m.update(version=99))


REFUSALS = [(other_cpu, "built for another machine .*cpu"),
            (other_version, "built for another machine .*zeroskip"),
            (flipped_byte, "does not match the sha256"), (truncated, "does not match"),
            (edited_source, "does not match"), (missing_file, "No such file"),
            (writable_by_others, "writable by others"),
            (group_writable_folder, "writable by its group"),
            (owned_by_another_user, "owned by uid 65534"), (symlink, "symbolic link"),
            (escaping_path, "bad file entry"), (garbage_manifest, "not JSON"),
            (other_format, "format version 99")]


@pytest.mark.parametrize("tamper, says", REFUSALS, ids=[f.__name__ for f, _ in REFUSALS])
def test_bundle_is_refused(made, tmp_path, served, tamper, says):
    if tamper is owned_by_another_user and os.geteuid() != 0:
        pytest.skip("giving a file to another user needs root")
    root = copy_of(made, tmp_path)
    tamper(root)
    with pytest.raises(bundle.BundleError, match=says):
        zeroskip.load_bundle(root)
    assert bundle.active() == [] and served == []


def test_refused_bundle_in_environment_stops_the_call(made, tmp_path, served, monkeypatch):
    root = copy_of(made, tmp_path)
    flipped_byte(root)
    monkeypatch.setenv("ZEROSKIP_BUNDLE", str(root))
    with pytest.raises(bundle.BundleError, match="does not match the sha256"):
        ZF.conv2d(torch.randn(1, 4, 12, 12), torch.randn(8, 4, 3, 3), padding=1)
    assert served == []


def test_file_altered_after_loading_is_never_loaded(made, tmp_path, served):
    """Each kernel's files are hashed again just before ctypes sees them."""
    root = copy_of(made, tmp_path)
    zeroskip.load_bundle(root)
    for path in (root / "c").glob("*/kernel.so"):
        flipped = bytearray(path.read_bytes())
        flipped[100] ^= 1
        path.write_bytes(bytes(flipped))
    with pytest.raises(bundle.BundleError, match="does not match the sha256"):
        # the network's last layer, which the bundle holds
        ZF.conv_transpose2d(torch.randn(1, 8, 6, 6), torch.randn(8, 4, 4, 4), torch.randn(4),
                            stride=2, padding=1)
    assert served == []


def test_kernel_missing_from_bundle_is_compiled(made, tmp_path, served):
    zeroskip.load_bundle(copy_of(made, tmp_path))
    before = stats.stats()
    x, w = torch.randn(1, 3, 9, 9), torch.randn(5, 3, 3, 3)   # a layer it was not made for
    torch.testing.assert_close(ZF.conv2d(x, w), torch.nn.functional.conv2d(x, w))
    assert stats.stats()["compiles"] - before["compiles"] == 1
    assert stats.stats()["bundle_hits"] == before["bundle_hits"]


def test_generate_replaces_only_bundles(tmp_path, fresh_cache):
    layers = [("one", LayerSpec.conv(2, 4, 3, input_size=(6, 6)), Workload())]
    keep = tmp_path / "not-a-bundle"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a bundle"):
        generate.make_bundle(layers, keep, progress=False)
    assert (keep / "notes.txt").read_text() == "mine"
    out = tmp_path / "out"
    first = generate.make_bundle(layers, out, progress=False)
    second = generate.make_bundle(layers, out, progress=False, include_grads=False)
    assert len(second["kernels"]) < len(first["kernels"])
    assert bundle.Bundle(out).kernels.keys() == {("c", k["key"]) for k in second["kernels"]}
    assert not list(tmp_path.glob(".out.tmp-*"))
    assert all(not p.stat().st_mode & (stat.S_IWGRP | stat.S_IWOTH) for p in out.rglob("*"))


# ----------------------------------------------------------------------------- tuning
def test_tuned_bundle_decides_dispatch(tmp_path, fresh_cache, served, monkeypatch):
    """With --tune the bundle carries this machine's choices, and its layers dispatch on them
    without reading the tuning database."""
    spec = LayerSpec.conv(16, 16, 3, padding=1, input_size=(8, 8))
    manifest = generate.make_bundle([("layer", spec, Workload(2, 0.2))], tmp_path / "tuned",
                                    tune=True, include_grads=False, progress=False)
    loaded = zeroskip.load_bundle(tmp_path / "tuned")
    (record,) = loaded.records(spec).values()
    assert loaded.density(spec) == 0.2
    choice = record["choice"]
    bundled = {k["variant"] for k in manifest["kernels"]}
    assert choice == "torch" or choice in bundled | {"dense"}

    def no_database():
        raise AssertionError("the tuning database was read for a bundled layer")
    monkeypatch.setattr(tuning, "database", no_database)
    x = autotune.sparse_input((2, 16, 8, 8), 0.2)
    w, b = torch.randn(16, 16, 3, 3), torch.randn(16)
    torch.testing.assert_close(ZF.conv2d(x, w, b, padding=1),
                               torch.nn.functional.conv2d(x, w, b, padding=1),
                               rtol=1e-4, atol=1e-4)
    (call,) = [c for c in calls._calls.values() if isinstance(c, dispatch.Operator)]
    assert call.last == ("dense" if choice.startswith("dense") and "/" not in choice
                         else choice)


def _follows_bundle(monkeypatch, records, run):
    """``run()`` (a forward and backward of a bundled layer) dispatches each operator on the
    bundle's records, reading no tuning database; returns what each operator ran."""
    def no_database():
        raise AssertionError("the tuning database was read for a bundled layer")
    monkeypatch.setattr(tuning, "database", no_database)
    with dispatch.observe() as ran:
        run()
    chosen = {d.spec.op: d.choice for d in ran}
    assert set(chosen) == {"conv", "conv_grad_input", "conv_grad_weight"}
    for op, choice in chosen.items():
        (record,) = records[op].values()
        assert choice == record["choice"]
    return chosen


def test_tuned_bundle_carries_the_gradients_too(tmp_path, fresh_cache, served, monkeypatch):
    """--tune tunes the forward and both gradients at the traced workload (the input gradient
    at the output gradient's density) and bundles each choice's kernel: a training step then
    runs every operator's tuned choice with no tuning database and no compiler."""
    spec = LayerSpec.conv(8, 8, 3, padding=1, input_size=(6, 6), bias=False)
    work = Workload(2, 0.4, grad_density=0.5)
    manifest = generate.make_bundle([("layer", spec, work)], tmp_path / "tuned", tune=True,
                                    progress=False)
    loaded = zeroskip.load_bundle(tmp_path / "tuned")
    records = {s.op: loaded.records(s) for s in (spec, spec.grad_input(), spec.grad_weight())}
    assert all(records.values())
    assert next(iter(records["conv_grad_input"])) == tuning.bucket_key(0.5, 2)
    assert next(iter(records["conv_grad_weight"])) == tuning.bucket_key(0.4, 2)
    bundled = {(k["role"], k["variant"]) for k in manifest["kernels"]}
    for role, op in (("forward", "conv"), ("grad_input", "conv_grad_input"),
                     ("grad_weight", "conv_grad_weight")):
        choice = next(iter(records[op].values()))["choice"]
        assert choice in ("torch", "dense") or (role, choice) in bundled
    monkeypatch.setenv("ZEROSKIP_CC", "/bin/false")              # no compiler
    x = autotune.sparse_input((2, 8, 6, 6), 0.4).requires_grad_()
    w = torch.randn(8, 8, 3, 3, requires_grad=True)

    def step():
        out = ZF.conv2d(x, w, None, padding=1)
        out.backward(torch.relu(torch.randn(out.shape)))
    fallbacks = zeroskip.stats()["fallback_calls"]
    _follows_bundle(monkeypatch, records, step)
    assert zeroskip.stats()["fallback_calls"] == fallbacks


def test_tuned_triton_bundle_serves_its_choices(tmp_path, fresh_cache, served, monkeypatch):
    """--backend triton --tune tunes the Triton operators (here under Triton's interpreter,
    filed under its own machine) and a bundle-served training step follows them."""
    spec = LayerSpec.conv(4, 4, 3, padding=1, input_size=(4, 4), bias=False)
    manifest = generate.make_bundle([("layer", spec, Workload(1, 1.0))], tmp_path / "gpu",
                                    backends=("triton",), tune=True, progress=False)
    assert manifest["tuning_machines"]["triton"] == tuning.machine_of("triton", "cpu")[0]
    loaded = zeroskip.load_bundle(tmp_path / "gpu")
    machine = tuning.machine_of("triton", "cpu")[0]
    records = {s.op: loaded.records(s, "triton", machine)
               for s in (spec, spec.grad_input(), spec.grad_weight())}
    assert all(records.values()) and loaded.records(spec, "triton", "another-gpu") is None
    monkeypatch.setenv("ZEROSKIP_BACKEND", "triton")
    x = torch.randn(1, 4, 4, 4, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, requires_grad=True)

    def step():
        ZF.conv2d(x, w, None, padding=1).sum().backward()
    _follows_bundle(monkeypatch, records, step)


# ----------------------------------------------------------------------------- Triton
def test_triton_kernels_served_from_bundle(tmp_path, fresh_cache, served, monkeypatch):
    """--backend c,triton: the Triton sources are bundled (with PTX and cubin for the target)
    and, under Triton's interpreter here, imported from the bundle."""
    from zeroskip.runtime import tritonenv
    spec = LayerSpec.conv(16, 16, 3, padding=1, input_size=(6, 6))
    manifest = generate.make_bundle([("layer", spec, Workload())], tmp_path / "both",
                                    backends=("c", "triton"), targets=("sm_90",),
                                    include_grads=False, progress=False)
    assert manifest["machine"]["triton"] == tritonenv.triton_version()
    triton = [k for k in manifest["kernels"] if k["backend"] == "triton"]
    assert {k["variant"] for k in triton} == {"direct", "block_sparse"}
    assert all(any(f.endswith(".cubin") for f in k["files"]) for k in triton)
    zeroskip.load_bundle(tmp_path / "both")
    monkeypatch.setenv("ZEROSKIP_BACKEND", "triton")
    before = stats.stats()
    x, w, b = torch.randn(1, 16, 6, 6), torch.randn(16, 16, 3, 3), torch.randn(16)
    torch.testing.assert_close(ZF.conv2d(x, w, b, padding=1),
                               torch.nn.functional.conv2d(x, w, b, padding=1),
                               rtol=1e-4, atol=1e-4)
    after = stats.stats()
    assert after["bundle_hits"] - before["bundle_hits"] == 1
    assert after["compiles"] == before["compiles"]
    kernel = next(k for k in loader.loaded() if k.backend == "triton")
    assert (tmp_path / "both") in kernel.source.parents


def test_serve_example(made, tmp_path):
    """examples/serve_bundle.py, as the README runs it."""
    example = Path(__file__).parents[1] / "examples" / "serve_bundle.py"
    done = subprocess.run([sys.executable, str(example), "layers.json"], capture_output=True,
                          text=True, cwd=made, timeout=600, env=child_env(
                              made, ZEROSKIP_CC="/bin/false", ZEROSKIP_BUNDLE="bundle",
                              ZEROSKIP_CACHE_DIR=str(tmp_path / "empty-cache")))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "compiles 0" in done.stdout and "fallback_calls 0" in done.stdout
    assert done.stdout.strip().endswith("OK")


def test_serve_example_fails_without_a_bundle(made, tmp_path):
    """With no bundle to serve from, the example compiles its kernels and says FAILED."""
    example = Path(__file__).parents[1] / "examples" / "serve_bundle.py"
    env = child_env(made, ZEROSKIP_CACHE_DIR=str(tmp_path / "cache"))
    env.pop("ZEROSKIP_BUNDLE", None)
    done = subprocess.run([sys.executable, str(example), "layers.json"], capture_output=True,
                          text=True, cwd=made, timeout=600, env=env)
    assert done.returncode == 1
    assert "no bundle to serve from" in done.stderr


def test_missing_bundle_says_it_does_not_exist(tmp_path):
    before = bundle.active()
    for missing in (tmp_path / "nowhere", Path(tempfile.gettempdir()) / "zeroskip-no-bundle"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            zeroskip.load_bundle(missing)
    with pytest.raises(bundle.BundleError, match="has no manifest.json"):
        zeroskip.load_bundle(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(bundle.BundleError, match="not a directory"):
        zeroskip.load_bundle(tmp_path / "file")
    assert bundle.active() == before
