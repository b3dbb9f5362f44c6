"""``zeroskip tune``: time every way to run each layer at each density and keep the fastest in
the tuning database."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..spec import LayerSpec, Workload
from .args import DENSITIES, FORWARD, _densities, _positive, _spec_file


def add_parser(sub) -> argparse.ArgumentParser:
    tu = sub.add_parser("tune", help="time every way to run each layer at each density and keep "
                                     "the fastest in the tuning database",
                        description="For each layer and input density, check torch's op and "
                                    "every generated kernel variant against torch, time them, "
                                    "and record the fastest in the tuning database, which "
                                    "zeroskip's calls then follow on this machine. Prints each "
                                    "choice and, per layer, the crossover: the highest density "
                                    "at which a sparse kernel won.")
    tu.add_argument("--specs", type=Path, metavar="FILE",
                    help="a JSON list of layers (LayerSpec.to_dict() objects) to tune instead of "
                         "the benchmark suite's forward layers")
    tu.add_argument("--quick", action="store_true", help="only the quick subset of the suite")
    tu.add_argument("--suite", choices=("main", "wide", "all"), default="main",
                    help="main (default): the suite's layers; wide: real-model shapes the "
                         "kernels were not tuned on (MobileNet, EfficientNet, Inception, U-Net, "
                         "diffusion, FCN, ...); all: both")
    tu.add_argument("--layers", nargs="+", metavar="SUBSTR",
                    help="only the suite's layers whose name or family contains one of these")
    tu.add_argument("--densities", type=_densities, default=DENSITIES, metavar="D,D,...",
                    help="input densities to tune at (default 1,0.5,0.3,0.1,0.05)")
    tu.add_argument("--backward", action="store_true",
                    help="also tune each layer's input and weight gradients (what a training "
                         "step runs), at the layer's batch on dense operands; torch's op is a "
                         "candidate, as for the forward")
    tu.add_argument("--batch", type=_positive, metavar="N",
                    help="tune at this batch size (default: the --specs file's, else 1); "
                         "choices are filed per batch bucket (the nearest power of two)")
    tu.add_argument("--repeats", type=_positive, default=7, metavar="R",
                    help="timed rounds per candidate, the median decides (default 7)")
    tu.add_argument("--threads", type=_positive, metavar="T",
                    help="threads for torch and the kernels (default: torch's); choices are "
                         "filed under the thread count")
    tu.add_argument("--db", type=Path, metavar="FILE",
                    help="the tuning database (default: $ZEROSKIP_TUNING_DB, else tuning.json in "
                         "the kernel cache directory)")
    tu.add_argument("--merge", type=Path, nargs="+", metavar="FILE",
                    help="merge these tuning databases into it (the newer record wins); without "
                         "--specs, --quick or --layers, only merge")
    tu.add_argument("--prune", action="store_true",
                    help="drop the records whose kernels the compiler no longer makes (a "
                         "changed template, tile rule or pass: dispatch ignores them already); "
                         "without --specs, --quick or --layers, only prune")
    tu.add_argument("--no-progress", action="store_true", help="no progress bar")
    tu.set_defaults(handler=main, subparser=tu)
    return tu


def _tune_layers(args: argparse.Namespace, parser: argparse.ArgumentParser
                 ) -> list[tuple[str, LayerSpec]]:
    """``(name, spec, workload)`` of the layers to tune: the ``--specs`` file's (a trace's
    batch), or the suite's forward layers (batch 1) as ``--quick`` and ``--layers`` select
    them."""
    if args.specs:
        if args.quick or args.layers:
            parser.error("--quick and --layers select layers of the suite, not of --specs")
        return _spec_file(args.specs, parser)
    from .. import bench
    layers = [(layer.name, layer.spec, Workload()) for layer in bench.select(args.quick,
                                                                             args.layers,
                                                                             args.suite)
              if layer.spec.op in FORWARD]
    if not layers:
        parser.error(f"no forward layer of the suite matches --layers {' '.join(args.layers)}")
    return layers


def _read_db(path: Path, flag: str, parser: argparse.ArgumentParser):
    """A tuning database named on the command line, read strictly: a file that is not one (a
    mistyped name, someone else's file) is reported, never set aside and rebuilt."""
    from ..runtime import tuning
    try:
        return tuning.TuningDB(path, strict=True)
    except OSError as exc:
        parser.error(f"{flag}: cannot read {path}: {exc.strerror}")
    except ValueError as exc:
        parser.error(f"{flag}: {exc}")


def _named(layers: list[tuple[str, LayerSpec, Workload]], jobs: list, results: list
           ) -> list[tuple[str, str, int, object]]:
    """``(layer name, operator, batch, result)`` of each result (in :func:`autotune.jobs`
    order)."""
    return [(layers[i][0], operator, batch, r)
            for (i, operator, _, batch, _), r in zip(jobs, results)]


def _tune_report(layers: list[tuple[str, LayerSpec, Workload]], jobs: list, results: list,
                 db) -> str:
    """Every choice against torch, then each layer's crossover, as markdown tables."""
    lines = ["| layer | operator | batch | density | choice | torch ms | best ms | speedup |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for name, operator, batch, r in _named(layers, jobs, results):
        lines.append(f"| {name} | {operator} | {batch} | {r.density:g} | {r.choice} | "
                     f"{r.ms['torch']:.3g} | {r.ms[r.choice]:.3g} | {r.speedup():.2f}x |")
    lines += ["", "| layer | crossover |", "|---|---:|"]
    for name, spec, _ in layers:
        crossover = db.crossover(spec)
        lines.append(f"| {name} | {f'{crossover:g}' if crossover else 'none'} |")
    lines.append("\ncrossover: the highest tuned density at which a sparse kernel won")
    return "\n".join(lines)


def _tune_notes(layers: list[tuple[str, LayerSpec, Workload]], jobs: list, results: list
                ) -> None:
    """Failed candidates and contended timings, on stderr: they question the choices made."""
    from ..runtime import timing
    for name, operator, _, r in _named(layers, jobs, results):
        for candidate, error in r.errors.items():
            print(f"note: {name} {operator} @ {r.density:g}: {candidate} failed: {error}",
                  file=sys.stderr)
    contended = sum(timing.busy(r.contention) for r in results)
    if contended:
        print(f"note: other processes took over {timing.BUSY:.0%} of the CPUs during "
              f"{contended} of {len(results)} timings; tune on an idle machine",
              file=sys.stderr)


def main(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import torch

    from ..runtime import autotune, tuning
    wanted = not (args.merge or args.prune) or args.specs or args.quick or args.layers
    layers = _tune_layers(args, parser) if wanted else []
    if args.threads:
        torch.set_num_threads(args.threads)   # first: the database files choices by threads
    db = _read_db(args.db, "--db", parser) if args.db and args.db.exists() else \
        tuning.TuningDB(args.db)
    if args.merge:
        taken = sum(db.merge(_read_db(path, "--merge", parser)) for path in args.merge)
        print(f"merged {taken} records from {len(args.merge)} file(s)")
    keep = None
    if args.prune:
        keep = autotune.keep_current(db)
        print(f"pruned {db.prune(keep)} stale records")
    if layers:
        pairs = [(spec, args.batch or work.batch) for _, spec, work in layers]
        jobs = autotune.jobs(pairs, args.densities, args.backward)
        results = autotune.tune_all(pairs, args.densities, db, args.repeats,
                                    progress=not args.no_progress, backward=args.backward)
        print(_tune_report(layers, jobs, results, db))
        _tune_notes(layers, jobs, results)
    db.save(keep)
    print(f"tuning database: {db.path}")
    return 0
