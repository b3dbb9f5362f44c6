"""``zeroskip demo``: the built-in networks on generated kernels, checked against torch."""
from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> argparse.ArgumentParser:
    de = sub.add_parser("demo", help="run the built-in networks on generated kernels, check them "
                                     "against torch, print each layer's MACs skipped and times")
    de.set_defaults(handler=main, subparser=de)
    return de


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .. import demo
    return 0 if demo.run(sys.stdout) else 1
