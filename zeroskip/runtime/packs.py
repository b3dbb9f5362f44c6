"""Packed weights, kept across calls only while they are proven to match the weights.

A kernel reads its weights in its own layout; packing them costs a pass over the weights. A
pack is reused on a later call only if it still equals what packing the weights now would give:

- **by default, proven by content.** The weights' memory is compared, bit for bit, with a copy
  of what was packed (the library's ``zs_same``: a multi-threaded ``memcmp``). No route of
  writing escapes it: ``.data``, numpy or DLPack views, ``torch.from_numpy`` sharing, ``set_``,
  a storage resized or freed and its memory reused. A new version (an optimizer step, any
  in-place op torch counts) repacks without comparing; so does a call with no copy yet: the
  copy is taken on the first repeated call at one version, so a training loop, whose weights
  change every step, never pays for it.
- **frozen** (:func:`freeze`, ``zeroskip.freeze(model)``): the user promises the storage's
  values change only through what torch counts. A pack made after the promise is reused while
  the pointer, strides, version and storage are the same, with no comparison and no copy; a
  write through ``.data`` or numpy to a frozen weight is then not seen (:func:`unfreeze`, or
  ``zeroskip.runtime.loader.forget_packed()``).

A kernel without a compare (``same=None``: Triton, whose packs are one device copy) caches
frozen weights only. Weights that are not one dense block of memory (neither contiguous nor
channels_last) are packed on every call unless frozen. A new version replaces its tensors'
entry, so a training loop keeps one pack per layer.
"""
from __future__ import annotations

import collections
import ctypes
import itertools
import threading
from typing import Any, Callable

import torch
from torch.multiprocessing.reductions import StorageWeakRef

PACK_CACHE_SIZE = 64      # packs per kernel: every layer of one shape in a deep model

Same = Callable[[int, int, int, int], int]   # (threads, address, address, bytes) -> 1 if equal

_clock = itertools.count(1)          # orders freezes and packs
_frozen: dict[int, tuple[StorageWeakRef, int]] = {}   # storage -> (its weak reference, when)
_frozen_lock = threading.Lock()
_sweep_at = 64            # the registry's size at which expired entries are next swept


# ------------------------------------------------------------------------------ frozen storages
def freeze(t: torch.Tensor) -> None:
    """Promise that ``t``'s storage changes only through writes torch counts in the version of
    the tensors that use it: packs made from now on are reused without comparing contents."""
    global _sweep_at
    ref = StorageWeakRef(t.untyped_storage())
    with _frozen_lock:
        if len(_frozen) >= _sweep_at:      # forget storages that are gone, now and then
            for cdata in [c for c, (r, _) in _frozen.items() if r.expired()]:
                del _frozen[cdata]
            _sweep_at = 2 * len(_frozen) + 64
        _frozen[ref.cdata] = (ref, next(_clock))


def unfreeze(t: torch.Tensor) -> None:
    """Withdraw :func:`freeze`'s promise for ``t``'s storage: its packs are proven by content
    again (the next call repacks)."""
    with _frozen_lock:
        _frozen.pop(StorageWeakRef(t.untyped_storage()).cdata, None)


def is_frozen(t: torch.Tensor) -> bool:
    return _frozen_since(StorageWeakRef(t.untyped_storage())) is not None


def _frozen_since(ref: StorageWeakRef) -> int | None:
    """When ``ref``'s storage was frozen (None: not frozen)."""
    entry = _frozen.get(ref.cdata)
    # A held weak reference keeps the storage's address from being reused; an expired one is
    # a storage that is gone.
    if entry is None or entry[0].expired():
        return None
    return entry[1]


# ------------------------------------------------------------------------------------ the cache
class _Entry:
    __slots__ = ("versions", "packed", "refs", "tick", "copies")

    def __init__(self, versions, packed, refs, tick, copies):
        self.versions, self.packed, self.refs, self.tick = versions, packed, refs, tick
        self.copies = copies     # the bytes packed, weight's and bias's (None: not kept)


class PackCache:
    """A kernel's packs: :meth:`get` returns the pack of ``(weight, bias)``, reused where it is
    proven current (module docstring), else made with ``pack(weight, bias)``; the oldest entry
    goes when more than ``size`` are kept (layers of one shape share a kernel, so a kernel has
    one entry per such layer in a model). ``same`` compares two spans of memory (None: only
    frozen weights are cached)."""

    def __init__(self, size: int = PACK_CACHE_SIZE, same: Same | None = None):
        self.size, self.same = size, same
        self._packs: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def get(self, weight: torch.Tensor, bias: torch.Tensor | None,
            pack: Callable[[torch.Tensor, Any], torch.Tensor]) -> torch.Tensor:
        # Spelled out for weight and bias (no loops): this runs on every call.
        key = (weight.data_ptr(), weight.stride(), weight.device,
               None if bias is None else (bias.data_ptr(), bias.stride()))
        versions = (_version(weight), None if bias is None else _version(bias))
        hit = self._packs.get(key)      # one dict read: atomic, no lock needed to look
        repeat = hit is not None and hit.versions == versions and _alive(hit.refs)
        if repeat:
            if _frozen and _frozen_before(hit.refs, hit.tick):
                return hit.packed
            if hit.copies is not None and self._unchanged(hit.copies, weight, bias):
                return hit.packed
        refs = (StorageWeakRef(weight.untyped_storage()),
                None if bias is None else StorageWeakRef(bias.untyped_storage()))
        tick = next(_clock)
        copies = None
        if not (_frozen and _frozen_before(refs, tick)):
            if self.same is None:
                return pack(weight, bias)     # nothing to prove a later call with
            if repeat:
                # The second call at one version takes the copy (the first may be a training
                # step's, whose weights change before the next call). Copied before packing:
                # a write in between then makes the next comparison fail, never pass.
                copies = _copy(weight, bias)
                if copies is None:
                    return pack(weight, bias)     # not one dense block: packed every call
        packed = pack(weight, bias)
        with self._lock:
            self._packs[key] = _Entry(versions, packed, refs, tick, copies)
            self._packs.move_to_end(key)
            while len(self._packs) > self.size:
                self._packs.popitem(last=False)
        return packed

    def peek(self, weight: torch.Tensor, bias: torch.Tensor | None) -> tuple | None:
        """``(packed, weight's copy, bias's copy)`` where :meth:`get` would prove the pack by
        comparing ``weight`` and ``bias`` with those copies (the caller compares: the compiled
        launcher does, in the same call as the kernel's), ``(packed, None, None)`` where a
        freeze vouches for it, else None (:meth:`get` decides). Whether the storages are the
        ones packed needs no check here: the bytes compared are the bytes packed."""
        key = (weight.data_ptr(), weight.stride(), weight.device,
               None if bias is None else (bias.data_ptr(), bias.stride()))
        hit = self._packs.get(key)
        if hit is None or hit.versions != (_version(weight),
                                           None if bias is None else _version(bias)):
            return None
        if _frozen and _alive(hit.refs) and _frozen_before(hit.refs, hit.tick):
            return hit.packed, None, None
        if hit.copies is None:
            return None
        return hit.packed, hit.copies[0], hit.copies[1]

    def _unchanged(self, copies: tuple, weight: torch.Tensor, bias: torch.Tensor | None
                   ) -> bool:
        """Whether ``weight`` and ``bias`` hold, bit for bit, the bytes copied when packing."""
        w_copy, b_copy = copies
        # zs_same compares small spans on one thread whatever it is given
        if not self.same(torch.get_num_threads(), weight.data_ptr(), w_copy.data_ptr(),
                         w_copy.numel()):
            return False
        return bias is None or bool(self.same(1, bias.data_ptr(), b_copy.data_ptr(),
                                              b_copy.numel()))

    def clear(self) -> None:
        with self._lock:
            self._packs.clear()

    def __len__(self) -> int:
        return len(self._packs)


def _version(t: torch.Tensor) -> int | None:
    """``t``'s version (None for inference tensors, which have none: the contents decide)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _alive(refs: tuple) -> bool:
    return not refs[0].expired() and (refs[1] is None or not refs[1].expired())


def _frozen_before(refs: tuple, tick: int) -> bool:
    """Whether the weight's storage, and the bias's if any, were frozen before ``tick`` (a pack
    made before the promise is proven like any other)."""
    return all(ref is None or (since := _frozen_since(ref)) is not None and since < tick
               for ref in refs)


def _span(t: torch.Tensor) -> int | None:
    """Bytes of the one dense block ``t``'s elements fill from its data pointer (contiguous or
    channels_last), or None."""
    dense = t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(
        memory_format=torch.channels_last)) or (t.dim() == 5 and t.is_contiguous(
            memory_format=torch.channels_last_3d))
    return t.numel() * t.element_size() if dense else None


def _copy(weight: torch.Tensor, bias: torch.Tensor | None) -> tuple | None:
    """Copies of the bytes of ``weight`` and ``bias`` (None where one is not a dense block)."""
    spans = (_span(weight), 0 if bias is None else _span(bias))
    if None in spans:
        return None
    copies = []
    for t, n in ((weight, spans[0]), (bias, spans[1])):
        if t is None:
            copies.append(None)
            continue
        copy = torch.empty(n, dtype=torch.uint8)
        if n:
            ctypes.memmove(copy.data_ptr(), t.data_ptr(), n)
        copies.append(copy)
    return tuple(copies)
