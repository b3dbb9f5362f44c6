"""The full GPU benchmark: the Triton kernels of every layer of ``zeroskip.bench.SUITE`` against
torch (cuDNN) on a CUDA GPU, in float32, float16 and bfloat16 (forward, input and weight
gradients, and the block-sparse kernel at 90% zeros), saved as
``benchmarks/results/gpu-<date>.md`` and ``.json``. Extra arguments go to
``zeroskip bench --device cuda`` (e.g. ``--dtypes float16 --batch 64 --tune --quick``). Without
a GPU it exits 1 saying why, and writes nothing."""
from __future__ import annotations

import datetime
import sys
from pathlib import Path

from zeroskip.cli import main

RESULTS = Path(__file__).resolve().parent / "results"


def outputs() -> list[str]:
    """The ``zeroskip bench`` flags that save this run's files under :data:`RESULTS`."""
    stem = RESULTS / f"gpu-{datetime.date.today().isoformat()}"
    return ["--json", f"{stem}.json", "--markdown", f"{stem}.md"]


if __name__ == "__main__":
    RESULTS.mkdir(exist_ok=True)
    sys.exit(main(["bench", "--device", "cuda", *outputs(), *sys.argv[1:]]))
