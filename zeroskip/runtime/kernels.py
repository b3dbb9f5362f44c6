"""What every target's loaded kernel offers (:class:`Kernel`, which :class:`.c_kernel.Kernel`
and :class:`.triton_kernel.Kernel` implement), and the one way to run a kernel on its layer's
operands (:func:`launch`, :func:`run_named`): the dispatch, the autotuner and the bench all
launch through here.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from ..codegen.targets import Compiled
from ..codegen.variant import Variant
from ..spec import OPERANDS, LayerSpec


class Kernel(Protocol):
    """One compiled operator of one layer (``spec``), for any batch size."""

    backend: str                 # 'c' or 'triton'
    spec: LayerSpec
    compiled: Compiled           # the source, plan and variant it was built from
    plan: Any                    # compiled.plan
    identity: str                # compiled.identity: what tuning records name it by
    crossover: float             # the cost model's sparse/dense crossover density
    default: Variant             # the variant its untuned launch runs
    output_shape: tuple[int, ...]  # spec.output_shape(): at batch 1 (made once: calls read it)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """A data operand (batched) as the kernel reads it."""

    def new_output(self, like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """An output of ``shape`` in the layout the kernel writes for data operand ``like``."""

    def density(self, x: torch.Tensor) -> float:
        """The share of non-zeros in a prepared data operand."""

    def run(self, lhs: torch.Tensor, rhs: torch.Tensor, out: torch.Tensor,
            bias: torch.Tensor | None = None, variant: Variant | None = None
            ) -> torch.Tensor:
        """Write the operator of ``lhs`` (prepared) and ``rhs`` (the weight, packed by the
        kernel; for the weight gradient the prepared second operand) into ``out``."""

    def run_new(self, lhs: torch.Tensor, rhs: torch.Tensor, bias: torch.Tensor | None,
                shape: tuple[int, ...], variant: Variant | None = None) -> torch.Tensor:
        """:meth:`run` into a new output of ``shape`` (as :meth:`new_output` makes it)."""

    def forget_packed(self) -> None:
        """Drop the weight packs kept across calls."""


def launch(kernel: Kernel, lhs: torch.Tensor, rhs: torch.Tensor,
           bias: torch.Tensor | None = None, variant: Variant | None = None) -> torch.Tensor:
    """Run ``kernel`` on ``lhs`` (its data operand, batched and prepared) and ``rhs`` (the
    weight; for the weight gradient the second data operand, prepared here), into a new
    output: the weight gradient a plain contiguous tensor whatever the activations' layout,
    any other output in the layout the kernel writes for ``lhs``."""
    if kernel.spec.op == "conv_grad_weight":
        out = torch.empty(kernel.output_shape, dtype=lhs.dtype, device=lhs.device)
        return kernel.run(lhs, kernel.prepare(rhs), out, None, variant)
    return kernel.run_new(lhs, rhs, bias, (lhs.shape[0], *kernel.output_shape[1:]), variant)


def operands(kernel: Kernel, tensors: dict[str, torch.Tensor]) -> tuple:
    """``(lhs, rhs, bias)`` for :func:`launch` from a spec's operands named as in
    ``spec.input_shapes()`` (the data operand prepared)."""
    lhs_name, rhs_name = OPERANDS[kernel.spec.op]
    return kernel.prepare(tensors[lhs_name]), tensors[rhs_name], tensors.get("bias")


def run_named(kernel: Kernel, tensors: dict[str, torch.Tensor],
              variant: Variant | None = None) -> torch.Tensor:
    """``kernel`` on its spec's operands named as in ``spec.input_shapes()``."""
    return launch(kernel, *operands(kernel, tensors), variant)
