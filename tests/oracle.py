"""PyTorch's result for any LayerSpec: the oracle every zeroskip result is compared with."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from zeroskip import LayerSpec, Workload
from zeroskip.spec import DENSE


def random_inputs(spec: LayerSpec, seed: int = 0, workload: Workload = DENSE
                  ) -> dict[str, np.ndarray]:
    """The operands of ``spec`` at the workload's batch; the data operand keeps about the
    workload's density of non-zeros."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for name, shape in spec.input_shapes(workload.batch).items():
        value = rng.standard_normal(shape)
        if name in ("input", "grad_output") and workload.density < 1.0:
            value *= rng.random(shape) < workload.density
        arrays[name] = value
    return arrays


def _conv(spec: LayerSpec, x: torch.Tensor, w: torch.Tensor, b=None) -> torch.Tensor:
    """The associated forward convolution of ``spec`` (x -> y), padding done as torch's modules
    do it: F.pad for non-zero modes and asymmetric padding, conv padding otherwise."""
    conv = getattr(F, f"conv{spec.rank}d")
    symmetric = all(lo == hi for lo, hi in spec.padding)
    if spec.padding_mode == "zeros" and symmetric:
        return conv(x, w, b, spec.stride, [lo for lo, _ in spec.padding], spec.dilation,
                    spec.groups)
    flat = [p for pair in reversed(spec.padding) for p in pair]
    mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
    return conv(F.pad(x, flat, mode=mode), w, b, spec.stride, 0, spec.dilation, spec.groups)


def torch_result(spec: LayerSpec, arrays: dict[str, np.ndarray]) -> np.ndarray:
    t = {k: torch.tensor(v, dtype=torch.float64) for k, v in arrays.items()}
    act = F.relu if spec.activation == "relu" else (lambda y: y)
    if spec.op == "conv":
        return act(_conv(spec, t["input"], t["weight"], t.get("bias"))).numpy()
    if spec.op == "conv_transpose":
        fn = getattr(F, f"conv_transpose{spec.rank}d")
        return act(fn(t["input"], t["weight"], t.get("bias"), spec.stride,
                      [lo for lo, _ in spec.padding], spec.output_padding, spec.groups,
                      spec.dilation)).numpy()
    # Gradients through autograd of the associated conv.
    c_x = spec.conv_channels[0]
    batch = t["grad_output"].shape[0]
    x = t.get("input", torch.zeros(batch, c_x, *spec.input_size, dtype=torch.float64))
    w = t.get("weight", torch.zeros(spec.weight_shape, dtype=torch.float64))
    x.requires_grad_(spec.op == "conv_grad_input")
    w.requires_grad_(spec.op == "conv_grad_weight")
    _conv(spec, x, w).backward(t["grad_output"])
    return (x.grad if spec.op == "conv_grad_input" else w.grad).numpy()
