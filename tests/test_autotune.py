"""The autotuner: density buckets, the tuning database (round trips, merging, other machines,
corrupt files), tuning one layer, and the per-call dispatch that follows the database."""
from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import zeroskip
from zeroskip import LayerSpec
from zeroskip import functional as zf
from zeroskip.runtime import autotune, calls, tuning

from tuning_helpers import named_kernels

SPEC = LayerSpec.conv(8, 16, 3, padding=1, input_size=(10, 10))
OTHER = LayerSpec.conv(8, 16, 3, input_size=(10, 10))
FAST = dict(repeats=1, min_time=0.001)
# Batch 2 of SPEC's input: 1600 elements, which zs_density reads all of (below 4096 it samples
# 16 of every 16), so the density a call measures is exactly the input's.
SHAPE = (2, 8, 10, 10)


@pytest.fixture(autouse=True)
def db_path(tmp_path, monkeypatch):
    """Every test gets its own tuning database, never the user's."""
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("ZEROSKIP_TUNING_DB", str(path))
    tuning.reset()
    yield path
    tuning.reset()


def _record(choice: str, date: str = "2024-01-01") -> dict:
    return {"choice": choice, "ms": {choice: 1.0}, "date": date}


def _foreign_machine() -> tuple[str, dict]:
    machine = {**tuning.fingerprint(), "cpu": "some other cpu"}
    return tuning.fingerprint_id(machine), machine


# --------------------------------------------------------------------------------- buckets, keys
@pytest.mark.parametrize("density, want", [
    (0.0, 0.02), (0.01, 0.02), (0.02, 0.02), (0.021, 0.05), (0.1, 0.1), (0.1000000001, 0.1),
    (0.11, 0.2), (0.45, 0.5), (0.5, 0.5), (0.51, 0.7), (0.71, 1.0), (1.0, 1.0), (1.5, 1.0)])
def test_bucket_edges(density, want):
    assert tuning.bucket(density) == want


def test_every_bucket_is_its_own():
    assert [tuning.bucket(b) for b in tuning.BUCKETS] == list(tuning.BUCKETS)


@pytest.mark.parametrize("batch, key", [(1, "0.5"), (2, "0.5@2"), (12, "0.5@16"),
                                        (22, "0.5@16"), (23, "0.5@32"), (64, "0.5@64")])
def test_batch_buckets(batch, key):
    assert tuning.bucket_key(0.45, batch) == key
    assert tuning.parse_bucket(key) == (0.5, tuning.batch_bucket(batch))


def test_nearest_takes_the_nearest_batch_then_density():
    layer = {"1": _record("dense"), "0.1": _record("sparse"), "1@16": _record("torch"),
             "0.1@16": _record("sparse/v2")}
    choice = {(b, d): tuning.nearest(layer, d, b)["choice"] for b in (1, 3, 16, 32)
              for d in (1.0, 0.1)}
    assert choice == {(1, 1.0): "dense", (1, 0.1): "sparse", (3, 1.0): "dense",
                      (3, 0.1): "sparse", (16, 1.0): "torch", (16, 0.1): "sparse/v2",
                      (32, 1.0): "torch", (32, 0.1): "sparse/v2"}
    assert tuning.nearest({"1@16": _record("torch")}, 1.0, 1)["choice"] == "torch"


def test_spec_key_is_the_layers_shape():
    key = tuning.spec_key(SPEC)
    assert not {"batch", "density"} & set(json.loads(key))   # the workload is not the layer's
    assert tuning.spec_key(OTHER) != key
    assert tuning.spec_key(dataclasses.replace(SPEC, dtype="float64")) != key
    assert LayerSpec.from_dict(json.loads(key)) == SPEC


# --------------------------------------------------------------------------------- database
def test_record_save_and_load(db_path):
    db = tuning.TuningDB(db_path)
    generation = db.generation
    db.record(SPEC, 0.08, "sparse", {"torch": 1.0, "sparse": 0.25, "dense": math.inf})
    db.record(SPEC, 1.0, "dense/w6", {"torch": 1.0, "dense/w6": 0.5})
    assert db.generation != generation
    assert db.save() == db_path
    assert json.loads(db_path.read_text())["format"] == tuning.FORMAT

    loaded = tuning.TuningDB(db_path)
    assert loaded.here == db.here and loaded.machines[loaded.here] == tuning.fingerprint()
    assert loaded.lookup(SPEC, 0.1) == loaded.lookup(SPEC, 0.06) == "sparse"
    assert loaded.lookup(LayerSpec.from_dict(SPEC.to_dict()), 0.1) == "sparse"
    assert loaded.lookup(SPEC, 0.8) == "dense/w6"
    assert loaded.lookup(OTHER, 0.1) is None
    # Untuned densities take the record tuned nearest by ratio (0.3 is 3x from 0.1, 3.3x from 1).
    assert loaded.lookup(SPEC, 0.3) == "sparse" and loaded.lookup(SPEC, 0.35) == "dense/w6"
    record = loaded.records[loaded.here][tuning.spec_key(SPEC)]["0.1"]
    assert record["ms"] == {"torch": 1.0, "sparse": 0.25, "dense": None}   # failed: null
    assert loaded.crossover(SPEC) == 0.1 and loaded.crossover(OTHER) is None


def test_crossover_zero_when_sparse_never_won(tmp_path):
    db = tuning.TuningDB(tmp_path / "db.json")
    db.record(SPEC, 0.1, "dense", {})
    db.record(SPEC, 0.5, "torch", {})
    assert db.crossover(SPEC) == 0.0


def test_database_is_located_by_the_environment(db_path, tmp_path, monkeypatch):
    db = tuning.database()
    assert db.path == db_path and tuning.database() is db
    monkeypatch.setenv("ZEROSKIP_TUNING_DB", str(tmp_path / "elsewhere.json"))
    assert tuning.database().path == tmp_path / "elsewhere.json"


def test_merge_newer_record_wins(tmp_path):
    mine, theirs = tuning.TuningDB(tmp_path / "a.json"), tuning.TuningDB(tmp_path / "b.json")
    key = tuning.spec_key(SPEC)
    mine.record(SPEC, 0.1, "sparse", {})
    mine.record(SPEC, 0.5, "dense", {})
    mine.records[mine.here][key]["0.5"]["date"] = "2000-01-01"
    theirs.record(SPEC, 0.5, "torch", {})     # newer: replaces mine
    theirs.record(OTHER, 1.0, "dense/w6", {})
    generation = mine.generation
    assert mine.merge(theirs) == 2 and mine.generation != generation
    assert (mine.lookup(SPEC, 0.1), mine.lookup(SPEC, 0.5), mine.lookup(OTHER, 1.0)) == \
        ("sparse", "torch", "dense/w6")

    older = tuning.TuningDB(tmp_path / "c.json")
    older.record(SPEC, 0.1, "dense", {})
    older.records[older.here][key]["0.1"]["date"] = "2000-01-01"
    assert mine.merge(older) == 0 and mine.lookup(SPEC, 0.1) == "sparse"


def test_save_merges_what_another_process_saved(db_path):
    first, second = tuning.TuningDB(db_path), tuning.TuningDB(db_path)
    first.record(SPEC, 0.1, "sparse", {})
    first.save()
    second.record(SPEC, 1.0, "dense", {})
    second.save()
    final = tuning.TuningDB(db_path)
    assert (final.lookup(SPEC, 0.1), final.lookup(SPEC, 1.0)) == ("sparse", "dense")


def test_other_machine_is_kept_but_not_used(db_path, tmp_path):
    fp, machine = _foreign_machine()
    db_path.write_text(json.dumps({
        "format": tuning.FORMAT, "machines": {fp: machine},
        "records": {fp: {tuning.spec_key(SPEC): {"0.1": _record("torch", "2999-01-01")}}}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        db = tuning.TuningDB(db_path)
    assert fp != db.here and fp in db.records
    assert db.lookup(SPEC, 0.1) is None and db.crossover(SPEC) is None

    db.record(SPEC, 0.1, "sparse", {})
    db.save()
    saved = json.loads(db_path.read_text())
    assert set(saved["machines"]) == set(saved["records"]) == {fp, db.here}
    assert saved["machines"][fp] == machine
    assert tuning.TuningDB(db_path).lookup(SPEC, 0.1) == "sparse"

    merged = tuning.TuningDB(tmp_path / "merged.json")
    assert merged.merge(tuning.TuningDB(db_path)) == 2
    assert set(merged.records) == {fp, merged.here} and merged.machines[fp] == machine
    assert merged.lookup(SPEC, 0.1) == "sparse"


def _valid_text() -> str:
    fp, machine = _foreign_machine()
    return json.dumps({"format": tuning.FORMAT, "machines": {fp: machine},
                       "records": {fp: {tuning.spec_key(SPEC): {"0.1": _record("sparse")}}}})


def _corrupt(kind: str) -> bytes:
    key = tuning.spec_key(SPEC)
    data = {
        "garbage bytes": lambda: b"\x80\x9c\xff garbage \x00\x01",
        "empty": lambda: b"",
        "truncated": lambda: _valid_text()[:-25].encode(),
        "wrong format": lambda: json.dumps({"format": 99, "machines": {},
                                            "records": {}}).encode(),
        "not an object": lambda: b"[1, 2, 3]",
        "unknown machine": lambda: json.dumps({
            "format": tuning.FORMAT, "machines": {},
            "records": {"0123456789abcdef": {key: {"0.1": _record("dense")}}}}).encode(),
        "record not an object": lambda: json.dumps({
            "format": tuning.FORMAT, "machines": {"f": {}},
            "records": {"f": {key: {"0.1": "dense"}}}}).encode(),
        "bad layer": lambda: json.dumps({
            "format": tuning.FORMAT, "machines": {"f": {}},
            "records": {"f": {'{"op": "conv"}': {"0.1": _record("dense")}}}}).encode(),
    }
    return data[kind]()


@pytest.mark.parametrize("kind", ["garbage bytes", "empty", "truncated", "wrong format",
                                  "not an object", "unknown machine", "record not an object",
                                  "bad layer"])
def test_corrupt_database_is_set_aside(db_path, kind):
    content = _corrupt(kind)
    db_path.write_bytes(content)
    with pytest.warns(tuning.ZeroskipTuningWarning, match="corrupt"):
        db = tuning.database()
    aside = db_path.with_name(db_path.name + ".corrupt")
    assert aside.read_bytes() == content and not db_path.exists()
    assert db.records == {} and db.lookup(SPEC, 0.1) is None

    db.record(SPEC, 0.1, "sparse", {"sparse": 1.0})
    db.save()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert tuning.TuningDB(db_path).lookup(SPEC, 0.1) == "sparse"


def test_strict_read_raises_and_leaves_the_file(tmp_path):
    path = tmp_path / "theirs.json"
    with pytest.raises(FileNotFoundError):
        tuning.TuningDB(path, strict=True)
    path.write_bytes(_corrupt("truncated"))
    with pytest.raises(ValueError, match="not a zeroskip tuning database"):
        tuning.TuningDB(path, strict=True)
    assert path.read_bytes() == _corrupt("truncated")


# --------------------------------------------------------------------------------- tuning
def test_tune_tiny_layer():
    result = autotune.tune(SPEC, 0.1, **FAST)
    names = [c.name for c in autotune.candidates(SPEC, 0.1)]
    assert names[0] == "torch" and {"dense", "sparse"} <= set(names)
    assert list(result.ms) == names
    for name, ms in result.ms.items():
        assert (math.isfinite(ms) and ms > 0) != (name in result.errors), (name, result.errors)
    assert math.isfinite(result.ms["torch"])
    assert result.ms[result.choice] == min(result.ms.values())
    assert result.speedup() == result.ms["torch"] / result.ms[result.choice]
    assert result.density == 0.1 and result.spec == SPEC and result.batch == 1


def test_dense_input_has_no_sparse_candidates():
    names = [c.name for c in autotune.candidates(SPEC, 1.0)]
    assert names[0] == "torch" and "dense" in names
    assert not any(n.startswith("sparse") for n in names)


def test_failing_candidates_score_inf(monkeypatch):
    candidates, call = autotune._candidates, autotune.call
    broken = [autotune.Candidate(n) for n in ("raises", "crashes", "wrong")]
    monkeypatch.setattr(autotune, "_candidates", lambda *args: (
        [*candidates(*args)[0], *broken], {}))

    def failing_call(spec, name, t, backend):
        if name == "raises":
            raise RuntimeError("cannot build")
        if name == "crashes":
            def crash():
                raise MemoryError("out of scratch memory")
            return None, crash
        if name == "wrong":
            _, right = call(spec, "torch", t, backend)
            return None, lambda: right() + 1
        return call(spec, name, t, backend)

    monkeypatch.setattr(autotune, "call", failing_call)
    before = zeroskip.stats()["tune_failures"]
    result = autotune.tune(SPEC, 0.3, **FAST)
    assert set(result.errors) == {"raises", "crashes", "wrong"}
    assert result.errors["raises"] == "RuntimeError: cannot build"
    assert result.errors["crashes"] == "MemoryError: out of scratch memory"
    assert "differs from torch" in result.errors["wrong"]
    assert all(result.ms[n] == math.inf for n in result.errors)
    assert all(math.isfinite(ms) for n, ms in result.ms.items() if n not in result.errors)
    assert result.choice not in result.errors
    assert zeroskip.stats()["tune_failures"] == before + 3


@pytest.mark.parametrize("which", ["grad_input", "grad_weight"])
def test_tune_gradient_ops(which):
    """A gradient operator is tuned like a forward one: torch's op and every variant, each
    checked against torch."""
    result = autotune.tune(getattr(SPEC, which)(), 1.0, batch=3, **FAST)
    assert {"torch", "dense"} <= set(result.ms) and result.batch == 3
    assert not result.errors and all(math.isfinite(ms) for ms in result.ms.values())


def test_gradient_dispatch_follows_the_batch_bucket(db_path):
    """A training step runs each gradient operator's choice tuned for its batch bucket: here
    torch's op for the weight gradient at batch 4, the generated kernel at batch 1."""
    db = tuning.database()
    db.record(SPEC.grad_weight(), 1.0, "dense", {"dense": 1.0}, batch=1,
              kernels=named_kernels(SPEC.grad_weight()))
    db.record(SPEC.grad_weight(), 1.0, "torch", {"torch": 1.0}, batch=4,
              kernels=named_kernels(SPEC.grad_weight()))
    gen = torch.Generator().manual_seed(5)
    weight = torch.nn.Parameter(torch.randn(16, 8, 3, 3, generator=gen))
    for batch, want in ((1, "dense"), (4, "torch")):
        x = torch.randn(batch, 8, 10, 10, generator=gen, requires_grad=True)
        g = torch.randn(batch, 16, 10, 10, generator=gen)
        with zeroskip.runtime.dispatch.observe() as ran:
            zf.conv2d(x, weight, padding=1).backward(g)
        got = (x.grad, weight.grad)
        x.grad = weight.grad = None
        F.conv2d(x, weight, padding=1).backward(g)
        for a, b in zip(got, (x.grad, weight.grad)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        weight.grad = None
        choices = {d.spec.op: d.choice for d in ran}
        assert choices == {"conv": "dense", "conv_grad_input": "dense",
                           "conv_grad_weight": want}, batch


def test_tune_all_records_every_case(db_path):
    results = autotune.tune_all([SPEC, (OTHER, 8)], [1.0, 0.1], progress=False,
                                backward=True, **FAST)
    cases = [(spec, batch, density) for _, _, spec, batch, density in
             autotune.jobs([SPEC, (OTHER, 8)], [1.0, 0.1], backward=True)]
    # Gradients at each density too (of their data operand).
    assert cases == [(SPEC, 1, 1.0), (SPEC, 1, 0.1), (SPEC.grad_input(), 1, 1.0),
                     (SPEC.grad_input(), 1, 0.1), (SPEC.grad_weight(), 1, 1.0),
                     (SPEC.grad_weight(), 1, 0.1), (OTHER, 8, 1.0), (OTHER, 8, 0.1),
                     (OTHER.grad_input(), 8, 1.0), (OTHER.grad_input(), 8, 0.1),
                     (OTHER.grad_weight(), 8, 1.0), (OTHER.grad_weight(), 8, 0.1)]
    assert [(r.spec, r.batch, r.density) for r in results] == cases
    saved = tuning.TuningDB(db_path)
    for r in results:
        assert saved.lookup(r.spec, r.density, batch=r.batch) == r.choice
        record = saved.layer(r.spec)[tuning.bucket_key(r.density, r.batch)]
        assert record["ms"]["torch"] == pytest.approx(r.ms["torch"], abs=1e-5)


# --------------------------------------------------------------------------------- dispatch
@pytest.fixture
def call(monkeypatch):
    """The Call of SPEC with fresh per-call state, and its weights: ``(call, weight, bias)``."""
    monkeypatch.setattr(calls, "_calls", {})
    monkeypatch.delenv("ZEROSKIP_SPARSE", raising=False)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 8, 3, 3, generator=gen)
    bias = torch.randn(16, generator=gen)
    zf.conv2d(torch.randn(SHAPE), weight, bias, padding=1)
    (found,) = calls._calls.values()
    assert found.spec == SPEC
    return found, weight, bias


def _run(call, weight, bias, density: float) -> None:
    """Run SPEC on an input of ``density`` through zeroskip and check it against torch."""
    x = autotune.sparse_input(SHAPE, density, seed=3)
    torch.testing.assert_close(zf.conv2d(x, weight, bias, padding=1),
                               F.conv2d(x, weight, bias, padding=1), rtol=1e-4, atol=1e-4)


def test_untuned_dispatch_follows_the_cost_model(call, monkeypatch):
    found, weight, bias = call
    assert found.forward.crossover > 0
    monkeypatch.setattr(found.forward, "crossover", 0.5)    # a synthetic crossover
    zeroskip.stats(reset=True)
    for density, want in ((0.1, "sparse"), (0.45, "sparse"), (0.55, "dense"), (0.9, "dense")):
        _run(call, weight, bias, density)
        assert found.last == want, density
        assert found.last_density == pytest.approx(density)
    counts = zeroskip.stats(reset=True)
    assert counts["sparse_calls"] == 2 and counts["kernel_calls"] == 4
    assert counts["torch_choices"] == counts["fallback_calls"] == 0


def test_no_crossover_means_always_dense(call, monkeypatch):
    found, weight, bias = call
    monkeypatch.setattr(found.forward, "crossover", 0.0)
    _run(call, weight, bias, 0.05)
    assert found.last == "dense"


def test_tuned_choice_wins_over_the_cost_model(call, monkeypatch):
    found, weight, bias = call
    monkeypatch.setattr(found.forward, "crossover", 0.5)
    db = tuning.database()
    for density, choice in ((0.3, "torch"), (0.7, "sparse"), (0.1, "dense/w6"), (1.0, "dense")):
        db.record(SPEC, density, choice, {choice: 1.0}, kernels=named_kernels(SPEC, choice))
    before = zeroskip.stats()["torch_choices"]
    _run(call, weight, bias, 0.25)
    assert found.last == "torch" and zeroskip.stats()["torch_choices"] == before + 1
    assert found.last_density == pytest.approx(0.25)
    _run(call, weight, bias, 0.6)
    assert found.last == "sparse"
    _run(call, weight, bias, 0.08)
    assert found.last == "dense/w6"
    _run(call, weight, bias, 0.45)           # untuned: the nearest tuned density by ratio, 0.3
    assert found.last == "torch"
    _run(call, weight, bias, 1.0)
    assert found.last == "dense"
    assert zeroskip.stats()["torch_choices"] == before + 2


def test_one_tuned_choice_needs_no_density(call, monkeypatch):
    """A layer tuned alike at every density runs that choice without sampling its input."""
    found, weight, bias = call
    monkeypatch.setattr(found.forward, "crossover", 0.5)
    tuning.database().record(SPEC, 0.1, "dense", {}, kernels=named_kernels(SPEC))
    tuning.database().record(SPEC, 1.0, "dense", {}, kernels=named_kernels(SPEC))
    _run(call, weight, bias, 0.05)
    assert found.last == "dense" and found.last_density == 1.0


def test_dispatch_follows_records_added_later(call, monkeypatch):
    """A Call notices records added after its first run (the database's generation)."""
    found, weight, bias = call
    monkeypatch.setattr(found.forward, "crossover", 0.5)
    _run(call, weight, bias, 0.25)
    assert found.last == "sparse"
    tuning.database().record(SPEC, 0.3, "torch", {}, kernels=named_kernels(SPEC))
    _run(call, weight, bias, 0.25)
    assert found.last == "torch"


def test_sparse_off_forces_dense(call, monkeypatch):
    found, weight, bias = call
    monkeypatch.setattr(found.forward, "crossover", 0.5)
    tuning.database().record(SPEC, 0.3, "torch", {})
    monkeypatch.setenv("ZEROSKIP_SPARSE", "0")
    for density in (0.05, 0.25):
        _run(call, weight, bias, density)
        assert found.last == "dense" and found.last_density == 1.0


def test_gradient_candidates_include_sparse_kernels_below_density_1():
    """Below density 1 the tuner tries the sparse kernels of both gradient operators (the
    weight gradient's where its sparse kernel serves the layer: not depthwise)."""
    conv = LayerSpec.conv(16, 32, 3, padding=1, input_size=(10, 10))
    def names(spec, density):
        return [c.name for c in autotune.candidates(spec, density)]
    for grad in (conv.grad_input(), conv.grad_weight()):
        assert "sparse" in names(grad, 0.3)
        assert "sparse" not in names(grad, 1.0)
    assert "sparse/rhs" in names(conv.grad_weight(), 0.3)
    depthwise = LayerSpec.conv(16, 16, 3, padding=1, groups=16, input_size=(10, 10))
    assert "sparse" not in names(depthwise.grad_weight(), 0.3)


def test_weight_gradient_walks_the_sparser_operand(monkeypatch):
    """Untuned, a weight gradient whose output gradient is sparse (a ReLU after the layer
    masked it) and sparser than its input walks the output gradient (on long enough rows);
    with a dense output gradient it decides on the input's density as before."""
    from zeroskip.runtime import dispatch
    monkeypatch.delenv("ZEROSKIP_SPARSE", raising=False)
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(32, 16, 3, 3))
    # An input at density ~0.84: above the weight gradient's crossover, so with a dense output
    # gradient it runs dense.
    x = torch.relu(torch.randn(2, 16, 8, 32) + 1.0).requires_grad_()
    for mask, want in ((0.1, "sparse/rhs"), (1.0, "dense")):
        g = torch.randn(2, 32, 8, 32) * (torch.rand(2, 32, 8, 32) < mask)
        with dispatch.observe() as ran:
            y = zf.conv2d(x, w, padding=1)
            y.backward(g)
        chose = {d.spec.op: d.choice for d in ran}
        assert chose["conv_grad_weight"] == want, chose
        want_grad = torch.ops.aten.convolution_backward(
            g, x.detach(), w.detach(), None, [1, 1], [1, 1], [1, 1], False, [0, 0], 1,
            [False, True, False])[1]
        torch.testing.assert_close(w.grad, want_grad, rtol=1e-4, atol=1e-4)
        w.grad = x.grad = None


def test_rhs_variant_names():
    """``sparse/rhs`` (and with tile knobs) round-trips; ``rhs`` is a knob of the sparse
    strategy only, given once."""
    from zeroskip.codegen.variant import Variant
    for name in ("sparse/rhs", "sparse/v2/rhs", "sparse/w4/rhs"):
        assert Variant.parse(name).name == name and Variant.parse(name).rhs is True
    for bad in ("dense/rhs", "sparse/rhs/rhs", "auto/rhs", "sparse/rhs2"):
        with pytest.raises(ValueError):
            Variant.parse(bad)


@pytest.mark.parametrize("shape, density", [((16, 64, 32, 32), 0.3), ((32, 256, 8, 8), 0.05),
                                            ((3, 5), 0.5), ((1_000_003,), 0.7)])
def test_sampled_density_is_close_to_the_exact_share(shape, density):
    """dispatch.sampled_density: runs of contiguous elements of a contiguous tensor, single
    elements of another, every element of a small one; within sampling error of the exact
    share of non-zeros."""
    from zeroskip.runtime.dispatch import sampled_density
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(*shape, generator=gen) * (torch.rand(*shape, generator=gen) < density)
    exact = float(torch.count_nonzero(t)) / t.numel()
    for view in (t, t.transpose(0, -1)):
        found = sampled_density(view)
        assert abs(found - exact) <= (0 if t.numel() <= 16384 else 0.01), (view.shape, found)
