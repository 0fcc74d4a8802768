"""What every op's public module (ops/<op>/api.py) sets up before its first call."""

from __future__ import annotations

import importlib

from .._backends import FLOAT_DTYPES, KERNEL_DTYPES
from ._eager import install


def op_backends(package: str, triton_dtypes: frozenset = FLOAT_DTYPES) -> tuple[dict, object]:
    """(IMPLEMENTED, the op's Triton module or None) for the op package `package`.

    IMPLEMENTED maps each backend the op has to the dtypes it takes: the reference every float
    dtype, the cuda backend the kernel dtypes, the triton backend `triton_dtypes` where Triton
    imports (where it does not, `_backends` says why a call asking for it cannot run). Importing
    the op's triton and cuda modules registers their custom ops; their eager calls then skip the
    dispatcher (ops/_eager.py)."""
    implemented = {"reference": FLOAT_DTYPES, "cuda": KERNEL_DTYPES}
    try:
        triton_module = importlib.import_module(".triton", package)
        implemented["triton"] = triton_dtypes
    except ImportError:  # triton missing: _backends reports why
        triton_module = None
    importlib.import_module(".cuda", package)
    install()
    return implemented, triton_module


__all__ = ["op_backends"]
