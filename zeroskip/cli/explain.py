"""``zeroskip explain``: compile one operator through the passes and report the MACs skipped."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..spec import PADDING_MODES
from .args import _padding, spec_from_args

OPS = [f"{base}{rank}d" for base in ("conv", "conv_transpose") for rank in (1, 2, 3)]


def add_parser(sub) -> argparse.ArgumentParser:
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
    ex.set_defaults(handler=main, subparser=ex)
    return ex


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..codegen.ir import to_dot
    from ..explain import explain
    spec, workload = spec_from_args(args, parser)
    report = explain(spec, workload, dump_dir=args.dump)
    if args.dot:
        try:
            args.dot.write_text(to_dot(report.graph))
        except OSError as exc:
            parser.error(f"--dot: cannot write {args.dot}: {exc.strerror}")
    print(report.to_json(graphs=args.graphs) if args.json else report)
    return 0
