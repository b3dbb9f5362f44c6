"""The generated C kernels against torch: every operator and dtype, the sparse strategy, both
vectorizations and tile remainders, and the properties of the generated source."""
from __future__ import annotations

import dataclasses
import math
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oracle import random_inputs, torch_result
from strategies import EXECUTABLE, specs, workloads
from zeroskip import LayerSpec, Workload
from zeroskip.codegen import emit, lower, pipeline
from zeroskip.runtime import cc
from zeroskip.runtime.loader import kernel_for, run_spec

TOLERANCE = {"float32": 1e-4, "float64": 1e-10}


def run_and_compare(spec: LayerSpec, arrays: dict[str, np.ndarray],
                    variant: lower.Variant = lower.DEFAULT) -> np.ndarray:
    """Run the kernel of ``spec`` on ``arrays``, assert it matches torch, return its result."""
    want = torch_result(spec, arrays)
    dtype = getattr(torch, spec.dtype)
    got = run_spec(spec, {k: torch.tensor(v, dtype=dtype) for k, v in arrays.items()},
                   variant).numpy()
    assert got.shape == want.shape, (spec.describe(), got.shape, want.shape)
    # Tolerance relative to the result's magnitude (long float32 reductions round).
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    error = float(np.abs(got - want).max(initial=0.0))
    assert error <= TOLERANCE[spec.dtype] * scale, (spec.describe(), error, scale)
    return got


def plan_of(spec: LayerSpec, workload: Workload = Workload()) -> lower.KernelPlan:
    """The plan kernel_for would build, without compiling (any batch size), with the cost
    model deciding at the workload's density."""
    steps = pipeline.run(spec, workload=workload)
    return lower.plan(steps[-1][1], vector_bytes=cc.vector_bytes(cc.compiler()[1]))


# ----------------------------------------------------------------------------- every operator
@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(specs(limits=EXECUTABLE, channels=(1, 40)), workloads(),
       st.sampled_from(("float32", "float64")))
def test_kernels_match_torch(spec, workload, dtype):
    spec = dataclasses.replace(spec, dtype=dtype)
    run_and_compare(spec, random_inputs(spec, workload=workload))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(specs(limits=EXECUTABLE, channels=(1, 40)), workloads(),
       st.sampled_from((0.0, 0.05, 0.3, 1.0)), st.sampled_from(("float32", "float64")),
       st.sampled_from((None, 1, 2)))
def test_forced_sparse_matches_torch(spec, workload, density, dtype, vectors):
    """The sparse strategy forced on every region it can serve, whatever the data's density:
    transposed phases, dilations, groups, padding modes, gradients, merged and per-tap walks."""
    spec = dataclasses.replace(spec, dtype=dtype)
    variant = lower.Variant("sparse", vectors=vectors)
    run_and_compare(spec, random_inputs(spec, workload=Workload(workload.batch, density)),
                    variant)


# ----------------------------------------------------------------------------- sparse strategy
# Large enough that the cost model picks the sparse strategy for the interior.
SPARSE_CONV = LayerSpec.conv(16, 32, 3, padding=1, input_size=(12, 12))
SPARSE_WORK = Workload(2, 0.1)
SPARSE = lower.Variant("sparse")


def sparse_array(shape, density: float, rng: np.random.Generator) -> np.ndarray:
    """Exactly round(density * size) non-zeros (magnitudes in [0.5, 1.5]) at random places."""
    size = int(np.prod(shape))
    count = round(density * size)
    flat = np.zeros(size)
    where = rng.choice(size, count, replace=False)
    flat[where] = rng.uniform(0.5, 1.5, count) * rng.choice((-1.0, 1.0), count)
    return flat.reshape(shape)


def inputs_with(spec: LayerSpec, data: np.ndarray, seed: int = 1) -> dict[str, np.ndarray]:
    """Dense weights and bias from ``random_inputs``, ``data`` as the data operand."""
    arrays = random_inputs(spec, seed, Workload(data.shape[0]))
    name = "grad_output" if spec.op == "conv_grad_input" else "input"
    assert arrays[name].shape == data.shape
    arrays[name] = data
    return arrays


def has_sparse(spec: LayerSpec, density: float) -> bool:
    """Whether the cost model runs some region of ``spec`` sparse at ``density``."""
    return bool(set(lower.SPARSE_FAMILIES) & set(plan_of(spec, Workload(density=density)).families))


@pytest.mark.parametrize("density", [0.0, 0.05, 0.1, 0.5, 1.0])
def test_sparse_at_density(density):
    rng = np.random.default_rng(int(density * 100))
    x = sparse_array(SPARSE_CONV.input_shapes(2)["input"], density, rng)
    assert np.count_nonzero(x) == round(density * x.size)
    # The cost model at this density: sparse for low densities, never for dense data.
    if density <= 0.1:
        assert has_sparse(SPARSE_CONV, density)
    if density == 1.0:
        assert not has_sparse(SPARSE_CONV, density)
        assert all(r.family not in lower.SPARSE_FAMILIES
                   for r in kernel_for(SPARSE_CONV).plan.regions)
    run_and_compare(SPARSE_CONV, inputs_with(SPARSE_CONV, x))
    # The sparse kernel is exact whatever the actual density of its data.
    assert kernel_for(SPARSE_CONV, "c", SPARSE).plan.families == ("sparse_rows",)
    run_and_compare(SPARSE_CONV, inputs_with(SPARSE_CONV, x), SPARSE)


def test_sparse_all_zero_channels():
    rng = np.random.default_rng(2)
    x = sparse_array(SPARSE_CONV.input_shapes(2)["input"], 0.3, rng)
    x[:, ::2] = 0                                  # every other channel entirely zero
    x[1, :] = 0                                    # and the whole second sample
    assert has_sparse(SPARSE_CONV, SPARSE_WORK.density)
    got = run_and_compare(SPARSE_CONV, inputs_with(SPARSE_CONV, x), SPARSE)
    bias = random_inputs(SPARSE_CONV, 1, Workload(2))["bias"]
    # The all-zero sample's output is the bias everywhere.
    np.testing.assert_allclose(got[1], np.broadcast_to(bias[:, None, None], got[1].shape),
                               rtol=1e-6)


def test_sparse_single_nonzero():
    spec = dataclasses.replace(SPARSE_CONV, bias=False)
    assert has_sparse(spec, SPARSE_WORK.density)
    x = np.zeros(spec.input_shapes(2)["input"])
    x[1, 5, 0, 11] = 2.5                           # a corner: border and interior regions
    got = run_and_compare(spec, inputs_with(spec, x), SPARSE)
    assert not got[0].any()                        # no stray writes into the empty sample
    # Only the 3x3 neighbourhood of the non-zero is reached (rows 0-1, columns 10-11).
    reached = np.argwhere(got[1].any(axis=0))
    assert reached.min(axis=0).tolist() == [0, 10] and reached.max(axis=0).tolist() == [1, 11]


@pytest.mark.parametrize("spec, density", [
    (LayerSpec.conv_transpose(32, 16, 4, stride=2, padding=1, input_size=(7, 7)), 0.1),
    (LayerSpec.conv(16, 32, 3, padding=1, input_size=(12, 12), padding_mode="reflect"), 0.1),
    (LayerSpec.conv(16, 32, 3, stride=2, padding=1, groups=2, input_size=(12, 11)), 0.05),
    (LayerSpec.conv(8, 24, 3, padding=1, input_size=(40,), dtype="float64"), 0.1),
    (SPARSE_CONV.grad_input(), 0.1),
], ids=lambda s: s.describe() if isinstance(s, LayerSpec) else str(s))
def test_sparse_variants(spec, density):
    assert has_sparse(spec, density)
    if spec.padding_mode == "reflect":
        assert kernel_for(spec, "c", SPARSE).plan.pad.mode == "reflect"
    name = "grad_output" if spec.op == "conv_grad_input" else "input"
    x = sparse_array(spec.input_shapes(2)[name], density, np.random.default_rng(3))
    assert np.count_nonzero(x) == round(density * x.size)
    run_and_compare(spec, inputs_with(spec, x), SPARSE)


@pytest.mark.parametrize("spec, family", [
    # Stride 1 along the last axis: the phases' trimmed borders merge into sparse_rows boxes.
    (SPARSE_CONV, "sparse_rows"),
    (SPARSE_CONV.grad_input(), "sparse_rows"),
    (LayerSpec.conv(16, 32, 3, stride=2, padding=1, input_size=(9, 9)).grad_input(),
     "sparse_rows"),
    (LayerSpec.conv(16, 32, 3, stride=(2, 1), padding=1, input_size=(9, 9)), "sparse_rows"),
    (LayerSpec.conv(8, 24, 3, padding=1, input_size=(40,), dtype="float64"), "sparse_rows"),
    # Strided or dilated along it, or rank 3: the compressed-pattern kernel.
    (LayerSpec.conv(16, 32, 3, stride=2, padding=1, input_size=(9, 9)), "sparse_gather"),
    (LayerSpec.conv(16, 32, 3, padding=2, dilation=2, input_size=(9, 9)), "sparse_gather"),
    (LayerSpec.conv(8, 16, 3, padding=1, input_size=(4, 5, 6)), "sparse_gather"),
], ids=lambda s: s.describe() if isinstance(s, LayerSpec) else s)
def test_sparse_family(spec, family):
    plan = kernel_for(spec, "c", SPARSE).plan
    assert plan.families == (family,)
    if family == "sparse_rows":
        # One merged box per phase, covering every output of the phase once.
        phases = {(a.ou, a.oc) for r in plan.regions for a in r.axes[:1]}
        assert len(plan.regions) == len(phases) * (1 if spec.rank == 1 else
                                                   len({r.axes[-1].oc for r in plan.regions}))
        assert sum(r.u_box for r in plan.regions) == math.prod(spec.output_shape()[2:])
    name = "grad_output" if spec.op == "conv_grad_input" else "input"
    x = sparse_array(spec.input_shapes(3)[name], 0.3, np.random.default_rng(4))
    x[0] = 0                                        # an all-zero sample
    x[1, :, 0] = 0                                  # all-zero rows
    run_and_compare(spec, inputs_with(spec, x), SPARSE)


@pytest.mark.parametrize("c_in, c_out", [(1, 8), (17, 33), (70, 130)])
def test_sparse_rows_channel_blocks(c_in, c_out):
    """Contracted channels that fill no whole mask block and output channels that fill no whole
    tile: the padding channels are zeros, skipped and never stored."""
    spec = LayerSpec.conv(c_in, c_out, 3, padding=1, bias=True, input_size=(5, 19),
                          activation="relu")
    plan = kernel_for(spec, "c", SPARSE).plan
    assert plan.families == ("sparse_rows",)
    assert plan.c_red_packed % plan.sparse_block == 0 and plan.c_red_packed >= c_in
    x = sparse_array(spec.input_shapes(2)["input"], 0.4, np.random.default_rng(5))
    run_and_compare(spec, inputs_with(spec, x), SPARSE)


# ----------------------------------------------------------------------------- region classes
@pytest.mark.parametrize("spec", [
    LayerSpec.conv(3, 8, 19, padding=9, input_size=(23,)),                      # rank 1
    LayerSpec.conv(16, 32, 11, padding=5, input_size=(13, 12)),                 # channels
    LayerSpec.conv_transpose(12, 3, 11, 4, 2, 1, input_size=(6, 5), dtype="float64"),
    LayerSpec.conv(4, 4, 5, padding=2, groups=4, input_size=(7, 9, 8)),        # rank 3
    LayerSpec.conv_transpose(6, 6, 8, 4, 2, groups=2, input_size=(5, 4)),
], ids=lambda s: s.describe())
def test_region_classes_match_torch(spec):
    """Many regions: those beyond a plan's largest share functions that read their boxes from
    a table; forward and input gradient (classes too where it has many regions) against
    torch."""
    assert kernel_for(spec).plan.classes
    for op in (spec, spec.grad_input()):
        run_and_compare(op, random_inputs(op, workload=Workload(2)))


# ----------------------------------------------------------------------------- vectorization
def direct_regions(plan: lower.KernelPlan, vectorize: str):
    return [r for r in plan.regions if r.family == "direct" and r.vectorize == vectorize]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_channels_tile_remainders(dtype):
    """Many output channels: lanes along channels, register tiles of tile_width positions on
    the last axis; a short last axis of whole tiles, and one (long, of a prime length) with a
    remainder tile."""
    for last, multiple in ((24, True), (113, False)):
        # kernel 3, no padding: one region whose last axis has ``last`` outputs.
        spec = LayerSpec.conv(4, 64, 3, input_size=(5, last + 2), dtype=dtype)
        plan = kernel_for(spec).plan
        regions = direct_regions(plan, "channels")
        assert plan.tile_width > 1
        assert regions and all(r.axes[-1].u_len == last > plan.tile_width for r in regions)
        assert all((r.axes[-1].u_len % plan.tile_width == 0) == multiple for r in regions)
        run_and_compare(spec, random_inputs(spec, workload=Workload(2)))


@pytest.mark.parametrize("make", [lambda s: s, LayerSpec.grad_input, LayerSpec.grad_weight],
                         ids=["forward", "grad_input", "grad_weight"])
def test_dense_variant_tile_vectors(make):
    """A dense variant's v<n> sets its register tiles' vectors of output channels (and, unless
    w<n> sets it too, a width that fills the registers): fewer channels, more positions."""
    spec = make(LayerSpec.conv(40, 70, 3, padding=1, input_size=(7, 23)))
    default = kernel_for(spec).plan
    assert default.tile_vectors >= 2
    for variant in (lower.Variant("dense", vectors=1), lower.Variant("dense", 9, 1)):
        plan = kernel_for(spec, variant=variant).plan
        assert plan.tile_vectors == 1
        assert plan.c_out_padded == -(-plan.c_out // plan.lanes) * plan.lanes
        assert plan.tile_width == variant.tile_width if variant.tile_width else \
            plan.tile_width >= default.tile_width
        run_and_compare(spec, random_inputs(spec, workload=Workload(2)), variant)


@pytest.mark.parametrize("last, want", [(8, 4), (14, 5), (12, 6), (6, 6), (3, 6), (49, 6),
                                        (200, 6)])
def test_short_rows_get_balanced_tiles(last, want):
    """Rows of at most 8 tiles are split into tiles of balanced widths (8 -> 4 + 4, not 6 +
    2); longer rows, and rows no wider than one tile, keep the widest tile; a variant's width
    is kept as given. Rows of 16 or more get tiles of 2 vectors of channels; a shorter row that
    the tallest tile would split, the tallest tile that holds it whole (64 channels: 2 vectors,
    as 3 would pad them to 96)."""
    assert lower.fit_width(6, [(last, 10), (1, 1)]) == want
    spec = LayerSpec.conv(4, 64, 3, input_size=(5, last + 2))
    plan = kernel_for(spec, variant=lower.Variant("dense")).plan

    def widest_of(vectors):
        return lower.tile_shape(vectors * plan.lanes, plan.lanes, plan.vector_bytes)[1]
    tallest = lower.tile_shape(64, plan.lanes, plan.vector_bytes)[0]
    whole = last > widest_of(tallest) and widest_of(2) >= last
    assert (plan.tile_vectors == 2) == (last >= lower.LONG_ROW or whole)
    widest = widest_of(plan.tile_vectors)
    assert plan.tile_width == lower.fit_width(widest, [(last, 1)])
    assert kernel_for(spec, variant=lower.Variant("dense", 7)).plan.tile_width == 7
    run_and_compare(spec, random_inputs(spec, workload=Workload(2)))


def test_channels_padded_output_channels():
    """Output channels not a multiple of the vector tile: the packed row is padded."""
    spec = LayerSpec.conv(3, 20, 3, padding=1, input_size=(9, 13))
    plan = kernel_for(spec).plan
    assert direct_regions(plan, "channels")
    assert plan.c_out_padded > plan.c_out == 20
    run_and_compare(spec, random_inputs(spec, workload=Workload(2)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_channels_blocks_of_contracted_channels(dtype):
    """Many contracted channels: their packed weights are streamed in several blocks, each
    adding to the partial sums the previous block stored."""
    for spec in (LayerSpec.conv(600, 64, 3, padding=1, input_size=(4, 9), dtype=dtype),
                 LayerSpec.conv_transpose(600, 32, 4, 2, 1, input_size=(3, 5), dtype=dtype)):
        plan = kernel_for(spec).plan
        assert plan.red_block < plan.c_red == 600 and direct_regions(plan, "channels")
        run_and_compare(spec, random_inputs(spec))


def test_tiles_run_along_the_longest_axis():
    """A border column of a 2-D conv is one position wide and many rows long: its tiles run
    along the rows."""
    spec = LayerSpec.conv(8, 32, 3, padding=1, input_size=(20, 6))
    plan = kernel_for(spec).plan
    columns = [r for r in plan.regions if r.axes[1].u_len == 1 and r.axes[0].u_len > 1]
    assert columns and all(r.tile_axis == 0 for r in columns)
    assert any(r.tile_axis == 1 for r in plan.regions)
    run_and_compare(spec, random_inputs(spec, workload=Workload(2)))


@pytest.mark.parametrize("dtype, multiplier, stride, extra", [
    ("float32", 1, 1, 0),          # whole position tiles only
    ("float32", 1, 1, "vector"),   # a remainder tile of whole vectors
    ("float32", 3, 1, 5),          # a remainder with a partial vector; 3 channels per group
    ("float32", 2, 2, 3),          # stride 2: two loads and a permute per vector
    ("float64", 1, 2, 0),
    ("float32", 1, 3, 2),          # stride 3: gathered loads
    ("float64", 1, 1, 5),
])
def test_positions_tile_remainders(dtype, multiplier, stride, extra):
    """Few output channels per group (depthwise): lanes run along output positions, in tiles of
    pos_vectors vectors on the last axis; whole tiles, and remainders."""
    def depthwise(length: int) -> LayerSpec:
        return LayerSpec.conv(4, 4 * multiplier, 3, stride=stride, groups=4, dtype=dtype,
                              input_size=(3, length))
    probe = plan_of(depthwise(9))
    width = probe.pos_vectors * probe.lanes
    extra = probe.lanes if extra == "vector" else extra
    last = 2 * width + extra                       # outputs on the last axis
    spec = depthwise((last - 1) * stride + 3)     # kernel 3, no padding: one region
    plan = kernel_for(spec).plan
    regions = direct_regions(plan, "positions")
    assert regions and all(r.vectorize == "positions" for r in plan.regions)
    assert plan.c_out == multiplier and plan.c_out % plan.pos_channels == 0
    assert all(r.axes[-1].u_len == last and (last % width == 0) == (extra == 0)
               for r in regions)
    run_and_compare(spec, random_inputs(spec, workload=Workload(2)))


# ----------------------------------------------------------------------------- generated source
def test_source_header_names_spec_and_passes():
    spec = LayerSpec.conv(4, 8, 3, stride=2, padding=1, input_size=(10, 10))
    kernel = kernel_for(spec)
    source = kernel.source.read_text()
    assert source.startswith("/*")
    header = source[:source.index("*/")]
    plan = kernel.plan
    assert plan.spec in header and "on Nx10x10" in plan.spec
    assert " -> ".join(plan.history) in header
    assert plan.history[0] == "frontend" and "choose_strategy" in plan.history
    assert source == emit.render(plan)             # the cached source is the rendered one


@pytest.mark.parametrize("spec, density", [
    (LayerSpec.conv(4, 8, 3, padding=1, input_size=(10, 10)), 1.0),
    (LayerSpec.conv(16, 32, 3, padding=1, input_size=(12, 12), padding_mode="reflect"), 0.1),
    (LayerSpec.conv(4, 6, 3, stride=2, input_size=(9,)).grad_weight(), 1.0),
], ids=lambda s: s.describe() if isinstance(s, LayerSpec) else str(s))
def test_source_has_no_batch_size(spec, density):
    one = emit.render(plan_of(spec, Workload(1, density)))
    seven = emit.render(plan_of(spec, Workload(7, density)))
    assert one == seven


@pytest.fixture
def template_copy(tmp_path, monkeypatch):
    """A writable copy of the templates that emit renders from (environment re-created)."""
    root = tmp_path / "templates"
    shutil.copytree(emit.TEMPLATE_ROOT, root)
    monkeypatch.setattr(emit, "TEMPLATE_ROOT", root)
    monkeypatch.setattr(emit, "TEMPLATE_DIR", root / "c")
    emit.environment.cache_clear()
    yield root / "c"
    emit.environment.cache_clear()


def break_before(path, marker: str, text: str) -> int:
    """Insert ``text`` as a line before the first line containing ``marker`` (the templates
    evolve, so no fixed line numbers); return the 1-based number of the inserted line."""
    lines = path.read_text().splitlines(keepends=True)
    index = next(i for i, line in enumerate(lines) if marker in line)
    lines.insert(index, text + "\n")
    path.write_text("".join(lines))
    return index + 1


PLAN = LayerSpec.conv(4, 8, 3, padding=1, input_size=(10, 10))


def test_template_runtime_error_names_file_and_line(template_copy):
    # An undefined attribute (StrictUndefined) at the top level of the region template.
    line = break_before(template_copy / "direct.c.jinja", "{{ describe_region(r) }}",
                        "{{ p.no_such_field }}")
    with pytest.raises(emit.TemplateError, match=rf"direct\.c\.jinja:{line}\b.*no_such_field"):
        emit.render(plan_of(PLAN))


def test_template_syntax_error_names_file_and_line(template_copy):
    line = break_before(template_copy / "layer.c.jinja", "#include <stdint.h>", "{% if %}")
    with pytest.raises(emit.TemplateError, match=rf"layer\.c\.jinja:{line}\b"):
        emit.render(plan_of(PLAN))


def test_broken_plan_names_template_line():
    plan = plan_of(PLAN)
    region = dataclasses.replace(plan.regions[0], family="no_such_family")
    broken = dataclasses.replace(plan, regions=(region,) + plan.regions[1:])
    # The include of the region's family template in layer.c.jinja.
    lines = (emit.TEMPLATE_DIR / "layer.c.jinja").read_text().splitlines()
    line = next(i for i, text in enumerate(lines, 1) if "{% include r.family" in text)
    with pytest.raises(emit.TemplateError, match=rf"layer\.c\.jinja:{line}\b.*no_such_family"):
        emit.render(broken)


def test_dump_writes_graphs_and_source(fresh_cache, tmp_path, monkeypatch):
    """ZEROSKIP_DUMP=dir: every step's graph and the rendered source of each kernel built."""
    monkeypatch.setenv("ZEROSKIP_DUMP", str(tmp_path / "dump"))
    spec = LayerSpec.conv_transpose(4, 8, 4, 2, 1, input_size=(5, 5))
    kernel = kernel_for(spec)
    folder = pipeline.dump_folder(spec, tmp_path / "dump")
    steps = ["frontend", *(name for name, _ in pipeline.PIPELINE)]
    assert sorted(p.name for p in folder.glob("*.json")) == \
        [f"{i:02d}-{name}.json" for i, name in enumerate(steps)]
    assert (folder / "kernel.c").read_text() == kernel.source.read_text()


@pytest.mark.parametrize("spec", [
    LayerSpec.conv(24, 40, 1, input_size=(7, 5)),
    LayerSpec.conv(8, 12, 1, groups=4, input_size=(3, 4, 5), bias=False),
    LayerSpec.conv_transpose(16, 32, 1, input_size=(6, 6)),
], ids=lambda s: s.describe())
def test_pointwise_convs_run_on_one_flat_axis(spec):
    """A 1x1, stride-1, unpadded conv: all positions form one axis (tiles span rows)."""
    plan = kernel_for(spec).plan
    assert plan.rank == 1 and plan.out_size == (math.prod(spec.output_size),)
    run_and_compare(spec, random_inputs(spec, workload=Workload(2)))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_weight_gradient_tiles(dtype):
    """Weight gradient with many output channels: tiles of output-channel vectors x input
    channels (whole tiles and a remainder) over the repacked output gradient, strided and
    grouped, summed over a batch of 3."""
    for spec in (LayerSpec.conv(31, 64, 3, stride=2, padding=1, input_size=(9, 11),
                                dtype=dtype).grad_weight(),
                 LayerSpec.conv(26, 64, (3, 1), padding=(1, 0), groups=2, input_size=(6, 5), dtype=dtype).grad_weight()):
        plan = kernel_for(spec).plan
        assert all(r.family == "weight_grad" and r.vectorize == "channels"
                   for r in plan.regions)
        assert plan.c_red > plan.tile_width and plan.c_red % plan.tile_width
        run_and_compare(spec, random_inputs(spec, workload=Workload(3)))


def test_trimmed_to_one_tap_is_not_pointwise():
    """A 1x1x2 kernel whose second tap always lands in padding leaves one tap per output, but
    the weight still has two taps: the region must not be flattened as a pointwise conv."""
    spec = LayerSpec.conv(1, 2, (1, 1, 2), padding=((0, 0), (0, 0), (0, 1)),
                          input_size=(1, 1, 1))
    assert kernel_for(spec).plan.rank == 3
    run_and_compare(spec, random_inputs(spec))


@pytest.mark.parametrize("spec", [
    LayerSpec.conv(16, 32, 3, padding=1, input_size=(8, 9)),
    LayerSpec.conv(16, 32, 3, stride=2, padding=1, input_size=(9, 9)),
    LayerSpec.conv(8, 32, 3, stride=3, padding=1, dilation=2, input_size=(20, 13)),
    LayerSpec.conv(16, 64, 3, padding=1, groups=2, input_size=(6, 6)),
    LayerSpec.conv(8, 16, 11, padding=5, input_size=(20,)),
    LayerSpec.conv(8, 32, 3, stride=2, input_size=(7, 7, 9)),
    LayerSpec.conv(8, 16, 3, padding=1, padding_mode="reflect", input_size=(6, 7)),
    LayerSpec.conv_transpose(32, 16, 4, stride=2, padding=1, input_size=(5, 6)),
    # groups of contracted channels (37 = 12 groups of 3, and 1) per thread
    LayerSpec.conv(37, 32, 3, padding=1, input_size=(11, 21)),
], ids=lambda s: s.describe())
@pytest.mark.parametrize("density", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("rhs", [False, True], ids=["input", "output-gradient"])
def test_sparse_weight_gradient(spec, density, rhs):
    """The sparse weight gradient: one region over the whole kernel walking the input's
    non-zeros (taps past the borders read zero margins), strided (per-residue taps), dilated,
    grouped, 1-D and 3-D, behind a reflect padding, of a transposed conv; all-zero inputs. And
    the variant walking the output gradient's non-zeros instead (``sparse/rhs``); contracted
    channels in groups that do not divide them."""
    grad = spec.grad_weight()
    variant = lower.Variant("sparse", rhs=rhs)
    plan = kernel_for(grad, "c", variant).plan
    assert [r.family for r in plan.regions] == \
        ["sparse_weight_grad_rhs" if rhs else "sparse_weight_grad"]
    arrays = random_inputs(grad, workload=Workload(3, density))
    if rhs:      # the output gradient sparse too, as a ReLU leaves it
        rng = np.random.default_rng(5)
        arrays["grad_output"] = arrays["grad_output"] * (rng.random(
            arrays["grad_output"].shape) < max(density, 0.1))
    run_and_compare(grad, arrays, variant)


def test_sparse_weight_gradient_cost_model():
    """Untuned, the weight gradient goes sparse below the cost model's crossover only, and a
    weight gradient of few output channels per group (depthwise) never does."""
    spec = LayerSpec.conv(64, 64, 3, padding=1, input_size=(16, 16)).grad_weight()
    assert plan_of(spec, Workload(density=0.2)).families == ("sparse_weight_grad",)
    assert plan_of(spec, Workload(density=0.8)).families == ("weight_grad",)
    depthwise = LayerSpec.conv(64, 64, 3, padding=1, groups=64,
                               input_size=(16, 16)).grad_weight()
    assert plan_of(depthwise, Workload(density=0.1)).families == ("weight_grad",)
