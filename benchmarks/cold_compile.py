"""Cold compile time of every operator of the layer suites (each layer's forward, input and
weight gradient), each built alone from an empty kernel cache, one at a time; the slowest
first. Saved as ``benchmarks/results/cold-compile-<date>.json`` (and printed).

    python benchmarks/cold_compile.py
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    os.environ["ZEROSKIP_COMPILE_AHEAD"] = "0"      # one build at a time, nothing beside it
    from zeroskip.bench.suite import SUITE, WIDE
    from zeroskip.runtime import loader
    rows = []
    for layer in SUITE + WIDE:
        for role, derive in (("forward", lambda s: s), ("grad_input", lambda s: s.grad_input()),
                             ("grad_weight", lambda s: s.grad_weight())):
            try:
                op = derive(layer.spec)
            except ValueError:          # a gradient no spec states
                continue
            with tempfile.TemporaryDirectory() as cache:
                os.environ["ZEROSKIP_CACHE_DIR"] = cache
                start = time.perf_counter()
                loader.kernel_for(op)
                rows.append({"seconds": round(time.perf_counter() - start, 2),
                             "layer": layer.name, "operator": role, "wide": layer.wide})
            print(f"{rows[-1]['seconds']:6.2f} s  {layer.name} {role}", flush=True)
    rows.sort(key=lambda r: -r["seconds"])
    out = RESULTS / f"cold-compile-{datetime.date.today().isoformat()}.json"
    out.write_text(json.dumps(rows, indent=1) + "\n")
    print("slowest:", *(f"{r['seconds']} s {r['layer']} {r['operator']}" for r in rows[:6]),
          sep="\n  ", file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
