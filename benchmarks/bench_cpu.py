"""The full CPU benchmark: every layer of ``zeroskip.bench.SUITE`` against torch, saved as
``benchmarks/results/cpu-<date>.md`` and ``.json`` (``cpu-backward-<date>.*`` with
``--backward``; with ``--densities``, the density sweep as ``cpu-density-<date>.md``, ``.json``
and ``.png``; both: ``cpu-backward-density-<date>.*``, a training step per layer and density). Extra arguments go to ``zeroskip bench`` (e.g. ``--threads 4 --batch 8``)."""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

from zeroskip.cli import main

RESULTS = Path(__file__).resolve().parent / "results"


def outputs(argv: list[str]) -> list[str]:
    """The ``zeroskip bench`` flags that save this run's files under :data:`RESULTS`."""
    densities = any(arg.split("=")[0] == "--densities" for arg in argv)
    backward = "--backward" in argv
    kind = {(False, False): "cpu", (True, False): "cpu-density",
            (False, True): "cpu-backward", (True, True): "cpu-backward-density"}[
        (densities, backward)]
    stem = RESULTS / f"{kind}-{datetime.date.today().isoformat()}"
    flags = ["--json", f"{stem}.json", "--markdown", f"{stem}.md"]
    return flags + ["--plot", f"{stem}.png"] if densities and not backward else flags


if __name__ == "__main__":
    RESULTS.mkdir(exist_ok=True)
    sys.exit(main(["bench", *outputs(sys.argv[1:]), *sys.argv[1:]]))
