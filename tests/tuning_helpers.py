"""Tuning records as a real tuning files them: naming the kernels they timed."""
from __future__ import annotations

from zeroskip.codegen.variant import Variant
from zeroskip.runtime import loader


def named_kernels(spec, *names: str, backend: str = "c") -> dict[str, str]:
    """The identities a record of ``spec`` that timed ``names`` (and the layer's default
    kernel, which a real tuning always times) names them by."""
    default = loader.default_choice(spec, backend)
    return {n: loader.identity(spec, backend, Variant.parse(n))
            for n in {*names, default} - {"torch"}}
