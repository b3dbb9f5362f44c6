"""KernelPlan -> C source, through the Jinja templates in ``zeroskip/templates/c``.

Templates see only the plan and the small helpers below (index expressions, strides); they
are loaded with ``StrictUndefined``, so a misspelt name is an error, and every template error is
re-raised as :class:`TemplateError` naming the template file and line.
"""
from __future__ import annotations

import functools
import hashlib
import math
from importlib import resources
from pathlib import Path

import jinja2

from .lower import AxisPlan, KernelPlan, RegionPlan

TEMPLATE_DIR = Path(str(resources.files("zeroskip") / "templates" / "c"))
LAYER_TEMPLATE = "layer.c.jinja"


class TemplateError(RuntimeError):
    """A template failed to render; the message names the template file and line."""


@functools.lru_cache(maxsize=1)
def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(str(TEMPLATE_DIR)),
                             undefined=jinja2.StrictUndefined, trim_blocks=True,
                             lstrip_blocks=True, keep_trailing_newline=True)
    env.globals.update(affine=affine, flat=flat, strides=strides, prod=math.prod,
                       weight_strides=weight_strides, names=names, at=at, describe_region=describe_region)
    return env


@functools.lru_cache(maxsize=1)
def template_hash() -> str:
    """sha256 over every template file: part of each cache key."""
    digest = hashlib.sha256()
    for path in sorted(TEMPLATE_DIR.glob("*.jinja")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def render(plan: KernelPlan) -> str:
    """The C translation unit of ``plan``."""
    env = environment()
    try:
        return env.get_template(LAYER_TEMPLATE).render(p=plan)
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


def at(region: RegionPlan, which: str, us: list[str], vs: list[str], size: tuple[int, ...]) -> str:
    """Row-major offset, in a tensor of spatial ``size``, of index map ``which`` ('lhs', 'rhs'
    or 'out') of ``region`` at the per-axis C expressions ``us`` and ``vs``."""
    exprs = []
    for axis, u, v in zip(region.axes, us, vs):
        cu, cv, c = {"lhs": (axis.lu, axis.lv, axis.lc), "rhs": (axis.ru, axis.rv, axis.rc),
                     "out": (axis.ou, 0, axis.oc)}[which]
        exprs.append(affine(cu, u, cv, v, c))
    return flat(exprs, size)


def weight_strides(plan: KernelPlan) -> tuple[int, int, int]:
    """Element strides of (group, output channel, contracted channel) in torch's weight tensor
    ``(C_y, C_x / g, *k)``, for the plan's pattern."""
    taps = plan.taps
    if plan.pattern == "forward":   # w[g*c_out + co][ci]
        return plan.c_out * plan.c_red * taps, plan.c_red * taps, taps
    return plan.c_red * plan.c_out * taps, taps, plan.c_out * taps  # w[g*c_red + ci][co]


def describe_region(region: RegionPlan) -> str:
    def rng(a: int, b: int) -> str:
        return f"[{a},{b})"
    axes = ", ".join(f"u{rng(a.u0, a.u1)} v{rng(a.v0, a.v1)}" for a in region.axes)
    return f"{region.label}: {axes}; {region.macs_per_sample} MACs per sample"
