"""The ``zeroskip`` command line: ``explain`` against the Python API, flag errors, ``demo``,
``bench --densities``."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import zeroskip
from zeroskip import LayerSpec, Workload, explain
from zeroskip.cli import main
from zeroskip.codegen import pipeline
from zeroskip.codegen.ir import from_json, to_dot, verify
from zeroskip.codegen.macs import dense_macs, nonzero_macs
from zeroskip.runtime import tuning

STEPS = ["frontend", *(name for name, _ in pipeline.PIPELINE)]

DECONV_ARGS = ["explain", "--op", "conv_transpose2d", "--in", "64", "--out", "32", "--kernel",
               "4", "--stride", "2", "--padding", "1", "--input-size", "32", "32",
               "--density", "0.3"]
DECONV = LayerSpec.conv_transpose(64, 32, 4, 2, 1, input_size=(32, 32))
DECONV_WORK = Workload(1, 0.3)

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
    report = zeroskip.explain(DECONV, DECONV_WORK)
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
    report = zeroskip.explain(DECONV, DECONV_WORK)
    assert LayerSpec.from_dict(data["spec"]) == DECONV
    assert Workload(**data["workload"]) == DECONV_WORK
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
    assert spec.output_shape() == (1, 8, 10, 12)
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
    layer with the MACs it skips; a line sums forward and backward MACs; a density sweep
    closes it."""
    from zeroskip.demo import training_ops
    from zeroskip.models import builtin_workload
    from zeroskip.trace import trace_specs

    out, sweep = run_cli(capsys, ["demo"]).split("## Input density sweep", 1)
    dense = nonzero = rows = 0
    for net, model, sample in builtin_workload():
        assert "output matches torch" in out.split(f"## {net}:", 1)[1].split("\n", 1)[0]
        for name, spec, workload in trace_specs(model, sample):
            report = explain(spec, workload)
            row = (f"| {net}.{name} | {spec.describe().split(' on ')[0]} "
                   f"| {workload.density:.2f} | {report.skipped:.1%} |")
            assert row in out
            rows += 1
            for _, op_spec in training_ops(spec):
                dense += dense_macs(op_spec, workload.batch)
                nonzero += nonzero_macs(op_spec, workload.batch)
    assert out.count("\n| ") - out.count("| layer |") == rows
    assert rows >= 9  # 4 deconvs + 5 convs
    assert "0 fallbacks to torch" in out
    last = out.strip().splitlines()[-1]
    assert f"{dense:,} dense MACs -> {nonzero:,} non-zero MACs" in last
    check_density_sweep(sweep)


def check_density_sweep(sweep: str) -> None:
    """The demo's closing table: three layers, each at every sweep density, with the strategy
    zeroskip's dispatch ran."""
    from zeroskip.codegen import lower
    from zeroskip.demo import SWEEP_DENSITIES

    assert sweep.startswith(": 3 layers")
    header = "| layer | operator | density | torch ms | zeroskip ms | ratio | strategy |"
    rows = [line.strip("| ").split(" | ") for line in sweep.split(header, 1)[1].splitlines()
            if line.startswith("| ")]
    assert [float(r[2]) for r in rows] == list(SWEEP_DENSITIES) * 3
    for *_, strategy in rows:
        assert strategy in ("dense", "torch") or lower.Variant.parse(strategy)


def test_demo_sweeps_distinct_layers_3x3_first():
    from zeroskip.demo import sweep_layers

    wide = LayerSpec.conv(64, 128, 3, 2, 1, bias=False, input_size=(32, 32))
    same = LayerSpec.conv(128, 128, 3, 1, 1, bias=False, input_size=(16, 16))
    small = LayerSpec.conv(64, 128, 1, 2, bias=False, input_size=(32, 32))
    four = Workload(4, 0.5)
    chosen = sweep_layers([("n.small", "n", small, four), ("n.a", "n", same, four),
                           ("n.b", "n", same, four), ("n.wide", "n", wide, four)])
    assert [(layer.name, batch) for layer, batch in chosen] == \
        [("n.a", 4), ("n.wide", 4), ("n.small", 4)]
    assert [layer.spec for layer, _ in chosen] == [same, wide, small]


def test_bench_density_sweep_writes_its_files(tmp_path, capsys):
    """``bench --densities`` runs the sweep; --json, --markdown and --plot save it."""
    from zeroskip.bench import SweepReport
    out, md, png = (tmp_path / f"sweep.{ext}" for ext in ("json", "md", "png"))
    assert main(["bench", "--layers", "layer4.proj", "--densities", "1,0.1", "--repeats", "1",
                 "--json", str(out), "--markdown", str(md), "--plot", str(png)]) == 0
    printed, log = capsys.readouterr()
    report = SweepReport.from_json(out.read_text())
    assert [(r.name, r.density) for r in report.rows] == \
        [("resnet18.layer4.proj", 1.0), ("resnet18.layer4.proj", 0.1)]
    assert md.read_text().strip() == printed.strip()
    assert "| layer | density | torch ms | zeroskip ms | ratio | strategy |" in printed
    assert png.read_bytes().startswith(b"\x89PNG")
    assert "[1/1] resnet18.layer4.proj: 1: " in log and ", 0.1: " in log


def test_bench_densities_flag():
    from zeroskip.cli import build_parser
    parse = build_parser().parse_args
    assert parse(["bench"]).densities is None
    assert parse(["bench", "--densities"]).densities == (1.0, 0.5, 0.3, 0.1, 0.05)
    assert parse(["bench", "--densities", "0.5,0.2"]).densities == (0.5, 0.2)


@pytest.mark.parametrize("argv, message", [
    (["--densities", "0"], "expected densities in (0, 1]"),
    (["--densities", "1,x"], "expected densities in (0, 1]"),
    (["--densities", "--backward", "--plot", "x.png"], "does not combine with --backward"),
    (["--plot", "x.png"], "--plot draws a density sweep: it needs --densities"),
])
def test_bench_density_flag_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as info:
        main(["bench", "--quick", *argv])
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_console_script_entry_point():
    """The installed ``zeroskip`` script (or ``python -m zeroskip.cli``) as a real process."""
    script = Path(sys.executable).with_name("zeroskip")
    cmd = [str(script)] if script.exists() else [sys.executable, "-m", "zeroskip.cli"]
    proc = subprocess.run([*cmd, *CONV_ARGS, "--json"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["nonzero_macs"] == nonzero_macs(CONV)


# --------------------------------------------------------------------------------- tune
TUNE_SPEC = LayerSpec.conv(8, 16, 3, padding=1, input_size=(10, 10))


def _spec_file(tmp_path, content) -> Path:
    path = tmp_path / "specs.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def _tune_rows(out: str, operator: str = "forward") -> dict[tuple[str, str], list[str]]:
    """The choice table's rows of ``operator``: ``(layer, density)`` -> ``[choice, torch ms,
    best ms, speedup]``."""
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and line.count("|") == 9 and "| layer |" not in line]
    return {(r[0], r[3]): r[4:] for r in rows if r[1] == operator}


@pytest.fixture
def torch_threads():
    """Restores torch's thread count after a test that sets it through ``--threads``."""
    import torch
    threads = torch.get_num_threads()
    yield threads
    torch.set_num_threads(threads)


def test_tune_spec_file(capsys, tmp_path, torch_threads):
    specs = _spec_file(tmp_path, [TUNE_SPEC.to_dict()])
    db_path = tmp_path / "db" / "tuning.json"
    assert main(["tune", "--specs", str(specs), "--densities", "1,0.1", "--repeats", "1",
                 "--threads", "1", "--no-progress", "--db", str(db_path)]) == 0
    out, err = capsys.readouterr()
    assert "tuning:" not in err          # no progress bar
    db = tuning.TuningDB(db_path)
    assert db.machines[db.here]["threads"] == 1     # --threads applies before the database
    rows = _tune_rows(out)
    name = TUNE_SPEC.describe()
    assert set(rows) == {(name, "1"), (name, "0.1")}
    for (_, density), (choice, torch_ms, best_ms, speedup) in rows.items():
        assert choice == db.lookup(TUNE_SPEC, float(density))
        assert float(speedup.rstrip("x")) == pytest.approx(float(torch_ms) / float(best_ms),
                                                           rel=0.02, abs=0.01)
    crossover = db.crossover(TUNE_SPEC)
    assert f"| {name} | {f'{crossover:g}' if crossover else 'none'} |" in out.splitlines()
    assert out.rstrip().endswith(f"tuning database: {db_path}")


def test_tune_backward(capsys, tmp_path, torch_threads):
    """--backward tunes the input and weight gradients too, at --batch, and files them in that
    batch's bucket, where the gradient dispatch of a training step at that batch reads them."""
    specs = _spec_file(tmp_path, [TUNE_SPEC.to_dict()])
    db_path = tmp_path / "tuning.json"
    assert main(["tune", "--specs", str(specs), "--densities", "1", "--repeats", "1",
                 "--threads", "1", "--no-progress", "--db", str(db_path), "--backward",
                 "--batch", "4"]) == 0
    out = capsys.readouterr().out
    db = tuning.TuningDB(db_path)
    name = TUNE_SPEC.describe()
    for operator, spec in (("forward", TUNE_SPEC), ("grad_input", TUNE_SPEC.grad_input()),
                           ("grad_weight", TUNE_SPEC.grad_weight())):
        rows = _tune_rows(out, operator)
        assert list(rows) == [(name, "1")]
        assert list(db.layer(spec)) == ["1@4"]
        assert rows[(name, "1")][0] == db.lookup(spec, 1.0, batch=4)
        assert set(db.layer(spec)["1@4"]["ms"]) >= {"torch", "dense"}


def test_tune_suite_selection(capsys, tmp_path, monkeypatch):
    """Without --specs, the suite's forward layers are tuned (the tuning itself faked here)."""
    from zeroskip import bench
    from zeroskip.runtime import autotune
    seen = {}

    def fake_tune_all(layers, densities, db, repeats, progress, backward):
        seen.update(layers=list(layers), densities=densities, repeats=repeats, progress=progress)
        results = []
        for spec, _ in seen["layers"]:
            for d in densities:
                ms = {"torch": 2.0, "dense": 1.0, "sparse": 0.5 if d < 0.5 else 4.0}
                result = autotune.Result(spec, d, ms, {}, None)
                db.record(spec, d, result.choice, ms)
                results.append(result)
        db.save()
        return results

    monkeypatch.setattr(autotune, "tune_all", fake_tune_all)
    db_path = tmp_path / "tuning.json"
    assert main(["tune", "--quick", "--db", str(db_path)]) == 0
    out = capsys.readouterr().out
    layers = [layer for layer in bench.select(quick=True) if layer.spec.op in ("conv",
                                                                               "conv_transpose")]
    assert seen["layers"] == [(layer.spec, 1) for layer in layers]   # at batch 1
    assert seen["densities"] == (1.0, 0.5, 0.3, 0.1, 0.05)
    assert (seen["repeats"], seen["progress"]) == (7, True)
    rows = _tune_rows(out)
    assert len(rows) == 5 * len(layers)
    assert rows[(layers[0].name, "0.3")] == ["sparse", "2", "0.5", "4.00x"]
    assert rows[(layers[0].name, "1")] == ["dense", "2", "1", "2.00x"]
    assert f"| {layers[-1].name} | 0.3 |" in out.splitlines()     # the crossover
    assert tuning.TuningDB(db_path).lookup(layers[-1].spec, 0.05) == "sparse"


def test_tune_merge_only(capsys, tmp_path):
    other = LayerSpec.conv(8, 16, 1, input_size=(10, 10))
    first, second = tuning.TuningDB(tmp_path / "a.json"), tuning.TuningDB(tmp_path / "b.json")
    first.record(TUNE_SPEC, 0.1, "sparse", {"sparse": 1.0})
    first.record(TUNE_SPEC, 1.0, "dense", {"dense": 1.0})
    second.record(other, 0.3, "torch", {"torch": 1.0})
    first.save()
    second.save()
    before = [p.read_text() for p in (first.path, second.path)]
    target = tmp_path / "merged.json"
    out = run_cli(capsys, ["tune", "--merge", str(first.path), str(second.path),
                           "--db", str(target)])
    assert "merged 3 records from 2 file(s)" in out and "| layer |" not in out
    assert out.rstrip().endswith(f"tuning database: {target}")
    merged = tuning.TuningDB(target)
    assert (merged.lookup(TUNE_SPEC, 0.1), merged.lookup(TUNE_SPEC, 1.0),
            merged.lookup(other, 0.3)) == ("sparse", "dense", "torch")
    assert [p.read_text() for p in (first.path, second.path)] == before


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("{not json", "is not JSON"),
    ({"op": "conv"}, "non-empty JSON list"),
    ([], "non-empty JSON list"),
    ([{"op": "conv", "size": 3}], "layer 0: unknown LayerSpec fields"),
    ([TUNE_SPEC.to_dict(), {**TUNE_SPEC.to_dict(), "in_channels": -1}], "layer 1:"),
    ([TUNE_SPEC.grad_weight().to_dict()], "layer 0: tuning covers conv"),
], ids=["missing", "not-json", "not-a-list", "empty", "unknown-field", "bad-value", "grad-op"])
def test_tune_bad_spec_file_exits_2(capsys, tmp_path, content, message):
    path = tmp_path / "specs.json" if content is None else _spec_file(tmp_path, content)
    db_path = tmp_path / "tuning.json"
    with pytest.raises(SystemExit) as info:
        main(["tune", "--specs", str(path), "--db", str(db_path), "--no-progress"])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    assert "zeroskip tune: error: --specs:" in err and str(path) in err and message in err
    assert not db_path.exists()


@pytest.mark.parametrize("argv, message", [
    (["--densities", "0,0.5"], "--densities"),
    (["--densities", "1,x"], "--densities"),
    (["--repeats", "0"], "--repeats"),
    (["--layers", "no-such-layer"], "no forward layer"),
    (["--specs", "s.json", "--quick"], "--quick and --layers"),
], ids=["density-0", "density-text", "repeats-0", "no-layer", "specs-and-quick"])
def test_tune_bad_flags_exit_2(capsys, tmp_path, argv, message):
    with pytest.raises(SystemExit) as info:
        main(["tune", *argv, "--db", str(tmp_path / "tuning.json")])
    assert info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err and message in err


@pytest.mark.parametrize("flag", ["--merge", "--db"])
def test_tune_foreign_file_is_reported_not_set_aside(capsys, tmp_path, flag):
    """A file named on the command line that is no tuning database (a mistyped name) exits 2
    and stays where it is; only the database found by default is set aside and rebuilt."""
    foreign = tmp_path / "results.json"
    foreign.write_text('{"rows": []}')
    ok = tuning.TuningDB(tmp_path / "ok.json")
    ok.record(TUNE_SPEC, 0.1, "sparse", {})
    ok.save()
    argv = ["--merge", str(foreign), "--db", str(ok.path)] if flag == "--merge" else \
        ["--merge", str(ok.path), "--db", str(foreign)]
    with pytest.raises(SystemExit) as info:
        main(["tune", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"zeroskip tune: error: {flag}: {foreign} is not a zeroskip tuning database" in err
    assert foreign.read_text() == '{"rows": []}'
    assert not foreign.with_name(foreign.name + ".corrupt").exists()


def test_tune_missing_merge_file_exits_2(capsys, tmp_path):
    missing = tmp_path / "nowhere.json"
    with pytest.raises(SystemExit) as info:
        main(["tune", "--merge", str(missing), "--db", str(tmp_path / "tuning.json")])
    assert info.value.code == 2
    assert f"--merge: cannot read {missing}" in capsys.readouterr().err
