"""``zeroskip trace``: run a model on sample inputs and write each conv layer's spec with its
measured input density to a layers file."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..spec import LayerSpec
from .args import _input_shape, _positive

TRACE_DEFAULT, TRACE_DEFAULT_SHAPE = "zeroskip.models:resnet_stage", (4, 64, 32, 32)


def add_parser(sub) -> argparse.ArgumentParser:
    tr = sub.add_parser("trace", help="run a model on sample inputs and write each conv layer's "
                                      "spec with its measured input density",
                        description="Build the model, run it (eval mode) on --batches random "
                                    "normal batches of --input-shape with a hook on every "
                                    "convolution, back-propagate random normal output "
                                    "gradients to the input (the model's .grad untouched), and "
                                    "write each layer's LayerSpec (with the ReLU fused where "
                                    "zeroskip.convert fuses it), its input density and its "
                                    "output gradient's density (mean, std, min, max over the "
                                    "calls) to a layers file for zeroskip generate.")
    tr.add_argument("factory", nargs="?", metavar="MODULE:FACTORY",
                    help="an importable function or class returning the nn.Module, called "
                         f"without arguments (default: {TRACE_DEFAULT} on "
                         f"{','.join(map(str, TRACE_DEFAULT_SHAPE))})")
    tr.add_argument("--input-shape", type=_input_shape, metavar="N,C,...",
                    help="the model's input shape, batch first, e.g. 1,3,224,224 (needed with "
                         "MODULE:FACTORY)")
    tr.add_argument("--batches", type=_positive, default=4, metavar="N",
                    help="sample batches to run, each a fresh draw (default 4)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the samples (default 0)")
    tr.add_argument("--no-fuse-relu", action="store_true",
                    help="specs for convert(model, fuse_relu=False): no fused ReLU")
    tr.add_argument("--no-gradients", action="store_true",
                    help="forward only (no output-gradient densities)")
    tr.add_argument("-o", "--out", type=Path, default=Path("layers.json"), metavar="FILE",
                    help="the layers file to write (default layers.json)")
    tr.set_defaults(handler=main, subparser=tr)
    return tr


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import os

    from .. import trace
    target, shape = args.factory, args.input_shape
    if target is None:
        target, shape = TRACE_DEFAULT, shape or TRACE_DEFAULT_SHAPE
    # Like `python -m`, import the factory's module from the working directory too (a console
    # script's sys.path starts at its own folder).
    added = os.getcwd() not in sys.path and "" not in sys.path
    if added:
        sys.path.insert(0, os.getcwd())
    try:
        trace.load_factory(target)      # a bad name is reported before a missing shape
        if shape is None:
            parser.error(f"--input-shape is needed to trace {target} (e.g. --input-shape "
                         "1,3,224,224)")
        model = trace.build_model(target)
        data = trace.trace(model, shape, args.batches, args.seed,
                           fuse_relu=not args.no_fuse_relu, name=target,
                           gradients=not args.no_gradients)
    except (ValueError, ImportError, AttributeError, TypeError, trace.TraceError) as exc:
        parser.error(str(exc))
    finally:
        if added:
            sys.path.remove(os.getcwd())
    try:
        trace.write_layers(data, args.out)
    except OSError as exc:
        parser.error(f"--out: cannot write {args.out}: {exc.strerror or exc}")
    width = max(len(layer["name"]) for layer in data["layers"])
    for layer in data["layers"]:
        spec = LayerSpec.from_dict(layer["spec"])
        density = layer["density"]
        grad = layer.get("grad_density")
        print(f"{layer['name']:<{width}}  {spec.describe(layer['batch'])}  density "
              f"{density['mean']:.3f} ± {density['std']:.3f}"
              + (f", output gradient {grad['mean']:.3f}" if grad else ""))
    print(f"{len(data['layers'])} conv layers of {target} written to {args.out}")
    return 0
