"""Calls with several faults at once raise exactly what torch raises: the fault torch reports
first (torch checks in its own order), with torch's exception type and torch's message, word for
word (zeroskip.runtime.arguments.check_call mirrors that order).

One documented exception: a type torch's parser refuses for ``conv1d/2d/3d`` (two overloads)
gets torch's type and the message's first words only, since torch's message lists the call's
arguments as passed (positionally or by keyword), which zeroskip's functions cannot know.

``ZEROSKIP_FUZZ_EXAMPLES=N`` sets the example count. Calls torch accepts are skipped: the
examples exercise refusals, which compile nothing.
"""
from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

import zeroskip.functional as ZF

# Parameter faults apply first, shape faults next, rank faults last (so the others still find
# the axes they change); the order torch reports them in is torch's, whatever the draw.
FAULTS = ("stride", "padding", "dilation", "output_padding", "groups_not_dividing",
          "groups_too_large", "groups_nonpositive", "same_with_stride", "padding_string",
          "arg_length", "arg_type", "channels", "bias", "kernel_too_large", "dtype",
          "input_rank", "weight_rank")
CONV_ONLY = {"same_with_stride", "padding_string"}
TRANSPOSED_ONLY = {"output_padding"}


def _outcome(fn, *args, **kwargs) -> BaseException | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # fallbacks warn once per reason
        try:
            fn(*args, **kwargs)
        except Exception as exc:   # noqa: BLE001 - the exception is the result under test
            return exc
    return None


def _as_argument(draw, values: list):
    """A per-axis list as a caller passes it: an int where all agree, a 1-element list (torch
    repeats it per axis), or the list."""
    if len(set(values)) == 1:
        return draw(st.sampled_from((values[0], [values[0]], list(values))))
    return list(values)


@st.composite
def faulty_calls(draw):
    """``(name, args, kwargs)`` of a small call with 2 to 4 faults."""
    op = draw(st.sampled_from(("conv", "conv_transpose")))
    rank = draw(st.integers(1, 3))
    transposed = op == "conv_transpose"
    allowed = [f for f in FAULTS if f not in (TRANSPOSED_ONLY if not transposed else CONV_ONLY)]
    faults = set(draw(st.lists(st.sampled_from(allowed), min_size=2, max_size=4, unique=True)))
    groups = base = draw(st.sampled_from((1, 2)))   # `base`: the groups the weight is for
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    kernel = [draw(st.integers(1, 2)) for _ in range(rank)]
    size = [draw(st.integers(2, 4)) for _ in range(rank)]
    stride = [draw(st.integers(1, 2)) for _ in range(rank)]
    padding = [draw(st.integers(0, 1)) for _ in range(rank)]
    dilation = [draw(st.integers(1, 2)) for _ in range(rank)]
    output_padding = [0] * rank
    batch = draw(st.sampled_from((None, 1, 2)))     # None: an unbatched input
    bias = [c_out] if draw(st.booleans()) else None
    dtypes = {"input": torch.float32, "weight": torch.float32, "bias": torch.float32}
    axis = draw(st.integers(0, rank - 1))
    string = None
    extra = {}
    for fault in (f for f in FAULTS if f in faults):
        if fault == "stride":
            stride[axis] = draw(st.sampled_from((0, -1)))
        elif fault == "padding":
            padding[axis] = -1
        elif fault == "dilation":
            # A transposed conv's dilation of 0 on a 1-tap axis runs for some batch sizes
            # (calls.PerBatch, which builds a kernel): a negative one instead.
            dilation[axis] = -1 if transposed and kernel[axis] == 1 else \
                draw(st.sampled_from((0, -1)))
        elif fault == "output_padding":
            output_padding[axis] = draw(st.sampled_from(
                (-1, max(stride[axis], dilation[axis]), max(stride[axis], dilation[axis]) + 1)))
        elif fault == "groups_not_dividing":
            groups = draw(st.integers(2, 5))
        elif fault == "groups_too_large":
            groups = (c_in if transposed else c_out) + draw(st.integers(1, 2))
        elif fault == "groups_nonpositive":
            groups = draw(st.sampled_from((0, -1)))
        elif fault == "same_with_stride":
            string, stride[axis] = "same", 2
        elif fault == "padding_string":
            string = draw(st.sampled_from(("full", "SAME", "")))
        elif fault == "arg_length":
            which = draw(st.sampled_from(("stride", "padding", "dilation") +
                                         (("output_padding",) if transposed else ())))
            extra[which] = draw(st.sampled_from(([], [1] * (rank + 1))))
        elif fault == "arg_type":
            which, value = draw(st.sampled_from((("stride", 1.5), ("dilation", None),
                                                 ("groups", 1.0), ("padding", "same" if
                                                                   transposed else 0.5))))
            extra[which] = value
        elif fault == "channels":
            c_in += 1
        elif fault == "bias":
            bias = draw(st.sampled_from(([c_out + 1], [1, c_out], [])))
        elif fault == "kernel_too_large":
            # conv: a kernel wider than the padded input; transposed: an output below 1.
            size[axis], kernel[axis] = 1, (1 if transposed else 3)
            padding[axis] = 1 if transposed else 0
            stride[axis], dilation[axis] = 1, 1
        elif fault == "dtype":
            dtypes[draw(st.sampled_from(("input", "weight", "bias")))] = torch.float64
            if bias is None and dtypes["bias"] == torch.float64:
                bias = [c_out]
    x_shape = ([] if batch is None else [batch]) + [c_in, *size]
    w_shape = [c_in, c_out // base, *kernel] if transposed else [c_out, c_in // base, *kernel]
    if "input_rank" in faults:
        target = draw(st.sampled_from((rank, rank + 3)))
        x_shape = x_shape[len(x_shape) - target:] if target < len(x_shape) else \
            x_shape + [2] * (target - len(x_shape))
    if "weight_rank" in faults:
        target = draw(st.sampled_from((1, 2, rank + 1, rank + 3)))
        w_shape = w_shape[:target] if target < len(w_shape) else \
            w_shape + [2] * (target - len(w_shape))
    kwargs = dict(stride=_as_argument(draw, stride), dilation=_as_argument(draw, dilation),
                  groups=groups,
                  padding=string if string is not None else _as_argument(draw, padding))
    if transposed:
        kwargs["output_padding"] = _as_argument(draw, output_padding)
    kwargs.update(extra)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))
    x = torch.randn(x_shape, generator=gen, dtype=dtypes["input"])
    w = torch.randn(w_shape, generator=gen, dtype=dtypes["weight"])
    b = None if bias is None else torch.randn(bias, generator=gen, dtype=dtypes["bias"])
    return f"{op}{rank}d", (x, w, b), kwargs


def _loose(name: str, exc: BaseException) -> bool:
    """The documented exception: a type the parser of conv1d/2d/3d (two overloads) refuses."""
    return isinstance(exc, TypeError) and not name.startswith("conv_transpose") and \
        "received an invalid combination of arguments" in str(exc)


def _compare(name: str, args: tuple, kwargs: dict) -> None:
    torch_exc = _outcome(getattr(F, name), *args, **kwargs)
    assume(torch_exc is not None)
    zs_exc = _outcome(getattr(ZF, name), *args, **kwargs)
    assert zs_exc is not None, f"torch raised {torch_exc!r}, zeroskip returned"
    assert type(zs_exc) is type(torch_exc), f"torch: {torch_exc!r}\nzeroskip: {zs_exc!r}"
    event(f"{type(torch_exc).__name__}: {' '.join(str(torch_exc).split()[:4])}")
    if _loose(name, torch_exc):
        prefix = f"{name}() received an invalid combination of arguments"
        assert str(zs_exc).startswith(prefix), f"torch: {torch_exc!r}\nzeroskip: {zs_exc!r}"
        return
    assert str(zs_exc) == str(torch_exc), f"torch: {torch_exc!r}\nzeroskip: {zs_exc!r}"


@settings(max_examples=int(os.environ.get("ZEROSKIP_FUZZ_EXAMPLES", 250)), deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(call=faulty_calls())
def test_several_faults_raise_what_torch_raises(call):
    _compare(*call)


def _t(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype)


# (id, function, args, kwargs, the start of torch's message): cases zeroskip once answered
# with another fault, or another message, than torch.
REGRESSIONS = [
    ("conv1d rank-2 weight", "conv1d", (_t(1, 2, 5), _t(3, 2)), {},
     "weight should have at least three dimensions"),
    # conv2d's parser makes stride=1 two ints: a 3-D weight is first a stride of wrong length...
    ("conv2d rank-3 weight", "conv2d", (_t(1, 2, 5, 5), _t(3, 2, 3)), {},
     "expected stride to be a single integer value or a list of 1 values"),
    # ...and, where no argument has the wrong length, an input of the wrong rank.
    ("conv2d rank-3 weight, valid", "conv2d", (_t(1, 2, 5, 5), _t(3, 2, 3)),
     dict(stride=[1], dilation=[1], padding="valid"),
     "Expected 3-dimensional input for 3-dimensional weight [3, 2, 3]"),
    ("conv2d rank-3 weight, same", "conv2d", (_t(1, 2, 5, 5), _t(3, 2, 3)),
     dict(padding="same"), "Expected 3-dimensional input for 3-dimensional weight[3, 2, 3]"),
    ("stride 0 and channels", "conv2d", (_t(1, 2, 5, 5), _t(3, 3, 3, 3)), dict(stride=0),
     "non-positive stride is not supported"),
    ("padding -1 and channels", "conv2d", (_t(1, 2, 5, 5), _t(3, 3, 3, 3)), dict(padding=-1),
     "negative padding is not supported"),
    ("groups above out_channels", "conv2d", (_t(1, 4, 5, 5), _t(2, 1, 3, 3)), dict(groups=4),
     "Given groups=4, expected weight to be at least 4 at dimension 0"),
    ("transposed groups above channels", "conv_transpose2d", (_t(1, 2, 5, 5), _t(2, 3, 3, 3)),
     dict(groups=4), "Given groups=4, expected weight to be at least 4 at dimension 0"),
]


@pytest.mark.parametrize("name, args, kwargs, start", [r[1:] for r in REGRESSIONS],
                         ids=[r[0] for r in REGRESSIONS])
def test_regressions_raise_what_torch_raises(name, args, kwargs, start):
    torch_exc = _outcome(getattr(F, name), *args, **kwargs)
    assert torch_exc is not None and str(torch_exc).startswith(start), \
        f"case out of date: torch says {torch_exc!r}"
    zs_exc = _outcome(getattr(ZF, name), *args, **kwargs)
    assert type(zs_exc) is type(torch_exc) and str(zs_exc) == str(torch_exc), \
        f"torch: {torch_exc!r}\nzeroskip: {zs_exc!r}"
