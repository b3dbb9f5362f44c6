"""zeroskip: a convolution compiler that skips the multiplications by zero.

Public API: :class:`LayerSpec` (a validated layer descriptor: the layer's shape),
:class:`Workload` (what it runs on: batch and input density), :func:`explain` (the compiler's
passes on a spec: MACs skipped and strategy chosen), ``zeroskip.functional`` and ``zeroskip.nn``
(drop-ins for torch's convolutions on generated kernels), :func:`convert` (swap a model's
convolution modules), :func:`freeze` (keep a served model's packed weights without proving them
each call), :func:`autotune` (time every way to run each new layer shape in the loop and keep
the fastest, as ``torch.backends.cudnn.benchmark`` does), :func:`stats` (what ran), :func:`load_bundle` (serve kernels compiled
ahead of time by ``zeroskip generate``, with no compiler) and :func:`wait_for_kernels` (until
the kernels building in the background are built). The torch-facing parts load on first use, so
the compiler itself imports without torch.
"""
from .explain import Report, explain
from .spec import LayerSpec, Workload

__version__ = "0.1.0"
__all__ = ["LayerSpec", "Workload", "explain", "Report", "functional", "nn", "convert", "freeze",
           "unfreeze", "autotune", "stats", "load_bundle", "wait_for_kernels", "__version__"]


def __getattr__(name: str):
    import importlib
    if name in ("functional", "nn"):
        return importlib.import_module(f".{name}", __name__)
    if name == "convert":
        return importlib.import_module(".conversion", __name__).convert
    if name in ("freeze", "unfreeze"):
        return getattr(importlib.import_module(".freezing", __name__), name)
    if name == "load_bundle":
        return importlib.import_module(".runtime.bundle", __name__).load_bundle
    if name == "autotune":
        return importlib.import_module(".runtime.online", __name__).set_mode
    if name == "stats":
        return importlib.import_module(".runtime.stats", __name__).stats
    if name == "wait_for_kernels":
        return importlib.import_module(".runtime.loader", __name__).wait_ahead
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
