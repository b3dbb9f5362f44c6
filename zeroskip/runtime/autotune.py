"""Autotuning: every way to run a layer, checked against torch, timed side by side.

For a layer, a density and a backend the candidates are torch's own op and each variant the
target offers (``codegen.targets``: C register tiles, dense and sparse; Triton launch configs
of the dense and block-sparse families). Each candidate runs once on operands of that density
and is compared with torch (:mod:`.reference`); one that fails to build, raises, differs or (on
a GPU) spills registers scores ``inf`` with the reason kept, never stopping the tuning. The rest
are timed side by side (:mod:`.timing`) and the median decides. Choices are recorded in the
tuning database (:mod:`.tuning`) under this machine's fingerprint, where the dispatch reads them.

Without a GPU, Triton candidates run under Triton's interpreter (``TRITON_INTERPRET=1``) on a
CPU device, filed under a machine of their own: that is how they are tested. With ``target``
(e.g. 'sm_90') the configs whose kernel, compiled for that GPU without one, spills registers or
needs more shared memory than the target has are dropped first.
"""
from __future__ import annotations

import functools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..codegen.variant import Variant
from ..spec import OPERANDS, LayerSpec, Workload
from . import kernels, loader, reference, stats, timing, tritonenv, tuning
from .timing import MIN_TIME_S, REPEATS
from .triton_kernel import TORCH_DTYPES

PATTERNS = ("random", "blocks")


@dataclass(frozen=True)
class Candidate:
    """One way to run a layer: ``torch``, or a generated kernel variant (its name)."""

    name: str

    @property
    def variant(self) -> Variant | None:
        return None if self.name == "torch" else Variant.parse(self.name)


@dataclass
class Result:
    """The tuning of one layer at one density: every candidate's milliseconds (inf: failed,
    with ``errors[name]`` saying why) and the winner."""

    spec: LayerSpec
    density: float
    ms: dict[str, float]
    errors: dict[str, str]
    contention: float | None
    batch: int = 1
    kernels: dict[str, str] = field(default_factory=dict)   # identities of those that ran

    @property
    def choice(self) -> str:
        return min(self.ms, key=lambda n: (self.ms[n], n != "torch"))

    def speedup(self, name: str | None = None) -> float:
        return self.ms["torch"] / self.ms[name or self.choice]


# --------------------------------------------------------------------------------- operands
def sparse_input(shape: tuple[int, ...], density: float, seed: int = 0) -> torch.Tensor:
    """A ReLU-like input: exactly ``round(density * size)`` positive values at random places."""
    gen = torch.Generator().manual_seed(seed)
    size = math.prod(shape)
    flat = torch.zeros(size)
    count = round(density * size)
    where = torch.randperm(size, generator=gen)[:count]
    flat[where] = torch.rand(count, generator=gen) + 0.1
    return flat.reshape(shape)


def block_sparse_input(shape: tuple[int, ...], density: float, block: int = 64,
                       seed: int = 0) -> torch.Tensor:
    """A block-structured input: at each (sample, position), each block of ``block``
    consecutive channels (all of them where fewer) is kept with probability ``density`` (random
    normal values) and is otherwise all zeros. A block-sparse kernel whose channel block
    (BLOCK_K) divides ``block`` skips ``1 - density`` of its blocks."""
    gen = torch.Generator().manual_seed(seed)
    n, c, *size = shape
    block = max(1, min(block, c))
    blocks = -(-c // block)
    keep = torch.rand((n, blocks, *size), generator=gen) < density
    keep = keep.repeat_interleave(block, dim=1)[:, :c]
    return torch.randn(shape, generator=gen) * keep


def operands(spec: LayerSpec, density: float = 1.0, device: torch.device | str = "cpu",
             pattern: str = "random", seed: int = 0, batch: int = 1
             ) -> dict[str, torch.Tensor]:
    """The operands of ``spec`` at ``batch`` (named as in ``spec.input_shapes``) on ``device``
    in the spec's dtype: the data operand (input, or the output gradient of
    ``conv_grad_input``) random normal at density 1, below it ReLU-like (``pattern`` 'random': :func:`sparse_input`) or
    block-structured ('blocks': :func:`block_sparse_input`); the others random normal. The
    weight is a frozen ``nn.Parameter``, as in a model."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    dtype = getattr(torch, spec.dtype)
    gen = torch.Generator().manual_seed(seed + 1)
    data = OPERANDS[spec.op][0]
    found = {}
    for name, shape in spec.input_shapes(batch).items():
        if name == data and density < 1.0:
            value = sparse_input(shape, density, seed) if pattern == "random" else \
                block_sparse_input(shape, density, seed=seed)
        else:
            value = torch.randn(shape, generator=gen)
        value = value.to(device=device, dtype=dtype)
        found[name] = torch.nn.Parameter(value, requires_grad=False) if name == "weight" \
            else value
    return found


# --------------------------------------------------------------------------------- candidates
def candidates(spec: LayerSpec, density: float, backend: str = "c",
               target: str | None = None) -> list[Candidate]:
    """'torch' and each variant the backend's target offers for ``spec`` at ``density``, less
    the Triton configs that do not fit ``target`` (see the module docstring). Raises what
    ``loader.kernel_for`` raises for a layer no template covers."""
    return _candidates(spec, density, backend, target)[0]


def _candidates(spec: LayerSpec, density: float, backend: str, target: str | None
                ) -> tuple[list[Candidate], dict[str, str]]:
    """:func:`candidates` and, by name, why each dropped one was dropped."""
    dense = loader.kernel_for(spec, backend, Variant("dense"))
    side = loader.RUNTIMES[backend].target()
    names = ["torch"] + [v.name for v in side.variants(dense.plan, density)]
    dropped: dict[str, str] = {}
    if target is not None and backend == "triton":
        for name, meta in target_usage(spec, names[1:], target).items():
            problem = _misfit(meta)
            if problem:
                dropped[name] = f"does not fit {target}: {problem}"
    return [Candidate(n) for n in names if n not in dropped], dropped


def call(spec: LayerSpec, name: str, t: dict[str, torch.Tensor], backend: str = "c"):
    """``(kernel, run)`` of candidate ``name`` on the operands ``t``: ``run`` allocates the
    output and launches, as the dispatch does (a Parameter's weight pack is cached, as there)."""
    if name == "torch":
        return None, reference.op(spec, t)
    variant = Variant.parse(name)
    kernel = loader.kernel_for(spec, backend, variant)
    operands = kernels.operands(kernel, t)
    return kernel, functools.partial(kernels.launch, kernel, *operands, variant)


# --------------------------------------------------------------------------------- tuning
def tune(spec: LayerSpec, density: float, repeats: int = REPEATS,
         min_time: float = MIN_TIME_S, batch: int = 1) -> Result:
    """Verify, then time, every C candidate of ``spec`` (a forward layer, or its
    ``grad_input()`` or ``grad_weight()``) at ``batch`` on a data operand of ``density`` (not
    recorded: :func:`tune_all` records)."""
    return _tune(spec, density, "c", torch.device("cpu"), repeats, min_time, None, "random",
                 batch)


def gradients(spec: LayerSpec) -> list[tuple[str, LayerSpec]]:
    """``(operator, spec)`` of a forward layer's two gradient operators."""
    return [("grad_input", spec.grad_input()), ("grad_weight", spec.grad_weight())]


def operator_cases(spec: LayerSpec, work: Workload, gradients: bool = True
                   ) -> list[tuple[str, LayerSpec, float]]:
    """``(operator, its spec, density)`` of each operator of a forward layer a training step
    at ``work`` runs: the forward at the input's density, and with ``gradients`` the input
    gradient at the output gradient's (``work.grad_density``) and the weight gradient at the
    input's; a gradient no spec can state is left out (torch's op computes it)."""
    cases = [("forward", spec, work.density)]
    if gradients:
        for name, derive, density in (("grad_input", spec.grad_input, work.grad_density),
                                      ("grad_weight", spec.grad_weight, work.density)):
            try:
                cases.append((name, derive(), density))
            except ValueError:
                pass
    return cases


def jobs(layers: Iterable[LayerSpec | tuple[LayerSpec, int]], densities: Iterable[float],
         backward: bool = False) -> list[tuple[int, str, LayerSpec, int, float]]:
    """``(layer index, operator, spec, batch, density)`` of each case :func:`tune_all` tunes:
    every layer (a spec, at batch 1, or ``(spec, batch)``) at every density, and with
    ``backward`` its input and weight gradients at the layer's batch at every density too (of
    their data operand: the layer's input for the weight gradient, after a ReLU; the output
    gradient for the input gradient, where the layer's own ReLU masked it)."""
    pairs = [layer if isinstance(layer, tuple) else (layer, 1) for layer in layers]
    densities = list(densities)
    found = []
    for i, (spec, batch) in enumerate(pairs):
        found += [(i, "forward", spec, batch, d) for d in densities]
        if backward:
            found += [(i, name, g, batch, d) for name, g in gradients(spec) for d in densities]
    return found


def tune_all(layers: Iterable[LayerSpec | tuple[LayerSpec, int]], densities: Iterable[float],
             db: tuning.TuningDB | None = None, repeats: int = REPEATS,
             min_time: float = MIN_TIME_S, progress: bool = True,
             backward: bool = False) -> list[Result]:
    """Tune every case of :func:`jobs` on the C backend, recording each winner in ``db`` (saved
    at the end) at its batch and density; results in the order of :func:`jobs`."""
    from tqdm import tqdm
    timing.steady_allocator()      # as the bench does: torch's large buffers otherwise vary 4x
    db = db if db is not None else tuning.database()
    results = []
    with tqdm(jobs(layers, densities, backward), desc="tuning", unit="case",
              disable=not progress) as bar:
        for _, operator, spec, batch, density in bar:
            bar.set_postfix_str(f"{spec.torch_name} {spec.describe()[:40]} @ {density:g}")
            result = tune(spec, density, repeats, min_time, batch)
            db.record(spec, density, result.choice, result.ms, batch=batch,
                      kernels=result.kernels)
            results.append(result)
    db.save()
    return results


def tune_triton(spec: LayerSpec, density: float = 1.0, device: torch.device | str = "cuda",
                repeats: int = REPEATS, *, min_time: float = MIN_TIME_S,
                target: str | None = None, pattern: str = "random",
                db: tuning.TuningDB | None = None, save: bool = True, batch: int = 1) -> Result:
    """Verify, then time, every Triton candidate of ``spec`` on ``device`` at ``batch``, on
    operands of ``density`` (``pattern``: see :func:`operands`), and record the winner
    in ``db`` (the process's database by default; saved unless ``save`` is False) under the
    device's :func:`tuning.gpu_fingerprint`. On a GPU the timing is ``triton.testing.do_bench``;
    on a CPU device, under Triton's interpreter, the CPU timing."""
    device = torch.device(device)
    problem = tritonenv.problem(device)
    if problem:
        raise tritonenv.TritonUnavailable(problem)
    if spec.dtype not in TORCH_DTYPES:
        raise ValueError(f"Triton kernels cover {', '.join(TORCH_DTYPES)}, not {spec.dtype}")
    result = _tune(spec, density, "triton", device, repeats, min_time, target, pattern, batch)
    db = db if db is not None else tuning.database()
    machine, print_ = tuning.machine_of("triton", device)
    db.record(spec, density, result.choice, result.ms, machine=machine, print_=print_,
              batch=batch, kernels=result.kernels)
    if save:
        db.save()
    return result


def _tune(spec: LayerSpec, density: float, backend: str, device: torch.device, repeats: int,
          min_time: float, target: str | None, pattern: str, batch: int = 1) -> Result:
    """The one tuning loop: operands, candidates, check each against torch, time the rest."""
    t = operands(spec, density, device, pattern, batch=batch)
    want = reference.op(spec, t)()
    tolerance = reference.tolerance(spec.dtype, device)
    names, errors = ["torch"], {}
    try:
        found, dropped = _candidates(spec, density, backend, target)
        names = [c.name for c in found] + list(dropped)
        errors.update(dropped)
    except Exception as exc:     # no kernel for this layer: torch is all there is
        found = [Candidate("torch")]
        names.append(backend)
        errors[backend] = f"{type(exc).__name__}: {exc}"
    runs: dict[str, Callable[[], object]] = {}
    kernels: dict[str, str] = {}
    for candidate in found:
        try:
            kernel, run = call(spec, candidate.name, t, backend)
            got, compiled = _launch_compiled(kernel, run)
            error = relative_error(got, want)
            if not error <= tolerance:
                raise ArithmeticError(f"differs from torch by {error:.3g} of the largest "
                                      f"magnitude (tolerance {tolerance:g})")
            if device.type == "cuda":
                spill = next(filter(None, map(resource_problem, compiled)), None)
                if spill:
                    raise DoesNotFit(spill)
            runs[candidate.name] = run
            if kernel is not None:
                kernels[candidate.name] = kernel.identity
        except Exception as exc:   # a failing candidate scores inf; the tuning goes on
            errors[candidate.name] = f"{type(exc).__name__}: {exc}"
            stats.add("tune_failures")
    times, contention = timing.time_device(runs, device, repeats, min_time) if runs \
        else ({}, None)
    ms = {name: times.get(name, math.inf) for name in names}
    return Result(spec, density, ms, errors, contention, batch, kernels)


relative_error = reference.relative_error   # a seam: tests count the checks


# --------------------------------------------------------------------------------- records
def current(spec: LayerSpec, backend: str, record: dict, default: str | None = None) -> bool:
    """Whether a tuning record still speaks of today's kernels: the kernel it chose and the
    layer's default one (``default``: its name, found here by default), which the choice was
    weighed against, have the identities the record names (torch's op has none). A record of
    format 1 names none: it never is."""
    default = default or loader.default_choice(spec, backend)
    named = record.get("kernels") or {}
    for name in {record["choice"], default} - {"torch"}:
        try:
            now = loader.identity(spec, backend, Variant.parse(name)) if name else None
        except ValueError:       # not a variant name this version knows
            now = None
        if now is None or named.get(name) != now:
            return False
    return True


_stale_seen: set[tuple] = set()


def fresh(spec: LayerSpec, backend: str, records: dict[str, dict] | None,
          default: str, retuned: bool = False) -> dict[str, dict] | None:
    """Of a layer's records (by bucket), those :func:`current`; the others are ignored, counted
    in ``stats()['stale_records']`` and reported once per process (``retuned``: autotuning in
    the loop tunes their buckets again)."""
    if not records:
        return records
    kept = {b: r for b, r in records.items() if current(spec, backend, r, default)}
    stale = [(tuning.spec_key(spec), backend, b, r["choice"]) for b, r in records.items()
             if b not in kept]
    new = [s for s in stale if s not in _stale_seen]
    if new:
        first = not _stale_seen
        _stale_seen.update(new)
        stats.add("stale_records", len(new))
        if first:
            import warnings
            warnings.warn(
                f"zeroskip: tuning records that timed kernels the compiler no longer makes "
                f"(the first: {spec.describe()}, {new[0][2]}, chose {new[0][3]!r}) are ignored"
                f"{' and tuned again' if retuned else ''}; `zeroskip tune --prune` drops them "
                "(stats()['stale_records'] counts them)", tuning.ZeroskipTuningWarning,
                stacklevel=5)
    return kept or None


def keep_current(db: tuning.TuningDB):
    """``keep(machine, spec, record)`` for :meth:`.tuning.TuningDB.prune`: a record of this CPU
    or of a GPU (Triton's kernels are the same sources everywhere) is kept while
    :func:`current`; another CPU's cannot be judged here (its vector width shapes the source)
    and is kept."""
    def keep(machine: str, spec: LayerSpec, record: dict) -> bool:
        if "gpu" in db.machines.get(machine, {}):
            return current(spec, "triton", record)
        return machine != db.here or current(spec, "c", record)
    return keep


# --------------------------------------------------------------------------------- GPU fit
class DoesNotFit(RuntimeError):
    """A Triton candidate's kernel spills registers (or does not fit the GPU otherwise)."""


class _CompiledSpy:
    """Stands in for a generated module's ``conv_kernel`` while a candidate is verified,
    keeping what each launch returned: on a GPU, Triton's ``CompiledKernel`` (``n_regs``,
    ``n_spills``, ``metadata.shared``)."""

    def __init__(self, fn):
        self.fn, self.compiled = fn, []

    def __getitem__(self, grid):
        launch = self.fn[grid]

        def run(*args, **kwargs):
            result = launch(*args, **kwargs)
            self.compiled.append(result)
            return result
        return run

    def __getattr__(self, name):
        return getattr(self.fn, name)


def _launch_compiled(kernel, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, list]:
    """Run ``run`` once, returning its result and what a Triton kernel's launches returned."""
    module = getattr(kernel, "module", None)
    if module is None:
        return run(), []
    real = module.conv_kernel
    spy = module.conv_kernel = _CompiledSpy(real)
    try:
        return run(), spy.compiled
    finally:
        module.conv_kernel = real


def resource_problem(compiled) -> str | None:
    """Why a kernel Triton compiled for this GPU should not run (it spills registers), or
    None. (One that needs more shared memory than the GPU has fails to launch already.)"""
    spills = getattr(compiled, "n_spills", None)
    if spills:
        return (f"it spills registers ({spills} spill slots, {getattr(compiled, 'n_regs', '?')} "
                "registers)")
    return None


def _misfit(meta: dict | str) -> str | None:
    """Why a kernel compiled for a target does not fit it (None: it does)."""
    if isinstance(meta, str):
        return f"it failed to compile ({meta[:500]})"
    problems = []
    if meta.get("spill_bytes"):
        problems.append(f"it spills {meta['spill_bytes']} bytes of registers "
                        f"({meta.get('registers')} registers)")
    if meta.get("shared_bytes", 0) > meta.get("shared_limit", math.inf):
        problems.append(f"it needs {meta['shared_bytes']} bytes of shared memory, the target "
                        f"has {meta['shared_limit']}")
    return "; ".join(problems) or None


def target_usage(spec: LayerSpec, choices: list[str], target: str) -> dict[str, dict | str]:
    """``triton_kernel.compile_for_target``'s ``meta`` (registers, spills, shared memory) of
    each Triton choice of ``spec`` compiled for ``target``, or the error where it failed. Needs
    no GPU; under Triton's interpreter, which cannot compile, it runs in a subprocess."""
    if not tritonenv.interpreting():
        return _compile_choices(spec.to_dict(), choices, target)
    import subprocess
    import sys
    import tempfile
    import zeroskip
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(Path(zeroskip.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    code = ("import json, sys\n"
            "from zeroskip.runtime.autotune import _compile_choices\n"
            "args = json.load(open(sys.argv[1]))\n"
            "json.dump(_compile_choices(**args), open(sys.argv[2], 'w'))\n")
    with tempfile.TemporaryDirectory(prefix="zeroskip-target-") as tmp:
        args, out = Path(tmp) / "args.json", Path(tmp) / "out.json"
        args.write_text(json.dumps({"spec": spec.to_dict(), "choices": choices,
                                    "target": target}))
        done = subprocess.run([sys.executable, "-c", code, str(args), str(out)], env=env,
                              capture_output=True, text=True, timeout=600 + 120 * len(choices))
        if done.returncode or not out.exists():
            raise RuntimeError(f"compiling for {target} failed ({done.returncode}): "
                               f"{done.stderr.strip()[-2000:]}")
        return json.loads(out.read_text())


def _compile_choices(spec: dict, choices: list[str], target: str) -> dict[str, dict | str]:
    import warnings
    from .triton_kernel import compile_for_target
    layer = LayerSpec.from_dict(spec)
    found: dict[str, dict | str] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
        for name in choices:
            variant = Variant.parse(name)
            try:
                kernel = loader.kernel_for(layer, "triton", variant)
                found[name] = compile_for_target(kernel, target, variant.config)["meta"]
            except Exception as exc:     # CompilationError and what Triton's backends raise
                found[name] = f"{type(exc).__name__}: {exc}"
    return found
