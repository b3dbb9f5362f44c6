"""``zeroskip.trace`` and ``zeroskip trace``: measured input densities, the specs a converted
model asks for (fused ReLUs included), the layers file and its older formats, bad input."""
from __future__ import annotations

import copy
import itertools
import json
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import zeroskip
from zeroskip import LayerSpec, Workload
from zeroskip.cli import _spec_file, build_parser, main
from zeroskip.trace import (TraceError, build_model, load_factory, parse_layers, read_layers,
                            trace, write_layers)


class Masked(nn.Module):
    """Zeroes a fixed quarter of every input, then convolves: the conv's density is exact."""

    def __init__(self):
        super().__init__()
        mask = torch.zeros(2, 4, 4)
        mask.view(-1)[::4] = 1
        self.register_buffer("mask", mask)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)

    def forward(self, x):
        return self.conv(x * self.mask)


class TwoShapes(nn.Module):
    """One conv called on two sizes (and twice on the first) per forward."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        a = self.conv(self.conv(x))
        return a.sum() + self.conv(F.avg_pool2d(x, 2)).sum()


class Upsample(nn.Module):
    """A transposed conv called with ``output_size``: torch picks its output padding per call."""

    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1)

    def forward(self, x):
        return self.up(x, output_size=[2 * x.shape[-2], 2 * x.shape[-1]])


def fusion_model() -> nn.Sequential:
    """Conv+ReLU pairs that convert fuses and ones it must not."""
    hooked_relu = nn.ReLU()
    hooked_relu.register_forward_hook(lambda *args: None)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),                        # fused
        nn.Sequential(nn.Conv2d(8, 8, 1), nn.ReLU(inplace=True)),        # fused, nested
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),     # BN between: not fused
        nn.Conv2d(8, 8, 3, padding=1), hooked_relu,                      # hooked ReLU: not fused
        nn.Conv2d(8, 4, 1), nn.ReLU6(),                                  # not a ReLU
        nn.ConvTranspose2d(4, 4, 2, stride=2), nn.ReLU(),                # no fused transposed conv
        nn.Conv2d(4, 2, 3))


def densities(data: dict) -> dict[str, dict]:
    return {layer["name"]: layer["density"] for layer in data["layers"]}


# ------------------------------------------------------------------------------ densities
def test_relu_input_density_is_about_a_half_and_varies_over_batches():
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 3))
    data = trace(model, (2, 3, 8, 8), batches=5)
    (layer,) = data["layers"]
    d = layer["density"]
    assert layer["name"] == "1" and layer["module"] == "Conv2d" and layer["calls"] == 5
    assert abs(d["mean"] - 0.5) < 0.1 and d["std"] > 0 and d["min"] < d["mean"] < d["max"]
    spec = LayerSpec.from_dict(layer["spec"])
    assert spec == LayerSpec.conv(3, 4, 3, input_size=(8, 8)) and layer["batch"] == 2


def test_exact_zero_fraction_and_first_layer_density():
    data = trace(Masked(), (3, 2, 4, 4), batches=3)
    assert densities(data) == {"conv": {"mean": 0.25, "std": 0.0, "min": 0.25, "max": 0.25}}
    assert data["layers"][0]["density"]["mean"] == 0.25 and "density" not in \
        data["layers"][0]["spec"]
    data = trace(nn.Conv1d(2, 2, 3), (1, 2, 16), batches=2)     # a bare conv: randn input
    assert data["layers"][0]["name"] == "(model)"
    assert densities(data)["(model)"]["mean"] == 1.0


def test_output_gradient_densities_are_traced_without_touching_grads():
    """The backward of random output gradients reaches every conv: a conv followed by a ReLU
    sees about half its output gradient zero (the mask), the last one none; the model's
    .grad stay None, and gradients=False traces no gradient densities."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(inplace=True),
                          nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(4, 2, 1))
    data = trace(model, (2, 3, 8, 8), batches=3)
    grads = {layer["name"]: layer["grad_density"] for layer in data["layers"]}
    assert set(grads) == {"0", "2", "4"} and all(g["mean"] > 0 for g in grads.values())
    assert abs(grads["0"]["mean"] - 0.5) < 0.15 and abs(grads["2"]["mean"] - 0.5) < 0.15
    assert grads["4"]["mean"] == 1.0
    assert all(p.grad is None for p in model.parameters())
    layers = parse_layers(data, "traced")
    assert [w.grad_density for _, _, w in layers] == [g["mean"] for g in grads.values()]
    assert all("grad_density" not in layer
               for layer in trace(model, (2, 3, 8, 8), batches=1, gradients=False)["layers"])
    frozen = copy.deepcopy(model).requires_grad_(False)      # frozen weights: still traced
    assert all("grad_density" in layer for layer in trace(frozen, (1, 3, 8, 8))["layers"])


def test_seed_and_batches_decide_the_samples():
    model = nn.Sequential(nn.ReLU(), nn.Conv2d(3, 4, 3))
    first, again = (trace(model, (1, 3, 6, 6), batches=3, seed=7) for _ in range(2))
    assert first == again
    other = trace(model, (1, 3, 6, 6), batches=3, seed=8)
    assert densities(other) != densities(first)
    assert trace(model, (1, 3, 6, 6), batches=1, seed=7)["layers"][0]["density"]["std"] == 0


def test_one_entry_per_module_and_shape_in_first_call_order():
    data = trace(TwoShapes(), (2, 3, 8, 8), batches=2)
    assert [(layer["name"], layer["calls"], layer["spec"]["input_size"])
            for layer in data["layers"]] == [("conv", 4, [8, 8]), ("conv#2", 2, [4, 4])]


def test_modes_are_restored_and_batch_norm_untouched():
    model = fusion_model().train()
    model[2].eval()                                          # mixed modes come back as they were
    modes = [m.training for m in model.modules()]
    before = copy.deepcopy(model.state_dict())
    trace(model, (1, 3, 8, 8), batches=2)
    assert [m.training for m in model.modules()] == modes and not all(modes)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m._forward_pre_hooks for m in model.modules())


# ------------------------------------------------------------------------------ fused ReLU
@pytest.fixture
def asked(monkeypatch) -> list[LayerSpec]:
    """The specs that converted modules ask zeroskip's kernels for, in call order, recorded
    where they call them; torch computes instead (nothing compiles)."""
    from zeroskip import nn as znn
    from zeroskip.runtime.arguments import spec_of_call as _build_spec
    seen = []

    def record(op, rank, input, weight, bias, stride, padding, dilation, groups,
               output_padding=0, padding_mode="zeros", activation="none", relu_input=False):
        input = torch.relu(input) if relu_input else input     # the ReLU fused before
        seen.append(_build_spec(op, rank, input.shape, weight.shape, bias is not None,
                                input.dtype, (stride, padding, dilation, groups,
                                              output_padding, padding_mode, activation)))
        if op == "conv":
            y = getattr(F, f"conv{rank}d")(input, weight, bias, stride, padding, dilation, groups)
        else:
            y = getattr(F, f"conv_transpose{rank}d")(input, weight, bias, stride, padding,
                                                     output_padding, groups, dilation)
        return torch.relu(y) if activation == "relu" else y

    monkeypatch.setattr(znn, "convolution", record)
    return seen


def run_converted(model: nn.Module, shape, fuse_relu: bool = True) -> None:
    converted = zeroskip.convert(copy.deepcopy(model), fuse_relu=fuse_relu).eval()
    with torch.no_grad():
        converted(torch.randn(shape))


def specs_of(data: dict) -> list[LayerSpec]:
    return [LayerSpec.from_dict(layer["spec"]) for layer in data["layers"]]


@pytest.mark.parametrize("fuse_relu", [True, False])
def test_specs_are_what_the_converted_model_asks_for(asked, fuse_relu):
    model = fusion_model()
    data = trace(model, (2, 3, 8, 8), batches=1, fuse_relu=fuse_relu)
    run_converted(model, (2, 3, 8, 8), fuse_relu)
    assert specs_of(data) == asked and data["fuse_relu"] is fuse_relu
    expected = ["relu", "relu", "none", "none", "none", "none", "none"] if fuse_relu else \
        ["none"] * 7
    assert [s.activation for s in asked] == expected


class TappedBlock(nn.Module):
    """A conv-ReLU pair fx finds in the model's own forward, and a Sequential whose layers the
    forward reads one by one (a feature tap: not fused)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.taps = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())

    def forward(self, x):
        y = torch.relu(self.conv1(x)) * 2
        tap = self.taps[0](y)
        return self.taps[1](tap) + tap


def test_trace_predicts_what_convert_fuses_in_the_models_forward(asked):
    """trace asks convert itself (on a copy): the ReLU of the forward fuses into conv1, none
    into the tapped Sequential's conv."""
    model = TappedBlock()
    data = trace(model, (1, 3, 6, 6), batches=1)
    run_converted(model, (1, 3, 6, 6))
    assert specs_of(data) == asked
    assert [s.activation for s in asked] == ["relu", "none"]


def test_tracing_leaves_the_model_fusable(monkeypatch):
    """The hooks come off: convert still fuses (hooks would have blocked it)."""
    model = fusion_model()
    trace(model, (1, 3, 8, 8), batches=1)
    zeroskip.convert(model)
    assert type(model[0]).__name__ == "ConvReLU2d" and isinstance(model[1], nn.Identity)


def test_transposed_conv_with_output_size_and_converted_models(asked):
    data = trace(Upsample(), (1, 4, 5, 5), batches=1)
    spec = LayerSpec.from_dict(data["layers"][0]["spec"])
    assert spec.output_padding == (1, 1) and spec.output_size == (10, 10)
    run_converted(Upsample(), (1, 4, 5, 5))
    assert specs_of(data) == asked
    # An already converted model: its ConvReLU modules say relu, with or without fuse_relu.
    converted = zeroskip.convert(fusion_model())
    for fuse in (True, False):
        data = trace(converted, (1, 3, 8, 8), batches=1, fuse_relu=fuse)
        assert [layer["spec"]["activation"] for layer in data["layers"]][:3] == \
            ["relu", "relu", "none"]
    # A subclass of a torch conv keeps its own forward on torch: not traced.
    class Custom(nn.Conv2d):
        pass
    model = nn.Sequential(Custom(3, 3, 1), nn.Conv2d(3, 3, 1))
    assert [layer["name"] for layer in trace(model, (1, 3, 4, 4), 1)["layers"]] == ["1"]


# ------------------------------------------------------------------------------ errors
def test_trace_errors():
    with pytest.raises(ValueError, match="positive ints"):
        trace(nn.Conv2d(3, 3, 1), (1, 0, 4, 4))
    with pytest.raises(ValueError, match="batches"):
        trace(nn.Conv2d(3, 3, 1), (1, 3, 4, 4), batches=0)
    with pytest.raises(TraceError, match=r"forward raised RuntimeError .*\[1, 2, 4, 4\]"):
        trace(nn.Conv2d(3, 3, 1), (1, 2, 4, 4))
    with pytest.raises(TraceError, match="no convolution layers ran"):
        trace(nn.Sequential(nn.ReLU()), (1, 3))


def test_load_factory_and_build_model():
    from zeroskip.models import resnet_stage
    assert load_factory("zeroskip.models:resnet_stage") is resnet_stage
    assert load_factory("torch.nn:Conv2d.forward") is nn.Conv2d.forward
    assert isinstance(build_model("zeroskip.models:dcgan_generator"), nn.Sequential)
    for bad in ("zeroskip.models", ":f", "m:", "a b:c", "m:f:g", "m.:f", None):
        with pytest.raises(ValueError, match="MODULE:FACTORY"):
            load_factory(bad)
    with pytest.raises(ImportError, match="no_such_module_zs.*no_such_module_zs:f"):
        load_factory("no_such_module_zs:f")
    with pytest.raises(AttributeError, match="zeroskip.models has no attribute 'nope'"):
        load_factory("zeroskip.models:nope")
    with pytest.raises(TypeError, match="not a callable"):
        load_factory("zeroskip.models:torch")
    with pytest.raises(TypeError, match="returned a list, not an nn.Module"):
        build_model("zeroskip.models:builtin_workload")
    with pytest.raises(TraceError, match=r"BasicBlock\(\) raised TypeError"):
        build_model("zeroskip.models:BasicBlock")


# ------------------------------------------------------------------------------ the file
def test_write_and_read_layers(tmp_path):
    data = trace(fusion_model(), (1, 3, 8, 8), batches=2, name="tests:fusion_model")
    path = write_layers(data, tmp_path / "sub" / "layers.json")
    assert json.loads(path.read_text()) == data
    assert len(path.read_text().splitlines()) == len(data) + len(data["layers"]) + 3
    layers = read_layers(path)
    assert [name for name, *_ in layers] == [layer["name"] for layer in data["layers"]]
    assert [spec.to_dict() for _, spec, _ in layers] == \
        [layer["spec"] for layer in data["layers"]]
    assert [work for *_, work in layers] == \
        [Workload(layer["batch"], layer["density"]["mean"], layer["grad_density"]["mean"])
         for layer in data["layers"]]
    assert list(data) == ["format", "version", "model", "input_shape", "batches", "seed",
                          "fuse_relu", "dtype", "zeroskip", "torch", "layers"]
    assert (data["format"], data["version"], data["model"], data["zeroskip"]) == \
        ("zeroskip-layers", 2, "tests:fusion_model", zeroskip.__version__)
    assert set(data["layers"][0]) == {"name", "module", "calls", "batch", "density",
                                      "grad_density", "spec"}


def test_read_layers_takes_the_older_formats(tmp_path):
    a = LayerSpec.conv(8, 16, 3, padding=1, input_size=(10, 10))
    b = LayerSpec.conv_transpose(4, 2, 4, 2, 1, input_size=(5, 5)).grad_weight()
    path = tmp_path / "layers.json"
    dense = Workload()
    path.write_text(json.dumps([a.to_dict(), b.to_dict()]))
    assert read_layers(path) == [(a.describe(), a, dense), (b.describe(), b, dense)]
    path.write_text(json.dumps({"first": a.to_dict(), "second": b.to_dict()}))
    assert read_layers(path) == [("first", a, dense), ("second", b, dense)]
    # Older spec objects carried the workload: it is read beside the spec.
    path.write_text(json.dumps([{**a.to_dict(), "batch": 4, "density": 0.25}]))
    assert read_layers(path) == [(a.describe(), a, Workload(4, 0.25))]
    path.write_text(json.dumps(traced(layers=[{"name": "c", "spec": {**GOOD, "batch": 2,
                                                                     "density": 0.5}}])))
    assert read_layers(path) == [("c", LayerSpec.from_dict(GOOD), Workload(2, 0.5))]


GOOD = LayerSpec.conv(8, 16, 3, padding=1, input_size=(10, 10)).to_dict()


def traced(**changes) -> dict:
    return {"format": "zeroskip-layers", "version": 1,
            "layers": [{"name": "conv", "spec": GOOD}], **changes}


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not JSON"),
    ([], "non-empty JSON list"),
    ({}, "non-empty JSON list"),
    ("3", "non-empty JSON list"),
    ([3], "layer 0: not a LayerSpec.to_dict() object"),
    ([GOOD, {**GOOD, "size": 3}], "layer 1: unknown LayerSpec fields"),
    ([{**GOOD, "stride": [0, 0]}], "layer 0: non-positive stride"),
    ([{**GOOD, "kernel_size": 3}], "layer 0:"),
    ({"a": {**GOOD, "in_channels": -1}}, "layer 'a': in_channels"),
    (traced(format="other"), "format 'other'"),
    (traced(version=3), "version 3 is not supported"),
    ([{**GOOD, "batch": -1}], "layer 0: batch must be non-negative"),
    ([{**GOOD, "density": 2}], "layer 0: density"),
    (traced(version=2, layers=[{"name": "c", "spec": GOOD, "batch": "2"}]), "layer 'c': batch"),
    (traced(layers=[]), "'layers' must be a non-empty list"),
    (traced(layers=[{"spec": GOOD}]), "layer 0: expected an object with a non-empty 'name'"),
    (traced(layers=[{"name": "x", "spec": GOOD}] * 2), "layer 'x': the name is used twice"),
    (traced(layers=[{"name": "x"}]), "layer 'x': not a LayerSpec"),
    (traced(layers=[{"name": "x", "spec": {**GOOD, "activation": "tanh"}}]), "layer 'x': act"),
], ids=["not-json", "empty-list", "empty-object", "number", "not-object", "unknown-field",
        "stride-0", "wrong-type", "named-bad-value", "other-format", "version", "bad-batch",
        "bad-density", "bad-v2-batch", "no-layers",
        "no-name", "duplicate", "no-spec", "bad-activation"])
def test_read_layers_rejects_malformed_files(tmp_path, content, message):
    path = tmp_path / "layers.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ValueError) as info:
        read_layers(path)
    assert str(path) in str(info.value) and message in str(info.value)


def test_read_layers_missing_file_raises_oserror(tmp_path):
    with pytest.raises(OSError):
        read_layers(tmp_path / "missing.json")


def test_spec_file_of_the_cli_takes_trace_files(tmp_path, capsys):
    data = trace(fusion_model(), (1, 3, 8, 8), batches=1)
    path = write_layers(data, tmp_path / "layers.json")
    parser = build_parser()
    layers = _spec_file(path, parser, flag="", named=True, forward_only=False)
    assert layers == read_layers(path)
    assert _spec_file(path, parser) == layers              # tune --specs takes it too
    path.write_text(json.dumps({"x": GOOD}))
    with pytest.raises(SystemExit):                         # tune --specs: no named objects
        _spec_file(path, parser)
    assert "non-empty JSON list" in capsys.readouterr().err
    assert parse_layers({"x": GOOD}, "data") == [("x", LayerSpec.from_dict(GOOD), Workload())]


# ------------------------------------------------------------------------------ the CLI
_modules = itertools.count()


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A fresh importable module in ``tmp_path`` with a few factories; its name."""
    name = f"zs_trace_models_{next(_modules)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def small():
            return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 2, 1))

        def no_convs():
            return nn.Sequential(nn.ReLU())

        class Broken(nn.Module):
            def forward(self, x):
                raise KeyError("boom")

        NOT_CALLABLE = 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def test_cli_traces_a_custom_factory(capsys, tmp_path, factory_module):
    out = tmp_path / "layers.json"
    assert main(["trace", f"{factory_module}:small", "--input-shape", "2,3,6,6", "--batches",
                 "3", "--seed", "1", "-o", str(out)]) == 0
    stdout, err = capsys.readouterr()
    lines = stdout.splitlines()
    assert err == "" and len(lines) == 3
    assert lines[0].startswith("0  conv2d(3->4, k=3, p=1)+relu on 2x6x6  density 1.000 ± 0.000")
    assert lines[1].startswith("2  conv2d(4->2, k=1) on 2x6x6  density 0.")
    assert lines[2] == f"2 conv layers of {factory_module}:small written to {out}"
    data = json.loads(out.read_text())
    assert (data["model"], data["input_shape"], data["batches"], data["seed"]) == \
        (f"{factory_module}:small", [2, 3, 6, 6], 3, 1)
    assert [spec.activation for _, spec, _ in read_layers(out)] == ["relu", "none"]
    assert main(["trace", f"{factory_module}:small", "--input-shape", "2,3,6,6",
                 "--no-fuse-relu", "-o", str(out)]) == 0
    assert [spec.activation for _, spec, _ in read_layers(out)] == ["none", "none"]


def test_cli_default_is_the_builtin_resnet_stage(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["trace", "--batches", "1"]) == 0
    stdout = capsys.readouterr().out
    assert "conv layers of zeroskip.models:resnet_stage written to layers.json" in stdout
    data = json.loads((tmp_path / "layers.json").read_text())
    assert data["input_shape"] == [4, 64, 32, 32] and len(data["layers"]) == 5
    assert data["layers"][0]["batch"] == 4 and "batch" not in data["layers"][0]["spec"]


@pytest.mark.parametrize("argv, message", [
    (["no_such_module_zs:f", "--input-shape", "1,3,8,8"], "cannot import module"),
    (["{mod}", "--input-shape", "1,3,8,8"], "expected MODULE:FACTORY"),
    (["{mod}:nope", "--input-shape", "1,3,8,8"], "has no attribute 'nope'"),
    (["{mod}:NOT_CALLABLE", "--input-shape", "1,3,8,8"], "not a callable"),
    (["{mod}:small"], "--input-shape is needed"),
    (["{mod}:small", "--input-shape", "1,x,8"], "argument --input-shape"),
    (["{mod}:small", "--input-shape", "1,0,8"], "argument --input-shape"),
    (["{mod}:small", "--input-shape", "1,3,8,8", "--batches", "0"], "argument --batches"),
    (["{mod}:small", "--input-shape", "1,5,8,8"], "forward raised RuntimeError"),
    (["{mod}:Broken", "--input-shape", "1,3,8,8"], "forward raised KeyError"),
    (["{mod}:no_convs", "--input-shape", "1,3,8,8"], "no convolution layers ran"),
    (["{mod}:small", "--input-shape", "1,3,8,8", "-o", "{tmp}"], "--out: cannot write"),
], ids=["unimportable", "malformed", "no-attribute", "not-callable", "no-shape", "shape-text",
        "shape-zero", "batches-0", "wrong-shape", "forward-raises", "no-convs", "out-is-a-dir"])
def test_cli_bad_input_exits_2(capsys, tmp_path, factory_module, argv, message):
    out = tmp_path / "layers.json"
    argv = [a.format(mod=factory_module, tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as info:
        main(["trace", *argv, *(["-o", str(out)] if "-o" not in argv else [])])
    assert info.value.code == 2
    stdout, err = capsys.readouterr()
    assert "Traceback" not in err and "zeroskip trace: error:" in err and message in err
    assert not out.exists()
