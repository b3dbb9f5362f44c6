"""Triton kernels: rendered source written as real files in the cache, imported, launched.

A layer's Triton module (``templates/triton/layer.py.jinja``) is rendered from the same
optimized graph as its C kernel, lowered with ``backend='triton'``. The source is stored in the
kernel cache as ``kernel.py`` (keyed by the source, the templates and Triton's version) and
imported from there, so tracebacks and profilers point into it. Triton compiles it per device
on first launch and keeps its own binary cache.

A :class:`Config` holds the launch-time knobs (block sizes, warps, stages, split-K): they are
constexprs of the generated kernels, so one file serves every config, and the autotuner's
candidates are (family, config) pairs. Without a GPU the kernels run under Triton's
interpreter (``TRITON_INTERPRET=1``) on CPU tensors, and :func:`compile_for_target` builds PTX
and cubin for a GPU target with no GPU present.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import re
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..codegen import emit, lower, pipeline
from ..spec import LayerSpec
from . import bundle, cache, stats

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
POINTER_TYPES = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}
# Shared memory a kernel may use per block (opt-in maximum), by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
MAX_GRID_YZ = 65535


class TritonUnavailable(RuntimeError):
    """Triton is not installed, or cannot run here (no GPU and no interpreter)."""


class TritonLaunchError(RuntimeError):
    """A Triton kernel failed on its first launch (where Triton compiles it)."""


def available() -> bool:
    return importlib.util.find_spec("triton") is not None


def unavailable_reason(device: torch.device) -> str | None:
    """Why Triton kernels cannot run on ``device`` here, or None if they can."""
    if not available():
        return "Triton is not installed (pip install triton), so CUDA tensors run torch's op"
    if device.type == "cpu" and not interpreting():
        if _interpret_requested():
            return ("TRITON_INTERPRET=1 was set after Triton was imported, which is too late: "
                    "set it before the process imports triton")
        return ("ZEROSKIP_BACKEND=triton runs CPU tensors under Triton's interpreter: set "
                "TRITON_INTERPRET=1 too")
    if device.type == "cuda" and interpreting():
        return "Triton was imported with TRITON_INTERPRET=1, so it cannot run CUDA kernels"
    return None


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def interpreting() -> bool:
    """Whether Triton kernels run under Triton's interpreter (on CPU tensors). Triton fixes
    this when it is first imported (its own library functions are made then), so once it is
    imported the answer is what it was imported as, whatever TRITON_INTERPRET says now."""
    if "triton.language" not in sys.modules:
        return _interpret_requested()
    import triton.language as tl
    return type(tl.zeros).__name__ == "InterpretedFunction"


@functools.lru_cache(maxsize=1)
def triton_version() -> str:
    if not available():
        raise TritonUnavailable("Triton is not installed (pip install triton)")
    import triton
    return triton.__version__


# --------------------------------------------------------------------------------- configs
@dataclasses.dataclass(frozen=True)
class Config:
    """Launch-time knobs of a Triton kernel. Forward/input-gradient families: BLOCK_M output
    rows x BLOCK_N output channels, BLOCK_K contracted channels per MMA step. Weight gradient:
    BLOCK_M output channels x BLOCK_N contracted channels, BLOCK_K positions per step, and
    ``split`` programs per tile splitting the positions (0: chosen per launch)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 32
    warps: int = 4
    stages: int = 3
    split: int = 0

    def __post_init__(self):
        for name in ("block_m", "block_n", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1 or value > 256 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two in [1, 256], got {value!r}")
        if self.warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"warps must be 1, 2, 4, 8 or 16, got {self.warps!r}")
        if not isinstance(self.stages, int) or not 1 <= self.stages <= 8:
            raise ValueError(f"stages must be an int in [1, 8], got {self.stages!r}")
        if not isinstance(self.split, int) or not 0 <= self.split <= 1024:
            raise ValueError(f"split must be an int in [0, 1024], got {self.split!r}")

    @property
    def name(self) -> str:
        """'m64n64k32w4s3' (and '/split4' where split is fixed)."""
        text = (f"m{self.block_m}n{self.block_n}k{self.block_k}w{self.warps}s{self.stages}")
        return text + (f"x{self.split}" if self.split else "")

    @classmethod
    def parse(cls, name: str) -> "Config":
        match = re.fullmatch(r"m(\d+)n(\d+)k(\d+)w(\d+)s(\d+)(?:x(\d+))?", name)
        if not match:
            raise ValueError(f"not a Triton config: {name!r}")
        m, n, k, w, s, x = match.groups()
        return cls(int(m), int(n), int(k), int(w), int(s), int(x or 0))


def _pow2(n: int, low: int, high: int) -> int:
    return max(low, min(high, 1 << max(0, n - 1).bit_length()))


def default_config(plan: lower.KernelPlan) -> Config:
    """A config sized to the layer: MMA tiles of at least 16 where channels allow (BLOCK_K 32
    for 4-byte types, 64 for 2-byte ones: 64 bytes of a row per step), CUDA-core tiles
    (BLOCK_N the channel count) for few channels."""
    if plan.pattern == "grad_weight":
        return Config(_pow2(plan.c_out, 16, 64), _pow2(plan.c_red, 16, 64), 32, 4, 3)
    if plan.c_red < 16:
        n = _pow2(plan.c_out, 1, 64)
        return Config(64, n, 16, 8 if 64 * n >= 4096 else 4, 2)
    k = 32 if plan.ctype == "float32" else 64
    n = _pow2(plan.c_out, 16, 128)
    # 64x128 float32 accumulators take 64 registers a thread at 4 warps, and the region
    # address arithmetic on top spilled on sm_90 (ptxas: up to 328 bytes); 8 warps do not.
    return Config(64, n, _pow2(plan.c_red, 16, k), 8 if 64 * n >= 8192 else 4, 3)


def configs(plan: lower.KernelPlan) -> list[Config]:
    """The tuner's configs for a layer: the default and a few tile shapes around it."""
    base = default_config(plan)
    found = [base]
    if plan.pattern == "grad_weight":
        shapes = [(64, 64, 64, 4, 3), (32, 32, 64, 4, 4), (128, 64, 32, 8, 3)]
    elif plan.c_red < 16:
        shapes = [(128, base.block_n, 16, 8, 2), (32, base.block_n, 16, 2, 2)]
    else:
        shapes = [(128, 128, 32, 8, 3), (128, 64, 64, 4, 4), (64, 64, 64, 4, 4),
                  (32, 64, 32, 4, 5), (64, 128, 32, 4, 4)]
    for shape in shapes:
        config = Config(*shape)
        if config not in found:
            found.append(config)
    return found


def choice_name(strategy: str, config: Config) -> str:
    """A tuning-database choice naming a Triton candidate: 'dense/m64n64k32w4s3',
    'sparse/m64n64k32w4s3' (block-sparse)."""
    return f"{strategy}/{config.name}"


def parse_choice(name: str) -> tuple[str, Config]:
    """``(strategy, config)`` of a :func:`choice_name`; ValueError for anything else."""
    strategy, _, config = name.partition("/")
    if strategy not in ("dense", "sparse") or not config:
        raise ValueError(f"not a Triton choice: {name!r}")
    return strategy, Config.parse(config)


def uses_dot(plan: lower.KernelPlan, config: Config) -> bool:
    """Whether the tiles run on tensor cores (tl.dot needs every block dim >= 16)."""
    small = plan.c_red if plan.pattern != "grad_weight" else min(plan.c_red, plan.c_out)
    return small >= 16 and min(config.block_m, config.block_n, config.block_k) >= 16


# --------------------------------------------------------------------------------- kernels
def family_of(spec: LayerSpec, strategy: str = "dense") -> str:
    if spec.op == "conv_grad_weight":
        return "weight_grad"
    return "block_sparse" if strategy == "sparse" else "direct"


class Kernel:
    """One layer's Triton module, imported from the cache."""

    def __init__(self, spec: LayerSpec, plan: lower.KernelPlan, family: str, path: Path,
                 module: Any):
        self.spec, self.plan, self.family, self.source, self.module = \
            spec, plan, family, path, module
        self.default = default_config(plan)
        self._packs: dict = {}
        self._lock = threading.Lock()
        self._launch_args: dict = {}

    # The packed weight layout is [group][tap][c_red][c_out]: a k-block's rows are contiguous
    # along output channels.
    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight in the kernel's layout (cached per Parameter version, as the C path)."""
        p = self.plan
        cached = isinstance(weight, torch.nn.Parameter)
        key = (id(weight), weight._version, weight.data_ptr(), weight.device)
        if cached:
            with self._lock:
                hit = self._packs.get(key)
            if hit is not None:
                return hit[0]
        sg, so, si = emit.weight_strides(p)
        w = weight.detach().contiguous()
        packed = w.as_strided((p.groups, p.taps, p.c_red, p.c_out), (sg, 1, si, so)).contiguous()
        if cached:
            with self._lock:
                self._packs.clear()     # one layer, one weight: keep the latest version only
                self._packs[key] = (packed, weight)
        return packed

    def launch(self, lhs: torch.Tensor, rhs: torch.Tensor, out: torch.Tensor,
               bias: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
        """Run on ``lhs`` (N, C, *size) and ``rhs`` (the packed weight, or for the weight
        gradient the second operand), writing ``out``: contiguous or channels_last tensors."""
        config = config or self.default
        if out.numel() == 0:
            return out
        if self.family == "weight_grad":
            self._launch_weight_grad(lhs, rhs, out, config)
        else:
            self._launch_conv(lhs, rhs, out, bias, config)
        stats.add("kernel_calls")
        return out

    def _common(self, config: Config, dtype: torch.dtype) -> dict:
        """The launch's constexprs and options (made once per config, dtype and TF32 setting:
        this is on every call's path). Callers must not modify the dict."""
        key = (config, dtype, torch.backends.cudnn.allow_tf32)
        found = self._launch_args.get(key)
        if found is None:
            tf32 = dtype == torch.float32 and not interpreting() and key[2]
            # DOT_F32: Triton 3.9's interpreter computes bfloat16 tl.dot wrongly (garbage of
            # magnitude 1e10); under it, bfloat16 tiles are widened first. GPUs multiply bf16.
            found = self._launch_args[key] = dict(
                BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                USE_DOT=uses_dot(self.plan, config), PRECISION="tf32" if tf32 else "ieee",
                DOT_F32=interpreting() and dtype == torch.bfloat16,
                num_warps=config.warps, num_stages=config.stages)
        return found

    def _launch_conv(self, x, w, out, bias, config: Config) -> None:
        p, mod = self.plan, self.module
        n = x.shape[0]
        x_sn, x_sc, x_sp = layout_strides(x)
        y_sn, y_sc, y_sp = layout_strides(out)
        tiles = sum(-(-n * positions // config.block_m) for positions in mod.REGION_POSITIONS)
        grid = (tiles, p.groups * -(-p.c_out // config.block_n))
        _check_grid(grid, self.spec)
        nz = x
        if self.family == "block_sparse":
            kb = -(-p.c_red // config.block_k)
            size = math.prod(p.lhs_size)
            nz = torch.empty((n, p.groups * kb, size), dtype=torch.int8, device=x.device)
            _check_grid((1, kb, n * p.groups), self.spec)
            mod.nonzero_blocks[(-(-size // 128), kb, n * p.groups)](
                x, nz, n, x_sn, X_SC=x_sc, X_SP=x_sp, BLOCK_K=config.block_k, BLOCK_P=128)
        mod.conv_kernel[grid](x, w, w if bias is None else bias, out, nz, n, x_sn, y_sn,
                              X_SC=x_sc, X_SP=x_sp, Y_SC=y_sc, Y_SP=y_sp,
                              **self._common(config, x.dtype))

    def _launch_weight_grad(self, x, g, out, config: Config) -> None:
        p, mod = self.plan, self.module
        n = x.shape[0]
        x_sn, x_sc, x_sp = layout_strides(x)
        g_sn, g_sc, g_sp = layout_strides(g)
        taps = sum(mod.REGION_TAPS)
        tiles = -(-p.c_out // config.block_m) * -(-p.c_red // config.block_n)
        split = config.split or self._split(taps * tiles * p.groups, n, config, x.device)
        split = max(1, min(split, MAX_GRID_YZ // p.groups))
        grid = (taps, tiles, p.groups * split)
        _check_grid(grid, self.spec)
        target = out if split == 1 else torch.zeros(out.shape, dtype=torch.float32,
                                                    device=out.device)
        mod.conv_kernel[grid](x, g, target, n, x_sn, g_sn, split, X_SC=x_sc, X_SP=x_sp,
                              G_SC=g_sc, G_SP=g_sp, ATOMIC=split > 1,
                              **self._common(config, x.dtype))
        if target is not out:
            out.copy_(target)

    def _split(self, programs: int, n: int, config: Config, device: torch.device) -> int:
        """Split the positions until the grid fills the GPU about four times over, keeping at
        least eight BLOCK_K steps per program."""
        if device.type != "cuda":
            return 2 if programs < 4 else 1     # the interpreter: exercise both paths
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        longest = n * max((emit.taps_of(r) for r in self.plan.regions), default=0)
        most = max(1, longest // (8 * config.block_k))
        return max(1, min(most, -(-4 * sms // max(1, programs))))


def layout_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, channel, position) element strides of a tensor whose positions are row-major:
    contiguous (NC...) or channels-last (N...C). Other layouts must be made contiguous first."""
    channels, positions = t.shape[1], math.prod(t.shape[2:])
    if t.is_contiguous():
        return channels * positions, positions, 1
    if t.dim() in (4, 5) and t.is_contiguous(memory_format=torch.channels_last if t.dim() == 4
                                             else torch.channels_last_3d):
        return channels * positions, 1, channels
    raise ValueError(f"tensor of shape {tuple(t.shape)} and strides {t.stride()} is neither "
                     "contiguous nor channels_last")


def normalize_layout(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if :func:`layout_strides` takes it, else a contiguous copy."""
    try:
        layout_strides(t)
        return t
    except ValueError:
        return t.contiguous()


def _check_grid(grid: tuple[int, ...], spec: LayerSpec) -> None:
    if grid[0] >= 2 ** 31 or any(g > MAX_GRID_YZ for g in grid[1:]):
        raise ValueError(f"{spec.describe()}: launch grid {grid} exceeds the GPU's limits")


_kernels: dict[tuple[LayerSpec, str], Kernel] = {}
_kernels_lock = threading.Lock()


def kernel_for(spec: LayerSpec, strategy: str = "dense") -> Kernel:
    """The Triton kernel of ``spec`` (batch ignored): ``strategy`` 'dense' or 'sparse' (the
    block-sparse family). Raises :class:`IRError` for what no template covers,
    :class:`TemplateError`, or :class:`TritonUnavailable`."""
    family = family_of(spec, strategy)
    key = (dataclasses.replace(spec, batch=1), family, interpreting())
    kernel = _kernels.get(key)
    if kernel is not None:
        stats.add("memo_hits")
        return kernel
    with _kernels_lock:
        kernel = _kernels.get(key)
        if kernel is None:
            kernel = _kernels[key] = _build(key[0], family)
        else:
            stats.add("memo_hits")
    return kernel


def render(spec: LayerSpec, family: str) -> tuple[lower.KernelPlan, str]:
    steps = pipeline.run(spec, dump_dir=os.environ.get("ZEROSKIP_DUMP"), strategy="dense")
    plan = lower.plan(steps[-1][1], backend="triton")
    return plan, emit.render_triton(plan, family)


def _build(spec: LayerSpec, family: str) -> Kernel:
    version = triton_version()
    plan, source = render(spec, family)
    dump = os.environ.get("ZEROSKIP_DUMP")
    if dump:
        folder = pipeline.dump_folder(spec, Path(dump))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"kernel-triton-{family}.py").write_text(source)
    served = bundle.find("triton", source)
    if served is not None:
        stats.add("bundle_hits")
        name = f"zeroskip_triton_{bundle.kernel_key('triton', source)[:16]}"
        return Kernel(spec, plan, family, served, _import(served, name))
    key = cache.make_key(version=__version__, templates=emit.template_hash("triton"),
                         source=source, triton=version, backend="triton")

    def make(tmp: Path) -> list[str]:
        (tmp / "kernel.py").write_text(source)
        stats.add("compiles")
        return ["kernel.py"]
    folder, built = cache.fetch(key, {"spec": spec.to_dict(), "family": family,
                                      "backend": "triton", "version": __version__,
                                      "triton": version}, make)
    if not built:
        stats.add("cache_hits")
    path = folder / "kernel.py"
    return Kernel(spec, plan, family, path, _import(path, f"zeroskip_triton_{key[:16]}"))


def _import(path: Path, name: str):
    """Import a generated module from its file (a real file: Triton reads its source)."""
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------------- ahead of time
TARGETS = {"sm_80": 80, "sm_86": 86, "sm_89": 89, "sm_90": 90}


def compile_for_target(kernel: Kernel, target: str = "sm_90", config: Config | None = None,
                       channels_last: bool = False) -> dict[str, Any]:
    """Compile ``kernel``'s entry point for a GPU target without a GPU: returns ``ptx`` (str),
    ``cubin`` (bytes) and ``meta``: registers, spills, shared memory and whether it fits."""
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    if interpreting():
        raise TritonUnavailable("compiling for a GPU target needs Triton imported without "
                                "TRITON_INTERPRET=1 (run it in a process of its own)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    config = config or kernel.default
    p = kernel.plan
    ptr = POINTER_TYPES[kernel.spec.dtype]
    common = dict(kernel._common(config, TORCH_DTYPES[kernel.spec.dtype]))
    options = {"num_warps": common.pop("num_warps"), "num_stages": common.pop("num_stages")}
    common["PRECISION"] = "tf32" if kernel.spec.dtype == "float32" else "ieee"
    lhs = (p.lhs_channels, p.lhs_size)
    rank_ok = channels_last and kernel.spec.rank in (2, 3)   # a 1x1 plan is flattened

    def strides(channels, size):
        positions = math.prod(size)
        return (1, channels) if rank_ok else (positions, 1)

    x_sc, x_sp = strides(*lhs)
    if kernel.family == "weight_grad":
        g_sc, g_sp = strides(p.rhs_shape[1], p.rhs_shape[2:])
        signature = {"x_ptr": ptr, "g_ptr": ptr, "y_ptr": ptr, "N": "i32", "x_sn": "i32",
                     "g_sn": "i32", "SPLIT": "i32"}
        constants = dict(X_SC=x_sc, X_SP=x_sp, G_SC=g_sc, G_SP=g_sp, ATOMIC=False, **common)
    else:
        y_sc, y_sp = strides(p.out_channels, p.out_size)
        signature = {"x_ptr": ptr, "w_ptr": ptr, "b_ptr": ptr, "y_ptr": ptr, "nz_ptr": ptr,
                     "N": "i32", "x_sn": "i32", "y_sn": "i32"}
        constants = dict(X_SC=x_sc, X_SP=x_sp, Y_SC=y_sc, Y_SP=y_sp, **common)
    if kernel.family == "block_sparse":
        signature["nz_ptr"] = "*i8"
    signature.update({name: "constexpr" for name in constants})
    source = ASTSource(fn=kernel.module.conv_kernel, signature=signature, constexprs=constants)
    capability = TARGETS[target]
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
    usage = resource_usage(compiled.asm["cubin"])
    # Triton's figure: the dynamic shared memory its pipelining and layout conversions need.
    shared = max(int(compiled.metadata.shared), usage["static_shared_bytes"])
    limit = SHARED_LIMIT[capability]
    spills = usage["local_bytes"] + usage["stack_bytes"]
    meta = {"spec": kernel.spec.describe(), "family": kernel.family, "target": target,
            "config": config.name, "layout": "channels_last" if rank_ok else "contiguous",
            "registers": usage["registers"], "spill_bytes": spills, "shared_bytes": shared,
            "shared_limit": limit, "fits": shared <= limit and spills == 0,
            "triton": triton.__version__}
    return {"ptx": compiled.asm["ptx"], "cubin": compiled.asm["cubin"], "meta": meta}


def _tool(name: str) -> str:
    """A CUDA binary utility that ships with Triton's NVIDIA backend."""
    import triton
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def resource_usage(cubin: bytes) -> dict[str, int]:
    """Registers per thread, static shared memory and local memory (spills, when the kernel
    has no local arrays, which generated kernels do not) of the kernel in ``cubin``, read by
    ``cuobjdump --dump-resource-usage``."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        done = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(path)],
                              capture_output=True, text=True, timeout=120)
    if done.returncode:
        raise RuntimeError(f"cuobjdump failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", done.stdout)
    if not found:
        raise RuntimeError(f"cannot read cuobjdump's resource usage:\n{done.stdout[-2000:]}")
    registers, stack, shared, local = map(int, found.groups())
    return {"registers": registers, "stack_bytes": stack, "static_shared_bytes": shared,
            "local_bytes": local}
