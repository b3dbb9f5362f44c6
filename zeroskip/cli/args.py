"""Argument-parsing helpers the commands share: argparse types, the operator flags' spec, and
the layers files of ``tune --specs`` and ``generate``."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..spec import LayerSpec, Workload

FORWARD = ("conv", "conv_transpose")      # the ops the autotuner covers
DENSITIES = (1.0, 0.5, 0.3, 0.1, 0.05)


def _padding(text: str):
    if text in ("same", "valid"):
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int, 'same' or 'valid', got {text!r}")


def _per_axis(values: list, rank: int, flag: str, parser: argparse.ArgumentParser):
    """One value for every axis, or exactly ``rank`` values."""
    if len(values) == 1:
        return values[0] if isinstance(values[0], str) else (values[0],) * rank
    if len(values) != rank or any(isinstance(v, str) for v in values):
        parser.error(f"{flag} takes 1 or {rank} ints for a {rank}-d operator, got {values}")
    return tuple(values)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def _comma_values(text: str, convert, valid, expected: str) -> tuple:
    """``text``'s comma-separated values, each converted and valid; else argparse's error."""
    try:
        values = tuple(convert(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(valid(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected {expected} separated by commas, got {text!r}")
    return values


def _densities(text: str) -> tuple[float, ...]:
    return _comma_values(text, float, lambda v: 0 < v <= 1, "densities in (0, 1]")


def _input_shape(text: str) -> tuple[int, ...]:
    return _comma_values(text, int, lambda v: v >= 1, "positive ints (e.g. 1,3,224,224)")


def _comma_list(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",")]
    if not all(values):
        raise argparse.ArgumentTypeError(f"expected names separated by commas, got {text!r}")
    return list(dict.fromkeys(values))


DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
               "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _dtypes(text: str) -> tuple[str, ...]:
    names = [v.strip().lower() for v in text.split(",")]
    if not names or not all(n in DTYPE_NAMES for n in names):
        raise argparse.ArgumentTypeError(f"expected float32, float16 or bfloat16 separated by "
                                         f"commas, got {text!r}")
    return tuple(dict.fromkeys(DTYPE_NAMES[n] for n in names))


def spec_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser
                   ) -> tuple[LayerSpec, Workload]:
    """The layer and its workload (``--batch``, ``--density``) the arguments describe."""
    rank = int(args.op[-2])
    if len(args.input_size) != rank:
        parser.error(f"--input-size takes {rank} ints for {args.op}, got {args.input_size}")
    common = dict(bias=not args.no_bias, dtype=args.dtype, input_size=tuple(args.input_size))
    kernel = _per_axis(args.kernel, rank, "--kernel", parser)
    stride = _per_axis(args.stride, rank, "--stride", parser)
    padding = _per_axis(args.padding, rank, "--padding", parser)
    dilation = _per_axis(args.dilation, rank, "--dilation", parser)
    try:
        if args.op.startswith("conv_transpose"):
            spec = LayerSpec.conv_transpose(
                args.in_channels, args.out_channels, kernel, stride, padding,
                _per_axis(args.output_padding, rank, "--output-padding", parser), args.groups,
                dilation=dilation, padding_mode=args.padding_mode, **common)
        else:
            if args.output_padding != [0]:
                parser.error("--output-padding applies to conv_transpose operators only")
            spec = LayerSpec.conv(args.in_channels, args.out_channels, kernel, stride, padding,
                                  dilation, args.groups, padding_mode=args.padding_mode,
                                  **common)
        if args.grad == "input":
            # --density then describes the incoming gradient, the operator's data operand.
            spec = spec.grad_input()
        elif args.grad == "weight":
            spec = spec.grad_weight()
        return spec, Workload(args.batch, args.density).check(spec)
    except (ValueError, RuntimeError, TypeError) as exc:
        parser.error(str(exc))


def _spec_file(path: Path, parser: argparse.ArgumentParser, flag: str = "--specs",
               named: bool = False, forward_only: bool = True
               ) -> list[tuple[str, LayerSpec, Workload]]:
    """``(name, spec, workload)`` of the layers of a ``--specs`` file (``zeroskip trace``'s files
    too); exits 2 (naming the file)
    where it cannot be read or holds anything but a non-empty list of forward layers. With
    ``named``, an object of layers by name is taken too; without ``forward_only``, any op."""
    prefix = f"{flag}: " if flag else ""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        parser.error(f"{prefix}cannot read {path}: {exc.strerror}")
    except ValueError as exc:
        parser.error(f"{prefix}{path} is not JSON: {exc}")
    from ..trace import parse_layers   # zeroskip trace's layers files are taken too
    try:
        layers = parse_layers(data, path, named=named)
    except ValueError as exc:
        parser.error(f"{prefix}{exc}")
    for i, (name, spec, _) in enumerate(layers):
        if forward_only and spec.op not in FORWARD:
            where = f"layer {i}" if isinstance(data, list) else f"layer {name!r}"
            parser.error(f"{prefix}{path}, {where}: tuning covers conv and conv_transpose, "
                         f"not {spec.op}")
    return layers
