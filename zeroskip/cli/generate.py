"""``zeroskip generate``: compile every kernel of some layers ahead of time into a bundle."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..spec import LayerSpec, Workload
from .args import _comma_list, _positive, _spec_file


def add_parser(sub) -> argparse.ArgumentParser:
    ge = sub.add_parser("generate", help="compile every kernel of some layers ahead of time "
                                         "into a bundle that runs without a compiler",
                        description="Build every kernel the layers need (forward: dense, and "
                                    "sparse where it may be picked; the input- and "
                                    "weight-gradient kernels unless --forward-only) into the "
                                    "bundle OUT: C kernels compiled for this machine "
                                    "(--backend c), Triton kernels compiled for GPU targets "
                                    "(--backend triton: OUT/triton/<target>/<layer>/<kernel>."
                                    "{py,ptx,cubin} and OUT/triton/meta.json with registers, "
                                    "shared memory and spills), and OUT/manifest.json with the "
                                    "sha256 of every file, the versions and this machine's "
                                    "fingerprint; with --tune, the tuned choices of every "
                                    "operator. zeroskip.load_bundle(OUT) or "
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
                    help="tune each layer's forward, input-gradient and weight-gradient "
                         "operators at its traced batch and densities (the input gradient at "
                         "its output gradient's) and bundle the choices: the C kernels on this "
                         "CPU, the Triton kernels on this machine's GPU (none tuned without "
                         "one: the manifest says so)")
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
    ge.add_argument("--suite", choices=("main", "wide", "all"), default="main",
                    help="main (default): the suite's layers; wide: real-model shapes the "
                         "kernels were not tuned on (MobileNet, EfficientNet, Inception, U-Net, "
                         "diffusion, FCN, ...); all: both")
    ge.add_argument("--layers", nargs="+", metavar="SUBSTR",
                    help="only the layers whose name (or suite family) contains one of these")
    ge.add_argument("--jobs", type=_positive, default=2, metavar="J",
                    help="compile in J processes (default 2)")
    ge.add_argument("--strict", action="store_true",
                    help="also exit 1 where a kernel spills or exceeds shared memory")
    ge.add_argument("--no-progress", action="store_true", help="no progress bar")
    ge.set_defaults(handler=main, subparser=ge)
    return ge


def _generate_layers(args: argparse.Namespace, parser: argparse.ArgumentParser
                     ) -> list[tuple[str, LayerSpec, Workload]]:
    """``(name, spec, workload)`` of the layers to generate: the layers file's, or the suite's
    (batch 1), as ``--quick`` and ``--layers`` select them."""
    if args.layers_file:
        if args.quick:
            parser.error("--quick selects layers of the suite, not of a layers file")
        layers = _spec_file(args.layers_file, parser, flag="", named=True, forward_only=False)
        if args.layers:
            layers = [layer for layer in layers if any(p in layer[0] for p in args.layers)]
    else:
        from .. import bench
        layers = [(layer.name, layer.spec, Workload())
                  for layer in bench.select(args.quick, args.layers, args.suite)]
    if not layers:
        parser.error(f"no layer matches --layers {' '.join(args.layers)}")
    return layers


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from .. import generate
    from ..runtime import bundle, tritonenv
    from ..runtime.triton_kernel import TARGETS, TORCH_DTYPES
    for backend in args.backend:
        if backend not in bundle.KERNEL_BACKENDS:
            parser.error(f"--backend: expected c and/or triton, got {backend!r}")
    triton = "triton" in args.backend
    if triton:
        for target in args.target:
            if target not in TARGETS:
                parser.error(f"--target: expected targets among "
                             f"{', '.join(sorted(TARGETS))}, got {target!r}")
        if not tritonenv.available():
            parser.error("the triton backend needs Triton (pip install triton)")
    elif args.dtype or args.layout != ["contiguous"]:
        parser.error("--dtype and --layout choose Triton kernels: add --backend triton")
    for dtype in args.dtype or ():
        if dtype not in TORCH_DTYPES:
            parser.error(f"--dtype: expected dtypes among {', '.join(TORCH_DTYPES)}, "
                         f"got {dtype!r}")
    for layout in args.layout:
        if layout not in generate.LAYOUTS:
            parser.error(f"--layout: expected layouts among {', '.join(generate.LAYOUTS)}, "
                         f"got {layout!r}")
    layers = _generate_layers(args, parser)
    from ..runtime.loader import BUILD_ERRORS
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
