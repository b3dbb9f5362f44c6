"""Faults (issue 7), each met by a new process as a user meets it: a truncated ``kernel.so``,
a garbage ``meta.json``, a half-written build folder, the C compiler SIGKILLed mid-compile and
the building Python process SIGKILLed while it holds the key's lock. Each is detected on next
use and rebuilt, and nothing wrong is served: every result is compared with torch's.
(``test_cache.py`` covers the same corruptions within one process.)"""
from __future__ import annotations

import pytest

from reliability_helpers import FAULTS, failed_checks


@pytest.mark.parametrize("fault", FAULTS)
def test_fault_is_detected_and_rebuilt(tmp_path, fault):
    result = FAULTS[fault](tmp_path / "cache", tmp_path)
    assert result["checks"] and all(result["checks"].values()), failed_checks(result)
