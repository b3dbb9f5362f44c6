"""Whether Triton kernels can run here: installed, on a GPU or under Triton's interpreter.

A bottom-floor module: the tuning fingerprints, bundles, the Triton launcher and the dispatch
all ask it, and it imports nothing of zeroskip but :mod:`.env`.
"""
from __future__ import annotations

import functools
import importlib.util
import sys

import torch

from . import env


class TritonUnavailable(RuntimeError):
    """Triton is not installed, or cannot run here (no GPU and no interpreter)."""


def available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _interpret_requested() -> bool:
    return env.get("TRITON_INTERPRET", "0") not in ("", "0")


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


def problem(device: torch.device | str) -> str | None:
    """Why Triton kernels cannot run on ``device`` here, or None if they can: the one answer
    the dispatch (which then runs torch's op) and the autotuner (which raises) both give."""
    device = torch.device(device)
    if not available():
        return "Triton is not installed (pip install triton), so CUDA tensors run torch's op"
    if device.type == "cpu":
        if interpreting():
            return None
        if _interpret_requested():
            return ("TRITON_INTERPRET=1 was set after Triton was imported, which is too late: "
                    "set it before the process imports triton")
        return ("ZEROSKIP_BACKEND=triton runs CPU tensors under Triton's interpreter: set "
                "TRITON_INTERPRET=1 too (before triton is imported)")
    if device.type != "cuda":
        return f"Triton kernels do not run on {device.type} tensors"
    if not torch.cuda.is_available():
        return (f"no CUDA GPU is visible to torch {torch.__version__} (torch.cuda."
                "is_available() is False)")
    if interpreting():
        return "Triton was imported with TRITON_INTERPRET=1, so it cannot run CUDA kernels"
    return None
