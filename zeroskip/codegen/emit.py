"""KernelPlan -> C source, through the Jinja templates in ``zeroskip/templates/c``.

Templates see only the plan and the small helpers below (index expressions, strides); they
are loaded with ``StrictUndefined``, so a misspelt name is an error, and every template error is
re-raised as :class:`TemplateError` naming the template file and line.
"""
from __future__ import annotations

import functools
import hashlib
import itertools
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import jinja2

from .lower import AxisPlan, KernelPlan, PadPlan, RegionPlan

TEMPLATE_ROOT = Path(str(resources.files("zeroskip") / "templates"))
TEMPLATE_DIR = TEMPLATE_ROOT / "c"
LAYER_TEMPLATE = "layer.c.jinja"
# Triton families: one Python module per operator (templates/triton/layer.py.jinja).
TRITON_FAMILIES = ("direct", "block_sparse", "weight_grad")


class TemplateError(RuntimeError):
    """A template failed to render; the message names the template file and line."""


@functools.lru_cache(maxsize=2)
def environment(backend: str = "c") -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_ROOT / backend)),
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    env.globals.update(affine=affine, flat=flat, strides=strides, prod=math.prod,
                       weight_strides=weight_strides, names=names, at=at,
                       describe_region=describe_region, box=box, taps_of=taps_of,
                       tap_lens=tap_lens, unflatten=unflatten, offset=offset,
                       box_points=box_points, rows_layout=rows_layout,
                       region_members=region_members, axis_lengths=axis_lengths,
                       remainders=remainders, zero_row=zero_row, plane_taps=plane_taps)
    return env


@functools.lru_cache(maxsize=2)
def template_hash(backend: str = "c") -> str:
    """sha256 over every template file of ``backend``: part of each cache key."""
    digest = hashlib.sha256()
    for path in sorted((TEMPLATE_ROOT / backend).glob("*.jinja")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def render(plan: KernelPlan) -> str:
    """The C translation unit of ``plan``."""
    return _render("c", LAYER_TEMPLATE, p=plan)


def render_triton(plan: KernelPlan, family: str) -> str:
    """The Triton module of ``plan`` (lowered with ``backend='triton'``): ``family`` is
    'direct', 'block_sparse' (forward and input-gradient patterns) or 'weight_grad'."""
    # The family is rendered into the source: the constant from the fixed set, never the
    # caller's object (a str subclass could render as anything).
    name = str.__str__(family) if isinstance(family, str) else None
    if name not in TRITON_FAMILIES:
        raise ValueError(f"family must be one of {TRITON_FAMILIES}, got {name or family!r}")
    family = TRITON_FAMILIES[TRITON_FAMILIES.index(name)]
    if (family == "weight_grad") != (plan.pattern == "grad_weight"):
        raise ValueError(f"family {family!r} does not serve the {plan.pattern} pattern")
    return _render("triton", "layer.py.jinja", p=plan, family=family)


def _render(backend: str, template: str, **context) -> str:
    env = environment(backend)
    try:
        return env.get_template(template).render(**context)
    except jinja2.TemplateSyntaxError as exc:
        raise TemplateError(f"{exc.filename or exc.name}:{exc.lineno}: {exc.message}") from exc
    except Exception as exc:  # an error raised while rendering: find the template frame
        where = _template_frame(exc)
        raise TemplateError(f"{where}: {type(exc).__name__}: {exc}") from exc


def _template_frame(exc: BaseException) -> str:
    tb = exc.__traceback__
    where = "<template>"
    while tb is not None:
        name = tb.tb_frame.f_code.co_filename
        if name.endswith(".jinja"):
            where = f"{Path(name).name}:{tb.tb_lineno}"
        tb = tb.tb_next
    return where


# --------------------------------------------------------------------------------- helpers
def affine(u_coef: int, u: str, v_coef: int = 0, v: str = "", c: int = 0) -> str:
    """A C expression for ``u_coef*u + v_coef*v + c``, without zero terms."""
    terms = []
    for coef, name in ((u_coef, u), (v_coef, v)):
        if coef and name:
            terms.append(name if coef == 1 else f"{coef}*{name}")
    if c or not terms:
        terms.append(str(c))
    return "(" + " + ".join(terms).replace("+ -", "- ") + ")"


def names(pattern: str, rank: int) -> list[str]:
    """``pattern.format(a)`` for each axis ``a``: per-axis variable names and lookups."""
    return [pattern.format(a) for a in range(rank)]


def strides(size: tuple[int, ...]) -> tuple[int, ...]:
    """Row-major element strides of a spatial shape."""
    return tuple(math.prod(size[a + 1:]) for a in range(len(size)))


def flat(exprs: list[str], size: tuple[int, ...]) -> str:
    """The row-major offset of per-axis index expressions in a tensor of spatial ``size``."""
    terms = [e if s == 1 else f"{e}*{s}" for e, s in zip(exprs, strides(size))]
    return " + ".join(terms) if terms else "0"


def at(region: RegionPlan, which: str, us: list[str], vs: list[str], size: tuple[int, ...],
       consts: list[str] | None = None) -> str:
    """Row-major offset, in a tensor of spatial ``size``, of index map ``which`` ('lhs', 'rhs'
    or 'out') of ``region`` at the per-axis C expressions ``us`` and ``vs``; ``consts``: the
    maps' constant terms as C expressions (a region class reads them from its table), else
    the region's own."""
    exprs = []
    for i, (axis, u, v) in enumerate(zip(region.axes, us, vs)):
        cu, cv, c = {"lhs": (axis.lu, axis.lv, axis.lc), "rhs": (axis.ru, axis.rv, axis.rc),
                     "out": (axis.ou, 0, axis.oc)}[which]
        if consts is None:
            exprs.append(affine(cu, u, cv, v, c))
        else:
            exprs.append(affine(cu, u, cv, v)[:-1] + f" + {consts[i]})" if cu or cv
                         else f"({consts[i]})")
    return flat(exprs, size)


def region_members(plan: KernelPlan, region: RegionPlan) -> list[RegionPlan]:
    """The regions whose boxes the class of ``region`` holds, in its table's order."""
    found = plan.region_class(region.name)
    by_name = {r.name: r for r in plan.regions}
    return [by_name[name] for name in found.members] if found else [region]


def axis_lengths(regions: list[RegionPlan], axis: int) -> list[int]:
    """Each region's output length along ``axis``."""
    return [r.axes[axis].u_len for r in regions]


def remainders(lengths: list[int], width: int) -> list[int]:
    """The widths of the last, partial tiles that rows of these ``lengths`` leave (tiles of
    ``width``), each once, in order."""
    return sorted({n % width for n in lengths} - {0})


def zero_row(pad: PadPlan) -> tuple[int, int] | None:
    """``(lo, hi)``: the zeros before and after the source row in each padded row of a zero
    padding whose last axis copies its whole row in order (None otherwise)."""
    table = list(pad.index[-1])
    lo = next((i for i, s in enumerate(table) if s >= 0), len(table))
    n = pad.src[-1]
    if pad.mode != "zeros" or table[lo:lo + n] != list(range(n)) or \
            any(s >= 0 for s in table[:lo] + table[lo + n:]):
        return None
    return lo, len(table) - lo - n


@dataclass(frozen=True)
class PlaneTaps:
    """A depthwise, unit-stride weight gradient run over flat planes (``plan.plane_pad``): the
    padded input plane and the output gradient laid out at its row pitch (zeros between rows),
    so that kernel position ``t``'s sum pairs ``gq[q]`` with ``xp[q + offsets[t]]`` for every
    ``q < length`` (whole vectors); ``outs[t]``: where it goes in the weight gradient;
    ``plane``: the buffer ``xp``'s length (the padded plane, then zeros to the last read)."""

    offsets: tuple[int, ...]
    outs: tuple[int, ...]
    length: int
    plane: int


def plane_taps(plan: KernelPlan, region: RegionPlan) -> PlaneTaps:
    pitch = strides(plan.lhs_size)
    out_pitch = strides(plan.out_size)
    points = list(itertools.product(*(range(a.u0, a.u1) for a in region.axes)))
    offsets = tuple(sum((a.lu * u + a.lc) * s for a, u, s in zip(region.axes, pt, pitch))
                    for pt in points)
    outs = tuple(sum((a.ou * u + a.oc) * s for a, u, s in zip(region.axes, pt, out_pitch))
                 for pt in points)
    last = sum((a.v1 - 1) * s for a, s in zip(region.axes, pitch)) + 1
    length = -(-last // plan.lanes) * plan.lanes
    plane = max(math.prod(plan.lhs_size), length + max(offsets))
    return PlaneTaps(offsets, outs, length, -(-plane // plan.lanes) * plan.lanes)


def box_points(region: RegionPlan) -> list[list[str]]:
    """Every point of a region's ``u`` box, row-major, as per-axis C constants."""
    return [[str(u) for u in point] for point in
            itertools.product(*(range(a.u0, a.u1) for a in region.axes))]


def weight_strides(plan: KernelPlan) -> tuple[int, int, int]:
    """Element strides of (group, output channel, contracted channel) in torch's weight tensor
    ``(C_y, C_x / g, *k)``, for the plan's pattern."""
    taps = plan.taps
    if plan.pattern == "forward":   # w[g*c_out + co][ci]
        return plan.c_out * plan.c_red * taps, plan.c_red * taps, taps
    return plan.c_red * plan.c_out * taps, taps, plan.c_out * taps  # w[g*c_red + ci][co]


@dataclass(frozen=True)
class RowsLayout:
    """A ``sparse_rows`` phase's packed weights, as its pack and its sweeps both index them:
    from ``base``, ``[g][tile of vb output channels][block of cbw contracted channels][tap row
    (ksh)][channel][tap column (ksw)][vb]``."""

    ksh: int
    ksw: int
    vb: int
    cbw: int
    blocks: int       # contracted-channel blocks per group
    base: int


def rows_layout(plan: KernelPlan, region: RegionPlan) -> RowsLayout:
    """The packed-weight layout of ``region``, a ``sparse_rows`` phase of ``plan``: after the
    earlier phases' weights."""
    base = 0
    for r in plan.regions:
        if r is region:
            taps = tap_lens(region)
            return RowsLayout(taps[0] if len(taps) == 2 else 1, taps[-1],
                              plan.sparse_vectors * plan.lanes, plan.sparse_block,
                              plan.c_red_packed // plan.sparse_block, base)
        base += plan.groups * plan.c_out_padded * plan.c_red_packed * taps_of(r)
    raise ValueError(f"{region.name} is not a region of the plan")


def describe_region(region: RegionPlan) -> str:
    def rng(a: int, b: int) -> str:
        return f"[{a},{b})"
    axes = ", ".join(f"u{rng(a.u0, a.u1)} v{rng(a.v0, a.v1)}" for a in region.axes)
    return f"{region.label}: {axes}; {region.macs_per_sample} MACs per sample"


# --------------------------------------------------------------------------------- Triton
def box(region: RegionPlan) -> int:
    """Positions in a region's ``u`` box (0 if it is empty)."""
    return math.prod(max(0, a.u_len) for a in region.axes)


def tap_lens(region: RegionPlan) -> list[int]:
    return [max(0, a.v1 - a.v0) for a in region.axes]


def taps_of(region: RegionPlan) -> int:
    """Pairs in a region's ``v`` box: its taps (forward), or its positions (weight gradient)."""
    return math.prod(tap_lens(region))


def unflatten(flat: str, starts: list[int], lens: list[int]) -> list[str]:
    """Python expressions of each axis's index when ``flat`` enumerates the box
    ``[starts, starts + lens)`` in row-major order."""
    exprs = []
    for a, (start, n) in enumerate(zip(starts, lens)):
        inner = math.prod(lens[a + 1:])
        term = flat if inner == 1 else f"{flat} // {inner}"
        if a > 0 and n != 1:
            term = f"({term}) % {n}" if inner != 1 else f"{flat} % {n}"
        elif n == 1:
            term = "0"
        exprs.append(term if start == 0 else f"{start} + {term}" if term != "0" else str(start))
    return exprs


def offset(region: RegionPlan, which: str, part: str, size: tuple[int, ...]) -> str:
    """Row-major offset, in a tensor of spatial ``size``, of index map ``which`` ('lhs', 'rhs'
    or 'out') of ``region``, over the per-axis names ``u{a}`` and ``v{a}``: ``part`` 'u' keeps
    the ``u`` terms and the constant, 'v' the ``v`` terms, 'uv' all of them."""
    terms, const = [], 0
    for a, (axis, stride) in enumerate(zip(region.axes, strides(size))):
        cu, cv, c = {"lhs": (axis.lu, axis.lv, axis.lc), "rhs": (axis.ru, axis.rv, axis.rc),
                     "out": (axis.ou, 0, axis.oc)}[which]
        if "u" in part and cu:
            terms.append(f"{cu * stride}*u{a}")
        if "v" in part and cv:
            terms.append(f"{cv * stride}*v{a}")
        if part != "v":
            const += c * stride
    if const or not terms:
        terms.append(str(const))
    return " + ".join(t.removeprefix("1*") for t in terms).replace("+ -", "- ")