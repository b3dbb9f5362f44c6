"""Field values of a spec, parsed as the spec needs them: every int a plain ``int`` (an int
subclass or numpy int converted with ``operator.index``, never formatted), every choice the
canonical constant of its fixed tuple, padding as per-axis (lo, hi) pairs. Errors name the
field, with the exception type torch raises for the same mistake (see :mod:`zeroskip.spec`).
"""
from __future__ import annotations

import math
import numbers
import operator
from typing import Any, Sequence

def _show(value: Any) -> str:
    """``repr(value)`` for an error message, short, and safe from a repr that raises."""
    plain = {str: str.__repr__, int: int.__repr__, float: float.__repr__}
    try:
        base = next((b for b in plain if isinstance(value, b) and not isinstance(value, bool)),
                    None)
        text = plain[base](value) if base else repr(value)
    except Exception:
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= 120 else text[:117] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _int(value: Any, field: str) -> int:
    """``value`` as a plain int: ``operator.index`` reads an int subclass's value (never its
    ``__index__``, ``__int__``, ``__str__`` or ``__format__``) and calls a numpy int's."""
    if not _is_int(value):
        raise TypeError(f"{field} must be an int, got {type(value).__name__} {_show(value)}")
    try:
        plain = operator.index(value)
    except Exception as exc:   # an Integral whose __index__ fails is no int to us
        raise TypeError(f"{field} must be an int, got {type(value).__name__}: {exc}") from None
    return int.__index__(plain)


def _int_tuple(value: Any, field: str) -> tuple[int, ...]:
    """A list or tuple of ints as a tuple of plain ints (its length is checked by the caller)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{field} must be a tuple of ints, got {type(value).__name__} "
                        f"{_show(value)}")
    items = tuple(value)   # one snapshot: a sequence that changes as it is read is read once
    if not all(_is_int(v) for v in items):
        raise TypeError(f"{field} must contain only ints, got {_show(items)}")
    return tuple(_int(v, field) for v in items)


def _choice(value: Any, choices: tuple[str, ...], field: str) -> str:
    """The constant of ``choices`` that ``value`` spells, compared as plain text (a ``str``
    subclass's ``__eq__``, ``__hash__`` and ``__str__`` are never called); ValueError else."""
    text = str.__str__(value) if isinstance(value, str) else None
    for choice in choices:
        if text is not None and str.__eq__(choice, text):
            return choice
    raise ValueError(f"{field} must be one of {list(choices)}, but got {field}={_show(value)}")


def _ints(value: Any, rank: int, field: str) -> tuple[int, ...]:
    """An int or a sequence of ``rank`` ints, as a tuple (torch's ``_ntuple``)."""
    if _is_int(value):
        return (_int(value, field),) * rank
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{field} must be an int or a tuple of {rank} ints, got {_show(value)}")
    items = _int_tuple(value, field)
    if len(items) != rank:
        raise ValueError(f"{field} must have {rank} elements for a {rank}-d convolution, "
                         f"got {len(items)}: {items!r}")
    return items


def _rank_of(*values: Any) -> int:
    """Spatial rank: the length of the first sequence among the arguments, else 1."""
    for value in values:
        if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
            try:
                return len(value)
            except Exception as exc:   # a sequence whose __len__ fails or is no int
                raise TypeError(f"cannot take the length of {type(value).__name__}: {exc}") \
                    from None
    return 1


def normalize_padding(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...],
                       stride: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
    """Padding as one ``(lo, hi)`` pair per axis; 'same' pads like torch (extra on the high side)."""
    rank = len(kernel)
    if isinstance(padding, str):
        padding = str.__str__(padding)   # plain text: a subclass's __eq__ is not consulted
        if padding == "valid":
            return ((0, 0),) * rank
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError("padding='same' is not supported for strided convolutions "
                                 f"(stride={stride})")
            pairs = []
            for k, d in zip(kernel, dilation):
                total = d * (k - 1)
                pairs.append((total // 2, total - total // 2))
            return tuple(pairs)
        raise ValueError(f"Invalid padding string {padding!r}, should be one of ('valid', 'same')")
    if isinstance(padding, Sequence) and not isinstance(padding, bytes):
        items = tuple(padding)
        if len(items) == rank and any(isinstance(p, Sequence) for p in items):
            return _pairs(items, rank)
        padding = items
    return tuple((p, p) for p in _ints(padding, rank, "padding"))


def _pairs(value: Any, rank: int) -> tuple[tuple[int, int], ...]:
    """``rank`` (lo, hi) pairs of plain ints; a plain int stands for (p, p)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"padding must be {rank} (lo, hi) pairs of ints, got {_show(value)}")
    items = tuple(value)
    if len(items) != rank:
        raise ValueError(f"padding must be {rank} (lo, hi) pairs of ints, got {_show(items)}")
    pairs = []
    for p in items:
        if _is_int(p):
            pairs.append((_int(p, "padding"),) * 2)
            continue
        pair = _int_tuple(p, "padding")
        if len(pair) != 2:
            raise ValueError(f"padding must give an int or a (lo, hi) pair of ints per axis, "
                             f"got {_show(items)}")
        pairs.append(pair)
    return tuple(pairs)


def _density(value: Any, name: str = "density") -> float:
    """A finite float in [0, 1] (ValueError else, as for any density out of range), for the
    field ``name``."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise ValueError(f"{name} must be a number in [0, 1], got {type(value).__name__} "
                         f"{_show(value)}")
    try:   # a float subclass's own value (never its __float__), as ints are read
        density = float.__float__(value) if isinstance(value, float) else \
            float(operator.index(value)) if _is_int(value) else float(value)
    except Exception:   # an int too large for a float, a failing __float__
        raise ValueError(f"{name} must be a number in [0, 1], got {_show(value)}") from None
    if not (math.isfinite(density) and 0.0 <= density <= 1.0):
        raise ValueError(f"{name} must be a number in [0, 1], got {name}={density!r}")
    return density


def _fmt(values: tuple[int, ...]) -> str:
    return str(values[0]) if len(set(values)) == 1 else "x".join(map(str, values))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value
