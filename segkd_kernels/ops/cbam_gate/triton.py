"""cbam_gate in Triton: out = M_s * (M_c * x) in one pass, and its backward in one pass.

Both kernels run one program per (n, block of pixels) that walks the channels in [BLOCK_C, BLOCK_P]
tiles (pixels on the fast axis for NCHW, channels for channels_last), so M_s is loaded once per
pixel block and M_c * x is never stored.
Backward, with g the incoming gradient:
    dx = g * M_c * M_s                       written tile by tile
    dM_s[n, p] = sum_c g * x * M_c           complete per program (it owns all channels of its pixels)
    dM_c[n, c] = sum_p g * x * M_s           per-(n, pixel-block) partial rows, then one torch sum
The partial-row reduction is deterministic (no atomics). Arbitrary strides are read in place.
Accumulation is fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_common import FP_FUSION, acc_dtype, acc_torch_dtype, pixel_strides
from ..channel_pool.triton import _blocks, _pixel_offsets


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
def _cbam_gate_bwd_kernel(g_ptr, x_ptr, mc_ptr, ms_ptr, dx_ptr, dmc_part_ptr, dms_ptr,
                          C, P, W, n_pblocks,
                          sg_n, sg_c, sg_h, sg_w, sx_n, sx_c, sx_h, sx_w, sd_n, sd_c, sd_h, sd_w,
                          sc_n, sc_c, ss_n, ss_h, ss_w,
                          G_MERGED: tl.constexpr, X_MERGED: tl.constexpr, D_MERGED: tl.constexpr,
                          S_MERGED: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC_DTYPE: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1).to(tl.int64)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    p_ok = p < P
    m_s = tl.load(ms_ptr + n * ss_n + _pixel_offsets(p, W, ss_h, ss_w, S_MERGED), mask=p_ok, other=0.0)
    m_s = m_s.to(ACC_DTYPE)
    g_pix = g_ptr + n * sg_n + _pixel_offsets(p, W, sg_h, sg_w, G_MERGED)
    x_pix = x_ptr + n * sx_n + _pixel_offsets(p, W, sx_h, sx_w, X_MERGED)
    d_pix = dx_ptr + n * sd_n + _pixel_offsets(p, W, sd_h, sd_w, D_MERGED)
    acc_ms = tl.zeros([BLOCK_P], dtype=ACC_DTYPE)
    lanes_c = tl.arange(0, BLOCK_C)
    for c0 in range(0, C, BLOCK_C):
        c = c0 + lanes_c
        c_ok = c < C
        c64 = c.to(tl.int64)
        ok = c_ok[:, None] & p_ok[None, :]
        m_c = tl.load(mc_ptr + n * sc_n + c64 * sc_c, mask=c_ok, other=0.0).to(ACC_DTYPE)
        g = tl.load(g_pix[None, :] + c64[:, None] * sg_c, mask=ok, other=0.0).to(ACC_DTYPE)
        v = tl.load(x_pix[None, :] + c64[:, None] * sx_c, mask=ok, other=0.0).to(ACC_DTYPE)
        gm = g * m_c[:, None]  # d loss / d (M_s * M_c * x) times M_c
        tl.store(d_pix[None, :] + c64[:, None] * sd_c, (gm * m_s[None, :]).to(dx_ptr.dtype.element_ty), mask=ok)
        gx = g * v  # masked lanes load 0, so they add nothing below
        acc_ms += tl.sum(gx * m_c[:, None], axis=0)
        tl.store(dmc_part_ptr + (n * n_pblocks + pb) * C + c64, tl.sum(gx * m_s[None, :], axis=1), mask=c_ok)
    tl.store(dms_ptr + n * P + p, acc_ms.to(dms_ptr.dtype.element_ty), mask=p_ok)


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int, bool]:
    s_h, s_w, merged = pixel_strides(t)
    return t.stride(0), t.stride(1), s_h, s_w, merged


@torch.library.custom_op("segkd::cbam_gate_triton", mutates_args=())
def cbam_gate_triton(x: torch.Tensor, channel_gate: torch.Tensor, spatial_gate: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W), channel_gate (N, C), spatial_gate (N, H, W) -> M_s * (M_c * x), laid out like x."""
    n, c, h, w = x.shape
    p = h * w
    out = torch.empty_like(x)
    if n * c * p > 0:
        block_c, block_p = _blocks(x, p)
        *sx, x_merged = _strides4(x)
        *so, o_merged = _strides4(out)
        ss_h, ss_w, s_merged = pixel_strides(spatial_gate)
        _cbam_gate_fwd_kernel[(n, triton.cdiv(p, block_p))](
            x, channel_gate, spatial_gate, out, c, p, w, *sx, *so,
            channel_gate.stride(0), channel_gate.stride(1), spatial_gate.stride(0), ss_h, ss_w,
            X_MERGED=x_merged, O_MERGED=o_merged, S_MERGED=s_merged,
            BLOCK_C=block_c, BLOCK_P=block_p, ACC_DTYPE=acc_dtype(x.dtype), **FP_FUSION)
    return out


@torch.library.custom_op("segkd::cbam_gate_backward_triton", mutates_args=())
def cbam_gate_backward_triton(grad: torch.Tensor, x: torch.Tensor, channel_gate: torch.Tensor,
                              spatial_gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx like x, d channel_gate (N, C), d spatial_gate (N, H, W)), each in its input's dtype."""
    n, c, h, w = x.shape
    p = h * w
    dx = torch.empty_like(x)
    dms = spatial_gate.new_empty(n, h, w)
    block_c, block_p = _blocks(x, p)
    n_pblocks = triton.cdiv(p, block_p)
    part_dtype = acc_torch_dtype(x.dtype)
    dmc_part = torch.empty(n, n_pblocks, c, dtype=part_dtype, device=x.device)
    if n * c * p > 0:
        ss_h, ss_w, s_merged = pixel_strides(spatial_gate)
        *sg, g_merged = _strides4(grad)
        *sx, x_merged = _strides4(x)
        *sd, d_merged = _strides4(dx)
        _cbam_gate_bwd_kernel[(n, n_pblocks)](
            grad, x, channel_gate, spatial_gate, dx, dmc_part, dms, c, p, w, n_pblocks,
            *sg, *sx, *sd, channel_gate.stride(0), channel_gate.stride(1), spatial_gate.stride(0), ss_h, ss_w,
            G_MERGED=g_merged, X_MERGED=x_merged, D_MERGED=d_merged, S_MERGED=s_merged,
            BLOCK_C=block_c, BLOCK_P=block_p, ACC_DTYPE=acc_dtype(x.dtype), **FP_FUSION)
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
