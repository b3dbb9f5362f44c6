"""Whole real models, torch against ``zeroskip.convert`` (``zeroskip.bench.models``):
ResNet-18, MobileNetV2, an FCN-32s-form segmenter and a DCGAN generator; the eval call at
batch 1 and a training step at batch 8, checked against torch (and float64) first. Saved as
``benchmarks/results/models-<date>.md`` and ``.json``.

    python benchmarks/bench_models.py                      # every model
    python benchmarks/bench_models.py --models resnet18 dcgan --repeats 3
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

import torch

from zeroskip.bench import models

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(models.MODELS),
                        choices=sorted(models.MODELS))
    parser.add_argument("--eval-batch", type=int, default=1)
    parser.add_argument("--train-batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="file stem of the results (default: "
                        "benchmarks/results/models-<date>)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    report = models.run_models(args.models, args.eval_batch, args.train_batch, args.repeats,
                               log=sys.stdout)
    stem = args.out or RESULTS / f"models-{datetime.date.today().isoformat()}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    text = models.markdown(report)
    Path(f"{stem}.md").write_text(text)
    Path(f"{stem}.json").write_text(json.dumps(models.to_json(report), indent=1) + "\n")
    print(text)
    return 1 if any(models.problems(r) for r in report["rows"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
