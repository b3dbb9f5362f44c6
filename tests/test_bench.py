"""``zeroskip bench``: the suite, the harness's figures and checks, the command line."""
from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch
import torch.nn.functional as F

import zeroskip.functional
from zeroskip import LayerSpec, bench
from zeroskip.codegen import lower
from zeroskip.cli import main
from zeroskip.codegen.macs import dense_macs, nonzero_macs
from zeroskip.runtime import ops

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
        assert spec.batch == 1 and spec.op in ("conv", "conv_transpose")
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


def test_call_args_refuse_asymmetric_padding():
    with pytest.raises(ValueError, match="symmetric"):
        bench.call_args(LayerSpec.conv(1, 1, 2, padding="same", input_size=(8,)))


def test_rows(report):
    assert [r.name for r in report.rows] == ["tiny.conv", "tiny.deconv"]
    for row, layer in zip(report.rows, TINY_LAYERS):
        assert row.shape == layer.spec.describe()
        assert row.torch_ms > 0 and row.zeroskip_ms > 0 and row.compile_s > 0
        assert row.ratio == pytest.approx(row.torch_ms / row.zeroskip_ms)
        assert row.nonzero_macs == nonzero_macs(layer.spec)
        assert row.gflops == pytest.approx(2 * row.nonzero_macs / row.zeroskip_ms / 1e6)
        assert row.skipped == pytest.approx(1 - row.nonzero_macs / row.dense_macs)
        assert 0 <= row.error <= bench.RTOL
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
    assert (spec, lower.DEFAULT) not in ops._kernels


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
        assert row.shape == spec.describe()
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
    gradient = ops._gradient

    def scaled(kind, *args):
        result = gradient(kind, *args)
        return result * factor if kind == which else result
    return scaled


@pytest.mark.parametrize("which", ["input", "weight"])
def test_backward_wrong_gradient_raises(monkeypatch, which):
    monkeypatch.setattr(ops, "_gradient", _scaled_gradient(which, 1.01))
    with pytest.raises(bench.BenchError,
                       match=f"tiny.conv-s2: {which} gradient: zeroskip differs from torch"):
        bench.bench_backward_layer(BACKWARD_LAYERS[0], repeats=1, min_time=0.001)


def test_backward_wrong_grad_input_alone_raises(monkeypatch):
    run_spec = ops.run_spec
    monkeypatch.setattr(ops, "run_spec", lambda spec, tensors: run_spec(spec, tensors) * 1.01)
    with pytest.raises(bench.BenchError, match="input gradient alone: zeroskip differs"):
        bench.bench_backward_layer(BACKWARD_LAYERS[0], repeats=1, min_time=0.001)


def test_backward_fallback_raises(monkeypatch):
    def fallback(which, grad, other, size, config):
        ops.stats.fallback("test: no gradient kernel")
        return ops._torch_gradient(which, grad, other, size, config)
    monkeypatch.setattr(ops, "_gradient", fallback)
    with pytest.warns(ops.stats.ZeroskipFallbackWarning), \
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
