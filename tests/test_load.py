"""Load (issue 7): processes started together on one cold cache compile each kernel once in
total and all equal torch; a cached layer called many times neither grows in RSS nor leaks file
descriptors. Small counts by default; ``ZEROSKIP_FULL_COUNTS=1`` runs the report's (8
processes, 100k calls: ``benchmarks/reliability.py``)."""
from __future__ import annotations

import pytest

from reliability_helpers import RACE_PROCESSES, SOAK_CALLS, failed_checks, race, soak

pytestmark = pytest.mark.slow


def test_cold_cache_race_compiles_each_kernel_once(tmp_path):
    result = race(tmp_path / "cache", RACE_PROCESSES)
    assert result["checks"] and all(result["checks"].values()), failed_checks(result)
    figures = result["figures"]
    assert figures["processes"] == RACE_PROCESSES and figures["kernels"] >= 10


def test_soak_no_memory_or_fd_growth(tmp_path):
    result = soak(tmp_path / "cache")
    assert result["checks"] and all(result["checks"].values()), failed_checks(result)
    loops = result["figures"]["loops"]
    assert [loop["calls"] for loop in loops.values()] == [SOAK_CALLS, SOAK_CALLS // 10]
