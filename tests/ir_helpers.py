"""assert_ir: compare a graph with the graph a test states in the IR's text form."""
from __future__ import annotations

import difflib

from zeroskip.codegen.ir import verify
from zeroskip.codegen.text import from_text, to_text


def assert_ir(actual, expected: str) -> None:
    """Fail with a unified diff unless ``actual`` prints as the graph ``expected`` states.

    ``expected`` is parsed and verified first, so it may be indented, carry comments and name
    its Contracts freely; both sides are then compared in :func:`to_text`'s canonical form.
    """
    want = to_text(verify(from_text(expected)))
    got = to_text(actual)
    if got != want:
        diff = difflib.unified_diff(want.splitlines(), got.splitlines(), "expected", "actual",
                                    lineterm="")
        raise AssertionError("the graph differs from the expected text:\n" + "\n".join(diff))
