"""``explain(spec, workload)``: run the compiler's front half and report what it did and why."""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import networkx as nx

from .codegen import pipeline
from .codegen.ir import Contract, nodes_of, op, to_json
from .codegen.macs import contract_macs, dense_macs, graph_macs, nonzero_macs
from .spec import DENSE, LayerSpec, Workload


@dataclass(frozen=True)
class PassStep:
    name: str
    graph: nx.DiGraph
    contracts: int
    macs: int


@dataclass(frozen=True)
class Report:
    """What the passes did to one operator.

    ``dense_macs``: multiplications of the naive graph (every zero explicit); ``nonzero_macs``:
    multiplications left after the passes, equal to the closed-form count of products of two
    elements that are not structural zeros; ``steps``: the graph after each step;
    ``strategy``: ``dense`` or ``sparse``, whichever runs most of the multiplications (small
    border regions may differ: ``strategy_macs`` splits the MACs by strategy), with the
    ``reason`` given for the region doing the most multiplications; ``executed_macs``: what the
    kernel multiplies, the non-zero MACs plus any padded zeros of a padding kept as a
    zero-padded copy, which ``padding`` explains (empty without zero padding).
    """

    spec: LayerSpec
    workload: Workload
    dense_macs: int
    nonzero_macs: int
    steps: tuple[PassStep, ...]
    strategy: str
    reason: str
    strategy_macs: dict[str, int]
    executed_macs: int
    padding: str

    @property
    def skipped(self) -> float:
        """Share of the naive graph's multiplications that are never performed."""
        return 1.0 - self.executed_macs / self.dense_macs if self.dense_macs else 0.0

    @property
    def strategy_share(self) -> float:
        """Share of the non-zero MACs that run with ``strategy``."""
        return self.strategy_macs.get(self.strategy, 0) / self.nonzero_macs \
            if self.nonzero_macs else 1.0

    @property
    def graph(self) -> nx.DiGraph:
        """The final graph."""
        return self.steps[-1].graph

    @property
    def graphs(self) -> dict[str, nx.DiGraph]:
        return {step.name: step.graph for step in self.steps}

    def to_dict(self, graphs: bool = False) -> dict[str, Any]:
        data = {
            "spec": self.spec.to_dict(), "workload": self.workload.to_dict(),
            "operator": self.spec.describe(self.workload.batch),
            "dense_macs": self.dense_macs, "nonzero_macs": self.nonzero_macs,
            "skipped": self.skipped, "strategy": self.strategy, "reason": self.reason,
            "strategy_macs": self.strategy_macs, "executed_macs": self.executed_macs,
            "padding": self.padding,
            "passes": [{"name": s.name, "nodes": s.graph.number_of_nodes(),
                        "contracts": s.contracts, "macs": s.macs} for s in self.steps],
        }
        if graphs:
            data["graphs"] = {s.name: to_json(s.graph) for s in self.steps}
        return data

    def to_json(self, graphs: bool = False) -> str:
        return json.dumps(self.to_dict(graphs), indent=2)

    def __str__(self) -> str:
        s, n = self.spec, self.workload.batch
        density = f", input density {self.workload.density:g}" if self.workload.density < 1 \
            else ""
        lines = [s.describe(n) + density,
                 f"  operands {', '.join(f'{k} {list(v)}' for k, v in s.input_shapes(n).items())}"
                 f" -> output {list(s.output_shape(n))}", "",
                 f"  {'step':<16} {'nodes':>5} {'regions':>7} {'MACs':>16}"]
        for step in self.steps:
            lines.append(f"  {step.name:<16} {step.graph.number_of_nodes():>5} "
                         f"{step.contracts:>7} {step.macs:>16,}")
        lines += ["",
                  f"  dense MACs     {self.dense_macs:>16,}",
                  f"  non-zero MACs  {self.nonzero_macs:>16,}",
                  *([f"  executed MACs  {self.executed_macs:>16,}"]
                    if self.executed_macs != self.nonzero_macs else []),
                  f"  skipped        {self.skipped:>16.1%}",
                  f"  strategy       {self.strategy} ({self.strategy_share:.0%} of MACs): "
                  f"{self.reason}",
                  *([f"  padding        {self.padding}"] if self.padding else [])]
        return "\n".join(lines)


def explain(spec: LayerSpec, workload: Workload = DENSE, dump_dir=None) -> Report:
    """Compile ``spec`` through the pipeline at ``workload`` (MACs count its batch, the cost
    model reads its density) and report MACs, graphs and the strategy."""
    workload.check(spec)
    steps = []
    for name, graph in pipeline.run(spec, dump_dir=dump_dir, workload=workload):
        contracts = list(nodes_of(graph, Contract))
        steps.append(PassStep(name, graph, len(contracts), graph_macs(graph)))
    final = steps[-1].graph
    by_strategy: Counter[str] = Counter()
    heaviest, heaviest_macs = None, -1
    for node in nodes_of(final, Contract):
        macs = contract_macs(final, node, nonzero=True)
        by_strategy[op(final, node).strategy] += macs
        if macs > heaviest_macs:
            heaviest, heaviest_macs = node, macs
    strategy = max(by_strategy, key=by_strategy.get) if any(by_strategy.values()) else "dense"
    nonzero = sum(by_strategy.values())
    expected = nonzero_macs(spec, workload.batch)
    if nonzero != expected:  # an exactness bug in a pass: never report a wrong count
        raise AssertionError(f"{spec.describe()}: passes leave {nonzero} MACs, the closed form "
                             f"gives {expected}")
    return Report(spec=spec, workload=workload, dense_macs=dense_macs(spec, workload.batch),
                  nonzero_macs=nonzero,
                  steps=tuple(steps), strategy=strategy, reason=op(final, heaviest).reason,
                  strategy_macs=dict(by_strategy), executed_macs=steps[-1].macs,
                  padding=final.graph.get("padding", ""))
