"""Whole-model training, torch against ``zeroskip.convert``: the same model, the same initial
weights and the same synthetic batches, trained with SGD (momentum 0.9) side by side.

For each model (:data:`MODELS`): ``steps`` steps on each side first, whose losses must agree to
:data:`LOSS_RTOL` relative, or where torch itself does not (BatchNorm makes training chaotic
in float32: torch from weights one ulp away drifts as far) to twice torch's own drift, with no
call falling back to torch's op; then training steps timed in
interleaved rounds (:func:`~zeroskip.runtime.timing.time_interleaved`, medians); then a few
steps of each under ``torch.profiler``, which splits the step into each conv layer's operators
(torch: ``aten::convolution`` and ``aten::convolution_backward``; zeroskip: its three custom
ops), matched to the layers by their operands' shapes. Layers of one shape share a row.

With ``trained``, each model's ReLUs are first set to the density trained networks show
(:func:`trained_like`): SparseTrain's per-layer measurements at convergence (Gong et al., arXiv
1911.10175) put the share of non-zeros at about 0.4 in ResNets and 0.2 in VGG, about 0.5 after
the first layer, where a fresh model's ReLUs pass about half of everything.

All of it first with an empty tuning database of the run's own: zeroskip runs its generated
kernels throughout ("untuned"). With ``tune``, the model's operators are then tuned as a
training step runs them (:func:`tune_model`: torch's op is a candidate of each) and everything
runs again ("tuned"); the rows count the operators that tuning sent to torch's op. With
``online``, everything runs again from another empty database with autotuning in the loop on
(``zeroskip.autotune``: "tuned online"): the row keeps each of the first steps' wall time and
the time spent tuning.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import itertools
import operator
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TextIO

import torch
from torch import nn

from ..conversion import convert
from ..models import CifarResNet, vgg_net
from ..runtime import autotune, launcher, stats, tuning
from ..runtime import online as online_tuning
from ..runtime.timing import MIN_TIME_S, REPEATS, busy, steady_allocator, time_interleaved
from ..trace import trace_specs
from .common import BenchError, _environ, machine

LOSS_RTOL = 1e-3      # the losses of the two sides after each step, relative
LR = 0.02
DATA_BATCHES = 4      # distinct synthetic batches, cycled
TORCH_OPS = {"aten::convolution": "forward", "aten::convolution_backward": "backward"}
ZEROSKIP_OPS = {"zeroskip::convolution": "forward", "zeroskip::relu_convolution": "forward",
                "zeroskip::convolution_grad_input": "grad_input",
                "zeroskip::convolution_grad_weight": "grad_weight"}


@dataclass(frozen=True)
class TrainModel:
    name: str
    describe: str
    build: Callable[[], nn.Module]
    batch: int
    size: int = 32
    classes: int = 10
    trained_density: float = 0.4    # the ReLUs' share of non-zeros after training (the first
                                    # one's: FIRST_RELU_DENSITY)


FIRST_RELU_DENSITY = 0.5
MODELS = {m.name: m for m in (
    TrainModel("cifar-resnet", "CIFAR-style ResNet: 3x3 stem, one basic block per stage "
               "(64/128/256 channels), conv-BN-ReLU", CifarResNet, batch=32,
               trained_density=0.4),
    TrainModel("vgg", "VGG-style net: two conv3x3-ReLU pairs per width (64/128/256), "
               "max-pool after each", vgg_net, batch=16, trained_density=0.2),
)}


@dataclass
class LayerTimes:
    """One row of the per-layer split: the conv layers of one shape, ms per step summed over
    them; ``density``: the share of non-zeros in their input, ``grad_density`` in the gradient
    of their output (where a ReLU follows the conv, masked by it), means over the layers, as
    one training step of torch's model has them."""
    names: list[str]
    shape: str
    density: float
    grad_density: float = 1.0
    torch_ms: dict[str, float] = field(default_factory=dict)
    zeroskip_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class TrainRow:
    model: str
    describe: str
    batch: int
    size: int
    steps: int
    tuned: bool
    trained: bool             # ReLUs set to trained-like densities (:func:`trained_like`)
    torch_ms: float
    zeroskip_ms: float
    contention: float | None
    losses_torch: list[float]
    losses_zeroskip: list[float]
    loss_error: float
    kernel_calls: float       # per step: generated kernels zeroskip ran
    torch_choices: float      # per step: operators tuning sent to torch's op
    layers: list[LayerTimes]
    profiled_torch_ms: float = 0.0
    profiled_zeroskip_ms: float = 0.0
    loss_drift: float = 0.0   # torch against torch from weights one ulp away, relative
    online: bool = False      # tuned in the loop (zeroskip.autotune), from an empty database
    first_steps_ms: list[float] = field(default_factory=list)   # zeroskip's first steps
    tuning_s: float = 0.0     # the time those steps spent tuning
    tuned_cases: int = 0

    @property
    def ratio(self) -> float:
        return self.torch_ms / self.zeroskip_ms

    def images_per_s(self, side: str) -> float:
        return self.batch / (getattr(self, f"{side}_ms") / 1e3)


class Trainer:
    """One side: a model, its SGD optimizer and the batches it cycles through."""

    def __init__(self, model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]],
                 lr: float = LR):
        self.model = model.train()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        self.batches = data
        self.data = itertools.cycle(data)

    def step(self) -> torch.Tensor:
        """One training step; returns its loss (detached)."""
        x, target = next(self.data)
        loss = nn.functional.cross_entropy(self.model(x), target)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.detach()


RELU_FUNCTIONS = (torch.relu, torch.nn.functional.relu)


def _relu_sites(traced: torch.fx.GraphModule) -> list[tuple[torch.fx.Node, nn.Module]]:
    """Each ReLU of ``traced`` (module or function) in execution order, with the module whose
    bias makes its input: the producer itself (a conv or BatchNorm with a bias), or for a
    residual sum the first summand's producer. ReLUs fed otherwise are left out."""
    modules = dict(traced.named_modules())
    sites = []
    for node in traced.graph.nodes:
        is_relu = (node.op == "call_function" and node.target in RELU_FUNCTIONS) or \
            (node.op == "call_method" and node.target == "relu") or \
            (node.op == "call_module" and isinstance(modules[node.target], nn.ReLU))
        if not is_relu:
            continue
        source = node.args[0]
        if source.op == "call_function" and source.target in (torch.add, operator.add):
            source = source.args[0]
        module = modules.get(source.target) if source.op == "call_module" else None
        if getattr(module, "bias", None) is not None:
            sites.append((node, module))
    return sites


class _ReluInput(torch.fx.Interpreter):
    """Runs a traced model and keeps the input of one ReLU node (``watch``)."""

    def __init__(self, traced: torch.fx.GraphModule, watch: torch.fx.Node):
        super().__init__(traced)
        self.watch, self.seen = watch, None

    def run_node(self, n):
        out = super().run_node(n)
        if n is self.watch:
            self.seen = self.env[n.args[0]].detach()
        return out


def trained_like(model: nn.Module, x: torch.Tensor, density: float,
                 first: float = FIRST_RELU_DENSITY) -> list[float]:
    """Shift the bias feeding each ReLU of ``model`` (in place) so that on ``x`` the ReLU
    passes ``density`` of its input (the first one ``first``): the shift is the input's
    ``1 - density`` quantile, each ReLU's measured with the earlier ones already shifted.
    In training mode a BatchNorm's shift moves its output exactly, so the densities hold
    whatever the batch. Returns the densities reached (measured again after each shift), in
    order."""
    traced = torch.fx.symbolic_trace(model)
    sites = _relu_sites(traced)
    if not sites:
        raise BenchError(f"{type(model).__name__}: no ReLU fed by a biased module")
    reached = []
    with torch.no_grad():
        for i, (node, module) in enumerate(sites):
            capture = _ReluInput(traced, node)
            capture.run(x)
            want = first if i == 0 else density
            shift = torch.quantile(capture.seen.flatten()[:1 << 24].float(), 1.0 - want)
            module.bias.sub_(shift)
            capture.run(x)
            reached.append(float((capture.seen > 0).float().mean()))
    return reached


def synthetic_data(model: TrainModel, batch: int, seed: int = 0
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 3, model.size, model.size, generator=gen),
             torch.randint(model.classes, (batch,), generator=gen)) for _ in range(DATA_BATCHES)]


def _shape_key(shape) -> tuple[int, ...]:
    return tuple(int(v) for v in shape)


def _operands(event, op: str) -> tuple:
    """The shapes an operator event is matched by: the forward's (input, weight), torch's
    backward's (grad_output, input, weight), the input gradient's (grad_output, weight), the
    weight gradient's (input, grad_output, weight size: an argument, not an operand)."""
    shapes = [_shape_key(s) for s in event.input_shapes]
    if op == "backward":
        return tuple(shapes[:3])
    if op == "grad_weight":
        return (*shapes[:2], _shape_key(event.concrete_inputs[2]))
    return tuple(shapes[:2])


def _profile(trainer: Trainer, steps: int, ops: dict[str, str]
             ) -> tuple[dict[tuple, float], float]:
    """``({(operator, operand shapes): ms per step}, wall ms per step)`` of ``steps`` steps."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            trainer.step()
        wall = (time.perf_counter() - start) / steps * 1e3
    found: dict[tuple, float] = {}
    for event in prof.events():
        op = ops.get(event.name)
        if op is not None:
            key = (op, _operands(event, op))
            found[key] = found.get(key, 0.0) + event.cpu_time_total / 1e3 / steps
    return found, wall


def gradient_densities(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor]
                       ) -> dict[str, float]:
    """The share of non-zeros in the gradient of each conv module's output (by module name)
    in one training step of a copy of ``model`` on ``data``: 1 where BatchNorm's backward
    follows, about the ReLU's density where a ReLU follows the conv."""
    model = copy.deepcopy(model)
    found: dict[str, float] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            module.register_full_backward_hook(
                lambda m, gin, gout, name=name: found.__setitem__(
                    name, float((gout[0] != 0).float().mean())))
    x, y = data
    with warnings.catch_warnings():   # the first conv's input needs no gradient: as intended
        warnings.simplefilter("ignore", UserWarning)
        nn.functional.cross_entropy(model(x), y).backward()
    return found


def _split(ref: Trainer, zs: Trainer, example: torch.Tensor, batch: int, steps: int
           ) -> tuple[list[LayerTimes], float, float]:
    """Each conv layer's operators, ms per step on each side (see the module docstring)."""
    rows: dict[tuple, LayerTimes] = {}
    grads = gradient_densities(ref.model, ref.batches[0])
    for name, spec, workload in trace_specs(copy.deepcopy(ref.model), example):
        shapes = spec.input_shapes(batch)
        x, w, y = (_shape_key(s) for s in (shapes["input"], shapes["weight"],
                                             spec.output_shape(batch)))
        row = rows.setdefault((x, w, y), LayerTimes([], spec.describe(batch), 0.0))
        count = len(row.names)
        row.density = (row.density * count + workload.density) / (count + 1)
        row.grad_density = (row.grad_density * count + grads.get(name, 1.0)) / (count + 1)
        row.names.append(name)
    by_operands = {}
    for (x, w, y), row in rows.items():
        by_operands.update({("forward", (x, w)): (row, "forward"),
                            ("backward", (y, x, w)): (row, "backward"),
                            ("grad_input", (y, w)): (row, "grad_input"),
                            ("grad_weight", (x, y, w)): (row, "grad_weight")})
    walls = []
    for trainer, ops, side in ((ref, TORCH_OPS, "torch_ms"), (zs, ZEROSKIP_OPS, "zeroskip_ms")):
        found, wall = _profile(trainer, steps, ops)
        walls.append(wall)
        for (op, shapes), ms in found.items():
            hit = by_operands.get((op, shapes))
            if hit is None:
                raise BenchError(f"{op} on operands {shapes} matches no conv layer of the model")
            times = getattr(hit[0], side)
            times[hit[1]] = times.get(hit[1], 0.0) + ms
    return list(rows.values()), walls[0], walls[1]


@contextlib.contextmanager
def _tuning_database(path: Path) -> Iterator[tuning.TuningDB]:
    """The process's tuning database at ``path`` meanwhile (the user's is left alone)."""
    with _environ("ZEROSKIP_TUNING_DB", str(path)):
        tuning.reset()
        try:
            yield tuning.database()
        finally:
            tuning.reset()


def tune_model(model: nn.Module, data: tuple[torch.Tensor, torch.Tensor],
               db: tuning.TuningDB, repeats: int = REPEATS,
               min_time: float = MIN_TIME_S) -> int:
    """Tune every conv layer of ``model`` as a training step on ``data`` runs it, at its batch:
    the forward and the weight gradient at the input density the layer sees, the input
    gradient at the density of its output's gradient (:func:`gradient_densities`); recorded in
    ``db``. Returns the number of operators tuned."""
    done = set()
    example = data[0]
    grads = gradient_densities(model, data)
    for name, spec, work in trace_specs(copy.deepcopy(model), example):
        work = dataclasses.replace(work, grad_density=grads.get(name, 1.0))
        for _, op_spec, density in autotune.operator_cases(spec, work):
            key = (op_spec, tuning.bucket_key(density, work.batch))
            if key not in done:
                done.add(key)
                result = autotune.tune(op_spec, density, repeats, min_time, work.batch)
                db.record(op_spec, density, result.choice, result.ms, batch=work.batch,
                          kernels=result.kernels)
    db.save()
    return len(done)


def build(model: TrainModel, batch: int, seed: int, trained: bool) -> nn.Module:
    """A fresh ``model`` (seeded), its ReLUs at trained-like densities where ``trained``."""
    torch.manual_seed(seed)
    built = model.build()
    if trained:
        trained_like(built, synthetic_data(model, batch, seed)[0][0], model.trained_density)
    return built


def _compare(model: TrainModel, batch: int, steps: int, repeats: int, min_time: float,
             profile_steps: int, seed: int, tuned: bool, trained: bool = False,
             online: bool = False) -> TrainRow:
    """Train fresh copies of ``model`` on both sides: check the losses agree, then time and
    split the steps (``online``: autotuning in the loop on throughout)."""
    reference = build(model, batch, seed, trained)
    reference_copy = copy.deepcopy(reference)
    converted = convert(copy.deepcopy(reference))
    if not any(type(m).__module__ == "zeroskip.nn" for m in converted.modules()):
        raise BenchError(f"{model.name}: convert() replaced no conv module")
    data = synthetic_data(model, batch, seed)
    ref, zs = Trainer(reference, data), Trainer(converted, data)
    losses = {"torch": [float(ref.step()) for _ in range(steps)]}
    before = stats.stats()
    losses["zeroskip"], first_ms = [], []
    for _ in range(steps):
        start = time.perf_counter()
        losses["zeroskip"].append(float(zs.step()))
        first_ms.append((time.perf_counter() - start) * 1e3)
    after = stats.stats()
    ran = {k: (after[k] - before[k]) / steps for k in ("kernel_calls", "torch_choices",
                                                        "fallback_calls")}
    if ran["fallback_calls"]:
        raise BenchError(f"{model.name}: zeroskip fell back to torch's op during training")
    error = _loss_error(losses["zeroskip"], losses["torch"])
    drift = torch_drift(reference_copy, data, steps, losses["torch"])
    allowed = max(LOSS_RTOL, 2 * drift)
    if not error <= allowed:
        raise BenchError(f"{model.name}: zeroskip's losses differ from torch's by {error:.3g} "
                         f"relative (allowed {allowed:.3g}; torch from weights one ulp away "
                         f"drifts {drift:.3g}): {losses}")
    timing = time_interleaved({"torch": ref.step, "zeroskip": zs.step}, repeats, min_time)
    layers, wall_torch, wall_zs = _split(ref, zs, data[0][0], batch, profile_steps)
    return TrainRow(model.name, model.describe, batch, model.size, steps, tuned, trained,
                    timing.seconds["torch"] * 1e3, timing.seconds["zeroskip"] * 1e3,
                    timing.contention, losses["torch"], losses["zeroskip"], error,
                    ran["kernel_calls"], ran["torch_choices"], layers, wall_torch, wall_zs,
                    drift, online, first_ms,
                    after["tuning_seconds"] - before["tuning_seconds"],
                    int(after["tuned_cases"] - before["tuned_cases"]))


def _loss_error(losses: list[float], want: list[float]) -> float:
    return max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(losses, want))


def torch_drift(model: nn.Module, data: list, steps: int, losses: list[float]) -> float:
    """How far torch's own losses move when it trains ``model`` (a fresh copy of the
    reference's initial state) from weights one ulp away (each scaled by 1 + 2**-23): the
    yardstick of float32 rounding amplified by training."""
    nudged = copy.deepcopy(model)
    with torch.no_grad():
        for p in nudged.parameters():
            p.mul_(1 + 2 ** -23)
    trainer = Trainer(nudged, data)
    return _loss_error([float(trainer.step()) for _ in range(steps)], losses)


def run_model(model: TrainModel, batch: int | None = None, steps: int = 20,
              repeats: int = REPEATS, min_time: float = MIN_TIME_S, profile_steps: int = 3,
              seed: int = 0, tune: bool = False, log: TextIO | None = None,
              trained: bool = False, online: bool = False) -> list[TrainRow]:
    """``model`` trained on both sides with an empty tuning database (zeroskip runs its
    generated kernels, as untuned) and, with ``tune``, again after tuning its layers
    (:func:`tune_model`, in a database of this run's own); with ``online``, again from another
    empty database with autotuning in the loop; with ``trained``, from trained-like ReLU
    densities (:func:`trained_like`)."""
    batch = batch or model.batch
    rows = []
    with tempfile.TemporaryDirectory(prefix="zeroskip-train-") as tmp:
        with _tuning_database(Path(tmp) / "tuning.json") as db:
            rows.append(_compare(model, batch, steps, repeats, min_time, profile_steps, seed,
                                 False, trained))
            _log(log, rows[-1])
            if tune:
                data = synthetic_data(model, batch, seed)[0]
                tune_model(build(model, batch, seed, trained), data, db, repeats, min_time)
                rows.append(_compare(model, batch, steps, repeats, min_time, profile_steps,
                                     seed, True, trained))
                _log(log, rows[-1])
        if online:
            with _tuning_database(Path(tmp) / "online.json"), online_tuning.autotuning():
                rows.append(_compare(model, batch, steps, repeats, min_time, profile_steps,
                                     seed, True, trained, online=True))
                _log(log, rows[-1])
    return rows



def _log(log: TextIO | None, row: TrainRow) -> None:
    if log is not None:
        mark = " (others took the CPUs: not to be trusted)" if busy(row.contention) else ""
        print(f"{row.model}, batch {row.batch}, {_mode(row)}: torch "
              f"{row.torch_ms:.1f} ms, zeroskip {row.zeroskip_ms:.1f} ms a step: "
              f"{row.ratio:.2f}x{mark}", file=log, flush=True)
        if row.online:
            print(f"  tuned {row.tuned_cases} cases in {row.tuning_s:.1f} s; the first steps "
                  f"took {', '.join(f'{ms:.0f}' for ms in row.first_steps_ms)} ms", file=log,
                  flush=True)


@dataclass
class TrainReport:
    rows: list[TrainRow]
    machine: dict

    def to_json(self) -> dict:
        return {"machine": self.machine, "train": [
            {**dataclasses.asdict(r), "ratio": r.ratio,
             "images_per_s": {s: r.images_per_s(s) for s in ("torch", "zeroskip")}}
            for r in self.rows]}


def run_train(names: list[str], batch: int | None = None, steps: int = 20,
              repeats: int = REPEATS, min_time: float = MIN_TIME_S, tune: bool = False,
              log: TextIO | None = None, densities: tuple[str, ...] = ("init",),
              online: bool = False) -> TrainReport:
    """:func:`run_model` for each model named (:data:`MODELS`), with :func:`steady_allocator`,
    at each of ``densities``: 'init' (a fresh model's ReLUs) and 'trained' (trained-like)."""
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; the models are {sorted(MODELS)}")
    wrong = sorted(set(densities) - {"init", "trained"})
    if wrong:
        raise ValueError(f"densities must be 'init' or 'trained', got {wrong}")
    pinned = steady_allocator()
    launcher.ready()        # calls run through the compiled launcher from the first timing
    rows = [row for name in names for mode in densities
            for row in run_model(MODELS[name], batch, steps, repeats, min_time, tune=tune,
                                 log=log, trained=mode == "trained", online=online)]
    return TrainReport(rows, {**machine(), "malloc_pinned": pinned})


def _mode(row: TrainRow) -> str:
    tuned = "tuned online" if row.online else "tuned" if row.tuned else "untuned"
    return tuned + (", trained-like" if row.trained else "")


def markdown(report: TrainReport) -> str:
    m = report.machine
    lines = [f"# Whole-model training, torch vs zeroskip ({m['date'][:10]})", "",
             f"{m['cpu']}, {m['threads']} threads, float32, torch {m['torch']}, zeroskip "
             f"{m['zeroskip']}. SGD with momentum 0.9 on synthetic 32x32 images; step = forward, "
             "cross-entropy, backward, optimizer step; medians of interleaved rounds. Max loss "
             "diff: zeroskip against torch over the first N steps, relative; torch's own drift: "
             "torch against torch trained from weights one ulp away (the yardstick of float32 "
             "rounding amplified by training; the losses must agree to 1e-3 or to twice it).",
             "",
             "ReLU densities: 'trained-like' sets each ReLU's share of non-zeros to what trained "
             "networks show (ResNet 0.4, VGG 0.2, the first ReLU 0.5; SparseTrain, arXiv "
             "1911.10175), by shifting the bias that feeds it; otherwise a fresh model's.",
             "",
             "| model | batch | zeroskip | torch ms | zeroskip ms | ratio | torch img/s | "
             "zeroskip img/s | loss after N steps (torch / zeroskip) | max loss diff | "
             "torch's own drift | operators on torch's op |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|---:|---:|---|"]
    for r in report.rows:
        mark = " *" if busy(r.contention) else ""
        ops = r.kernel_calls + r.torch_choices
        lines.append(f"| {r.model} | {r.batch} | {_mode(r)} | {r.torch_ms:.1f} | "
                     f"{r.zeroskip_ms:.1f} | "
                     f"{r.ratio:.2f}x{mark} | {r.images_per_s('torch'):.0f} | "
                     f"{r.images_per_s('zeroskip'):.0f} | {r.losses_torch[-1]:.6f} / "
                     f"{r.losses_zeroskip[-1]:.6f} (N={r.steps}) | {r.loss_error:.1e} | "
                     f"{r.loss_drift:.1e} | {r.torch_choices:g} of {ops:g} |")
    online = [r for r in report.rows if r.online]
    if online:
        lines += ["", "Tuned online: from an empty database, autotuning in the loop on "
                  "(`zeroskip.autotune`); the first steps' wall times (ms, zeroskip's side, "
                  "tuning and kernel builds included).", "",
                  "| model | zeroskip | cases tuned | tuning s | first steps, ms |",
                  "|---|---|---:|---:|---|"]
        lines += [f"| {r.model} | {_mode(r)} | {r.tuned_cases} | {r.tuning_s:.1f} | "
                  f"{', '.join(f'{ms:.0f}' for ms in r.first_steps_ms)} |" for r in online]
    for r in report.rows:
        lines += ["", f"## {r.model} ({_mode(r)}): {r.describe}, batch {r.batch}", "",
                  "ms per step, from 3 profiled steps a side (torch's backward is one op for "
                  "both gradients).", "",
                  "| layers | shape | input density | output-gradient density | torch fwd | "
                  "torch bwd | zeroskip fwd | zeroskip grad_input | zeroskip grad_weight | "
                  "ratio |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for layer in r.layers:
            t, z = layer.torch_ms, layer.zeroskip_ms
            ratio = sum(t.values()) / max(sum(z.values()), 1e-9)
            lines.append(f"| {', '.join(layer.names)} | {layer.shape} | {layer.density:.2f} | "
                         f"{layer.grad_density:.2f} | "
                         f"{t.get('forward', 0):.2f} | {t.get('backward', 0):.2f} | "
                         f"{z.get('forward', 0):.2f} | {z.get('grad_input', 0):.2f} | "
                         f"{z.get('grad_weight', 0):.2f} | {ratio:.2f}x |")
        convs = [sum(sum(getattr(l, s).values()) for l in r.layers)
                 for s in ("torch_ms", "zeroskip_ms")]
        lines.append(f"| everything else (BN, ReLU, pooling, loss, optimizer, profiler) | | | | "
                     f"{r.profiled_torch_ms - convs[0]:.2f} | | "
                     f"{r.profiled_zeroskip_ms - convs[1]:.2f} | | | |")
    return "\n".join(lines) + "\n"


def plot(report: TrainReport, path: Path | str) -> Path:
    """A PNG per model row: each conv layer's step time, torch's bar beside zeroskip's, split
    into operators (drawn on a bare ``Figure``: no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.2 * len(report.rows) + 0.5), layout="constrained")
    axes = fig.subplots(len(report.rows), 1, squeeze=False)[:, 0]
    colors = {"forward": "#4c72b0", "backward": "#dd8452", "grad_input": "#c44e52",
              "grad_weight": "#8172b3"}
    for ax, r in zip(axes, report.rows):
        labels = [f"{l.names[0]}{' +' + str(len(l.names) - 1) if len(l.names) > 1 else ''}"
                  for l in r.layers]
        for offset, side, parts in ((-0.2, "torch_ms", ("forward", "backward")),
                                    (0.2, "zeroskip_ms", ("forward", "grad_input",
                                                          "grad_weight"))):
            left = [0.0] * len(r.layers)
            for part in parts:
                widths = [getattr(l, side).get(part, 0.0) for l in r.layers]
                ax.barh([i + offset for i in range(len(r.layers))], widths, height=0.38,
                        left=left, color=colors[part], edgecolor="white", linewidth=0.5,
                        hatch="" if side == "torch_ms" else "//",
                        label=f"{side.split('_')[0]} {part}")
                left = [a + b for a, b in zip(left, widths)]
        ax.set_yticks(range(len(r.layers)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("ms per training step (profiled)")
        ax.set_title(f"{r.model} ({_mode(r)}), batch {r.batch}: step {r.torch_ms:.0f} ms torch, "
                     f"{r.zeroskip_ms:.0f} ms zeroskip ({r.ratio:.2f}x)", fontsize=10)
        ax.grid(True, axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
