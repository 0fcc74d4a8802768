"""cbam_gate in Triton: out = M_s * (M_c * x) in one pass, and its backward in one pass.

Forward: where the pixels of every (n, c) plane are contiguous (NCHW, or any layout whose H, W
merge with unit stride) a flat elementwise kernel, one program per (plane, block of pixels): the
plane's M_c is one scalar, M_s one vector load, no division per element, and N*C*H*W / BLOCK
programs (16,384 at 8 x 256 x 64 x 128). Other layouts (channels_last) use the tiled kernel that
walks the channels in [BLOCK_C, BLOCK_P] tiles with channels on the fast axis.
Backward, with g the incoming gradient, one program per (n, block of pixels, slice of channels):
    dx = g * M_c * M_s                       written tile by tile
    dM_s[n, p] = sum_c g * x * M_c           accumulated elementwise over the program's channel
                                             tiles, reduced over channels once at the end, one
                                             partial row per channel slice, then one torch sum
    dM_c[n, c] = sum_p g * x * M_s           per-(n, pixel-block) partial rows (a reduction along
                                             the pixels of a tile, inside each warp), one torch sum
The channel slices (channel_pool.triton.channel_slices) give the launch enough programs (at least
2 waves on an H100) without a cross-warp reduction in the loop. Both partial reductions are
deterministic (no atomics).
Arbitrary strides are read in place. Accumulation is fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_common import FP_FUSION, acc_dtype, acc_torch_dtype, cdiv, pixel_strides
from ..channel_pool.triton import _blocks, _pixel_offsets, channel_slices


@triton.jit
def _cbam_gate_fwd_kernel(x_ptr, mc_ptr, ms_ptr, out_ptr, C, P, W,
                          sx_n, sx_c, sx_h, sx_w, so_n, so_c, so_h, so_w, sc_n, sc_c, ss_n, ss_h, ss_w,
                          X_MERGED: tl.constexpr, O_MERGED: tl.constexpr, S_MERGED: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC_DTYPE: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    p_ok = p < P
    m_s = tl.load(ms_ptr + n * ss_n + _pixel_offsets(p, W, ss_h, ss_w, S_MERGED), mask=p_ok, other=0.0)
    m_s = m_s.to(ACC_DTYPE)
    x_pix = x_ptr + n * sx_n + _pixel_offsets(p, W, sx_h, sx_w, X_MERGED)
    o_pix = out_ptr + n * so_n + _pixel_offsets(p, W, so_h, so_w, O_MERGED)
    lanes_c = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + lanes_c
        c_ok = c < C
        c64 = c.to(tl.int64)
        ok = c_ok[:, None] & p_ok[None, :]
        m_c = tl.load(mc_ptr + n * sc_n + c64 * sc_c, mask=c_ok, other=0.0).to(ACC_DTYPE)
        v = tl.load(x_pix[None, :] + c64[:, None] * sx_c, mask=ok, other=0.0).to(ACC_DTYPE)
        out = m_s[None, :] * (m_c[:, None] * v)  # the order of the reference: M_s * (M_c * x)
        tl.store(o_pix[None, :] + c64[:, None] * so_c, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _cbam_gate_flat_kernel(x_ptr, mc_ptr, ms_ptr, out_ptr, C, P, W, sx_n, sx_c, so_n, so_c, sc_n, sc_c,
                           ss_n, ss_h, ss_w, S_MERGED: tl.constexpr, BLOCK: tl.constexpr,
                           ACC_DTYPE: tl.constexpr):
    plane = tl.program_id(0).to(tl.int64)
    n = plane // C
    c = plane % C
    p = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = p < P
    m_c = tl.load(mc_ptr + n * sc_n + c * sc_c).to(ACC_DTYPE)
    m_s = tl.load(ms_ptr + n * ss_n + _pixel_offsets(p, W, ss_h, ss_w, S_MERGED), mask=ok, other=0.0)
    v = tl.load(x_ptr + n * sx_n + c * sx_c + p, mask=ok, other=0.0).to(ACC_DTYPE)
    out = m_s.to(ACC_DTYPE) * (m_c * v)  # the order of the reference: M_s * (M_c * x)
    tl.store(out_ptr + n * so_n + c * so_c + p, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _cbam_gate_bwd_kernel(g_ptr, x_ptr, mc_ptr, ms_ptr, dx_ptr, dmc_part_ptr, dms_part_ptr,
                          N, C, P, W, n_pblocks, c_per,
                          sg_n, sg_c, sg_h, sg_w, sx_n, sx_c, sx_h, sx_w, sd_n, sd_c, sd_h, sd_w,
                          sc_n, sc_c, ss_n, ss_h, ss_w,
                          G_MERGED: tl.constexpr, X_MERGED: tl.constexpr, D_MERGED: tl.constexpr,
                          S_MERGED: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC_DTYPE: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1).to(tl.int64)
    cs = tl.program_id(2)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    p_ok = p < P
    m_s = tl.load(ms_ptr + n * ss_n + _pixel_offsets(p, W, ss_h, ss_w, S_MERGED), mask=p_ok, other=0.0)
    m_s = m_s.to(ACC_DTYPE)
    c_lo = cs * c_per
    c_hi = tl.minimum(c_lo + c_per, C)
    g_pix = g_ptr + n * sg_n + _pixel_offsets(p, W, sg_h, sg_w, G_MERGED)
    x_pix = x_ptr + n * sx_n + _pixel_offsets(p, W, sx_h, sx_w, X_MERGED)
    d_pix = dx_ptr + n * sd_n + _pixel_offsets(p, W, sd_h, sd_w, D_MERGED)
    # dM_s summands kept per (channel lane, pixel) through the loop: one reduction over channels at
    # the end instead of a cross-warp one per tile
    acc_ms = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC_DTYPE)
    lanes_c = tl.arange(0, BLOCK_C)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c0 + lanes_c
        c_ok = c < c_hi
        c64 = c.to(tl.int64)
        ok = c_ok[:, None] & p_ok[None, :]
        m_c = tl.load(mc_ptr + n * sc_n + c64 * sc_c, mask=c_ok, other=0.0).to(ACC_DTYPE)
        g = tl.load(g_pix[None, :] + c64[:, None] * sg_c, mask=ok, other=0.0).to(ACC_DTYPE)
        v = tl.load(x_pix[None, :] + c64[:, None] * sx_c, mask=ok, other=0.0).to(ACC_DTYPE)
        gm = g * m_c[:, None]  # d loss / d (M_s * M_c * x) times M_c
        tl.store(d_pix[None, :] + c64[:, None] * sd_c, (gm * m_s[None, :]).to(dx_ptr.dtype.element_ty), mask=ok)
        gx = g * v  # masked lanes load 0, so they add nothing below
        acc_ms += gx * m_c[:, None]
        # summed along the pixels (inside a warp); the store of these BLOCK_C sums is the loop's only
        # pass through shared memory (2 barriers per tile)
        dmc = tl.sum(gx * m_s[None, :], axis=1, keep_dims=True)
        tl.store(dmc_part_ptr + (n * n_pblocks + pb) * C + c64[:, None], dmc, mask=c_ok[:, None])
    tl.store(dms_part_ptr + (cs * N + n) * P + p, tl.sum(acc_ms, axis=0), mask=p_ok)


# Bytes of x per program of the flat forward (1024 fp32, 2048 bf16: 8 or 16 elements per thread of
# 4 warps, two or one 16-byte loads).
_FLAT_BYTES = 4096


def _flat_planes(t: torch.Tensor) -> bool:
    """Every (n, c) plane's pixels are contiguous: pixel p at plane + p."""
    h, w = t.shape[-2:]
    return (t.stride(3) == 1 or w == 1) and (h == 1 or t.stride(2) == w)


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int, bool]:
    s_h, s_w, merged = pixel_strides(t)
    return t.stride(0), t.stride(1), s_h, s_w, merged


# Launch plans keyed on everything they depend on (shapes, strides, dtypes, tuning constants): a
# repeated call skips recomputing blocks, grids, layout tests and stride lists, which is most of the
# wrappers' host work besides the launch itself. Bounded: a run with ever new shapes clears it now
# and then.
_PLANS: dict = {}
_MAX_PLANS = 256


def _remember(key, plan):
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = plan
    return plan


def _fwd_plan(x, channel_gate, spatial_gate, out):
    """(kernel, grid, int arguments after the 4 tensors, constexprs), or None for an empty x."""
    n, c, h, w = x.shape
    p = h * w
    if n * c * p == 0:
        return None
    ss_h, ss_w, s_merged = pixel_strides(spatial_gate)
    if _flat_planes(x) and _flat_planes(out):
        block = _FLAT_BYTES // x.element_size()
        return (_cbam_gate_flat_kernel, (n * c, cdiv(p, block)),
                (c, p, w, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
                 channel_gate.stride(0), channel_gate.stride(1), spatial_gate.stride(0), ss_h, ss_w),
                dict(S_MERGED=s_merged, BLOCK=block, ACC_DTYPE=acc_dtype(x.dtype), num_warps=4, **FP_FUSION))
    block_c, block_p = _blocks(x, p)
    *sx, x_merged = _strides4(x)
    *so, o_merged = _strides4(out)
    return (_cbam_gate_fwd_kernel, (n, cdiv(p, block_p)),
            (c, p, w, *sx, *so, channel_gate.stride(0), channel_gate.stride(1), spatial_gate.stride(0), ss_h, ss_w),
            dict(X_MERGED=x_merged, O_MERGED=o_merged, S_MERGED=s_merged,
                 BLOCK_C=block_c, BLOCK_P=block_p, ACC_DTYPE=acc_dtype(x.dtype), **FP_FUSION))


@torch.library.custom_op("segkd::cbam_gate_triton", mutates_args=())
def cbam_gate_triton(x: torch.Tensor, channel_gate: torch.Tensor, spatial_gate: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W), channel_gate (N, C), spatial_gate (N, H, W) -> M_s * (M_c * x), laid out like x."""
    out = torch.empty_like(x)  # its strides follow from x's: part of the plan's key through x
    key = ("fwd", x.shape, x.stride(), channel_gate.stride(), spatial_gate.stride(), x.dtype, _FLAT_BYTES)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _remember(key, _fwd_plan(x, channel_gate, spatial_gate, out))
    if plan is not None:
        kernel, grid, ints, consts = plan
        kernel[grid](x, channel_gate, spatial_gate, out, *ints, **consts)
    return out


def _bwd_plan(grad, x, channel_gate, spatial_gate, dx):
    """(grid, int arguments after the 7 tensors, constexprs, dmc partials' shape, dms partials' shape
    (without the slice axis when there is one slice), partials' dtype, whether any element exists)."""
    n, c, h, w = x.shape
    p = h * w
    block_c, block_p = _blocks(x, p)
    n_pblocks = cdiv(p, block_p)
    c_per, slices = channel_slices(c, block_c, n * n_pblocks)
    ss_h, ss_w, s_merged = pixel_strides(spatial_gate)
    *sg, g_merged = _strides4(grad)
    *sx, x_merged = _strides4(x)
    *sd, d_merged = _strides4(dx)
    return ((n, n_pblocks, slices),
            (n, c, p, w, n_pblocks, c_per, *sg, *sx, *sd, channel_gate.stride(0), channel_gate.stride(1),
             spatial_gate.stride(0), ss_h, ss_w),
            dict(G_MERGED=g_merged, X_MERGED=x_merged, D_MERGED=d_merged, S_MERGED=s_merged,
                 BLOCK_C=block_c, BLOCK_P=block_p, ACC_DTYPE=acc_dtype(x.dtype), **FP_FUSION),
            (n, n_pblocks, c), (n, h, w) if slices == 1 else (slices, n, h, w), acc_torch_dtype(x.dtype),
            n * c * p > 0)


@torch.library.custom_op("segkd::cbam_gate_backward_triton", mutates_args=())
def cbam_gate_backward_triton(grad: torch.Tensor, x: torch.Tensor, channel_gate: torch.Tensor,
                              spatial_gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx like x, d channel_gate (N, C), d spatial_gate (N, H, W)), each in its input's dtype."""
    dx = torch.empty_like(x)
    key = ("bwd", x.shape, x.stride(), grad.stride(), channel_gate.stride(), spatial_gate.stride(), x.dtype)
    plan = _PLANS.get(key)
    if plan is None:
        plan = _remember(key, _bwd_plan(grad, x, channel_gate, spatial_gate, dx))
    grid, ints, consts, dmc_shape, dms_shape, part_dtype, nonempty = plan
    dmc_part = torch.empty(dmc_shape, dtype=part_dtype, device=x.device)
    if not nonempty:
        # no channel or no pixel: the sums over them are 0
        return dx, dmc_part.sum(dim=1).to(channel_gate.dtype), spatial_gate.new_zeros(x.shape[0], *x.shape[2:])
    # one channel slice: its partial row is dM_s itself (no slice axis, no sum)
    dms_part = torch.empty(dms_shape, dtype=part_dtype, device=x.device)
    _cbam_gate_bwd_kernel[grid](grad, x, channel_gate, spatial_gate, dx, dmc_part, dms_part, *ints, **consts)
    dms = (dms_part if len(dms_shape) == 3 else dms_part.sum(dim=0)).to(spatial_gate.dtype)
    return dx, dmc_part.sum(dim=1).to(channel_gate.dtype), dms


@cbam_gate_triton.register_fake
def _(x, channel_gate, spatial_gate):
    return torch.empty_like(x)


@cbam_gate_backward_triton.register_fake
def _(grad, x, channel_gate, spatial_gate):
    n, c, h, w = x.shape
    return torch.empty_like(x), channel_gate.new_empty(n, c), spatial_gate.new_empty(n, h, w)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, channel_gate, spatial_gate = ctx.saved_tensors
    return cbam_gate_backward_triton(grad.to(x.dtype), x, channel_gate, spatial_gate)


cbam_gate_triton.register_autograd(_backward, setup_context=_setup_context)
