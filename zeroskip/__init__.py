"""zeroskip: a convolution compiler that skips the multiplications by zero.

Public API: :class:`LayerSpec` (a validated layer descriptor) and :func:`explain` (run the
compiler's passes on a spec and report the MACs skipped and the strategy chosen).
"""
from .explain import Report, explain
from .spec import LayerSpec

__version__ = "0.1.0"
__all__ = ["LayerSpec", "explain", "Report", "__version__"]
