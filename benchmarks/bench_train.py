"""Whole-model training, torch against ``zeroskip.convert`` (``zeroskip.bench.train``): a
CIFAR-style ResNet (conv-BN-ReLU) at batch 32 and a VGG-style conv-ReLU net at batch 16 on
synthetic 32x32 images. Losses checked equal first, then step time, images/s and each conv
layer's operators (with ``--tune``, again after tuning the models' operators); saved as ``benchmarks/results/train-<date>.md``, ``.json`` and ``.png``.

    python benchmarks/bench_train.py                          # both models, their batch sizes
    python benchmarks/bench_train.py --models vgg --batch 32 --threads 2
    python benchmarks/bench_train.py --densities init trained   # also at trained-like ReLUs
    python benchmarks/bench_train.py --tune --online --steps 50  # offline and online tuning
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from zeroskip.bench import train

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(train.MODELS),
                        choices=sorted(train.MODELS))
    parser.add_argument("--batch", type=int, help="one batch size for every model (default: "
                        "each model's own)")
    parser.add_argument("--steps", type=int, default=20, help="steps whose losses are compared")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tune", action="store_true", help="also tune the models' operators "
                        "(forward and gradients, torch's op a candidate) and run again")
    parser.add_argument("--online", action="store_true", help="also train from another empty "
                        "tuning database with autotuning in the loop on (zeroskip.autotune)")
    parser.add_argument("--densities", nargs="+", default=["init"], choices=("init", "trained"),
                        help="the ReLUs' densities: a fresh model's ('init') and/or those of "
                        "trained networks ('trained': ResNet 0.4, VGG 0.2, the first 0.5)")
    parser.add_argument("--out", type=Path, help="file stem of the results (default: "
                        "benchmarks/results/train-<date>)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = train.run_train(args.models, args.batch, args.steps, args.repeats, tune=args.tune,
                             log=sys.stdout, densities=tuple(args.densities),
                             online=args.online)
    stem = args.out or RESULTS / f"train-{datetime.date.today().isoformat()}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    text = train.markdown(report)
    Path(f"{stem}.md").write_text(text)
    Path(f"{stem}.json").write_text(json.dumps(report.to_json(), indent=1) + "\n")
    train.plot(report, f"{stem}.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
