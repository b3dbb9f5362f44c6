"""The compiler's front half in one list: read PIPELINE to know what happens to a layer.

``run(spec)`` lowers the spec to the naive graph and applies each pass in order, verifying the
graph after every step. With ``ZEROSKIP_DUMP=dir`` (or ``dump_dir=``) each step's graph is
written there as ``<NN>-<step>.json`` and ``.dot``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

import networkx as nx

from ..spec import DENSE, LayerSpec, Workload
from . import frontend
from .ir import to_dot, to_json, verify
from .passes import choose_strategy, densify_zeros, skip_dilation, trim_padding

Pass = Callable[[nx.DiGraph], nx.DiGraph]

PIPELINE: list[tuple[str, Pass]] = [
    ("trim_padding", trim_padding),      # border regions keep only in-range taps
    ("densify_zeros", densify_zeros),    # transposed conv -> dense phase sub-convolutions
    ("skip_dilation", skip_dilation),    # kernel holes and Sk-dilated weight gradients
    ("choose_strategy", choose_strategy),  # dense or sparse per region, from the cost model
]


def run(spec: LayerSpec, dump_dir: str | os.PathLike | None = None, strategy: str = "auto",
        workload: Workload = DENSE, target: str = "c") -> list[tuple[str, nx.DiGraph]]:
    """``[("frontend", naive graph), (pass name, graph after it), ...]`` of ``spec`` at the
    workload's batch (choose_strategy's cost model reads its density); ``strategy`` ('dense'
    or 'sparse') overrides the cost model, as the autotuner does; ``target`` ('c' or 'triton')
    names the kernels the graph is for (trim_padding keeps a zero padding for C only)."""
    graph = frontend.lower(spec, workload)
    if strategy != "auto":
        graph.graph["strategy"] = strategy
    graph.graph["target"] = target
    steps = [("frontend", graph)]
    for name, pass_fn in PIPELINE:
        graph = verify(pass_fn(graph))
        steps.append((name, graph))
    dump_dir = dump_dir or os.environ.get("ZEROSKIP_DUMP")
    if dump_dir:
        dump(spec, steps, Path(dump_dir))
    return steps


def dump_folder(spec: LayerSpec, root: Path) -> Path:
    """Where the dumps of ``spec`` go: ``root/<spec slug>/``."""
    return root / re.sub(r"[^A-Za-z0-9_.=-]+", "_", spec.describe()).strip("_")[:120]


def dump(spec: LayerSpec, steps: list[tuple[str, nx.DiGraph]], root: Path) -> Path:
    """Write every step's graph as JSON and DOT under ``root/<spec slug>/``; return that folder."""
    folder = dump_folder(spec, root)
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, graph) in enumerate(steps):
        stem = folder / f"{i:02d}-{name}"
        stem.with_suffix(".json").write_text(json.dumps(to_json(graph), indent=1))
        stem.with_suffix(".dot").write_text(to_dot(graph))
    return folder
