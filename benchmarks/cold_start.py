"""A converted model's first steps from an empty kernel cache, as a new user meets them: the
first eval call at batch 1 and training step at batch 8, then (with ``--compile background``)
how long until every kernel is built while training goes on. Each model runs in a fresh
process on an empty cache. Saved as ``benchmarks/results/cold-start-<date>.md``.

    python benchmarks/cold_start.py                              # both modes, both models
    python benchmarks/cold_start.py --models squeezenet --modes background
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"squeezenet": ("SqueezeNet", 224), "cifar-resnet": ("CifarResNet", 32),
          "resnet18": ("ResNet", 224)}


def child(model: str, threads: int) -> None:
    """One cold start in this (fresh) process; prints a JSON line."""
    import torch

    import zeroskip
    from zeroskip import models
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cls, size = MODELS[model]
    net = getattr(models, cls)()
    x1, x8 = torch.randn(1, 3, size, size), torch.randn(8, 3, size, size)
    start = time.perf_counter()
    converted = zeroskip.convert(net).eval()
    with torch.no_grad():
        converted(x1)
    first_eval = time.perf_counter() - start
    converted.train()
    converted(x8).float().square().mean().backward()
    first_step = time.perf_counter() - start
    steps = 0
    while not zeroskip.wait_for_kernels(0):      # training goes on while kernels build
        converted.zero_grad()
        converted(x8).float().square().mean().backward()
        steps += 1
    built = time.perf_counter() - start
    counts = zeroskip.stats()
    print(json.dumps({"model": model, "first_eval_s": first_eval, "first_step_s": first_step,
                      "all_built_s": built, "steps_meanwhile": steps,
                      "compiles": counts["compiles"], "compiling_calls": counts["compiling_calls"],
                      "fallback_calls": counts["fallback_calls"]}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["squeezenet", "cifar-resnet"],
                        choices=sorted(MODELS))
    parser.add_argument("--modes", nargs="+", default=["wait", "background"],
                        choices=("wait", "background"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="file stem (default: "
                        "benchmarks/results/cold-start-<date>)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.threads)
        return 0
    rows = []
    for mode in args.modes:
        for model in args.models:
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, ZEROSKIP_CACHE_DIR=cache, ZEROSKIP_COMPILE=mode)
                done = subprocess.run([sys.executable, __file__, "--child", model, "--threads",
                                       str(args.threads)], env=env, capture_output=True,
                                      text=True, check=True)
            row = {"mode": mode, **json.loads(done.stdout.strip().splitlines()[-1])}
            rows.append(row)
            print(row, flush=True)
    lines = [f"# Cold start: convert, first eval call (batch 1) and training step (batch 8), "
             f"empty cache ({datetime.date.today().isoformat()}, {args.threads} threads)", "",
             "| model | ZEROSKIP_COMPILE | first eval s | first eval + step s | every kernel "
             "built s | steps meanwhile | compiles | calls on torch's op while compiling |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['model']} | {r['mode']} | {r['first_eval_s']:.1f} | "
              f"{r['first_step_s']:.1f} | {r['all_built_s']:.1f} | {r['steps_meanwhile']} | "
              f"{r['compiles']:g} | {r['compiling_calls']:g} |" for r in rows]
    text = "\n".join(lines) + "\n"
    stem = args.out or RESULTS / f"cold-start-{datetime.date.today().isoformat()}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.md").write_text(text)
    Path(f"{stem}.json").write_text(json.dumps(rows, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
