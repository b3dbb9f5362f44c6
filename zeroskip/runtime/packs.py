"""Packed weights, cached by the storage and version of the tensors they were packed from.

A kernel reads its weights in its own layout; packing them costs a pass over the weights, so a
pack is kept while its tensors are unchanged: same data pointer and strides, same version
(which optimizers and in-place ops advance, views sharing it), and the same storage (a weak
reference tells a freed storage from a new tensor that reuses its memory). This serves
``nn.Parameter``s and plain tensors that need no gradient (:func:`_cacheable`; others are
packed every call). Writes torch does not count (through ``.data`` or numpy) need
:func:`zeroskip.runtime.loader.forget_packed`. A new version replaces its tensors' entry, so a
training loop keeps one pack per layer.
"""
from __future__ import annotations

import collections
import threading
from typing import Any, Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef

PACK_CACHE_SIZE = 64      # packs per kernel: every layer of one shape in a deep model


class PackCache:
    """A kernel's packs: :meth:`get` returns the cached pack of ``(weight, bias)`` or makes it
    with ``pack(weight, bias)``; the oldest entry goes when more than ``size`` are kept (layers
    of one shape share a kernel, so a kernel has one entry per such layer in a model)."""

    def __init__(self, size: int = PACK_CACHE_SIZE):
        self.size = size
        self._packs: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, weight: torch.Tensor, bias: torch.Tensor | None,
            pack: Callable[[torch.Tensor, Any], torch.Tensor]) -> torch.Tensor:
        if not (_cacheable(weight) and (bias is None or _cacheable(bias))):
            return pack(weight, bias)
        # Spelled out for weight and bias (no loops): this runs on every call.
        key = (weight.data_ptr(), weight.stride(), weight.device,
               None if bias is None else (bias.data_ptr(), bias.stride()))
        versions = (weight._version, None if bias is None else bias._version)
        hit = self._packs.get(key)      # one dict read: atomic, no lock needed to look
        if hit is not None and hit[0] == versions and not hit[2].expired() and \
                (hit[3] is None or not hit[3].expired()):
            return hit[1]
        packed = pack(weight, bias)
        with self._lock:
            self._packs[key] = (versions, packed, StorageWeakRef(weight.untyped_storage()),
                                None if bias is None else StorageWeakRef(bias.untyped_storage()))
            self._packs.move_to_end(key)
            while len(self._packs) > self.size:
                self._packs.popitem(last=False)
        return packed

    def clear(self) -> None:
        with self._lock:
            self._packs.clear()

    def __len__(self) -> int:
        return len(self._packs)


def _cacheable(t: torch.Tensor) -> bool:
    """A Parameter, or a plain tensor that needs no gradient, and has a version. A plain tensor
    that needs a gradient is one being differentiated by hand, where finite differences
    (``torch.autograd.gradcheck``) perturb it through ``.data``, which its version does not
    see; an inference-mode tensor has no version."""
    return (type(t) is torch.nn.Parameter or not t.requires_grad) and not t.is_inference()
