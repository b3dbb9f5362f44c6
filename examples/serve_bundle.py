"""Serving a model from a bundle: the last step of trace -> generate -> run.

    zeroskip trace -o layers.json                           # the built-in ResNet stage
    zeroskip generate layers.json --out bundle              # every kernel it needs, compiled
    ZEROSKIP_BUNDLE=bundle ZEROSKIP_CC=/bin/false python examples/serve_bundle.py layers.json

This script rebuilds the traced model (the ``model`` and ``input_shape`` that ``layers.json``
records), converts it with ``zeroskip.convert``, freezes its weights (``zeroskip.freeze``: packed
weights kept with no check per call) and runs it forward and backward on a seeded
input, next to torch's own model. With ``ZEROSKIP_CC=/bin/false`` no kernel can be compiled, so
every kernel that runs comes from the bundle. It prints the largest difference from torch and
the counters, and exits 1 if the outputs differ, if any call fell back to torch or compiled a
kernel, or if no bundle served one.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import warnings

import torch

import zeroskip
from zeroskip.runtime import bundle
from zeroskip.runtime.stats import ZeroskipFallbackWarning
from zeroskip.trace import build_model


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("layers", help="the layers.json that zeroskip trace wrote")
    parser.add_argument("--bundle", help="load this bundle (else ZEROSKIP_BUNDLE's)")
    args = parser.parse_args()
    traced = json.loads(open(args.layers).read())
    if args.bundle:
        print(zeroskip.load_bundle(args.bundle))
    if not bundle.active():
        print("no bundle to serve from: give --bundle or set ZEROSKIP_BUNDLE", file=sys.stderr)
        return 1
    # The weights are drawn from the trace's seed, so a run repeats: with some draws a ReLU's
    # input lands within float32 rounding of zero, where any two float32 computations (torch's
    # and the kernels', or torch's and its own float64) may mask it differently and the input
    # gradient differs there by ~1e-2 (about 3 in 100 unseeded draws of the built-in model).
    torch.manual_seed(traced.get("seed", 0))
    model = build_model(traced["model"]).eval()
    reference = copy.deepcopy(model)
    zeroskip.convert(model)
    zeroskip.freeze(model)    # a server's weights do not change: packs are kept unchecked

    torch.manual_seed(traced.get("seed", 0) + 1)
    x = torch.randn(traced["input_shape"])
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ZeroskipFallbackWarning)
        out = model(xa)
        out.square().mean().backward()
    want = reference(xb)
    want.square().mean().backward()
    out, want = out.detach(), want.detach()

    scale = float(want.abs().max()) or 1.0
    errors = {"output": float((out - want).abs().max()) / scale,
              "input grad": float((xa.grad - xb.grad).abs().max()) /
              (float(xb.grad.abs().max()) or 1.0)}
    counters = zeroskip.stats()
    print(f"{traced['model']} on {tuple(x.shape)}: relative error "
          + ", ".join(f"{k} {v:.2e}" for k, v in errors.items()))
    print("counters: " + ", ".join(f"{k} {counters[k]:g}" for k in (
        "kernel_calls", "bundle_hits", "compiles", "cache_hits", "fallback_calls")))
    for warning in caught:
        print(f"warning: {str(warning.message).splitlines()[0]}")
    problems = [what for what, bad in (
        ("the results differ from torch's", max(errors.values()) >= 1e-3),
        ("calls fell back to torch", counters["fallback_calls"] > 0),
        ("kernels were compiled, not served from the bundle", counters["compiles"] > 0),
        ("no call was served from the bundle", counters["bundle_hits"] == 0))
        if bad]
    print("OK" if not problems else "FAILED: " + "; ".join(problems))
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
