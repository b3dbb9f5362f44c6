"""Float32 gradients of a whole model against float64 truth, torch's and zeroskip's, over many
inputs: squeezenet1_1 (``zeroskip.models.SqueezeNet``, torchvision's definition) in train mode, random init (seed 0), batches of 4 x 3x96x96, cross-entropy
of the logits against random labels. For each input seed: the largest gradient error relative
to the largest gradient and the worst parameter's error relative to its own largest element,
and how many ReLU masks (conv outputs) and max-pool choices differ from float64's.

A ReLU mask or a max-pool choice that flips moves the gradient by up to ~1e-2 of its largest
element, in torch's float32 as in zeroskip's; ``tests/test_model_precision.py`` checks the
kernels on a model chosen far from any flip.

    python benchmarks/precision_squeezenet.py [--seeds 1-40] [--out FILE.md]
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from torch import nn

import zeroskip
from zeroskip.models import SqueezeNet


def run(model: nn.Module, dtype, x, target) -> tuple[dict, dict]:
    """Gradients (float64 copies), and each conv's ReLU mask and each max-pool's choices."""
    model = copy.deepcopy(model).to(dtype)
    choices: dict = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda m, i, o, n=name: choices.__setitem__(n, o > 0))
        elif isinstance(m, nn.MaxPool2d):
            m.register_forward_hook(lambda m, i, o, n=name: choices.__setitem__(n, F.max_pool2d(
                i[0], m.kernel_size, m.stride, ceil_mode=True, return_indices=True)[1]))
    torch.manual_seed(123)                     # the same dropout mask for every run
    F.cross_entropy(model(x.to(dtype)), target).backward()
    return {n: p.grad.double().clone() for n, p in model.named_parameters()}, choices


def errors(grads: dict, truth: dict) -> tuple[float, float]:
    largest = max(t.abs().max().item() for t in truth.values())
    worst = max((grads[k] - truth[k]).abs().max().item() for k in truth)
    each = max(((grads[k] - truth[k]).abs().max() / truth[k].abs().max()).item() for k in truth)
    return worst / largest, each


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="1-40", help="input seeds, FIRST-LAST")
    parser.add_argument("--out", help="also write the table (markdown) here")
    args = parser.parse_args()
    first, last = map(int, args.seeds.split("-"))
    torch.manual_seed(0)
    base = SqueezeNet().train()
    for m in base.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    converted = zeroskip.convert(copy.deepcopy(base))
    lines = ["| input seed | torch f32 error | worst parameter | flips | zeroskip f32 error "
             "| worst parameter | flips |", "|---:|---:|---:|---:|---:|---:|---:|"]
    print(lines[0], lines[1], sep="\n")
    for seed in range(first, last + 1):
        torch.manual_seed(seed)
        x, target = torch.randn(4, 3, 96, 96), torch.randint(0, 5, (4,))
        truth, exact = run(base, torch.float64, x, target)
        cells = []
        for model in (base, converted):
            grads, seen = run(model, torch.float32, x, target)
            flips = sum(int((seen[n] != exact[n]).sum()) for n in exact)
            cells.append("{:.2e} | {:.2e} | {}".format(*errors(grads, truth), flips))
        lines.append(f"| {seed} | {cells[0]} | {cells[1]} |")
        print(lines[-1], flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
