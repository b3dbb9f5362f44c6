"""Triton candidates in the autotuner (GPU fingerprints, the same tuning database, verification
against torch, targets' resource limits) and ``zeroskip bench --device cuda``. No GPU here: the
kernels run under Triton's interpreter on CPU tensors (device 'cpu'), tiny shapes only."""
from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

from zeroskip import LayerSpec, bench
from zeroskip.cli import build_parser, main
from zeroskip.codegen.variant import Variant
from zeroskip.codegen.targets import TritonTarget
from zeroskip.runtime import autotune, loader, reference, tuning

from tuning_helpers import named_kernels

SPEC = LayerSpec.conv(4, 8, 3, 1, 1, input_size=(4, 4))
STRIDED = LayerSpec.conv(4, 4, 3, 2, 1, bias=False, input_size=(6, 6))
FAST = dict(repeats=1, min_time=0.001)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("triton-cache")


@pytest.fixture(autouse=True)
def tuning_db(tmp_path, cache_dir, monkeypatch):
    """Triton's interpreter (set before any kernel module is imported: they are imported when
    ``kernel_for`` builds them), a kernel cache and a tuning database of the test's own."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ZEROSKIP_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("ZEROSKIP_TUNING_DB", str(tmp_path / "tuning.json"))
    from zeroskip.runtime import tritonenv
    if not tritonenv.available():
        pytest.skip("Triton is not installed")
    if not tritonenv.interpreting():
        pytest.skip("Triton was imported without TRITON_INTERPRET=1 in this process")
    tuning.reset()
    yield tmp_path / "tuning.json"
    tuning.reset()


def _one_config(monkeypatch):
    """Each family tunes its default config only (the interpreter is slow)."""
    monkeypatch.setattr(TritonTarget, "configs", staticmethod(lambda plan: [TritonTarget.default_config(plan)]))


# --------------------------------------------------------------------------------- fingerprints
def test_gpu_fingerprint_of_the_interpreter():
    print_ = tuning.gpu_fingerprint("cpu")
    assert print_["gpu"] == tuning.INTERPRETER == "triton-interpreter"
    assert {"gpu", "capability", "sms", "triton", "torch", "zeroskip", "cuda"} <= set(print_)
    assert print_["torch"] == torch.__version__ and print_["triton"]
    ident = tuning.gpu_fingerprint_id("cpu")
    assert ident == tuning.gpu_fingerprint_id(torch.device("cpu")) == \
        tuning.fingerprint_id(print_)
    assert ident != tuning.fingerprint_id(tuning.fingerprint())
    with pytest.raises(ValueError, match="not on 'meta'"):
        tuning.gpu_fingerprint("meta")


def test_records_under_another_machine(tmp_path):
    db = tuning.TuningDB(tmp_path / "db.json")
    gpu, print_ = "0123456789abcdef", {"gpu": "Some GPU", "capability": "9.0"}
    with pytest.raises(ValueError, match="pass its fingerprint"):
        db.record(SPEC, 1.0, "dense/m64n64k32w4s3", {}, machine=gpu)
    db.record(SPEC, 1.0, "dense/m64n64k32w4s3", {"torch": 2.0, "dense/m64n64k32w4s3": 1.0},
              machine=gpu, print_=print_)
    db.record(SPEC, 0.1, "torch", {"torch": 1.0}, machine=gpu)      # known now: no print_
    db.record(SPEC, 1.0, "dense", {"dense": 1.0})                     # the CPU, as before
    db.save()
    loaded = tuning.TuningDB(tmp_path / "db.json")
    assert loaded.machines[gpu] == print_ and loaded.machines[loaded.here] == \
        tuning.fingerprint()
    assert loaded.lookup(SPEC, 1.0) == "dense" and loaded.lookup(SPEC, 0.1) == "dense"
    assert loaded.lookup(SPEC, 1.0, machine=gpu) == "dense/m64n64k32w4s3"
    assert loaded.lookup(SPEC, 0.1, machine=gpu) == "torch"
    assert loaded.crossover(SPEC, machine=gpu) == 0.0
    assert set(loaded.layer(SPEC, machine=gpu)) == {"1", "0.1"}
    assert loaded.layer(SPEC, machine="ffffffffffffffff") is None


# --------------------------------------------------------------------------------- candidates
def test_triton_candidates():
    plan = loader.kernel_for(SPEC, "triton", Variant("dense")).plan
    configs = [c.name for c in TritonTarget.configs(plan)]
    dense = [c.name for c in autotune.candidates(SPEC, 1.0, "triton")]
    assert dense == ["torch"] + [f"dense/{c}" for c in configs]
    sparse = [c.name for c in autotune.candidates(SPEC, 0.3, "triton")]
    assert sparse == dense + [f"sparse/{c}" for c in configs]
    for name in sparse[1:]:
        assert Variant.parse(name).name == name
    weight = [c.name for c in autotune.candidates(STRIDED.grad_weight(), 0.3, "triton")]
    assert weight[0] == "torch" and all(n.startswith("dense/") for n in weight[1:])
    grad_input = [c.name for c in autotune.candidates(STRIDED.grad_input(), 0.3, "triton")]
    assert any(n.startswith("sparse/") for n in grad_input)


def test_configs_that_do_not_fit_the_target_are_dropped(monkeypatch):
    configs = TritonTarget.configs(loader.kernel_for(SPEC, "triton", Variant("dense")).plan)
    fits = {"spill_bytes": 0, "shared_bytes": 1024, "shared_limit": 232448, "registers": 40}
    metas = {f"dense/{configs[0].name}": fits,
             f"dense/{configs[1].name}": {**fits, "spill_bytes": 456, "registers": 255},
             f"dense/{configs[2].name}": {**fits, "shared_bytes": 300000}}
    asked = []

    def usage(spec, choices, target):
        asked.append((spec, choices, target))
        return {name: metas.get(name, "CompilationError: out of resources") for name in choices}
    monkeypatch.setattr(autotune, "target_usage", usage)
    kept, dropped = autotune._candidates(SPEC, 1.0, "triton", "sm_90")
    assert asked == [(SPEC, [f"dense/{c.name}" for c in configs], "sm_90")]
    assert [c.name for c in kept] == ["torch", f"dense/{configs[0].name}"]
    assert "spills 456 bytes" in dropped[f"dense/{configs[1].name}"]
    assert "300000 bytes of shared memory" in dropped[f"dense/{configs[2].name}"]
    assert all(reason.startswith("does not fit sm_90") for reason in dropped.values())
    assert [c.name for c in autotune.candidates(SPEC, 1.0, "triton", "sm_90")] == \
        [c.name for c in kept]


def test_resource_problem_reads_the_compiled_kernel():
    class Compiled:
        n_regs, n_spills = 255, 12

    assert "12 spill slots, 255 registers" in autotune.resource_problem(Compiled())
    Compiled.n_spills = 0
    assert autotune.resource_problem(Compiled()) is None
    assert autotune.resource_problem(None) is None        # the interpreter returns nothing


def test_launch_compiled_keeps_what_launches_return():
    class Jit:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: ("compiled", grid, args)

    class Module:
        conv_kernel = Jit()

    class Kernel:
        module = Module()

    real = Kernel.module.conv_kernel
    got, compiled = autotune._launch_compiled(
        Kernel, lambda: Kernel.module.conv_kernel[(3, 1)](7) and "out")
    assert got == "out" and compiled == [("compiled", (3, 1), (7,))]
    assert Kernel.module.conv_kernel is real


# --------------------------------------------------------------------------------- tuning
def test_tune_triton_on_the_interpreter(monkeypatch, tuning_db):
    """Every candidate is verified; a wrong one and a dropped one score inf with the reason;
    the choice is filed under the interpreter's fingerprint, where tuning.records finds it."""
    _one_config(monkeypatch)
    config = TritonTarget.default_config(loader.kernel_for(SPEC, "triton", Variant("dense")).plan)
    dense, sparse = Variant("dense", config=config).name, Variant("sparse", config=config).name
    checked, call = [], autotune.call

    def wrong_sparse(spec, name, t, backend):
        kernel, run = call(spec, name, t, backend)
        return kernel, (lambda: run() * 2) if name == sparse else run

    def counted(got, want):
        checked.append(got.shape)
        return error(got, want)
    error = autotune.relative_error
    monkeypatch.setattr(autotune, "call", wrong_sparse)
    monkeypatch.setattr(autotune, "relative_error", counted)
    result = autotune.tune_triton(SPEC, 0.5, "cpu", **FAST)

    assert set(result.ms) == {"torch", dense, sparse}
    assert len(checked) == 3                    # torch, dense and sparse: each checked once
    assert math.isinf(result.ms[sparse])
    assert result.errors[sparse].startswith("ArithmeticError: differs from torch")
    assert math.isfinite(result.ms["torch"]) and math.isfinite(result.ms[dense])
    assert set(result.errors) == {sparse}
    assert result.choice in ("torch", dense) and result.density == 0.5

    records = tuning.records(SPEC, "triton", "cpu")
    assert records is not None and set(records) == {"0.5"}
    record = records["0.5"]
    assert record["choice"] == result.choice and record["ms"][sparse] is None
    assert record["date"] == datetime.date.today().isoformat()
    assert tuning.nearest(records, 0.4)["choice"] == result.choice
    # keyed by the layer's shape: an equal spec finds the same record
    assert tuning.records(LayerSpec.from_dict(SPEC.to_dict()), "triton", "cpu") == records
    # filed under the interpreter's fingerprint, in the one database file, not the CPU's
    saved = json.loads(tuning_db.read_text())
    gpu = tuning.gpu_fingerprint_id("cpu")
    assert saved["machines"][gpu]["gpu"] == "triton-interpreter"
    assert set(saved["records"]) == {gpu}
    assert tuning.database().lookup(SPEC, 0.5) is None
    assert tuning.database().lookup(SPEC, 0.5, machine=gpu) == result.choice
    assert tuning.records(STRIDED, "triton", "cpu") is None


def test_tune_triton_drops_what_does_not_fit(monkeypatch):
    _one_config(monkeypatch)
    spec = STRIDED.grad_weight()
    name = Variant("dense", config=TritonTarget.default_config(loader.kernel_for(spec, "triton", Variant("dense")).plan)).name
    monkeypatch.setattr(autotune, "target_usage", lambda s, choices, target: {
        n: {"spill_bytes": 64, "registers": 255} for n in choices})
    db = tuning.TuningDB()
    result = autotune.tune_triton(spec, 1.0, "cpu", target="sm_80", db=db, save=False, **FAST)
    assert result.ms[name] == math.inf and result.choice == "torch"
    assert result.errors == {name: "does not fit sm_80: it spills 64 bytes of registers "
                                   "(255 registers)"}
    assert db.lookup(spec, 1.0, machine=tuning.gpu_fingerprint_id("cpu")) == "torch"
    assert not db.path.exists()               # save=False


def test_tune_triton_refuses_what_cannot_run():
    from zeroskip.runtime import tritonenv
    with pytest.raises(tritonenv.TritonUnavailable, match="no CUDA GPU|TRITON_INTERPRET"):
        autotune.tune_triton(SPEC, 1.0, "cuda")
    with pytest.raises(ValueError, match="float64"):
        autotune.tune_triton(dataclasses.replace(SPEC, dtype="float64"), 1.0,
                             "cpu")


def test_tolerances(monkeypatch):
    assert reference.tolerance("float32", "cpu") == 1e-4
    assert reference.tolerance("float16", "cpu") == 1e-2
    assert reference.tolerance("bfloat16", "cuda") == 2e-2
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert reference.tolerance("float32", "cuda") == 1e-2
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert reference.tolerance("float32", "cuda") == 1e-4


def test_block_sparse_input_zeroes_whole_blocks():
    x = autotune.block_sparse_input((4, 96, 5, 5), 0.1, block=32, seed=3)
    blocks = x.reshape(4, 3, 32, 5, 5)
    nonzero = blocks.ne(0).any(dim=2)
    assert (blocks.ne(0).sum(dim=2)[nonzero] == 32).all()      # a kept block is all non-zero
    assert 0.02 < nonzero.float().mean().item() < 0.2
    small = autotune.block_sparse_input((2, 3, 8), 0.5, block=64)  # fewer channels: one block
    assert ((small != 0).sum(dim=1) % 3 == 0).all()


# --------------------------------------------------------------------------------- bench
def test_bench_cuda_without_a_gpu_exits_nonzero(capsys):
    assert not torch.cuda.is_available()
    assert main(["bench", "--device", "cuda", "--quick"]) == 1
    out, err = capsys.readouterr()
    assert "zeroskip bench --device cuda could not run" in err and "no CUDA GPU" in err
    assert out == ""


def test_bench_gpu_script_saves_under_results():
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_gpu.py")
    loaded = importlib.util.spec_from_file_location("bench_gpu", path)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    flags = module.outputs()
    stem = f"gpu-{datetime.date.today().isoformat()}"
    assert flags[0] == "--json" and flags[1].endswith(f"results/{stem}.json")
    assert flags[2] == "--markdown" and flags[3].endswith(f"results/{stem}.md")


def test_bench_device_flags(capsys):
    parse = build_parser().parse_args
    args = parse(["bench", "--device", "cuda", "--dtypes", "fp16,bf16,float16"])
    assert args.dtypes == ("float16", "bfloat16") and args.batch is None and not args.tune
    assert parse(["bench"]).device == "cpu"
    for argv, message in ((["--dtypes", "float16"], "--dtypes needs --device cuda"),
                          (["--tune"], "--tune needs --device cuda"),
                          (["--device", "cuda", "--backward"], "--backward is for the CPU"),
                          (["--device", "cuda", "--densities"], "--densities is for the CPU"),
                          (["--dtypes", "int8"], "expected float32, float16 or bfloat16")):
        with pytest.raises(SystemExit) as info:
            main(["bench", "--quick", *argv])
        assert info.value.code == 2
        assert message in capsys.readouterr().err


def _row(name, family, kind, ratio, dtype="float16", op="conv", kernel=(3, 3), stride=(1, 1),
         dense=False, failure=None):
    return bench.GpuRow(name, family, kind, dtype, "shape", op, kernel, stride, dense,
                        0.1 if kind.startswith("sparse") else 1.0,
                        None if failure else 1.0, None if failure else 1.0 / ratio,
                        "dense/m64n64k32w4s3", False, None if failure else 1e-3, failure)


def test_gpu_goals_from_rows():
    rows = [
        _row("dcgan.up2", "dcgan", "forward", 1.5, op="conv_transpose", kernel=(4, 4),
             stride=(2, 2)),
        _row("unet.up1", "unet-dec", "forward", 1.2, op="conv_transpose", kernel=(2, 2),
             stride=(2, 2)),
        _row("unet3d.up", "unet3d", "forward", 0.1, op="conv_transpose"),     # not small maps
        _row("dcgan.up2", "dcgan", "grad_input", 0.1, op="conv_transpose", stride=(2, 2)),
        _row("resnet18.layer2.down", "resnet18", "grad_input", 1.0, stride=(2, 2), dense=True),
        _row("resnet18.layer4.proj", "resnet18", "grad_input", 1.44, kernel=(1, 1),
             stride=(2, 2), dense=True),
        _row("resnet18.layer1.conv", "resnet18", "grad_input", 0.1, dense=True),   # stride 1
        _row("resnet18.layer1.conv", "resnet18", "forward", 0.9, dense=True),
        _row("resnet18.layer4.proj", "resnet18", "forward", 0.1, kernel=(1, 1), dense=True),
        _row("deeplab.aspp-r12", "deeplab", "forward", 0.1),                 # not a dense layer
        _row("vgg16.conv5_2", "vgg16", "sparse-blocks", 4.0, dense=True),
        _row("vgg16.conv2_1", "vgg16", "sparse-blocks", 1.0, dense=True),
        _row("vgg16.conv2_1", "vgg16", "sparse-random", 0.5, dense=True),
        _row("dcgan.up2", "dcgan", "forward", 1.0, dtype="float32", op="conv_transpose",
             stride=(2, 2)),
        _row("vgg16.conv5_2", "vgg16", "sparse-blocks", 3.0, dtype="float32"),
        _row("vgg16.conv2_1", "vgg16", "sparse-blocks", 0, dtype="float32",
             failure="BenchError: differs"),
    ]
    report = bench.GpuReport(rows, {"gpu": "Test GPU", "tf32": True}, 32, 7)
    goals = {g: (round(v, 3), met) for g, v, met, _ in report.goals()}
    transposed = "transposed conv on small feature maps (DCGAN and U-Net decoder layers)"
    assert goals == {
        f"{transposed} >= 1.3x cuDNN (float16, geomean over 2)": (1.342, True),
        f"{transposed} >= 1.3x cuDNN (float32, geomean over 1)": (1.0, False),
        "conv_grad_input of stride-2 convs >= 1.2x cuDNN (float16, geomean over 2)":
            (1.2, True),
        "dense 3x3 layers >= 0.8x cuDNN (float16, geomean over 1)": (0.9, True),
        "block-sparse at 90% zeros (block-structured) >= 2x cuDNN (float16, geomean over 2)":
            (2.0, True),
        "block-sparse at 90% zeros (block-structured) >= 2x cuDNN (float32, geomean over 1, "
        "1 failed)": (3.0, False),
    }
    assert all(not under_load for *_, under_load in report.goals())
    text = report.markdown()
    assert "| layer | kind | dtype | torch ms | zeroskip ms | ratio | config |" in text
    assert "| vgg16.conv2_1 | sparse-blocks | float32 | - | - | FAILED | BenchError: differs |" \
        in text
    assert "1 of 16 kernels FAILED" in text and "| goal | measured | met |" in text
    assert "90% of the (BLOCK_K channels x position) blocks" in text
    back = bench.GpuReport.from_json(report.to_json())
    assert back.rows == rows and back.goals() == report.goals()


def test_bench_gpu_layer_on_the_interpreter(monkeypatch):
    """Each kind of row runs its Triton kernel checked against torch, then times both; a wrong
    kernel fails its row only; a tuned config is used where the database has one."""
    layer = bench.Layer("tiny.down", "tiny", STRIDED, dense=True)
    call = autotune.call

    def wrong_weight_grad(spec, name, t, backend):
        kernel, run = call(spec, name, t, backend)
        return kernel, (lambda: run() + 1) if spec.op == "conv_grad_weight" else run
    monkeypatch.setattr(autotune, "call", wrong_weight_grad)
    rows = bench.bench_gpu_layer(layer, "float32", batch=2, device="cpu", **FAST)
    assert [r.kind for r in rows] == list(bench.GPU_KINDS)
    by_kind = {r.kind: r for r in rows}
    assert by_kind["grad_weight"].failure.startswith("BenchError: zeroskip differs from torch")
    assert by_kind["grad_weight"].torch_ms is None and by_kind["grad_weight"].ratio is None
    for kind in ("forward", "grad_input", "sparse-blocks", "sparse-random"):
        row = by_kind[kind]
        assert row.failure is None and row.error <= 1e-4 and row.ratio > 0, row
        layer = STRIDED.grad_input() if kind == "grad_input" else STRIDED
        config = loader.kernel_for(layer, "triton", Variant("dense")).default.config
        strategy = "sparse" if kind.startswith("sparse") else "dense"
        assert not row.tuned and row.config == Variant(strategy, config=config).name
    assert by_kind["grad_input"].shape == STRIDED.grad_input().describe(2)

    # a tuned record: its fastest dense candidate is timed (even where torch won overall)
    spec = STRIDED
    other = TritonTarget.configs(loader.kernel_for(spec, "triton", Variant("dense")).plan)[1]
    db = tuning.database()
    db.record(spec, 1.0, "torch", {"torch": 0.5, Variant("dense", config=other).name: 1.0},
              machine=tuning.gpu_fingerprint_id("cpu"), print_=tuning.gpu_fingerprint("cpu"))
    assert bench.gpu_choice(spec, 1.0, "cpu", "dense") == \
        (Variant("dense", config=other).name, True)
    assert bench.gpu_choice(spec, 0.1, "cpu", "sparse") == \
        (loader.kernel_for(spec, "triton", Variant("sparse")).default.name, False)


def test_triton_dispatch_decides_on_a_real_density(monkeypatch):
    """On the Triton backend the dispatch picks the record tuned nearest the input's density:
    measured on the first call (reading a GPU tensor back synchronizes, so not on every call),
    or declared for the layer; never the spec's default of 1."""
    from zeroskip import functional as zf
    from zeroskip.runtime import calls, dispatch
    monkeypatch.setenv("ZEROSKIP_BACKEND", "triton")
    monkeypatch.setattr(calls, "_calls", {})
    monkeypatch.setattr(dispatch, "_declared", {})
    machine, print_ = tuning.machine_of("triton", "cpu")
    default = loader.kernel_for(SPEC, "triton", Variant("dense")).default.name
    db = tuning.database()
    named = named_kernels(SPEC, backend="triton")
    db.record(SPEC, 0.1, "torch", {"torch": 0.1}, machine=machine, print_=print_, kernels=named)
    db.record(SPEC, 1.0, default, {default: 0.1}, machine=machine, print_=print_, kernels=named)
    w, b = torch.randn(8, 4, 3, 3), torch.randn(8)
    x = autotune.sparse_input((2, 4, 4, 4), 0.05)
    with dispatch.observe() as ran:
        out = zf.conv2d(x, w, b, padding=1)
    assert [(d.backend, d.choice) for d in ran] == [("triton", "torch")]
    assert ran[0].density == pytest.approx(0.05, abs=0.01)
    assert reference.relative_error(out, F.conv2d(x, w, b, padding=1)) <= 1e-5
    dispatch.declare_density(SPEC, 1.0)
    with dispatch.observe() as ran:
        out = zf.conv2d(x, w, b, padding=1)
    assert [(d.choice, d.density) for d in ran] == [(default, 1.0)]
    assert reference.relative_error(out, F.conv2d(x, w, b, padding=1)) <= 1e-4
    dispatch.declare_density(SPEC, None)
    with dispatch.observe() as ran:
        zf.conv2d(torch.randn(2, 4, 4, 4), w, b, padding=1)
    assert ran[0].choice == "torch"          # the density measured on the first call holds
    with pytest.raises(ValueError, match="density"):
        dispatch.declare_density(SPEC, 1.5)
