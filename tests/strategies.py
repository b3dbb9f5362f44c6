"""Hypothesis strategies for valid LayerSpecs of every operator."""
from __future__ import annotations

from hypothesis import strategies as st

from zeroskip import LayerSpec, Workload

OPS = ("conv", "conv_transpose", "conv_grad_input", "conv_grad_weight")

# Per rank, (max kernel, max stride, max dilation, max extra size): the full ranges for rank 1;
# smaller for ranks 2-3 where the reference executor materializes every (output, tap) pair.
FULL = {1: (7, 4, 3, 6), 2: (7, 4, 3, 6), 3: (7, 4, 3, 4)}
EXECUTABLE = {1: (7, 4, 3, 6), 2: (4, 3, 2, 4), 3: (3, 2, 2, 2)}


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@st.composite
def specs(draw, ops=OPS, ranks=(1, 2, 3), limits=FULL, modes=True, channels=(1, 2)) -> LayerSpec:
    """``channels``: range of channels per group (wide ranges reach the kernels' vector tiles)."""
    op = draw(st.sampled_from(ops))
    rank = draw(st.sampled_from(ranks))
    max_k, max_s, max_d, max_extra = limits[rank]
    groups = draw(st.sampled_from((1, 1, 2, 3)))
    c_in = groups * draw(st.integers(*channels))
    c_out = groups * draw(st.integers(*channels))
    kernel = tuple(draw(st.integers(1, max_k)) for _ in range(rank))
    stride = tuple(draw(st.integers(1, max_s)) for _ in range(rank))
    dilation = tuple(draw(st.integers(1, max_d)) for _ in range(rank))
    extent = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    extra = [draw(st.integers(0, max_extra)) for _ in range(rank)]
    common = dict(bias=draw(st.booleans()),
                  activation=draw(st.sampled_from(("none", "none", "relu"))))
    if op == "conv_transpose":
        padding = tuple(draw(st.integers(0, k)) for k in kernel)
        out_pad = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
        # The output (n-1)*s - 2p + extent + output_padding must be at least 1.
        size = tuple(max(1, _ceil_div(2 * p - e - op + 1, s) + 1) + x for p, e, op, s, x in
                     zip(padding, extent, out_pad, stride, extra))
        return LayerSpec.conv_transpose(c_in, c_out, kernel, stride, padding, out_pad, groups,
                                        dilation=dilation, input_size=size, **common)
    mode = draw(st.sampled_from(("zeros", "zeros", "reflect", "replicate", "circular"))
                if modes else st.just("zeros"))
    style = draw(st.sampled_from(("ints", "pairs", "same", "valid")))
    if style == "same" and any(s != 1 for s in stride):
        style = "ints"
    if style == "ints":
        padding = tuple(draw(st.integers(0, k)) for k in kernel)
        pairs = [(p, p) for p in padding]
    elif style == "pairs":
        pairs = [(draw(st.integers(0, k)), draw(st.integers(0, k))) for k in kernel]
        padding = tuple(pairs)
    else:
        padding = style
        pairs = [((e - 1) // 2, e - 1 - (e - 1) // 2) if style == "same" else (0, 0)
                 for e in extent]
    # Sizes: the kernel must fit the padded input; reflect needs pad < size, circular pad <= size.
    size = tuple(max(1, e - lo - hi, max(lo, hi) + 1 if mode == "reflect" else max(lo, hi, 1))
                 + x for e, (lo, hi), x in zip(extent, pairs, extra))
    spec = LayerSpec.conv(c_in, c_out, kernel, stride, padding, dilation, groups,
                          padding_mode=mode, input_size=size, **common)
    if op == "conv_grad_input":
        return spec.grad_input()
    if op == "conv_grad_weight":
        return spec.grad_weight()
    return spec


def workloads() -> st.SearchStrategy[Workload]:
    """What a layer runs on: a batch of 0, 1 or 2, dense or sparse data."""
    return st.builds(Workload, st.sampled_from((0, 1, 2)), st.sampled_from((1.0, 0.5, 0.1)))
