"""Environment variables that every call reads, read cheaply.

``os.environ.get`` encodes the name and decodes the value on each call (~0.5-1 us); a
convolution call reads several variables (the backend, sparse dispatch, bundles, the tuning
database's location). :func:`get` reads the same mapping ``os.environ`` keeps, with each name
encoded once: the values are as fresh as ``os.environ``'s (writes through ``os.environ`` and
``monkeypatch.setenv`` update that mapping), at ~50 ns where the variable is unset.
"""
from __future__ import annotations

import os

# CPython's os.environ keeps its values in ``_data``, keyed by ``encodekey(name)``; elsewhere
# (or should that change) plain os.environ.get serves.
_data = getattr(os.environ, "_data", None)
_encode = getattr(os.environ, "encodekey", None)
_decode = getattr(os.environ, "decodevalue", None)
_FAST = isinstance(_data, dict) and callable(_encode) and callable(_decode)
_keys: dict[str, object] = {}


def get(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)``."""
    if not _FAST:
        return os.environ.get(name, default)
    key = _keys.get(name)
    if key is None:
        key = _keys[name] = _encode(name)
    raw = _data.get(key)
    return default if raw is None else _decode(raw)
