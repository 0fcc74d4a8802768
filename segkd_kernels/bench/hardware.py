"""The hardware floor: measured copy bandwidth and the device's published peak FLOP rates."""

from __future__ import annotations

import torch

# Dense (no sparsity) peak TFLOP/s from the vendors' data sheets, matched by substring of
# torch.cuda.get_device_name(). "fp32": CUDA-core FP32 (our kernels do not use TF32: the pairwise
# losses cancel, docs/backends.md); "tensor16": fp16/bf16 tensor cores. First match wins, so the
# more specific names come first.
PEAK_TFLOPS = [
    ("H100 PCIe", {"fp32": 51.2, "tensor16": 756.0}),
    ("H100 NVL", {"fp32": 60.0, "tensor16": 835.0}),
    ("H100", {"fp32": 66.9, "tensor16": 989.4}),     # SXM5
    ("H200", {"fp32": 66.9, "tensor16": 989.4}),
    ("H800", {"fp32": 66.9, "tensor16": 989.4}),
    ("A100", {"fp32": 19.5, "tensor16": 312.0}),
    ("L40S", {"fp32": 91.6, "tensor16": 362.0}),
]


def peak_flops(device_name: str, kind: str) -> float | None:
    """Peak FLOP/s of `kind` ("fp32" or "tensor16") for this device, None when not in the table."""
    for pattern, peaks in PEAK_TFLOPS:
        if pattern in device_name:
            return peaks[kind] * 1e12
    return None


def copy_bandwidth(device: str, timer, *, nbytes: int = 1 << 30) -> float:
    """Bytes per second of a device-to-device copy (read + write counted), timed by `timer`.

    This is the practical memory-bound ceiling that the `roofline_frac` of memory-bound ops uses:
    a fused loss can at best stream its inputs and outputs at this rate."""
    numel = nbytes // 4
    src = torch.empty(numel, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = timer(lambda: dst.copy_(src))[0]
    return 2 * numel * 4 / (ms * 1e-3)
