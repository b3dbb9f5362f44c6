"""Optimized graph -> a :class:`KernelPlan`: which template renders each region, with what constants.

A plan is all a template sees (never the graph): small frozen records of integers and names.
One plan is one C translation unit, whose entry point runs every region of the layer:

* each :class:`~.ir.Contract` becomes a :class:`RegionPlan`. Its family picks the template:
  ``direct`` (dense region of a conv, a trimmed border, or a phase sub-convolution of a
  transposed conv: after the passes they are all a box of taps with affine index maps),
  ``sparse_rows`` (the regions of one phase marked sparse, merged back into one box, whose
  last axis reads consecutive inputs: zeros found in place, a sliding window of accumulators),
  ``sparse_gather`` (any other region marked sparse: it reads the data operand in a compressed
  pattern, each position's non-zero channels, and multiplies only those), ``weight_grad``
  (the weight gradient, touching real taps only), ``sparse_weight_grad`` (a weight gradient
  marked sparse: one region over the whole kernel that walks the data operand's non-zeros;
  the borders it handles itself, so the trimmed regions merge into it) and
  ``sparse_weight_grad_rhs`` (the same walking the output gradient's non-zeros: the
  ``sparse/rhs`` variant);
* a :class:`~.ir.Pad` in a data-carrying mode (reflect, replicate, circular), or a zero
  padding that trim_padding kept (small maps, where weight traffic dominates), becomes index
  tables of a copy into a padded scratch buffer, and a :class:`~.ir.PadAdjoint` the matching
  scatter-add;
* a :class:`~.ir.BiasAdd` is fused into the regions' accumulator initialisation, and a
  :class:`~.ir.Relu` into their stores.

:func:`plan` runs in named stages (operands, epilogue, regions, tiles, then whole-plan
rewrites); :func:`~.plan.to_text` writes a plan as text for tests to state. The batch size
is not part of a plan: kernels take it at run time. A :class:`Variant` holds the knobs the
autotuner turns (:mod:`.variant`); ``None`` keeps the heuristic's choice.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import networkx as nx

from ..spec import LayerSpec
from .ir import (Assemble, BiasAdd, Contract, Input, IRError, Output, Pad, PadAdjoint, Relu,
                 contract_channels, nodes_of, op, operand, parts)
from .macs import contract_macs
from .cost import PAD_PLANE_BYTES, WEIGHT_GRAD_RHS_MIN_ROW, sparse_weight_grad_fits
from .plan import (FAMILIES, SPARSE_FAMILIES, AxisPlan, KernelPlan, PadPlan,  # noqa: F401
                   RegionClass, RegionPlan, to_text)
from .reference import pad_index
from .variant import DEFAULT, Variant

CTYPES = {"float32": "float", "float64": "double"}
# Triton kernels load these and accumulate in float32; the plan's ctype is then the dtype name.
TRITON_DTYPES = ("float32", "float16", "bfloat16")
MAX_RANK = 3
L2_WEIGHT_BYTES = 384 * 1024
LONG_ROW = 16      # forward and input-gradient tiles along rows this long hold 2 vectors


def _registers(vector_bytes: int) -> int:
    return 32 if vector_bytes >= 64 else 16


def tile_shape(c_out: int, lanes: int, vector_bytes: int) -> tuple[int, int]:
    """``(vectors, width)`` of a register tile: output channels x output positions, sized so the
    accumulators, one row of weights and a broadcast input fit the vector register file."""
    vectors = max(1, min(4, -(-c_out // lanes)))
    width = max(1, min(12, (_registers(vector_bytes) - vectors - 2) // vectors))
    return vectors, width


def fit_width(widest: int, rows: list[tuple[int, int]]) -> int:
    """The register tile width for regions whose tile axes have these ``(length, MACs)``: the
    widest tile that fits the registers, except that the main region's rows, where short (at
    most 8 tiles), are split into tiles of balanced widths, as few as the widest would make: a
    narrow last tile costs about what a whole one does (measured at batch 16: a row of 8 as two
    tiles of 4 runs 1.3x faster than as 6 + 2; a row of 14 as 5 + 5 + 4 1.15x faster than as
    6 + 6 + 2)."""
    if not rows:
        return widest
    length = max(rows, key=lambda r: r[1])[0]
    tiles = -(-length // widest)
    return widest if tiles > 8 or length <= widest else -(-length // tiles)


@dataclass(frozen=True)
class Operands:
    """Stage 1 of :func:`plan`: the regions' Contracts and what they read and contract."""

    contracts: tuple[str, ...]     # the Contract nodes, in the Assemble's order
    pattern: str                   # forward | grad_input | grad_weight
    lhs_shape: tuple[int, ...]     # the data operand as the regions read it (padded or not)
    rhs_shape: tuple[int, ...]
    out_shape: tuple[int, ...]     # the regions' output (the Assemble's)
    groups: int
    c_red: int
    c_out: int
    pad: PadPlan | None            # a data-carrying padding copied into a scratch buffer


@dataclass(frozen=True)
class Epilogue:
    """Stage 2: what follows the regions, fused into them or run after them."""

    bias: bool                     # into the accumulators' start
    relu: bool                     # into the stores
    adjoint: PadPlan | None        # a scatter-add pass (the adjoint of a padding)


@dataclass(frozen=True)
class Tiles:
    """Stage 4: the register tiles and blocks of every template family."""

    vectors: int
    width: int
    c_out_padded: int
    red_block: int
    pos_channels: int
    pos_vectors: int
    sparse_vectors: int
    sparse_merge: int


def plan(graph: nx.DiGraph, vector_bytes: int = 32, variant: Variant = DEFAULT,
         backend: str = "c") -> KernelPlan:
    """Lower an optimized, verified graph to a kernel plan; :class:`IRError` if the graph holds a
    node no template of ``backend`` ('c' or 'triton') implements. ``variant``'s strategy must be
    the one the graph was optimized with (``pipeline.run(spec, strategy=...)``); its tile shapes
    apply here (C only: Triton's block sizes are launch-time constants).

    In named stages: :func:`operands`, :func:`epilogue`, :func:`regions` (a template family per
    Contract), :func:`tiles`; then the rewrites of a whole plan (:data:`REWRITES`). The sparse
    weight gradient takes its own road after the regions (one region over the whole kernel)."""
    spec: LayerSpec = graph.graph["spec"]
    ctype = _check_target(spec, backend)
    ops = operands(graph, backend)
    post = epilogue(graph, backend)
    lanes = vector_bytes // (8 if ctype == "double" else 4)
    found = regions(graph, ops, lanes)
    first: Contract = op(graph, ops.contracts[0])
    if ops.pattern == "grad_weight" and first.strategy == "sparse" and backend == "c" and \
            2 * (ops.c_red if variant.rhs else ops.c_out) >= lanes:
        # (Otherwise the dense weight gradient: it serves every layer.)
        return _sparse_weight_grad_plan(graph, spec, ops, found, vector_bytes, lanes, ctype,
                                        variant)
    # A pointwise conv's positions become one axis (_flatten_pointwise): its tiles are sized
    # for that axis, not for one row of it.
    t = tiles(ops, tuple(_pointwise_axis(r, ops.out_shape[2:]) if len(found) == 1 and not ops.pad
                         and ops.pattern != "grad_weight" else r for r in found),
              vector_bytes, lanes, variant)
    result = KernelPlan(
        spec=spec.describe("N"), history=tuple(graph.graph["history"]), pattern=ops.pattern,
        ctype=ctype, rank=spec.rank, groups=ops.groups, c_red=ops.c_red, c_out=ops.c_out,
        lhs_channels=ops.lhs_shape[1],
        out_channels=ops.out_shape[0] if ops.pattern == "grad_weight" else ops.out_shape[1],
        lhs_size=ops.lhs_shape[2:], rhs_shape=ops.rhs_shape, out_size=ops.out_shape[2:],
        kernel=ops.rhs_shape[2:], bias=post.bias, relu=post.relu, vector_bytes=vector_bytes,
        c_out_padded=t.c_out_padded, tile_vectors=t.vectors, tile_width=t.width,
        red_block=t.red_block, pos_channels=t.pos_channels, pos_vectors=t.pos_vectors,
        sparse_vectors=t.sparse_vectors, sparse_merge=t.sparse_merge, regions=found,
        pad=ops.pad, pad_adjoint=post.adjoint)
    for rewrite in REWRITES:
        result = rewrite(result, variant, backend)
    return result


def _check_target(spec: LayerSpec, backend: str) -> str:
    """The plan's element type on ``backend``, or :class:`IRError` where it has no kernel."""
    if backend == "triton":
        if spec.dtype not in TRITON_DTYPES:
            raise IRError(f"no Triton kernel for dtype {spec.dtype!r}; Triton kernels cover "
                          f"{list(TRITON_DTYPES)}")
    elif spec.dtype not in CTYPES:
        raise IRError(f"no C kernel for dtype {spec.dtype!r}; C kernels cover {sorted(CTYPES)}")
    if spec.rank > MAX_RANK:
        raise IRError(f"rank {spec.rank} exceeds {MAX_RANK}")
    return CTYPES[spec.dtype] if backend == "c" else spec.dtype


def operands(graph: nx.DiGraph, backend: str) -> Operands:
    """Stage 1: every region must read the operator's inputs (or one padded copy of its data)."""
    (assemble,) = nodes_of(graph, Assemble)
    contracts = parts(graph, assemble)
    first: Contract = op(graph, contracts[0])
    lhs_node = operand(graph, contracts[0], "lhs")
    rhs_node = operand(graph, contracts[0], "rhs")
    for node in contracts:
        if (operand(graph, node, "lhs"), operand(graph, node, "rhs")) != (lhs_node, rhs_node):
            raise IRError(f"region {node!r} reads other operands than {contracts[0]!r}")
    pad = _pad_plan(graph, lhs_node)
    if pad and backend == "triton":
        raise IRError(f"padding mode {pad.mode!r} has no Triton kernel (zero padding has)")
    data = operand(graph, lhs_node, "src") if pad else lhs_node
    if not isinstance(op(graph, data), Input) or not isinstance(op(graph, rhs_node), Input):
        raise IRError("a region must read the operator's inputs (or one padded copy of its data)")
    lhs_shape = tuple(op(graph, lhs_node).shape)
    rhs_shape = tuple(op(graph, rhs_node).shape)
    _, c_x, c_y = contract_channels(first, lhs_shape, rhs_shape)
    g = first.groups
    c_red, c_out = {"forward": (c_x // g, c_y // g), "grad_input": (c_y // g, c_x // g),
                    "grad_weight": (c_x // g, c_y // g)}[first.pattern]
    return Operands(tuple(contracts), first.pattern, lhs_shape, rhs_shape,
                    tuple(op(graph, assemble).shape), g, c_red, c_out, pad)


def epilogue(graph: nx.DiGraph, backend: str) -> Epilogue:
    """Stage 2: after the regions an optional bias, an optional ReLU, or the adjoint of a
    padding, then the output; anything else has no template."""
    (assemble,) = nodes_of(graph, Assemble)
    (output,) = nodes_of(graph, Output)
    after = next(iter(graph.successors(assemble)))
    bias = isinstance(op(graph, after), BiasAdd)
    if bias:
        after = next(iter(graph.successors(after)))
    relu = isinstance(op(graph, after), Relu)
    if relu:
        after = next(iter(graph.successors(after)))
    adjoint = None
    if isinstance(op(graph, after), PadAdjoint) and not (bias or relu):
        p = op(graph, after)
        adjoint = _pad_table(p.mode, p.shape[2:], p.lo, p.hi)
        if backend == "triton":
            raise IRError(f"padding mode {p.mode!r} has no Triton kernel (zero padding has)")
    elif after != output:
        raise IRError(f"no template implements {type(op(graph, after)).__name__} after the "
                      "regions")
    return Epilogue(bias, relu, adjoint)


def regions(graph: nx.DiGraph, ops: Operands, lanes: int) -> tuple[RegionPlan, ...]:
    """Stage 3: a :class:`RegionPlan` per Contract: its template family (by pattern and
    strategy), its axes, its MACs and how its tiles run (lanes along output channels, or along
    positions where a group has few output channels)."""
    vectorize = "channels" if 2 * ops.c_out >= lanes else "positions"
    if ops.pattern == "grad_weight" and not all(
            (l.rhs.u, l.rhs.v, l.rhs.c) == (0, 1, 0)
            for node in ops.contracts for l in op(graph, node).loops[:1]):
        # The channel tiles read the output gradient in chunks of rows of its outermost axis,
        # which must be the loop's own steps; otherwise dot products along positions.
        vectorize = "positions"
    found = []
    for i, node in enumerate(ops.contracts):
        c: Contract = op(graph, node)
        family = "weight_grad" if c.pattern == "grad_weight" else \
            "sparse_gather" if c.strategy == "sparse" else "direct"
        if family != "weight_grad" and any(l.rhs.u for l in c.loops):
            raise IRError(f"region {node!r}: its weight index depends on the output position")
        axes = tuple(AxisPlan(l.u[0], l.u[1], l.v[0], max(l.v[0], l.v[1]), l.out.u, l.out.c,
                              l.lhs.u, l.lhs.v, l.lhs.c, l.rhs.u, l.rhs.v, l.rhs.c)
                     for l in c.loops)
        macs = contract_macs(graph, node) // max(1, ops.lhs_shape[0])
        found.append(RegionPlan(f"region_{i}", family, c.region, axes, macs, vectorize,
                                _tile_axis(axes, vectorize, lanes)))
    return tuple(found)


def tiles(ops: Operands, found: tuple[RegionPlan, ...], vector_bytes: int, lanes: int,
          variant: Variant) -> Tiles:
    """Stage 4: the dense channel tiles (vectors x positions, balanced on short rows, 2 vectors
    on long ones), their blocks of contracted channels (a block's packed weights in L2), the
    position tiles of depthwise layers, and the sparse tiles (vectors of output channels
    dividing the padded row; merged tap walks where every sparse region allows)."""
    rows = [(r.axes[r.tile_axis].u_len, r.macs_per_sample) for r in found
            if r.family == "direct" and r.vectorize == "channels"]
    vectors = tile_shape(ops.c_out, lanes, vector_bytes)[0]
    if variant.strategy == "dense" and variant.vectors:    # a dense variant's tile height
        vectors = min(variant.vectors, vectors)
    elif rows and vectors > 2 and max(rows, key=lambda r: r[1])[0] >= LONG_ROW:
        # Long rows: tiles of 2 vectors x 12 positions load half the weights (from L2) per
        # multiply-add that 4 x 6 ones do; short rows cannot fill the wider tile.
        vectors = 2
    elif rows:
        # A short row that the tallest tile would split (7 positions, tiles of at most 6): the
        # tallest tile that holds it whole, if one of 2 vectors or more does and pads the
        # channels no further than 10% more. Measured on 512 channels on 7x7 at batch 16:
        # 3 vectors x 7 runs 1.2x faster than 4 x (4 + 3).
        length = max(rows, key=lambda r: r[1])[0]
        padded = -(-ops.c_out // (vectors * lanes)) * vectors
        whole = [v for v in range(2, vectors) if tile_shape(v * lanes, lanes, vector_bytes)[1]
                 >= length and -(-ops.c_out // (v * lanes)) * v <= 1.1 * padded]
        if length > tile_shape(vectors * lanes, lanes, vector_bytes)[1] and whole:
            vectors = max(whole)
    widest = tile_shape(vectors * lanes, lanes, vector_bytes)[1]
    if variant.tile_width:
        width = variant.tile_width
    elif ops.pattern != "grad_weight":
        width = fit_width(widest, rows)
    else:
        width = widest
    c_out_padded = -(-ops.c_out // (vectors * lanes)) * vectors * lanes
    pos_channels = max(d for d in range(1, 5) if ops.c_out % d == 0)
    # A channel tile streams c_red * taps rows of packed weights; keep one block of them in L2.
    row_bytes = math.prod(ops.rhs_shape[2:]) * vectors * vector_bytes
    blocks = -(-ops.c_red // max(8, L2_WEIGHT_BYTES // row_bytes))
    red_block = -(-ops.c_red // blocks)
    pos_vectors = min(4, (_registers(vector_bytes) - 4) // (pos_channels + 1))
    # Sparse tiles hold one output position's channels twice over (two accumulator sets).
    row_vectors = c_out_padded // lanes
    want = (variant.vectors if variant.strategy != "dense" else None) or \
        min(8, _registers(vector_bytes) // 4)
    sparse_vectors = max(v for v in range(1, row_vectors + 1) if row_vectors % v == 0 and
                         v <= want)
    merge = _sparse_merge(list(found), ops.c_red * math.prod(ops.rhs_shape[2:]) * c_out_padded,
                          ops.lhs_shape[-1] * c_out_padded)
    return Tiles(vectors, width, c_out_padded, red_block, pos_channels, pos_vectors,
                 sparse_vectors, merge)


def _axis_maps(regions) -> list[list[tuple[int, ...]]]:
    """Each region's axes as ``(lu, lv, lc, ru, rv, rc, ou, oc)``."""
    return [[(a.lu, a.lv, a.lc, a.ru, a.rv, a.rc, a.ou, a.oc) for a in r.axes] for r in regions]


def serves_sparse_weight_grad(plan: KernelPlan, rhs: bool = False) -> bool:
    """Whether a weight gradient of this plan (dense or sparse) has a sparse kernel: walking
    its input (enough output channels to fill vector lanes) or with ``rhs`` its output
    gradient (enough contracted channels)."""
    return plan.pattern == "grad_weight" and \
        2 * (plan.c_red if rhs else plan.c_out) >= plan.lanes and \
        sparse_weight_grad_fits(_axis_maps(plan.regions))


def walks_output_gradient(plan: KernelPlan) -> bool:
    """Whether untuned dispatch may run this weight gradient's ``sparse/rhs`` kernel (walking
    the output gradient's zeros): where it serves the layer, on rows long enough to repay it
    (``cost.WEIGHT_GRAD_RHS_MIN_ROW``)."""
    return plan.rhs_shape[-1] >= WEIGHT_GRAD_RHS_MIN_ROW and \
        serves_sparse_weight_grad(plan, rhs=True)


def _sparse_weight_grad_plan(graph, spec, ops: Operands, regions, vector_bytes, lanes, ctype,
                             variant) -> KernelPlan:
    """The plan of a sparse weight gradient: the regions (which every axis maps alike) merged
    into one ``sparse_weight_grad`` region over the whole kernel and all output-gradient
    positions. Its register tiles hold ``tile_width`` kernel columns (taps along the last axis)
    x ``tile_vectors`` vectors of output channels; with ``variant.rhs`` (family
    ``sparse_weight_grad_rhs``, walking the output gradient's zeros) of contracted channels,
    and ``c_out_padded`` is then the contracted channels padded to whole tiles."""
    c_red, c_out, g, pad = ops.c_red, ops.c_out, ops.groups, ops.pad
    lhs_shape, rhs_shape = ops.lhs_shape, ops.rhs_shape
    axes = _axis_maps(regions)
    if not sparse_weight_grad_fits(axes):
        raise IRError("no sparse kernel for this weight gradient: its regions map their axes "
                      "differently")
    (assemble,) = nodes_of(graph, Assemble)
    out_size = tuple(op(graph, assemble).shape[2:])
    merged = tuple(AxisPlan(0, n, min(r.axes[i].v0 for r in regions),
                            max(r.axes[i].v1 for r in regions),
                            a.ou, a.oc, a.lu, a.lv, a.lc, a.ru, a.rv, a.rc)
                   for i, (n, a) in enumerate(zip(out_size, regions[0].axes)))
    columns = out_size[-1]
    width = variant.tile_width or min(columns, 8)
    want = variant.vectors or min(8, max(1, (_registers(vector_bytes) - 2) // width))
    lanes_of = c_red if variant.rhs else c_out
    vectors = max(1, min(want, -(-lanes_of // lanes)))
    c_out_padded = -(-lanes_of // (vectors * lanes)) * vectors * lanes
    macs = sum(r.macs_per_sample for r in regions)
    family = "sparse_weight_grad_rhs" if variant.rhs else "sparse_weight_grad"
    region = RegionPlan("region_0", family, "all", merged, macs, "channels", len(merged) - 1)
    return KernelPlan(
        spec=spec.describe("N"), history=tuple(graph.graph["history"]), pattern="grad_weight",
        ctype=ctype, rank=spec.rank, groups=g, c_red=c_red, c_out=c_out,
        lhs_channels=lhs_shape[1], out_channels=op(graph, assemble).shape[0],
        lhs_size=tuple(lhs_shape[2:]), rhs_shape=tuple(rhs_shape), out_size=out_size,
        kernel=tuple(rhs_shape[2:]), bias=False, relu=False, vector_bytes=vector_bytes,
        c_out_padded=c_out_padded, tile_vectors=vectors, tile_width=width, red_block=c_red,
        pos_channels=1, pos_vectors=1, sparse_vectors=vectors, sparse_merge=0,
        regions=(region,), pad=pad)


SPARSE_ROWS_PARTIAL_BYTES = 128 * 1024   # a task's partial sums (output rows x channel tile)
SPARSE_ROWS_MAX_ROWS = 8
SPARSE_ROWS_VECTORS = 4      # vectors of output channels per sparse_rows tile, by default
SPARSE_ROWS_SLICE_BYTES = 24 * 1024   # a sweep's weights: half of a 48 KiB L1 data cache
SPARSE_ROWS_MAX_BLOCK = 64


def _sparse_rows(plan: KernelPlan, variant: Variant, backend: str) -> KernelPlan:
    """A plan whose forward or input-gradient regions are marked sparse, as ``sparse_rows``
    phases where they allow it (else unchanged: ``sparse_gather`` serves every sparse region).
    The regions that map their axes alike (one phase: a conv's interior and trimmed borders, or
    one phase sub-convolution of a transposed conv) merge into one box, whose taps outside the
    input read the packed copy's zeros; each phase's last axis must read consecutive inputs
    (``lu = lv = 1``: stride and dilation 1 there) and rows (rank 2) rise with ``u`` and ``v``.
    Its register tile is a sliding window of as many output columns as the phase has tap
    columns, ``sparse_vectors`` vectors of output channels each."""
    if backend != "c" or plan.pattern == "grad_weight" or plan.rank > 2 or \
            not any(r.family == "sparse_gather" for r in plan.regions):
        return plan
    phases: dict[tuple, list[RegionPlan]] = {}
    for r in plan.regions:
        if r.u_box:
            phases.setdefault(tuple(_axis_maps([r])[0]), []).append(r)
    merged = []
    for maps, members in phases.items():
        axes = tuple(dataclasses.replace(members[0].axes[i],
                                         u0=min(m.axes[i].u0 for m in members),
                                         u1=max(m.axes[i].u1 for m in members),
                                         v0=min(m.axes[i].v0 for m in members),
                                         v1=max(m.axes[i].v1 for m in members))
                     for i in range(plan.rank))
        last = axes[-1]
        if (last.lu, last.lv) != (1, 1) or any(a.ru or a.lu < 1 or a.lv < 1 for a in axes) or \
                math.prod(a.u_len for a in axes) != sum(m.u_box for m in members):
            return plan
        merged.append(RegionPlan(f"region_{len(merged)}", "sparse_rows", members[0].label
                                 if len(members) == 1 else "phase", axes,
                                 sum(m.macs_per_sample for m in members), "channels",
                                 plan.rank - 1))
    widest = max([r.axes[-1].v1 - r.axes[-1].v0 for r in merged], default=1)
    # The window's accumulators, a broadcast input and a mask in the vector registers.
    most = min(8, (_registers(plan.vector_bytes) - 4) // widest)
    if most < 1:
        return plan
    lanes = plan.lanes
    vectors = max(1, min(variant.vectors or SPARSE_ROWS_VECTORS, most, -(-plan.c_out // lanes)))
    width = vectors * lanes
    # Channels per mask walk: as many as keep a sweep's weight slice (channels x tap columns x
    # tile) in L1 with room for the rows it reads; more channels per walk share each output
    # column's trip through the partial sums among more multiply-adds.
    item = plan.vector_bytes // lanes
    block = lanes
    most_block = min(SPARSE_ROWS_MAX_BLOCK, -(-plan.c_red // lanes) * lanes)
    while block < most_block and 2 * block * widest * width * item <= SPARSE_ROWS_SLICE_BYTES:
        block *= 2
    row_bytes = max((r.axes[-1].u_len + 3 * (r.axes[-1].v1 - r.axes[-1].v0)) * width * item
                    for r in merged)
    if row_bytes > SPARSE_ROWS_PARTIAL_BYTES:
        return plan
    return dataclasses.replace(
        plan, regions=tuple(merged), sparse_vectors=vectors, sparse_merge=0,
        c_out_padded=-(-plan.c_out // width) * width, sparse_block=block,
        row_block=max(1, min(SPARSE_ROWS_MAX_ROWS, SPARSE_ROWS_PARTIAL_BYTES // row_bytes)))


def _pointwise_axis(region: RegionPlan, size: tuple[int, ...]) -> RegionPlan:
    """``region`` as one axis of all positions, if it is a whole 1x1, stride-1 box over an
    output of spatial ``size`` whose input positions are the output's (else itself)."""
    identity = len(region.axes) > 1 and all(
        (a.u0, a.u1, a.v0, a.v1, a.ou, a.oc, a.lu, a.lc, a.ru, a.rc) ==
        (0, n, 0, 1, 1, 0, 1, 0, 0, 0) for a, n in zip(region.axes, size))
    if not identity:
        return region
    axis = AxisPlan(0, math.prod(size), 0, 1, 1, 0, 1, 0, 0, 0, 0, 0)
    return dataclasses.replace(region, axes=(axis,), tile_axis=0)


def _flatten_pointwise(plan: KernelPlan, variant: Variant, backend: str) -> KernelPlan:
    """A 1x1, stride-1, unpadded conv maps every input position to the same output position:
    one axis of all positions serves it, so register tiles never end at a row's end."""
    if len(plan.regions) != 1 or plan.rank == 1 or plan.pad or plan.pad_adjoint or \
            plan.sparse_rows or plan.pattern == "grad_weight" or plan.lhs_size != plan.out_size \
            or plan.taps != 1:
        return plan
    region = _pointwise_axis(plan.regions[0], plan.out_size)
    if region is plan.regions[0]:
        return plan
    size = math.prod(plan.out_size)
    return dataclasses.replace(plan, rank=1, lhs_size=(size,), out_size=(size,), kernel=(1,),
                               regions=(region,))


def _sparse_merge(regions: list[RegionPlan], weight_span: int, row_span: int) -> int:
    """The taps of a sparse region along its last axis read consecutive data positions when
    that axis's ``lv`` is +-1; their weight rows then follow the position with slope
    ``m = rv * lv``. If all sparse regions share one ``m``, each list entry of the compressed
    pattern stores ``channel offset + m * position * COUTP`` and a region walks one merged list
    per row of taps (one loop exit instead of one per tap). 0: one walk per tap."""
    slopes = {r.axes[-1].rv * r.axes[-1].lv if abs(r.axes[-1].lv) == 1 else 0
              for r in regions if r.family == "sparse_gather"}
    if len(slopes) != 1 or 0 in slopes or weight_span + max(1, *map(abs, slopes)) * row_span \
            >= 2 ** 31:
        return 0
    return slopes.pop()


def _tile_axis(axes: tuple[AxisPlan, ...], vectorize: str, lanes: int) -> int:
    """The axis a region's register tiles run along: its longest (a border column of a 2-D
    conv is one position wide but many rows long). Lanes along positions prefer the last axis,
    where they load contiguously, unless it is short and another axis is much longer."""
    last = len(axes) - 1
    longest = max(range(len(axes)), key=lambda a: (axes[a].u_len, a))
    if vectorize == "positions" and (axes[last].u_len >= lanes // 2 or
                                     axes[longest].u_len < 2 * axes[last].u_len):
        return last
    return longest


def _pad_table(mode: str, size, lo, hi) -> PadPlan:
    index = tuple(tuple(int(i) for i in pad_index(n, a, b, mode)) for n, a, b in zip(size, lo, hi))
    return PadPlan(mode, tuple(size), tuple(len(t) for t in index), index)


def _pad_plan(graph: nx.DiGraph, node: str) -> PadPlan | None:
    p = op(graph, node)
    if not isinstance(p, Pad):
        return None
    src = op(graph, operand(graph, node, "src")).shape
    return _pad_table(p.mode, src[2:], p.lo, p.hi)


# The regions of a plan that keep functions of their own: its largest, by MACs, until they hold
# OWN_SHARE of its MACs, at most OWN_FUNCTIONS; beyond them (a transposed conv's stride phases,
# a large kernel's trimmed borders) the dense regions of a kind share one function.
OWN_FUNCTIONS = 16
OWN_SHARE = 0.95


def _region_classes(plan: KernelPlan, variant: Variant, backend: str) -> KernelPlan:
    """Where a plan has many regions, the dense ones that differ only in their boxes (bounds,
    and the constants of their index maps) share one generated function that reads each box
    from a table: the compile time follows the layer's shape, not its region count (k=64 s=32
    has 1024 phases). The :data:`OWN_FUNCTIONS` regions with the most MACs (a conv's interior,
    a transposed conv's phase interiors) keep their own, with constant bounds, which the
    compiler unrolls and folds: a shared function's runtime bounds cost 10-40% on the
    few-channel tiles ('positions') where a tap holds little work."""
    if backend != "c" or len(plan.regions) <= OWN_FUNCTIONS:
        return plan
    total, held, own = sum(r.macs_per_sample for r in plan.regions), 0, set()
    for r in sorted(plan.regions, key=lambda r: -r.macs_per_sample)[:OWN_FUNCTIONS]:
        if held >= OWN_SHARE * total:
            break
        own.add(r.name)
        held += r.macs_per_sample
    kinds: dict[tuple, list[str]] = {}
    for r in plan.regions:
        if r.family == "direct" and r.name not in own and all(a.u_len > 0 for a in r.axes):
            key = (r.vectorize, r.tile_axis,
                   tuple((a.ou, a.lu, a.lv, a.ru, a.rv) for a in r.axes))
            kinds.setdefault(key, []).append(r.name)
    shared = [names for names in kinds.values() if len(names) > 1]
    if not shared:
        return plan
    return dataclasses.replace(plan, classes=tuple(
        RegionClass(f"class_{i}", tuple(names)) for i, names in enumerate(shared)))


def _plane_pad(plan: KernelPlan, variant: Variant, backend: str) -> KernelPlan:
    """A padded copy of the data that each output plane reads alone (one dense 'positions'
    region contracting one channel per group: depthwise) is made a plane at a time, in the
    region, into a buffer that stays in L1, instead of as a whole padded tensor in memory. So
    is a depthwise weight gradient's of unit stride, whose output gradient's plane is then
    laid out at the padded row pitch beside it (:func:`.emit.plane_taps`)."""
    region = plan.regions[0]
    if backend != "c" or plan.pad is None or len(plan.regions) != 1 or plan.c_red != 1 or \
            region.vectorize != "positions" or \
            math.prod(plan.pad.dst) * (8 if plan.ctype == "double" else 4) > PAD_PLANE_BYTES:
        return plan
    if region.family == "weight_grad" and not (plan.c_out == 1 and all(
            (a.lv, a.ru, a.rv, a.rc, a.v0, a.v1) == (1, 0, 1, 0, 0, n)
            for a, n in zip(region.axes, plan.rhs_shape[2:]))):
        return plan
    if region.family not in ("direct", "weight_grad"):
        return plan
    return dataclasses.replace(plan, plane_pad=True)


# 'positions' tiles (few output channels per group: depthwise layers) whose rows are short hold
# several rows: independent accumulators enough to keep the multiply-add units busy (a tile of
# one vector chains every tap's multiply-add on the last one's result), up to this share of the
# vector registers.
ROW_TILE_SHARE = 3 / 8


def _row_tiles(plan: KernelPlan, variant: Variant, backend: str) -> KernelPlan:
    """2-D register tiles: a dense 'positions' region of its own function (not a class: its
    bounds are constants) whose rows along the tile axis fit one tile runs tiles of several
    rows, stepping along its longest other axis; each position of a tile is then a constant
    offset from the tile's first, in the input as in the output. Rows are balanced (14 rows
    of at most 8 per tile: two tiles of 7)."""
    if backend != "c" or plan.rank < 2:
        return plan
    classed = {name for c in plan.classes for name in c.members}
    found = []
    for r in plan.regions:
        ta = r.tile_axis
        length = r.axes[ta].u_len
        vectors = -(-length // plan.lanes)
        others = [a for a in range(len(r.axes)) if a != ta]
        ra = max(others, key=lambda a: (r.axes[a].u_len, a))
        if r.family != "direct" or r.vectorize != "positions" or r.name in classed or \
                length <= 0 or vectors > plan.pos_vectors or r.axes[ra].u_len < 2:
            found.append(r)
            continue
        most = max(1, int(_registers(plan.vector_bytes) * ROW_TILE_SHARE)
                   // (plan.pos_channels * vectors))
        rows = r.axes[ra].u_len
        rows = -(-rows // -(-rows // most))
        found.append(r if rows < 2 else dataclasses.replace(r, row_axis=ra, tile_rows=rows))
    return dataclasses.replace(plan, regions=tuple(found))


# Rewrites of a whole plan, in order, after its stages: sparse regions that allow it become
# sparse_rows phases; a pointwise conv's positions become one axis; many dense regions share
# functions; a depthwise region pads its planes itself; short rows of 'positions' regions make
# 2-D tiles.
REWRITES = (_sparse_rows, _flatten_pointwise, _region_classes, _plane_pad, _row_tiles)
