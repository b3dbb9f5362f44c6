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


def fusable_pairs(model: torch.nn.Module) -> list[tuple[torch.nn.Sequential, str, str]]:
    """``(sequential, conv name, relu name)`` for each ``ConvNd`` that ``convert(model,
    fuse_relu=True)`` fuses with the ``ReLU`` after it; changes nothing (``zeroskip trace`` asks
    which layers will run a fused kernel). A conv fuses once, with the first such ReLU."""
    pairs, fused = [], set()
    for seq in [m for m in model.modules() if type(m) is torch.nn.Sequential]:
        names = list(seq._modules)
        for first, second in zip(names, names[1:]):
            conv, relu = seq._modules[first], seq._modules[second]
            if (type(conv) in FUSED_RELU and id(conv) not in fused
                    and type(relu) is torch.nn.ReLU and not (_hooked(conv) or _hooked(relu))):
                pairs.append((seq, first, second))
                fused.add(id(conv))
    return pairs


def _fuse_relu(model: torch.nn.Module) -> None:
    for seq, first, second in fusable_pairs(model):
        conv = seq._modules[first]
        conv.__class__ = FUSED_RELU[type(conv)]
        seq._modules[second] = torch.nn.Identity()


__all__ = ["convert", "fusable_pairs"]
