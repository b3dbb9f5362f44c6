"""The conv layers a model runs, as LayerSpecs with the input density measured on sample data."""
from __future__ import annotations

import torch
from torch import nn

from .spec import LayerSpec

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d,
              nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def spec_of(module: nn.Module, input_shape: tuple[int, ...], density: float = 1.0,
            dtype=None) -> LayerSpec:
    """The LayerSpec of a torch conv module applied to a batched input of ``input_shape``."""
    if not isinstance(module, CONV_TYPES):
        raise TypeError(f"expected a torch convolution module, got {type(module).__name__}")
    batch, _, *size = input_shape
    common = dict(bias=module.bias is not None, padding_mode=module.padding_mode,
                  dtype=dtype or module.weight.dtype, input_size=tuple(size), batch=batch,
                  density=density)
    if module.transposed:
        return LayerSpec.conv_transpose(
            module.in_channels, module.out_channels, module.kernel_size, module.stride,
            module.padding, module.output_padding, module.groups, dilation=module.dilation,
            **common)
    return LayerSpec.conv(module.in_channels, module.out_channels, module.kernel_size,
                          module.stride, module.padding, module.dilation, module.groups,
                          **common)


@torch.no_grad()
def trace_specs(model: nn.Module, *inputs: torch.Tensor) -> list[tuple[str, LayerSpec]]:
    """Run ``model(*inputs)`` and return ``(module name, spec)`` for every conv call, in call
    order, with the density of non-zeros of the input each call actually saw."""
    found: list[tuple[str, LayerSpec]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, CONV_TYPES):
            def hook(mod, args, name=name):
                x = args[0]
                density = float((x != 0).sum()) / max(x.numel(), 1)
                found.append((name, spec_of(mod, tuple(x.shape), round(density, 4))))
            handles.append(module.register_forward_pre_hook(hook))
    try:
        model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return found
