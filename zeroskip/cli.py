"""The ``zeroskip`` command line: ``explain`` one operator, ``demo`` the built-in networks,
``bench`` the generated kernels against torch."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .codegen.ir import to_dot
from .spec import PADDING_MODES, LayerSpec

OPS = [f"{base}{rank}d" for base in ("conv", "conv_transpose") for rank in (1, 2, 3)]


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


def spec_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> LayerSpec:
    rank = int(args.op[-2])
    if len(args.input_size) != rank:
        parser.error(f"--input-size takes {rank} ints for {args.op}, got {args.input_size}")
    common = dict(bias=not args.no_bias, dtype=args.dtype, input_size=tuple(args.input_size),
                  batch=args.batch, density=args.density)
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
            spec = spec.grad_input(density=args.density)
        elif args.grad == "weight":
            spec = spec.grad_weight()
    except (ValueError, RuntimeError, TypeError) as exc:
        parser.error(str(exc))
    return spec


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zeroskip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser("explain", help="run the passes on one operator and report MACs skipped",
                        description="Compile one operator through the passes; print the MACs "
                                    "before and after each pass, the share skipped and the "
                                    "strategy. Flags follow torch's argument names.")
    ex.add_argument("--op", required=True, choices=OPS)
    ex.add_argument("--in", dest="in_channels", type=int, required=True, metavar="C")
    ex.add_argument("--out", dest="out_channels", type=int, required=True, metavar="C")
    ex.add_argument("--kernel", type=int, nargs="+", required=True, metavar="K")
    ex.add_argument("--input-size", type=int, nargs="+", required=True, metavar="N")
    ex.add_argument("--stride", type=int, nargs="+", default=[1], metavar="S")
    ex.add_argument("--padding", type=_padding, nargs="+", default=[0], metavar="P")
    ex.add_argument("--dilation", type=int, nargs="+", default=[1], metavar="D")
    ex.add_argument("--output-padding", type=int, nargs="+", default=[0], metavar="P")
    ex.add_argument("--groups", type=int, default=1)
    ex.add_argument("--padding-mode", choices=PADDING_MODES, default="zeros")
    ex.add_argument("--no-bias", action="store_true")
    ex.add_argument("--batch", type=int, default=1)
    ex.add_argument("--density", type=float, default=1.0,
                    help="expected share of non-zeros of the operator's data operand: the "
                         "input, or with --grad input the output gradient (default 1.0)")
    ex.add_argument("--dtype", default="float32")
    ex.add_argument("--grad", choices=("input", "weight"),
                    help="explain the backward operator for this input instead")
    ex.add_argument("--json", action="store_true", help="print the report as JSON")
    ex.add_argument("--graphs", action="store_true", help="with --json: include every graph")
    ex.add_argument("--dot", type=Path, metavar="FILE", help="write the final graph as DOT")
    ex.add_argument("--dump", type=Path, metavar="DIR",
                    help="write every step's graph (JSON and DOT) under DIR")
    ex.set_defaults(subparser=ex)

    sub.add_parser("demo", help="run the built-in networks on generated kernels, check them "
                                "against torch, print each layer's MACs skipped and times")

    be = sub.add_parser("bench", help="time each layer of the benchmark suite against torch",
                        description="Check each layer of the suite against torch, then time "
                                    "both side by side (median of repeats, warm cache); print "
                                    "the ratios, GFLOP/s over non-zero MACs, cold compile "
                                    "times and the per-call overhead as a markdown table; "
                                    "with --backward, the times of one training step and the "
                                    "MACs skipped over forward and backward.")
    be.add_argument("--quick", action="store_true", help="only the quick subset of the suite")
    be.add_argument("--layers", nargs="+", metavar="SUBSTR",
                    help="only the layers whose name or family contains one of these")
    be.add_argument("--batch", type=_positive, default=1)
    be.add_argument("--repeats", type=_positive, default=7, metavar="R",
                    help="timed rounds per layer, the median is reported (default 7)")
    be.add_argument("--threads", type=_positive, metavar="T",
                    help="threads for torch and the kernels (default: torch's)")
    be.add_argument("--backward", action="store_true",
                    help="time one training step (forward + backward) of each layer instead, "
                         "and the input gradient alone of strided convs")
    be.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON")
    be.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table")
    be.set_defaults(subparser=be)
    return parser


def bench_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from . import bench
    layers = bench.select(args.quick, args.layers)
    if not layers:
        parser.error(f"no layer of the suite matches --layers {' '.join(args.layers)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    run = bench.run_backward if args.backward else bench.run
    report = run(layers, args.batch, args.repeats, log=sys.stderr)
    text = report.markdown()
    print(text)
    for flag, path, content in (("--json", args.json, report.to_json()),
                                ("--markdown", args.markdown, text)):
        if path:
            try:
                path.write_text(content + "\n")
            except OSError as exc:
                parser.error(f"{flag}: cannot write {path}: {exc.strerror}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from . import demo
        return 0 if demo.run(sys.stdout) else 1
    if args.command == "bench":
        return bench_main(args, args.subparser)

    from .explain import explain
    parser = args.subparser
    spec = spec_from_args(args, parser)
    report = explain(spec, dump_dir=args.dump)
    if args.dot:
        try:
            args.dot.write_text(to_dot(report.graph))
        except OSError as exc:
            parser.error(f"--dot: cannot write {args.dot}: {exc.strerror}")
    print(report.to_json(graphs=args.graphs) if args.json else report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
