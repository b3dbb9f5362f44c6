"""Each operator of a training step alone (forward, input gradient, weight gradient) against
torch's, side by side, at a batch size: where a layer's training step spends its time.

    python benchmarks/bench_ops.py                       # the suite's layers at batch 16
    python benchmarks/bench_ops.py --batch 32 --layers vgg16 unet.up1
    python benchmarks/bench_ops.py --densities 1 0.5 0.3 0.2 0.1 --layers vgg16.conv3_1

Each generated kernel (``loader.run_spec``) is checked against torch's op
(``reference.op``: ``torch.nn.functional`` forward, ``aten.convolution_backward`` gradients)
before both are timed in interleaved rounds (median); ratio = torch ms / zeroskip ms.

With ``--densities``, each operator's data operand (the input of the forward and the weight
gradient, the output gradient of the input gradient) is ReLU-like at each density, and the
table holds torch, the dense kernel and the sparse kernel side by side: the sparse kernel's
speed over the dense one's, and each kernel's GMAC/s over the MACs it must do (every non-zero
MAC, ``nonzero_macs`` x density; the dense kernel's over all of them). The ideal sparse kernel
runs at the dense kernel's GMAC/s: 1/density times as fast.
"""
from __future__ import annotations

import argparse

import torch

from zeroskip import bench
from zeroskip.codegen.macs import nonzero_macs
from zeroskip.codegen.variant import Variant
from zeroskip.runtime import autotune, loader, reference, timing

DENSE, SPARSE = Variant("dense"), Variant("sparse")


def _checked(layer: str, name: str, op, t, variant) -> None:
    want = reference.op(op, t)
    error = reference.relative_error(loader.run_spec(op, t, variant), want())
    if not error <= reference.TOLERANCE:
        raise SystemExit(f"{layer} {name} ({variant.name}): differs from torch by {error:.3g}")


def _operators(spec):
    return (("forward", spec), ("grad_input", spec.grad_input()),
            ("grad_weight", spec.grad_weight()))


def against_torch(args) -> None:
    print(f"| layer | operator | torch ms | zeroskip ms | ratio |  (batch {args.batch}, "
          f"{args.threads} threads)\n|---|---|---:|---:|---:|")
    for layer in bench.select(patterns=args.layers):
        for name, op in _operators(layer.spec):
            t = autotune.operands(op, 1.0, batch=args.batch)
            _checked(layer.name, name, op, t, Variant())
            want = reference.op(op, t)
            found = timing.time_interleaved(
                {"torch": want, "zeroskip": lambda: loader.run_spec(op, t)}, args.repeats)
            s = found.seconds
            busy = " *" if timing.busy(found.contention) else ""
            print(f"| {layer.name} | {name} | {s['torch'] * 1e3:.2f} | {s['zeroskip'] * 1e3:.2f} "
                  f"| {s['torch'] / s['zeroskip']:.2f}x{busy} |", flush=True)


def at_densities(args) -> None:
    print(f"| layer | operator | density | torch ms | dense ms | sparse ms | sparse/dense | "
          f"dense GMAC/s | sparse GMAC/s (non-zero) | share of dense |  (batch {args.batch}, "
          f"{args.threads} threads)\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for layer in bench.select(patterns=args.layers):
        for name, op in _operators(layer.spec):
            if args.operators and name not in args.operators:
                continue
            macs = nonzero_macs(op, args.batch)
            for density in args.densities:
                t = autotune.operands(op, density, batch=args.batch)
                for variant in (DENSE, SPARSE):
                    _checked(layer.name, name, op, t, variant)
                found = timing.time_interleaved(
                    {"torch": reference.op(op, t),
                     "dense": lambda: loader.run_spec(op, t, DENSE),
                     "sparse": lambda: loader.run_spec(op, t, SPARSE)}, args.repeats)
                s = found.seconds
                dense_rate = macs / s["dense"] / 1e9
                sparse_rate = macs * density / s["sparse"] / 1e9
                family = "+".join(loader.kernel_for(op, "c", SPARSE).plan.families)
                print(f"| {layer.name} | {name} ({family}) | {density:g} | "
                      f"{s['torch'] * 1e3:.2f} | {s['dense'] * 1e3:.2f} | "
                      f"{s['sparse'] * 1e3:.2f} | {s['dense'] / s['sparse']:.2f}x | "
                      f"{dense_rate:.0f} | {sparse_rate:.0f} | {sparse_rate / dense_rate:.0%}"
                      f"{' *' if timing.busy(found.contention) else ''} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--layers", nargs="+", metavar="SUBSTR")
    parser.add_argument("--operators", nargs="+", choices=("forward", "grad_input",
                                                           "grad_weight"))
    parser.add_argument("--densities", nargs="+", type=float, metavar="D",
                        help="dense and sparse kernels side by side at these densities")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timing.steady_allocator()
    if args.densities:
        at_densities(args)
    else:
        against_torch(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
