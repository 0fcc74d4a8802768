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
    # is_cpu / is_cuda / get_device(): plain flags, where x.device builds an object per call
    if not (x.is_cpu if host else x.is_cuda):
        if host:
            raise RuntimeError(f"{op}: host execution runs the cuda backend on CPU tensors, got one on {x.device}")
        raise RuntimeError(f"{op}: the cuda backend needs CUDA tensors, got a tensor on {x.device}")
    code = _DTYPE_CODES.get(x.dtype)
    if code is None:
        raise RuntimeError(f"{op}: dtype {x.dtype} not supported by the cuda backend")
    if host:
        return {"dtype": code, "device": 0, "stream": 0}
    device = x.get_device()
    # the current stream's handle, as torch.cuda.current_stream(device).cuda_stream returns it,
    # without building a Stream object per launch (Triton asks torch the same way)
    return {"dtype": code, "device": device, "stream": _current_raw_stream(device)}


def _current_raw_stream(device: int) -> int:
    getter = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if getter is None:  # older torch builds
        return torch.cuda.current_stream(device).cuda_stream
    return getter(device)
