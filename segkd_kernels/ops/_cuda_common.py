"""Glue between torch tensors and the raw-pointer launchers of segkd_kernels._cuda."""

from __future__ import annotations

import torch

from .._backends import cuda_library, host_executing

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/launchers.h DType


def cuda_lib(op: str):
    """The compiled module, or a clear error saying why the cuda backend cannot run."""
    lib, reason = cuda_library()
    if lib is None:
        raise RuntimeError(f"{op}: {reason}")
    return lib


def launch_args(op: str, x: torch.Tensor) -> dict:
    """dtype code, device index and current stream for a launch on x's device (CPU tensors,
    device 0 and stream 0 inside _backends.host_execution(), the testing hook)."""
    host = host_executing()
    if x.device.type != ("cpu" if host else "cuda"):
        if host:
            raise RuntimeError(f"{op}: host execution runs the cuda backend on CPU tensors, got one on {x.device}")
        raise RuntimeError(f"{op}: the cuda backend needs CUDA tensors, got a tensor on {x.device}")
    if x.dtype not in _DTYPE_CODES:
        raise RuntimeError(f"{op}: dtype {x.dtype} not supported by the cuda backend")
    if host:
        return {"dtype": _DTYPE_CODES[x.dtype], "device": 0, "stream": 0}
    return {
        "dtype": _DTYPE_CODES[x.dtype],
        "device": x.device.index,
        "stream": torch.cuda.current_stream(x.device).cuda_stream,
    }
