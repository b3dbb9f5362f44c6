"""The ``zeroskip`` command line: ``explain`` one operator, ``demo`` the built-in networks,
``bench`` the generated kernels against torch, ``tune`` them into the tuning database,
``generate`` them ahead of time for GPU targets, ``trace`` a model's conv layers into a layers
file."""
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


GPU_BATCH = 32
TRACE_DEFAULT, TRACE_DEFAULT_SHAPE = "zeroskip.models:resnet_stage", (4, 64, 32, 32)
DTYPE_NAMES = {"float32": "float32", "fp32": "float32", "float16": "float16", "fp16": "float16",
               "half": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _dtypes(text: str) -> tuple[str, ...]:
    names = [v.strip().lower() for v in text.split(",")]
    if not names or not all(n in DTYPE_NAMES for n in names):
        raise argparse.ArgumentTypeError(f"expected float32, float16 or bfloat16 separated by "
                                         f"commas, got {text!r}")
    return tuple(dict.fromkeys(DTYPE_NAMES[n] for n in names))


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
                                    "zeroskip chose and the issue's goals for sparse inputs; "
                                    "with --device cuda, the Triton kernels against torch "
                                    "(cuDNN) on the GPU per dtype, with the issue's GPU goals.")
    be.add_argument("--quick", action="store_true", help="only the quick subset of the suite")
    be.add_argument("--layers", nargs="+", metavar="SUBSTR",
                    help="only the layers whose name or family contains one of these")
    be.add_argument("--batch", type=_positive, default=None,
                    help=f"batch size (default 1; {GPU_BATCH} with --device cuda)")
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
    be.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu (default): the C kernels against torch; cuda: the Triton kernels "
                         "against torch (cuDNN) on the GPU, forward, input and weight gradients "
                         "and the block-sparse kernel at 90%% zeros, per dtype, with the "
                         "issue's GPU goals (exits 1 where no GPU can run them)")
    be.add_argument("--dtypes", type=_dtypes, metavar="T[,T...]",
                    help="with --device cuda: float32, float16, bfloat16 (fp32, fp16, bf16; "
                         "default all three)")
    be.add_argument("--tune", action="store_true",
                    help="with --device cuda: tune each kernel on the GPU first (recorded in "
                         "the tuning database under the GPU's fingerprint)")
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

    ge = sub.add_parser("generate", help="compile every kernel of some layers ahead of time "
                                         "into a bundle that runs without a compiler",
                        description="Build every kernel the layers need (forward: dense, and "
                                    "sparse where it may be picked; the input- and "
                                    "weight-gradient kernels unless --forward-only) into the "
                                    "bundle OUT: C kernels compiled for this machine "
                                    "(--backend c; --tune also tunes them here and keeps the "
                                    "choices), Triton kernels compiled for GPU targets "
                                    "(--backend triton: OUT/triton/<target>/<layer>/<kernel>."
                                    "{py,ptx,cubin} and OUT/triton/meta.json with registers, "
                                    "shared memory and spills), and OUT/manifest.json with the "
                                    "sha256 of every file, the versions and this machine's "
                                    "fingerprint. zeroskip.load_bundle(OUT) or "
                                    "ZEROSKIP_BUNDLE=OUT serves them. Exits 1 where a kernel "
                                    "failed to build (or, with --strict, a Triton kernel "
                                    "spills or exceeds shared memory).")
    ge.add_argument("layers_file", nargs="?", type=Path, metavar="layers.json",
                    help="a JSON list of layers (LayerSpec.to_dict() objects) or an object of "
                         "them by name (default: the benchmark suite)")
    ge.add_argument("--backend", type=_comma_list, default=["c"], metavar="B[,B]",
                    help="kernel backends: c (this machine's CPU; the default) and/or triton "
                         "(GPU targets)")
    ge.add_argument("--tune", action="store_true",
                    help="tune each layer's C kernels on this machine at the layer's density "
                         "and bundle the choices")
    ge.add_argument("--target", type=_comma_list, default=["sm_90"], metavar="SM[,SM...]",
                    help="GPU targets, e.g. sm_80,sm_90 (default sm_90)")
    ge.add_argument("--dtype", type=_comma_list, metavar="T[,T...]",
                    help="float32, float16, bfloat16 (default: each layer's own; the suite's "
                         "are float32)")
    ge.add_argument("--layout", type=_comma_list, default=["contiguous"], metavar="L[,L]",
                    help="tensor layouts to specialize for: contiguous, channels_last "
                         "(default contiguous)")
    ge.add_argument("--forward-only", action="store_true",
                    help="only the forward kernels, not the gradients'")
    ge.add_argument("--out", type=Path, default=Path("zeroskip-kernels"), metavar="DIR",
                    help="output folder (default zeroskip-kernels)")
    ge.add_argument("--quick", action="store_true", help="only the quick subset of the suite")
    ge.add_argument("--layers", nargs="+", metavar="SUBSTR",
                    help="only the layers whose name (or suite family) contains one of these")
    ge.add_argument("--jobs", type=_positive, default=2, metavar="J",
                    help="compile in J processes (default 2)")
    ge.add_argument("--strict", action="store_true",
                    help="also exit 1 where a kernel spills or exceeds shared memory")
    ge.add_argument("--no-progress", action="store_true", help="no progress bar")
    ge.set_defaults(subparser=ge)

    tr = sub.add_parser("trace", help="run a model on sample inputs and write each conv layer's "
                                      "spec with its measured input density",
                        description="Build the model, run it (eval mode, no gradients) on "
                                    "--batches random normal batches of --input-shape with a "
                                    "hook on every convolution, and write each layer's "
                                    "LayerSpec (with the ReLU fused where zeroskip.convert "
                                    "fuses it) and its input density (mean, std, min, max over "
                                    "the calls) to a layers file for zeroskip generate.")
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
    tr.add_argument("-o", "--out", type=Path, default=Path("layers.json"), metavar="FILE",
                    help="the layers file to write (default layers.json)")
    tr.set_defaults(subparser=tr)
    return parser


def bench_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from . import bench
    layers = bench.select(args.quick, args.layers)
    if not layers:
        parser.error(f"no layer of the suite matches --layers {' '.join(args.layers)}")
    _check_device_flags(args, parser)
    _check_sweep_flags(args, parser)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda":
        try:
            report = bench.run_gpu(layers, args.dtypes or bench.GPU_DTYPES,
                                   args.batch or GPU_BATCH, args.repeats, tune=args.tune,
                                   log=sys.stderr)
        except bench.GpuUnavailable as exc:
            print(f"zeroskip bench --device cuda could not run: {exc}", file=sys.stderr)
            return 1
    elif args.densities:
        report = bench.run_sweep(layers, args.densities, args.batch or 1, args.repeats,
                                 log=sys.stderr)
    else:
        run = bench.run_backward if args.backward else bench.run
        report = run(layers, args.batch or 1, args.repeats, log=sys.stderr)
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
    failed = getattr(report, "failures", [])
    if failed:
        print(f"zeroskip bench: {len(failed)} kernel(s) failed to build, run or match torch "
              "(see the table)", file=sys.stderr)
        return 1
    return 0


def _check_device_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Refuse flags that the chosen device's bench does not take."""
    if args.device == "cuda":
        for flag, value in (("--densities", args.densities), ("--backward", args.backward),
                            ("--plot", args.plot)):
            if value:
                parser.error(f"{flag} is for the CPU bench; --device cuda times the forward, "
                             "both gradients and the block-sparse kernel at 90% zeros")
    else:
        for flag, value in (("--dtypes", args.dtypes), ("--tune", args.tune)):
            if value:
                parser.error(f"{flag} needs --device cuda (the CPU bench runs float32; tune "
                             "CPU kernels with zeroskip tune)")


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


def _spec_file(path: Path, parser: argparse.ArgumentParser, flag: str = "--specs",
               named: bool = False, forward_only: bool = True) -> list[tuple[str, LayerSpec]]:
    """The layers of a ``--specs`` file, named by their description; exits 2 (naming the file)
    where it cannot be read or holds anything but a non-empty list of forward layers. With
    ``named``, an object of layers by name is taken too; without ``forward_only``, any op."""
    prefix = f"{flag}: " if flag else ""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        parser.error(f"{prefix}cannot read {path}: {exc.strerror}")
    except ValueError as exc:
        parser.error(f"{prefix}{path} is not JSON: {exc}")
    from .trace import parse_layers   # zeroskip trace's layers files are taken too
    try:
        layers = parse_layers(data, path, named=named)
    except ValueError as exc:
        parser.error(f"{prefix}{exc}")
    for i, (name, spec) in enumerate(layers):
        if forward_only and spec.op not in FORWARD:
            where = f"layer {i}" if isinstance(data, list) else f"layer {name!r}"
            parser.error(f"{prefix}{path}, {where}: tuning covers conv and conv_transpose, "
                         f"not {spec.op}")
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


def _generate_layers(args: argparse.Namespace, parser: argparse.ArgumentParser
                     ) -> list[tuple[str, LayerSpec]]:
    """``(name, spec)`` of the layers to generate: the layers file's, or the suite's, as
    ``--quick`` and ``--layers`` select them."""
    if args.layers_file:
        if args.quick:
            parser.error("--quick selects layers of the suite, not of a layers file")
        layers = _spec_file(args.layers_file, parser, flag="", named=True, forward_only=False)
        if args.layers:
            layers = [(name, spec) for name, spec in layers
                      if any(p in name for p in args.layers)]
    else:
        from . import bench
        layers = [(layer.name, layer.spec) for layer in bench.select(args.quick, args.layers)]
    if not layers:
        parser.error(f"no layer matches --layers {' '.join(args.layers)}")
    return layers


def generate_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from . import generate
    from .runtime import bundle
    from .runtime import triton as zt
    for backend in args.backend:
        if backend not in bundle.BACKENDS:
            parser.error(f"--backend: expected c and/or triton, got {backend!r}")
    triton = "triton" in args.backend
    if triton:
        for target in args.target:
            if target not in zt.TARGETS:
                parser.error(f"--target: expected targets among "
                             f"{', '.join(sorted(zt.TARGETS))}, got {target!r}")
        if not zt.available():
            parser.error("the triton backend needs Triton (pip install triton)")
    elif args.dtype or args.layout != ["contiguous"]:
        parser.error("--dtype and --layout choose Triton kernels: add --backend triton")
    if args.tune and "c" not in args.backend:
        parser.error("--tune tunes the C kernels on this machine (Triton kernels are tuned on "
                     "a GPU: zeroskip bench --device cuda --tune)")
    for dtype in args.dtype or ():
        if dtype not in zt.TORCH_DTYPES:
            parser.error(f"--dtype: expected dtypes among {', '.join(zt.TORCH_DTYPES)}, "
                         f"got {dtype!r}")
    for layout in args.layout:
        if layout not in generate.LAYOUTS:
            parser.error(f"--layout: expected layouts among {', '.join(generate.LAYOUTS)}, "
                         f"got {layout!r}")
    layers = _generate_layers(args, parser)
    from .runtime.ops import BUILD_ERRORS
    try:
        manifest = generate.make_bundle(
            layers, args.out, backends=args.backend, targets=args.target, tune=args.tune,
            include_grads=not args.forward_only, progress=not args.no_progress,
            jobs=args.jobs, layouts=args.layout, dtypes=args.dtype)
    except ValueError as exc:
        parser.error(f"--out: {exc}")
    except OSError as exc:
        parser.error(f"--out: cannot write {args.out}: {exc.strerror or exc}")
    except BUILD_ERRORS as exc:
        print(f"zeroskip generate: a kernel failed to build: {exc}", file=sys.stderr)
        return 1
    status = 0
    if triton:
        meta = json.loads((args.out / "triton" / "meta.json").read_text())
        print(generate.table(meta))
        status = 1 if meta["failed"] or (args.strict and meta["reported"]) else 0
    c = [k for k in manifest["kernels"] if k["backend"] == "c"]
    if c:
        print(f"{len(c)} C kernels of {len(layers)} layers "
              f"({len({k['key'] for k in c})} distinct) for {manifest['machine']['cpu']}")
    for s in manifest["skipped"]:
        if "layer" in s and s.get("role") != "every" and "dtype" not in s:
            print(f"note: skipped the {s['role']} kernel of {s['layer']}: {s['reason']}")
    print(f"bundle written to {args.out} ({len(manifest['files'])} files); serve it with "
          f"zeroskip.load_bundle({str(args.out)!r}) or ZEROSKIP_BUNDLE={args.out}")
    return status


def trace_main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import dataclasses
    import os

    from . import trace
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
                           fuse_relu=not args.no_fuse_relu, name=target)
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
        spec = dataclasses.replace(LayerSpec.from_dict(layer["spec"]), density=1.0)
        density = layer["density"]
        print(f"{layer['name']:<{width}}  {spec.describe()}  density {density['mean']:.3f} "
              f"± {density['std']:.3f}")
    print(f"{len(data['layers'])} conv layers of {target} written to {args.out}")
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
    if args.command == "generate":
        return generate_main(args, args.subparser)
    if args.command == "trace":
        return trace_main(args, args.subparser)

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
