"""The full CPU benchmark: every layer of ``zeroskip.bench.SUITE`` against torch, saved as
``benchmarks/results/cpu-<date>.md`` and ``.json`` (``cpu-backward-<date>.*`` with
``--backward``). Extra arguments go to ``zeroskip bench`` (e.g. ``--threads 4 --batch 8``)."""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

from zeroskip.cli import main

RESULTS = Path(__file__).resolve().parent / "results"


if __name__ == "__main__":
    RESULTS.mkdir(exist_ok=True)
    kind = "cpu-backward" if "--backward" in sys.argv[1:] else "cpu"
    stem = RESULTS / f"{kind}-{datetime.date.today().isoformat()}"
    sys.exit(main(["bench", "--json", f"{stem}.json", "--markdown", f"{stem}.md",
                   *sys.argv[1:]]))
