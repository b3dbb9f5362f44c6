"""The ``zeroskip`` command line: ``explain`` against the Python API, flag errors, ``demo``."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import zeroskip
from zeroskip import LayerSpec, explain
from zeroskip.cli import main
from zeroskip.codegen import pipeline
from zeroskip.codegen.ir import from_json, to_dot, verify
from zeroskip.codegen.macs import dense_macs, nonzero_macs

STEPS = ["frontend", *(name for name, _ in pipeline.PIPELINE)]

DECONV_ARGS = ["explain", "--op", "conv_transpose2d", "--in", "64", "--out", "32", "--kernel",
               "4", "--stride", "2", "--padding", "1", "--input-size", "32", "32",
               "--density", "0.3"]
DECONV = LayerSpec.conv_transpose(64, 32, 4, 2, 1, input_size=(32, 32), density=0.3)

CONV_ARGS = ["explain", "--op", "conv2d", "--in", "16", "--out", "32", "--kernel", "3",
             "--stride", "2", "--padding", "1", "--input-size", "12", "12"]
CONV = LayerSpec.conv(16, 32, 3, 2, 1, input_size=(12, 12))


def run_cli(capsys, argv) -> str:
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert err == ""
    return out


def run_json(capsys, argv) -> dict:
    return json.loads(run_cli(capsys, [*argv, "--json"]))


def test_explain_text_report(capsys):
    out = run_cli(capsys, DECONV_ARGS)
    report = zeroskip.explain(DECONV)
    # Hand count: the associated conv maps 64x64 -> 32x32 with 4 taps per axis; every output
    # of the deconv meets 2 real taps per axis, 126 pairs per axis once the padding is trimmed.
    assert (report.dense_macs, report.nonzero_macs) == (134_217_728, 32_514_048)
    rows = {m[1]: (int(m[2]), int(m[3]), int(m[4].replace(",", "")))
            for m in re.finditer(r"^  (\w+) +(\d+) +(\d+) +([\d,]+)$", out, re.M)}
    assert list(rows) == STEPS
    for step in report.steps:
        assert rows[step.name] == (step.graph.number_of_nodes(), step.contracts, step.macs)
    assert re.search(r"dense MACs +134,217,728$", out, re.M)
    assert re.search(r"non-zero MACs +32,514,048$", out, re.M)
    assert re.search(rf"skipped +{report.skipped:.1%}$", out, re.M) and "75.8%" in out
    assert re.search(rf"strategy +{report.strategy} \(", out, re.M)
    assert report.strategy in ("dense", "sparse")


def test_explain_json_matches_api(capsys):
    data = run_json(capsys, DECONV_ARGS)
    report = zeroskip.explain(DECONV)
    assert LayerSpec.from_dict(data["spec"]) == DECONV
    assert (data["dense_macs"], data["nonzero_macs"], data["strategy"]) == \
        (report.dense_macs, report.nonzero_macs, report.strategy)
    assert [p["name"] for p in data["passes"]] == STEPS
    assert "graphs" not in data


def test_explain_json_graphs(capsys):
    data = run_json(capsys, [*CONV_ARGS, "--graphs"])
    assert list(data["graphs"]) == STEPS
    for i, name in enumerate(STEPS):
        graph = verify(from_json(data["graphs"][name]))
        assert graph.graph["history"] == tuple(STEPS[:i + 1])
        assert graph.number_of_nodes() == data["passes"][i]["nodes"]


def test_explain_dot_file(capsys, tmp_path):
    path = tmp_path / "final.dot"
    run_cli(capsys, [*CONV_ARGS, "--dot", str(path)])
    text = path.read_text()
    assert text.startswith("digraph") and text == to_dot(zeroskip.explain(CONV).graph)


@pytest.mark.parametrize("which, op", [("input", "conv_grad_input"),
                                       ("weight", "conv_grad_weight")])
def test_explain_grad(capsys, which, op):
    data = run_json(capsys, [*CONV_ARGS, "--grad", which])
    spec = getattr(CONV, f"grad_{which}")()
    assert data["spec"]["op"] == op and LayerSpec.from_dict(data["spec"]) == spec
    assert (data["dense_macs"], data["nonzero_macs"]) == (dense_macs(spec), nonzero_macs(spec))
    assert data["dense_macs"] > data["nonzero_macs"]  # stride 2: inserted zeros skipped


def test_explain_per_axis_kernel_and_same_padding(capsys):
    data = run_json(capsys, ["explain", "--op", "conv2d", "--in", "4", "--out", "8",
                             "--kernel", "3", "5", "--padding", "same", "--input-size", "10",
                             "12"])
    spec = LayerSpec.from_dict(data["spec"])
    assert spec.kernel_size == (3, 5) and spec.padding == ((1, 1), (2, 2))
    assert spec.output_shape == (1, 8, 10, 12)
    assert data["nonzero_macs"] == nonzero_macs(spec)


OK = ["--op", "conv2d", "--in", "64", "--out", "64", "--kernel", "3", "--input-size", "8", "8"]


@pytest.mark.parametrize("argv, message", [
    (["--op", "conv4d", *OK[2:]], "--op"),
    ([a for a in OK if a not in ("--kernel", "3")], "--kernel"),
    ([*OK, "--stride", "0"], "stride"),
    ([*OK, "--padding", "-1"], "padding"),
    ([*OK, "--groups", "3"], "groups"),
    ([*OK, "--padding", "same", "--stride", "2"], "same"),
    ([*OK[:-1]], "--input-size"),
    ([*OK, "--input-size", "8", "8", "8"], "--input-size"),
    ([*OK, "--output-padding", "1"], "--output-padding"),
    ([*OK, "--density", "2"], "density"),
    ([*OK[:6], "--kernel", "3.5", *OK[8:]], "--kernel"),
], ids=["unknown-op", "missing-kernel", "stride-0", "padding-neg", "groups-3", "same-strided",
        "input-size-short", "input-size-long", "output-padding-conv", "density-2",
        "kernel-float"])
def test_bad_flags_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(["explain", *argv])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert "zeroskip explain: error:" in err and message in err.split("error:", 1)[1]


def test_demo_checks_every_layer_against_torch(capsys):
    """The demo converts each built-in network, compares it with torch, and lists every conv
    layer with the MACs it skips; the closing line sums forward and backward MACs."""
    from zeroskip.demo import training_ops
    from zeroskip.models import builtin_workload
    from zeroskip.trace import trace_specs

    out = run_cli(capsys, ["demo"])
    dense = nonzero = rows = 0
    for net, model, sample in builtin_workload():
        assert "output matches torch" in out.split(f"## {net}:", 1)[1].split("\n", 1)[0]
        for name, spec in trace_specs(model, sample):
            report = explain(spec)
            row = (f"| {net}.{name} | {spec.describe().split(' on ')[0]} | {spec.density:.2f} "
                   f"| {report.skipped:.1%} |")
            assert row in out
            rows += 1
            for _, op_spec in training_ops(spec):
                dense, nonzero = dense + dense_macs(op_spec), nonzero + nonzero_macs(op_spec)
    assert out.count("\n| ") - out.count("| layer |") == rows
    assert rows >= 9  # 4 deconvs + 5 convs
    assert "0 fallbacks to torch" in out
    last = out.strip().splitlines()[-1]
    assert f"{dense:,} dense MACs -> {nonzero:,} non-zero MACs" in last


def test_console_script_entry_point():
    """The installed ``zeroskip`` script (or ``python -m zeroskip.cli``) as a real process."""
    script = Path(sys.executable).with_name("zeroskip")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "zeroskip.cli"]
    proc = subprocess.run([*cmd, *CONV_ARGS, "--json"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["nonzero_macs"] == nonzero_macs(CONV)
