"""Bad input at scale: hypothesis fuzzers over raw values.

(a) LayerSpec's constructors, the dataclass itself and ``from_dict`` over raw values (negative,
    zero, huge up to 2**64, floats and NaN, strings, None, bools, numpy scalars, nested lists,
    wrong lengths) raise only the documented exceptions (TypeError, ValueError, RuntimeError:
    ``zeroskip.spec``'s docstring), and a spec that validates has plain fields and the output
    shape torch computes for it.
(b) ``zeroskip.functional``'s convolutions on raw arguments and mismatched tensors behave as
    ``torch.nn.functional``'s: where torch raises, zeroskip raises the same type (or a subclass);
    where torch returns, zeroskip returns the same shape and values. So no kernel runs on a
    shape torch would not compute.

``ZEROSKIP_FUZZ_EXAMPLES=N`` sets every fuzzer's example count (default: sized for a quick run,
see ``_examples``); ``pytest tests/test_fuzz.py --hypothesis-show-statistics`` prints what the
examples did (the ``event`` lines: which exception, kernel or torch's op).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import zeroskip.functional as zf
from strategies import specs
from zeroskip import LayerSpec, Workload
from zeroskip.codegen.variant import Variant
from zeroskip.runtime import reference, stats
from zeroskip.spec import LimitError

DOCUMENTED = (TypeError, ValueError, RuntimeError)


def _examples(default: int) -> int:
    return int(os.environ.get("ZEROSKIP_FUZZ_EXAMPLES", default))


def _fuzz(default: int):
    return settings(max_examples=_examples(default), deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


# ------------------------------------------------------------------------------ raw values
HUGE = [2 ** 31 - 1, 2 ** 31, 2 ** 32 + 1, 2 ** 40, 2 ** 62, 2 ** 63 - 1, 2 ** 63, 2 ** 64,
        10 ** 30, -2 ** 62 - 1, -2 ** 63, -2 ** 63 - 1, 1025, 4096]
raw_ints = st.one_of(st.integers(-3, 9), st.sampled_from(HUGE))
raw_scalars = st.one_of(
    raw_ints, raw_ints, st.booleans(), st.none(),
    st.floats(allow_nan=True, allow_infinity=True, width=32),
    st.sampled_from(["same", "valid", "zeros", "reflect", "relu", "float32", "", "SAME",
                     "*/ x(); /*", "1"]),
    st.sampled_from([np.int64(2), np.int32(1), np.int64(2 ** 62), np.uint8(3), np.float64(1.0),
                     np.bool_(True)]),
    st.text(max_size=3))
raw_values = st.recursive(raw_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.tuples(inner), st.tuples(inner, inner),
    st.tuples(inner, inner, inner)), max_leaves=6)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), raw_ints, st.floats(allow_nan=False),
              st.sampled_from(["conv", "zeros", "float32", "none", "relu", "x"])),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(st.sampled_from(["a", "op"]), inner, max_size=2)),
    max_leaves=6)


def corrupt(draw, args: dict, raw=raw_values, counts=(0, 0, 1, 1, 1, 2, 3)) -> dict:
    """``args`` with ``counts`` of them (mostly 0 or 1) replaced by ``raw`` values or dropped
    (their defaults apply; a required one missing is a TypeError)."""
    count = draw(st.sampled_from(counts))
    for name in draw(st.lists(st.sampled_from(sorted(args)), min_size=count, max_size=count,
                              unique=True)):
        if draw(st.integers(0, 9)) == 0:
            args.pop(name, None)
        else:
            args[name] = draw(raw)
    return args


def small_tuple(lo: int, hi: int, rank: int):
    return st.one_of(st.integers(lo, hi), st.tuples(*[st.integers(lo, hi)] * rank),
                     st.lists(st.integers(lo, hi), min_size=rank, max_size=rank))


# ------------------------------------------------------------------------------ (a) LayerSpec
def _plain(value) -> bool:
    if type(value) is tuple:
        return all(_plain(v) for v in value)
    return type(value) in (int, str, bool, float)


def _check_valid(spec: LayerSpec) -> None:
    """A spec that validated: plain fields, a consistent output shape, round trips, and
    backward operators that are valid specs of the right shapes or raise a documented type."""
    for f in dataclasses.fields(spec):
        assert _plain(getattr(spec, f.name)), f.name
    # A batch of one where torch takes one (an empty input takes only an empty batch).
    batch = 1 if all(spec.input_size) or spec.op == "conv_transpose" else 0
    shape = spec.output_shape(batch)
    assert all(type(n) is int and n >= 0 for n in shape), shape
    if batch and spec.op in ("conv", "conv_transpose"):
        assert all(n >= 1 for n in shape[2:]), shape
    assert all(n >= 1 for n in spec.weight_shape)
    assert LayerSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert isinstance(spec.describe(), str)
    if spec.op in ("conv", "conv_transpose"):
        # torch's own shape function (meta tensors: nothing is allocated).
        meta = {name: torch.empty(s, device="meta")
                for name, s in spec.input_shapes(batch).items()}
        try:
            out = reference.forward(spec, meta["input"], meta["weight"], meta.get("bias"))
        except RuntimeError as exc:   # torch refusing what the spec accepted: a bug
            raise AssertionError(f"torch refuses {spec.describe()}: {exc}") from exc
        assert tuple(out.shape) == shape, (spec.describe(), tuple(out.shape), shape)
        for derive, operand in ((spec.grad_input, "input"), (spec.grad_weight, "weight")):
            try:
                grad = derive()
            except DOCUMENTED as exc:
                event(f"{derive.__name__}: {type(exc).__name__}")
                continue
            want = spec.input_shapes(batch)["input"] if operand == "input" else \
                spec.weight_shape
            assert grad.output_shape(batch) == want, (spec.describe(), grad.describe())


def _attempt(build) -> None:
    try:
        spec = build()
    except LimitError:
        event("LimitError (ValueError)")
        return
    except DOCUMENTED as exc:
        event(type(exc).__name__)
        return
    event("valid")
    _check_valid(spec)


@st.composite
def conv_args(draw, transpose: bool):
    rank = draw(st.sampled_from((1, 2, 3)))
    groups = draw(st.sampled_from((1, 2)))
    args = dict(
        in_channels=groups * draw(st.integers(1, 3)),
        out_channels=groups * draw(st.integers(1, 3)),
        kernel_size=draw(small_tuple(1, 4, rank)),
        stride=draw(small_tuple(1, 3, rank)),
        padding=draw(small_tuple(0, 3, rank) if transpose else
                     st.one_of(small_tuple(0, 3, rank), st.sampled_from(["same", "valid"]),
                               st.tuples(*[st.tuples(st.integers(0, 2),
                                                     st.integers(0, 2))] * rank))),
        dilation=draw(small_tuple(1, 3, rank)),
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=draw(st.sampled_from(("zeros", "zeros", "reflect", "replicate",
                                           "circular") if not transpose else ("zeros",))),
        dtype=draw(st.sampled_from((None, "float32", "float64", "half", torch.float16,
                                    torch.bfloat16, "double", np.dtype("float32")))),
        input_size=draw(st.tuples(*[st.integers(0, 10)] * rank)),
        batch=draw(st.integers(0, 3)),
        density=draw(st.floats(0, 1)),
        activation=draw(st.sampled_from(("none", "relu"))),
    )
    if transpose:
        args["output_padding"] = draw(small_tuple(0, 2, rank))
    return corrupt(draw, args)


def _with_workload(make, args: dict):
    """Build the spec from ``args`` less ``batch`` and ``density``, which (raw values too)
    make the workload it is checked with."""
    def build():
        work = {k: args.pop(k) for k in ("batch", "density") if k in args}
        spec = make(**args)
        Workload(**work).check(spec)
        return spec
    return build


@_fuzz(500)
@given(args=conv_args(transpose=False))
def test_fuzz_layerspec_conv(args):
    _attempt(_with_workload(LayerSpec.conv, args))


@_fuzz(500)
@given(args=conv_args(transpose=True))
def test_fuzz_layerspec_conv_transpose(args):
    _attempt(_with_workload(LayerSpec.conv_transpose, args))


FIELDS = [f.name for f in dataclasses.fields(LayerSpec)]


@st.composite
def raw_fields(draw):
    """The fields of a valid spec of any operator, a few replaced by raw values."""
    spec = draw(specs())
    return corrupt(draw, {f: getattr(spec, f) for f in FIELDS})


@_fuzz(500)
@given(fields=raw_fields())
def test_fuzz_layerspec_fields(fields):
    _attempt(lambda: LayerSpec(**fields))


@st.composite
def raw_json(draw):
    """A spec's ``to_dict()`` with a few entries replaced by JSON values (or added, or all of
    it replaced by one), as a layers or tuning file may hold it."""
    data = draw(specs()).to_dict()
    count = draw(st.sampled_from((0, 1, 1, 2, 3)))
    for name in draw(st.lists(st.sampled_from(FIELDS + ["colour"]), min_size=count,
                              max_size=count, unique=True)):
        if draw(st.integers(0, 9)) == 0:
            data.pop(name, None)
        else:
            data[name] = draw(json_values)
    return draw(st.one_of(st.just(data), st.just(data), st.just(data), json_values))


@_fuzz(500)
@given(data=raw_json())
def test_fuzz_layerspec_from_dict(data):
    def build():
        loaded = json.loads(json.dumps(data))
        if not isinstance(loaded, dict):
            raise TypeError("not a dict")   # the callers' own check (trace.py, autotune.py)
        return LayerSpec.from_dict(loaded)
    _attempt(build)


def _pow2():
    return st.sampled_from((1, 2, 16, 64, 256, 512, 0, 3))


tuning_names = st.one_of(
    st.text(max_size=12),
    st.from_regex(r"(auto|dense|sparse|torch)(/[wvmx]?[0-9+\-_ ]{0,4})*", fullmatch=True),
    st.builds("{}/w{}/v{}".format, st.sampled_from(("auto", "dense", "sparse", "x")),
              st.integers(-1, 18), st.integers(-1, 18)),
    st.builds("{}/m{}n{}k{}w{}s{}x{}".format, st.sampled_from(("dense", "sparse", "torch")),
              _pow2(), _pow2(), _pow2(), st.sampled_from((1, 3, 4, 16, 32)), st.integers(0, 9),
              st.integers(0, 2000)))


@_fuzz(300)
@given(name=tuning_names)
def test_fuzz_tuning_names(name):
    """Choice names from a tuning database: a variant or config of plain ints, or ValueError."""
    try:
        parsed = Variant.parse(name)
    except ValueError:
        event("ValueError")
        return
    event("parsed")
    config = dataclasses.astuple(parsed.config) if parsed.config is not None else ()
    items = (parsed.strategy, parsed.tile_width, parsed.vectors, *config)
    assert all(v is None or type(v) in (int, str) for v in items), items


# ------------------------------------------------------------------------------ (b) functional
MAX_ELEMENTS = 10 ** 6     # examples whose tensors torch would make larger are skipped


def _int_like(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _per_axis(value, rank: int):
    """Per-axis ints of an argument as torch expands it, or None where it is not one."""
    if _int_like(value):
        return [int(value)] * rank
    if isinstance(value, (list, tuple)) and value and all(_int_like(v) for v in value):
        value = [int(v) for v in value]
        return value * rank if len(value) == 1 else value if len(value) == rank else None
    return None


def _too_large(op, rank, x, w, stride, padding, dilation, output_padding) -> bool:
    """Whether torch would make a tensor of more than MAX_ELEMENTS (a padded input, an im2col
    buffer, the output) on these arguments: such examples are skipped, they test memory."""
    if not (isinstance(x, torch.Tensor) and isinstance(w, torch.Tensor)) or \
            w.dim() != rank + 2 or x.dim() not in (rank + 1, rank + 2):
        return False
    size, kernel = list(x.shape[-rank:]), list(w.shape[2:])
    s, d = _per_axis(stride, rank), _per_axis(dilation, rank)
    if s is None or d is None:
        return False
    if isinstance(padding, str):
        p = [0] * rank if padding != "same" else \
            [max(0, dd) * max(0, k - 1) // 2 + 1 for dd, k in zip(d, kernel)]
    else:
        p = _per_axis(padding, rank)
    if p is None:
        return False
    channels = max(1, x.shape[-rank - 1]) * max(1, w.shape[0]) * max(1, w.shape[1])
    batch = x.shape[0] if x.dim() == rank + 2 else 1
    padded = math.prod(max(1, n + 2 * abs(pp)) for n, pp in zip(size, p))
    if op == "conv":
        out = [(n + 2 * pp - abs(dd) * (k - 1) - 1) // max(1, ss) + 1
               for n, pp, dd, k, ss in zip(size, p, d, kernel, s)]
    else:
        o = _per_axis(output_padding, rank) or [0] * rank
        out = [(n - 1) * ss - 2 * pp + abs(dd) * (k - 1) + oo + 1
               for n, pp, dd, k, ss, oo in zip(size, p, d, kernel, s, o)]
    out_elems = math.prod(max(1, n) for n in out)
    return max(batch, 1) * channels * max(padded, out_elems) * max(1, math.prod(kernel)) > \
        MAX_ELEMENTS or any(abs(v) > 2 ** 62 for v in out)


MUTATIONS = ["none"] * 24 + ["requires_grad"] * 3 + [
    "x_unbatched", "x_extra_dim", "x_missing_dims", "x_channels", "w_out", "w_in", "w_kernel0",
    "w_dims", "bias_size", "bias_2d", "bias_0d", "bias_list", "bias_dtype", "x_float64",
    "w_float64", "all_float64", "all_float16", "all_int64", "x_batch0", "x_size0",
    "channels0", "x_noncontiguous", "x_channels_last", "w_noncontiguous", "requires_grad",
    "x_list", "w_none", "x_meta", "all_meta", "x_expanded", "w_expanded", "bias_expanded",
    "x_offset", "w_offset"]


@st.composite
def functional_calls(draw, op: str):
    rank = draw(st.sampled_from((1, 1, 2, 2, 3)))
    groups = draw(st.sampled_from((1, 1, 2)))
    c_in = groups * draw(st.integers(1, 2))
    c_out = groups * draw(st.integers(1, 2))
    kernel = tuple(draw(st.integers(1, 3 if rank < 3 else 2)) for _ in range(rank))
    size = tuple(draw(st.integers(1, 6 if rank < 3 else 3)) for _ in range(rank))
    batch = draw(st.sampled_from((1, 2)))
    seed = draw(st.integers(0, 2 ** 16))
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, c_in, *size, generator=gen)
    w_shape = (c_out, c_in // groups, *kernel) if op == "conv" else \
        (c_in, c_out // groups, *kernel)
    w = torch.randn(*w_shape, generator=gen)
    b = torch.randn(c_out, generator=gen) if draw(st.booleans()) else None
    mutation = draw(st.sampled_from(MUTATIONS))
    x, w, b = _mutate(mutation, x, w, b, rank)
    kwargs = dict(
        stride=draw(small_tuple(1, 2, rank)),
        padding=draw(small_tuple(0, 2, rank) if op == "conv_transpose" else
                     st.one_of(small_tuple(0, 2, rank), st.sampled_from(["same", "valid"]))),
        dilation=draw(small_tuple(1, 2, rank)), groups=groups)
    if op == "conv_transpose":
        kwargs["output_padding"] = draw(small_tuple(0, 1, rank))
    # Raw ints (negative, zero, huge) more often than other raw values here.
    kwargs = corrupt(draw, kwargs, st.one_of(raw_ints, raw_ints, raw_ints, raw_values),
                     counts=(0, 0, 0, 1, 1, 2))
    # Numpy ints and 1-element lists, as torch takes them.
    for name in draw(st.lists(st.sampled_from(sorted(kwargs)), max_size=2)):
        value = kwargs[name]
        if _int_like(value) and abs(value) < 2 ** 62:
            kwargs[name] = draw(st.sampled_from((np.int64(value), [value], (value,))))
    return rank, mutation, x, w, b, kwargs


def _mutate(mutation: str, x, w, b, rank: int):
    if mutation == "x_unbatched":
        x = x[0]
    elif mutation == "x_extra_dim":
        x = x.unsqueeze(0)
    elif mutation == "x_missing_dims":
        x = x[0, 0]
    elif mutation == "x_channels":
        x = torch.cat([x, x[:, :1]], dim=1)
    elif mutation == "w_out":
        w = torch.cat([w, w[:1]], dim=0)
    elif mutation == "w_in":
        w = torch.cat([w, w[:, :1]], dim=1)
    elif mutation == "w_kernel0":
        w = w[..., :0]
    elif mutation == "w_dims":
        w = w.unsqueeze(-1)
    elif mutation == "bias_size":
        b = torch.zeros(w.shape[0] + 1)
    elif mutation == "bias_2d":
        b = torch.zeros(1, w.shape[0])
    elif mutation == "bias_0d":
        b = torch.tensor(1.0)
    elif mutation == "bias_list":
        b = [0.0] * w.shape[0]
    elif mutation == "bias_dtype":
        b = torch.zeros(w.shape[0], dtype=torch.float64)
    elif mutation == "x_float64":
        x = x.double()
    elif mutation == "w_float64":
        w = w.double()
    elif mutation == "all_float64":
        x, w, b = x.double(), w.double(), None if b is None else b.double()
    elif mutation == "all_float16":
        x, w, b = x.half(), w.half(), None if b is None else b.half()
    elif mutation == "all_int64":
        x, w, b = (x * 4).long(), (w * 4).long(), None if b is None else (b * 4).long()
    elif mutation == "x_batch0":
        x = x[:0]
    elif mutation == "x_size0":
        x = x[..., :0]
    elif mutation == "channels0":
        x, w = x[:, :0], w[:, :0]
    elif mutation == "x_noncontiguous":
        x = x.transpose(-1, -2).contiguous().transpose(-1, -2) if rank > 1 else x[..., ::1]
        x = torch.cat([x, x], dim=-1)[..., ::2]
    elif mutation == "x_channels_last" and rank == 2:
        x = x.contiguous(memory_format=torch.channels_last)
    elif mutation == "w_noncontiguous":
        w = torch.cat([w, w], dim=-1)[..., ::2]
    elif mutation == "requires_grad":
        x = x.clone().requires_grad_()
    elif mutation == "x_list":
        x = x.tolist()
    elif mutation == "w_none":
        w = None
    elif mutation == "x_meta":
        x = x.to("meta")
    elif mutation == "all_meta":
        x, w, b = x.to("meta"), w.to("meta"), None if b is None else b.to("meta")
    elif mutation == "x_expanded":      # every sample the same memory (batch stride 0)
        x = x[:1].expand_as(x)
    elif mutation == "w_expanded":
        w = w[:1].expand_as(w)
    elif mutation == "bias_expanded":
        b = torch.randn(1).expand(w.shape[0])
    elif mutation == "x_offset":        # contiguous, but not at the start of its storage
        x = torch.cat([x[:1], x])[1:]
    elif mutation == "w_offset":
        w = torch.cat([w[:1], w])[1:]
    return x, w, b


def _outcome(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fn(), None
        except Exception as exc:   # compared below: any type may be the right one
            return None, exc


def _compare(op: str, call, fuzzing: bool = True) -> None:
    rank, mutation, x, w, b, kwargs = call
    if fuzzing:
        assume(not _too_large(op, rank, x, w, kwargs.get("stride", 1), kwargs.get("padding", 0),
                              kwargs.get("dilation", 1), kwargs.get("output_padding", 0)))
    note = event if fuzzing else (lambda text: None)
    name = f"{op}{rank}d"
    want, torch_exc = _outcome(lambda: getattr(F, name)(x, w, b, **kwargs))
    before = stats.stats()["kernel_calls"]
    got, zs_exc = _outcome(lambda: getattr(zf, name)(x, w, b, **kwargs))
    ran_kernel = stats.stats()["kernel_calls"] > before
    if torch_exc is not None:
        assert zs_exc is not None, (f"torch raised {torch_exc!r}, zeroskip returned "
                                    f"{'a kernel' if ran_kernel else 'torch'}'s result")
        assert isinstance(zs_exc, type(torch_exc)), \
            f"torch raised {type(torch_exc).__name__}: {torch_exc}; zeroskip {zs_exc!r}"
        note(f"both raised {type(torch_exc).__name__}")
        return
    if zs_exc is not None:
        raise AssertionError(f"torch returned, zeroskip raised {zs_exc!r}") from zs_exc
    note("a generated kernel ran" if ran_kernel else "torch's op ran (fallback)")
    assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device
    if want.device.type != "meta":
        tol = {torch.float64: 1e-9, torch.float16: 1e-2}.get(want.dtype, 1e-4)
        torch.testing.assert_close(got.detach(), want.detach(), rtol=tol, atol=tol)
    if mutation == "requires_grad" and want.numel():
        # The custom op's backward: the input gradient, on a kernel or torch's.
        g = torch.randn_like(want)
        (want_grad,) = torch.autograd.grad(want, x, g)
        (got_grad,) = torch.autograd.grad(got, x, g)
        torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-4)
        note("input gradient compared")


@_fuzz(250)
@given(call=functional_calls("conv"))
def test_fuzz_functional_conv_matches_torch(call):
    _compare("conv", call)


@_fuzz(200)
@given(call=functional_calls("conv_transpose"))
def test_fuzz_functional_conv_transpose_matches_torch(call):
    _compare("conv_transpose", call)


@pytest.mark.parametrize("op, kwargs", [
    ("conv", dict(stride=2 ** 40)), ("conv", dict(stride=2 ** 63)), ("conv", dict(stride=True)),
    ("conv", dict(groups=1.0)), ("conv", dict(groups=np.int64(1))),
    ("conv", dict(stride=[2 ** 63])), ("conv", dict(padding="same", dilation=2 ** 40)),
    ("conv_transpose", dict(stride=2 ** 20)), ("conv_transpose", dict(stride=2 ** 40)),
    ("conv_transpose", dict(output_padding=2 ** 63)), ("conv", dict(dilation=(0, False))),
    ("conv", dict(stride=(1, 2.0))), ("conv", dict(stride=(True, 1))),
    # torch unpacks the arguments last to first: which error comes first follows that order
    ("conv", dict(stride=(1, None), dilation=2 ** 63)),
    ("conv", dict(stride=2 ** 63, dilation=(1, None))),
    ("conv_transpose", dict(output_padding=(0, None), dilation=-2 ** 63 - 1)),
    ("conv_transpose", dict(stride=2 ** 63, output_padding=(1, None))),
    # a kernel extent past int64: torch wraps it and runs; zeroskip leaves the call to torch
    ("conv", dict(stride=2, dilation=2 ** 62))])
def test_raw_values_regressions(op, kwargs):
    """Cases the fuzzers found (or would): torch's exception type, or torch's result."""
    x = torch.randn(1, 2, 1)
    w = torch.randn(3, 2, 1) if op == "conv" else torch.randn(2, 3, 1)
    if kwargs.get("dilation") == 2 ** 62:
        w = torch.randn(3, 2, 3)     # the extent 2**63 + 1 wraps in torch's int64
    _compare(op, (1, "none", x, w, None, {"stride": 1, "padding": 0, "dilation": 1,
                                          **({"output_padding": 0} if op != "conv" else {}),
                                          **kwargs}), fuzzing=False)


@pytest.mark.parametrize("rank", (1, 2, 3))
def test_transposed_conv_bias_of_another_dtype(rank):
    """torch's CPU conv_transpose1d/2d take a float64 bias for float32 operands (3d raises)."""
    x, w = torch.randn(1, 2, *[3] * rank), torch.randn(2, 3, *[2] * rank)
    _compare("conv_transpose", (rank, "bias_dtype", x, w, torch.ones(3, dtype=torch.float64),
                                {"stride": 1, "padding": 0, "dilation": 1, "groups": 1,
                                 "output_padding": 0}), fuzzing=False)


@pytest.mark.parametrize("op, w_shape, kwargs", [
    ("conv_transpose", (2, 3, 2), dict(output_padding=1)),
    ("conv_transpose", (2, 3, 2), dict(dilation=0)),
    ("conv_transpose", (2, 3, 2), dict(padding=10)),
    ("conv_transpose", (2, 3, 2), dict(stride=2 ** 40)),
    ("conv", (3, 2, 2), dict(dilation=0)),
    ("conv", (3, 2, 0), dict()),
    ("conv", (3, 2, 9), dict()),
    ("conv", (3, 2, 2), dict(groups=0))])
def test_empty_batch_like_torch(op, w_shape, kwargs):
    """torch's op checks an empty batch less (a dilation of 0 passes, a kernel of size 0 is an
    IndexError): zeroskip answers as torch does."""
    x, w = torch.randn(0, 2, 5), torch.randn(*w_shape)
    kwargs = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1,
              **({"output_padding": 0} if op != "conv" else {}), **kwargs}
    _compare(op, (1, "x_batch0", x, w, None, kwargs), fuzzing=False)


def _same_outcome(name: str, x, w, kwargs) -> torch.Tensor | None:
    """torch's and zeroskip's ``name`` on the same call: the same exception type and message,
    or the same result (returned; None where both raised)."""
    want, torch_exc = _outcome(lambda: getattr(F, name)(x, w, **kwargs))
    got, zs_exc = _outcome(lambda: getattr(zf, name)(x, w, **kwargs))
    if torch_exc is not None:
        assert type(zs_exc) is type(torch_exc) and str(zs_exc) == str(torch_exc), \
            (torch_exc, zs_exc)
        return None
    assert zs_exc is None, zs_exc
    torch.testing.assert_close(got, want)
    return want


@pytest.mark.parametrize("batch", (None, 1, 2, 3))
@pytest.mark.parametrize("rank, kernel, kwargs", [
    (1, 1, dict(dilation=0)), (2, 1, dict(dilation=0, stride=2, output_padding=1)),
    (2, (1, 3), dict(dilation=(0, 1))), (1, 2, dict(padding=1)), (2, 2, dict(padding=(1, 0))),
    (3, 2, dict(padding=1))])
def test_transposed_conv_checks_depend_on_the_batch_like_torch(batch, rank, kernel, kwargs,
                                                              monkeypatch):
    """torch's CPU conv_transpose checks a batch of 2 (oneDNN) less than a batch of 1: a
    dilation of 0 with a 1-tap kernel runs, an output of size 0 comes back empty. zeroskip runs
    those on its kernels (strict mode: no fallback), with their gradients, and raises torch's
    own message for a batch of one."""
    monkeypatch.setenv("ZEROSKIP_STRICT", "1")
    shape = (2,) + (1 if "padding" in kwargs else 3,) * rank
    x = torch.randn(*shape) if batch is None else torch.randn(batch, *shape)
    w = torch.randn(2, 3, *((kernel,) * rank if isinstance(kernel, int) else kernel))
    name = f"conv_transpose{rank}d"
    want = _same_outcome(name, x, w, kwargs)
    if want is None:
        return
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = getattr(zf, name)(xs, ws, **kwargs)
    torch.testing.assert_close(out, want)
    gx, gw = torch.autograd.grad(out.sum(), (xs, ws))
    xt, wt = x.clone().requires_grad_(), w.clone().requires_grad_()
    want_gx, want_gw = torch.autograd.grad(getattr(F, name)(xt, wt, **kwargs).sum(), (xt, wt))
    torch.testing.assert_close(gx, want_gx)
    torch.testing.assert_close(gw, want_gw)


@pytest.mark.parametrize("x_shape, w_shape, dtype, kwargs", [
    # groups > 1: torch's oneDNN path even for a batch of one (an empty result)
    ((1, 2, 2), (2, 1, 1), torch.float32, dict(padding=1, groups=2)),
    # float64 never runs on oneDNN: torch's own loops reject every batch
    ((2, 2, 2), (2, 1, 1), torch.float64, dict(padding=1)),
    ((2, 2, 5), (2, 3, 1), torch.float64, dict(dilation=0)),
    # output_padding >= stride keeps torch off oneDNN
    ((2, 1, 1, 1, 2), (1, 1, 1, 1, 1), torch.float32,
     dict(padding=(0, 0, 1), dilation=2, output_padding=(0, 1, 0))),
])
def test_degenerate_transposed_convs_follow_torchs_backend_choice(x_shape, w_shape, dtype,
                                                                  kwargs):
    x, w = torch.randn(x_shape, dtype=dtype), torch.randn(w_shape, dtype=dtype)
    _same_outcome(f"conv_transpose{len(x_shape) - 2}d", x, w, kwargs)


def test_layerspec_replicate_padding_of_empty_input_raises_like_torch():
    """F.pad(mode='replicate') refuses an empty spatial size even in an empty batch."""
    with pytest.raises(RuntimeError, match="replicate"):
        Workload(0).check(LayerSpec.conv(1, 1, 1, padding=1, padding_mode="replicate",
                                         input_size=(0,)))


@pytest.mark.parametrize("op, batch, kwargs", [
    ("conv", 1, dict(dilation=2 ** 31 - 1)),      # beyond the kernels' limits
    ("conv_transpose", 1, dict(stride=2 ** 20)),
    ("conv", 0, dict(dilation=0))])               # an empty batch torch checks less
def test_fallback_calls_get_torch_gradients(op, batch, kwargs):
    """A call that needs gradients and runs torch's op runs it with torch's autograd (the
    custom op's backward builds a spec such a call does not have)."""
    x = torch.randn(batch, 2, 1, requires_grad=True)
    w = torch.randn(3, 2, 1) if op == "conv" else torch.randn(2, 3, 1)
    kwargs = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1,
              **({"output_padding": 0} if op != "conv" else {}), **kwargs}
    _compare(op, (1, "requires_grad", x, w, None, kwargs), fuzzing=False)


def test_same_key_other_types_do_not_share_a_call():
    """1, True and 1.0 are equal in Python but not to torch: a cached call for stride=1 must
    not serve stride=True (torch: TypeError)."""
    x, w = torch.randn(1, 2, 5), torch.randn(3, 2, 2)
    zf.conv1d(x, w, stride=1, groups=1)
    for kwargs in (dict(stride=True), dict(stride=1.0), dict(groups=True), dict(groups=1.0)):
        with pytest.raises(TypeError):
            zf.conv1d(x, w, **kwargs)
