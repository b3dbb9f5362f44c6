"""The ``zeroskip`` command line: ``explain`` one operator, ``demo`` the built-in networks,
``bench`` the generated kernels against torch, ``tune`` them into the tuning database,
``generate`` them ahead of time for GPU targets, ``trace`` a model's conv layers into a layers
file."""
from __future__ import annotations

import argparse

from . import bench, demo, explain, generate, trace, tune
from .args import _spec_file  # noqa: F401  (imported from here by tests)

COMMANDS = (explain, demo, bench, tune, generate, trace)   # in the order of --help


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zeroskip", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args, args.subparser)
