"""The DCGAN of ``train_dcgan.py`` under DistributedDataParallel, on zeroskip's kernels.

Launch one process per rank with torchrun (gloo backend, CPU)::

    torchrun --nproc_per_node=2 examples/ddp_train.py [--steps 30] [--batch 16]

What it shows:

- **Converted models compose with DDP.** ``zeroskip.convert`` changes only the class of the
  convolution modules, so ``DistributedDataParallel`` wraps a converted model like any other:
  it broadcasts the parameters and buffers from rank 0, and all-reduces the gradients the
  generated backward kernels produce. Each rank trains a zeroskip twin and a torch twin from
  the same weights on its shard of the same global batches. After one backward (in float64)
  the all-reduced gradients of the two agree to rounding, and the loss curves track each
  other as in ``train_dcgan.py``.
- **One kernel cache for all ranks.** Every rank compiles the same layer shapes. The cache
  (``ZEROSKIP_CACHE_DIR``) takes an OS file lock per kernel: the first rank to ask builds it,
  the others wait and then load it. Each rank prints ``zeroskip.stats()``; rank 0 prints the
  compiles summed over the ranks (``all_reduce``) and the number of distinct kernels: every
  kernel is compiled once in total on a cold cache, and not at all on a warm one.
  ``--fresh-cache`` makes rank 0 create an empty cache directory for the run (and delete it
  afterwards) to show the cold case.

Each rank runs torch and the kernels on one thread (``torch.set_num_threads(1)``): two ranks
on a 2-core machine. Exits 1 if the gradients or the curves differ beyond
``train_dcgan.py``'s tolerances, if a call fell back to torch, or if a kernel was compiled
more than once.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, str(Path(__file__).resolve().parent))   # train_dcgan.py, beside this file

import zeroskip                                              # noqa: E402
from train_dcgan import (  # noqa: E402
    CHANNELS, CURVE_TOLERANCE, EARLY_TOLERANCE, NGF, NZ, Trainer, compare,
    dcgan_generator, discriminator, init_weights, max_relative_difference, show,
    synthetic_images, verdict)
from zeroskip.runtime import loader                          # noqa: E402
from zeroskip.runtime.cache import cache_dir                 # noqa: E402

GRADIENT_TOLERANCE = 1e-10    # float64 gradients after the all-reduce (measured: ~1e-16)


def kernels_loaded() -> list[str]:
    """The kernels this process has loaded (forward and gradient operators), each as its
    spec's JSON (the whole descriptor, dtype included) and its variant: a layer's sparse
    variant is a kernel of its own."""
    return sorted(json.dumps([k.spec.to_dict(), k.variant.name], sort_keys=True)
                  for k in loader.loaded())


def first_gradients(disc: torch.nn.Module, real: torch.Tensor) -> list[torch.Tensor]:
    """One backward of the discriminator's loss on this rank's real batch through DDP: the
    gradients after the all-reduce (the average over the ranks)."""
    model = DDP(disc)
    logits = model(real)
    torch.nn.functional.binary_cross_entropy_with_logits(logits,
                                                         torch.ones_like(logits)).backward()
    return [p.grad for p in disc.parameters()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    parser.add_argument("--batch", type=int, default=16, help="batch per rank (default 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fresh-cache", action="store_true",
                        help="compile into a new, empty cache directory (removed at the end)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 2:
        parser.error("--steps must be >= 1 and --batch >= 2 (batch norm needs two samples)")

    torch.set_num_threads(1)          # one core per rank
    dist.init_process_group("gloo")   # rank, world size and rendezvous from torchrun's env
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.fresh_cache:
        folder = [tempfile.mkdtemp(prefix="zeroskip-ddp-cache-") if rank == 0 else None]
        dist.broadcast_object_list(folder, src=0)
        os.environ["ZEROSKIP_CACHE_DIR"] = folder[0]   # read on every kernel lookup
    if rank == 0:
        print(f"{world} ranks (gloo), 1 thread each; kernel cache {cache_dir()}")

    # The same global schedule on every rank; each trains on its own slice of every batch.
    gen = torch.Generator().manual_seed(args.seed)
    total = args.batch * world
    dataset = synthetic_images(max(512, total), gen)
    order = torch.cat([torch.randperm(len(dataset), generator=gen)
                       for _ in range(-(-args.steps * total // len(dataset)))])
    order = order[:args.steps * total].view(args.steps, world, args.batch)[:, rank]
    noise = torch.randn(args.steps, world, args.batch, NZ, 1, 1, generator=gen)[:, rank]

    torch.manual_seed(args.seed)
    generator, disc = dcgan_generator(NZ, NGF, CHANNELS), discriminator()
    generator.apply(init_weights)
    disc.apply(init_weights)

    # Convert copies, then wrap: DDP sees ordinary modules with ordinary parameters.
    zeroskip.stats(reset=True)
    zs = Trainer("zeroskip", DDP(zeroskip.convert(copy.deepcopy(generator))),
                 DDP(zeroskip.convert(copy.deepcopy(disc))), args.seed)
    ref = Trainer("torch", DDP(copy.deepcopy(generator)), DDP(copy.deepcopy(disc)), args.seed)

    # The all-reduced gradients of one backward, zeroskip's and torch's, in float64 (on
    # float64 copies: kernels of their own). In float32 the two sides' rounding (~1e-7) can
    # put an activation on the other side of a LeakyReLU's kink once in a while, which moves
    # the gradients upstream by up to ~1e-2 with no kernel at fault; in float64 the check
    # can be tight.
    real = dataset[order[0]].double()
    gap = max(max_relative_difference(a, b) for a, b in zip(
        first_gradients(zeroskip.convert(copy.deepcopy(disc).double()), real),
        first_gradients(copy.deepcopy(disc).double(), real)))

    for i in range(args.steps):
        for trainer in ((zs, ref) if i % 2 == 0 else (ref, zs)):
            trainer.step(dataset[order[i]], noise[i])

    # Per-rank counters, then the totals on rank 0.
    counts = zeroskip.stats()
    kernels = kernels_loaded()
    lines = [f"rank {rank}: zeroskip.stats() {counts}",
             f"rank {rank}: {len(kernels)} kernels loaded = {counts['compiles']} compiled "
             f"here + {counts['cache_hits']} found in the cache"]
    everything = [None] * world
    dist.all_gather_object(everything, (lines, kernels, counts["fallback_calls"]))
    compiles = torch.tensor([counts["compiles"]], dtype=torch.int64)
    dist.all_reduce(compiles)          # the sum over the ranks
    failures = []
    if rank == 0:
        for rank_lines, _, _ in everything:
            print("\n".join(rank_lines))
        distinct = set().union(*(set(k) for _, k, _ in everything))
        built = int(compiles)
        note = ("each compiled once in total" if built == len(distinct) else
                "a warm cache: none compiled" if built == 0 else
                f"{len(distinct) - built} were in the cache already")
        print(f"compiles summed over {world} ranks: {built}; distinct kernels: "
              f"{len(distinct)} ({note})")
        print(f"one backward in float64, all-reduced gradients: zeroskip's and torch's differ "
              f"by at most {gap:.0e} (relative; tolerance {GRADIENT_TOLERANCE:.0e})")
        distance = {what: compare(getattr(zs, what), getattr(ref, what))
                    for what in ("loss_d", "loss_g")}
        print(f"rank 0's loss curves over {args.steps} steps at batch {args.batch} per rank:")
        for what, d in distance.items():
            print(show(f"{what}, zeroskip", d))
        median = {t.name: statistics.median(t.seconds[min(3, args.steps - 1):])
                  for t in (zs, ref)}
        print(f"median step: zeroskip {median['zeroskip'] * 1e3:.1f} ms, torch "
              f"{median['torch'] * 1e3:.1f} ms (including the all-reduces)")

        if built > len(distinct):
            failures.append(f"{built} compiles for {len(distinct)} distinct kernels")
        if not gap <= GRADIENT_TOLERANCE:
            failures.append(f"the all-reduced gradients differ from torch's by {gap:.1e}")
        failures += [f"the {what} curves diverge: {d}" for what, d in distance.items()
                     if not verdict(d)]
        fallbacks = sum(f for _, _, f in everything)
        if fallbacks:
            failures.append(f"{fallbacks} calls fell back to torch's op")
        for failure in failures:
            print(f"FAILED: {failure}", file=sys.stderr)
        if not failures:
            print(f"OK (curves: mean within {CURVE_TOLERANCE:.0%}, first steps within "
                  f"{EARLY_TOLERANCE:.0e})")
    verdicts = [None] * world
    dist.all_gather_object(verdicts, bool(failures))
    dist.barrier()
    if rank == 0 and args.fresh_cache:
        shutil.rmtree(cache_dir(), ignore_errors=True)
    dist.destroy_process_group()
    return 1 if any(verdicts) else 0


if __name__ == "__main__":
    sys.exit(main())
