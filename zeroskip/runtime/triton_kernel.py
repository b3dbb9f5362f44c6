"""The Triton target's runtime half: write a kernel module, import it, pack weights, launch.

A layer's Triton module (``templates/triton/layer.py.jinja``) is rendered from the same
optimized graph as its C kernel. The loader (:mod:`.loader`) stores it as ``kernel.py`` in the
kernel cache (keyed by the source, the templates and Triton's version) and :func:`load` imports
it from there, so tracebacks and profilers point into it. Triton compiles it per device on
first launch and keeps its own binary cache; a failure there is a :class:`TritonLaunchError`.

Launch-time knobs (block sizes, warps, stages, split-K) are a variant's :class:`Config`:
constexprs of the generated kernels, so one file serves every config. Without a GPU the
kernels run under Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors, and
:func:`compile_for_target` builds PTX and cubin for a GPU target with no GPU present.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..codegen import emit, targets
from ..codegen.targets import Compiled
from ..codegen.variant import Config, Variant
from ..spec import LayerSpec
from . import stats
from .packs import PackCache
from .tritonenv import TritonUnavailable, interpreting, triton_version

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
POINTER_TYPES = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}
# Shared memory a kernel may use per block (opt-in maximum), by compute capability.
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
MAX_GRID_YZ = 65535
TARGET = targets.TritonTarget()
ERRORS = (TritonUnavailable,)   # what building a Triton kernel raises besides the loader's own


class TritonLaunchError(RuntimeError):
    """A Triton kernel failed on its first launch (where Triton compiles it)."""


def target() -> targets.TritonTarget:
    return TARGET


def cache_parts() -> dict:
    return {"triton": triton_version(), "backend": "triton"}


def build(tmp: Path, compiled: Compiled) -> list[str]:
    (tmp / "kernel.py").write_text(compiled.source)
    stats.add("compiles")
    return ["kernel.py"]


def load(compiled: Compiled, path: Path) -> "Kernel":
    """The kernel of the module in ``path`` (a cache entry's folder, or a bundle's file)."""
    file = path / "kernel.py" if path.is_dir() else path
    key = hashlib.sha256(compiled.source.encode()).hexdigest()[:16]
    return Kernel(compiled, file, _import(file, f"zeroskip_triton_{key}"))


def _import(path: Path, name: str):
    """Import a generated module from its file (a real file: Triton reads its source)."""
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


class Kernel:
    """One layer's Triton module, imported from the cache."""

    backend = "triton"

    def __init__(self, compiled: Compiled, path: Path, module: Any):
        self.compiled, self.spec, self.plan = compiled, compiled.spec, compiled.plan
        self.identity = compiled.identity     # what tuning records name it by
        self.output_shape = compiled.spec.output_shape()
        self.family, self.crossover = compiled.family, compiled.crossover
        self.source, self.module = path, module
        self.variant = compiled.variant
        self.default = Variant.parse(TARGET.default_choice(compiled))
        self._packs = PackCache()
        self._launch_args: dict = {}
        self._launched: set = set()      # configs launched once (Triton compiled them)

    # The packed weight layout is [group][tap][c_red][c_out]: a k-block's rows are contiguous
    # along output channels.
    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """The weight in the kernel's layout: one device copy per call, kept across calls for
        frozen weights only (:mod:`.packs`)."""
        return self._packs.get(weight, None, self._pack)

    def _pack(self, weight: torch.Tensor, _bias: None) -> torch.Tensor:
        p = self.plan
        sg, so, si = emit.weight_strides(p)
        w = weight.detach().contiguous()
        return w.as_strided((p.groups, p.taps, p.c_red, p.c_out), (sg, 1, si, so)).contiguous()

    def forget_packed(self) -> None:
        self._packs.clear()

    @staticmethod
    def prepare(x: torch.Tensor) -> torch.Tensor:
        """The data operand as the kernel reads it: as it is if contiguous or channels_last
        (the output follows its layout), else a contiguous copy."""
        return normalize_layout(x)

    @staticmethod
    def new_output(like: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        memory_format = torch.contiguous_format
        if like.dim() in (4, 5) and like.dim() == len(shape) and not like.is_contiguous():
            memory_format = torch.channels_last if like.dim() == 4 else torch.channels_last_3d
        return torch.empty(shape, dtype=like.dtype, device=like.device,
                           memory_format=memory_format)

    @staticmethod
    def density(x: torch.Tensor) -> float:
        """The share of non-zeros in ``x`` (this synchronizes with the GPU: the dispatch asks
        rarely)."""
        return float(torch.count_nonzero(x)) / max(1, x.numel())

    def run_new(self, lhs: torch.Tensor, rhs: torch.Tensor, bias: torch.Tensor | None,
                shape: tuple[int, ...], variant: Variant | None = None) -> torch.Tensor:
        """:meth:`run` into a new output of ``shape``."""
        return self.run(lhs, rhs, self.new_output(lhs, shape), bias, variant)

    def run(self, lhs: torch.Tensor, rhs: torch.Tensor, out: torch.Tensor,
            bias: torch.Tensor | None = None, variant: Variant | None = None) -> torch.Tensor:
        """Run on ``lhs`` and ``rhs`` (the weight, packed here; for the weight gradient the
        second operand) with ``variant``'s config (None: the default), writing ``out``.
        Triton compiles a config on its first launch: an error there is a
        :class:`TritonLaunchError` (the caller falls back), later errors propagate."""
        config = (variant.config if variant is not None else None) or self.default.config
        if self.family != "weight_grad":
            rhs = self.pack(rhs)
        bias = None if bias is None else bias.detach().contiguous()
        if config in self._launched:
            return self.launch(lhs, rhs, out, bias, config)
        try:
            result = self.launch(lhs, rhs, out, bias, config)
        except (ValueError, TypeError, MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:      # triton.CompilationError and what its backends raise
            raise TritonLaunchError(f"the Triton kernel {self.source} ({config.name}) failed: "
                                    f"{type(exc).__name__}: {exc}") from exc
        self._launched.add(config)
        return result

    def launch(self, lhs: torch.Tensor, rhs: torch.Tensor, out: torch.Tensor,
               bias: torch.Tensor | None = None, config: Config | None = None) -> torch.Tensor:
        """Run on ``lhs`` (N, C, *size) and ``rhs`` (the packed weight, or for the weight
        gradient the second operand), writing ``out``: contiguous or channels_last tensors."""
        config = config or self.default.config
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
                USE_DOT=TARGET.uses_dot(self.plan, config), PRECISION="tf32" if tf32 else "ieee",
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

    config = config or kernel.default.config
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
