"""What proving packs by content costs a training loop: one training step of each suite layer
(``zeroskip.bench.backward``'s step: forward, backward, an SGD step) with the default packs and
with frozen weights (``zeroskip.freeze``: packs kept on the version alone, as before the
content check existed), side by side in one run. The optimizer changes the weights every step,
so both repack every step; the default takes no copy and compares nothing (the copy is taken
on the second call at one version). A second default step on its own operands, timed in the
same rounds, gives the noise of the comparison. Saved as
``benchmarks/results/packs-train-b<B>-<date>.md`` and ``.json``.

    python benchmarks/bench_packs.py [--batch 16] [--repeats 5] [--layers SUBSTR ...]
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
from pathlib import Path

import torch

import zeroskip
from zeroskip.bench import backward
from zeroskip.bench.common import call_args, machine
from zeroskip.bench.suite import SUITE
from zeroskip.runtime.timing import steady_allocator, time_interleaved

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", nargs="+", metavar="SUBSTR")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steady_allocator()
    rows = []
    for layer in SUITE:
        if args.layers and not any(s in layer.name for s in args.layers):
            continue
        spec = layer.spec
        fn = getattr(zeroskip.functional, spec.torch_name)
        kwargs = call_args(spec)
        steps = {}
        for mode in ("default", "frozen", "default again"):
            x, w, b, g = backward.train_operands(spec, batch=args.batch)
            if mode == "frozen":
                zeroskip.freeze(w)
                if b is not None:
                    zeroskip.freeze(b)
            steps[mode] = backward._step(fn, kwargs, x, w, b, g)
        times = time_interleaved(steps, args.repeats, 0.2).seconds
        row = {"layer": layer.name, "default_ms": times["default"] * 1e3,
               "frozen_ms": times["frozen"] * 1e3,
               "default_over_frozen": times["default"] / times["frozen"],
               "default_over_default": times["default"] / times["default again"]}
        rows.append(row)
        print(f"{layer.name:28s} default {row['default_ms']:9.3f} ms  frozen "
              f"{row['frozen_ms']:9.3f} ms  default/frozen {row['default_over_frozen']:.3f}  "
              f"default/default {row['default_over_default']:.3f}", flush=True)
    geomean, noise = (math.exp(statistics.fmean(math.log(r[key]) for r in rows))
                      for key in ("default_over_frozen", "default_over_default"))
    today = datetime.date.today().isoformat()
    stem = RESULTS / f"packs-train-b{args.batch}-{today}"
    lines = [f"# Training steps, default packs vs frozen weights ({today}, batch {args.batch}, "
             f"{args.threads} threads, {machine().get('cpu', '')})", "",
             "| layer | default ms | frozen ms | default / frozen | default / default (noise) |",
             "|---|---:|---:|---:|---:|"]
    lines += [f"| {r['layer']} | {r['default_ms']:.3f} | {r['frozen_ms']:.3f} "
              f"| {r['default_over_frozen']:.3f} | {r['default_over_default']:.3f} |"
              for r in rows]
    lines += ["", f"- geomean default / frozen step time over {len(rows)} layers: {geomean:.3f}",
              f"- geomean default / default (two runs of the same path): {noise:.3f}"]
    RESULTS.mkdir(exist_ok=True)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(
        {"batch": args.batch, "threads": args.threads, "machine": machine(), "rows": rows,
         "geomean_default_over_frozen": geomean, "geomean_default_over_default": noise},
        indent=1))
    print(f"geomean default/frozen: {geomean:.3f}, default/default: {noise:.3f}; wrote {stem}.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
