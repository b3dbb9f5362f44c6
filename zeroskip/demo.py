"""``zeroskip demo``: explain every conv of the built-in networks, forward and backward."""
from __future__ import annotations

from typing import TextIO

from .explain import Report, explain
from .spec import LayerSpec


def training_ops(spec: LayerSpec) -> list[tuple[str, LayerSpec]]:
    """The three operators a training step runs for one conv layer."""
    return [("forward", spec), ("grad_input", spec.grad_input()),
            ("grad_weight", spec.grad_weight())]


def totals(rows: list[tuple[str, str, Report]]) -> tuple[int, int, float]:
    """``(dense MACs, non-zero MACs, share skipped)`` summed over the rows."""
    dense = sum(r.dense_macs for _, _, r in rows)
    nonzero = sum(r.nonzero_macs for _, _, r in rows)
    return dense, nonzero, (1 - nonzero / dense if dense else 0.0)


def table(rows: list[tuple[str, str, Report]]) -> str:
    """A markdown table of the reports, with totals."""
    head = ("| layer | op | operator | density | dense MACs | non-zero MACs | skipped "
            "| strategy |")
    lines = [head, "|" + "---|" * 8]
    for layer, which, r in rows:
        lines.append(f"| {layer} | {which} | {r.spec.describe().split(' on ')[0]} "
                     f"| {r.spec.density:.2f} | {r.dense_macs:,} | {r.nonzero_macs:,} "
                     f"| {r.skipped:.1%} | {r.strategy} |")
    dense, nonzero, skipped = totals(rows)
    lines.append(f"| **total** | | | | {dense:,} | {nonzero:,} | {skipped:.1%} | |")
    return "\n".join(lines)


def run(out: TextIO) -> list[tuple[str, str, Report]]:
    from .models import builtin_workload
    from .trace import trace_specs

    rows = []
    for net, model, sample in builtin_workload():
        layers = trace_specs(model, sample)
        print(f"\n## {net}: {type(model).__name__} on input {list(sample.shape)}, "
              f"{len(layers)} conv layers\n", file=out)
        net_rows = [(f"{net}.{name}", which, explain(op_spec))
                    for name, spec in layers for which, op_spec in training_ops(spec)]
        print(table(net_rows), file=out)
        rows += net_rows
    dense, nonzero, skipped = totals(rows)
    print(f"\nEvery layer, forward and backward: {dense:,} dense MACs -> {nonzero:,} non-zero "
          f"MACs ({skipped:.1%} skipped)", file=out)
    return rows
