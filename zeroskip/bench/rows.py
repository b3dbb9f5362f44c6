"""The figures the runners measure, one dataclass per row of a report. ``JSON_EXTRAS`` names the
derived properties a report's JSON writes beside each row's fields (and ignores when read)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass
class Row:
    """The figures of one layer on an input of one density (times in milliseconds, per call,
    medians). Non-zero MACs skip the activation zeros too: ``nonzero_macs(spec) * density``."""

    JSON_EXTRAS: ClassVar[tuple[str, ...]] = ("ratio", "frozen_ratio")

    name: str
    family: str
    dense: bool
    shape: str
    torch_ms: float
    zeroskip_ms: float
    gflops: float           # 2 * non-zero MACs / zeroskip time
    skipped: float          # 1 - MACs the kernel performs / dense MACs
    compile_s: float | None     # spec -> loaded kernel on an empty cache (None in sweeps)
    nonzero_macs: int
    dense_macs: int
    error: float            # max |zeroskip - torch| / max |torch|
    contention: float | None    # share of the bench's CPUs others took while timing
    density: float          # share of non-zeros in the input (1: random normal)
    strategy: str           # what zeroskip's dispatch ran: dense, sparse, a variant, torch
    dense_ms: float | None  # the generated dense kernel, timed at density 1 only
    wide_3x3: bool          # see :func:`wide_3x3`
    wide: bool = False      # a layer of the wide suite (shapes the kernels were not tuned on)
    frozen_ms: float | None = None   # zeroskip on frozen weights (zeroskip.freeze), density 1

    @property
    def ratio(self) -> float:
        """torch time / zeroskip time: above 1, zeroskip is faster."""
        return self.torch_ms / self.zeroskip_ms

    @property
    def frozen_ratio(self) -> float | None:
        """torch time / zeroskip's on frozen weights (packs kept with no comparison)."""
        return None if self.frozen_ms is None else self.torch_ms / self.frozen_ms

    @property
    def dense_ratio(self) -> float | None:
        """torch time / the generated dense kernel's time (density 1 only)."""
        return None if self.dense_ms is None else self.torch_ms / self.dense_ms


@dataclass
class Overhead:
    """Per-call times (microseconds) of a tiny layer: ``zeroskip.functional``, its bare kernel
    (``lib.run`` on preallocated tensors, with ``kernel_threads`` threads) and torch."""

    JSON_EXTRAS: ClassVar[tuple[str, ...]] = ("overhead_us",)

    shape: str
    functional_us: float
    kernel_us: float
    torch_us: float
    kernel_threads: int
    contention: float | None
    launcher: str = ""        # the compiled launcher's status while timed ('loaded': in use)

    @property
    def overhead_us(self) -> float:
        return self.functional_us - self.kernel_us


@dataclass
class BackwardRow:
    """The figures of one layer's training step (times in milliseconds, medians). MACs count
    the forward, the input gradient and the weight gradient together; ``grad_input_*`` is the
    input gradient alone, timed for :func:`strided_conv` layers only (None elsewhere)."""

    JSON_EXTRAS: ClassVar[tuple[str, ...]] = ("ratio", "skipped", "grad_input_skipped",
                                              "grad_input_ratio")

    name: str
    family: str
    dense: bool
    shape: str
    torch_ms: float
    zeroskip_ms: float
    nonzero_macs: int
    dense_macs: int
    error: float            # worst of the output and the gradients, relative to torch's max
    contention: float | None
    grad_input_nonzero_macs: int
    grad_input_dense_macs: int
    grad_input_torch_ms: float | None = None
    grad_input_zeroskip_ms: float | None = None
    grad_input_contention: float | None = None
    torch_ops: int = 0      # of the step's 3 operators, those tuning sent to torch's op

    @property
    def ratio(self) -> float:
        """torch time / zeroskip time of the step: above 1, zeroskip is faster."""
        return self.torch_ms / self.zeroskip_ms

    @property
    def skipped(self) -> float:
        return 1 - self.nonzero_macs / self.dense_macs

    @property
    def grad_input_skipped(self) -> float:
        return 1 - self.grad_input_nonzero_macs / self.grad_input_dense_macs

    @property
    def grad_input_ratio(self) -> float | None:
        if self.grad_input_zeroskip_ms is None or self.grad_input_torch_ms is None:
            return None
        return self.grad_input_torch_ms / self.grad_input_zeroskip_ms


# The GPU rows: each layer's Triton kernels against torch (cuDNN), one row per kind.
SPARSE_DENSITY = 0.1        # the block-sparse rows: 90% zeros
SPARSE_BLOCK = 64           # channels per block of the structured pattern
GPU_KINDS = ("forward", "grad_input", "grad_weight", "sparse-blocks", "sparse-random")
GPU_PATTERN_NOTE = (
    f"sparse-blocks: the block-sparse kernel on a structured input with "
    f"{1 - SPARSE_DENSITY:.0%} zeros: at each (sample, position), each block of "
    f"{SPARSE_BLOCK} input channels (all of them where fewer) is zero with probability "
    f"{1 - SPARSE_DENSITY:.0%} and random normal otherwise, so {1 - SPARSE_DENSITY:.0%} of the "
    f"(BLOCK_K channels x position) blocks the kernel tests are zero (BLOCK_K <= "
    f"{SPARSE_BLOCK}); sparse-random: the same kernel on {1 - SPARSE_DENSITY:.0%} zeros at "
    "random places (ReLU-like, unstructured: almost no block is all zeros, so it shows the "
    "kernel's cost where its skipping does not apply); torch runs its dense op on the same "
    "input in both")


@dataclass
class GpuRow:
    """One Triton kernel of one layer in one dtype against torch's op (milliseconds per call:
    the median over rounds of ``triton.testing.do_bench``'s median). ``kind``: see
    :data:`GPU_KINDS`; ``op``, ``kernel_size``, ``stride`` and ``dense`` describe the suite's
    layer, ``shape`` the operator timed. ``failure`` says why a row has no times."""

    JSON_EXTRAS: ClassVar[tuple[str, ...]] = ("ratio",)

    name: str
    family: str
    kind: str
    dtype: str
    shape: str
    op: str
    kernel_size: tuple
    stride: tuple
    dense: bool
    density: float
    torch_ms: float | None
    zeroskip_ms: float | None
    config: str             # the Triton choice timed: 'dense/m64n64k32w4s3', 'sparse/...'
    tuned: bool             # the config came from the tuning database (else: the default)
    error: float | None     # max |zeroskip - torch| / max |torch|
    failure: str | None = None

    @property
    def ratio(self) -> float | None:
        """torch time / zeroskip time: above 1, zeroskip is faster."""
        if self.failure or not self.torch_ms or not self.zeroskip_ms:
            return None
        return self.torch_ms / self.zeroskip_ms
