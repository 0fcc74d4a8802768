"""Which backends exist, which can run, and the one place that picks a backend for a call.

Backends:
  reference  readable pure PyTorch, any device, every dtype (the oracle)
  triton     fused Triton kernels: CUDA tensors, or CPU tensors under the Triton interpreter
             (TRITON_INTERPRET=1 set before segkd_kernels is imported)
  cuda       hand-written kernels in the compiled module segkd_kernels._cuda: CUDA tensors only
             (tests run the same kernels on CPU tensors inside host_execution(), through their
             host build segkd_kernels._cuda_host; nothing else ever selects that build)

Rules (docs/api.md): "auto" picks the fastest backend that supports the inputs; SEGKD_BACKEND overrides
"auto"; an explicitly named backend never falls back silently, it raises saying why.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

BACKENDS = ("reference", "triton", "cuda")
FLOAT_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64})
KERNEL_DTYPES = frozenset({torch.float16, torch.bfloat16, torch.float32})

# Triton decides at decoration time (when segkd_kernels is imported) whether kernels are
# interpreted, so the setting that counts is the one seen at import.
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Order in which "auto" tries the fused backends for CUDA tensors, per op. Ops not listed try
# triton, then cuda. The benchmarks (benchmarks/results/) decide these entries per device class.
AUTO_ORDER_CUDA: dict[str, tuple[str, ...]] = {}
DEFAULT_AUTO_ORDER_CUDA = ("triton", "cuda")


class BackendUnavailableError(RuntimeError, ValueError):
    """A named backend cannot run these inputs (missing, not built, wrong device or dtype)."""


class BackendReport(dict):
    """{"reference": True, "triton": bool, "cuda": bool}; `.reasons` says why for each."""

    def __init__(self, available: Mapping[str, bool], reasons: Mapping[str, str]):
        super().__init__(available)
        self.reasons = dict(reasons)

    def __repr__(self) -> str:
        rows = [f"{name}: {'yes' if self[name] else 'no'} ({self.reasons[name]})" for name in self]
        return "BackendReport(\n  " + "\n  ".join(rows) + "\n)"


def _probe_triton() -> tuple[bool, str]:
    try:
        import triton
    except Exception as err:  # ImportError, or a broken install raising something else
        return False, f"triton not installed ({type(err).__name__}: {err})"
    return True, f"triton {triton.__version__}"


def _probe_cuda_library():
    try:
        module = importlib.import_module("segkd_kernels._cuda")
    except ImportError as err:
        # setup.py leaves a note when it did not build the library (pip hides its warnings)
        note = Path(__file__).with_name("_cuda_build_status.txt")
        why = note.read_text().strip() if note.exists() else f"segkd_kernels._cuda: {err}"
        return None, (
            f"CUDA library not built ({why}); "
            "reinstall with nvcc and cmake present, SEGKD_CUDA=1 to see build errors"
        )
    return module, "segkd_kernels._cuda built"


# Probed once at import (plain values, so torch.compile traces the checks without caches).
_TRITON_STATUS = _probe_triton()
_CUDA_LIBRARY = _probe_cuda_library()


def triton_installed() -> tuple[bool, str]:
    """(installed, version or reason)."""
    return _TRITON_STATUS


# Set only inside host_execution(): the CPU build of the CUDA kernels that backend="cuda" runs.
_HOST_LIBRARY = None


def cuda_library():
    """(segkd_kernels._cuda or None, reason); the host build inside host_execution()."""
    if _HOST_LIBRARY is not None:
        return _HOST_LIBRARY, "segkd_kernels._cuda_host (host execution, testing only)"
    return _CUDA_LIBRARY


def host_library():
    """(segkd_kernels._cuda_host or None, reason): the csrc/ kernels compiled by g++ against the
    host execution layer (csrc/host/), built by the normal install where cmake and g++ exist."""
    try:
        return importlib.import_module("segkd_kernels._cuda_host"), "segkd_kernels._cuda_host built"
    except ImportError as err:
        note = Path(__file__).with_name("_cuda_host_build_status.txt")
        why = note.read_text().strip() if note.exists() else str(err)
        return None, f"host build of the CUDA kernels not available ({why})"


def host_executing() -> bool:
    """True inside host_execution(): the cuda backend runs on CPU tensors."""
    return _HOST_LIBRARY is not None


@contextlib.contextmanager
def host_execution(library=None) -> Iterator[object]:
    """TESTING ONLY. Inside the block, backend="cuda" runs the unchanged CUDA kernels of csrc/ on
    CPU tensors through segkd_kernels._cuda_host (or `library`, an object with the same functions):
    the cuda glue accepts CPU tensors, with device 0 and stream 0. Outside it nothing changes:
    backend="cuda" on CPU tensors raises BackendUnavailableError. Not thread-safe, not nestable
    with a different library. Yields the library (its host_* functions steer the layer: seed,
    device attributes such as the SM count, shared-memory poisoning)."""
    global _HOST_LIBRARY
    if library is None:
        library, reason = host_library()
        if library is None:
            raise BackendUnavailableError(reason)
    previous = _HOST_LIBRARY
    _HOST_LIBRARY = library
    try:
        yield library
    finally:
        _HOST_LIBRARY = previous


def available_backends() -> BackendReport:
    """Which backends can run on this machine, and why not where they cannot."""
    has_gpu = torch.cuda.is_available()
    triton_ok, triton_reason = triton_installed()
    if triton_ok and not has_gpu:
        if TRITON_INTERPRET:
            triton_reason += ", interpreter on CPU (TRITON_INTERPRET=1)"
        else:
            triton_ok = False
            triton_reason += (
                " installed, but no CUDA device (set TRITON_INTERPRET=1 before importing "
                "segkd_kernels to run the kernels on CPU through the interpreter)"
            )
    lib, cuda_reason = cuda_library()
    cuda_ok = lib is not None and has_gpu
    if lib is not None and not has_gpu:
        cuda_reason += ", but no CUDA device is visible"
    return BackendReport(
        {"reference": True, "triton": triton_ok, "cuda": cuda_ok},
        {"reference": "pure PyTorch, any device", "triton": triton_reason, "cuda": cuda_reason},
    )


def why_not(op: str, backend: str, implemented: Mapping[str, frozenset], tensor: torch.Tensor) -> str | None:
    """None if `backend` can run `op` on tensors like `tensor`, else the reason it cannot."""
    if backend not in implemented:
        names = ", ".join(sorted(implemented))
        return f"{op} has no {backend} backend (implemented: {names})"
    if tensor.dtype not in implemented[backend]:
        return f"dtype {tensor.dtype} not supported by the {backend} backend of {op}"
    on_cuda = tensor.is_cuda  # (not tensor.device.type: that builds a device object per call)
    if backend == "triton":
        installed, reason = triton_installed()
        if not installed:
            return reason
        if not on_cuda and not TRITON_INTERPRET:
            return (
                f"tensor on {tensor.device.type}: the triton backend needs CUDA tensors, or "
                "TRITON_INTERPRET=1 set before importing segkd_kernels"
            )
        if on_cuda and TRITON_INTERPRET:
            return "TRITON_INTERPRET=1 is set: the Triton interpreter runs on CPU tensors only"
    if backend == "cuda":
        lib, reason = cuda_library()
        if lib is None:
            return reason
        if host_executing():
            if not tensor.is_cpu:
                return "host_execution() runs the cuda backend on CPU tensors only"
        elif not on_cuda:
            return f"tensor on {tensor.device.type}: the cuda backend needs CUDA tensors"
    return None


def select_backend(op: str, backend: str, implemented: Mapping[str, frozenset], tensor: torch.Tensor) -> str:
    """The single decision point: the backend that will run `op` for inputs like `tensor`."""
    if backend not in ("auto", *BACKENDS):
        raise ValueError(f"backend: expected one of auto, {', '.join(BACKENDS)}; got {backend!r}")
    source = "backend"
    if backend == "auto":
        override = os.environ.get("SEGKD_BACKEND", "").strip().lower()
        if override and override != "auto":
            if override not in BACKENDS:
                raise ValueError(f"SEGKD_BACKEND: expected one of auto, {', '.join(BACKENDS)}; got {override!r}")
            backend, source = override, "SEGKD_BACKEND"
    if backend != "auto":
        reason = why_not(op, backend, implemented, tensor)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: {source}={backend!r} cannot run: {reason}")
        return backend
    if tensor.is_cuda:
        candidates = AUTO_ORDER_CUDA.get(op, DEFAULT_AUTO_ORDER_CUDA)
    else:
        candidates = ("triton",) if TRITON_INTERPRET else ()
    for name in candidates:
        if why_not(op, name, implemented, tensor) is None:
            return name
    return "reference"
