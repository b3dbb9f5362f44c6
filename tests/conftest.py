"""Every test session compiles into its own kernel cache, never the user's."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
from hypothesis import settings

# CI replays the same examples every run (a red build then means a change broke something);
# locally every run explores new ones.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# One kernel cache for the whole run: the process that starts pytest makes it, and parallel
# workers (pytest-xdist), which inherit its environment, share it (the cache is safe across
# processes) instead of compiling every kernel once per worker.
_SESSION_CACHE = os.environ.get("ZEROSKIP_TEST_RUN_CACHE")
if not _SESSION_CACHE:
    _SESSION_CACHE = tempfile.mkdtemp(prefix="zeroskip-test-cache-")
    atexit.register(shutil.rmtree, _SESSION_CACHE, ignore_errors=True)
    os.environ["ZEROSKIP_TEST_RUN_CACHE"] = _SESSION_CACHE
os.environ["ZEROSKIP_CACHE_DIR"] = _SESSION_CACHE
# No GPU here: in-process Triton kernels run under Triton's interpreter, which must be chosen
# before triton is first imported. Compiling for GPU targets runs in subprocesses without it.
os.environ["TRITON_INTERPRET"] = "1"
os.environ.pop("ZEROSKIP_BACKEND", None)
# Kernels compiled ahead by background threads would land in whichever cache and memo a later
# test sets up: off, except in the tests of it (tests/test_compile_ahead.py).
os.environ["ZEROSKIP_COMPILE_AHEAD"] = "0"
# Likewise the compiled launcher, built on a background thread into whichever cache is current:
# off, except in its own tests (tests/test_launcher.py), which build it and turn it on.
os.environ["ZEROSKIP_LAUNCHER"] = "0"
os.environ.pop("ZEROSKIP_STRICT", None)
os.environ.pop("ZEROSKIP_DUMP", None)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache directory and an empty in-process memo, for tests of compiling."""
    from zeroskip.runtime import calls, gradients, loader
    monkeypatch.setenv("ZEROSKIP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(loader, "_kernels", {})
    monkeypatch.setattr(loader, "_identities", {})
    monkeypatch.setattr(calls, "_calls", {})
    gradients.forget()
    yield tmp_path / "cache"
    gradients.forget()   # its kernels live in the directory just removed
