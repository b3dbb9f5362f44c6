"""No LayerSpec field reaches generated source except as a validated integer or an enum from a
fixed set: for every field, each attempt to smuggle text into the C or Triton source (a hostile
int, str or float subclass, a plain string, a list holding one, JSON through ``from_dict``) either
raises one of the documented exceptions or yields a spec of plain built-ins whose sources equal
those of the clean spec. Tuning-database names (kernel variants, Triton choices) and layer names
are tried the same way."""
from __future__ import annotations

import dataclasses
import inspect
import json
import warnings

import pytest
import torch

import zeroskip.functional as zf
from zeroskip import LayerSpec, Workload
from zeroskip.codegen import emit, lower, pipeline
from zeroskip.codegen.ir import IRError
from zeroskip.codegen.targets import TritonTarget
from zeroskip.codegen.variant import Config, Variant
from zeroskip.generate import _folders, plan as generate_plan, slug
from zeroskip.runtime import arguments, calls, tuning

MARKER_C = '*/ system("touch /tmp/pwned"); /*'
MARKER_PY = "__import__('os').system('touch /tmp/pwned')"
MARKERS = (MARKER_C, MARKER_PY, "pwned")
DOCUMENTED = (TypeError, ValueError, RuntimeError)


# ------------------------------------------------------------------------------ hostile values
class HostileInt(int):
    """Holds a real int value but says something else everywhere it can be asked."""

    def __str__(self):
        return MARKER_C

    __repr__ = __str__

    def __format__(self, spec):
        return MARKER_PY

    def __index__(self):
        return 7

    def __int__(self):
        return 7

    def __eq__(self, other):
        return True

    def __hash__(self):
        return 0


class HostileStr(str):
    """Equal to everything, formatted as the marker."""

    def __str__(self):
        return HostileStr(MARKER_C)

    def __repr__(self):
        return MARKER_PY

    def __format__(self, spec):
        return MARKER_C

    def __eq__(self, other):
        return True

    def __ne__(self, other):
        return False

    def __hash__(self):
        return 0

    def removeprefix(self, prefix):
        return HostileStr(MARKER_C)


class HostileFloat(float):
    def __repr__(self):
        return MARKER_C

    __str__ = __repr__

    def __format__(self, spec):
        return MARKER_PY

    def __float__(self):
        return 0.25


# ------------------------------------------------------------------------------ clean specs
# One spec per operator family the templates render differently: a reflect-padded conv (the
# padding mode is printed in a C comment), a transposed conv (phases), a weight gradient.
CLEAN = {
    "conv": LayerSpec.conv(4, 6, 3, stride=2, padding=1, groups=2, bias=True,
                           padding_mode="reflect", input_size=(9,), dtype="float64",
                           activation="relu"),
    "conv_transpose": LayerSpec.conv_transpose(2, 4, (2, 3), stride=(2, 1), padding=(1, 0),
                                               output_padding=(1, 0), dilation=1,
                                               input_size=(4, 5)),
    "conv_grad_weight": LayerSpec.conv(2, 3, 2, dilation=2, padding=1,
                                       input_size=(6,)).grad_weight(),
}


def triton_source(spec: LayerSpec, family: str) -> str:
    """The Triton module of ``spec`` in ``family`` (rendered from the dense graph)."""
    target = TritonTarget()
    plan = target.plan(pipeline.run(spec, strategy="dense")[-1][1], Variant("dense"))
    return target.render(plan, family)


def sources(spec: LayerSpec) -> dict[str, str]:
    """The C source (dense and sparse variants) and the Triton source of ``spec``, or the name
    of the error that stops one (the same for a clean spec and a smuggled one)."""
    out = {}
    kinds = [("c", "auto", lower.DEFAULT), ("c-sparse", "sparse", lower.Variant("sparse", 4, 2))]
    for kind, strategy, variant in kinds:
        try:
            graph = pipeline.run(spec, strategy=strategy)[-1][1]
            out[kind] = emit.render(lower.plan(graph, variant=variant))
        except IRError as exc:
            out[kind] = f"IRError: {exc}"
    for family in ("direct", "block_sparse", "weight_grad"):
        try:
            out[f"triton-{family}"] = triton_source(spec, family)
        except (IRError, ValueError) as exc:
            out[f"triton-{family}"] = f"{type(exc).__name__}: {exc}"
    return out


_SOURCES = {name: sources(spec) for name, spec in CLEAN.items()}


def test_clean_sources_render():
    for name, found in _SOURCES.items():
        assert any(not s.startswith(("IRError", "ValueError")) for s in found.values()), name
    assert "reflect" in _SOURCES["conv"]["c"]      # the padding mode is in the C source
    assert "triton" in _SOURCES["conv_transpose"]["triton-direct"]


# ------------------------------------------------------------------------------ the attempts
def attempts(value) -> list[tuple[str, object]]:
    """Smuggling attempts for a field whose clean value is ``value``; [] for a kind of value
    this test does not know (which fails the test: a new field needs its cases)."""
    common = [("plain C marker", MARKER_C), ("plain Python marker", MARKER_PY),
              ("list with marker", [MARKER_C]), ("hostile str of marker", HostileStr(MARKER_C)),
              ("dict", {"x": MARKER_C}), ("None", None)]
    if isinstance(value, bool):
        return common + [("hostile int", HostileInt(int(value))), ("int", int(value)),
                         ("hostile str of value", HostileStr(str(value)))]
    if isinstance(value, int):
        return common + [("hostile int", HostileInt(value)),
                         ("hostile str of value", HostileStr(str(value))),
                         ("float", float(value)), ("bool", True),
                         ("list of hostile int", [HostileInt(value)])]
    if isinstance(value, float):
        return common + [("hostile float", HostileFloat(value)),
                         ("hostile str of value", HostileStr(repr(value))),
                         ("list of hostile float", [HostileFloat(value)]),
                         ("bool", True)]
    if isinstance(value, str):
        return common + [("hostile str of value", HostileStr(value)),
                         ("hostile str, plain text value", _hostile_text(value)),
                         ("hostile int", HostileInt(0)),
                         ("value + marker", value + MARKER_C)]
    if isinstance(value, tuple) and value and all(isinstance(v, int) for v in value):
        return common + [("tuple of hostile ints", tuple(HostileInt(v) for v in value)),
                         ("list of hostile ints", [HostileInt(v) for v in value]),
                         ("tuple with marker", (*value[:-1], MARKER_C)),
                         ("tuple with hostile str", (*value[:-1], HostileStr(str(value[-1])))),
                         ("hostile int", HostileInt(value[0])),
                         ("nested", tuple([v] for v in value))]
    if isinstance(value, tuple) and value and all(isinstance(p, tuple) for p in value):
        return common + [("pairs of hostile ints",
                          tuple((HostileInt(lo), HostileInt(hi)) for lo, hi in value)),
                         ("pair with marker", (*value[:-1], (value[-1][0], MARKER_C))),
                         ("pair of hostile strs",
                          (*value[:-1], tuple(HostileStr(str(v)) for v in value[-1]))),
                         ("deeper nesting", tuple(((lo,), (hi,)) for lo, hi in value))]
    return []


def _hostile_text(value: str) -> HostileStr:
    """A HostileStr whose text is the clean value itself (only its methods are hostile)."""
    return HostileStr(value)


def _plain(value) -> bool:
    """Only plain built-ins, all the way down."""
    if type(value) is tuple:
        return all(_plain(v) for v in value)
    return type(value) in (int, str, bool, float)


def _check_outcome(build, clean: LayerSpec, clean_sources: dict[str, str]) -> str:
    try:
        spec = build()
    except DOCUMENTED:
        return "raised"
    for f in dataclasses.fields(spec):
        assert _plain(getattr(spec, f.name)), (f.name, type(getattr(spec, f.name)))
    assert spec == clean
    for text in (spec.describe(), json.dumps(spec.to_dict()), repr(spec)):
        assert not any(m in text for m in MARKERS), text
    found = sources(spec)
    assert found == clean_sources
    for text in found.values():
        assert not any(m in text for m in MARKERS)
    return "normalized"


FIELDS = [f.name for f in dataclasses.fields(LayerSpec)]


@pytest.mark.parametrize("field", FIELDS)
def test_every_field_has_smuggling_cases(field):
    for clean in CLEAN.values():
        assert len(attempts(getattr(clean, field))) >= 8, \
            f"no smuggling case for LayerSpec.{field}: add one to attempts()"


@pytest.mark.parametrize("name", sorted(CLEAN))
@pytest.mark.parametrize("field", FIELDS)
def test_smuggle_through_field(field, name):
    clean = CLEAN[name]
    clean_sources = _SOURCES[name]
    clean_fields = {f.name: getattr(clean, f.name) for f in dataclasses.fields(clean)}
    outcomes = {}
    for label, value in attempts(clean_fields[field]):
        want, want_sources = clean, clean_sources
        if field == "dtype" and value is None:     # None is the default dtype, float32
            want = dataclasses.replace(clean, dtype="float32")
            want_sources = sources(want)
        # The dataclass itself, dataclasses.replace, and from_dict (JSON-like input).
        outcomes[label, "init"] = _check_outcome(
            lambda: LayerSpec(**{**clean_fields, field: value}), want, want_sources)
        outcomes[label, "replace"] = _check_outcome(
            lambda: dataclasses.replace(clean, **{field: value}), want, want_sources)
        outcomes[label, "from_dict"] = _check_outcome(
            lambda: LayerSpec.from_dict({**clean.to_dict(), field: value}), want,
            want_sources)
    # Plain text and text in a list never make a spec.
    for label in ("plain C marker", "plain Python marker", "list with marker", "dict"):
        for path in ("init", "replace", "from_dict"):
            assert outcomes[label, path] == "raised", (label, path)


def test_from_dict_of_json_with_markers():
    """JSON as a layers or tuning file holds it: every field replaced by marker text in turn."""
    for clean in CLEAN.values():
        data = clean.to_dict()
        for field in data:
            for value in (MARKER_C, [MARKER_C], [[MARKER_C, 1]], {"a": MARKER_C}, 1e400,
                          float("nan"), -1, 2 ** 64):
                text = json.dumps({**data, field: value})
                try:
                    spec = LayerSpec.from_dict(json.loads(text))
                except DOCUMENTED:
                    continue
                assert not any(m in spec.describe() for m in MARKERS)
                assert all(_plain(getattr(spec, f)) for f in FIELDS)


CONSTRUCTORS = {"conv": LayerSpec.conv, "conv_transpose": LayerSpec.conv_transpose}
CTOR_ARGS = {
    "conv": dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1, dilation=1,
                 groups=2, bias=True, padding_mode="reflect", dtype="float64", input_size=(9,),
                 activation="relu"),
    "conv_transpose": dict(in_channels=2, out_channels=4, kernel_size=(2, 3), stride=(2, 1),
                           padding=(1, 0), output_padding=(1, 0), groups=1, bias=True,
                           dilation=1, padding_mode="zeros", dtype=None, input_size=(4, 5),
                           activation="none"),
}


@pytest.mark.parametrize("name", sorted(CONSTRUCTORS))
def test_smuggle_through_constructor_arguments(name):
    make, args = CONSTRUCTORS[name], CTOR_ARGS[name]
    assert set(args) == set(inspect.signature(make).parameters) - {"cls"}
    clean = make(**args)
    assert clean == CLEAN[name]
    for arg, value in args.items():
        hostile = [HostileStr(value)] if isinstance(value, str) else \
            [HostileInt(value)] if isinstance(value, int) and not isinstance(value, bool) else \
            [tuple(HostileInt(v) for v in value)] if isinstance(value, tuple) else \
            [HostileFloat(value)] if isinstance(value, float) else []
        for bad in [MARKER_C, [MARKER_C], HostileStr(MARKER_C), *hostile]:
            outcome = _check_outcome(lambda: make(**{**args, arg: bad}), clean, _SOURCES[name])
            if bad is MARKER_C or isinstance(bad, list):
                assert outcome == "raised", arg


def test_workload_reads_the_value_not_the_conversion():
    work = Workload(HostileInt(2), HostileInt(1))
    assert work == Workload(2, 1.0) and type(work.batch) is int and type(work.density) is float
    assert Workload(2, HostileFloat(0.5)) == Workload(2, 0.5)
    for bad in (float("nan"), float("inf"), 10 ** 400, -0.5, "0.5"):
        with pytest.raises(ValueError, match="density"):
            Workload(2, bad)
    for bad in (MARKER_C, 2.0, True, None):
        with pytest.raises(TypeError, match="batch"):
            Workload(bad)


def test_padding_string_subclass_reads_plain_text():
    """'same' spelt by a str subclass whose __eq__ says yes to anything is read as its text."""
    assert LayerSpec.conv(2, 2, 3, padding=HostileStr("same"), input_size=(5,)).padding == \
        ((1, 1),)
    with pytest.raises(ValueError):
        LayerSpec.conv(2, 2, 3, padding=HostileStr(MARKER_C), input_size=(5,))


# ------------------------------------------------------------------------------ tuning database
HOSTILE_NAMES = [MARKER_C, MARKER_PY, f"sparse/w4{MARKER_C}", f"dense/w{MARKER_C}",
                 f"sparse/v8/{MARKER_C}", "sparse/w4\n#include </etc/passwd>", "sparse/w99",
                 "dense/w0", "dense/w-1", "sparse/w1e3", "", "/", "//", "sparse//w4",
                 f"dense/{MARKER_PY}", "m64n64k32w4s3", f"dense/m64n64k32w4s3{MARKER_PY}",
                 "dense/m63n64k32w4s3", "dense/m64n64k32w3s3", "dense/m64n64k32w4s9",
                 "dense/m99999999999999999999n64k32w4s3", f"sparse/m64n64k32w4s3x{MARKER_C}",
                 "torch/m64n64k32w4s3", HostileStr("dense"), HostileStr("sparse/w4")]


@pytest.mark.parametrize("name", HOSTILE_NAMES, ids=range(len(HOSTILE_NAMES)))
def test_variant_and_choice_names(name):
    """A name from the tuning database parses to plain values or raises ValueError."""
    clean = CLEAN["conv"]
    try:
        variant = lower.Variant.parse(name)
    except ValueError:
        pass
    else:
        assert _plain((variant.strategy, variant.tile_width or 0, variant.vectors or 0))
        assert variant.strategy in ("auto", "dense", "sparse")
        graph = pipeline.run(clean, strategy=variant.strategy)[-1][1]
        source = emit.render(lower.plan(graph, variant=variant))
        assert not any(m in source for m in MARKERS)
    try:
        parsed = Variant.parse(name)
        strategy, config = parsed.strategy, parsed.config
    except ValueError:
        pass
    else:
        assert strategy in ("auto", "dense", "sparse") and type(strategy) is str
        assert config is None or type(config) is Config
        assert config is None or _plain(dataclasses.astuple(config))
        # A Triton module does not depend on the config (launch-time constexprs) at all.
        source = triton_source(CLEAN["conv_transpose"],
                               "block_sparse" if strategy == "sparse" else "direct")
        assert not any(m in source for m in MARKERS)


def test_tampered_tuning_database_end_to_end(fresh_cache, monkeypatch, tmp_path):
    """Hostile choice names in a (user-writable) tuning database: every call still matches
    torch, and no file the run writes holds a marker."""
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("ZEROSKIP_TUNING_DB", str(path))
    x = torch.randn(2, 4, 9)
    x[x < 0.5] = 0                       # sparse enough for the cost model to consider sparse
    w, b = torch.randn(6, 2, 3), torch.randn(6)
    spec = arguments.spec_of_call("conv", 1, x.shape, w.shape, True, x.dtype,
                           ((2,), (1,), (1,), 2, 0, "zeros", "none"))
    want = torch.nn.functional.conv1d(x, w, b, 2, 1, 1, 2)
    for name in HOSTILE_NAMES[:8] + ["dense", "sparse/w4"]:
        db = tuning.TuningDB(path)
        for density in (0.1, 0.3, 0.5, 0.7, 1.0):
            db.record(spec, density, str(name), {"dense": 1.0})
        db.save()
        tuning.reset()
        monkeypatch.setattr(calls, "_calls", {})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = zf.conv1d(x, w, b, 2, 1, 1, 2)
        torch.testing.assert_close(got, want)
    for file in fresh_cache.rglob("*"):
        if file.is_file() and file.suffix in (".c", ".py", ".json"):
            text = file.read_text(errors="replace")
            assert not any(m in text for m in MARKERS), file


# ------------------------------------------------------------------------------ layer names
@pytest.mark.parametrize("name", [MARKER_C, MARKER_PY, "../../etc/passwd", "a/b\\c", "..",
                                  "", "名前", "CON", "x" * 300, "\x00evil",
                                  HostileStr("layerQQ")], ids=range(11))
def test_layer_names_never_reach_source(name):
    """Layer names become folder names (slugs) and manifest entries, never source text."""
    folder = slug(name)
    assert folder and all(c.isascii() and (c.isalnum() or c in "._-") for c in folder)
    assert folder not in (".", "..")
    assert len(set(_folders([name, name, str.__str__(name)]))) == 3
    tasks, _ = generate_plan([(name, CLEAN["conv_transpose"])], targets=["sm_90"],
                             dtypes=["float32"])
    assert tasks
    for task in tasks:
        source = triton_source(task.spec, task.family)
        assert not any(m in source for m in MARKERS)
        if len(name) >= 3:
            assert str.__str__(name) not in source
        assert not any(m in task.name for m in MARKERS)
