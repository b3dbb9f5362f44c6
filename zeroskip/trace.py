"""The conv layers a model runs: each layer's spec, and its workload (batch and the input density
measured on sample data) beside it.

:func:`trace` runs a model on a few seeded random batches with a hook on every convolution that
:func:`zeroskip.convert` would run on generated kernels, and returns each layer's spec (fused
ReLU included, as the converted model will ask for it) with the share of non-zeros its input
had. ``zeroskip trace MODULE:FACTORY`` writes that as a layers file, which ``zeroskip generate``
(and ``tune --specs``) read back with :func:`read_layers`::

    {"format": "zeroskip-layers", "version": 2,
     "model": "pkg.mod:factory",            # what was traced (null when not named)
     "input_shape": [1, 3, 224, 224], "batches": 4, "seed": 0, "fuse_relu": true,
     "dtype": "float32", "zeroskip": "0.1.0", "torch": "2.13.0",
     "layers": [                            # in the order of their first call
       {"name": "0.conv1",                  # module name ("(model)": the model itself);
                                            # "#2", "#3"... appended for further call shapes
        "module": "Conv2d",                 # the module's class
        "calls": 4,                         # calls seen over all batches
        "batch": 1,                         # the batch size of the calls
        "density": {"mean": 0.5, "std": 0.01, "min": 0.49, "max": 0.51},
        "grad_density": {...},              # its output gradient's (mean, std, min, max),
                                            # where a backward reached it
        "spec": {...}}]}                    # LayerSpec.to_dict()

:func:`read_layers` gives ``(name, spec, workload)`` per layer, the workload's density and
gradient density the means. It also takes version 1 of this format and the older layer files, a JSON list of
``LayerSpec.to_dict()`` objects (each named by ``spec.describe()``) or an object of them by
name, whose spec objects may carry ``batch`` and ``density`` (those become the workload).
"""
from __future__ import annotations

import copy
import importlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from .spec import LayerSpec, Workload

CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d,
              nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
FORMAT, VERSION = "zeroskip-layers", 2
READS = (1, 2)           # version 1 kept batch and density inside the spec objects


class TraceError(RuntimeError):
    """The model could not be traced: its factory or forward raised, or no conv layer ran."""


def spec_of(module: nn.Module, input_shape: tuple[int, ...], dtype=None,
            activation: str = "none", output_padding=None) -> LayerSpec:
    """The LayerSpec of a torch conv module applied to a batched input of ``input_shape`` (its
    batch is the workload's, not the spec's; ``output_padding``: a transposed conv's, where its
    call set one through ``output_size``)."""
    if not isinstance(module, CONV_TYPES):
        raise TypeError(f"expected a torch convolution module, got {type(module).__name__}")
    _, _, *size = input_shape
    common = dict(bias=module.bias is not None, padding_mode=module.padding_mode,
                  dtype=dtype or module.weight.dtype, input_size=tuple(size),
                  activation=activation)
    if module.transposed:
        return LayerSpec.conv_transpose(
            module.in_channels, module.out_channels, module.kernel_size, module.stride,
            module.padding, module.output_padding if output_padding is None else output_padding,
            module.groups, dilation=module.dilation, **common)
    return LayerSpec.conv(module.in_channels, module.out_channels, module.kernel_size,
                          module.stride, module.padding, module.dilation, module.groups,
                          **common)


@torch.no_grad()
def trace_specs(model: nn.Module, *inputs: torch.Tensor
                ) -> list[tuple[str, LayerSpec, Workload]]:
    """Run ``model(*inputs)`` and return ``(module name, spec, workload)`` for every conv call,
    in call order: the workload is the call's batch and the density of non-zeros its input
    actually had."""
    found: list[tuple[str, LayerSpec, Workload]] = []
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, CONV_TYPES):
            def hook(mod, args, name=name):
                x = args[0]
                density = float((x != 0).sum()) / max(x.numel(), 1)
                found.append((name, spec_of(mod, tuple(x.shape)),
                              Workload(x.shape[0], round(density, 4))))
            handles.append(module.register_forward_pre_hook(hook))
    try:
        model(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    return found


# ------------------------------------------------------------------------------ the model
def load_factory(target: str) -> Callable[[], Any]:
    """The callable named by ``"pkg.module:factory"`` (``factory`` may be a dotted attribute
    path, e.g. ``Class.build``)."""
    module_name, sep, attr = target.partition(":") if isinstance(target, str) else ("", "", "")
    if not (sep and _dotted(module_name) and _dotted(attr)):
        raise ValueError(f"expected MODULE:FACTORY (e.g. zeroskip.models:resnet_stage), "
                         f"got {target!r}")
    try:
        obj = importlib.import_module(module_name)
    except Exception as exc:   # a module's own import-time error is as fatal as a missing one
        raise ImportError(f"cannot import module {module_name!r} for {target}: "
                          f"{type(exc).__name__}: {exc}") from exc
    owner = module_name
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"{target}: {owner} has no attribute {part!r}") from None
        owner += f".{part}"
    if not callable(obj):
        raise TypeError(f"{target} is a {type(obj).__name__}, not a callable that returns an "
                        "nn.Module")
    return obj


def build_model(target: str) -> nn.Module:
    """``load_factory(target)()``, checked to be an ``nn.Module``."""
    factory = load_factory(target)
    try:
        model = factory()
    except Exception as exc:
        raise TraceError(f"{target}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise TypeError(f"{target}() returned a {type(model).__name__}, not an nn.Module")
    return model


def _dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


# ------------------------------------------------------------------------------ tracing
def _converted_convs(model: nn.Module, fuse_relu: bool) -> tuple[dict[str, nn.Module], set]:
    """The conv modules that ``convert(model, fuse_relu)`` runs on generated kernels, by name
    (torch's exact classes, and zeroskip's own; subclasses keep their forward, on torch), and
    the ids of those that will run with a fused ReLU: ``convert`` itself decides, on a copy of
    the model (the model is left as it is)."""
    from .conversion import convert
    from .nn import REPLACEMENTS
    ours = tuple(REPLACEMENTS.values())
    convs = {name or "(model)": m for name, m in model.named_modules()
             if type(m) in REPLACEMENTS or isinstance(m, ours)}
    relu = {id(m) for m in convs.values() if getattr(m, "_activation", "none") == "relu"}
    if fuse_relu:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")     # convert's own warnings come when it runs
            twin = convert(copy.deepcopy(model))
        fused = {name or "(model)" for name, m in twin.named_modules()
                 if getattr(m, "_activation", "none") == "relu"}
        relu |= {id(m) for name, m in convs.items() if name in fused}
    return convs, relu


def _call_spec(module: nn.Module, args: tuple, kwargs: dict, relu: bool) -> LayerSpec:
    """The spec of one call of a conv module, as its converted twin computes it."""
    x = args[0] if args else kwargs["input"]
    rank = len(module.kernel_size)
    shape = tuple(x.shape) if x.dim() == rank + 2 else (1, *x.shape)   # unbatched: batch 1
    output_padding = None
    output_size = args[1] if len(args) > 1 else kwargs.get("output_size")
    if module.transposed and output_size is not None:
        output_padding = module._output_padding(x, output_size, module.stride, module.padding,
                                                module.kernel_size, rank, module.dilation)
    return spec_of(module, shape, dtype=x.dtype, activation="relu" if relu else "none",
                   output_padding=output_padding)


def trace(model: nn.Module, input_shape, batches: int = 4, seed: int = 0,
          fuse_relu: bool = True, dtype: torch.dtype = torch.float32,
          name: str | None = None, gradients: bool = True) -> dict[str, Any]:
    """Run ``model`` (in eval mode; its modes are restored after) on ``batches`` batches of
    ``torch.randn(input_shape)`` drawn from a generator seeded with ``seed``, and return the
    layers file (module docstring) of every conv call: one entry per module and call shape,
    with the input density's mean, spread (population std), min and max over the calls. With
    ``gradients``, each batch also runs a backward of random normal output gradients (to the
    input only: the model's ``.grad`` are left alone), and each entry gets its output
    gradient's density as ``grad_density`` (what its input gradient runs on; the ReLU after the
    layer masks it). With ``fuse_relu`` the specs fuse a ReLU where ``convert(model,
    fuse_relu=True)`` would. ``name`` is recorded as the model (e.g. ``"pkg.mod:factory"``).

    Raises ValueError for a bad shape or batch count, TraceError where the forward raises or
    no convolution layer ran."""
    shape = _shape(input_shape)
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 1:
        raise ValueError(f"batches must be a positive int, got {batches!r}")
    convs, fused = _converted_convs(model, fuse_relu)   # before our hooks: hooks block fusion
    entries: dict[tuple[str, LayerSpec], dict] = {}
    names: dict[str, int] = {}

    def hook(module, args, kwargs, name):
        x = args[0] if args else kwargs["input"]
        spec = _call_spec(module, args, kwargs, id(module) in fused)
        entry = entries.get((name, spec))
        if entry is None:
            names[name] = names.get(name, 0) + 1
            label = name if names[name] == 1 else f"{name}#{names[name]}"
            entry = entries[(name, spec)] = dict(name=label, module=type(module).__name__,
                                                 spec=spec, densities=[], grad_densities=[],
                                                 batch=_batch(x, spec))
        entry["densities"].append(_share(x))
        calling[name] = entry

    def output_hook(module, args, kwargs, output, name):
        # The gradient of the conv's output (before any ReLU after it: a hook registered
        # before an in-place change sees the gradient of the value before it, masked).
        entry = calling.pop(name, None)
        if gradients and entry is not None and isinstance(output, torch.Tensor) and \
                output.requires_grad:
            output.register_hook(lambda g: entry["grad_densities"].append(_share(g)))

    params = next(iter(model.parameters()), None)
    device = params.device if params is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    modes = {m: m.training for m in model.modules()}
    calling: dict[str, dict] = {}
    handles = [m.register_forward_pre_hook(
        lambda mod, args, kwargs, name=n: hook(mod, args, kwargs, name), with_kwargs=True)
        for n, m in convs.items()]
    handles += [m.register_forward_hook(
        lambda mod, args, kwargs, out, name=n: output_hook(mod, args, kwargs, out, name),
        with_kwargs=True) for n, m in convs.items()]
    try:
        model.eval()
        with torch.set_grad_enabled(gradients):
            for _ in range(batches):
                x = torch.randn(shape, generator=generator, dtype=dtype).to(device)
                if gradients and x.is_floating_point():
                    x.requires_grad_()
                try:
                    out = model(x)
                except Exception as exc:
                    raise TraceError(f"the model's forward raised {type(exc).__name__} on an "
                                     f"input of shape {list(shape)}: {exc}") from exc
                if gradients and x.requires_grad:
                    _backward(out, x, generator)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():
            module.training = training
    if not entries:
        raise TraceError("no convolution layers ran" + (
            "" if convs else " (the model has no torch Conv or ConvTranspose module)"))
    return {"format": FORMAT, "version": VERSION, "model": name, "input_shape": list(shape),
            "batches": batches, "seed": seed, "fuse_relu": fuse_relu,
            "dtype": str(dtype).removeprefix("torch."), "zeroskip": _version(),
            "torch": str(torch.__version__),
            "layers": [_layer(entry) for entry in entries.values()]}


def _share(t: torch.Tensor) -> float:
    """The share of non-zeros in ``t``."""
    return int(torch.count_nonzero(t)) / max(t.numel(), 1)


def _backward(out: Any, x: torch.Tensor, generator: torch.Generator) -> None:
    """Back-propagate random normal gradients of the model's outputs (tensors, or tensors in
    tuples, lists and dicts) to ``x`` alone, firing the layers' gradient hooks."""
    found = [t for t in _tensors(out) if t.requires_grad and t.is_floating_point()]
    if found:
        cotangents = [torch.randn(t.shape, generator=generator, dtype=t.dtype).to(t.device)
                      for t in found]
        torch.autograd.grad(found, x, cotangents, allow_unused=True)


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def _stats(values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {"mean": round(mean, 6), "std": round(std, 6), "min": round(min(values), 6),
            "max": round(max(values), 6)}


def _layer(entry: dict) -> dict[str, Any]:
    values = entry["densities"]
    found = {"name": entry["name"], "module": entry["module"], "calls": len(values),
             "batch": entry["batch"], "density": _stats(values)}
    if entry["grad_densities"]:
        found["grad_density"] = _stats(entry["grad_densities"])
    return {**found, "spec": entry["spec"].to_dict()}


def _batch(x: torch.Tensor, spec: LayerSpec) -> int:
    return x.shape[0] if x.dim() == spec.rank + 2 else 1   # unbatched: batch 1


def _shape(input_shape) -> tuple[int, ...]:
    """A shape from a sequence of ints or a string like ``"1,3,224,224"``."""
    try:
        parts = input_shape.split(",") if isinstance(input_shape, str) else list(input_shape)
        shape = tuple(int(p) if isinstance(p, str) else p for p in parts)
    except (TypeError, ValueError):
        shape = ()
    if not shape or not all(isinstance(n, int) and not isinstance(n, bool) and n > 0
                            for n in shape):
        raise ValueError(f"input shape must be positive ints, e.g. 1,3,224,224; "
                         f"got {input_shape!r}")
    return shape


def _version() -> str:
    from . import __version__
    return __version__


# ------------------------------------------------------------------------------ the file
def write_layers(data: dict[str, Any], path) -> Path:
    """Write a layers file (checked readable first), atomically; returns its path."""
    path = Path(path)
    parse_layers(data, "layers data")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(_dumps(data))
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return path


def _dumps(data: Any) -> str:
    """JSON with one line per layer: readable, and a diff shows which layers changed."""
    if not (isinstance(data, dict) and isinstance(data.get("layers"), list)):
        return json.dumps(data, indent=2) + "\n"
    head = [f"  {json.dumps(key)}: {json.dumps(value)}," for key, value in data.items()
            if key != "layers"]
    layers = ",\n".join(f"    {json.dumps(layer)}" for layer in data["layers"])
    return "{\n" + "\n".join(head) + f'\n  "layers": [\n{layers}\n  ]\n}}\n'


def read_layers(path) -> list[tuple[str, LayerSpec, Workload]]:
    """``(name, spec, workload)`` of each layer of a layers file (see the module docstring).
    Raises ValueError naming the file (and the layer) for anything malformed; OSError where
    the file cannot be read."""
    text = Path(path).read_text()
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{path} is not JSON: {exc}") from None
    return parse_layers(data, path)


def parse_layers(data: Any, source, named: bool = True
                 ) -> list[tuple[str, LayerSpec, Workload]]:
    """The layers of a layers file's JSON ``data`` (see :func:`read_layers`); ``source`` names
    it in errors. Without ``named``, the older object of layers by name is refused."""
    if isinstance(data, dict) and "format" in data and not isinstance(data["format"], dict):
        return _parse_trace(data, source)
    if named and isinstance(data, dict) and data:
        items = [(f"layer {name!r}", name, item) for name, item in data.items()]
    elif isinstance(data, list) and data:
        items = [(f"layer {i}", None, item) for i, item in enumerate(data)]
    else:
        raise ValueError(f"{source} must hold a non-empty JSON list of layers "
                         "(LayerSpec.to_dict() objects)" + (", an object of them by name"
                                                             if named else "")
                         + f" or a {FORMAT} file of zeroskip trace")
    layers = []
    for where, name, item in items:
        spec, workload = _spec(item, source, where)
        layers.append((spec.describe() if name is None else name, spec, workload))
    return layers


def _parse_trace(data: dict, source) -> list[tuple[str, LayerSpec, Workload]]:
    if data["format"] != FORMAT:
        raise ValueError(f"{source}: format {data['format']!r} is not {FORMAT!r}")
    if data.get("version") not in READS:
        raise ValueError(f"{source}: {FORMAT} version {data.get('version')!r} is not supported "
                         f"(this zeroskip reads versions {', '.join(map(str, READS))})")
    entries = data.get("layers")
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{source}: 'layers' must be a non-empty list")
    layers, seen = [], set()
    for i, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not (isinstance(name, str) and name):
            raise ValueError(f"{source}, layer {i}: expected an object with a non-empty "
                             "'name' and a 'spec'")
        if name in seen:
            raise ValueError(f"{source}, layer {name!r}: the name is used twice")
        seen.add(name)
        where = f"layer {name!r}"
        spec, workload = _spec(entry.get("spec"), source, where)
        if data["version"] >= 2:
            means = {key: entry[key].get("mean") if isinstance(entry.get(key), dict) else None
                     for key in ("density", "grad_density")}
            workload = _workload({"batch": entry.get("batch"), **means}, source, where, spec)
        layers.append((name, spec, workload))
    return layers


def _spec(item: Any, source, where: str) -> tuple[LayerSpec, Workload]:
    """A layer's spec and the workload its object may carry (``batch``, ``density``: the
    older files put them there)."""
    try:
        if not isinstance(item, dict):
            raise TypeError("not a LayerSpec.to_dict() object")
        item = dict(item)
        work = {key: item.pop(key) for key in ("batch", "density", "grad_density")
                if key in item}
        spec = LayerSpec.from_dict(item)
    except (ValueError, TypeError, RuntimeError) as exc:  # LayerSpec raises torch's types
        raise ValueError(f"{source}, {where}: {exc}") from None
    return spec, _workload(work, source, where, spec)


def _workload(fields: dict, source, where: str, spec: LayerSpec) -> Workload:
    try:
        return Workload(**{k: v for k, v in fields.items() if v is not None}).check(spec)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ValueError(f"{source}, {where}: {exc}") from None


__all__ = ["trace", "load_factory", "build_model", "read_layers", "write_layers",
           "parse_layers", "spec_of", "trace_specs", "TraceError", "CONV_TYPES"]
