"""The reports as text: a markdown table per report, with the pieces they share (the header,
the load footnote, the goal table), and the density sweep's plot. The reports
(:mod:`.reports`) call these; this module knows them only by what they hold
(:class:`Table`)."""
from __future__ import annotations

import statistics
from pathlib import Path
from typing import Protocol

from .common import _mark, busy
from .rows import GPU_KINDS, GPU_PATTERN_NOTE


class Table(Protocol):
    """What every report holds (``reports.JsonReport``'s fields); each function below reads
    the figures of its own report besides."""

    rows: list
    machine: dict
    batch: int
    repeats: int


def _header(m: dict, batch: int, repeats: int) -> str:
    """The first line of a table: what ran, where and how."""
    return (f"zeroskip {m['zeroskip']} vs torch {m['torch']}, {m['date']}, {m['cpu']}, "
            f"{m['threads']} threads (load average {m['load_avg']} on {m['cpu_count']} "
            f"CPUs), batch {batch}, median of {repeats}"
            + ("" if m.get("malloc_pinned") else ", malloc thresholds not pinned"))


def _load_note(contentions: list[float | None]) -> list[str]:
    """The footnote for timings marked '*' (none when no timing was disturbed)."""
    shares = [c for c in contentions if busy(c)]
    if not shares:
        return []
    return [f"- *: other processes took up to {max(shares):.0%} of the bench's CPUs while this "
            f"was timed ({len(shares)} of {len(contentions)}): unreliable, rerun on a quiet "
            "machine"]


def _goal_table(goals) -> list[str]:
    """The goals as a markdown table: goal, measured, met ('*': measured under load)."""
    return ["", "| goal | measured | met |", "|---|---:|---|"] + [
        f"| {g} | {v:.2f} | {'yes' if met else 'NO'}{' *' if load else ''} |"
        for g, v, met, load in goals]


def _geomean_lines(what: str, report) -> list[str]:
    """The geomean lines over the dense layers and over all layers (those that have one)."""
    return [f"- geomean {what} over {label} ({count}): {value:.2f}x"
            for label, value, count in (
                ("dense layers", report.geomean_dense, sum(r.dense for r in report.rows)),
                ("all layers", report.geomean_all, len(report.rows)))
            if value is not None]


def _cell(text: str) -> str:
    """Text made safe for one markdown table cell."""
    return " ".join(text.replace("|", "/").split())[:300]


def forward_markdown(report: Table) -> str:
    lines = [_header(report.machine, report.batch, report.repeats), "",
             "| layer | shape | torch ms | zeroskip ms | ratio | frozen | GFLOP/s | skipped "
             "| compile s | strategy |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in report.rows:
        frozen = "" if r.frozen_ratio is None else f"{r.frozen_ratio:.2f}x"
        lines.append(f"| {r.name} | {r.shape} | {r.torch_ms:.3f} | {r.zeroskip_ms:.3f} "
                     f"| {r.ratio:.2f}x{_mark(r.contention)} | {frozen} | {r.gflops:.1f} "
                     f"| {r.skipped:.1%} "
                     f"| {r.compile_s:.2f} | {r.strategy} |")
    lines.append("")
    lines += _geomean_lines("ratio", report)
    if report.geomean_frozen is not None:
        lines.append(f"- geomean ratio on frozen weights (zeroskip.freeze: packs kept with no "
                     f"comparison) over all layers: {report.geomean_frozen:.2f}x")
    o = report.overhead
    lines.append(f"- per-call overhead on {o.shape}: zeroskip.functional "
                 f"{o.functional_us:.1f} us, bare kernel {o.kernel_us:.1f} us "
                 f"({o.kernel_threads} thread{'s' if o.kernel_threads > 1 else ''}) -> "
                 f"{o.overhead_us:.1f} us overhead{_mark(o.contention)}; torch "
                 f"{o.torch_us:.1f} us" + (f" (compiled launcher: {o.launcher})"
                                           if o.launcher else ""))
    if report.rows:
        times = [r.compile_s for r in report.rows]
        lines.append(f"- cold compile: median {statistics.median(times):.2f} s, "
                     f"max {max(times):.2f} s")
    lines += _load_note([x.contention for x in (*report.rows, o)])
    lines += _goal_table(report.goals())
    return "\n".join(lines)


def sweep_markdown(report: Table) -> str:
    lines = [_header(report.machine, report.batch, report.repeats)
             + "; ReLU-like inputs of each density (1: random normal)", "",
             "| layer | density | torch ms | zeroskip ms | ratio | strategy | GFLOP/s "
             "| MACs skipped |",
             "|---|---:|---:|---:|---:|---|---:|---:|"]
    for r in report.rows:
        lines.append(f"| {r.name} | {r.density:g} | {r.torch_ms:.3f} | {r.zeroskip_ms:.3f} "
                     f"| {r.ratio:.2f}x{_mark(r.contention)} | {r.strategy} "
                     f"| {r.gflops:.1f} | {r.skipped:.1%} |")
    lines.append("")
    for density in report.densities:
        count = len(report.at(density))
        lines.append(f"- geomean ratio at density {density:g} over {count} layer"
                     f"{'s' if count > 1 else ''}: {report.geomean_at(density):.2f}x")
    crossovers = report.crossovers()
    if crossovers:
        lines.append("- crossover of the sparse kernel vs torch (highest swept density at "
                     "which it ran and was at least as fast): "
                     + ", ".join(f"{name} {d:g}" for name, d in crossovers.items()))
    lines += _load_note([r.contention for r in report.rows])
    lines += _goal_table(report.goals())
    return "\n".join(lines)


def backward_markdown(report: Table) -> str:
    lines = [_header(report.machine, report.batch, report.repeats)
             + "; one training step per call: forward + backward", "",
             "| layer | shape | torch ms | zeroskip ms | ratio | skipped "
             "| grad_input skipped | grad_input ratio | on torch's op |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report.rows:
        gi = ("| - | - |" if r.grad_input_ratio is None else
              f"| {r.grad_input_skipped:.1%} "
              f"| {r.grad_input_ratio:.2f}x{_mark(r.grad_input_contention)} |")
        lines.append(f"| {r.name} | {r.shape} | {r.torch_ms:.3f} | {r.zeroskip_ms:.3f} "
                     f"| {r.ratio:.2f}x{_mark(r.contention)} | {r.skipped:.1%} {gi} "
                     f"{r.torch_ops} of 3 |")
    lines.append("")
    lines += _geomean_lines("fwd+bwd ratio", report)
    strided = [r for r in report.rows if r.grad_input_ratio is not None]
    if strided:
        lines.append(f"- geomean grad_input ratio over strided convs ({len(strided)}): "
                     f"{report.geomean_grad_input:.2f}x")
    lines.append(f"- lowest ratio: {min(r.ratio for r in report.rows):.2f}x "
                 f"({min(report.rows, key=lambda r: r.ratio).name})")
    lines.append("- each step ends with an SGD step on the weights, so zeroskip repacks them "
                 "(forward and grad_input kernels) every step, as in training; operators on "
                 "torch's op are those the tuning database (if any) found torch fastest for")
    lines += _load_note([r.contention for r in report.rows] +
                        [r.grad_input_contention for r in strided])
    return "\n".join(lines)


def gpu_markdown(report: Table) -> str:
    m = report.machine
    tf32 = "TF32" if m.get("tf32") else "IEEE float32"
    lines = [f"zeroskip {m.get('zeroskip')} Triton kernels vs torch {m.get('torch')} "
             f"(cuDNN {m.get('cudnn')}), {m.get('date')}, {m.get('gpu')} (compute "
             f"capability {m.get('capability')}, {m.get('sms')} SMs), CUDA {m.get('cuda')}, "
             f"Triton {m.get('triton')}, batch {report.batch}, float32 as {tf32} on both "
             f"sides; per call: median of {report.repeats} rounds of triton.testing.do_bench's "
             "median (L2 flushed before each call); every result checked against torch "
             "first", "",
             "| layer | kind | dtype | torch ms | zeroskip ms | ratio | config |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in report.rows:
        if r.failure:
            lines.append(f"| {r.name} | {r.kind} | {r.dtype} | - | - | FAILED | "
                         f"{_cell(r.failure)} |")
            continue
        config = r.config + ("" if r.tuned else " (default)")
        lines.append(f"| {r.name} | {r.kind} | {r.dtype} | {r.torch_ms:.4f} "
                     f"| {r.zeroskip_ms:.4f} | {r.ratio:.2f}x | {config} |")
    lines.append("")
    for dtype in report.dtypes:
        means = [f"{kind} {value:.2f}x" for kind in GPU_KINDS
                 for value in [report.geomean(kind, dtype)] if value]
        if means:
            lines.append(f"- geomean ratio, {dtype}: " + ", ".join(means))
    lines.append(f"- {GPU_PATTERN_NOTE}")
    lines.append("- zeroskip times are the Triton kernel launched as zeroskip's dispatch "
                 "launches it (output allocated per call, the weight packed once as its "
                 "cache keeps it), with the config tuned for this GPU where the tuning "
                 "database has one (else the default, marked)")
    if report.failures:
        lines.append(f"- {len(report.failures)} of {len(report.rows)} kernels FAILED (see the "
                     "table): no times for them")
    lines += _goal_table(report.goals())
    return "\n".join(lines)


SPEEDUP_TICKS = (0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 7, 10, 15, 20, 30, 50, 100)


def plot(report: Table, path: Path | str) -> Path:
    """Write a PNG of the speed-up over torch against input density, one line per layer:
    density falls from 1 on the left, both axes logarithmic (2x and 0.5x equally far from the
    dashed line at 1, as fast as torch). Drawn on a bare ``Figure`` (the Agg canvas), so no
    pyplot state or display is involved."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    fig = Figure(figsize=(11, 6), layout="constrained")
    ax = fig.subplots()
    names = list(dict.fromkeys(r.name for r in report.rows))
    for i, name in enumerate(names):
        rows = sorted((r for r in report.rows if r.name == name), key=lambda r: -r.density)
        ax.plot([r.density for r in rows], [r.ratio for r in rows], label=name,
                marker="os^Dv"[i // 10 % 5], markersize=4, linewidth=1.2)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1)
    densities = report.densities
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(max(densities) * 1.1, min(densities) / 1.1)
    ax.xaxis.set_major_locator(FixedLocator(densities))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_major_locator(FixedLocator(SPEEDUP_TICKS))
    ax.yaxis.set_minor_locator(NullLocator())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.set_xlabel("input density (share of non-zeros)")
    ax.set_ylabel("speed-up over torch (torch ms / zeroskip ms)")
    m = report.machine
    ax.set_title(f"zeroskip {m['zeroskip']} vs torch {m['torch']}, {m['cpu']}, "
                 f"{m['threads']} threads, batch {report.batch}", fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path
