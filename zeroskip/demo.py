"""``zeroskip demo``: the built-in networks on generated kernels, checked against torch.

For each network: convert a copy with :func:`zeroskip.convert`, run both on the sample input and
compare; then, per conv layer, the MACs the compiler skips (forward) and the time of torch's
module and of the converted one on the input that layer saw. Then the MACs of every layer's
forward and backward operators, which a training step runs. Finally a density sweep
(:mod:`zeroskip.bench`) of a few layers: each on ReLU-like inputs from dense to 5% non-zeros,
against torch, with the strategy zeroskip's per-call dispatch chose.
"""
from __future__ import annotations

import copy
from typing import TextIO

from .explain import Report, explain
from .spec import LayerSpec, Workload

SWEEP_DENSITIES = (1.0, 0.3, 0.1, 0.05)
SWEEP_LAYERS = 3


def training_ops(spec: LayerSpec) -> list[tuple[str, LayerSpec]]:
    """The three operators a training step runs for one conv layer."""
    return [("forward", spec), ("grad_input", spec.grad_input()),
            ("grad_weight", spec.grad_weight())]


def totals(reports: list[Report]) -> tuple[int, int, float]:
    """``(dense MACs, non-zero MACs, share skipped)`` summed over the reports."""
    dense = sum(r.dense_macs for r in reports)
    nonzero = sum(r.nonzero_macs for r in reports)
    return dense, nonzero, (1 - nonzero / dense if dense else 0.0)


def layer_rows(reference, converted, sample) -> list[dict]:
    """Per conv layer of ``reference`` (torch) and its ``converted`` twin: spec, report, times."""
    import torch

    from .runtime import launcher
    from .runtime.timing import time_interleaved
    from .trace import CONV_TYPES, spec_of

    seen: dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, name=name: seen.setdefault(
        name, args[0].detach())) for name, m in reference.named_modules()
        if isinstance(m, CONV_TYPES)]
    try:
        reference(sample)
    finally:
        for handle in handles:
            handle.remove()
    twins = dict(converted.named_modules())
    launcher.ready()        # the calls are timed as they will run (and not beside its build)
    rows = []
    for name, module in reference.named_modules():
        if name not in seen:
            continue
        x = seen[name]
        density = float((x != 0).sum()) / max(x.numel(), 1)
        spec = spec_of(module, tuple(x.shape))
        workload = Workload(x.shape[0], round(density, 4))
        timing = time_interleaved({"torch": lambda: module(x), "zeroskip": lambda: twins[name](x)},
                                  repeats=5, min_time=0.005)
        rows.append(dict(name=name, spec=spec, workload=workload,
                         report=explain(spec, workload),
                         torch_ms=timing.seconds["torch"] * 1e3,
                         zeroskip_ms=timing.seconds["zeroskip"] * 1e3))
    return rows


def table(net: str, rows: list[dict]) -> str:
    lines = ["| layer | operator | input density | MACs skipped | torch ms | zeroskip ms "
             "| speed-up |", "|" + "---|" * 7]
    for row in rows:
        r: Report = row["report"]
        lines.append(f"| {net}.{row['name']} | {r.spec.describe().split(' on ')[0]} "
                     f"| {r.workload.density:.2f} | {r.skipped:.1%} | {row['torch_ms']:.3f} "
                     f"| {row['zeroskip_ms']:.3f} | {row['torch_ms'] / row['zeroskip_ms']:.2f}x |")
    return "\n".join(lines)


def sweep_layers(named_specs: list[tuple[str, str, LayerSpec, Workload]],
                 count: int = SWEEP_LAYERS) -> list[tuple]:
    """Up to ``count`` layers of distinct shapes from ``(name, network, spec, workload)``, each as
    ``(bench.Layer at batch 1, the batch it ran at)``: 3x3 convs with at least 32 channels
    first, where skipping input zeros pays most, then the others with the most MACs."""
    from .bench import Layer
    from .codegen.macs import dense_macs

    def order(item):
        spec = item[2]
        wide = spec.kernel_size == (3, 3) and spec.groups == 1 and \
            min(spec.in_channels, spec.out_channels) >= 32
        return not wide, -dense_macs(spec)
    chosen: dict[LayerSpec, tuple] = {}
    for name, net, spec, workload in sorted(named_specs, key=order):
        chosen.setdefault(spec, (name, net, workload.batch))
    return [(Layer(name, net, spec), batch)
            for spec, (name, net, batch) in list(chosen.items())[:count]]


def density_table(rows: list) -> str:
    """One line per layer and density of a sweep (``bench.Row``); ratios timed while other
    processes took the CPUs are marked, as in ``zeroskip bench``."""
    from .bench import _mark
    from .runtime.timing import BUSY, busy

    lines = ["| layer | operator | density | torch ms | zeroskip ms | ratio | strategy |",
             "|" + "---|" * 7]
    lines += [f"| {r.name} | {r.shape.split(' on ')[0]} | {r.density:g} | {r.torch_ms:.3f} "
              f"| {r.zeroskip_ms:.3f} | {r.ratio:.2f}x{_mark(r.contention)} | {r.strategy} |"
              for r in rows]
    if any(busy(r.contention) for r in rows):
        lines.append(f"\n*: other processes took over {BUSY:.0%} of the CPUs while this was "
                     "timed: unreliable")
    return "\n".join(lines)


def density_sweep(named_specs: list[tuple[str, str, LayerSpec, Workload]], out: TextIO
                  ) -> bool:
    """Sweep :func:`sweep_layers` over :data:`SWEEP_DENSITIES`, printing the table; return
    whether zeroskip matched torch throughout."""
    from .bench import BenchError, sweep_layer

    layers = sweep_layers(named_specs)
    print(f"\n## Input density sweep: {len(layers)} layers on ReLU-like inputs (random weights), "
          "each checked against torch, then timed\n", file=out)
    rows = []
    try:
        for layer, batch in layers:
            rows += sweep_layer(layer, SWEEP_DENSITIES, batch, repeats=3, min_time=0.005)
    except BenchError as exc:
        print(f"FAILED: {exc}", file=out)
        return False
    print(density_table(rows), file=out)
    print("\nstrategy: what zeroskip's per-call dispatch ran on that input: its dense kernel, "
          "the sparse kernel (reads only the non-zero inputs), a tuned variant, or torch's op "
          "where `zeroskip tune` found torch fastest. `zeroskip bench --densities` runs this "
          "sweep on the benchmark suite.", file=out)
    return True


def run(out: TextIO) -> bool:
    """Run the demo, printing to ``out``; return whether every network matched torch."""
    import torch

    from . import convert, stats
    from .models import builtin_workload
    from .runtime import launcher

    launcher.module()       # its build starts now, beside the first kernels' (see layer_rows)
    stats(reset=True)
    ok = True
    training: list[Report] = []
    named_specs: list[tuple[str, str, LayerSpec, Workload]] = []
    with torch.no_grad():
        for net, model, sample in builtin_workload():
            converted = convert(copy.deepcopy(model))
            want, got = model(sample), converted(sample)
            error = float((got - want).abs().max())
            match = torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
            ok &= match
            rows = layer_rows(model, converted, sample)
            print(f"\n## {net}: {type(model).__name__} on input {list(sample.shape)}, "
                  f"{len(rows)} conv layers; output {'matches' if match else 'DIFFERS FROM'} "
                  f"torch (max |difference| {error:.2e})\n", file=out)
            print(table(net, rows), file=out)
            training += [explain(op, Workload(row["workload"].batch))
                         for row in rows for _, op in training_ops(row["spec"])]
            named_specs += [(f"{net}.{row['name']}", net, row["spec"], row["workload"])
                            for row in rows]
    counts = stats()
    print(f"\nGenerated kernels: {counts['kernel_calls']} calls, {counts['compiles']} compiled, "
          f"{counts['cache_hits']} from the cache, {counts['fallback_calls']} fallbacks to torch.",
          file=out)
    dense, nonzero, skipped = totals(training)
    print(f"Forward and backward operators of every layer: {dense:,} dense MACs -> {nonzero:,} "
          f"non-zero MACs ({skipped:.1%} skipped).", file=out)
    return density_sweep(named_specs, out) and ok
