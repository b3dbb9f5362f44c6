"""Train a small DCGAN on zeroskip's generated kernels, and check that it learns like torch.

A walk through what zeroskip does to a network that trains, in four steps:

1. **Descriptors.** Every convolution a model runs is one :class:`zeroskip.LayerSpec`: torch's
   constructor arguments plus the input size. A training step runs three operators per layer,
   the forward convolution and its input and weight gradients; ``zeroskip.explain`` shows how
   many of each one's multiplications are by structural zeros (padding, the zeros a transposed
   convolution inserts between inputs, the holes of a strided weight gradient) and are skipped.
2. **Generated kernels.** ``zeroskip.convert(model)`` swaps the model's ``nn.Conv*`` modules
   for zeroskip's subclasses in place (same parameters and ``state_dict``). The first call of
   each layer shape compiles a C kernel for it into the on-disk cache (``ZEROSKIP_CACHE_DIR``);
   later calls and later runs reuse it.
3. **Correctness.** Each layer's three operators against torch's, on the input the layer
   sees in the first step (:func:`check_layers`). Then the same training run twice from the
   same seed, once on zeroskip's kernels and once on torch's own convolutions: the same
   initial weights (copied before converting), the same batches in the same order, the same
   latent noise. The per-step losses must track each other, the convergence claim of the
   C-K-S paper (skipping zeros changes no result, only the order of float32 additions). A
   third run, torch from weights one ulp away, shows how far rounding alone carries a
   trajectory: the yardstick of the tolerances (see :func:`compare`).
4. **Timing.** The runs take turns step by step, so a busy machine slows them alike; the
   median step time after warm-up of each is printed, with ``zeroskip.stats()`` (kernel
   calls, compiles, cache hits; no call may fall back to torch).

The data are synthetic 32x32 RGB images (blurred random blobs on a colour gradient) drawn from
the seed, so the example needs no download. Run::

    python examples/train_dcgan.py                 # --steps 200 --batch 32 --out dcgan-out
    python examples/train_dcgan.py --steps 50 --batch 8 --no-control --out /tmp/dcgan

About 20 s on 2 cores with a warm kernel cache (the first run compiles 17 kernels, ~15 s
more). It writes ``<out>/dcgan_losses.png`` (the loss curves and their differences) and
``<out>/dcgan_losses.json`` (the curves and the summary), and exits 1 if the curves diverge
beyond the tolerances, or if any call fell back to torch's op.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import zeroskip
from zeroskip.models import dcgan_generator
from zeroskip.runtime.cache import cache_dir
from zeroskip.trace import trace_specs

IMAGE = 32          # image side: dcgan_generator makes 32x32 images
CHANNELS = 3
NZ = 32             # latent size
NGF = NDF = 32      # feature maps of the generator and the discriminator

# How far the runs may drift apart (relative), justified in compare().
FIRST_STEP_TOLERANCE = 1e-4    # each layer alone; the first training step's losses
EARLY_TOLERANCE = 1e-2         # each of the first five training steps
CURVE_TOLERANCE = 0.05         # the mean of each loss curve over the run


def discriminator(ndf: int = NDF, channels: int = CHANNELS) -> nn.Sequential:
    """DCGAN's discriminator for 32x32 images: 32 -> 16 -> 8 -> 4 -> one logit."""
    return nn.Sequential(
        nn.Conv2d(channels, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2),
        nn.LeakyReLU(0.2),
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4),
        nn.LeakyReLU(0.2),
        nn.Conv2d(ndf * 4, 1, 4, 1, 0, bias=False), nn.Flatten())


def init_weights(module: nn.Module) -> None:
    """DCGAN's initialization: N(0, 0.02) convolutions, N(1, 0.02) batch-norm scales."""
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def synthetic_images(count: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` images in [-1, 1]: a random colour gradient plus two to four soft Gaussian
    blobs of random position, size and colour. Deterministic given the generator's state."""
    axis = torch.linspace(-1, 1, IMAGE)
    yy, xx = torch.meshgrid(axis, axis, indexing="ij")            # (H, W)

    def rand(*shape):
        return torch.rand(*shape, generator=gen)

    angle = rand(count, 1, 1, 1) * 2 * math.pi
    ramp = torch.cos(angle) * xx + torch.sin(angle) * yy           # (N, 1, H, W)
    images = 0.4 * ramp * (rand(count, CHANNELS, 1, 1) * 2 - 1)
    blobs = 4
    centres = rand(count, blobs, 2, 1, 1) * 1.6 - 0.8
    sigma = 0.1 + 0.3 * rand(count, blobs, 1, 1)
    present = (rand(count, blobs, 1, 1) < 0.75).float()
    present[:, :2] = 1.0                                            # at least two blobs
    d2 = (xx - centres[:, :, 0]) ** 2 + (yy - centres[:, :, 1]) ** 2   # (N, blobs, H, W)
    shape = present * torch.exp(-d2 / (2 * sigma ** 2))
    colours = rand(count, blobs, CHANNELS) * 2 - 1
    images = images + torch.einsum("nbhw,nbc->nchw", shape, colours) * 1.5
    return torch.tanh(images)


class Trainer:
    """One training run: a generator, a discriminator, their Adam optimizers (DCGAN's
    settings), the loss curves and the step times. ``step(real, noise)`` is one DCGAN step."""

    def __init__(self, name: str, generator: nn.Module, disc: nn.Module, seed: int):
        # A step draws nothing from torch's global generator (batches and noise come from the
        # shared schedule), so runs taking turns cannot disturb each other; seeding anyway
        # keeps each run reproducible should a layer that draws (dropout) be added.
        torch.manual_seed(seed)
        self.name = name
        self.G, self.D = generator, disc
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=2e-4, betas=(0.5, 0.999))
        self.bce = nn.BCEWithLogitsLoss()
        self.loss_d: list[float] = []
        self.loss_g: list[float] = []
        self.seconds: list[float] = []

    def step(self, real: torch.Tensor, noise: torch.Tensor) -> None:
        start = time.perf_counter()
        ones = torch.ones(real.shape[0], 1)
        zeros = torch.zeros(real.shape[0], 1)
        fake = self.G(noise)
        # Discriminator: real images -> 1, generated ones -> 0 (no gradient into G).
        loss_d = self.bce(self.D(real), ones) + self.bce(self.D(fake.detach()), zeros)
        self.opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        self.opt_d.step()
        # Generator: make the discriminator answer 1 (gradient through D's input gradient).
        loss_g = self.bce(self.D(fake), ones)
        self.opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        self.opt_g.step()
        self.seconds.append(time.perf_counter() - start)
        self.loss_d.append(loss_d.item())
        self.loss_g.append(loss_g.item())


def describe_layers(generator: nn.Module, disc: nn.Module, noise: torch.Tensor,
                    real: torch.Tensor) -> None:
    """Step 1: the descriptor of every conv layer and the share of multiplications the
    compiler skips in each of the three operators a training step runs."""
    print("Step 1: layer descriptors and the multiplications by zero that are skipped")
    print(f"  {'layer':<6} {'operator':<52} {'density':>7}  {'skipped: forward':>16} "
          f"{'grad in':>8} {'grad w':>8}")
    dense = nonzero = 0
    # trace_specs runs the model once under no_grad; copies keep the batch-norm statistics of
    # the training models untouched.
    for net, model, x in (("G", generator, noise), ("D", disc, real)):
        for name, spec, workload in trace_specs(copy.deepcopy(model), x):
            cells = []
            for op in (spec, spec.grad_input(), spec.grad_weight()):
                report = zeroskip.explain(op, workload)
                dense += report.dense_macs
                nonzero += report.nonzero_macs
                cells.append(f"{report.skipped:8.1%}")
            operator = spec.describe(workload.batch)
            print(f"  {net + '.' + name:<6} {operator:<52} {workload.density:7.2f}  "
                  f"{cells[0]:>16} {cells[1]} {cells[2]}")
    print(f"  the three operators of every layer, per sample: {dense // real.shape[0]:,} "
          f"MACs naively, {nonzero // real.shape[0]:,} computed ({1 - nonzero / dense:.1%} "
          "skipped)")


def nudged(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose floating-point parameters are each one ulp larger."""
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.copy_(torch.nextafter(p, torch.full_like(p, math.inf)))
    return twin


def max_relative_difference(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach(), want.detach()
    return float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))


def check_layers(zs: Trainer, ref: Trainer, real: torch.Tensor,
                 noise: torch.Tensor) -> dict[str, list[float | None]]:
    """Every conv layer, zeroskip's and torch's, on the input it sees in the first step: the
    largest difference of the output, the input gradient and the weight gradient (for one
    random output gradient), relative to the largest value. Works on copies of the models.

    Layer by layer, not the whole model: in float32 the two sides round differently (~1e-7),
    and once in a few runs one of the ~10^6 activations that meet a (Leaky)ReLU lies that
    close to zero: it lands on the other side of the kink, and every gradient upstream of it
    differs by up to ~1e-2, with no kernel at fault. The training curves below cover the whole
    model; here each kernel is checked alone."""
    twins = {}
    for net, model in (("G", zs.G), ("D", zs.D)):
        twins.update({f"{net}.{n}": m for n, m in copy.deepcopy(model).named_modules()})
    inputs: dict[str, torch.Tensor] = {}
    modules: dict[str, nn.Module] = {}
    G, D = copy.deepcopy(ref.G), copy.deepcopy(ref.D)
    handles = []
    for net, model in (("G", G), ("D", D)):
        for name, module in model.named_modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                key = f"{net}.{name}"
                modules[key] = module
                handles.append(module.register_forward_pre_hook(
                    lambda mod, args, key=key: inputs.setdefault(key, args[0].detach())))
    with torch.no_grad():
        D(real)
        D(G(noise))
    for handle in handles:
        handle.remove()
    gen = torch.Generator().manual_seed(0)
    rows = {}
    for key, module in modules.items():
        # The generator's first layer reads the latent noise, which needs no gradient.
        needs_input_grad = key != "G.0"
        x = [inputs[key].clone().requires_grad_(needs_input_grad) for _ in range(2)]
        y = [module(x[0]), twins[key](x[1])]
        grad = torch.randn(y[0].shape, generator=gen)
        for out in y:
            out.backward(grad)
        rows[key] = [max_relative_difference(y[1], y[0]),
                     max_relative_difference(x[1].grad, x[0].grad) if needs_input_grad
                     else None,
                     max_relative_difference(twins[key].weight.grad, module.weight.grad)]
    return rows


def compare(a: list[float], b: list[float]) -> dict[str, float]:
    """The distance of loss curve ``a`` from the reference ``b``.

    ``max_abs`` and ``mean_abs``: of the per-step differences. Relative to the reference:
    ``first_rel``, the first step's difference; ``early_rel``, the largest over the first five
    steps; ``mean_rel``, the difference of the curves' means over the whole run; ``final_rel``,
    the same over the last tenth of the steps (at least five), for information.

    The tolerances (see :func:`verdict`). Both runs compute the same sums in a different
    order (zeroskip's kernels accumulate per region and register tile and skip the zero
    terms; oneDNN blocks its own way), so a first forward and backward agree to float32
    rounding, ~1e-6. Training then amplifies any perturbation: Adam's first updates are
    close to ``lr * sign(gradient)``, so a gradient component near zero whose last bits
    differ moves its weight by a whole step the other way, and a GAN's two players feed
    each other's errors back. The gap reaches ~1e-3 within five steps and a few percent on
    single steps after a hundred. The control run measures this: torch against itself from
    weights one ulp apart drifts as far (printed side by side). So single late steps
    cannot be compared; what must hold is what a bug would break:

    - the first step's losses within 1e-4 (a wrong kernel is off by far more at once);
    - the first five steps within 1e-2 (measured over seeds 0-6 at the defaults, zeroskip and
      the control alike: at most ~2e-3; a stale weight pack, i.e. a kernel running last
      step's weights, is off by 0.1-0.5 at once);
    - the mean of each curve within 5% (measured: at most 1.9% over 200 steps, and 2.7%
      after 400 steps, once this small GAN's training turns unstable and the runs spike at
      different steps).

    ``final_rel`` is not judged: by the last steps the runs are decorrelated samples of the
    same noisy process (up to 36% apart on a discriminator loss near 0.1; the control too).
    """
    diff = [abs(x - y) for x, y in zip(a, b)]
    tail = max(5, len(a) // 10)
    mean_b, tail_b = statistics.fmean(b), statistics.fmean(b[-tail:])
    return {
        "max_abs": max(diff), "mean_abs": statistics.fmean(diff),
        "first_rel": diff[0] / max(abs(b[0]), 1e-12),
        "early_rel": max(d / max(abs(y), 1e-12) for d, y in zip(diff[:5], b)),
        "mean_rel": abs(statistics.fmean(a) - mean_b) / max(abs(mean_b), 1e-12),
        "final_rel": abs(statistics.fmean(a[-tail:]) - tail_b) / max(abs(tail_b), 1e-12),
    }


def verdict(d: dict[str, float]) -> bool:
    return (d["first_rel"] <= FIRST_STEP_TOLERANCE and d["early_rel"] <= EARLY_TOLERANCE
            and d["mean_rel"] <= CURVE_TOLERANCE)


def show(label: str, d: dict[str, float]) -> str:
    return (f"  {label:<22} max |diff| {d['max_abs']:.1e}, mean |diff| {d['mean_abs']:.1e};"
            f" relative: step 1 {d['first_rel']:.0e}, steps 1-5 {d['early_rel']:.0e}, "
            f"mean {d['mean_rel']:.2%}, last steps {d['final_rel']:.2%}")


def plot(trainers: list[Trainer], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")            # files only, no display
    import matplotlib.pyplot as plt

    zs, ref, *control = trainers
    steps = range(1, len(ref.loss_d) + 1)
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for ax, what in zip(axes[:2], ("loss_d", "loss_g")):
        ax.plot(steps, getattr(ref, what), label="torch", color="tab:blue", linewidth=2.5,
                alpha=0.6)
        ax.plot(steps, getattr(zs, what), label="zeroskip", color="tab:red", linewidth=1)
        ax.set_ylabel("discriminator loss" if what == "loss_d" else "generator loss")
        ax.legend()
        ax.grid(alpha=0.3)
    lines = [(zs, "loss_d", "tab:purple", "-"), (zs, "loss_g", "tab:green", "-")]
    lines += [(c, what, "grey", style) for c in control
              for what, style in (("loss_d", ":"), ("loss_g", "--"))]
    for trainer, what, colour, style in lines:
        diff = [max(abs(x - y), 1e-9) for x, y in zip(getattr(trainer, what),
                                                       getattr(ref, what))]
        axes[2].semilogy(steps, diff, color=colour, linestyle=style, linewidth=1,
                         label=f"|{trainer.name} - torch|, {what[-1].upper()} loss")
    axes[2].set_ylabel("absolute difference")
    axes[2].set_xlabel("step")
    axes[2].legend(fontsize="small")
    axes[2].grid(alpha=0.3)
    fig.suptitle("DCGAN on synthetic 32x32 images: zeroskip vs torch from the same seed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (default 200)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument("--out", type=Path, default=Path("dcgan-out"),
                        help="folder for the plot and the JSON summary (default dcgan-out)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, noise and weights")
    parser.add_argument("--no-control", dest="control", action="store_false",
                        help="skip the control run (torch from weights one ulp away)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="steps left out of the step-time medians (default 3)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 2:
        parser.error("--steps must be >= 1 and --batch >= 2 (batch norm needs two samples)")
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; kernel cache "
          f"{cache_dir()}\n")

    # The shared schedule, drawn from the seed: the data set, the batches in order, the
    # latent noise of every step. Every run reads the same tensors.
    gen = torch.Generator().manual_seed(args.seed)
    dataset = synthetic_images(max(512, args.batch), gen)
    per_epoch = len(dataset) // args.batch
    order = torch.cat([torch.randperm(len(dataset), generator=gen)[:per_epoch * args.batch]
                       for _ in range(-(-args.steps // per_epoch))]).view(-1, args.batch)
    noise = torch.randn(args.steps, args.batch, NZ, 1, 1, generator=gen)

    # One set of initial weights; every run trains a copy of it.
    torch.manual_seed(args.seed)
    generator, disc = dcgan_generator(NZ, NGF, CHANNELS), discriminator()
    generator.apply(init_weights)
    disc.apply(init_weights)

    # ---- Step 1: descriptors.
    describe_layers(generator, disc, noise[0], dataset[order[0]])

    # ---- Step 2: generated kernels. Copy first, then convert: convert() works in place.
    print("\nStep 2: convert copies of both networks; the first call of each layer shape "
          "compiles its kernels")
    zeroskip.stats(reset=True)
    zs = Trainer("zeroskip", zeroskip.convert(copy.deepcopy(generator)),
                 zeroskip.convert(copy.deepcopy(disc)), args.seed)
    ref = Trainer("torch", copy.deepcopy(generator), copy.deepcopy(disc), args.seed)
    trainers = [zs, ref]
    if args.control:    # the yardstick of the tolerances: torch against itself, one ulp away
        trainers.append(Trainer("torch+1ulp", nudged(generator), nudged(disc), args.seed))
    converted = sum(type(m).__module__ == "zeroskip.nn" for m in [*zs.G.modules(),
                                                                  *zs.D.modules()])
    start = time.perf_counter()
    rows = check_layers(zs, ref, dataset[order[0]], noise[0])
    first = max(v for row in rows.values() for v in row if v is not None)
    counts = zeroskip.stats()
    print(f"  {converted} conv modules converted. Forward, input and weight gradients: "
          f"{counts['compiles']} kernels compiled ({counts['compile_seconds']:.1f} s in cc), "
          f"{counts['cache_hits']} loaded from the cache; {time.perf_counter() - start:.1f} s")

    # ---- Step 3: correctness, one step, then the training curves.
    print("\nStep 3: correctness")
    print("  each layer on its input of the first step, largest difference from torch "
          "relative to the largest value:")
    print(f"  {'layer':<6} {'forward':>8} {'grad in':>8} {'grad w':>8}")
    for key, row in rows.items():
        print(f"  {key:<6} " + " ".join("       -" if v is None else f"{v:8.0e}" for v in row))
    print(f"  largest {first:.0e} (tolerance {FIRST_STEP_TOLERANCE:.0e})")
    print(f"  training {args.steps} steps at batch {args.batch}: "
          f"{', '.join(t.name for t in trainers)}, taking turns step by step")
    start = time.perf_counter()
    for i in range(args.steps):
        # Rotate who goes first, so that none always runs on a cache warmed by another.
        for trainer in trainers[i % len(trainers):] + trainers[:i % len(trainers)]:
            trainer.step(dataset[order[i]], noise[i])
        if (i + 1) % max(1, args.steps // 5) == 0 or i + 1 == args.steps:
            print(f"  step {i + 1:4d}: D loss {zs.loss_d[i]:.4f} / {ref.loss_d[i]:.4f}   "
                  f"G loss {zs.loss_g[i]:.4f} / {ref.loss_g[i]:.4f}   (zeroskip / torch)")
    train_seconds = time.perf_counter() - start
    distance = {what: compare(getattr(zs, what), getattr(ref, what))
                for what in ("loss_d", "loss_g")}
    control = {what: compare(getattr(trainers[2], what), getattr(ref, what))
               for what in ("loss_d", "loss_g")} if args.control else {}
    print("  distance of the loss curves from torch's:")
    for what in distance:
        print(show(f"{what}, zeroskip", distance[what]))
        if control:
            print(show(f"{what}, control", control[what]))

    # ---- Step 4: timing.
    skip = min(args.warmup, args.steps - 1)
    median = {t.name: statistics.median(t.seconds[skip:]) for t in trainers}
    print(f"\nStep 4: median step time after {skip} warm-up steps: zeroskip "
          f"{median['zeroskip'] * 1e3:.1f} ms, torch {median['torch'] * 1e3:.1f} ms "
          f"(zeroskip {median['torch'] / median['zeroskip']:.2f}x torch's speed); "
          f"training took {train_seconds:.1f} s")
    counts = zeroskip.stats()
    print(f"  zeroskip.stats(): {counts}")

    png, summary = args.out / "dcgan_losses.png", args.out / "dcgan_losses.json"
    plot(trainers, png)
    summary.write_text(json.dumps({
        "steps": args.steps, "batch": args.batch, "seed": args.seed,
        "threads": torch.get_num_threads(), "layers_relative_difference": rows,
        "first_step_relative_difference": first,
        "distance": distance, "control_distance": control, "median_step_seconds": median,
        "stats": counts,
        "curves": {t.name: {"loss_d": t.loss_d, "loss_g": t.loss_g, "seconds": t.seconds}
                   for t in trainers}}, indent=1))
    print(f"\nwrote {png} and {summary}")

    failures = []
    if not first <= FIRST_STEP_TOLERANCE:
        failures.append(f"a layer differs from torch by {first:.1e}: {rows}")
    failures += [f"the {what} curves diverge: {d}" for what, d in distance.items()
                 if not verdict(d)]
    if counts["fallback_calls"]:
        failures.append(f"{counts['fallback_calls']} calls fell back to torch's op")
    for failure in failures:
        print(f"FAILED: {failure}", file=sys.stderr)
    if not failures:
        print(f"OK: the loss curves track torch's (mean within {CURVE_TOLERANCE:.0%}, first "
              f"steps within {EARLY_TOLERANCE:.0e}); no fallbacks")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
