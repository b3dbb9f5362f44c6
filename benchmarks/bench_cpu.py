"""The full CPU benchmark: every layer of ``zeroskip.bench.SUITE`` against torch, saved as
``benchmarks/results/cpu-<date>.md`` and ``.json``. Extra arguments go to ``zeroskip bench``
(e.g. ``--threads 4 --batch 8``)."""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

from zeroskip.cli import main

RESULTS = Path(__file__).resolve().parent / "results"


if __name__ == "__main__":
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"cpu-{datetime.date.today().isoformat()}"
    sys.exit(main(["bench", "--json", f"{stem}.json", "--markdown", f"{stem}.md",
                   *sys.argv[1:]]))
