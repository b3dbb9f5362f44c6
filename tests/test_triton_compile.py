"""Ahead-of-time Triton kernels: every kernel of the bench suite compiles to PTX and cubin for
sm_80 and sm_90 without a GPU, and ``zeroskip generate`` writes them with their resource usage."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time

import pytest

pytest.importorskip("triton")

from zeroskip import LayerSpec, bench, generate  # noqa: E402
from zeroskip.cli import main  # noqa: E402
from zeroskip.codegen.variant import Variant
from zeroskip.runtime import loader, triton_kernel, tritonenv  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*TRITON_DEFAULT_FP_FUSION")

TARGETS = ("sm_80", "sm_90")
META_KEYS = {"spec", "family", "target", "config", "layout", "registers", "spill_bytes",
             "shared_bytes", "shared_limit", "fits", "triton"}


@pytest.fixture(autouse=True)
def triton_cache(tmp_path_factory, monkeypatch):
    """A Triton cache of this session's own for the compiling workers (which start without the
    session's TRITON_INTERPRET): CI's cold compile times, nothing left in ~/.triton."""
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "triton-cache"))


def ptx_target(ptx: str) -> str:
    found = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M)
    assert found, "no .target directive in the PTX"
    return found.group(1)


def check_compiled(done: dict, target: str, family: str) -> None:
    """PTX for ``target`` (Triton emits sm_90a, Hopper's arch-specific target, for sm_90), an
    ELF cubin, and the resource usage read from it."""
    assert "error" not in done, done.get("error")
    assert ptx_target(done["ptx"]) in {target, target + "a"}
    assert re.search(r"\.entry\s+conv_kernel\b", done["ptx"])
    assert done["cubin"][:4] == b"\x7fELF"
    meta = done["meta"]
    assert META_KEYS <= set(meta)
    assert meta["target"] == target and meta["family"] == family
    assert meta["registers"] > 0 and meta["spill_bytes"] >= 0 and meta["shared_bytes"] >= 0
    assert meta["shared_limit"] == triton_kernel.SHARED_LIMIT[int(target[3:])]
    assert meta["fits"] == (meta["spill_bytes"] == 0
                            and meta["shared_bytes"] <= meta["shared_limit"])


def test_every_suite_forward_kernel_compiles_for_sm80_and_sm90():
    """The 22 layers' dense forward kernels x 2 targets, compiled in 2 processes."""
    tasks, _ = generate.plan([(layer.name, layer.spec) for layer in bench.SUITE], TARGETS,
                             include_grads=False)
    tasks = [task for task in tasks if task.strategy == "dense"]
    assert len(tasks) == 2 * len(bench.SUITE)
    start = time.perf_counter()
    results = generate.compile_all(tasks, jobs=2)
    seconds = time.perf_counter() - start
    print(f"\n{len(tasks)} suite kernels compiled in {seconds:.0f} s")
    for task, done in zip(tasks, results):
        check_compiled(done, task.target, "direct")
        assert done["meta"]["config"] == loader.kernel_for(task.spec, "triton", Variant("dense")).default.config.name


SMALL = LayerSpec.conv(32, 32, 3, input_size=(10, 10))      # one region: quick to compile


def test_kernel_variants_compile():
    """A float16, a bfloat16, a block-sparse, a weight-gradient and a channels_last kernel,
    each on tensor cores in its dtype (float32: TF32)."""
    cases = {
        "float16": (dataclasses.replace(SMALL, dtype="float16"), "dense", "sm_90",
                    "contiguous", "direct", "f16"),
        "bfloat16": (dataclasses.replace(SMALL, dtype="bfloat16"), "dense", "sm_80",
                     "contiguous", "direct", "bf16"),
        "block_sparse": (SMALL, "sparse", "sm_90", "contiguous", "block_sparse", "tf32"),
        "weight_grad": (SMALL.grad_weight(), "dense", "sm_80", "contiguous", "weight_grad",
                        "tf32"),
        "channels_last": (SMALL, "dense", "sm_90", "channels_last", "direct", "tf32"),
    }
    tasks = [generate.Task(name, name, "forward", strategy, spec, target, layout)
             for name, (spec, strategy, target, layout, _, _) in cases.items()]
    for task, done, (_, _, target, layout, family, element) in zip(
            tasks, generate.compile_all(tasks, jobs=2), cases.values()):
        check_compiled(done, target, family)
        assert done["meta"]["layout"] == layout, task.layer
        assert re.search(rf"mma[.\w]*\.{element}\.", done["ptx"]), task.layer
        assert done["source"].startswith("# zeroskip generated Triton kernels")


def test_generate_cli_writes_kernels_and_meta(tmp_path, capsys):
    layers = {"small conv": LayerSpec.conv(16, 32, 3, input_size=(6, 6)).to_dict(),
              "small/convT": LayerSpec.conv_transpose(32, 16, 2, 2, input_size=(4, 4),
                                                      dtype="float16").to_dict()}
    path = tmp_path / "layers.json"
    path.write_text(json.dumps(layers))
    out = tmp_path / "kernels"
    start = time.perf_counter()
    code = main(["generate", str(path), "--backend", "triton", "--target", "sm_80",
                 "--out", str(out), "--no-progress"])
    seconds = time.perf_counter() - start
    stdout = capsys.readouterr().out
    print(f"\ngenerate: 8 kernels in {seconds:.0f} s")
    assert code == 0

    manifest = json.loads((out / "manifest.json").read_text())    # a bundle: see test_bundle
    out = out / "triton"
    meta = json.loads((out / "meta.json").read_text())
    assert meta["failed"] == 0 and meta["targets"] == ["sm_80"] and meta["skipped"] == []
    kernels = meta["kernels"]
    assert [(k["layer"], k["kernel"]) for k in kernels] == [      # each layer's own dtype
        (name, f"{kernel}-{spec['dtype']}") for name, spec in layers.items() for kernel in (
            "forward-direct", "forward-block_sparse", "grad_input-direct",
            "grad_weight-weight_grad")]
    written = set()
    for k in kernels:
        assert k["status"] == "ok" and k["target"] == "sm_80" and k["registers"] > 0
        assert k["triton"] == tritonenv.triton_version() and k["zeroskip"] == meta["zeroskip"]
        assert LayerSpec.from_dict(k["spec_fields"]).describe() == k["spec"]
        assert set(k["files"]) == {"source", "ptx", "cubin"}
        for entry in k["files"].values():
            data = (out / entry["path"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == entry["sha256"]
            assert len(data) == entry["bytes"]
            written.add(entry["path"])
        assert (out / k["files"]["cubin"]["path"]).read_bytes()[:4] == b"\x7fELF"
        assert ptx_target((out / k["files"]["ptx"]["path"]).read_text()) == "sm_80"
    # Everything under the folder is listed; layer names become folder names.
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == \
        written | {"meta.json"}
    assert {f"triton/{p}" for p in written | {"meta.json"}} <= set(manifest["files"])
    assert {k["folder"] for k in kernels} == {"small_conv", "small_convT"}
    assert "| small conv | forward | block_sparse | float32 | sm_80 |" in stdout
    assert "8 of 8 kernels compiled" in stdout


def test_plan_skips_what_has_no_kernel():
    """Dtypes Triton lacks are skipped with the reason (a transposed conv with output_padding
    past its stride gets its gradients, on a cropped output gradient); --dtype overrides the
    layers' own."""
    convt = LayerSpec.conv_transpose(16, 8, 3, 1, 0, 1, dilation=2, input_size=(6, 6))
    assert convt.gradient_crop == (1, 1)
    wide = LayerSpec.conv(8, 8, 1, input_size=(4, 4), dtype="float64")
    tasks, skipped = generate.plan([("convT", convt), ("wide", wide)], TARGETS, dtypes=None)
    assert [(t.layer, t.name, t.target) for t in tasks] == [
        ("convT", name, target) for target in TARGETS
        for name in ("forward-direct-float32", "forward-block_sparse-float32",
                     "grad_input-direct-float32", "grad_weight-weight_grad-float32")]
    assert [(s["layer"], s["role"]) for s in skipped] == [("wide", "every")]
    assert "float32" in skipped[0]["reason"]
    tasks, skipped = generate.plan([("wide", wide)], ["sm_90"], dtypes=["bfloat16"],
                                   layouts=["contiguous", "channels_last"])
    assert skipped == [] and [t.name for t in tasks] == [
        "forward-direct-bfloat16", "forward-direct-bfloat16-channels_last",
        "forward-block_sparse-bfloat16", "forward-block_sparse-bfloat16-channels_last",
        "grad_input-direct-bfloat16", "grad_input-direct-bfloat16-channels_last",
        "grad_weight-weight_grad-bfloat16", "grad_weight-weight_grad-bfloat16-channels_last"]


def fake_compile_all(fail: bool):
    """compile_all without the compiler: block-sparse kernels fail (where ``fail``), the
    weight gradient spills and the input gradient exceeds shared memory."""
    def compile_all(tasks, jobs=2, progress=False):
        results = []
        for task in tasks:
            if fail and task.family == "block_sparse":
                results.append({"error": "CompilationError: PassManager::run failed\nmore"})
                continue
            limit = triton_kernel.SHARED_LIMIT[int(task.target[3:])]
            meta = {"config": "m64n64k32w4s3", "layout": task.layout, "registers": 96,
                    "spill_bytes": 32 if task.family == "weight_grad" else 0,
                    "shared_bytes": limit + 1 if task.role == "grad_input" else 1024,
                    "shared_limit": limit}
            meta["fits"] = meta["spill_bytes"] == 0 and meta["shared_bytes"] <= limit
            results.append({"ptx": f".target {task.target}\n", "cubin": b"\x7fELF fake",
                            "source": "# kernel\n", "meta": meta})
        return results
    return compile_all


def test_generate_records_failures_and_reports_misfits(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(generate, "compile_all", fake_compile_all(fail=True))
    out = tmp_path / "kernels"
    argv = ["generate", "--layers", "resnet18.layer4.proj", "--backend", "triton",
            "--out", str(out), "--no-progress"]
    assert main(argv) == 1                          # a kernel failed to compile
    stdout = capsys.readouterr().out
    meta = json.loads((out / "triton" / "meta.json").read_text())
    assert meta["failed"] == 1 and len(meta["kernels"]) == 4
    failed = [k for k in meta["kernels"] if k["status"] == "error"]
    assert [k["family"] for k in failed] == ["block_sparse"]
    assert "PassManager::run failed" in failed[0]["error"] and "files" not in failed[0]
    assert meta["reported"] == ["sm_90/resnet18.layer4.proj/grad_input-direct-float32",
                                "sm_90/resnet18.layer4.proj/grad_weight-weight_grad-float32"]
    assert "reported: 2 kernel(s)" in stdout and "spills 32 bytes" in stdout
    assert "needs 232449 bytes of shared memory, sm_90 has 232448" in stdout
    assert "FAILED" in stdout and "PassManager::run failed" in stdout

    # Without failures: exit 0, unless --strict, where reported kernels fail the run too.
    monkeypatch.setattr(generate, "compile_all", fake_compile_all(fail=False))
    assert main(argv) == 0
    assert main(argv + ["--strict"]) == 1
    assert main(argv + ["--strict", "--forward-only"]) == 0         # the forward kernels fit


@pytest.mark.parametrize("argv, message", [
    (["--backend", "triton,cuda"], "--backend: expected c and/or triton"),
    (["--backend", "triton", "--target", "sm_70"], "--target: expected targets among"),
    (["--backend", "triton", "--dtype", "float64"], "--dtype: expected dtypes among"),
    (["--backend", "triton", "--target", "sm_80,"], "--target"),
    (["--backend", "triton", "--layout", "nhwc"], "--layout: expected layouts among"),
    (["--dtype", "float16"], "add --backend triton"),
    (["--layers", "no-such-layer"], "no layer matches"),
    (["missing.json"], "cannot read"),
], ids=["backend-unknown", "target", "dtype", "empty-target", "layout",
        "dtype-without-triton", "no-layer", "missing-file"])
def test_generate_bad_arguments_exit_2(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(["generate", *argv, "--out", str(tmp_path / "out")])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert "zeroskip generate: error:" in err and message in err
    assert not (tmp_path / "out").exists()
