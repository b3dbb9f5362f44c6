"""torch's own answers, once: the forward of a spec or of a call's arguments, both gradients, and
how far a result may be from them.

Every generated kernel is compared with these (tests, the autotuner, the bench), and what no
kernel covers runs on them (:func:`convolution`, :func:`gradient`).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from ..spec import LayerSpec, normalize_padding
from . import stats
from .arguments import parse_config, spec_from_config

TOLERANCE = 1e-4       # a kernel's max error, relative to the largest magnitude of torch's
# Triton kernels: float16 and bfloat16 round more; float32 multiplies as TF32 where torch does.
TRITON_TOLERANCE = {"float32": TOLERANCE, "float16": 1e-2, "bfloat16": 2e-2}
TF32_TOLERANCE = 1e-2


def forward(spec: LayerSpec, x: torch.Tensor, w: torch.Tensor,
                    b: torch.Tensor | None) -> torch.Tensor:
    """torch's own result for a forward spec (conv or conv_transpose) on its operands."""
    out = _forward_linear(spec, x, w, b)
    return F.relu(out) if spec.activation == "relu" else out


def _forward_linear(spec: LayerSpec, x, w, b) -> torch.Tensor:
    rank, pads = spec.rank, spec.padding
    if spec.op == "conv_transpose":
        fn = getattr(F, f"conv_transpose{rank}d")
        return fn(x, w, b, spec.stride, [lo for lo, _ in pads], spec.output_padding,
                  spec.groups, spec.dilation)
    if spec.op != "conv":
        raise ValueError(f"torch_reference covers conv and conv_transpose, not {spec.op!r}")
    fn = getattr(F, f"conv{rank}d")
    if spec.padding_mode == "zeros" and all(lo == hi for lo, hi in pads):
        return fn(x, w, b, spec.stride, [lo for lo, _ in pads], spec.dilation, spec.groups)
    mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
    x = F.pad(x, [p for pair in reversed(pads) for p in pair], mode=mode)
    return fn(x, w, b, spec.stride, 0, spec.dilation, spec.groups)


def _tuple(value, rank: int) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,) * rank


def convolution(op, rank, x, w, b, stride, padding, dilation, groups, output_padding,
                       padding_mode, activation="none"):
    out = _convolution_linear(op, rank, x, w, b, stride, padding, dilation, groups, output_padding,
                        padding_mode)
    return F.relu(out) if activation == "relu" else out


def _convolution_linear(op, rank, x, w, b, stride, padding, dilation, groups, output_padding,
                  padding_mode):
    if op == "conv_transpose":
        fn = getattr(F, f"conv_transpose{rank}d")
        return fn(x, w, b, stride, padding, output_padding, groups, dilation)
    fn = getattr(F, f"conv{rank}d")
    if padding_mode != "zeros":
        pad = normalize_padding(padding, tuple(w.shape[2:]), _tuple(dilation, rank),
                                _tuple(stride, rank))
        x = F.pad(x, [p for pair in reversed(pad) for p in pair], mode=padding_mode)
        padding = 0
    return fn(x, w, b, stride, padding, dilation, groups)



def has_gradient(spec: LayerSpec) -> bool:
    """Whether :func:`gradient` covers the layer's calls: zero, symmetric padding."""
    return spec.padding_mode == "zeros" and all(lo == hi for lo, hi in spec.padding)


def gradient(which: str, grad, other, size, config: str) -> torch.Tensor:
    """torch's own gradient (aten.convolution_backward, as ``torch.nn.grad`` calls it), for a
    call no kernel covers: ``gradient_of`` the call's spec, run once."""
    op = parse_config(config)[0]
    shapes = (size, other.shape) if which == "input" else (other.shape, size)
    spec = spec_from_config(config, *shapes, False, grad.dtype)
    if not has_gradient(spec):
        raise stats.FallbackError(f"no gradient for {spec.describe()}: its kernel failed to "
                                  "build and torch's fallback needs symmetric zero padding")
    return gradient_of(which, spec, op == "conv_transpose")(grad, other, size)


def gradient_of(which: str, spec: LayerSpec, transposed: bool
                ) -> Callable[[torch.Tensor, torch.Tensor, tuple], torch.Tensor]:
    """torch's input (``which`` 'input') or weight gradient of the layer ``spec`` (zero,
    symmetric padding: :func:`has_gradient`; ``transposed``: a conv_transpose layer) as a call
    ``(grad, other, size)``, the arguments fixed once: ``other`` is the weight, ``size`` the
    input's shape, or the other way round. The operand it does not read is a one-element tensor
    expanded to its shape (no memory)."""
    args = (None, list(spec.stride), [lo for lo, _ in spec.padding], list(spec.dilation),
            transposed, list(spec.output_padding), spec.groups,
            [which == "input", which == "weight", False])
    rank = spec.rank

    def run(grad: torch.Tensor, other: torch.Tensor, size: tuple) -> torch.Tensor:
        x = other if which == "weight" else grad.new_empty(1).expand(size)
        w = other if which == "input" else grad.new_empty(1).expand(size)
        batched = x.dim() == rank + 2
        if not batched:
            x, grad = x.unsqueeze(0), grad.unsqueeze(0)
        gx, gw, _ = torch.ops.aten.convolution_backward(grad, x, w, *args)
        if which == "input":
            return gx if batched else gx.squeeze(0)
        return gw
    return run


def _zero_padded_conv(spec: LayerSpec, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The associated forward conv of a gradient spec, padded as torch's modules pad."""
    conv = getattr(F, f"conv{spec.rank}d")
    flat = [p for pair in reversed(spec.padding) for p in pair]
    mode = "constant" if spec.padding_mode == "zeros" else spec.padding_mode
    return conv(F.pad(x, flat, mode=mode), w, None, spec.stride, 0, spec.dilation, spec.groups)


def op(spec: LayerSpec, t: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    """torch's own op for ``spec`` on the operands ``t`` (as :func:`autotune.operands` names
    them), as a call: the forward through ``torch.nn.functional``, the gradients through
    ``aten.convolution_backward`` (cuDNN on a GPU) of the associated conv."""
    if spec.op in ("conv", "conv_transpose"):
        return lambda: forward(spec, t["input"], t["weight"], t.get("bias"))
    c_x = spec.conv_channels[0]
    like = t["grad_output"]
    # The operand not needed is a one-element tensor expanded to its shape, as in gradient().
    x = t.get("input")
    if x is None:
        x = like.new_empty(1).expand(like.shape[0], c_x, *spec.input_size)
    w = t.get("weight")
    if w is None:
        w = like.new_empty(1).expand(spec.weight_shape)
    w = w.detach()
    which = 0 if spec.op == "conv_grad_input" else 1
    if spec.padding_mode == "zeros" and all(lo == hi for lo, hi in spec.padding):
        mask = [which == 0, which == 1, False]
        args = (None, list(spec.stride), [lo for lo, _ in spec.padding], list(spec.dilation),
                False, [0] * spec.rank, spec.groups, mask)
        return lambda: torch.ops.aten.convolution_backward(like, x, w, *args)[which]

    def through_autograd() -> torch.Tensor:
        with torch.enable_grad():
            leaves = (x.detach().requires_grad_(which == 0), w.detach().requires_grad_(which == 1))
            y = _zero_padded_conv(spec, *leaves)
            return torch.autograd.grad(y, leaves[which], like)[0]
    return through_autograd



def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (in float32), inf where the shapes differ."""
    if got.shape != want.shape:
        return math.inf
    if not want.numel():
        return 0.0
    want32 = want.float()
    scale = max(float(want32.abs().max()), 1e-30)
    return float((got.float() - want32).abs().max()) / scale



def tolerance(dtype: str, device: torch.device | str) -> float:
    """The largest error a Triton candidate may show, relative to the largest magnitude of
    torch's result: 1e-4 for float32 in IEEE precision, 1e-2 where float32 multiplies as TF32
    (on a GPU with ``torch.backends.cudnn.allow_tf32``, torch's default), 1e-2 for float16 and
    2e-2 for bfloat16 (8 significant bits: one rounding of the output is up to 0.8%)."""
    if dtype == "float32" and torch.device(device).type == "cuda" and \
            torch.backends.cudnn.allow_tf32:
        return TF32_TOLERANCE
    return TRITON_TOLERANCE.get(dtype, TOLERANCE)

