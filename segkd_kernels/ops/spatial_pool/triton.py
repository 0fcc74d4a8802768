"""spatial_pool in Triton: mean and max over H*W per (n, c) row, and its backward.

Forward: one program per row streams the row in blocks, keeping per-lane running sums, maxima and
the index of each lane's first maximum; the block is reduced once at the end. Backward: one program
per (row, block): dx = grad_avg / P everywhere plus grad_max at the saved argmax.
Accumulation is fp32 (fp64 for fp64 inputs).
"""

import torch
import triton
import triton.language as tl

from .._launch import Launch, PlanCache
from .._triton_common import FP_FUSION, acc_dtype, cdiv, next_power_of_2
from . import autograd


@triton.jit
def _spatial_pool_fwd_kernel(x_ptr, avg_ptr, max_ptr, argmax_ptr, plane,
                             BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    row_start = x_ptr + row * plane
    lanes = tl.arange(0, BLOCK)
    acc_sum = tl.zeros([BLOCK], dtype=ACC_DTYPE)
    acc_max = tl.full([BLOCK], float("-inf"), dtype=ACC_DTYPE)
    # `plane` marks "no element seen yet": the first valid element always replaces it, so rows
    # of -inf still get a valid argmax.
    acc_idx = tl.full([BLOCK], plane, dtype=tl.int64)
    for start in range(0, plane, BLOCK):
        offs = start + lanes
        valid = offs < plane
        v = tl.load(row_start + offs, mask=valid, other=0.0).to(ACC_DTYPE)
        acc_sum += v
        # Blocks advance in index order, so a strict > keeps each lane's first maximum. NaN wins
        # like torch.max: a NaN replaces a number, nothing replaces a NaN (the first NaN stays).
        take = valid & ((v > acc_max) | ((v != v) & (acc_max == acc_max)) | (acc_idx == plane))
        acc_max = tl.where(take, v, acc_max)
        acc_idx = tl.where(take, offs.to(tl.int64), acc_idx)
    # tl.max skips NaN (IEEE maxNum): NaN lanes are reduced on the side, the first one wins
    lane_nan = acc_max != acc_max
    any_nan = tl.max(lane_nan.to(tl.int32), axis=0) > 0
    finite_max = tl.max(tl.where(lane_nan, float("-inf"), acc_max), axis=0)
    row_max = tl.where(any_nan, float("nan"), finite_max)
    winner = tl.where(any_nan, lane_nan, acc_max == finite_max)
    row_argmax = tl.min(tl.where(winner, acc_idx, plane), axis=0)
    tl.store(avg_ptr + row, (tl.sum(acc_sum, axis=0) / plane).to(avg_ptr.dtype.element_ty))
    tl.store(max_ptr + row, row_max.to(max_ptr.dtype.element_ty))
    tl.store(argmax_ptr + row, row_argmax)


@triton.jit
def _spatial_pool_bwd_kernel(grad_avg_ptr, grad_max_ptr, argmax_ptr, dx_ptr, plane,
                             BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = offs < plane
    g_avg = tl.load(grad_avg_ptr + row).to(ACC_DTYPE) / plane
    g_max = tl.load(grad_max_ptr + row).to(ACC_DTYPE)
    idx = tl.load(argmax_ptr + row)
    dx = g_avg + tl.where(offs == idx, g_max, 0.0)
    tl.store(dx_ptr + row * plane + offs, dx.to(dx_ptr.dtype.element_ty), mask=valid)


# Launches keyed on what they depend on (N * C, H * W, dtypes; ops/_launch.PlanCache): a repeated call
# skips the block choice and launches through the compiled kernel it kept.
_FWD_PLANS = PlanCache()
_BWD_PLANS = PlanCache()


@torch.library.custom_op("segkd::spatial_pool_triton", mutates_args=())
def spatial_pool_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = x.contiguous()
    n, c, h, w = x.shape
    avg = x.new_empty(n, c)
    mx = x.new_empty(n, c)
    argmax = x.new_empty(n, c, dtype=torch.int64)
    key = (n * c, h * w, x.dtype)
    launch = _FWD_PLANS.get(key)
    if launch is None:
        launch = _FWD_PLANS.put(key, Launch(
            _spatial_pool_fwd_kernel, (n * c,), (h * w,),
            dict(BLOCK=min(next_power_of_2(h * w), 2048), ACC_DTYPE=acc_dtype(x.dtype), **FP_FUSION), fresh=3))
    if key[0] > 0:
        launch(x, avg, mx, argmax)
    return avg, mx, argmax


def _bwd_launch(rows: int, plane: int, dtype: torch.dtype) -> Launch:
    block = min(next_power_of_2(plane), 1024)
    return Launch(_spatial_pool_bwd_kernel, (rows, cdiv(plane, block)), (plane,),
                  dict(BLOCK=block, ACC_DTYPE=acc_dtype(dtype), **FP_FUSION), fresh=1)


@torch.library.custom_op("segkd::spatial_pool_backward_triton", mutates_args=())
def spatial_pool_backward_triton(grad_avg: torch.Tensor, grad_max: torch.Tensor, argmax: torch.Tensor,
                                 h: int, w: int) -> torch.Tensor:
    n, c = grad_avg.shape
    dx = grad_avg.new_empty(n, c, h, w)
    key = (n * c, h * w, grad_avg.dtype, grad_max.dtype)
    launch = _BWD_PLANS.get(key)
    if launch is None:
        launch = _BWD_PLANS.put(key, _bwd_launch(n * c, h * w, dx.dtype))
    if key[0] > 0 and key[1] > 0:
        launch(grad_avg.contiguous(), grad_max.contiguous(), argmax.contiguous(), dx)
    return dx


autograd.register(spatial_pool_triton, spatial_pool_backward_triton)
