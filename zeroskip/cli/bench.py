"""``zeroskip bench``: time each layer of the benchmark suite against torch."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .args import DENSITIES, _densities, _dtypes, _positive

GPU_BATCH = 32


def add_parser(sub) -> argparse.ArgumentParser:
    be = sub.add_parser("bench", help="time each layer of the benchmark suite against torch",
                        description="Check each layer of the suite against torch, then time "
                                    "both side by side (median of repeats, warm cache); print "
                                    "the ratios, GFLOP/s over non-zero MACs, cold compile "
                                    "times and the per-call overhead as a markdown table; "
                                    "with --backward, the times of one training step and the "
                                    "MACs skipped over forward and backward; with --densities, "
                                    "each layer on inputs of each density, the strategy "
                                    "zeroskip chose and the speed goals for sparse inputs; "
                                    "with --device cuda, the Triton kernels against torch "
                                    "(cuDNN) on the GPU per dtype, with the GPU speed goals.")
    be.add_argument("--quick", action="store_true", help="only the quick subset of the suite")
    be.add_argument("--suite", choices=("main", "wide", "all"), default="main",
                    help="main (default): the suite's layers; wide: real-model shapes the "
                         "kernels were not tuned on (MobileNet, EfficientNet, Inception, U-Net, "
                         "diffusion, FCN, ...); all: both")
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
                         "(alone: 1,0.5,0.3,0.1,0.05); with --backward, a training step of "
                         "each layer at each input density")
    be.add_argument("--plot", type=Path, metavar="FILE",
                    help="with --densities: also plot speed-up vs density per layer (PNG)")
    be.add_argument("--json", type=Path, metavar="FILE", help="also write every figure as JSON")
    be.add_argument("--markdown", type=Path, metavar="FILE", help="also write the table")
    be.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                    help="cpu (default): the C kernels against torch; cuda: the Triton kernels "
                         "against torch (cuDNN) on the GPU, forward, input and weight gradients "
                         "and the block-sparse kernel at 90%% zeros, per dtype, with the "
                         "GPU speed goals (exits 1 where no GPU can run them)")
    be.add_argument("--dtypes", type=_dtypes, metavar="T[,T...]",
                    help="with --device cuda: float32, float16, bfloat16 (fp32, fp16, bf16; "
                         "default all three)")
    be.add_argument("--tune", action="store_true",
                    help="with --device cuda: tune each kernel on the GPU first (recorded in "
                         "the tuning database under the GPU's fingerprint)")
    be.set_defaults(handler=main, subparser=be)
    return be


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from .. import bench
    layers = bench.select(args.quick, args.layers, args.suite)
    if not layers:
        parser.error(f"no layer of the {args.suite} suite matches "
                     f"{'--quick' if args.quick else ''} --layers {' '.join(args.layers or [])}")
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
    elif args.densities and args.backward:
        report = bench.run_backward(layers, args.batch or 1, args.repeats, log=sys.stderr,
                                    densities=args.densities)
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
    if args.plot and args.backward:
        parser.error("--plot draws a forward density sweep; it does not combine with --backward")
    if args.plot and not args.densities:
        parser.error("--plot draws a density sweep: it needs --densities")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            parser.error("--plot needs matplotlib (pip install zeroskip[plot])")
