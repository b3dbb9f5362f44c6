"""No call runs on old weights: every route of writing to a weight's (or bias's) memory between
two calls, on every operator, leaves the next call equal to torch's on the values now there.

The routes: those torch counts in the tensor's version (in-place under ``no_grad``,
``detach().copy_()``, ``load_state_dict``) and those it does not (``.data``, a numpy view, a
DLPack view, ``torch.from_numpy`` sharing, ``set_``, a storage resized and refilled, a freed
tensor's memory reused by a new one). Packs are proven by content (``runtime/packs.py``); a
frozen weight (``zeroskip.freeze``) is reused on its version alone, as promised."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.multiprocessing.reductions import StorageWeakRef

import zeroskip
from zeroskip import functional as ZF
from zeroskip.runtime import calls, loader, stats
from zeroskip.spec import LayerSpec

TOL = 1e-5

# Small specs of every operator kind, so each compiles once per run: (op name, input shape,
# weight shape, keyword arguments). 16 output channels per group or more: fewer run the
# depthwise-style kernel, which reads the weight as it is, with no pack.
SPECS = [
    ("conv1d", (2, 16, 9), (16, 16, 3), dict(stride=2, padding=1)),
    ("conv2d", (2, 8, 6, 6), (32, 4, 3, 3), dict(padding=1, groups=2)),
    ("conv3d", (1, 4, 4, 4, 4), (16, 4, 2, 2, 2), dict(padding=1)),
    ("conv_transpose1d", (2, 16, 5), (16, 16, 3), dict(stride=2)),
    ("conv_transpose2d", (1, 16, 5, 5), (16, 16, 3, 3), dict(stride=2, padding=1, groups=2)),
    ("conv_transpose3d", (1, 4, 3, 3, 3), (4, 16, 2, 2, 2), dict(stride=2)),
]


def _new_values(t: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)).to(t.dtype)


# Each route writes new values into ``holder[name]`` (a Parameter) by its own way; some replace
# the tensor object (the call then passes the new one, as a module would).
def _in_place_no_grad(holder, name, seed):
    with torch.no_grad():
        holder[name].mul_(-0.5).add_(0.25)


def _detach_copy(holder, name, seed):
    holder[name].detach().copy_(_new_values(holder[name], seed))


def _load_state_dict(holder, name, seed):
    module = torch.nn.Module()
    module.register_parameter("p", holder[name])
    module.load_state_dict({"p": _new_values(holder[name], seed)})


def _data_assign(holder, name, seed):
    holder[name].data = _new_values(holder[name], seed)


def _data_clamp(holder, name, seed):         # WGAN's weight clipping
    holder[name].data.clamp_(-0.01, 0.01)


def _data_mul(holder, name, seed):           # an EMA or decay written the old way
    holder[name].data.mul_(0.5)


def _data_prune(holder, name, seed):         # one filter pruned by hand
    holder[name].data[0].zero_()


def _numpy_view(holder, name, seed):
    holder[name].detach().numpy()[...] = _new_values(holder[name], seed).numpy()


def _dlpack_view(holder, name, seed):
    torch.from_dlpack(holder[name].detach()).add_(1.0)


def _set_(holder, name, seed):
    with torch.no_grad():
        holder[name].set_(_new_values(holder[name], seed))


def _storage_resized(holder, name, seed):
    if not holder[name].untyped_storage().resizable():     # over a numpy array: own it first
        with torch.no_grad():
            holder[name].set_(holder[name].detach().clone())
    storage = holder[name].untyped_storage()
    nbytes = storage.nbytes()
    storage.resize_(0)
    storage.resize_(nbytes)
    holder[name].data.copy_(_new_values(holder[name], seed))


def _from_numpy_shared(holder, name, seed):
    """The parameter is a view of a numpy array, written through the array."""
    holder[f"{name}_array"][...] = _new_values(holder[name], seed).numpy()


def _memory_reused(holder, name, seed):
    """The tensor is freed and a new one made over the same memory (same pointer, strides
    and version 0)."""
    array = holder[f"{name}_array"]
    requires_grad = holder[name].requires_grad
    del holder[name]
    array[...] = np.random.default_rng(seed).standard_normal(array.shape)
    holder[name] = torch.nn.Parameter(torch.from_numpy(array), requires_grad=requires_grad)


ROUTES = {f.__name__.lstrip("_"): f for f in (
    _in_place_no_grad, _detach_copy, _load_state_dict, _data_assign, _data_clamp, _data_mul,
    _data_prune, _numpy_view, _dlpack_view, _set_, _storage_resized, _from_numpy_shared,
    _memory_reused)}
UNCOUNTED = ["data_clamp", "data_mul", "data_prune", "numpy_view", "dlpack_view",
             "from_numpy_shared", "memory_reused", "storage_resized"]


def _holder(spec, seed: int, requires_grad: bool) -> dict:
    """Input, weight and bias of ``spec``; the weight and bias are Parameters over numpy
    arrays (so that the numpy routes have an array to write)."""
    _, x_shape, w_shape, _ = spec
    gen = torch.Generator().manual_seed(seed)
    holder = {"x": torch.randn(x_shape, generator=gen)}
    out_channels = w_shape[0] if spec[0].startswith("conv") and "transpose" not in spec[0] \
        else w_shape[1] * spec[3].get("groups", 1)
    for name, shape in (("weight", w_shape), ("bias", (out_channels,))):
        array = torch.randn(shape, generator=gen).numpy()
        holder[f"{name}_array"] = array
        holder[name] = torch.nn.Parameter(torch.from_numpy(array), requires_grad=requires_grad)
    return holder


def _close(what: str, got: torch.Tensor, want: torch.Tensor) -> None:
    error = float((got.detach() - want.detach()).abs().max())
    scale = float(want.detach().abs().max()) + 1e-12
    assert error <= TOL * scale + 1e-7, f"{what}: error {error:.3g} of {scale:.3g}"


def _call_and_check(spec, holder, backward: bool, what: str) -> None:
    """One call of zeroskip on the holder's current tensors, compared with torch's (with
    ``backward``, the input, weight and bias gradients too); the kernels must have run."""
    name, _, _, kwargs = spec
    before = stats.stats()
    x = holder["x"].clone().requires_grad_(backward)
    w, b = holder["weight"], holder["bias"]
    with torch.set_grad_enabled(backward):
        got = getattr(ZF, name)(x, w, b, **kwargs)
        wanted_w = w.detach().clone().requires_grad_(backward)
        wanted_b = b.detach().clone().requires_grad_(backward)
        wanted_x = holder["x"].clone().requires_grad_(backward)
        want = getattr(F, name)(wanted_x, wanted_w, wanted_b, **kwargs)
    _close(what, got, want)
    if backward:
        grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(7))
        got_grads = torch.autograd.grad(got, (x, w, b), grad)
        want_grads = torch.autograd.grad(want, (wanted_x, wanted_w, wanted_b), grad)
        for label, g, e in zip(("grad input", "grad weight", "grad bias"), got_grads,
                               want_grads):
            _close(f"{what}, {label}", g, e)
    after = stats.stats()
    assert after["kernel_calls"] > before["kernel_calls"], f"{what}: no generated kernel ran"
    assert after["fallback_calls"] == before["fallback_calls"], f"{what}: fell back to torch"


@pytest.fixture
def strict(monkeypatch):
    monkeypatch.setenv("ZEROSKIP_STRICT", "1")


STEP = st.one_of(st.just("call"), st.sampled_from(sorted(ROUTES)))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=st.sampled_from(SPECS), target=st.sampled_from(["weight", "bias"]),
       backward=st.booleans(), steps=st.lists(STEP, min_size=1, max_size=6),
       seed=st.integers(0, 1000))
def test_no_route_of_writing_leaves_a_stale_result(strict, spec, target, backward, steps, seed):
    """Calls, then writes by any route, in any order: every call equals torch's on the values
    the tensors hold then."""
    holder = _holder(spec, seed, requires_grad=backward)
    _call_and_check(spec, holder, backward, f"{spec[0]} first call")
    _call_and_check(spec, holder, backward, f"{spec[0]} second call")   # takes the copy
    for i, step in enumerate([*steps, "call"]):
        if step == "call":
            _call_and_check(spec, holder, backward, f"{spec[0]} after {steps[:i]} on {target}")
        else:
            ROUTES[step](holder, target, seed + i)


@pytest.mark.parametrize("route", sorted(ROUTES))
@pytest.mark.parametrize("spec", [SPECS[1], SPECS[4]], ids=["conv2d", "conv_transpose2d"])
def test_each_route_on_a_module(strict, route, spec):
    """The issue's setting: a layer called three times, its weight written, called again."""
    _calls_then_a_write(spec, route, calls=3)


def _calls_then_a_write(spec, route: str, calls: int) -> None:
    """``calls`` calls, the weight written by ``route``, then a call and a training call."""
    holder = _holder(spec, 3, requires_grad=True)
    for call in range(calls):
        _call_and_check(spec, holder, False, f"call {call}")
    ROUTES[route](holder, "weight", 5)
    _call_and_check(spec, holder, False, f"after {route}")
    _call_and_check(spec, holder, True, f"after {route}, with gradients")


def _counting_packs(monkeypatch, bias: bool = False) -> list:
    """The forward kernel of ``SPECS[1]`` (conv2d), counting its packs."""
    spec = LayerSpec.conv(8, 32, 3, padding=1, groups=2, bias=bias, input_size=(6, 6))
    kernel = loader.kernel_for(spec)
    kernel.forget_packed()
    count = []
    pack = kernel._pack
    monkeypatch.setattr(kernel, "_pack", lambda w, b: count.append(1) or pack(w, b))
    return count


def test_an_unchanged_weight_is_packed_twice_then_compared(monkeypatch):
    """The first call packs; the second (same version) packs again and keeps a copy of the
    bytes; later calls compare with the copy and reuse the pack."""
    spec = SPECS[1]
    count = _counting_packs(monkeypatch)
    x, w = torch.randn(spec[1]), torch.nn.Parameter(torch.randn(spec[2]), requires_grad=False)
    with torch.no_grad():
        for _ in range(5):
            ZF.conv2d(x, w, **spec[3])
        assert len(count) == 2
        w.data[0, 0, 0, 0] += 1.0          # one element changed behind torch's back
        _close("after one element changed", ZF.conv2d(x, w, **spec[3]),
               F.conv2d(x, w, **spec[3]))
        assert len(count) == 3


def test_a_sign_of_zero_or_a_nan_payload_is_a_change(monkeypatch):
    """The comparison is bitwise: 0.0 -> -0.0 is a change (a float compare would miss it)."""
    spec = SPECS[1]
    count = _counting_packs(monkeypatch)
    x, w = torch.randn(spec[1]), torch.nn.Parameter(torch.randn(spec[2]), requires_grad=False)
    w.data[0].zero_()
    with torch.no_grad():
        for _ in range(3):
            ZF.conv2d(x, w, **spec[3])
        w.data[0].neg_()
        ZF.conv2d(x, w, **spec[3])
    assert len(count) == 3


def test_training_steps_take_no_copy(monkeypatch):
    """An optimizer step bumps the version before the next call: each call packs once and no
    copy is ever taken (a training loop pays nothing for the check)."""
    spec = SPECS[1]
    count = _counting_packs(monkeypatch)
    x = torch.randn(spec[1])
    w = torch.nn.Parameter(torch.randn(spec[2]))
    opt = torch.optim.SGD([w], lr=0.1)
    for _ in range(4):
        opt.zero_grad()
        ZF.conv2d(x, w, **spec[3]).square().sum().backward()
        opt.step()
    storage = StorageWeakRef(w.untyped_storage())     # not an earlier tensor's at its address
    entries = [e for k in loader.loaded() for e in list(k._packs._packs.values())
               if e.refs[0] == storage and not e.refs[0].expired()]
    assert len(count) == 4 and entries      # the forward's and the input gradient's
    assert all(e.copies is None for e in entries)


def test_frozen_weights_are_packed_once_and_see_counted_writes(monkeypatch):
    """zeroskip.freeze: packs reused with no copy and no comparison; writes torch counts
    (in-place under no_grad, load_state_dict) still repack; unfreeze proves by content
    again."""
    spec = SPECS[1]
    count = _counting_packs(monkeypatch)
    x = torch.randn(spec[1])
    conv = torch.nn.Conv2d(8, 32, 3, padding=1, groups=2, bias=False)
    zeroskip.freeze(conv)
    assert zeroskip.freezing.is_frozen(conv.weight)
    with torch.no_grad():
        for _ in range(4):
            ZF.conv2d(x, conv.weight, **spec[3])
        assert len(count) == 1
        conv.weight.mul_(2)                       # counted: repacked
        _close("frozen, counted write", ZF.conv2d(x, conv.weight, **spec[3]),
               F.conv2d(x, conv.weight, **spec[3]))
        assert len(count) == 2
        zeroskip.unfreeze(conv)
        conv.weight.data.mul_(-1)                 # not counted: seen once unfrozen
        _close("unfrozen, .data write", ZF.conv2d(x, conv.weight, **spec[3]),
               F.conv2d(x, conv.weight, **spec[3]))


def test_a_pack_made_before_freezing_is_proven_first(monkeypatch):
    """freeze() promises about writes after it: a pack made before, whose weight was then
    written through .data, is not trusted."""
    spec = SPECS[1]
    x = torch.randn(spec[1])
    w = torch.nn.Parameter(torch.randn(spec[2]), requires_grad=False)
    with torch.no_grad():
        ZF.conv2d(x, w, **spec[3])
        w.data.mul_(3)
        zeroskip.freeze(w)
        try:
            _close("frozen after a .data write", ZF.conv2d(x, w, **spec[3]),
                   F.conv2d(x, w, **spec[3]))
        finally:
            zeroskip.unfreeze(w)


def test_freeze_rejects_what_is_not_a_module_or_tensor():
    with pytest.raises(TypeError, match="nn.Module or a Tensor"):
        zeroskip.freeze([1, 2])


def test_non_dense_weights_are_packed_every_call(monkeypatch):
    """A weight that is not one dense block (a strided view) has no copy to compare with: it
    is packed on each call, and every call is right."""
    spec = SPECS[1]
    count = _counting_packs(monkeypatch)
    x = torch.randn(spec[1])
    big = torch.randn(spec[2][0] * 2, *spec[2][1:])
    w = big[::2]
    with torch.no_grad():
        for i in range(3):
            big.data[0, 0, 0, 0] = float(i)
            _close(f"strided view, call {i}", ZF.conv2d(x, w, **spec[3]),
                   F.conv2d(x, w, **spec[3]))
    assert len(count) == 3


def test_channels_last_weights_are_proven_by_content(monkeypatch):
    spec = SPECS[1]
    count = _counting_packs(monkeypatch)
    x = torch.randn(spec[1])
    w = torch.randn(spec[2]).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for _ in range(4):
            ZF.conv2d(x, w, **spec[3])
        assert len(count) == 2
        torch.from_dlpack(w).mul_(-1)
        _close("channels_last after a DLPack write", ZF.conv2d(x, w, **spec[3]),
               F.conv2d(x, w, **spec[3]))


def test_inference_tensors_are_proven_by_content():
    """Inference tensors have no version: the contents alone decide."""
    spec = SPECS[1]
    with torch.inference_mode():
        x, w = torch.randn(spec[1]), torch.randn(spec[2])
        for _ in range(3):
            ZF.conv2d(x, w, **spec[3])
        torch.from_dlpack(w).mul_(-1)
        _close("inference tensor", ZF.conv2d(x, w, **spec[3]), F.conv2d(x, w, **spec[3]))


# ----------------------------------------------------------------------- Triton, interpreted
@pytest.fixture
def interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("ZEROSKIP_BACKEND", "triton")
    monkeypatch.setenv("ZEROSKIP_STRICT", "1")
    monkeypatch.setattr(calls, "_calls", {})
    yield


TRITON_SPECS = [("conv2d", (1, 4, 4, 4), (6, 2, 3, 3), dict(padding=1, groups=2)),
                ("conv_transpose2d", (1, 4, 3, 3), (4, 3, 2, 2), dict(stride=2, groups=2))]


@pytest.mark.parametrize("route", ["data_mul", "memory_reused"])   # the interpreter is slow
@pytest.mark.parametrize("spec", TRITON_SPECS, ids=["conv2d", "conv_transpose2d"])
def test_triton_sees_every_route(interpreter, route, spec):
    """Triton kernels pack a weight on each call unless it is frozen."""
    _calls_then_a_write(spec, route, calls=2)


def test_triton_frozen_weights_keep_their_pack(interpreter):
    spec = TRITON_SPECS[0]
    holder = _holder(spec, 4, requires_grad=False)
    zeroskip.freeze(holder["weight"])
    zeroskip.freeze(holder["bias"])
    try:
        for call in range(3):
            _call_and_check(spec, holder, False, f"call {call}")
        kernels = [k for k in loader.loaded() if k.backend == "triton" and len(k._packs)]
        assert kernels, "a frozen weight's pack is kept"
        ROUTES["in_place_no_grad"](holder, "weight", 1)
        _call_and_check(spec, holder, False, "after a counted write")
    finally:
        zeroskip.unfreeze(holder["weight"])
        zeroskip.unfreeze(holder["bias"])


# ------------------------------------------------------------------ every other cache, audited
# What else is kept across calls, and why none of it can answer for changed data: kernels and
# bundles hold code, keyed by the spec and the source; the tuning database and a bundle's
# choices hold decisions, keyed by spec, batch and density bucket; the sparse kernels' compressed
# pattern and the gradients' repacked operands are built inside each call and freed at its end;
# bias and epilogue values are packed with the weights (C) or read per call (Triton). Each test
# below writes through the untracked routes while such a cache is in use.
AUDIT_ROUTES = ["data_mul", "data_prune", "numpy_view", "dlpack_view", "memory_reused",
                "storage_resized"]


def _audit_holder(seed: int, density: float) -> dict:
    """A 16->16 3x3 conv (weight and bias as Parameters over numpy arrays) on a ReLU-like input
    of ``density`` whose own memory is a numpy array too."""
    from zeroskip.runtime.autotune import sparse_input
    spec = ("conv2d", (2, 16, 8, 8), (16, 16, 3, 3), dict(padding=1))
    holder = _holder(spec, seed, requires_grad=False)
    holder["x_array"] = sparse_input((2, 16, 8, 8), density, seed).numpy().copy()
    holder["x"] = torch.from_numpy(holder["x_array"])
    return spec, holder


def _each_untracked_write(spec, holder, what: str) -> None:
    """Three calls, then each untracked route in turn on the weight, the bias and the input,
    each followed by a checked call."""
    for call in range(3):
        _call_and_check(spec, holder, False, f"{what}, call {call}")
    for i, route in enumerate(AUDIT_ROUTES):
        for target in ("weight", "bias"):
            ROUTES[route](holder, target, 100 + i)
            _call_and_check(spec, holder, False, f"{what}, {route} on the {target}")
        holder["x_array"] *= -1.0      # the input written through its numpy array
        _call_and_check(spec, holder, False, f"{what}, the input written by numpy")


def test_bundle_served_layers_see_every_write(strict, tmp_path, fresh_cache, monkeypatch):
    """A tuned bundle's kernels and choices (sparse and dense, at the traced density) serve a
    layer whose weights, bias and input are written behind torch's back between calls."""
    from zeroskip import LayerSpec as Spec, Workload, generate
    from zeroskip.runtime import bundle
    spec, holder = _audit_holder(1, 0.2)
    layer = Spec.conv(16, 16, 3, padding=1, input_size=(8, 8))
    generate.make_bundle([("layer", layer, Workload(2, 0.2))], tmp_path / "served", tune=True,
                         include_grads=False, progress=False)
    bundle.unload_bundles()
    zeroskip.load_bundle(tmp_path / "served")
    try:
        before = stats.stats()
        _each_untracked_write(spec, holder, "bundle-served")
        assert stats.stats()["bundle_hits"] > before["bundle_hits"] or \
            stats.stats()["memo_hits"] > before["memo_hits"]
    finally:
        bundle.unload_bundles()


@pytest.mark.parametrize("density", [1.0, 0.1], ids=["dense", "sparse"])
def test_tuned_choices_see_every_write(strict, tmp_path, fresh_cache, monkeypatch, density):
    """The tuning database's choice for the layer (its own variants, timed here) runs the
    calls; at density 0.1 the sparse kernel builds its compressed pattern of the input in each
    call."""
    from zeroskip.runtime import autotune, dispatch, tuning
    monkeypatch.setenv("ZEROSKIP_TUNING_DB", str(tmp_path / "tuning.json"))
    layer = LayerSpec.conv(16, 16, 3, padding=1, input_size=(8, 8))
    autotune.tune_all([(layer, 2)], densities=(density,), repeats=1, min_time=0.001,
                      progress=False)
    assert tuning.records(layer), "the layer was tuned"
    spec, holder = _audit_holder(2, density)
    with dispatch.observe() as ran:
        _each_untracked_write(spec, holder, f"tuned at density {density}")
    assert ran, "the dispatch ran the calls"


def test_sparse_kernels_see_every_write(strict, monkeypatch):
    """Untuned, a sparse input runs the sparse kernel (its pattern built per call, its weights
    packed like the dense kernel's)."""
    from zeroskip.runtime import dispatch
    spec, holder = _audit_holder(3, 0.05)
    with dispatch.observe() as ran:
        _each_untracked_write(spec, holder, "sparse")
    assert any(r.choice.startswith("sparse") for r in ran), [r.choice for r in ran]
