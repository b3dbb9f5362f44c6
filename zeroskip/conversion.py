"""``convert(model)``: run every torch convolution module of a model on generated kernels.

(Not ``convert.py``: a submodule of that name would shadow the function ``zeroskip.convert``.)
"""
from __future__ import annotations

import torch

from .nn import REPLACEMENTS


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Swap, in place, each module whose class is exactly one of torch's ``Conv{1,2,3}d`` or
    ``ConvTranspose{1,2,3}d`` for zeroskip's subclass (same parameters, buffers and hooks; the
    ``state_dict`` is unchanged), and return ``model``. Subclasses of torch's modules are left
    alone: their forward may do something else."""
    for module in model.modules():
        replacement = REPLACEMENTS.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
    return model


__all__ = ["convert"]
