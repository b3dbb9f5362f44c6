"""The ``zeroskip`` command line: ``explain`` one operator, ``demo`` the built-in networks,
``bench`` the generated kernels against torch, ``tune`` them into the tuning database."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .codegen.ir import to_dot
from .spec import PADDING_MODES, LayerSpec

OPS = [f"{base}{rank}d" for base in ("conv", "conv_transpose") for rank in (1, 2, 3)]
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


def _densities(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if not values or not all(0 < v <= 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected densities in (0, 1] separated by commas, "
                                         f"got {text!r}")
    return values


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
                                    "MACs skipped over forward and backward; with --densities, "
                                    "each layer on inputs of each density, the strategy "
                                    "zeroskip chose and the issue's goals for sparse inputs.")
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
    be.add_argument("--densities", type=_densities, nargs="?", metavar="D,D,...",
                    const=",".join(f"{d:g}" for d in DENSITIES),
                    help="time each layer on ReLU-like inputs of these densities instead "
                         "(alone: 1,0.5,0.3,0.1,0.05)")
    be.add_argument("--plot", type=Path, metavar="FILE",
                    help="with --densities: also plot speed-up vs density per layer (PNG)")
    be.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON")
    be.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table")
    be.set_defaults(subparser=be)

    tu = sub.add_parser("tune", help="time every way to run each layer at each density and keep "
                                     "the fastest in the tuning database",
                        description="For each layer and input density, check torch's op and "
                                    "every generated kernel variant against torch, time them, "
                                    "and record the fastest in the tuning database, which "
                                    "zeroskip's calls then follow on this machine. Prints each "
                                    "choice and, per layer, the crossover: the highest density "
                                    "at which a sparse kernel won.")
    tu.add_argument("--specs", type=Path, metavar="FILE",
                    help="a JSON list of layers (LayerSpec.to_dict() objects) to tune instead of "
                         "the benchmark suite's forward layers")
    tu.add_argument("--quick", action="store_true", help="only the quick subset of the suite")
    tu.add_argument("--layers", nargs="+", metavar="SUBSTR",
                    help="only the suite's layers whose name or family contains one of these")
    tu.add_argument("--densities", type=_densities, default=DENSITIES, metavar="D,D,...",
                    help="input densities to tune at (default 1,0.5,0.3,0.1,0.05)")
    tu.add_argument("--repeats", type=_positive, default=7, metavar="R",
                    help="timed rounds per candidate, the median decides (default 7)")
    tu.add_argument("--threads", type=_positive, metavar="T",
                    help="threads for torch and the kernels (default: torch's); choices are "
                         "filed under the thread count")
    tu.add_argument("--db", type=Path, metavar="FILE",
                    help="the tuning database (default: $ZEROSKIP_TUNING_DB, else tuning.json in "
                         "the kernel cache directory)")
    tu.add_argument("--merge", type=Path, nargs="+", metavar="FILE",
                    help="merge these tuning databases into it (the newer record wins); without "
                         "--specs, --quick or --layers, only merge")
    tu.add_argument("--no-progress", action="store_true", help="no progress bar")
    tu.set_defaults(subparser=tu)
    return parser


def bench_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from . import bench
    layers = bench.select(args.quick, args.layers)
    if not layers:
        parser.error(f"no layer of the suite matches --layers {' '.join(args.layers)}")
    _check_sweep_flags(args, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.densities:
        report = bench.run_sweep(layers, args.densities, args.batch, args.repeats,
                                 log=sys.stderr)
    else:
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
    if args.plot:
        try:
            bench.plot(report, args.plot)
        except OSError as exc:
            parser.error(f"--plot: cannot write {args.plot}: {exc.strerror}")
    return 0


def _check_sweep_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse, before anything is timed, flags a density sweep cannot honour."""
    if args.densities and args.backward:
        parser.error("--densities times the forward only; it does not combine with --backward")
    if args.plot and not args.densities:
        parser.error("--plot draws a density sweep: it needs --densities")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib (pip install zeroskip[plot])")


def _spec_file(path: Path, parser: argparse.ArgumentParser) -> list[tuple[str, LayerSpec]]:
    """The layers of a ``--specs`` file, named by their description; exits 2 (naming the file)
    where it cannot be read or holds anything but a non-empty list of forward layers."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        parser.error(f"--specs: cannot read {path}: {exc.strerror}")
    except ValueError as exc:
        parser.error(f"--specs: {path} is not JSON: {exc}")
    if not isinstance(data, list) or not data:
        parser.error(f"--specs: {path} must hold a non-empty JSON list of layers "
                     "(LayerSpec.to_dict() objects)")
    layers = []
    for i, item in enumerate(data):
        try:
            spec = LayerSpec.from_dict(item)
        except (ValueError, TypeError) as exc:
            parser.error(f"--specs: {path}, layer {i}: {exc}")
        if spec.op not in FORWARD:
            parser.error(f"--specs: {path}, layer {i}: tuning covers conv and conv_transpose, "
                         f"not {spec.op}")
        layers.append((spec.describe(), spec))
    return layers


def _tune_layers(args: argparse.Namespace, parser: argparse.ArgumentParser
                 ) -> list[tuple[str, LayerSpec]]:
    """``(name, spec)`` of the layers to tune: the ``--specs`` file's, or the suite's forward
    layers as ``--quick`` and ``--layers`` select them."""
    if args.specs:
        if args.quick or args.layers:
            parser.error("--quick and --layers select layers of the suite, not of --specs")
        return _spec_file(args.specs, parser)
    from . import bench
    layers = [(layer.name, layer.spec) for layer in bench.select(args.quick, args.layers)
              if layer.spec.op in FORWARD]
    if not layers:
        parser.error(f"no forward layer of the suite matches --layers {' '.join(args.layers)}")
    return layers


def _read_db(path: Path, flag: str, parser: argparse.ArgumentParser):
    """A tuning database named on the command line, read strictly: a file that is not one (a
    mistyped name, someone else's file) is reported, never set aside and rebuilt."""
    from .runtime import autotune
    try:
        return autotune.TuningDB(path, strict=True)
    except OSError as exc:
        parser.error(f"{flag}: cannot read {path}: {exc.strerror}")
    except ValueError as exc:
        parser.error(f"{flag}: {exc}")


def _named(layers: list[tuple[str, LayerSpec]], results: list) -> list[tuple[str, object]]:
    """Each result with its layer's name (``tune_all`` tunes a layer at every density in turn)."""
    per_layer = len(results) // len(layers)
    return [(name, r) for i, (name, _) in enumerate(layers)
            for r in results[i * per_layer:(i + 1) * per_layer]]


def _tune_report(layers: list[tuple[str, LayerSpec]], results: list, db) -> str:
    """Every choice against torch, then each layer's crossover, as markdown tables."""
    lines = ["| layer | density | choice | torch ms | best ms | speedup |",
             "|---|---:|---|---:|---:|---:|"]
    for name, r in _named(layers, results):
        lines.append(f"| {name} | {r.density:g} | {r.choice} | {r.ms['torch']:.3g} | "
                     f"{r.ms[r.choice]:.3g} | {r.speedup():.2f}x |")
    lines += ["", "| layer | crossover |", "|---|---:|"]
    for name, spec in layers:
        crossover = db.crossover(spec)
        lines.append(f"| {name} | {f'{crossover:g}' if crossover else 'none'} |")
    lines.append("\ncrossover: the highest tuned density at which a sparse kernel won")
    return "\n".join(lines)


def _tune_notes(layers: list[tuple[str, LayerSpec]], results: list) -> None:
    """Failed candidates and contended timings, on stderr: they question the choices made."""
    from .runtime import autotune
    for name, r in _named(layers, results):
        for candidate, error in r.errors.items():
            print(f"note: {name} @ {r.density:g}: {candidate} failed: {error}", file=sys.stderr)
    contended = sum(autotune.busy(r.contention) for r in results)
    if contended:
        print(f"note: other processes took over {autotune.BUSY:.0%} of the CPUs during "
              f"{contended} of {len(results)} timings; tune on an idle machine",
              file=sys.stderr)


def tune_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from .runtime import autotune
    tuning = not args.merge or args.specs or args.quick or args.layers
    layers = _tune_layers(args, parser) if tuning else []
    if args.threads:
        torch.set_num_threads(args.threads)   # first: the database files choices by threads
    db = _read_db(args.db, "--db", parser) if args.db and args.db.exists() else \
        autotune.TuningDB(args.db)
    if args.merge:
        taken = sum(db.merge(_read_db(path, "--merge", parser)) for path in args.merge)
        print(f"merged {taken} records from {len(args.merge)} file(s)")
    if layers:
        results = autotune.tune_all([spec for _, spec in layers], args.densities, db,
                                    args.repeats, progress=not args.no_progress)
        print(_tune_report(layers, results, db))
        _tune_notes(layers, results)
    else:
        db.save()
    print(f"tuning database: {db.path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "demo":
        from . import demo
        return 0 if demo.run(sys.stdout) else 1
    if args.command == "bench":
        return bench_main(args, args.subparser)
    if args.command == "tune":
        return tune_main(args, args.subparser)

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
