"""The C target's runtime half: build a kernel library, load it, pack weights, launch.

A :class:`Kernel` runs on contiguous tensors of any batch size; the loader
(:mod:`.loader`) makes one per (layer, variant) through :func:`build` and :func:`load`.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from ..codegen import targets
from ..codegen.targets import Compiled
from ..codegen.variant import Variant
from . import cc, launcher, stats
from .packs import PackCache

MACS_PER_THREAD = 1 << 16   # below this much work per thread, waking another costs more
ERRORS = (cc.CompileError,)  # what building a C kernel raises besides the loader's own


def target() -> targets.CTarget:
    """The C target of this machine: vectors as wide as the compiler flags (read from the
    environment each time: ``ZEROSKIP_CFLAGS`` may change) enable."""
    return _target(cc.vector_bytes(cc.compiler()[1]))


@functools.lru_cache(maxsize=4)
def _target(vector_bytes: int) -> targets.CTarget:
    return targets.CTarget(vector_bytes)


def cache_parts() -> dict:
    """What besides the source makes a C kernel: the compiler, its flags and the CPU."""
    command, flags = cc.compiler()
    return {"compiler": cc.identity(command), "flags": list(flags), "target": cc.cpu_target()}


def build(tmp: Path, compiled: Compiled) -> list[str]:
    (tmp / "kernel.c").write_text(compiled.source)
    command, flags = cc.compiler()
    seconds = cc.compile_library(command, flags, tmp / "kernel.c", tmp / "kernel.so")
    stats.add("compiles")
    stats.add("compile_seconds", seconds)
    return ["kernel.c", "kernel.so"]


def load(compiled: Compiled, path: Path) -> "Kernel":
    """The kernel whose files are in ``path`` (a cache entry's folder, or a bundle's .so)."""
    return Kernel(compiled, path if path.is_dir() else path.parent)


class Kernel:
    """One compiled C operator. ``run`` launches it on contiguous tensors of any batch size."""

    backend = "c"

    def __init__(self, compiled: Compiled, folder: Path):
        self.compiled, self.spec, self.plan = compiled, compiled.spec, compiled.plan
        self.identity = compiled.identity     # what tuning records name it by
        self.output_shape = compiled.spec.output_shape()
        self.variant, self.crossover = compiled.variant, compiled.crossover
        self.folder, self.source = folder, folder / "kernel.c"
        self.lib = cc.Library(folder / "kernel.so")
        self._packs = PackCache(same=self._same)
        self.macs_per_sample = sum(r.macs_per_sample for r in compiled.plan.regions)
        variant = compiled.variant
        self.default = Variant("sparse" if compiled.plan.sparse else "dense",
                               variant.tile_width, variant.vectors)

    def pack(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """The weights (and bias) in the kernel's layout, reused across calls only while proven
        current (:mod:`.packs`)."""
        if self.lib.packed_elems == 0:
            return weight
        return self._packs.get(weight, bias, self._pack)

    def _pack(self, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        w = weight.detach().contiguous()
        b = None if bias is None else bias.detach().contiguous()
        packed = torch.empty(self.lib.packed_elems, dtype=weight.dtype)
        self.lib.pack(torch.get_num_threads(), w.data_ptr(), 0 if b is None else b.data_ptr(),
                      packed.data_ptr())
        return packed

    def _same(self, threads: int, a: int, b: int, nbytes: int) -> int:
        """1 iff the ``nbytes`` at addresses ``a`` and ``b`` are equal (the library's
        ``zs_same``), as the pack cache proves a weight unchanged."""
        return self.lib.same(threads, a, b, nbytes)

    def forget_packed(self) -> None:
        self._packs.clear()

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """The data operand as the kernel reads it: contiguous."""
        return x.contiguous()

    @staticmethod
    def new_output(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return like.new_empty(shape)

    def density(self, x: torch.Tensor) -> float:
        """The share of non-zeros in ``x`` (contiguous, batched), sampled in C: microseconds."""
        return self.lib.density(x.shape[0], x.data_ptr())

    def run_new(self, lhs: torch.Tensor, rhs: torch.Tensor, bias: torch.Tensor | None,
                shape: tuple[int, ...], variant=None) -> torch.Tensor:
        """:meth:`run` into a new output of ``shape``: on cached packs, one call into the
        compiled launcher (:mod:`.launcher`), which proves them and runs; else, or where the
        proof fails, through ctypes (which repacks)."""
        fast = launcher.module() if self.lib.packed_elems else None
        if fast is not None and rhs.is_contiguous():
            found = self._packs.peek(rhs, bias)
            if found is not None:
                packed, w_copy, b_copy = found
                out = fast.run(self.lib.run_address, self.lib.same_address,
                               self.macs_per_sample, MACS_PER_THREAD, lhs, packed, rhs, w_copy,
                               bias, b_copy, shape)
                if out is not None:         # (the launcher counts its kernel_calls)
                    return out
        return self.run(lhs, rhs, self.new_output(lhs, shape), bias, variant)

    def run(self, lhs: torch.Tensor, rhs: torch.Tensor, out: torch.Tensor,
            bias: torch.Tensor | None = None, variant=None) -> torch.Tensor:
        """Run on ``lhs`` (contiguous, batched) and ``rhs`` (the weight, packed here; for the
        weight gradient the second operand), writing ``out``. ``variant``: the launch knobs
        (C kernels have none: their knobs shape the source)."""
        packed = self.pack(rhs, bias)
        return self.launch(lhs, packed, rhs if rhs.is_contiguous() else rhs.detach().contiguous(),
                           out)

    def threads_for(self, batch: int) -> int:
        """The threads a call on ``batch`` samples runs on (the launcher computes the same)."""
        return min(torch.get_num_threads(), 1 + batch * self.macs_per_sample // MACS_PER_THREAD)

    def launch(self, lhs: torch.Tensor, packed: torch.Tensor, rhs: torch.Tensor,
               out: torch.Tensor) -> torch.Tensor:
        """Run on already packed weights (the bench times this, without the pack lookup)."""
        if out.numel():
            batch = lhs.shape[0]
            threads = self.threads_for(batch)
            status = self.lib.run(batch, threads, lhs.data_ptr(), packed.data_ptr(),
                                  rhs.data_ptr(), out.data_ptr())
            if status:
                raise MemoryError(f"zeroskip kernel {self.source}: out of scratch memory")
        stats.add("kernel_calls")
        return out
