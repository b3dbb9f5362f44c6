"""Whole real models, torch against ``zeroskip.convert``: classification backbones (a ResNet-18
with its 7x7 stem and 1x1 projections, a MobileNetV2 with depthwise, 1x1 and strided convs),
a segmentation network with FCN-32s's k=64 s=32 transposed-conv upsampler, and a DCGAN
generator. Each model is converted from a copy of the same weights; then

- checked: the eval output at batch 1 against torch's (relative to its largest magnitude);
  every parameter's gradient of a training step at batch 8 against a float64 copy's
  (relative to its largest, at least a thousandth of the model's largest), as close as torch's
  own float32 step is (BatchNorm in train mode amplifies float32 rounding: torch's
  own gradients are up to ~2e-2 off float64's on ResNet-18); every conv on generated kernels
  (no fallback, none served by torch's op);
- timed side by side (interleaved rounds, medians): the eval call at batch 1 and a training
  step (forward, loss, backward, SGD step) at batch 8.

The first calls' compile time (from the cache the run uses) is reported beside them.
"""
from __future__ import annotations

import copy
import dataclasses
import time
from typing import Callable, TextIO

import torch
from torch import nn

from .. import models
from ..conversion import convert
from ..runtime import launcher, loader, reference, stats
from ..runtime.timing import MIN_TIME_S, REPEATS, steady_allocator, time_interleaved
from .common import geomean, machine


@dataclasses.dataclass(frozen=True)
class Model:
    name: str
    description: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]      # one sample's


MODELS = {m.name: m for m in [
    Model("resnet18", "ResNet-18 (torchvision's layout), 224x224", lambda: models.ResNet(),
          (3, 224, 224)),
    Model("mobilenet_v2", "MobileNetV2 (torchvision's layout, no dropout), 224x224",
          lambda: models.MobileNetV2(), (3, 224, 224)),
    Model("fcn32s", "FCN-32s form: ResNet-18 trunk, k=64 s=32 upsampler, 224x224",
          lambda: models.FCN32s(), (3, 224, 224)),
    Model("dcgan", "DCGAN generator, 32x32 images", lambda: models.dcgan_generator(),
          (100, 1, 1)),
]}
TOLERANCE = 1e-4         # of the output's largest magnitude
# zeroskip's gradients may be this many times as far from float64's as torch's are (and
# always GRADIENT_FLOOR): the summation orders differ, not the accuracy class.
GRADIENT_FACTOR, GRADIENT_FLOOR = 2.0, 1e-5


@dataclasses.dataclass
class ModelRow:
    name: str
    description: str
    convs: int
    compile_s: float          # the first eval call and training step, kernels built meanwhile
    output_error: float
    gradient_error: float     # zeroskip's float32 step against float64, the worst parameter
    torch_gradient_error: float   # torch's float32 step against float64
    eval_torch_ms: float
    eval_zs_ms: float
    train_torch_ms: float
    train_zs_ms: float
    kernel_calls: int         # in one training step
    fallbacks: int

    @property
    def eval_ratio(self) -> float:
        return self.eval_torch_ms / self.eval_zs_ms

    @property
    def train_ratio(self) -> float:
        return self.train_torch_ms / self.train_zs_ms


class _Step:
    """A training step on synthetic data: forward, mean-square loss, backward, SGD step."""

    def __init__(self, model: nn.Module, x: torch.Tensor):
        self.model, self.x = model, x
        self.opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    def __call__(self) -> None:
        self.opt.zero_grad(set_to_none=False)
        self.model(self.x).float().square().mean().backward()
        self.opt.step()


def _calibrate_batchnorm(net: nn.Module, x: torch.Tensor) -> None:
    """BatchNorm's running statistics from ``x`` (as a trained model holds them; at their
    initial identity a fresh MobileNetV2's eval activations fade to ~1e-9, and an eval check
    would compare little but the classifier's bias)."""
    norms = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momentum = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None               # a cumulative average: this batch's statistics
    net.train()
    with torch.no_grad():
        net(x)
    for m, kept in zip(norms, momentum):
        m.momentum = kept


def run_model(model: Model, eval_batch: int = 1, train_batch: int = 8, repeats: int = REPEATS,
              min_time: float = MIN_TIME_S, seed: int = 0) -> ModelRow:
    torch.manual_seed(seed)
    ref = model.build()
    convs = sum(isinstance(m, (nn.modules.conv._ConvNd)) for m in ref.modules())
    gen = torch.Generator().manual_seed(seed)
    x1 = torch.randn(eval_batch, *model.input_shape, generator=gen)
    x8 = torch.randn(train_batch, *model.input_shape, generator=gen)
    _calibrate_batchnorm(ref, x8)
    zs_net, exact = copy.deepcopy(ref), copy.deepcopy(ref).double()
    stats.stats(reset=True)
    start = time.perf_counter()
    zs = convert(zs_net)
    ref.eval(), zs.eval()
    with torch.no_grad():
        out, want = zs(x1), ref(x1)
    output_error = reference.relative_error(out, want)
    # One training step's gradients, both models in train mode from the same weights.
    ref.train(), zs.train()
    for net in (ref, zs):
        net.zero_grad()
        net(x8).float().square().mean().backward()
    compile_s = time.perf_counter() - start
    exact.train()
    exact(x8.double()).square().mean().backward()
    want = dict(exact.named_parameters())
    # Each parameter's distance relative to its own largest gradient, or to a thousandth of
    # the model's largest where its own is smaller (a gradient that is zero in float64 and
    # rounding in float32 says nothing of accuracy).
    floor = 1e-3 * max(float(p.grad.abs().max()) for p in want.values() if p.grad is not None)

    def worst(net: nn.Module) -> float:
        return max(float((p.grad.double() - want[name].grad).abs().max()) /
                   max(float(want[name].grad.abs().max()), floor)
                   for name, p in net.named_parameters() if p.grad is not None)
    gradient_error, torch_gradient_error = worst(zs), worst(ref)
    loader.wait_ahead()
    before = stats.stats()
    _Step(zs, x8)()
    after = stats.stats()
    _Step(ref, x8)()        # the same step: the two models keep the same weights
    kernel_calls = int(after["kernel_calls"] - before["kernel_calls"])
    fallbacks = int(after["fallback_calls"] + after["torch_choices"] + after["compiling_calls"])

    ref.eval(), zs.eval()

    def eval_call(net):
        def call():
            with torch.no_grad():
                net(x1)
        return call
    evals = time_interleaved({"torch": eval_call(ref), "zeroskip": eval_call(zs)}, repeats,
                             min_time).seconds
    ref.train(), zs.train()
    steps = time_interleaved({"torch": _Step(ref, x8), "zeroskip": _Step(zs, x8)}, repeats,
                             min_time).seconds
    return ModelRow(model.name, model.description, convs, compile_s, output_error,
                    gradient_error, torch_gradient_error, evals["torch"] * 1e3, evals["zeroskip"] * 1e3,
                    steps["torch"] * 1e3, steps["zeroskip"] * 1e3, kernel_calls, fallbacks)


def run_models(names: list[str], eval_batch: int = 1, train_batch: int = 8,
               repeats: int = REPEATS, log: TextIO | None = None) -> dict:
    steady_allocator()
    launcher.ready()        # calls run through the compiled launcher from the first timing
    rows = []
    for name in names:
        row = run_model(MODELS[name], eval_batch, train_batch, repeats)
        rows.append(row)
        if log:
            print(f"{row.name}: eval {row.eval_ratio:.2f}x, train {row.train_ratio:.2f}x, "
                  f"output error {row.output_error:.1e}, gradients from float64 "
                  f"{row.gradient_error:.1e} (torch's {row.torch_gradient_error:.1e})",
                  file=log, flush=True)
    return {"machine": machine(), "eval_batch": eval_batch, "train_batch": train_batch,
            "rows": rows}


def problems(row: ModelRow) -> list[str]:
    """Why a model's figures do not stand: results off torch's, or calls not on kernels."""
    found = []
    if not row.output_error <= TOLERANCE:
        found.append(f"output differs from torch's by {row.output_error:.1e}")
    if not row.gradient_error <= max(GRADIENT_FACTOR * row.torch_gradient_error,
                                     GRADIENT_FLOOR):
        found.append(f"gradients {row.gradient_error:.1e} from float64's, torch's "
                     f"{row.torch_gradient_error:.1e}")
    if row.fallbacks:
        found.append(f"{row.fallbacks} calls not on generated kernels")
    return found


def markdown(report: dict) -> str:
    m = report["machine"]
    rows: list[ModelRow] = report["rows"]
    lines = [f"# Whole models, torch vs zeroskip.convert ({m['date'][:10]})", "",
             f"{m['cpu']}, {m['threads']} threads, float32, torch {m['torch']}, zeroskip "
             f"{m['zeroskip']}. Eval: one call at batch {report['eval_batch']}, no grad. Train: "
             f"forward, mean-square loss, backward and an SGD step at batch "
             f"{report['train_batch']}. Medians of interleaved rounds. Output error: against "
             "torch's, relative to its largest magnitude. Gradients: a training step's, the "
             "worst parameter's distance from a float64 copy's (relative), zeroskip's / "
             "torch's own. Compile: the first eval call and training step, from the run's "
             "cache.", "",
             "| model | convs | eval torch ms | eval zeroskip ms | eval ratio | train torch ms "
             "| train zeroskip ms | train ratio | output error | gradients from float64 | "
             "kernel calls per step | compile s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.description} | {r.convs} | {r.eval_torch_ms:.2f} | "
                     f"{r.eval_zs_ms:.2f} | {r.eval_ratio:.2f}x | {r.train_torch_ms:.1f} | "
                     f"{r.train_zs_ms:.1f} | {r.train_ratio:.2f}x | {r.output_error:.1e} | "
                     f"{r.gradient_error:.1e} / {r.torch_gradient_error:.1e} | "
                     f"{r.kernel_calls} | {r.compile_s:.1f} |")
    if rows:
        lines += ["", f"Geomean: eval {geomean([r.eval_ratio for r in rows]):.2f}x, train "
                  f"{geomean([r.train_ratio for r in rows]):.2f}x."]
    for r in rows:
        for problem in problems(r):
            lines.append(f"- {r.name}: {problem}")
    return "\n".join(lines) + "\n"


def to_json(report: dict) -> dict:
    return {**report, "rows": [dataclasses.asdict(r) for r in report["rows"]]}
