"""Targets and the one compiler entry: ``compile(spec, target, variant)``.

``compile`` runs the whole front half (frontend -> PIPELINE, with the variant's strategy) and
the target's back half (plan -> render), and returns a :class:`Compiled`: the plan and the
source the runtime's loader builds, caches and loads. A target owns what differs between C and
Triton: how a graph is planned (vector width, dtype coverage), which template renders it, which
part of a :class:`Variant` shapes the source (the rest is launch-time), and the variants the
autotuner tries. Adding a target is adding a class here and a launcher in the runtime.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from ..spec import LayerSpec
from . import emit, lower, pipeline
from .passes.choose_strategy import crossover
from .variant import DEFAULT, Config, Variant


@dataclass(frozen=True)
class Compiled:
    """One kernel's source and what the runtime needs to build, load and launch it."""

    spec: LayerSpec
    target: str                 # 'c' or 'triton'
    variant: Variant            # the part of the variant that shaped the source
    plan: lower.KernelPlan
    family: str                 # the entry template's family (Triton) or the plan's families
    source: str
    crossover: float            # the cost model's sparse/dense crossover density

    @property
    def identity(self) -> str:
        """What the kernel is, as tuning records name what they timed: a hash of its target
        and source (a changed template, tile rule or pass gives another)."""
        return hashlib.sha256(f"{self.target}\n{self.source}".encode()).hexdigest()[:16]


class Target:
    name = ""
    source_file = ""            # the source's file name in a cache entry or bundle

    def plan(self, graph, variant: Variant) -> lower.KernelPlan:
        raise NotImplementedError

    def family(self, plan: lower.KernelPlan) -> str:
        return "+".join(plan.families)

    def render(self, plan: lower.KernelPlan, family: str) -> str:
        raise NotImplementedError

    def template_hash(self) -> str:
        return emit.template_hash(self.name)

    def source_variant(self, variant: Variant) -> Variant:
        """The part of ``variant`` the source depends on (kernels are memoized by it)."""
        return variant

    def default_choice(self, compiled: Compiled) -> str:
        """The name of the variant a layer's untuned dispatch runs, given its kernel compiled
        as the default variant."""
        return "dense"

    def variants(self, plan: lower.KernelPlan, density: float) -> list[Variant]:
        """The variants the autotuner tries for a layer whose dense plan is ``plan``."""
        raise NotImplementedError


class CTarget(Target):
    """C kernels for the CPU: vectors of ``vector_bytes`` (what the compiler flags enable),
    register tiles from the variant."""

    name, source_file = "c", "kernel.c"

    def __init__(self, vector_bytes: int = 32):
        self.vector_bytes = vector_bytes

    def plan(self, graph, variant: Variant) -> lower.KernelPlan:
        return lower.plan(graph, vector_bytes=self.vector_bytes, variant=variant)

    def render(self, plan: lower.KernelPlan, family: str) -> str:
        return emit.render(plan)

    def source_variant(self, variant: Variant) -> Variant:
        return Variant(variant.strategy, variant.tile_width, variant.vectors, rhs=variant.rhs)

    def variants(self, plan: lower.KernelPlan, density: float) -> list[Variant]:
        """The dense kernel at its own register tile and, where its tiles hold output channels
        in vector lanes, at widths one less and one more, at the other of 2 or 4 vectors of
        channels (as wide as fits: 2 x 12 loads half the weights per multiply-add that 4 x 6
        does, which pays on long rows and short contractions), and at 2 vectors x 8 positions.
        Below density 1 (it cannot win on dense data) the sparse kernel at its own and
        smaller channel tiles (for a weight gradient, where its sparse kernel serves it, and the
        one that walks the output gradient's zeros)."""
        found = [Variant("dense")]
        if plan.pattern == "grad_weight" or any(r.vectorize == "channels"
                                                for r in plan.regions):
            width, vectors = plan.tile_width, plan.tile_vectors
            found += [Variant("dense", tile_width=w)
                      for w in sorted({max(2, width - 1), min(16, width + 1)} - {width})]
            most = min(4, -(-plan.c_out // plan.lanes))
            if most >= 2:
                found += [Variant("dense", vectors=v) for v in sorted({2, most} - {vectors})]
                found.append(Variant("dense", tile_width=8, vectors=2))
        if density >= 1.0:
            return found
        if plan.pattern != "grad_weight":
            # Fewer channel vectors per sparse tile: a tile's weights (every channel and tap of
            # its output channels) fit the L2 cache where the widest ones do not.
            return found + [Variant("sparse")] + [Variant("sparse", vectors=v) for v in (2, 4)
                                                  if v < plan.sparse_vectors]
        if lower.serves_sparse_weight_grad(plan):
            found += [Variant("sparse"), Variant("sparse", vectors=2)]
        if lower.serves_sparse_weight_grad(plan, rhs=True):
            found.append(Variant("sparse", rhs=True))
        return found


def _pow2(n: int, low: int, high: int) -> int:
    return max(low, min(high, 1 << max(0, n - 1).bit_length()))


class TritonTarget(Target):
    """Triton kernels for NVIDIA GPUs: one module per (layer, family); block sizes are
    launch-time constexprs (:class:`Config`), so one source serves every config."""

    name, source_file = "triton", "kernel.py"

    def plan(self, graph, variant: Variant) -> lower.KernelPlan:
        return lower.plan(graph, backend="triton")

    def family(self, plan: lower.KernelPlan) -> str:
        """'weight_grad', 'block_sparse' (the sparse strategy: all-zero channel blocks are
        skipped) or 'direct'."""
        if plan.pattern == "grad_weight":
            return "weight_grad"
        return "block_sparse" if plan.sparse else "direct"

    def render(self, plan: lower.KernelPlan, family: str) -> str:
        return emit.render_triton(plan, family)

    def source_variant(self, variant: Variant) -> Variant:
        return Variant(variant.strategy)

    def default_choice(self, compiled: Compiled) -> str:
        """The default kernel's family at the config sized to the layer."""
        strategy = "sparse" if compiled.family == "block_sparse" else "dense"
        return Variant(strategy, config=self.default_config(compiled.plan)).name

    @staticmethod
    def default_config(plan: lower.KernelPlan) -> Config:
        """A config sized to the layer: MMA tiles of at least 16 where channels allow (BLOCK_K
        32 for 4-byte types, 64 for 2-byte ones: 64 bytes of a row per step), CUDA-core tiles
        (BLOCK_N the channel count) for few channels."""
        if plan.pattern == "grad_weight":
            return Config(_pow2(plan.c_out, 16, 64), _pow2(plan.c_red, 16, 64), 32, 4, 3)
        if plan.c_red < 16:
            n = _pow2(plan.c_out, 1, 64)
            return Config(64, n, 16, 8 if 64 * n >= 4096 else 4, 2)
        k = 32 if plan.ctype == "float32" else 64
        n = _pow2(plan.c_out, 16, 128)
        # 64x128 float32 accumulators take 64 registers a thread at 4 warps, and the region
        # address arithmetic on top spilled on sm_90 (ptxas: up to 328 bytes); 8 warps do not.
        return Config(64, n, _pow2(plan.c_red, 16, k), 8 if 64 * n >= 8192 else 4, 3)

    @classmethod
    def configs(cls, plan: lower.KernelPlan) -> list[Config]:
        """The tuner's configs for a layer: the default and a few tile shapes around it."""
        base = cls.default_config(plan)
        found = [base]
        if plan.pattern == "grad_weight":
            shapes = [(64, 64, 64, 4, 3), (32, 32, 64, 4, 4), (128, 64, 32, 8, 3)]
        elif plan.c_red < 16:
            shapes = [(128, base.block_n, 16, 8, 2), (32, base.block_n, 16, 2, 2)]
        else:
            shapes = [(128, 128, 32, 8, 3), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4),
                      (32, 64, 32, 4, 5), (64, 128, 32, 4, 4)]
        for shape in shapes:
            config = Config(*shape)
            if config not in found:
                found.append(config)
        return found

    @staticmethod
    def uses_dot(plan: lower.KernelPlan, config: Config) -> bool:
        """Whether the tiles run on tensor cores (tl.dot needs every block dim >= 16)."""
        small = plan.c_red if plan.pattern != "grad_weight" else min(plan.c_red, plan.c_out)
        return small >= 16 and min(config.block_m, config.block_n, config.block_k) >= 16

    def variants(self, plan: lower.KernelPlan, density: float) -> list[Variant]:
        """Each config of the dense family, and below density 1 (forward and input-gradient
        ops: the weight gradient has one family) of the block-sparse one."""
        strategies = ["dense", "sparse"] if density < 1.0 and plan.pattern != "grad_weight" \
            else ["dense"]
        return [Variant(s, config=c) for s in strategies for c in self.configs(plan)]


def compile(spec: LayerSpec, target: Target, variant: Variant = DEFAULT,
            dump_dir: str | os.PathLike | None = None) -> Compiled:
    """The kernel of ``spec`` on ``target`` as ``variant`` says: frontend -> PIPELINE (its
    strategy forced unless 'auto') -> plan -> render. Raises :class:`~.ir.IRError` for what no
    template of the target covers, :class:`~.emit.TemplateError` for a template that fails."""
    variant = target.source_variant(variant)
    steps = pipeline.run(spec, dump_dir=dump_dir, strategy=variant.strategy, target=target.name)
    graph = steps[-1][1]
    plan = target.plan(graph, variant)
    family = target.family(plan)
    return Compiled(spec, target.name, variant, plan, family, target.render(plan, family),
                    crossover(graph))
