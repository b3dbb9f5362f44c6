"""Autotuning in the loop (``zeroskip.autotune``), and tuning records that stay true: a record
whose kernels the compiler no longer makes is ignored, reported once, tuned again and pruned."""
from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import zeroskip
from zeroskip import LayerSpec
from zeroskip import functional as zf
from zeroskip.cli import main
from zeroskip.codegen import emit
from zeroskip.runtime import autotune, calls, dispatch, gradients, loader, online, tuning

from tuning_helpers import named_kernels

SPEC = LayerSpec.conv(6, 8, 3, padding=1, input_size=(9, 9))


@pytest.fixture
def db_path(tmp_path, monkeypatch):
    """An empty tuning database of this test's own, autotuning off unless a test turns it on,
    and fresh per-call state."""
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("ZEROSKIP_TUNING_DB", str(path))
    monkeypatch.delenv("ZEROSKIP_AUTOTUNE", raising=False)
    monkeypatch.delenv("ZEROSKIP_AUTOTUNE_BUDGET", raising=False)
    monkeypatch.setattr(calls, "_calls", {})
    monkeypatch.setattr(online, "_mode", [None])
    monkeypatch.setattr(online, "_over_budget", [False])
    monkeypatch.setattr(autotune, "_stale_seen", set())
    gradients.forget()
    tuning.reset()
    yield path
    tuning.reset()
    gradients.forget()


def _operands(batch=4, density=0.25, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 6, 9, 9, generator=gen)
    if density < 1:         # ReLU-like: positive where kept
        x = (x.abs() + 0.1) * (torch.rand(x.shape, generator=gen) < density)
    weight = torch.randn(8, 6, 3, 3, generator=gen)
    bias = torch.randn(8, generator=gen)
    return x, weight, bias


def _step(x, weight, bias):
    """One forward and backward on zeroskip and on torch: both results and gradients."""
    got = []
    for conv in (zf.conv2d, F.conv2d):
        xi, wi, bi = (t.detach().clone().requires_grad_() for t in (x, weight, bias))
        out = conv(xi, wi, bi, padding=1)
        out.backward(torch.ones_like(out) * torch.linspace(-1, 1, out.shape[-1]))
        got.append((out.detach(), xi.grad, wi.grad, bi.grad))
    return got


def _close(pair):
    ours, theirs = pair
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_the_switch_and_its_environment(db_path, monkeypatch):
    assert online.current_mode() == "off"
    monkeypatch.setenv("ZEROSKIP_AUTOTUNE", "1")
    assert online.current_mode() == "on"
    monkeypatch.setenv("ZEROSKIP_AUTOTUNE", "all")
    assert online.current_mode() == "all"
    assert zeroskip.autotune(False) == "all"        # the call overrides the environment
    assert online.current_mode() == "off"
    assert zeroskip.autotune(True) == "off" and online.current_mode() == "on"
    with pytest.raises(ValueError, match="autotune mode"):
        zeroskip.autotune("fastest")
    zeroskip.autotune(None)                        # the environment decides again
    with online.autotuning("all"):
        assert online.current_mode() == "all"
    assert online._mode == [None] and online.current_mode() == "all"     # the environment's
    monkeypatch.setenv("ZEROSKIP_AUTOTUNE", "yes please")
    with pytest.raises(ValueError, match="ZEROSKIP_AUTOTUNE"):
        online.current_mode()


def test_first_call_tunes_forward_and_gradients_then_follows_the_record(db_path):
    """From an empty database: the first training step tunes the forward and both gradients
    on their own operands (every result torch's), files a record for each naming the kernels
    it timed, and the next steps run the recorded choices without tuning again."""
    zeroskip.autotune(True)
    x, weight, bias = _operands()
    before = zeroskip.stats()
    with dispatch.observe() as ran:
        _close(_step(x, weight, bias))
    after = zeroskip.stats()
    assert after["tuned_cases"] - before["tuned_cases"] == 3
    assert after["tuning_seconds"] > before["tuning_seconds"]
    assert [d.choice for d in ran] == ["torch"] * 3      # tuning returns torch's result
    data = json.loads(db_path.read_text())
    assert data["format"] == tuning.FORMAT
    layers = data["records"][tuning.database().here]
    specs = {json.loads(k)["op"]: v for k, v in layers.items()}
    assert set(specs) == {"conv", "conv_grad_input", "conv_grad_weight"}
    for op, buckets in specs.items():
        (bucket, record), = buckets.items()
        assert bucket.endswith("@4")
        assert {"torch", "dense"} <= set(record["ms"])
        assert all(v is None or v > 0 for v in record["ms"].values())
        assert record["kernels"]["dense"] and "torch" not in record["kernels"]
        assert record["choice"] in record["ms"]
    for seed in (1, 2):          # the same buckets: no more tuning, the records' choices run
        with dispatch.observe() as ran:
            _close(_step(*_operands(seed=seed)))
        assert zeroskip.stats()["tuned_cases"] == after["tuned_cases"]
        recorded = {op: next(iter(b.values()))["choice"] for op, b in specs.items()}
        assert sorted(d.choice for d in ran) == sorted(recorded.values())


def test_a_candidate_that_differs_never_wins(db_path, monkeypatch):
    """A generated candidate whose result differs from torch's scores inf however fast it is;
    the call still returns the right result."""
    zeroskip.autotune(True)
    real = dispatch.Operator.launch

    def wrong(self, kernel, x, weight, bias, variant=None):
        out = real(self, kernel, x, weight, bias, variant)
        return out + 1 if self.spec.op == "conv" and variant is not None and \
            variant.name == "dense" else out
    monkeypatch.setattr(dispatch.Operator, "launch", wrong)
    x, weight, bias = _operands()
    failures = zeroskip.stats()["tune_failures"]
    out = zf.conv2d(x, weight, bias, padding=1)
    torch.testing.assert_close(out, F.conv2d(x, weight, bias, padding=1))
    assert zeroskip.stats()["tune_failures"] == failures + 1
    record = next(iter(tuning.records(SPEC).values()))
    assert record["ms"]["dense"] is None and record["choice"] != "dense"
    assert "dense" not in record["kernels"]


def test_tuning_stops_at_its_budget(db_path, monkeypatch):
    monkeypatch.setenv("ZEROSKIP_AUTOTUNE_BUDGET", "0")
    zeroskip.autotune(True)
    x, weight, bias = _operands()
    with pytest.warns(RuntimeWarning, match="ZEROSKIP_AUTOTUNE_BUDGET"):
        out = zf.conv2d(x, weight, bias, padding=1)
    torch.testing.assert_close(out, F.conv2d(x, weight, bias, padding=1))
    assert not tuning.records(SPEC)
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # said once
        zf.conv2d(x, weight, bias, padding=1)


def test_a_rank_that_does_not_tune_reads_what_the_tuner_saved(db_path, monkeypatch):
    """Under torch.distributed only rank 0 tunes; another rank follows the cost model until
    the database file changes, then reads its records."""
    zeroskip.autotune(True)
    monkeypatch.setattr(online, "tuner", lambda: False)
    monkeypatch.setattr(tuning, "REFRESH_S", 0.0)
    x, weight, bias = _operands(batch=1, density=1.0)
    with dispatch.observe() as ran:
        zf.conv2d(x, weight, bias, padding=1)
    assert [d.choice for d in ran] == ["dense"] and not tuning.records(SPEC)
    rank0 = tuning.TuningDB(db_path)
    rank0.record(SPEC, 1.0, "torch", {"torch": 1.0, "dense": 2.0},
                 kernels=named_kernels(SPEC))
    rank0.save()
    with dispatch.observe() as ran:
        zf.conv2d(x, weight, bias, padding=1)
    assert [d.choice for d in ran] == ["torch"]


def _changed_template(monkeypatch):
    """The C template's output changes (as an upgrade's would): every kernel is another."""
    real = emit.render
    monkeypatch.setattr(emit, "render", lambda plan: real(plan) + "\n/* upgraded */\n")
    monkeypatch.setattr(loader, "_kernels", {})
    monkeypatch.setattr(loader, "_identities", {})
    monkeypatch.setattr(calls, "_calls", {})


def test_an_upgraded_kernel_never_runs_under_a_stale_record(db_path, monkeypatch):
    """A record filed for today's kernels is followed; once the template's output changes,
    the record names kernels that no longer exist: it is ignored (the cost model decides),
    reported once, counted, and ``zeroskip tune --prune`` drops it."""
    x, weight, bias = _operands(batch=1, density=1.0)
    db = tuning.database()
    db.record(SPEC, 1.0, "torch", {"torch": 1.0, "dense": 2.0}, kernels=named_kernels(SPEC))
    db.save()
    with dispatch.observe() as ran:
        zf.conv2d(x, weight, bias, padding=1)
    assert [d.choice for d in ran] == ["torch"]

    _changed_template(monkeypatch)
    stale = zeroskip.stats()["stale_records"]
    with pytest.warns(tuning.ZeroskipTuningWarning, match="no longer makes.*--prune"):
        with dispatch.observe() as ran:
            out = zf.conv2d(x, weight, bias, padding=1)
    assert [d.choice for d in ran] == ["dense"]
    assert "upgraded" in ran[0].operator.forward.source.read_text()
    torch.testing.assert_close(out, F.conv2d(x, weight, bias, padding=1))
    assert zeroskip.stats()["stale_records"] == stale + 1
    calls._calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")              # reported once
        zf.conv2d(x, weight, bias, padding=1)
    assert zeroskip.stats()["stale_records"] == stale + 1

    other = LayerSpec.conv(6, 4, 1, input_size=(9, 9))
    db = tuning.TuningDB(db_path)
    db.record(other, 1.0, "dense", {"dense": 1.0}, kernels=named_kernels(other))   # current
    db.save()
    assert main(["tune", "--prune", "--db", str(db_path)]) == 0
    kept = tuning.TuningDB(db_path).records[tuning.database().here]
    assert list(kept) == [tuning.spec_key(other)]


def test_a_stale_record_is_tuned_again_in_the_loop(db_path, monkeypatch):
    x, weight, bias = _operands(batch=1, density=1.0)
    db = tuning.database()
    db.record(SPEC, 1.0, "torch", {"torch": 1.0, "dense": 2.0}, kernels=named_kernels(SPEC))
    db.save()
    _changed_template(monkeypatch)
    zeroskip.autotune(True)
    with pytest.warns(tuning.ZeroskipTuningWarning, match="ignored and tuned again"):
        zf.conv2d(x, weight, bias, padding=1)
    assert zeroskip.stats()["tuned_cases"] >= 1
    record = tuning.TuningDB(db_path).layer(SPEC)["1"]
    assert record["kernels"]["dense"] == loader.identity(SPEC, "c", loader.DEFAULT)


def test_a_format_1_database_is_read_and_never_trusted(db_path):
    here = tuning.database().here
    db_path.write_text(json.dumps({
        "format": 1, "machines": {here: tuning.fingerprint()},
        "records": {here: {tuning.spec_key(SPEC): {"1": {"choice": "torch", "ms": {},
                                                         "date": "2026-01-01"}}}}}))
    tuning.reset()
    x, weight, bias = _operands(batch=1, density=1.0)
    stale = zeroskip.stats()["stale_records"]
    with pytest.warns(tuning.ZeroskipTuningWarning, match="no longer makes"):
        with dispatch.observe() as ran:
            zf.conv2d(x, weight, bias, padding=1)
    assert [d.choice for d in ran] == ["dense"]
    assert zeroskip.stats()["stale_records"] == stale + 1


def test_triton_kernels_are_tuned_in_the_loop_too(db_path, monkeypatch):
    """The Triton backend (under Triton's interpreter here) tunes the same way; its records are
    filed under its own machine."""
    monkeypatch.setenv("ZEROSKIP_BACKEND", "triton")
    zeroskip.autotune(True)
    spec = LayerSpec.conv(2, 4, 3, padding=1, input_size=(4, 4), bias=False)
    gen = torch.Generator().manual_seed(3)
    x, weight = torch.randn(1, 2, 4, 4, generator=gen), torch.randn(4, 2, 3, 3, generator=gen)
    out = zf.conv2d(x, weight, None, padding=1)
    torch.testing.assert_close(out, F.conv2d(x, weight, None, padding=1))
    records = tuning.records(spec, "triton", "cpu")
    (record,) = records.values()
    default = loader.default_choice(spec, "triton")
    assert {"torch", default} <= set(record["ms"])
    assert record["kernels"][default] == loader.identity(spec, "triton", loader.DEFAULT)
    assert tuning.records(spec) is None          # not under the CPU's fingerprint
    with dispatch.observe() as ran:
        zf.conv2d(x, weight, None, padding=1)
    assert [d.choice for d in ran] == [record["choice"]]


def test_a_bundle_served_layer_is_not_tuned_from_its_first_call(db_path, fresh_cache, tmp_path):
    """A bundle's records are final: with autotuning on, a layer it covers is not tuned, on
    its first call either (the covering bundle is found before the decision)."""
    from zeroskip import Workload, generate
    from zeroskip.runtime import bundle
    spec = LayerSpec.conv(6, 8, 3, padding=1, input_size=(9, 9))
    generate.make_bundle([("layer", spec, Workload(1, 1.0))], tmp_path / "b",
                         include_grads=False, progress=False)
    bundle.unload_bundles()
    zeroskip.load_bundle(tmp_path / "b")
    try:
        zeroskip.autotune(True)
        tuned = zeroskip.stats()["tuned_cases"]
        x, weight, bias = _operands(batch=1, density=1.0)
        out = zf.conv2d(x, weight, bias, padding=1)
        torch.testing.assert_close(out, F.conv2d(x, weight, bias, padding=1))
        assert zeroskip.stats()["tuned_cases"] == tuned and not db_path.exists()
    finally:
        bundle.unload_bundles()
