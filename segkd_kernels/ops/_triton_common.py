"""Helpers shared by the Triton backends: accumulator dtypes and how kernels address pixels.

Kernels address x[n, c, pixel] with explicit strides, so any layout is read in place. Pixel p of an
H x W plane is at p * s_w when the two spatial dims merge (s_h == W * s_w: contiguous,
channels_last, or every-other-element views), else at (p // W) * s_h + (p % W) * s_w.
"""

from __future__ import annotations

import math
import struct

import torch
import triton.language as tl


def acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulate in fp32, or fp64 for fp64 inputs (docs/losses.md), as a torch dtype for buffers."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def acc_dtype(dtype: torch.dtype):
    """The same rule as a Triton dtype, for the kernels' ACC constexpr."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def pixel_strides(x: torch.Tensor) -> tuple[int, int, bool]:
    """(s_h, s_w, merged) of a 4-d tensor or an (N, H, W) map."""
    h, w = x.shape[-2:]
    s_h, s_w = x.stride(-2), x.stride(-1)
    return s_h, s_w, h == 1 or s_h == w * s_w


def flat_pixel_strides(x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(x, (stride_n, stride_c, stride_p)) of an (N, C, H, W) tensor, where pixel p = h*W + w is at
    p * stride_p (NCHW: 1, channels_last: C); x is made contiguous only when H and W do not flatten
    to one strided axis."""
    _, _, h, w = x.shape
    if h == 1:
        return x, (x.stride(0), x.stride(1), x.stride(3))
    if w == 1 or x.stride(2) == w * x.stride(3):
        return x, (x.stride(0), x.stride(1), x.stride(2) if w == 1 else x.stride(3))
    x = x.contiguous()
    return x, (x.stride(0), x.stride(1), 1)


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) of host ints. The wrappers size grids and blocks with these plain functions rather
    than `triton.cdiv` / `triton.next_power_of_2`, which are ConstexprFunctions whose every host call
    unwraps its arguments generically (about a torch op's dispatch each); the values are the same."""
    return (a + b - 1) // b


def next_power_of_2(n: int) -> int:
    """The smallest power of 2 >= n, as `triton.next_power_of_2` returns for host ints (0 for n <= 0)."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()


# Every launch passes **FP_FUSION. Triton 3.9 fuses a*b+c into one FMA unless told otherwise, and
# Triton 3.10 turns that default off, which would round each product separately and change results
# (and instruction counts) between Triton versions; pinned here so every version compiles the same
# arithmetic. The interpreter ignores launch options.
FP_FUSION = {"enable_fp_fusion": True}


def fp32_nearest(value: float) -> float:
    """value rounded to the nearest fp32 (to +-inf past its range), without a tensor: plain host
    arithmetic, so no launch argument ever costs a tensor round trip."""
    try:
        return struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:
        return math.copysign(math.inf, value)


def fp32_split(value: float) -> tuple[float, float]:
    """value as hi + lo, both exactly representable in fp32 (Triton passes float arguments as fp32)."""
    hi = fp32_nearest(value)
    return hi, fp32_nearest(value - hi)


# The machine a persistent grid is sized for when the tensors are not on a GPU (the interpreter on
# CPU, the static report's captures): an H100/H200, 132 SMs and 50 MiB of L2.
_DEFAULT_SMS = 132
_DEFAULT_L2 = 50 * 2**20


def device_sms_l2(device: torch.device) -> tuple[int, int]:
    """(streaming multiprocessors, L2 bytes) of a CUDA device; an H100's for any other device."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return props.multi_processor_count, int(getattr(props, "L2_cache_size", _DEFAULT_L2) or _DEFAULT_L2)
    return _DEFAULT_SMS, _DEFAULT_L2
