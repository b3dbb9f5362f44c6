"""torch's argument checks for a convolution call, and a call's arguments as one config string.

:func:`check_arguments` parses the non-tensor arguments as torch's parser does (same exception
types and words, same order), :func:`check_call` then runs the checks torch's C++ runs on the
call (same order, types and messages); :func:`config_of` writes the checked arguments as the
custom ops' config string (a schema has no type for an int, a tuple of ints or pairs, or 'same';
torch.compile guards on a constant string), :func:`parse_config` reads it back and
:func:`spec_of_call` builds the call's :class:`LayerSpec`.
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import numbers
import operator
from typing import Any, Callable

import torch

from ..fields import _is_int
from ..spec import LayerSpec
from .stats import Fallback

# The dtypes each backend's kernels cover.
COVERED_DTYPES = {
    "c": {torch.float32: "float32", torch.float64: "float64"},
    "triton": {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"},
}


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, (list, tuple)) else value


def key_of(value: Any) -> Any:
    """An argument as part of a call's key: hashable, and apart wherever torch's parser tells
    values apart that Python finds equal (``1``, ``True`` and ``1.0``)."""
    if isinstance(value, (list, tuple)):
        return tuple(key_of(v) for v in value)
    return value if type(value) is int or type(value) is str else (type(value), value)


def config_of(op, rank, stride, padding, dilation, groups, output_padding, padding_mode,
              activation="none") -> str:
    """The non-tensor arguments as one string: a custom op's schema has no type for an int, a
    tuple of ints or of pairs, or 'same'; and torch.compile guards on a constant string."""
    return (f"{op};{rank};{_freeze(stride)!r};{_freeze(padding)!r};{_freeze(dilation)!r};"
            f"{groups!r};{_freeze(output_padding)!r};{padding_mode};{activation}")


@functools.lru_cache(maxsize=4096)
def parse_config(config: str) -> tuple:
    op, rank, *values, mode, activation = config.split(";")
    return (op, int(rank), *(ast.literal_eval(v) for v in values), mode, activation)


def spec_from_config(config: str, input_shape, weight_shape, has_bias: bool, dtype) -> LayerSpec:
    """The LayerSpec (batch 1) of a call, from its config and tensor shapes."""
    op, rank, *args = parse_config(config)
    return spec_of_call(op, rank, input_shape, weight_shape, has_bias, dtype, tuple(args))


def spec_of_call(op: str, rank: int, input_shape, weight_shape, has_bias: bool, dtype,
                args: tuple) -> LayerSpec:
    """The LayerSpec (batch 1) of a call, from torch's arguments and the tensor shapes."""
    stride, padding, dilation, groups, output_padding, mode, activation = args
    size = tuple(int(n) for n in input_shape[-rank:])
    weight_shape = tuple(int(n) for n in weight_shape)
    dtype = str(dtype).removeprefix("torch.")
    if op == "conv_transpose":
        return LayerSpec.conv_transpose(weight_shape[0], weight_shape[1] * groups,
                                        weight_shape[2:], stride, padding, output_padding,
                                        groups, has_bias, dilation, mode, dtype,
                                        input_size=size, activation=activation)
    return LayerSpec.conv(weight_shape[1] * groups, weight_shape[0], weight_shape[2:], stride,
                          padding, dilation, groups, has_bias, mode, dtype, input_size=size,
                          activation=activation)


_INT64 = range(-2 ** 63, 2 ** 63)


def _tp_name(value) -> str:
    """The type's name as torch's messages print it (CPython's tp_name: module-qualified for a
    C type outside builtins, such as ``numpy.float64``)."""
    kind = type(value)
    heap = kind.__flags__ & (1 << 9)   # Py_TPFLAGS_HEAPTYPE: a class defined in Python
    return kind.__name__ if heap or kind.__module__ == "builtins" else \
        f"{kind.__module__}.{kind.__name__}"


def check_arguments(op, rank, stride, padding, dilation, groups, output_padding,
                    expand: bool = True) -> tuple | Fallback:
    """torch's argument parser on the non-tensor arguments. First the overloads: TypeError where
    an argument has a type torch takes for none of them (a bool, a float, None, a string but
    conv's padding; of a list torch looks at the first element only). Then each argument in the
    reverse of the signature's order (as torch's C++ evaluates them): ValueError for an int
    beyond int64, TypeError for a list element that is no int (after the first a bool is one)
    or beyond int64. Returns ``(stride, padding,
    dilation, groups, output_padding)`` as plain ints, tuples of plain ints (a 1-element list
    stands for every axis, as in torch; ``expand=False`` keeps it as torch's C++ receives it, for
    :func:`check_call`) or a padding string; or a :class:`Fallback` for what torch takes and this
    does not model (tensors, bytes)."""
    name = f"{'conv_transpose' if op == 'conv_transpose' else 'conv'}{rank}d"
    order = [("stride", stride), ("padding", padding)]
    if op == "conv_transpose":
        order += [("output_padding", output_padding), ("groups", groups), ("dilation", dilation)]
    else:
        order += [("dilation", dilation), ("groups", groups)]
    for arg, value in order:
        items = value if isinstance(value, (list, tuple)) else (value,)
        if any(isinstance(v, (torch.Tensor, bytes)) for v in items):
            return Fallback(f"a tensor or bytes as a conv's '{arg}' argument")
        ok = _is_int(value) or (arg != "groups" and isinstance(value, (list, tuple)) and
                                (not value or _is_int(value[0]))) or \
            (arg == "padding" and op != "conv_transpose" and isinstance(value, str))
        if not ok:
            kind = "int" if arg == "groups" else "tuple of ints"
            if op == "conv_transpose":   # one overload: torch names the argument
                raise TypeError(f"{name}(): argument '{arg}' must be {kind}, not "
                                f"{_tp_name(value)}")
            # Two overloads (int or string padding): torch lists the call's argument types as
            # passed (positionally, by keyword) and both signatures, which this cannot know.
            raise TypeError(f"{name}() received an invalid combination of arguments: argument "
                            f"'{arg}' must be {kind}, not {_tp_name(value)}")
    plain = {}
    for arg, value in reversed(order):   # torch unpacks them last to first
        if isinstance(value, str):
            plain[arg] = str.__str__(value)
        elif _is_int(value):
            plain[arg] = operator.index(value)
            if plain[arg] not in _INT64:
                raise ValueError("Overflow when unpacking long long")
        else:
            items = []
            for i, v in enumerate(value, start=1):
                if not isinstance(v, numbers.Integral):
                    raise TypeError(f"{name}(): argument '{arg}' failed to unpack the object at "
                                    f"pos {i} with error \"type must be tuple of ints,but got "
                                    f"{_tp_name(v)}\"")
                items.append(operator.index(v))
                if items[-1] not in _INT64:   # (torch appends a C++ backtrace to this one)
                    raise TypeError(f"{name}(): argument '{arg}' failed to unpack the object at "
                                    f"pos {i} with error \"Overflow when unpacking long long\"")
            plain[arg] = tuple(items * rank if len(items) == 1 and expand else items)
    return (plain["stride"], plain["padding"], plain["dilation"], plain["groups"],
            plain.get("output_padding", output_padding))


def _per_axis(rank, args) -> list[tuple[int, ...]] | None:
    """(stride, padding, dilation, output_padding) per axis, or None where they are not
    ``rank`` ints each (a padding string, a wrong length: the spec reports those)."""
    per_axis = [v if isinstance(v, tuple) else (v,) * rank
                for v in (args[0], args[1], args[2], args[4])]
    if any(len(v) != rank or not all(isinstance(n, int) for n in v) for v in per_axis):
        return None
    return per_axis


def overflows_int64(op, rank, input, weight, args) -> bool:
    """Whether a size torch computes from the arguments (kernel extent, padded input, output)
    leaves int64."""
    per_axis = _per_axis(rank, args)
    if per_axis is None:
        return False
    for n, k, s, p, d, o in zip(input.shape[-rank:], weight.shape[2:], *per_axis):
        extent = d * (k - 1) + 1
        sizes = (extent, n + 2 * p, (n - 1) * s - 2 * p + extent + o) if op == "conv_transpose" \
            else (extent, n + 2 * p, n + 2 * p - extent)
        if any(v not in _INT64 for v in sizes):
            return True
    return False


# ----------------------------------------------------------------------------- torch's checks
# check_call mirrors, step by step, the checks torch runs for a call past its argument parser
# (aten/src/ATen/native/Convolution.cpp): the same order, exception type and message text.
_INT64_MAX = 2 ** 63 - 1

# Tensor::dtype().name() of the dtypes it spells the same on every compiler (a demangled C++
# type name; others, 'long int' on gcc, are left to torch's op to spell).
_DTYPE_NAMES = {torch.float32: "float", torch.float64: "double", torch.float16: "c10::Half",
                torch.bfloat16: "c10::BFloat16"}


@dataclasses.dataclass(frozen=True)
class TorchDecides(Fallback):
    """A fault torch reports past its common checks, in the backend it picks for the call (by
    batch size, thread count, dtype: oneDNN or its own loops), each with its own message, some
    not at all: the caller asks torch's op, which raises or answers the call."""


def _wrap(value: int) -> int:
    """``value`` as torch's int64 arithmetic leaves it (two's complement wrap-around)."""
    return (value + 2 ** 63) % 2 ** 64 - 2 ** 63


def _half(value: int) -> int:
    """C++'s ``value / 2``: it rounds toward zero."""
    return abs(value) // 2 * (1 if value >= 0 else -1)


def check_call(name, op, rank, input, weight, bias, parsed, padding_mode="zeros"
               ) -> tuple | TorchDecides:
    """torch's checks of a call whose arguments :func:`check_arguments` parsed (``parsed``, with
    ``expand=False``), in torch's order, raising torch's exception with torch's message. Returns
    the arguments as ``check_arguments`` returns them, or a :class:`TorchDecides` for a fault
    only torch's backend reports. A transposed conv's dilation of 0, output_padding not below
    its stride or dilation, or output size below 1 pass: torch's verdict on them depends on the
    batch (``calls._prepare_call`` deals with them). With another ``padding_mode`` (nn's
    modules pad first, with F.pad's own checks) any fault is left to torch's op."""
    try:
        fault = _torch_checks(name, op, rank, input, weight, bias, parsed)
    except RuntimeError:
        if padding_mode != "zeros":
            return TorchDecides(f"a padding_mode={padding_mode!r} call failing a conv check "
                                "(F.pad checks it first)")
        raise
    if fault:
        return TorchDecides(f"{fault} (torch's backend checks it, per call)")
    return tuple(v * rank if isinstance(v, tuple) and len(v) == 1 else v for v in parsed)


def _torch_checks(name, op, rank, input, weight, bias, parsed) -> str | None:
    """torch's checks up to its backend; what the backend must judge, or None."""
    stride, padding, dilation, groups, output_padding = parsed
    transposed = op == "conv_transpose"
    string = padding if isinstance(padding, str) else None
    # conv{1,2,3}d_symint (int padding; conv*_padding_symint and conv_transpose*d have no such
    # check): the bias's dtype, before anything else.
    if bias is not None and bias.dtype != input.dtype and not transposed and string is None:
        names = _DTYPE_NAMES.get(input.dtype), _DTYPE_NAMES.get(bias.dtype)
        if None in names:
            return "a bias of another dtype than the input"
        raise RuntimeError(f"Input type ({names[0]}) and bias type ({names[1]}) should be the "
                           "same")
    # batchify: an unbatched input runs as a batch of one (the messages below show it so).
    if input.dim() not in (rank + 1, rank + 2):
        raise RuntimeError(f"Expected {rank + 1}D (unbatched) or {rank + 2}D (batched) input "
                           f"to {name}, but got input of size: {list(input.shape)}")
    shape = list(input.shape) if input.dim() == rank + 2 else [1, *input.shape]

    def as_list(value):   # the parser makes an int a list of `rank` (the signature's int[N])
        return list(value) if isinstance(value, tuple) else [value] * rank
    stride, dilation = as_list(stride), as_list(dilation)
    if string is None:
        padding = as_list(padding)
        # conv{1,2,3}d pass output_padding as literal zeros, one per axis of their rank.
        output_padding = as_list(output_padding) if transposed else [0] * rank
    elif string == "valid":   # _convolution_mode_symint: padding {0}, output_padding {0}
        padding, output_padding = [0], [0]
    elif string == "same":
        same = _convolution_same(shape, weight, stride, dilation, groups)
        if same is None:
            return "a padding='same' that crops the input"
        shape, padding = same
        output_padding = [0] * len(padding)
    else:   # _convolution_mode_symint, after batchify
        raise RuntimeError(f"Invalid padding string: '{string}'")
    stride, padding, dilation, output_padding = _convolution(
        shape, weight, stride, padding, dilation, output_padding, groups)
    _check_shape_forward(shape, weight, bias, padding, output_padding, stride, dilation, groups,
                         transposed)
    # _select_conv_backend: an empty batch or no channels skip the backends (and their
    # checks); other empty inputs are refused, a 1-D one shown as the 2-D one it runs as
    # (ConvParams::view1d_as_2d).
    if shape[0] and shape[1] and 0 in shape[2:]:
        shown = [*shape[:2], 1, *shape[2:]] if len(shape) == 3 else shape
        raise RuntimeError("Only zero batch or zero channel inputs are supported, but got "
                           f"input shape: {shown}")
    # The backends' own checks: which comes first, its words, and whether it is one at all
    # (an empty batch skips them, oneDNN runs what torch's loops refuse) depend on the backend.
    if weight.dtype != input.dtype:
        return "a weight of another dtype than the input"
    if bias is not None and bias.dtype != input.dtype:
        return "a bias of another dtype than the input"
    if 0 in weight.shape[2:]:
        return "a kernel of size 0"
    if transposed and any(abs(v) > 2 ** 31 - 1 for v in (*stride, *padding, *dilation,
                                                          *output_padding)):
        return "a transposed conv's argument beyond int32 (its backends truncate it)"
    if not transposed and 0 in dilation:
        return "a dilation of 0"
    return None


def _convolution_same(shape, weight, stride, dilation, groups):
    """at::native::convolution_same: its checks, then the padding torch computes per axis
    (``total = d * (k - 1)``, ``left = total / 2``; constant_pad_nd first pads the odd
    remainder onto the input's end, or crops it for a negative dilation). Returns the input's
    shape so padded and the padding; None where the crop would leave less than nothing
    (constant_pad_nd's error)."""
    k = weight.dim()
    if k <= 2:
        raise RuntimeError("weight should have at least three dimensions")
    if groups <= 0:
        raise RuntimeError("non-positive groups is not supported")
    dim = k - 2
    if k != len(shape):   # (no space before the weight's size, unlike check_shape_forward's)
        raise RuntimeError(f"Expected {k}-dimensional input for {k}-dimensional weight"
                           f"{list(weight.shape)}, but got {len(shape)}-dimensional input of "
                           f"size {shape} instead")
    if len(stride) not in (dim, 1):
        raise RuntimeError(f"stride cannot broadcast to {dim} dimensions")
    if len(dilation) not in (dim, 1):
        raise RuntimeError(f"dilation cannot broadcast to {dim} dimensions")
    if any(s != 1 for s in stride):
        raise RuntimeError("padding='same' is not supported for strided convolutions")
    shape, left = list(shape), []
    for i in range(dim):
        d = dilation[0] if len(dilation) == 1 else dilation[i]
        total = _wrap(d * (weight.shape[i + 2] - 1))     # pooling_same_mode_padding_lr
        left.append(_half(total))
        shape[i + 2] = _wrap(shape[i + 2] + total - 2 * left[-1])
        if shape[i + 2] < 0:
            return None
    return shape, left


def _convolution(shape, weight, stride, padding, dilation, output_padding, groups):
    """at::native::_convolution up to check_shape_forward: the weight's rank, the groups, and
    each list argument expanded to the weight's spatial rank (expand_param_if_needed)."""
    dim = weight.dim() - 2
    if dim <= 0:
        raise RuntimeError("weight should have at least three dimensions")
    if groups <= 0:
        raise RuntimeError("non-positive groups is not supported")
    expanded = []
    for what, values in (("stride", stride), ("padding", padding), ("dilation", dilation),
                         ("output_padding", output_padding)):
        if len(values) != 1 and len(values) != dim:
            raise RuntimeError(f"expected {what} to be a single integer value or a list of {dim} "
                               "values to match the convolution dimensions, but got "
                               f"{what}={list(values)}")
        expanded.append(list(values) * dim if len(values) == 1 else list(values))
    return expanded


def _check_shape_forward(shape, weight, bias, padding, output_padding, stride, dilation, groups,
                         transposed) -> None:
    """check_shape_forward (``shape``: the input's, batched)."""
    w = list(weight.shape)
    if any(p < 0 for p in padding):
        raise RuntimeError("negative padding is not supported")
    if any(p < 0 for p in output_padding):
        raise RuntimeError("negative output_padding is not supported")
    if any(s <= 0 for s in stride):
        raise RuntimeError("non-positive stride is not supported")
    if any(d < 0 for d in dilation):   # (a dilation of 0 is the backends' to refuse)
        raise RuntimeError("dilation should be greater than zero")
    if len(w) != len(shape):
        raise RuntimeError(f"Expected {len(w)}-dimensional input for {len(w)}-dimensional weight "
                           f"{w}, but got {len(shape)}-dimensional input of size {shape} instead")
    if w[0] < groups:
        raise RuntimeError(f"Given groups={groups}, expected weight to be at least {groups} at "
                           f"dimension 0, but got weight of size {w} instead")
    if w[0] % groups:   # (torch's message wraps the size in a second pair of brackets)
        raise RuntimeError(f"Given groups={groups}, expected weight to be divisible by {groups} "
                           f"at dimension 0, but got weight of size [{w}] instead")

    def check_padding(i):
        if padding[i] > _INT64_MAX - padding[i]:
            raise RuntimeError(f"Given padding={padding[i]} at dimension {i} , expected padding "
                               f"to be at most {_INT64_MAX // 2}")
    bias_shape = None if bias is None else list(bias.shape)
    if transposed:
        for i in range(len(padding)):
            check_padding(i)
        if shape[1] != w[0]:
            raise RuntimeError(f"Given transposed=1, weight of size {w}, expected input{shape} to "
                               f"have {w[0]} channels, but got {shape[1]} channels instead")
        if bias_shape is not None and bias_shape != [w[1] * groups]:
            raise RuntimeError(f"Given transposed=1, weight of size {w}, expected bias to be "
                               f"1-dimensional with {w[1] * groups} elements, but got bias of "
                               f"size {bias_shape} instead")
        return
    if shape[1] != w[1] * groups:
        raise RuntimeError(f"Given groups={groups}, weight of size {w}, expected input{shape} to "
                           f"have {w[1] * groups} channels, but got {shape[1]} channels instead")
    if bias_shape is not None and bias_shape != [w[0]]:
        raise RuntimeError(f"Given weight of size {w}, expected bias to be 1-dimensional with "
                           f"{w[0]} elements, but got bias of size {bias_shape} instead")
    padded, extents = [], []
    for i in range(len(padding)):
        check_padding(i)
        padded.append(_wrap(shape[i + 2] + 2 * padding[i]))
        extents.append(_wrap(dilation[i] * (w[i + 2] - 1) + 1))
    if any(n < e for n, e in zip(padded, extents)):
        raise RuntimeError(f"Calculated padded input size per channel: "
                           f"({' x '.join(map(str, padded))}). Kernel size: "
                           f"({' x '.join(map(str, extents))}). Kernel size can't be greater "
                           "than actual input size")


def degenerate_transpose(rank, input, weight, args) -> tuple[tuple, Callable, tuple] | None:
    """A transposed conv torch's CPU op runs where it picks oneDNN and rejects on its own
    loops (:func:`_onednn_transpose`): a dilation of 0 on an axis whose kernel has one tap
    (1-D and 2-D), or an output size of 0. Returns the arguments with those dilations 1 (the
    same conv: one tap spans one element whatever its dilation), the check a call must pass
    (raising torch's message where its own loops would run it) and the output's spatial size;
    None for any other call."""
    per_axis = _per_axis(rank, args)
    if per_axis is None:
        return None
    stride, padding, dilation, output_padding = per_axis
    kernel, size = tuple(weight.shape[2:]), tuple(input.shape[-rank:])
    if any(d < 0 or d == 0 and (k != 1 or rank == 3) for d, k in zip(dilation, kernel)):
        return None
    plain = tuple(d or 1 for d in dilation)
    out = tuple((n - 1) * s - 2 * p + d * (k - 1) + o + 1 for n, s, p, d, k, o in
                zip(size, stride, padding, plain, kernel, output_padding))
    if all(dilation) and all(out) or min(out) < 0 or min(size) < 1 or min(stride) < 1 or \
            min(padding) < 0 or any(not 0 <= o < max(s, d) for o, s, d in
                                    zip(output_padding, stride, plain)):
        return None

    def shown(values):      # torch's CPU op runs a 1-D conv as a 2-D one of height 1
        return (1, *values) if rank == 1 else tuple(values)
    if not all(dilation):
        names = ("dilation_depth", "dilation_height", "dilation_width")[-len(shown(dilation)):]
        error = "dilation should be greater than zero, but got " + ", ".join(
            f"{name}: {d}" for name, d in zip(names, shown(dilation)))
    else:
        error = (f"Given input size per channel: ({' x '.join(map(str, shown(size)))}). "
                 f"Calculated output size per channel: ({' x '.join(map(str, shown(out)))}). "
                 "Output size is too small")
    onednn = _onednn_transpose(input, weight, stride, dilation, output_padding, args[3], rank)
    on_cpu = input.device.type == "cpu"     # (the closure keeps no tensor alive)

    def check(x: torch.Tensor) -> None:   # x: the batched input
        if on_cpu and x.shape[0] and not onednn(x.shape[0]):   # (an empty batch passes)
            raise RuntimeError(error)
    return (args[0], args[1], plain, *args[3:]), check, out


def _onednn_transpose(input, weight, stride, dilation, output_padding, groups, rank):
    """Whether torch's CPU transposed conv runs a batch of ``n`` on oneDNN (which lets the
    degenerate calls above through) rather than its own loops (which reject them): its
    ``ConvParams::use_mkldnn``, for float32 on the CPU, with a 1-D conv seen as 2-D."""
    if input.dtype != torch.float32 or any(o >= s for o, s in zip(output_padding, stride)):
        return lambda n: False
    spatial = (1, *input.shape[-1:]) if rank == 1 else tuple(input.shape[-rank:])
    taps = (1, *weight.shape[-1:]) if rank == 1 else tuple(weight.shape[-2:])
    shaped = any(s != 1 for s in stride) or any(d != 1 for d in dilation) or taps != (1, 1)
    big = groups > 1 or (taps[0] > 3 and taps[1] > 3)
    per_sample = input.shape[-rank - 1] * spatial[0] * spatial[1]

    def onednn(n: int) -> bool:
        return (shaped or n >= 16 or torch.get_num_threads() > 1) and \
            (big or n > 1 or n * per_sample > 20480)
    return onednn


def scalar_name(dtype: torch.dtype) -> str:
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
            torch.bfloat16: "BFloat16"}.get(dtype, str(dtype).removeprefix("torch."))
