"""Stride helpers shared by the CBAM kernels (channel_pool and cbam_gate).

The kernels address x[n, c, pixel] with explicit strides, so any layout is read in place. Pixel p
of an H x W plane is at p * s_w when the two spatial dims merge (s_h == W * s_w: contiguous,
channels_last, or every-other-element views), else at (p // W) * s_h + (p % W) * s_w.
"""

from __future__ import annotations

import torch
import triton.language as tl


def pixel_strides(x: torch.Tensor) -> tuple[int, int, bool]:
    """(s_h, s_w, merged) of a 4-d tensor or an (N, H, W) map."""
    h, w = x.shape[-2:]
    s_h, s_w = x.stride(-2), x.stride(-1)
    return s_h, s_w, h == 1 or s_h == w * s_w


def acc_dtype(dtype: torch.dtype):
    """Accumulate in fp32, or fp64 for fp64 inputs."""
    return tl.float64 if dtype == torch.float64 else tl.float32
