"""The kernel plan: everything a template sees of one operator (never the graph), and its text.

A :class:`KernelPlan` is small frozen records of integers and names: the operator's shapes and
channels, its epilogue, its register tiles, and per region (:class:`RegionPlan`) the template
family that renders it and its axes (:class:`AxisPlan`: the box of positions ``u`` and taps
``v`` with affine index maps). :mod:`.lower` makes plans from graphs; :func:`to_text` writes
one as a few lines that tests state as expected, as the passes' tests state graphs.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

FAMILIES = ("direct", "sparse_gather", "sparse_rows", "weight_grad", "sparse_weight_grad",
            "sparse_weight_grad_rhs")
SPARSE_FAMILIES = ("sparse_gather", "sparse_rows")   # forward and input-gradient sparse kernels


@dataclass(frozen=True)
class AxisPlan:
    """One axis of a region: ``u in [u0, u1)``, ``v in [v0, v1)`` and the index maps
    ``out = ou*u + oc``, ``lhs = lu*u + lv*v + lc``, ``rhs = ru*u + rv*v + rc``."""

    u0: int
    u1: int
    v0: int
    v1: int
    ou: int
    oc: int
    lu: int
    lv: int
    lc: int
    ru: int
    rv: int
    rc: int

    @property
    def u_len(self) -> int:
        return self.u1 - self.u0


@dataclass(frozen=True)
class RegionPlan:
    name: str
    family: str
    label: str
    axes: tuple[AxisPlan, ...]
    macs_per_sample: int      # multiplications per batch element (grad_weight: per batch too)
    vectorize: str            # 'channels' (output channels in vector lanes) or 'positions'
    tile_axis: int            # the axis a register tile runs along
    row_axis: int = -1        # 2-D tiles: the axis a tile's rows step along (-1: one row)
    tile_rows: int = 1        # 2-D tiles: rows per tile (each a whole row of the tile axis)

    @property
    def u_box(self) -> int:
        """Output positions of the region (0 if empty)."""
        return math.prod(max(0, a.u_len) for a in self.axes)


@dataclass(frozen=True)
class PadPlan:
    """Copy the lhs (``src`` spatial shape) into a padded buffer (``dst``), or, as an adjoint,
    scatter-add a padded buffer back; ``index[a][i]`` is the source position of padded ``i``."""

    mode: str
    src: tuple[int, ...]
    dst: tuple[int, ...]
    index: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class RegionClass:
    """Dense regions that one generated function serves, reading each one's box (the bounds of
    ``u`` and ``v`` and the index maps' constants) from a table at run time: they share their
    family, tile axis and index maps' coefficients. ``members``: their names, in plan order."""

    name: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class KernelPlan:
    """Everything the templates need for one operator, batch size excluded."""

    spec: str                 # LayerSpec.describe(), batch shown as N
    history: tuple[str, ...]  # passes that shaped the graph
    pattern: str              # forward | grad_input | grad_weight
    ctype: str                # float | double
    rank: int
    groups: int
    c_red: int                # channels contracted per group
    c_out: int                # output channels per group (grad_weight: C_y / groups)
    lhs_channels: int
    out_channels: int         # channels of the output tensor (grad_weight: C_y)
    lhs_size: tuple[int, ...]  # spatial shape the regions read the data operand at
    rhs_shape: tuple[int, ...]  # full shape of the second operand (weight, or grad_output)
    out_size: tuple[int, ...]  # spatial shape the regions write
    kernel: tuple[int, ...]    # spatial shape of the weight tensor
    bias: bool
    relu: bool                 # a fused ReLU epilogue: max(0, .) as each result is stored
    vector_bytes: int
    c_out_padded: int          # packed weight row length (a multiple of the vector length)
    tile_vectors: int          # vectors of output channels held per register tile
    tile_width: int            # output positions per register tile
    red_block: int             # 'channels' tiles: contracted channels per pass over the output
    pos_channels: int          # 'positions' tiles: output channels per tile (divides c_out)
    pos_vectors: int           # 'positions' tiles: vectors of output positions per tile
    sparse_vectors: int        # sparse tiles: vectors of output channels (divides COUTP/lanes)
    sparse_merge: int          # sparse: m != 0 merges a row's taps into one list walk (below)
    regions: tuple[RegionPlan, ...]
    pad: PadPlan | None = None
    pad_adjoint: PadPlan | None = None
    sparse_block: int = 0      # sparse_rows: contracted channels per zero mask (whole vectors)
    row_block: int = 0         # sparse_rows: output rows per task
    classes: tuple[RegionClass, ...] = ()   # regions sharing one function (boxes in a table)
    plane_pad: bool = False    # the region pads each plane of the data as it reads it (pad)

    def region_class(self, name: str) -> RegionClass | None:
        """The class whose table holds region ``name``, or None (a function of its own)."""
        return self._classes_by_region.get(name)

    @functools.cached_property
    def _classes_by_region(self) -> dict[str, RegionClass]:
        return {name: c for c in self.classes for name in c.members}

    @property
    def lanes(self) -> int:
        return self.vector_bytes // (8 if self.ctype == "double" else 4)

    @property
    def taps(self) -> int:
        return math.prod(self.kernel)

    @property
    def weight_block(self) -> int:
        """Output channels per block of the packed weights, ``[g][block][c_red][tap][block's
        channels]``: one dense register tile's, so a tile streams its weights contiguously
        (rows of all channels would put a tile's vectors a whole row apart, kilobytes for wide
        layers); the whole padded row where a sparse region reads them (it scatters each
        non-zero input into every output channel)."""
        if self.pattern == "grad_weight" or any(r.family in SPARSE_FAMILIES
                                                for r in self.regions):
            return self.c_out_padded
        return self.tile_vectors * self.lanes

    @property
    def packed_elems(self) -> int:
        """Packed weights (``groups x c_red x taps x c_out_padded``, in blocks of
        :attr:`weight_block` channels) then the bias ``[g][c_out_padded]``."""
        if self.pattern == "grad_weight":
            return 0
        return self.groups * self.c_out_padded * (self.c_red_packed * self.taps + 1)

    @property
    def sparse_rows(self) -> bool:
        """Whether the regions are ``sparse_rows`` phases (which pack weights their own way)."""
        return any(r.family == "sparse_rows" for r in self.regions)

    @property
    def c_red_packed(self) -> int:
        """Contracted channels per group in the packed weights: whole zero-mask blocks for
        ``sparse_rows`` (the padding channels hold zeros, which its masks skip)."""
        if self.sparse_rows:
            return -(-self.c_red // self.sparse_block) * self.sparse_block
        return self.c_red

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(sorted({r.family for r in self.regions}))

    @property
    def sparse(self) -> bool:
        """Whether some region multiplies only the data operand's non-zeros."""
        return any(r.family in SPARSE_FAMILIES for r in self.regions)

    @property
    def compressed(self) -> bool:
        """Whether some region reads the compressed pattern of the data operand."""
        return any(r.family == "sparse_gather" for r in self.regions)


def _affine(u: int, v: int, c: int) -> str:
    terms = [f"{k}{name}" if k not in (1, -1) else ("-" if k < 0 else "") + name
             for k, name in ((u, "u"), (v, "v")) if k]
    text = "+".join(terms).replace("+-", "-")
    if c or not text:
        text += f"{c:+d}" if text else str(c)
    return text


def to_text(plan: KernelPlan) -> str:
    """The plan as text: a line of the operator (pattern, type, channels, epilogue), a line of
    its tiles, and a line per region: family, label, and per axis the boxes and index maps as
    ``u=a:b v=c:d out=.. lhs=.. rhs=..``."""
    flags = " ".join(f for f, on in (("bias", plan.bias), ("relu", plan.relu),
                                     (f"pad={plan.pad.mode}" if plan.pad else "", plan.pad),
                                     (f"adjoint={plan.pad_adjoint.mode}" if plan.pad_adjoint
                                      else "", plan.pad_adjoint),
                                     ("per-plane", plan.plane_pad)) if on)
    lines = [f"{plan.pattern} {plan.ctype} rank={plan.rank} groups={plan.groups} "
             f"c_red={plan.c_red} c_out={plan.c_out} lanes={plan.lanes}"
             + (f" {flags}" if flags else ""),
             f"tiles vectors={plan.tile_vectors} width={plan.tile_width} "
             f"c_out_padded={plan.c_out_padded} red_block={plan.red_block} "
             f"positions={plan.pos_channels}x{plan.pos_vectors} sparse={plan.sparse_vectors}"
             + (f" merge={plan.sparse_merge}" if plan.sparse_merge else "")
             + (f" block={plan.sparse_block} rows={plan.row_block}" if plan.sparse_rows else "")]
    for r in plan.regions:
        axes = " ".join(f"{{u={a.u0}:{a.u1} v={a.v0}:{a.v1} out={_affine(a.ou, 0, a.oc)} "
                        f"lhs={_affine(a.lu, a.lv, a.lc)} rhs={_affine(a.ru, a.rv, a.rc)}}}"
                        for a in r.axes)
        rows = f"x{r.tile_rows}@{r.row_axis}" if r.tile_rows > 1 else ""
        lines.append(f"{r.name} {r.family} {r.label} {r.vectorize}@{r.tile_axis}{rows} {axes}")
    for c in plan.classes:
        lines.append(f"{c.name} serves {len(c.members)} regions: {' '.join(c.members)}")
    return "\n".join(lines) + "\n"
