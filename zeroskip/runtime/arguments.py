"""torch's argument checks for a convolution call, and a call's arguments as one config string.

:func:`check_arguments` parses the non-tensor arguments as torch's parser does (same exception
types and words, same order), :func:`check_shapes` the tensors' shapes; :func:`config_of` writes
the checked arguments as the custom ops' config string (a schema has no type for an int, a tuple
of ints or pairs, or 'same'; torch.compile guards on a constant string), :func:`parse_config`
reads it back and :func:`spec_of_call` builds the call's :class:`LayerSpec`.
"""
from __future__ import annotations

import ast
import functools
import numbers
import operator
from typing import Any

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


def check_arguments(op, rank, stride, padding, dilation, groups, output_padding
                    ) -> tuple | Fallback:
    """torch's argument parser on the non-tensor arguments. First the overloads: TypeError where
    an argument has a type torch takes for none of them (a bool, a float, None, a string but
    conv's padding; of a list torch looks at the first element only). Then each argument in the
    reverse of the signature's order (as torch's C++ evaluates them): ValueError for an int
    beyond int64, TypeError for a list element that is no int (after the first a bool is one)
    or beyond int64. Returns ``(stride, padding,
    dilation, groups, output_padding)`` as plain ints, tuples of plain ints (a 1-element list
    stands for every axis, as in torch) or a padding string; or a :class:`Fallback` for what
    torch takes and this does not model (tensors, bytes)."""
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
            raise TypeError(f"{name}() received an invalid combination of arguments: argument "
                            f"'{arg}' must be {'int' if arg == 'groups' else 'tuple of ints'}"
                            f", not {type(value).__name__}")
    plain = {}
    for arg, value in reversed(order):   # torch unpacks them last to first
        if isinstance(value, str):
            plain[arg] = str.__str__(value)
        elif _is_int(value):
            plain[arg] = operator.index(value)
            if plain[arg] not in _INT64:
                raise ValueError(f"{name}(): argument '{arg}': Overflow when unpacking long long")
        else:
            items = []
            for i, v in enumerate(value, start=1):
                if not isinstance(v, numbers.Integral):
                    raise TypeError(f"{name}(): argument '{arg}' failed to unpack the object at "
                                    f"pos {i} with error \"type must be tuple of ints,but got "
                                    f"{type(v).__name__}\"")
                items.append(operator.index(v))
                if items[-1] not in _INT64:
                    raise TypeError(f"{name}(): argument '{arg}' failed to unpack the object at "
                                    f"pos {i} with error \"Overflow when unpacking long long\"")
            plain[arg] = tuple(items * rank if len(items) == 1 else items)
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


def check_shapes(name, op, rank, input, weight, bias, groups) -> None:
    """torch's checks of the tensors' shapes, with torch's messages (RuntimeError)."""
    if input.dim() not in (rank + 1, rank + 2):
        raise RuntimeError(f"Expected {rank + 1}D (unbatched) or {rank + 2}D (batched) input to "
                           f"{name}, but got input of size: {list(input.shape)}")
    if weight.dim() != rank + 2:
        raise RuntimeError(f"{name}: expected weight to be {rank + 2}-dimensional, but got "
                           f"weight of size {list(weight.shape)}")
    if not isinstance(groups, int) or isinstance(groups, bool):
        raise TypeError(f"{name}(): argument 'groups' must be int, not {type(groups).__name__}")
    if groups <= 0:
        raise RuntimeError(f"non-positive groups is not supported (groups={groups})")
    if weight.shape[0] % groups:
        raise RuntimeError(f"Given groups={groups}, expected weight to be divisible by {groups} "
                           f"at dimension 0, but got weight of size {list(weight.shape)} instead")
    channels = input.shape[-rank - 1]
    if op == "conv_transpose":
        expected, out = weight.shape[0], weight.shape[1] * groups
        what = "transposed=1"
    else:
        expected, out = weight.shape[1] * groups, weight.shape[0]
        what = f"groups={groups}"
    if channels != expected:
        raise RuntimeError(f"Given {what}, weight of size {list(weight.shape)}, expected "
                           f"input{list(input.shape)} to have {expected} channels, but got "
                           f"{channels} channels instead")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != out):
        raise RuntimeError(f"Given weight of size {list(weight.shape)}, expected bias to be "
                           f"1-dimensional with {out} elements, but got bias of size "
                           f"{list(bias.shape)} instead")


def scalar_name(dtype: torch.dtype) -> str:
    return {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
            torch.bfloat16: "BFloat16"}.get(dtype, str(dtype).removeprefix("torch."))
