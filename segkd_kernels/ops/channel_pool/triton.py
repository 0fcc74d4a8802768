"""channel_pool in Triton: [max over C, mean over C] of x * gate per pixel, and its backward.

x * gate is never materialised: the gate is applied to each tile as it is loaded.

Forward: one program per (n, block of pixels) walks the channels in [BLOCK_C, BLOCK_P] tiles and
keeps, per (channel lane, pixel), a running max, the index of the first maximal channel and a
running sum: the loop is elementwise (no reduction across warps per tile), and one reduction
over the channel lanes at the end gives the max, the argmax (int32, saved for the backward) and
the mean. Pixels are the fast axis of a tile, so NCHW reads are coalesced along W (16-pixel
blocks: 4096 programs at the benchmark shapes); for channels_last inputs the launcher picks wide
channel tiles instead (C is the contiguous axis then).
Backward: one program per (n, block of pixels, slice of channels) writes dx = gate * (grad_max *
[c == argmax] + grad_mean / C) and the partial sums over its pixels of x * (that same bracket),
i.e. per-(n, pixel-block) partial dgate rows (summed along the pixels inside a warp); one torch
sum over the pixel blocks finishes dgate, deterministically (no atomics). The backward reads x
again because dgate needs it: 3 passes of x in all, the inherent floor (docs/performance.md).
Strides are passed explicitly (H and W separately unless they merge), so non-contiguous and
channels_last inputs are read in place. Accumulation is fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._launch import PlanCache
from .._triton_common import FP_FUSION, acc_dtype, acc_torch_dtype, cdiv, next_power_of_2, pixel_strides


@triton.jit
def _pixel_offsets(p, W, s_h, s_w, MERGED: tl.constexpr):
    # MERGED: s_h == W * s_w, so pixel p sits at p * s_w (no division on the hot path)
    if MERGED:
        return p * s_w
    else:
        return (p // W) * s_h + (p % W) * s_w


@triton.jit
def _argmax_combine(v1, i1, v2, i2):
    """(value, channel) pairs -> the one torch.max picks: any NaN over numbers (the first NaN
    channel), else the larger value, ties to the smaller channel; channel -1 (nothing seen) loses."""
    nan1 = v1 != v1
    nan2 = v2 != v2
    better = (nan1 & ~nan2) | ((nan1 == nan2) & ((v1 > v2) | (((v1 == v2) | nan1) & (i1 < i2))))
    first = (i1 >= 0) & ((i2 < 0) | better)
    return tl.where(first, v1, v2), tl.where(first, i1, i2)


@triton.jit
def _channel_pool_fwd_kernel(x_ptr, gate_ptr, out_ptr, argmax_ptr,
                             C, P, W,
                             sx_n, sx_c, sx_h, sx_w, sg_n, sg_c,
                             HAS_GATE: tl.constexpr, X_MERGED: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC_DTYPE: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    p_ok = p < P
    x_pix = x_ptr + n * sx_n + _pixel_offsets(p, W, sx_h, sx_w, X_MERGED)
    # running max / first argmax / sum per (channel lane, pixel): the loop is elementwise, and the
    # lanes are reduced over channels once after it
    run_max = tl.full([BLOCK_C, BLOCK_P], float("-inf"), dtype=ACC_DTYPE)
    run_idx = tl.full([BLOCK_C, BLOCK_P], -1, dtype=tl.int32)  # -1: no channel seen yet
    run_sum = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC_DTYPE)
    lanes_c = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + lanes_c
        c_ok = c < C
        ok = c_ok[:, None] & p_ok[None, :]
        v = tl.load(x_pix[None, :] + c.to(tl.int64)[:, None] * sx_c, mask=ok, other=0.0).to(ACC_DTYPE)
        if HAS_GATE:
            g = tl.load(gate_ptr + n * sg_n + c.to(tl.int64) * sg_c, mask=c_ok, other=0.0).to(ACC_DTYPE)
            v = v * g[:, None]
        run_sum += tl.where(ok, v, 0.0)
        # a lane sees its channels in increasing order: strict > keeps the earlier channel on ties,
        # a NaN replaces a number (torch.max propagates NaN, the first NaN channel its index) but
        # never an earlier NaN; masked lanes are never taken
        take = ok & ((v > run_max) | ((v != v) & (run_max == run_max)) | (run_idx < 0))
        run_max = tl.where(take, v, run_max)
        run_idx = tl.where(take, c[:, None], run_idx)
    best, best_idx = tl.reduce((run_max, run_idx), 0, _argmax_combine)
    out_row = out_ptr + n * 2 * P + p
    tl.store(out_row, best.to(out_ptr.dtype.element_ty), mask=p_ok)
    tl.store(out_row + P, (tl.sum(run_sum, axis=0) / C).to(out_ptr.dtype.element_ty), mask=p_ok)
    tl.store(argmax_ptr + n * P + p, best_idx, mask=p_ok)


@triton.jit
def _channel_pool_bwd_kernel(grad_ptr, x_ptr, gate_ptr, argmax_ptr, dx_ptr, dgate_part_ptr,
                             C, P, W, n_pblocks, c_per,
                             sx_n, sx_c, sx_h, sx_w, sd_n, sd_c, sd_h, sd_w, sg_n, sg_c,
                             HAS_GATE: tl.constexpr, X_MERGED: tl.constexpr, D_MERGED: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC_DTYPE: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1).to(tl.int64)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    p_ok = p < P
    # the per-pixel operands loaded straight into [BLOCK_C, BLOCK_P] tiles (each row the same
    # pixels: L1 hits), before the loop, so that they have the x tile's layout and the loop body
    # needs no layout change through shared memory
    p2 = p[None, :]
    p_ok2 = p_ok[None, :]
    rows = tl.zeros([BLOCK_C, 1], dtype=tl.int64)
    tile_ok = p_ok2 & (rows == 0)
    g_max = tl.load(grad_ptr + n * 2 * P + p2 + rows, mask=tile_ok, other=0.0).to(ACC_DTYPE)
    g_mean = tl.load(grad_ptr + n * 2 * P + P + p2 + rows, mask=tile_ok, other=0.0).to(ACC_DTYPE) / C
    idx = tl.load(argmax_ptr + n * P + p2 + rows, mask=tile_ok, other=-1)
    x_pix = x_ptr + n * sx_n + _pixel_offsets(p2, W, sx_h, sx_w, X_MERGED)
    d_pix = dx_ptr + n * sd_n + _pixel_offsets(p2, W, sd_h, sd_w, D_MERGED)
    # this program's slice of channels (several slices per pixel block: enough programs)
    c_lo = tl.program_id(2) * c_per
    c_hi = tl.minimum(c_lo + c_per, C)
    lanes_c = tl.arange(0, BLOCK_C)[:, None]
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c0 + lanes_c
        c_ok = c < c_hi
        c64 = c.to(tl.int64)
        ok = c_ok & p_ok2
        # d loss / d (x * gate) at (c, p)
        d_gated = g_mean + tl.where(c == idx, g_max, 0.0)
        if HAS_GATE:
            g = tl.load(gate_ptr + n * sg_n + c64 * sg_c, mask=c_ok, other=0.0).to(ACC_DTYPE)
            dx = d_gated * g
            v = tl.load(x_pix + c64 * sx_c, mask=ok, other=0.0).to(ACC_DTYPE)
            # summed along the pixels (inside a warp), kept [BLOCK_C, 1]
            part = tl.sum(tl.where(ok, v * d_gated, 0.0), axis=1, keep_dims=True)
            tl.store(dgate_part_ptr + (n * n_pblocks + pb) * C + c64, part, mask=c_ok)
        else:
            dx = d_gated
        tl.store(d_pix + c64 * sd_c, dx.to(dx_ptr.dtype.element_ty), mask=ok)


def _blocks(x: torch.Tensor, p: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P): pixels wide when W is the contiguous axis, channels wide when C is.

    Tiles hold ~1024 elements (8 per thread at 4 warps). Pixel blocks stay at 128 for NCHW so that
    N * H*W / BLOCK_P programs fill a GPU even for small maps; the C loop runs in registers.
    Not tuned on hardware yet (benchmarks/ decides)."""
    c = x.shape[1]
    if x.stride(1) == 1 and c > 1:  # channels_last: coalesce along C
        block_c = min(next_power_of_2(c), 64)
        return block_c, min(next_power_of_2(p), max(16, 1024 // block_c))
    block_c = min(next_power_of_2(c), 8)
    return block_c, min(next_power_of_2(p), max(128, 1024 // block_c))


# Forward tiles of NCHW inputs: 16 pixels (64 B fp32, one 32 B sector bf16: still whole sectors) by
# up to 64 channels, so that N * H*W / 16 programs give the GPU about 2 waves at 8 x C x 64 x 128
# (4096 programs); the channel loop is elementwise, so narrow pixel blocks cost no reduction.
_FWD_BLOCK_P = 16
_FWD_TILE = 1024
# The backward aims for 2 waves of 16 four-warp programs per SM on 132 SMs, through channel slices.
_BWD_TARGET_PROGRAMS = 4224


def _fwd_blocks(x: torch.Tensor, p: int) -> tuple[int, int]:
    """(BLOCK_C, BLOCK_P) of the forward: channels_last as _blocks, NCHW narrow pixel blocks."""
    c = x.shape[1]
    if x.stride(1) == 1 and c > 1:
        return _blocks(x, p)
    block_p = min(next_power_of_2(p), _FWD_BLOCK_P)
    return min(next_power_of_2(c), _FWD_TILE // block_p), block_p


def channel_slices(c: int, block_c: int, base_programs: int, target: int = _BWD_TARGET_PROGRAMS) -> tuple[int, int]:
    """(channels per slice, slices): whole tiles per slice, enough slices for `target` programs."""
    tiles = cdiv(c, block_c)
    slices = max(1, min(tiles, target // max(1, base_programs)))
    c_per = cdiv(tiles, slices) * block_c
    return c_per, cdiv(c, c_per)


def _gate_strides(gate: torch.Tensor | None) -> tuple[int, int]:
    return (gate.stride(0), gate.stride(1)) if gate is not None else (0, 0)


# Launch plans (ops/_launch.PlanCache) keyed on what they depend on (shapes, strides, dtype, whether
# there is a gate).
_PLANS = PlanCache()
_cached = _PLANS.get_or_make


def _fwd_plan(x: torch.Tensor, gate: torch.Tensor | None):
    """(grid, int arguments after the 4 tensors, constexprs), or None for an empty x."""
    n, c, h, w = x.shape
    p = h * w
    if n * c * p == 0:
        return None
    block_c, block_p = _fwd_blocks(x, p)
    sx_h, sx_w, x_merged = pixel_strides(x)
    return ((n, cdiv(p, block_p)), (c, p, w, x.stride(0), x.stride(1), sx_h, sx_w, *_gate_strides(gate)),
            dict(HAS_GATE=gate is not None, X_MERGED=x_merged, BLOCK_C=block_c, BLOCK_P=block_p,
                 ACC_DTYPE=acc_dtype(x.dtype), **FP_FUSION))


@torch.library.custom_op("segkd::channel_pool_triton", mutates_args=())
def channel_pool_triton(x: torch.Tensor, gate: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (N, 2, H, W) in x's dtype, argmax (N, H, W) int32: first maximal channel per pixel).
    gate: (N, C) or None."""
    n, _, h, w = x.shape
    out = x.new_empty(n, 2, h, w)
    argmax = x.new_empty(n, h, w, dtype=torch.int32)
    key = ("fwd", x.shape, x.stride(), None if gate is None else gate.stride(), x.dtype, _FWD_BLOCK_P, _FWD_TILE)
    plan = _cached(key, lambda: _fwd_plan(x, gate))
    if plan is not None:
        grid, args, consts = plan
        _channel_pool_fwd_kernel[grid](x, gate if gate is not None else x, out, argmax, *args, **consts)
    return out, argmax


def _bwd_plan(x: torch.Tensor, gate: torch.Tensor | None, dx: torch.Tensor):
    """(dgate partials' shape or None, launch grid, int arguments after the 6 tensors, constexprs; the
    last three None for an empty x)."""
    n, c, h, w = x.shape
    p = h * w
    block_c, block_p = _blocks(x, p)
    n_pblocks = cdiv(p, block_p)
    c_per, slices = channel_slices(c, block_c, n * n_pblocks)
    part_shape = (n, n_pblocks, c) if gate is not None else None
    if n * c * p == 0:
        return part_shape, None, None, None
    sx_h, sx_w, x_merged = pixel_strides(x)
    sd_h, sd_w, d_merged = pixel_strides(dx)
    return (part_shape, (n, n_pblocks, slices),
            (c, p, w, n_pblocks, c_per, x.stride(0), x.stride(1), sx_h, sx_w, dx.stride(0), dx.stride(1), sd_h, sd_w,
             *_gate_strides(gate)),
            dict(HAS_GATE=gate is not None, X_MERGED=x_merged, D_MERGED=d_merged,
                 BLOCK_C=block_c, BLOCK_P=block_p, ACC_DTYPE=acc_dtype(x.dtype), **FP_FUSION))


@torch.library.custom_op("segkd::channel_pool_backward_triton", mutates_args=())
def channel_pool_backward_triton(grad: torch.Tensor, x: torch.Tensor, gate: torch.Tensor | None,
                                 argmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx like x, dgate (N, C) in the gate's dtype; an empty tensor when gate is None)."""
    grad, argmax = grad.contiguous(), argmax.contiguous()
    dx = torch.empty_like(x)  # its strides follow from x's: part of the plan's key through x
    key = ("bwd", x.shape, x.stride(), None if gate is None else gate.stride(), x.dtype)
    part_shape, grid, args, consts = _cached(key, lambda: _bwd_plan(x, gate, dx))
    if part_shape is not None:
        dgate_part = torch.empty(part_shape, dtype=acc_torch_dtype(x.dtype), device=x.device)
    else:
        dgate_part = x.new_empty(0, dtype=torch.float32)
    if grid is not None:
        _channel_pool_bwd_kernel[grid](grad, x, gate if gate is not None else x, argmax, dx, dgate_part,
                                       *args, **consts)
    if gate is None:
        return dx, x.new_empty(0)
    return dx, dgate_part.sum(dim=1).to(gate.dtype)


@channel_pool_triton.register_fake
def _(x, gate):
    n, _, h, w = x.shape
    return x.new_empty(n, 2, h, w), x.new_empty(n, h, w, dtype=torch.int32)


@channel_pool_backward_triton.register_fake
def _(grad, x, gate, argmax):
    dgate = x.new_empty(0) if gate is None else gate.new_empty(x.shape[0], x.shape[1])
    return torch.empty_like(x), dgate


def _setup_context(ctx, inputs, output):
    x, gate = inputs
    ctx.save_for_backward(x, gate, output[1])
    ctx.has_gate = gate is not None


def _backward(ctx, grad_out, _grad_argmax):
    x, gate, argmax = ctx.saved_tensors
    if grad_out is None:
        grad_out = x.new_zeros(x.shape[0], 2, *x.shape[2:])
    dx, dgate = channel_pool_backward_triton(grad_out.to(x.dtype), x, gate if ctx.has_gate else None, argmax)
    return dx, (dgate if ctx.has_gate else None)


channel_pool_triton.register_autograd(_backward, setup_context=_setup_context)
