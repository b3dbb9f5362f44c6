"""``zeroskip bench``: the suite, the harness's figures and checks, the command line."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zeroskip.functional
from zeroskip import LayerSpec, bench
from zeroskip.codegen import lower
from zeroskip.cli import main
from zeroskip.codegen.macs import dense_macs, nonzero_macs
from zeroskip.runtime import dispatch, gradients, loader, reference, stats

TINY_LAYERS = [
    bench.Layer("tiny.conv", "tiny", LayerSpec.conv(8, 8, 3, 1, 1, input_size=(12, 12)),
                dense=True),
    bench.Layer("tiny.deconv", "convT1d-long",
                LayerSpec.conv_transpose(8, 4, 4, 2, 1, input_size=(50,))),
]


@pytest.fixture(scope="module")
def report() -> bench.Report:
    return bench.run(TINY_LAYERS, repeats=1, min_time=0.001)


def test_suite_layers():
    names = [layer.name for layer in bench.SUITE]
    assert len(names) == len(set(names)) and 16 <= len(names) <= 22
    assert {layer.family for layer in bench.SUITE} >= {
        "resnet18", "resnet50", "vgg16", "mobilenetv2-dw", "dcgan", "unet-dec", "wavenet",
        "deeplab", "unet3d", "convT1d-long"}
    for layer in bench.SUITE:
        spec = layer.spec
        assert spec.op in ("conv", "conv_transpose")
        bench.call_args(spec)            # zero, symmetric padding
        if layer.dense:
            assert spec.op == "conv" and spec.groups == 1 and set(spec.dilation) == {1}
    long = next(layer.spec for layer in bench.SUITE if layer.family == "convT1d-long")
    assert long == LayerSpec.conv_transpose(64, 32, 4, 2, 1, input_size=(40000,))


def test_select():
    quick = bench.select(quick=True)
    assert 4 <= len(quick) <= 6 and all(layer.quick for layer in quick)
    assert [layer.name for layer in bench.select(patterns=["vgg16"])] == \
        ["vgg16.conv2_1", "vgg16.conv5_2"]
    assert {layer.family for layer in bench.select(patterns=["dw", "unet3d"])} == \
        {"mobilenetv2-dw", "unet3d"}
    assert bench.select(quick=True, patterns=["vgg16"]) == []
    wide = bench.select(suite="wide")
    assert len(wide) >= 30 and all(layer.wide for layer in wide)
    assert not any(layer.wide for layer in bench.select())
    assert len(bench.select(suite="all")) == len(bench.SUITE) + len(wide)
    channels = {c for layer in wide for c in (layer.spec.in_channels, layer.spec.out_channels)}
    assert {24, 40, 80, 112, 192, 320} <= channels           # MobileNet / EfficientNet
    assert {147, 35, 17, 8} <= {layer.spec.input_size[0] for layer in wide}   # Inception
    for layer in wide:
        bench.call_args(layer.spec)
        if layer.dense:
            assert layer.spec.groups == 1 and set(layer.spec.dilation) == {1}
    with pytest.raises(ValueError, match="suite"):
        bench.select(suite="everything")


def test_call_args_refuse_asymmetric_padding():
    with pytest.raises(ValueError, match="symmetric"):
        bench.call_args(LayerSpec.conv(1, 1, 2, padding="same", input_size=(8,)))


def test_rows(report):
    assert [r.name for r in report.rows] == ["tiny.conv", "tiny.deconv"]
    for row, layer in zip(report.rows, TINY_LAYERS):
        assert row.shape == layer.spec.describe(1)         # the bench's batch
        assert row.torch_ms > 0 and row.zeroskip_ms > 0 and row.compile_s > 0
        assert row.ratio == pytest.approx(row.torch_ms / row.zeroskip_ms)
        assert row.nonzero_macs == nonzero_macs(layer.spec)
        assert row.gflops == pytest.approx(2 * row.nonzero_macs / row.zeroskip_ms / 1e6)
        assert row.skipped == pytest.approx(1 - row.nonzero_macs / row.dense_macs)
        assert 0 <= row.error <= bench.RTOL
        assert row.density == 1.0 and _known_strategy(row.strategy) and row.dense_ms > 0
        assert f"| {row.compile_s:.2f} | {row.strategy} |" in report.markdown()
    assert report.rows[1].skipped > 0.4        # the transposed conv's inserted zeros


def test_summary_figures(report):
    assert report.geomean_dense == pytest.approx(report.rows[0].ratio)
    assert report.geomean_all == pytest.approx(
        (report.rows[0].ratio * report.rows[1].ratio) ** 0.5)
    o = report.overhead
    assert o.functional_us > 0 and o.kernel_us > 0 and o.torch_us > 0
    assert o.overhead_us == pytest.approx(o.functional_us - o.kernel_us)
    assert 1 <= o.kernel_threads <= torch.get_num_threads()
    goals = [goal for goal, _, _, _ in report.goals()]
    assert len(goals) == 4 and "tiny.deconv >= 2x torch" in goals


def test_json_and_markdown(report):
    data = json.loads(report.to_json())
    assert data["machine"]["threads"] >= 1 and data["machine"]["torch"]
    assert data["machine"]["malloc_pinned"] in (True, False)
    assert data["rows"][0]["name"] == "tiny.conv"
    assert data["rows"][0]["ratio"] == pytest.approx(report.rows[0].ratio)
    assert data["overhead"]["overhead_us"] == pytest.approx(report.overhead.overhead_us)
    assert data["geomean_dense"] == pytest.approx(report.geomean_dense)
    assert len(data["goals"]) == 4
    text = report.markdown()
    assert "| layer | shape | torch ms | zeroskip ms | ratio |" in text
    assert all(f"| {r.name} | {r.shape} |" in text for r in report.rows)


def test_figures_under_load_are_marked(report):
    assert all(r.contention is None or 0 <= r.contention <= 1 for r in report.rows)
    rows = [dataclasses.replace(r, contention=0.0) for r in report.rows]
    quiet = dataclasses.replace(report, rows=rows,
                                overhead=dataclasses.replace(report.overhead, contention=None))
    assert " *" not in quiet.markdown()
    loaded = dataclasses.replace(quiet, rows=[dataclasses.replace(rows[0], contention=0.5),
                                              rows[1]])
    text = loaded.markdown()
    assert f"| {rows[0].ratio:.2f}x * |" in text
    assert ("other processes took up to 50% of the bench's CPUs while this was timed (1 of 3)"
            in text)
    assert [load for *_, load in loaded.goals()] == [False, False, False, True]


def test_wrong_result_raises(monkeypatch):
    monkeypatch.setattr(zeroskip.functional, "conv2d",
                        lambda *args, **kwargs: F.conv2d(*args, **kwargs) * 1.01)
    with pytest.raises(bench.BenchError, match="tiny.conv: zeroskip differs from torch"):
        bench.bench_layer(TINY_LAYERS[0], repeats=1, min_time=0.001)


def test_fallback_raises(monkeypatch):
    monkeypatch.setattr(zeroskip.functional, "conv2d", F.conv2d)
    with pytest.raises(bench.BenchError, match="did not run a generated kernel"):
        bench.bench_layer(TINY_LAYERS[0], repeats=1, min_time=0.001)


def test_cold_compile_leaves_the_cache_alone():
    spec = LayerSpec.conv(3, 5, 3, 1, 1, input_size=(9, 9))
    before = os.environ["ZEROSKIP_CACHE_DIR"]
    assert bench.cold_compile_seconds(spec) > 0
    assert os.environ["ZEROSKIP_CACHE_DIR"] == before
    assert (spec, lower.DEFAULT) not in loader._kernels


def test_cli_quick(tmp_path, capsys):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    assert main(["bench", "--quick", "--repeats", "1", "--json", str(out),
                 "--markdown", str(md)]) == 0
    printed, log = capsys.readouterr()
    data = json.loads(out.read_text())
    assert [r["name"] for r in data["rows"]] == [layer.name for layer in bench.select(True)]
    assert md.read_text().strip() == printed.strip()
    count = len(bench.select(True))
    assert f"[{count}/{count}] convT1d-long" in log


@pytest.mark.parametrize("argv", [["--layers", "no-such-layer"], ["--repeats", "0"],
                                  ["--threads", "x"]])
def test_cli_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


# --------------------------------------------------------------------------------- backward
BACKWARD_LAYERS = [
    bench.Layer("tiny.conv-s2", "tiny", LayerSpec.conv(8, 8, 3, 2, 1, input_size=(12, 12)),
                dense=True),
    TINY_LAYERS[1],
]


@pytest.fixture(scope="module")
def backward_report() -> bench.BackwardReport:
    return bench.run_backward(BACKWARD_LAYERS, repeats=1, min_time=0.001)


def test_backward_rows(backward_report):
    rows = backward_report.rows
    assert [r.name for r in rows] == ["tiny.conv-s2", "tiny.deconv"]
    for row, layer in zip(rows, BACKWARD_LAYERS):
        spec = layer.spec
        specs = (spec, spec.grad_input(), spec.grad_weight())
        assert row.shape == spec.describe(1)
        assert row.torch_ms > 0 and row.zeroskip_ms > 0
        assert row.ratio == pytest.approx(row.torch_ms / row.zeroskip_ms)
        assert row.nonzero_macs == sum(map(nonzero_macs, specs))
        assert row.dense_macs == sum(map(dense_macs, specs))
        assert row.skipped == pytest.approx(1 - row.nonzero_macs / row.dense_macs)
        assert row.grad_input_nonzero_macs == nonzero_macs(specs[1])
        assert 0 <= row.error <= bench.RTOL
    strided, deconv = rows
    # The strided conv's input gradient is the transposed case: timed alone, 3 of 4 inputs of
    # its scatter are inserted zeros.
    assert strided.grad_input_torch_ms > 0 and strided.grad_input_zeroskip_ms > 0
    assert strided.grad_input_ratio == pytest.approx(
        strided.grad_input_torch_ms / strided.grad_input_zeroskip_ms)
    assert strided.grad_input_skipped > 0.7
    assert deconv.grad_input_ratio is None and deconv.grad_input_torch_ms is None


def test_backward_at_densities(monkeypatch):
    """``run_backward(densities=...)``: a training step per layer and density, on ReLU-like
    inputs of exactly that density, checked against torch like the dense rows; below the
    crossover the weight gradient runs its sparse kernel."""
    from zeroskip.runtime import dispatch
    layer = bench.Layer("tiny.conv", "tiny", LayerSpec.conv(16, 32, 3, padding=1,
                                                            input_size=(12, 12)), dense=True)
    with dispatch.observe() as ran:
        report = bench.run_backward([layer], repeats=1, min_time=0.001, densities=[1.0, 0.1])
    assert [r.name for r in report.rows] == ["tiny.conv", "tiny.conv@0.1"]
    assert all(0 <= r.error <= bench.RTOL for r in report.rows)
    chose = {(d.spec.op, round(d.density, 1), d.choice) for d in ran}
    assert ("conv_grad_weight", 0.1, "sparse") in chose
    assert ("conv_grad_weight", 1.0, "dense") in chose


def test_backward_summary(backward_report):
    strided, deconv = backward_report.rows
    assert backward_report.geomean_dense == pytest.approx(strided.ratio)
    assert backward_report.geomean_all == pytest.approx((strided.ratio * deconv.ratio) ** 0.5)
    assert backward_report.geomean_grad_input == pytest.approx(strided.grad_input_ratio)
    data = json.loads(backward_report.to_json())
    assert data["machine"]["threads"] >= 1 and data["repeats"] == 1
    back = data["backward"]
    assert [r["name"] for r in back["rows"]] == ["tiny.conv-s2", "tiny.deconv"]
    assert back["rows"][0]["ratio"] == pytest.approx(strided.ratio)
    assert back["rows"][0]["grad_input_ratio"] == pytest.approx(strided.grad_input_ratio)
    assert back["rows"][1]["grad_input_ratio"] is None
    assert back["geomean_all"] == pytest.approx(backward_report.geomean_all)
    text = backward_report.markdown()
    assert "| layer | shape | torch ms | zeroskip ms | ratio | skipped | grad_input skipped " \
           "| grad_input ratio |" in text
    assert f"| {strided.grad_input_skipped:.1%} | {strided.grad_input_ratio:.2f}x" in text
    assert f"| {deconv.name} | {deconv.shape} |" in text and "| - | - |" in text
    assert "geomean fwd+bwd ratio over all layers (2)" in text
    assert "geomean grad_input ratio over strided convs (1)" in text
    loaded = dataclasses.replace(backward_report, rows=[
        dataclasses.replace(strided, contention=0.0, grad_input_contention=0.5),
        dataclasses.replace(deconv, contention=None)])
    text = loaded.markdown()
    assert f"| {strided.ratio:.2f}x | {strided.skipped:.1%} |" in text
    assert f"| {strided.grad_input_ratio:.2f}x * |" in text
    assert "(1 of 3)" in text


def _scaled_gradient(which: str, factor: float):
    gradient = gradients.LayerGradients.run

    def scaled(self, kind, *args):
        result = gradient(self, kind, *args)
        return result * factor if kind == which else result
    return scaled


@pytest.mark.parametrize("which", ["input", "weight"])
def test_backward_wrong_gradient_raises(monkeypatch, which):
    monkeypatch.setattr(gradients.LayerGradients, "run", _scaled_gradient(which, 1.01))
    with pytest.raises(bench.BenchError,
                       match=f"tiny.conv-s2: {which} gradient: zeroskip differs from torch"):
        bench.bench_backward_layer(BACKWARD_LAYERS[0], repeats=1, min_time=0.001)


def test_backward_wrong_grad_input_alone_raises(monkeypatch):
    run_spec = loader.run_spec
    monkeypatch.setattr(loader, "run_spec", lambda spec, tensors: run_spec(spec, tensors) * 1.01)
    with pytest.raises(bench.BenchError, match="input gradient alone: zeroskip differs"):
        bench.bench_backward_layer(BACKWARD_LAYERS[0], repeats=1, min_time=0.001)


def test_backward_fallback_raises(monkeypatch):
    def fallback(self, which, grad, other, size):
        stats.fallback("test: no gradient kernel")
        return reference.gradient(which, grad, other, size, self.config)
    monkeypatch.setattr(gradients.LayerGradients, "run", fallback)
    with pytest.warns(stats.ZeroskipFallbackWarning), \
            pytest.raises(bench.BenchError, match="did not run generated kernels"):
        bench.bench_backward_layer(BACKWARD_LAYERS[1], repeats=1, min_time=0.001)


def test_cli_backward(tmp_path, capsys):
    out = tmp_path / "backward.json"
    assert main(["bench", "--backward", "--layers", "layer4.proj", "--repeats", "1",
                 "--json", str(out)]) == 0
    printed, log = capsys.readouterr()
    rows = json.loads(out.read_text())["backward"]["rows"]
    assert [r["name"] for r in rows] == ["resnet18.layer4.proj"]
    assert rows[0]["grad_input_ratio"] > 0
    assert "| resnet18.layer4.proj |" in printed and "grad_input ratio" in printed
    assert "[1/1] resnet18.layer4.proj: fwd+bwd" in log


# --------------------------------------------------------------------------------- densities
SWEEP_LAYERS = [
    bench.Layer("tiny.wide3x3", "tiny", LayerSpec.conv(64, 64, 3, 1, 1, input_size=(6, 6)),
                dense=True),
    TINY_LAYERS[1],
]
SWEPT = (1.0, 0.3, 0.05)


@pytest.fixture(scope="module")
def sweep() -> bench.SweepReport:
    return bench.run_sweep(SWEEP_LAYERS, SWEPT, repeats=1, min_time=0.001)


def _known_strategy(name: str) -> bool:
    """dense, torch, or a kernel variant's name (sparse ones included)."""
    if name in ("dense", "torch"):
        return True
    lower.Variant.parse(name)
    return True


def test_sweep_rows(sweep):
    assert [(r.name, r.density) for r in sweep.rows] == \
        [(layer.name, d) for layer in SWEEP_LAYERS for d in SWEPT]
    assert sweep.densities == list(SWEPT)
    for row in sweep.rows:
        spec = next(layer.spec for layer in SWEEP_LAYERS if layer.name == row.name)
        assert _known_strategy(row.strategy)
        assert row.torch_ms > 0 and row.zeroskip_ms > 0 and row.compile_s is None
        assert 0 <= row.error <= bench.RTOL
        # Activation zeros count as skipped: non-zero MACs scale with the density.
        assert row.nonzero_macs == round(nonzero_macs(spec) * row.density)
        assert row.skipped == pytest.approx(1 - row.nonzero_macs / dense_macs(spec))
        assert row.gflops == pytest.approx(2 * row.nonzero_macs / row.zeroskip_ms / 1e6)
        assert (row.dense_ms is not None) == (row.density == 1.0)
        assert row.wide_3x3 == (row.name == "tiny.wide3x3")
    dense, sparse = sweep.rows[0], sweep.rows[2]
    assert dense.skipped < sparse.skipped and sparse.skipped > 0.9


def test_sweep_markdown_json_and_plot(sweep, tmp_path):
    text = sweep.markdown()
    assert ("| layer | density | torch ms | zeroskip ms | ratio | strategy | GFLOP/s "
            "| MACs skipped |") in text
    for r in sweep.rows:
        assert f"| {r.name} | {r.density:g} | {r.torch_ms:.3f} |" in text
        assert f"| {r.strategy} | {r.gflops:.1f} | {r.skipped:.1%} |" in text
    assert "geomean ratio at density 0.3 over 2 layers" in text
    assert "| goal | measured | met |" in text
    data = json.loads(sweep.to_json())
    assert data["machine"]["threads"] >= 1 and data["densities"] == list(SWEPT)
    assert data["rows"][0]["ratio"] == pytest.approx(sweep.rows[0].ratio)
    assert data["geomean_by_density"]["0.3"] == pytest.approx(sweep.geomean_at(0.3))
    assert len(data["goals"]) == len(sweep.goals())
    assert bench.SweepReport.from_json(sweep.to_json()) == sweep
    png = bench.plot(sweep, tmp_path / "sweep.png")
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and png.stat().st_size > 1000


def test_tuned_torch_choice_is_reported(monkeypatch):
    """Where the tuning database chose torch, zeroskip runs torch's op: allowed, and reported
    as strategy torch; at density 1 the dense kernel is then timed apart for its goal."""
    monkeypatch.setattr(dispatch.Operator, "choose", lambda call, x, *other: "torch")
    rows = bench.sweep_layer(SWEEP_LAYERS[0], (1.0, 0.3), repeats=1, min_time=0.001)
    assert [r.strategy for r in rows] == ["torch", "torch"]
    assert rows[0].dense_ms > 0 and rows[0].dense_ms != rows[0].zeroskip_ms
    assert rows[1].dense_ms is None


def test_torch_choice_still_checked(monkeypatch):
    monkeypatch.setattr(dispatch.Operator, "choose", lambda call, x, *other: "torch")
    convolution = reference.convolution
    monkeypatch.setattr(reference, "convolution", lambda *args: convolution(*args) * 1.01)
    with pytest.raises(bench.BenchError, match="zeroskip differs from torch"):
        bench.sweep_layer(SWEEP_LAYERS[0], (0.3,), repeats=1, min_time=0.001)


def _row(name: str, density: float, ratio: float, strategy: str = "sparse",
         wide: bool = True, dense: bool = True, dense_ratio: float | None = None) -> bench.Row:
    """A synthetic row: torch 1 ms, zeroskip ``1 / ratio`` ms."""
    dense_ms = 1 / (dense_ratio or ratio) if density == 1.0 else None
    return bench.Row(name, "fam", dense, "shape", 1.0, 1 / ratio, 1.0, 0.5, None, 1, 2, 0.0,
                     0.0, density, strategy, dense_ms, wide)


def _goals(rows: list[bench.Row]) -> dict[str, tuple[float, bool]]:
    report = bench.SweepReport(rows, {}, 1, 1)
    return {goal.split(" (")[0]: (value, met) for goal, value, met, _ in report.goals()}


def _suite(**changes) -> list[bench.Row]:
    """Two wide 3x3 layers meeting every goal, with ``{(name, density): ratio}`` changes."""
    ratios = {1.0: 1.0, 0.5: 1.2, 0.3: 2.0, 0.1: 5.0, 0.05: 7.0}
    return [_row(name, d, changes.get(f"{name}@{d:g}", r), "dense" if d == 1 else "sparse")
            for name in ("a", "b") for d, r in ratios.items()]


def test_goals_are_computed_from_rows():
    goals = _goals(_suite())
    assert all(met for _, met in goals.values()) and len(goals) == 6
    assert goals["crossover of the sparse kernel vs torch at density >= 0.4"] == (0.5, True)
    assert goals["geomean at density 0.3 >= 1.5x"] == (pytest.approx(2.0), True)

    goals = _goals(_suite(**{"a@0.3": 0.9, "b@0.1": 3.0, "b@0.05": 5.0}))
    worst = "tuned dispatch >= 0.95x torch at every density on every layer"
    assert goals[worst] == (pytest.approx(0.9), False)
    assert goals["geomean at density 0.3 >= 1.5x"][1] is False        # sqrt(0.9 * 2) < 1.5
    wide = "3x3 layers with >= 64 channels: >= {}x at density {}"
    assert goals[wide.format(4, 0.1)] == (pytest.approx(3.0), False)
    assert goals[wide.format(6, 0.05)] == (pytest.approx(5.0), False)
    # a's sparse kernel is slower than torch at 0.3 but not at 0.5: its crossover stays 0.5.
    assert goals["crossover of the sparse kernel vs torch at density >= 0.4"] == (0.5, True)


def test_crossover_goal():
    slow = _suite(**{"b@0.5": 0.8})
    assert bench.SweepReport(slow, {}, 1, 1).crossovers() == {"a": 0.5, "b": 0.3}
    assert _goals(slow)["crossover of the sparse kernel vs torch at density >= 0.4"] == \
        (0.3, False)
    dense_at_half = [dataclasses.replace(r, strategy="dense") if r.density == 0.5 else r
                     for r in _suite()]
    assert _goals(dense_at_half)[
        "crossover of the sparse kernel vs torch at density >= 0.4"] == (0.3, False)
    narrow = [dataclasses.replace(r, wide_3x3=False) for r in _suite()]
    assert not any(g.startswith(("crossover", "3x3")) for g in _goals(narrow))


def test_dense_kernel_goal_uses_its_own_time():
    """Where the dispatch ran torch at density 1, the goal takes the dense kernel's time."""
    rows = [_row("a", 1.0, 1.0, "torch", dense_ratio=0.5), _row("b", 1.0, 1.0, "dense"),
            _row("c", 1.0, 0.1, "dense", dense=False)]
    value, met = _goals(rows)["generated dense kernel geomean >= 0.7x torch on dense layers"]
    assert value == pytest.approx(0.5 ** 0.5) and met is True
    rows[1] = _row("b", 1.0, 0.6, "dense")
    value, met = _goals(rows)["generated dense kernel geomean >= 0.7x torch on dense layers"]
    assert value == pytest.approx(0.3 ** 0.5) and met is False


def test_goals_under_load_are_marked():
    loaded = [dataclasses.replace(r, contention=0.5) if r.density == 0.3 else r
              for r in _suite()]
    report = bench.SweepReport(loaded, {"zeroskip": "0", "torch": "t", "date": "d", "cpu": "c",
                                        "threads": 1, "load_avg": 0, "cpu_count": 1}, 1, 1)
    load = {goal.split(" (")[0]: under for goal, _, _, under in report.goals()}
    assert load["geomean at density 0.3 >= 1.5x"] and not load[
        "3x3 layers with >= 64 channels: >= 4x at density 0.1"]
    text = report.markdown()
    assert "| 2.00x * |" in text and "(2 of 10)" in text


def test_bench_cpu_density_mode():
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "bench_cpu.py")
    loaded = importlib.util.spec_from_file_location("bench_cpu", path)
    module = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(module)
    flags = module.outputs(["--densities", "--quick"])
    assert [f for f in flags if f.startswith("--")] == ["--json", "--markdown", "--plot"]
    assert all("cpu-density-" in f for f in flags if not f.startswith("--"))
    assert module.outputs(["--densities=1,0.1"])[-1].endswith(".png")
    assert "--plot" not in module.outputs(["--quick"])
    both = module.outputs(["--backward", "--densities", "0.5"])
    assert "--plot" not in both and all("cpu-backward-density-" in f for f in both
                                        if not f.startswith("--"))


def test_gpu_check_rehearses_on_the_cpu_and_refuses_without_a_gpu(tmp_path):
    """benchmarks/gpu_check.py, the prepared GPU run: with no GPU it exits 1 saying why and
    writes nothing; its stages run here on the C kernels (--device cpu) and pass."""
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_check.py"
    env = {**os.environ, "PYTHONPATH": str(script.parents[1])}
    refused = subprocess.run([sys.executable, str(script), "--out", str(tmp_path / "g.json")],
                             capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 1 and "nothing run" in refused.stderr
    assert not (tmp_path / "g.json").exists()
    done = subprocess.run([sys.executable, str(script), "--device", "cpu", "--steps", "2", "3",
                           "--out", str(tmp_path / "c.json")], capture_output=True, text=True,
                          env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["correctness"]["ok"] and report["correctness"]["fallback_calls"] == 0
    assert report["online_autotuning"]["ok"] and report["online_autotuning"]["tuned_cases"] > 0
