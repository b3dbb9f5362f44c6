"""The reports of a bench run: their rows, the figures and goals computed from them, and one
JSON serialization for all of them (:class:`JsonReport`). Their text is :mod:`.report_text`'s."""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

from . import report_text
from .common import busy, geomean
from .rows import GPU_KINDS, GPU_PATTERN_NOTE, SPARSE_DENSITY, BackwardRow, GpuRow, Overhead, Row

Goal = tuple[str, float, bool, bool]    # (goal, measured value, met, measured under load)


# --------------------------------------------------------------------------------- JSON
def to_plain(value: Any) -> Any:
    """``value`` as JSON data: a dataclass as its fields (``dataclasses.asdict``) followed by
    the derived properties its ``JSON_EXTRAS`` names; dicts, lists and tuples item by item."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {**dataclasses.asdict(value),
                **{name: getattr(value, name) for name in getattr(value, "JSON_EXTRAS", ())}}
    if isinstance(value, dict):
        return {key: to_plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(item) for item in value]
    return value


def from_plain(kind: Any, value: Any) -> Any:
    """JSON data read back as ``kind`` (a resolved annotation): a dataclass from its fields (one
    missing from the data takes its default, else None; other keys, such as the
    ``JSON_EXTRAS``, are ignored), ``list[X]`` item by item, a tuple from a list, ``X | None``
    as X unless None; anything else as it is."""
    if value is None:
        return None
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        return from_plain(next(a for a in args if a is not type(None)), value)
    if origin is list:
        return [from_plain(args[0], item) for item in value]
    if kind is tuple or origin is tuple:
        return tuple(value)
    if dataclasses.is_dataclass(kind):
        hints = typing.get_type_hints(kind)
        values = {}
        for f in dataclasses.fields(kind):
            if f.name in value:
                values[f.name] = from_plain(hints[f.name], value[f.name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                values[f.name] = None
        return kind(**values)
    return value


@dataclass
class JsonReport:
    """What every report has (its ``rows``, the ``machine``, ``batch`` and ``repeats`` they
    ran with) and their one serialization: :meth:`to_json` writes the machine, batch and
    repeats, then the report's :meth:`_body` (its rows, figures and goals; nested under
    ``SECTION`` when set), with every row as :func:`to_plain` writes it; :meth:`from_json`
    rebuilds the report from the fields its annotations name (:func:`from_plain`), skipping
    the figures derived from them."""

    rows: list
    machine: dict
    batch: int
    repeats: int

    SECTION: ClassVar[str | None] = None

    def _body(self) -> dict:
        raise NotImplementedError

    def to_json(self) -> str:
        body = self._body()
        return json.dumps(to_plain({"machine": self.machine, "batch": self.batch,
                                    "repeats": self.repeats,
                                    **({self.SECTION: body} if self.SECTION else body)}),
                          indent=1)

    @classmethod
    def from_json(cls, text: str):
        """A report read back from :meth:`to_json` (to plot or compare a saved run)."""
        data = json.loads(text)
        return from_plain(cls, {**data, **data[cls.SECTION]} if cls.SECTION else data)


def _goal_dicts(goals: list[Goal]) -> list[dict]:
    return [{"goal": g, "value": v, "met": m, "under_load": u} for g, v, m, u in goals]


@dataclass
class LayerReport(JsonReport):
    """A report of one row per layer, each with a ``ratio`` (torch's time over zeroskip's) and
    whether the layer is ``dense``: the geomeans they share."""

    @property
    def geomean_dense(self) -> float | None:
        """Geometric mean of the ratios over the layers without a sparse input."""
        return geomean([r.ratio for r in self.rows if r.dense])

    @property
    def geomean_all(self) -> float | None:
        """Geometric mean of the ratios over every layer."""
        return geomean([r.ratio for r in self.rows])


# --------------------------------------------------------------------------------- forward
@dataclass
class Report(LayerReport):
    rows: list[Row]
    overhead: Overhead = dataclasses.field(kw_only=True)

    @property
    def geomean_frozen(self) -> float | None:
        """Geometric mean of the ratios on frozen weights over every layer that has one."""
        return geomean([r.frozen_ratio for r in self.rows if r.frozen_ratio])

    def goals(self) -> list[Goal]:
        """``(goal, measured value, met, measured under load)`` for each speed goal the run
        measured."""
        o = self.overhead
        found = [("per-call overhead <= 20 us above the kernel", o.overhead_us,
                  o.overhead_us <= 20, busy(o.contention))]
        if self.rows:
            worst = max(self.rows, key=lambda r: r.compile_s)
            found.append(("cold compile <= 2 s per kernel (slowest)", worst.compile_s,
                          worst.compile_s <= 2, False))
        for r in self.rows:
            if r.family == "convT1d-long":
                found.append((f"{r.name} >= 2x torch", r.ratio, r.ratio >= 2,
                              busy(r.contention)))
        wide = [r for r in self.rows if r.wide]
        if wide:
            worst = min(wide, key=lambda r: r.ratio)
            found.append(_goal(f"wide suite: every layer >= 0.95x torch (lowest: {worst.name})",
                               worst.ratio, worst.ratio >= 0.95, [worst]))
            value = geomean([r.ratio for r in wide])
            found.append(_goal("wide suite: geomean >= 1.3x torch", value, value >= 1.3, wide))
        if self.geomean_dense is not None:
            found.append(("geomean over dense layers >= 0.5x torch", self.geomean_dense,
                          self.geomean_dense >= 0.5,
                          any(busy(r.contention) for r in self.rows if r.dense)))
        return found

    def _body(self) -> dict:
        return {"rows": self.rows, "geomean_dense": self.geomean_dense,
                "geomean_all": self.geomean_all, "geomean_frozen": self.geomean_frozen,
                "overhead": self.overhead,
                "goals": _goal_dicts(self.goals())}

    def markdown(self) -> str:
        return report_text.forward_markdown(self)


# --------------------------------------------------------------------------------- densities
def _at(rows: list[Row], density: float) -> list[Row]:
    return [r for r in rows if math.isclose(r.density, density)]


def _goal(goal: str, value: float, met: bool, rows: list[Row]) -> Goal:
    """A goal's line: measured under load when any of the ``rows`` it comes from was."""
    return goal, value, met, any(busy(r.contention) for r in rows)


@dataclass
class SweepReport(JsonReport):
    """A density sweep: one row per layer and input density, in the order they ran."""

    rows: list[Row]

    @property
    def densities(self) -> list[float]:
        """The swept densities, highest first."""
        return sorted({r.density for r in self.rows}, reverse=True)

    def at(self, density: float) -> list[Row]:
        """The rows of ``density``."""
        return _at(self.rows, density)

    def geomean_at(self, density: float) -> float | None:
        """Geometric mean of the ratios at ``density`` over every layer."""
        return geomean([r.ratio for r in _at(self.rows, density)])

    def crossovers(self) -> dict[str, float]:
        """Per :func:`wide_3x3` layer: the highest swept density at which its dispatch ran the
        sparse kernel and was at least as fast as torch (0: at none)."""
        found: dict[str, float] = {}
        for r in self.rows:
            if r.wide_3x3:
                won = r.strategy.startswith("sparse") and r.ratio >= 1
                found[r.name] = max(found.get(r.name, 0.0), r.density if won else 0.0)
        return found

    def goals(self) -> list[Goal]:
        """``(goal, measured value, met, measured under load)`` for each of the speed goals
        that the swept layers and densities measure, computed from the rows."""
        found = []
        if self.rows:
            worst = min(self.rows, key=lambda r: r.ratio)
            found.append(_goal("tuned dispatch >= 0.95x torch at every density on every layer "
                               "(worst)", worst.ratio, worst.ratio >= 0.95, [worst]))
        sparse = _at(self.rows, 0.3)
        if sparse:
            value = self.geomean_at(0.3)
            found.append(_goal("geomean at density 0.3 >= 1.5x", value, value >= 1.5, sparse))
        wide = [r for r in self.rows if r.wide_3x3]
        for density, target in ((0.1, 4), (0.05, 6)):
            rows = _at(wide, density)
            if rows:
                worst = min(rows, key=lambda r: r.ratio)
                found.append(_goal(f"3x3 layers with >= 64 channels: >= {target}x at density "
                                   f"{density:g} (worst)", worst.ratio, worst.ratio >= target,
                                   [worst]))
        crossovers = self.crossovers()
        if crossovers:
            lowest = min(crossovers.values())
            found.append(_goal("crossover of the sparse kernel vs torch at density >= 0.4 "
                               "(lowest over 3x3 layers with >= 64 channels)", lowest,
                               lowest >= 0.4, wide))
        dense = [r for r in _at(self.rows, 1.0) if r.dense and r.dense_ratio]
        if dense:
            value = geomean([r.dense_ratio for r in dense])
            found.append(_goal("generated dense kernel geomean >= 0.7x torch on dense layers "
                               "(density 1)", value, value >= 0.7, dense))
        return found

    def _body(self) -> dict:
        return {"densities": self.densities, "rows": self.rows,
                "geomean_by_density": {f"{d:g}": self.geomean_at(d) for d in self.densities},
                "crossovers": self.crossovers(), "goals": _goal_dicts(self.goals())}

    def markdown(self) -> str:
        return report_text.sweep_markdown(self)


# --------------------------------------------------------------------------------- backward
@dataclass
class BackwardReport(LayerReport):
    """The training step per layer (``ratio``: the whole step's)."""

    SECTION = "backward"

    rows: list[BackwardRow]

    @property
    def geomean_grad_input(self) -> float | None:
        """Geometric mean of the input-gradient ratios over the strided convs."""
        return geomean([r.grad_input_ratio for r in self.rows if r.grad_input_ratio])

    def _body(self) -> dict:
        return {"rows": self.rows, "geomean_all": self.geomean_all,
                "geomean_dense": self.geomean_dense,
                "geomean_grad_input": self.geomean_grad_input}

    def markdown(self) -> str:
        return report_text.backward_markdown(self)


# --------------------------------------------------------------------------------- GPU
def _gpu_goals() -> list[tuple[str, float, Callable[[GpuRow], bool]]]:
    """The GPU speed goals: ``(goal, target ratio, which rows it is about)``."""
    return [
        ("transposed conv on small feature maps (DCGAN and U-Net decoder layers)", 1.3,
         lambda r: r.kind == "forward" and r.op == "conv_transpose"
         and r.family in ("dcgan", "unet-dec")),
        ("conv_grad_input of stride-2 convs", 1.2,
         lambda r: r.kind == "grad_input" and r.op == "conv" and 2 in tuple(r.stride)),
        ("dense 3x3 layers", 0.8,
         lambda r: r.kind == "forward" and r.dense and tuple(r.kernel_size) == (3, 3)),
        (f"block-sparse at {1 - SPARSE_DENSITY:.0%} zeros (block-structured)", 2.0,
         lambda r: r.kind == "sparse-blocks"),
    ]


@dataclass
class GpuReport(JsonReport):
    rows: list[GpuRow]

    @property
    def dtypes(self) -> list[str]:
        return list(dict.fromkeys(r.dtype for r in self.rows))

    @property
    def failures(self) -> list[GpuRow]:
        return [r for r in self.rows if r.failure]

    def geomean(self, kind: str, dtype: str) -> float | None:
        return geomean([r.ratio for r in self.rows
                        if r.kind == kind and r.dtype == dtype and r.ratio])

    def goals(self) -> list[Goal]:
        """``(goal, measured value, met, measured under load)`` for each of the GPU speed
        goals the rows measure, per dtype: the geometric mean of torch/zeroskip over the rows
        the goal is about. A goal with a failed row among them is not met."""
        found = []
        for goal, target, about in _gpu_goals():
            for dtype in self.dtypes:
                rows = [r for r in self.rows if r.dtype == dtype and about(r)]
                timed = [r.ratio for r in rows if r.ratio]
                if not timed:
                    continue
                value = geomean(timed)
                failed = len(rows) - len(timed)
                note = f", {failed} failed" if failed else ""
                found.append((f"{goal} >= {target:g}x cuDNN ({dtype}, geomean over "
                              f"{len(timed)}{note})", value, value >= target and not failed,
                              False))
        return found

    def _body(self) -> dict:
        return {"device": "cuda", "patterns": GPU_PATTERN_NOTE, "rows": self.rows,
                "geomeans": {f"{kind}/{dtype}": self.geomean(kind, dtype)
                             for kind in GPU_KINDS for dtype in self.dtypes},
                "goals": _goal_dicts(self.goals())}

    def markdown(self) -> str:
        return report_text.gpu_markdown(self)
