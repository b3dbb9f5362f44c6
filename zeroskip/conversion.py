"""``convert(model)``: run every torch convolution module of a model on generated kernels.

(Not ``convert.py``: a submodule of that name would shadow the function ``zeroskip.convert``.)
"""
from __future__ import annotations

import torch

from .nn import FUSED_RELU, REPLACEMENTS


def convert(model: torch.nn.Module, fuse_relu: bool = True) -> torch.nn.Module:
    """Swap, in place, each module whose class is exactly one of torch's ``Conv{1,2,3}d`` or
    ``ConvTranspose{1,2,3}d`` for zeroskip's subclass (same parameters, buffers and hooks; the
    ``state_dict`` is unchanged), and return ``model``. Subclasses of torch's modules are left
    alone: their forward may do something else.

    With ``fuse_relu``, a ``ConvNd`` directly followed by a ``ReLU`` in an ``nn.Sequential``
    becomes a ``ConvReLUNd`` and the ReLU an ``nn.Identity`` (same ``state_dict``), when
    neither module has hooks, which would see the difference."""
    if fuse_relu:
        _fuse_relu(model)
    for module in model.modules():
        replacement = REPLACEMENTS.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
    return model


def _hooked(module: torch.nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or
                module._backward_hooks or getattr(module, "_backward_pre_hooks", None))


def _fuse_relu(model: torch.nn.Module) -> None:
    for seq in [m for m in model.modules() if type(m) is torch.nn.Sequential]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            conv, relu = seq._modules[first], seq._modules[second]
            fused = FUSED_RELU.get(type(conv))
            if fused and type(relu) is torch.nn.ReLU and not (_hooked(conv) or _hooked(relu)):
                conv.__class__ = fused
                seq._modules[second] = torch.nn.Identity()


__all__ = ["convert"]
