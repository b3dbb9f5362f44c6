"""Every test session compiles into its own kernel cache, never the user's."""
from __future__ import annotations

import os
import tempfile

import pytest

_SESSION_CACHE = tempfile.mkdtemp(prefix="zeroskip-test-cache-")
os.environ["ZEROSKIP_CACHE_DIR"] = _SESSION_CACHE
os.environ.pop("ZEROSKIP_STRICT", None)
os.environ.pop("ZEROSKIP_DUMP", None)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache directory and an empty in-process memo, for tests of compiling."""
    from zeroskip.runtime import ops
    monkeypatch.setenv("ZEROSKIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(ops, "_kernels", {})
    monkeypatch.setattr(ops, "_calls", {})
    return tmp_path / "cache"
