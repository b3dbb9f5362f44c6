"""The cost model: dense or sparse, in units of one dense multiply-accumulate (MAC).

The data operand (lhs) of a layer after a ReLU is mostly zero. A *sparse* kernel multiplies only
its non-zeros; a *dense* kernel multiplies everything it reads. Which sparse kernel serves a
Contract follows from its index maps (:func:`rows_serve`), and each has its own line:

* ``sparse_rows`` (a forward or input-gradient phase whose last axis reads consecutive inputs,
  rank <= 2) finds zeros in place, one mask per block of channels at each input column, and
  broadcasts each non-zero into a sliding window of accumulators; its weights are FMA memory
  operands from L1. Per dense MAC::

      sparse = ROWS_FIXED + density * ROWS_SCATTER

  ``ROWS_FIXED`` is the work that does not shrink with the zeros (copying the rows it reads,
  the masks, each output column's trips through the partial sums), ``ROWS_SCATTER`` what a
  non-zero MAC costs against a dense one (one weight load per FMA where the dense tiles reuse
  theirs from registers).
* ``sparse_gather`` (every other forward and input-gradient region: strided or dilated along
  the last axis, rank 3) walks a compressed pattern, each position's list of non-zero channels::

      sparse = density * SCATTER_COST + SCAN_COST / reuse

  ``reuse`` is how many multiplications each data element feeds (output channels per group
  times the Contract's pairs per distinct data index).
* the sparse weight gradient walks the non-zeros of its data operand (the layer's input) and
  adds each, times a vector of output-gradient channels, into register accumulators of every
  kernel column it meets: ``WEIGHT_GRAD_FIXED + density * WEIGHT_GRAD_SCATTER`` per dense MAC
  where each input feeds 3 or more kernel columns (:func:`weight_grad_crossover`).

Contracts too small to repay a sparse pass stay dense, and so do Contracts with few output
channels per group (a sparse MAC broadcasts one input over them: too few fill too few lanes).
The autotuner measures instead of modelling; the constants here only need the crossover in the
right place for layers nobody tuned. This module is pure arithmetic on numbers the IR passes
hand it: no graph, no torch.
"""
from __future__ import annotations

# sparse_rows, measured at batch 16 on the suite's 3x3 convs of 64-512 channels on 56x56-14x14
# maps, forward and input gradient (Xeon, AVX-512, 2 threads, 2026-12-06;
# `benchmarks/bench_ops.py --densities 1 0.5 0.3 0.2 0.1`): the time at density 0 is 0.14-0.24
# of the dense kernel's and each unit of density adds 1.04-1.2 of it; it breaks even between
# density 0.7 and 0.8 (on 112x112 maps, where the dense kernel is memory-bound too, above 1).
ROWS_FIXED = 0.17
ROWS_SCATTER = 1.1
SCATTER_COST = 5.0     # a sparse_gather MAC: one position's weights per load, no register reuse
                       # (measured over the suite at batch 1, 2026-11-30: it overtakes the dense
                       # kernel between density 0.1 and 0.3, near 0.2)
SCAN_COST = 1.0        # sparse_gather: reading one data element and testing it for zero
MIN_SPARSE_MACS = 4096  # below this, the sparse setup does not pay off
MIN_SPARSE_CHANNELS = 8  # output channels per group a scattered input must feed
# The weight-gradient variant that walks the output gradient's zeros instead: the same kernel
# with the roles swapped, so the sparser operand is the one to walk. Measured at batch 16
# (2026-12-06) on 64-256 channels and rows of 4-32: walking an output gradient at density
# 0.1-0.3 beats walking an input at 0.2-0.5 by 1.2-2x and the dense kernel by 1.2-2.9x.
# Dispatch runs it where the output gradient is sparser than the input and below this density,
# on rows at least this long.
WEIGHT_GRAD_RHS_CROSSOVER = 0.5
WEIGHT_GRAD_RHS_MIN_ROW = 4
# The sparse weight gradient where each input feeds 3 or more kernel columns, measured at
# batch 16 on the suite's 3x3 convs of 64-256 channels (2026-12-06, `bench_ops.py --densities`):
# the time at density 0 is 0.22-0.33 of the dense kernel's and each unit of density adds
# 1.25-1.3 of it (crossover near 0.55). Feeding fewer columns, a non-zero's overhead is shared
# by fewer multiply-adds: stride-2 3x3 layers cross near 0.2, 1x1 ones near 0.1 or never.
WEIGHT_GRAD_FIXED = 0.3
WEIGHT_GRAD_SCATTER = 1.27

# Zero padding: trimmed into border regions (every tap a region keeps lands inside the input),
# unless weight traffic dominates: each region streams its own taps' weights (a 3x3 conv on a
# 4x4 map has 9 regions and 49 tap slices to stream instead of 9) and runs its own, often
# one-position wide, register tiles. Then a zero-padded copy of the data is one box over every
# output, each weight read once per tile. Measured at batch 1, 8 and 16 against the trimmed
# kernel (Xeon, AVX-512, 2 threads, 2026-12-06): 3x3 convs with 9-59 MB of weights on 4x4-16x16
# maps (border 17-64% of the MACs) run their forward 1.07-2.8x faster kept; with 2.4 MB (256
# channels, 14x14) as fast either way; a 64-channel 56x56 one (border 7%) 1.5x slower; so is a
# dilated 3x3 on 33x33 whose border regions are 6 outputs wide (their tiles are not thin), 1.2x.
# Depthwise layers measured slower with a whole padded copy at every size: they pad each plane
# in the kernel instead (below).
PAD_WEIGHT_BYTES = 4 << 20  # keep only where the weights are at least this large (beyond L2)
PAD_BORDER_SHARE = 0.15    # and the border regions hold at least this share of the MACs
PAD_WASTE = 1.5            # and the copy multiplies at most this many times the non-zero MACs
PAD_MIN_CHANNELS = 8       # output channels per group (fewer: tiles along positions)
PAD_THIN_BORDER = 4        # and no axis has more border outputs than this (both sides)
# Depthwise layers (one contracted channel per group) keep their zero padding where a padded
# plane is this small: each plane is then padded in the kernel as its tiles read it (in L1),
# and the tiles run whole rows, several at a time, instead of each border region's short ones.
# Measured against the trimmed kernel (forward, Xeon AVX-512, 2 threads, 2026-12-06): 3x3 and
# 5x5 on 7x7-56x56 maps 1.3-3.7x faster kept, 3x3 on 112x112 (a 51 KiB plane) 1.5x; strided, a
# 56x56 map 1.2x faster, a 112x112 one 1.15x slower (a quarter of the outputs per plane
# copied). Their weight gradients of unit stride, over flat padded planes, 3.7-6.8x.
PAD_PLANE_BYTES = 64 << 10
PAD_PLANE_BYTES_STRIDED = 32 << 10


def keep_zero_padding(nonzero: int, padded: int, interior: int, channels: int,
                      weight_bytes: int, border_width: int, contracted: int = 0,
                      plane_bytes: int = 0, strided: bool = False) -> tuple[bool, str]:
    """``(keep, reason)``: whether a Contract reading a zero padding multiplies a zero-padded
    copy (``padded`` multiplications) rather than border regions trimmed to ``nonzero``, of
    which the interior region holds ``interior``; ``channels`` output channels per group,
    ``weight_bytes`` the weights' size, ``border_width`` the most border outputs of an axis,
    ``contracted`` channels per group contracted, ``plane_bytes`` one padded plane's size,
    ``strided`` whether outputs step by more than one input."""
    border = 1.0 - interior / nonzero if nonzero else 0.0
    waste = padded / nonzero if nonzero else float("inf")
    if contracted == 1 and channels < PAD_MIN_CHANNELS:
        if plane_bytes > (PAD_PLANE_BYTES_STRIDED if strided else PAD_PLANE_BYTES):
            return False, (f"depthwise: a padded plane of {plane_bytes / 1024:.3g} KiB costs "
                           "more to copy than its border regions: trimmed")
        if waste > PAD_WASTE:
            return False, (f"a padded copy would multiply {waste:.2f}x the non-zero MACs: border "
                           "regions trimmed")
        return True, (f"depthwise: border regions would hold {border:.0%} of the MACs; kept as "
                      f"planes padded in the kernel ({plane_bytes / 1024:.3g} KiB each), read "
                      f"in whole rows, which multiplies {waste - 1:.0%} more (padded zeros)")
    if channels < PAD_MIN_CHANNELS:
        return False, f"{channels} output channels per group: border regions trimmed"
    if weight_bytes < PAD_WEIGHT_BYTES:
        return False, (f"{weight_bytes / 2**20:.2g} MiB of weights stream again per border "
                       "region from cache: trimmed")
    if border_width > PAD_THIN_BORDER:
        return False, (f"border regions {border_width} outputs wide run full tiles: trimmed")
    if border < PAD_BORDER_SHARE:
        return False, f"border regions hold {border:.0%} of the MACs: trimmed"
    if waste > PAD_WASTE:
        return False, (f"a padded copy would multiply {waste:.2f}x the non-zero MACs: border "
                       "regions trimmed")
    return True, (f"border regions would hold {border:.0%} of the MACs and stream "
                  f"{weight_bytes / 2**20:.3g} MiB of weights each: kept as a zero-padded copy, "
                  f"which multiplies {waste - 1:.0%} more (padded zeros) and reads each weight "
                  "once")


Maps = tuple[int, int, int, int, int, int, int, int]   # (lu, lv, lc, ru, rv, rc, ou, oc)


def rows_serve(axes: list[Maps]) -> bool:
    """Whether ``sparse_rows`` serves a forward or input-gradient Contract whose axes map so:
    rank <= 2, the last axis reads consecutive inputs (``lu = lv = 1``), every axis's input
    index rises with the position and the tap, and the weight index is the tap's alone."""
    return 1 <= len(axes) <= 2 and axes[-1][:2] == (1, 1) and all(
        lu >= 1 and lv >= 1 and ru == 0 for lu, lv, lc, ru, rv, rc, ou, oc in axes)


def sparse_weight_grad_fits(axes: list[list[Maps]]) -> bool:
    """Whether the sparse weight-gradient kernel serves a weight gradient whose regions have
    these axes: every region maps each axis alike, the input index rises with the tap and the
    position (``lu, lv > 0``), and the output gradient is read at the position itself
    (``rhs = v``), the weight gradient at the tap."""
    if not axes:
        return False
    first = axes[0]
    return all(region == first for region in axes) and all(
        lu > 0 and lv > 0 and (ru, rv, rc, ou, oc) == (0, 1, 0, 1, 0)
        for lu, lv, lc, ru, rv, rc, ou, oc in first)


def _small(macs: int, channels: int) -> str | None:
    if macs < MIN_SPARSE_MACS:
        return f"{macs} MACs are too few to repay a sparse pass"
    if channels < MIN_SPARSE_CHANNELS:
        return f"{channels} output channels per group are too few for a sparse pass"
    return None


def rows_crossover() -> float:
    """The density below which ``sparse_rows`` beats the dense kernel."""
    return (1.0 - ROWS_FIXED) / ROWS_SCATTER


def gather_crossover(reuse: float) -> float:
    """The density below which ``sparse_gather`` beats the dense kernel."""
    return max(0.0, (1.0 - SCAN_COST / reuse) / SCATTER_COST)


def crossover(macs: int, reuse: float, channels: int, rows: bool) -> float:
    """The sparse/dense crossover density of a forward or input-gradient Contract (0 where the
    sparse kernel never runs)."""
    if _small(macs, channels):
        return 0.0
    return rows_crossover() if rows else gather_crossover(reuse)


def decide(macs: int, density: float, reuse: float, channels: int = MIN_SPARSE_CHANNELS,
           forced: str = "auto", rows: bool = False) -> tuple[str, str]:
    """``(strategy, reason)`` for a Contract of ``macs`` multiplications whose data elements
    each feed ``reuse`` MACs over ``channels`` output channels per group, served by
    ``sparse_rows`` where ``rows`` (else ``sparse_gather``); ``forced`` ('dense' or 'sparse')
    overrides the cost model."""
    if macs == 0:
        return "dense", "no multiplications (zero fill)"
    if forced != "auto":
        return forced, f"{forced} forced"
    small = _small(macs, channels)
    if small:
        return "dense", small
    if density >= 1.0:
        return "dense", "dense input (density 1)"
    if rows:
        sparse, kernel, cross = ROWS_FIXED + density * ROWS_SCATTER, "sparse_rows", \
            rows_crossover()
    else:
        sparse, kernel, cross = density * SCATTER_COST + SCAN_COST / reuse, \
            f"sparse_gather (each input feeds {reuse:.0f} MACs)", gather_crossover(reuse)
    choice = "sparse" if sparse < 1.0 else "dense"
    return choice, (f"density {density:g}: {kernel} costs {sparse:.2f} of dense per MAC "
                    f"(crossover at density {cross:.2f})")


def weight_grad_crossover(columns: float) -> float:
    """The sparse weight gradient's crossover density where each input element feeds
    ``columns`` kernel columns (taps along the last axis over its stride): the measured line's
    for 3 or more, falling with the square of fewer (fitted to stride-2 and 1x1 layers)."""
    return (1.0 - WEIGHT_GRAD_FIXED) / WEIGHT_GRAD_SCATTER * min(1.0, columns / 3.0) ** 2


def decide_weight_grad(macs: int, density: float, channels: int, columns: float = 3.0,
                       forced: str = "auto") -> tuple[str, str]:
    """``(strategy, reason)`` for a weight gradient the sparse kernel serves, each of whose
    input elements feeds ``columns`` kernel columns."""
    if forced != "auto" or _small(macs, channels):
        return decide(macs, density, 1.0, channels, forced)
    cross = weight_grad_crossover(columns)
    choice = "sparse" if density < cross else "dense"
    return choice, (f"density {density:g}: each input feeding {columns:g} kernel columns, "
                    f"the sparse weight gradient crosses the dense one at density {cross:.2f}")
