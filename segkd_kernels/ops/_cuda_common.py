"""Glue between torch tensors and the raw-pointer launchers of segkd_kernels._cuda."""

from __future__ import annotations

import torch

from .._backends import cuda_library

_DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # csrc/launchers.h DType


def cuda_lib(op: str):
    """The compiled module, or a clear error saying why the cuda backend cannot run."""
    lib, reason = cuda_library()
    if lib is None:
        raise RuntimeError(f"{op}: {reason}")
    return lib


def launch_args(op: str, x: torch.Tensor) -> dict:
    """dtype code, device index and current stream for a launch on x's device."""
    if x.device.type != "cuda":
        raise RuntimeError(f"{op}: the cuda backend needs CUDA tensors, got a tensor on {x.device}")
    if x.dtype not in _DTYPE_CODES:
        raise RuntimeError(f"{op}: dtype {x.dtype} not supported by the cuda backend")
    return {
        "dtype": _DTYPE_CODES[x.dtype],
        "device": x.device.index,
        "stream": torch.cuda.current_stream(x.device).cuda_stream,
    }
