"""Each operator of a training step alone (forward, input gradient, weight gradient) against
torch's, side by side, at a batch size: where a layer's training step spends its time.

    python benchmarks/bench_ops.py                       # the suite's layers at batch 16
    python benchmarks/bench_ops.py --batch 32 --layers vgg16 unet.up1

Each generated kernel (``loader.run_spec``) is checked against torch's op
(``reference.op``: ``torch.nn.functional`` forward, ``aten.convolution_backward`` gradients)
before both are timed in interleaved rounds (median); ratio = torch ms / zeroskip ms.
"""
from __future__ import annotations

import argparse

import torch

from zeroskip import bench
from zeroskip.runtime import autotune, loader, reference, timing


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--layers", nargs="+", metavar="SUBSTR")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    timing.steady_allocator()
    print(f"| layer | operator | torch ms | zeroskip ms | ratio |  (batch {args.batch}, "
          f"{args.threads} threads)\n|---|---|---:|---:|---:|")
    for layer in bench.select(patterns=args.layers):
        spec = layer.spec
        for name, op in (("forward", spec), ("grad_input", spec.grad_input()),
                         ("grad_weight", spec.grad_weight())):
            t = autotune.operands(op, 1.0, batch=args.batch)
            want = reference.op(op, t)
            error = reference.relative_error(loader.run_spec(op, t), want())
            if not error <= reference.TOLERANCE:
                raise SystemExit(f"{layer.name} {name}: differs from torch by {error:.3g}")
            found = timing.time_interleaved(
                {"torch": want, "zeroskip": lambda: loader.run_spec(op, t)}, args.repeats)
            s = found.seconds
            print(f"| {layer.name} | {name} | {s['torch'] * 1e3:.2f} | {s['zeroskip'] * 1e3:.2f} "
                  f"| {s['torch'] / s['zeroskip']:.2f}x{' *' if timing.busy(found.contention) else ''} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
