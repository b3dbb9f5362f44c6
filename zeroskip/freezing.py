"""Frozen weights for serving: :func:`freeze` keeps packed weights across calls without
proving them by content.

By default a packed weight is reused only after a bit-for-bit comparison with the bytes it was
packed from (:mod:`zeroskip.runtime.packs`), so every write to a weight is seen, whichever
route it takes. A server whose weights never change can skip that comparison: ``freeze(model)``
is the promise, in the spirit of ``torch.jit.freeze``, that the weights' values change only
through writes torch counts (an optimizer step, ``load_state_dict``, in-place ops on the
parameters under ``no_grad``), which still repack. A write through ``.data``, a numpy or DLPack
view or another tensor over the same memory then goes unseen until :func:`unfreeze`.
"""
from __future__ import annotations

from typing import TypeVar

import torch

from .runtime import packs

M = TypeVar("M", torch.nn.Module, torch.Tensor)


def freeze(model: M) -> M:
    """Keep the packed weights of ``model`` (a module: all its parameters; or one tensor)
    across calls without comparing them; returns ``model``."""
    for t in _tensors(model):
        packs.freeze(t)
    return model


def unfreeze(model: M) -> M:
    """Undo :func:`freeze`: packs of ``model``'s weights are proven by content again."""
    for t in _tensors(model):
        packs.unfreeze(t)
    return model


def is_frozen(t: torch.Tensor) -> bool:
    """Whether ``t``'s storage is frozen."""
    return packs.is_frozen(t)


def _tensors(model) -> list[torch.Tensor]:
    if isinstance(model, torch.Tensor):
        return [model]
    if isinstance(model, torch.nn.Module):
        return [p for p in model.parameters() if p.device.type != "meta"]
    raise TypeError(f"freeze() expects an nn.Module or a Tensor, got {type(model).__name__}")
