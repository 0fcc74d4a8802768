"""cbam_gate in Triton: out = M_s * (M_c * x) in one pass, and its backward in one pass.

Forward: where the pixels of every (n, c) plane are contiguous (NCHW, or any layout whose H, W
merge with unit stride) a flat elementwise kernel, one program per (plane, block of pixels): the
plane's M_c is one scalar, M_s one vector load, no division per element, and N*C*H*W / BLOCK
programs (16,384 at 8 x 256 x 64 x 128); with every tensor contiguous its variant that takes
pointers, C and H*W only. Other layouts (channels_last) use the tiled kernel that walks the
channels in [BLOCK_C, BLOCK_P] tiles with channels on the fast axis.
Backward, with g the incoming gradient, one program per (n, block of pixels, slice of channels):
    dx = g * M_c * M_s                       written tile by tile
    dM_s[n, p] = sum_c g * x * M_c           accumulated elementwise over the program's channel
                                             tiles, reduced over channels once at the end, one
                                             partial row per channel slice
    dM_c[n, c] = sum_p g * x * M_s           per-(n, pixel-block) partial rows (a reduction along
                                             the pixels of a tile, inside each warp)
The channel slices (channel_pool.triton.channel_slices) give the launch enough programs (at least
2 waves on an H100) without a cross-warp reduction in the loop. Where a sum has one term (one
pixel block, one slice: small maps) the kernel writes that gradient itself in the gate's dtype;
otherwise a second launch sums the partial rows in a fixed order and rounds once (deterministic,
no atomics, no torch ops). Contiguous inputs take a variant of the kernel without stride arguments.
The gates come in either of their shapes and their gradients go back in them.
Arbitrary strides are read in place. Accumulation is fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton_common import FP_FUSION, acc_dtype, acc_torch_dtype, cdiv, pixel_strides
from .._eager import direct_node, direct_ok
from .._launch import MISSING, Launch, PlanCache
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
def _bwd_tile(g_ptrs, x_ptrs, dx_ptrs, mc_ptrs, dmc_ptrs, ok, c_ok, m_s, acc_ms, ACC_DTYPE: tl.constexpr):
    """One [BLOCK_C, BLOCK_P] tile of the backward, addressed by the caller (strided or contiguous):
    stores dx and the tile's dM_c sums, returns acc_ms plus the tile's dM_s summands."""
    m_c = tl.load(mc_ptrs, mask=c_ok, other=0.0).to(ACC_DTYPE)
    g = tl.load(g_ptrs, mask=ok, other=0.0).to(ACC_DTYPE)
    v = tl.load(x_ptrs, mask=ok, other=0.0).to(ACC_DTYPE)
    gm = g * m_c[:, None]  # d loss / d (M_s * M_c * x) times M_c
    tl.store(dx_ptrs, (gm * m_s[None, :]).to(dx_ptrs.dtype.element_ty), mask=ok)
    gx = g * v  # masked lanes load 0, so they add nothing below
    # summed along the pixels (inside a warp); the store of these BLOCK_C sums is the loop's only
    # pass through shared memory (2 barriers per tile)
    dmc = tl.sum(gx * m_s[None, :], axis=1, keep_dims=True)
    tl.store(dmc_ptrs, dmc.to(dmc_ptrs.dtype.element_ty), mask=c_ok[:, None])
    return acc_ms + gx * m_c[:, None]


@triton.jit
def _cbam_gate_bwd_kernel(g_ptr, x_ptr, mc_ptr, ms_ptr, dx_ptr, dmc_part_ptr, dms_part_ptr,
                          N, C, P, W, n_pblocks, c_per,
                          sg_n, sg_c, sg_h, sg_w, sx_n, sx_c, sx_h, sx_w, sd_n, sd_c, sd_h, sd_w,
                          sc_n, sc_c, ss_n, ss_h, ss_w, dms_off,
                          G_MERGED: tl.constexpr, X_MERGED: tl.constexpr, D_MERGED: tl.constexpr,
                          S_MERGED: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC_DTYPE: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1).to(tl.int64)
    cs = tl.program_id(2)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    p_ok = p < P
    c_lo = cs * c_per
    c_hi = tl.minimum(c_lo + c_per, C)
    m_s = tl.load(ms_ptr + n * ss_n + _pixel_offsets(p, W, ss_h, ss_w, S_MERGED), mask=p_ok, other=0.0)
    m_s = m_s.to(ACC_DTYPE)
    g_pix = g_ptr + n * sg_n + _pixel_offsets(p, W, sg_h, sg_w, G_MERGED)
    x_pix = x_ptr + n * sx_n + _pixel_offsets(p, W, sx_h, sx_w, X_MERGED)
    d_pix = dx_ptr + n * sd_n + _pixel_offsets(p, W, sd_h, sd_w, D_MERGED)
    # dM_s summands kept per (channel lane, pixel) through the loop: one reduction over channels at
    # the end instead of a cross-warp one per tile
    acc_ms = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC_DTYPE)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < c_hi
        c64 = c.to(tl.int64)
        acc_ms = _bwd_tile(g_pix[None, :] + c64[:, None] * sg_c, x_pix[None, :] + c64[:, None] * sx_c,
                           d_pix[None, :] + c64[:, None] * sd_c, mc_ptr + n * sc_n + c64 * sc_c,
                           dmc_part_ptr + (n * n_pblocks + pb) * C + c64[:, None],
                           c_ok[:, None] & p_ok[None, :], c_ok, m_s, acc_ms, ACC_DTYPE)
    tl.store(dms_part_ptr + dms_off + (cs * N + n) * P + p, tl.sum(acc_ms, axis=0).to(dms_part_ptr.dtype.element_ty),
             mask=p_ok)



@triton.jit
def _cbam_gate_contig_kernel(x_ptr, mc_ptr, ms_ptr, out_ptr, C, P, BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr):
    # every tensor contiguous: plane n * C + c of x and out at plane * P, its M_c at plane, M_s of
    # sample n at n * P (the flat kernel with its strides known)
    plane = tl.program_id(0).to(tl.int64)
    n = plane // C
    p = tl.program_id(1).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    ok = p < P
    m_c = tl.load(mc_ptr + plane).to(ACC_DTYPE)
    m_s = tl.load(ms_ptr + n * P + p, mask=ok, other=0.0).to(ACC_DTYPE)
    v = tl.load(x_ptr + plane * P + p, mask=ok, other=0.0).to(ACC_DTYPE)
    out = m_s * (m_c * v)  # the order of the reference: M_s * (M_c * x)
    tl.store(out_ptr + plane * P + p, out.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _cbam_gate_bwd_contig_kernel(g_ptr, x_ptr, mc_ptr, ms_ptr, dx_ptr, dmc_part_ptr, dms_part_ptr,
                                 N, C, P, n_pblocks, c_per, dms_off,
                                 BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC_DTYPE: tl.constexpr):
    # _cbam_gate_bwd_kernel for contiguous g, x, dx and gates (the same tiles, sums and stores)
    # (the program's coordinates as in _cbam_gate_bwd_kernel, spelled out in both kernels: the
    # static report's instruction model reads a loop's bounds from the kernel's own source)
    n = tl.program_id(0).to(tl.int64)
    pb = tl.program_id(1).to(tl.int64)
    cs = tl.program_id(2)
    p = pb * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    p_ok = p < P
    c_lo = cs * c_per
    c_hi = tl.minimum(c_lo + c_per, C)
    m_s = tl.load(ms_ptr + n * P + p, mask=p_ok, other=0.0).to(ACC_DTYPE)
    acc_ms = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC_DTYPE)
    for c0 in range(c_lo, c_hi, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_ok = c < c_hi
        c64 = c.to(tl.int64)
        row = n * C + c64  # plane of (n, c)
        offs = row[:, None] * P + p[None, :]
        acc_ms = _bwd_tile(g_ptr + offs, x_ptr + offs, dx_ptr + offs, mc_ptr + row,
                           dmc_part_ptr + (n * n_pblocks + pb) * C + c64[:, None],
                           c_ok[:, None] & p_ok[None, :], c_ok, m_s, acc_ms, ACC_DTYPE)
    tl.store(dms_part_ptr + dms_off + (cs * N + n) * P + p, tl.sum(acc_ms, axis=0).to(dms_part_ptr.dtype.element_ty),
             mask=p_ok)


@triton.jit
def _cbam_gate_reduce_kernel(dmc_part_ptr, dms_part_ptr, dmc_ptr, dms_ptr, NC, NP, C, n_pblocks, slices,
                             dmc_programs, dms_off, BLOCK: tl.constexpr, ACC_DTYPE: tl.constexpr):
    # the backward's partial rows summed in a fixed order, rounded once to the gates' dtypes: the
    # first dmc_programs programs sum dM_c over pixel blocks, the others dM_s over channel slices
    pid = tl.program_id(0)
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    if pid < dmc_programs:
        i = pid.to(tl.int64) * BLOCK + lanes
        ok = i < NC
        base = (i // C) * n_pblocks * C + i % C
        acc = tl.zeros([BLOCK], dtype=ACC_DTYPE)
        for pb in range(0, n_pblocks):
            acc += tl.load(dmc_part_ptr + base + pb * C, mask=ok, other=0.0).to(ACC_DTYPE)
        tl.store(dmc_ptr + i, acc.to(dmc_ptr.dtype.element_ty), mask=ok)
    else:
        j = (pid - dmc_programs).to(tl.int64) * BLOCK + lanes
        ok = j < NP
        acc = tl.zeros([BLOCK], dtype=ACC_DTYPE)
        for s in range(0, slices):
            acc += tl.load(dms_part_ptr + dms_off + s * NP + j, mask=ok, other=0.0).to(ACC_DTYPE)
        tl.store(dms_ptr + j, acc.to(dms_ptr.dtype.element_ty), mask=ok)


_grad_enabled = torch._C.is_grad_enabled
_any_requires_grad = torch._C._any_requires_grad

# Bytes of x per program of the flat forward (1024 fp32, 2048 bf16: 8 or 16 elements per thread of
# 4 warps, two or one 16-byte loads).
_FLAT_BYTES = 4096
_REDUCE_BLOCK = 256


def _flat_planes(t: torch.Tensor) -> bool:
    """Every (n, c) plane's pixels are contiguous: pixel p at plane + p."""
    h, w = t.shape[-2:]
    return (t.stride(3) == 1 or w == 1) and (h == 1 or t.stride(2) == w)


def _strides4(t: torch.Tensor) -> tuple[int, int, int, int, bool]:
    s_h, s_w, merged = pixel_strides(t)
    return t.stride(0), t.stride(1), s_h, s_w, merged


# Launch plans (ops/_launch.PlanCache): a repeated call launches through the compiled kernels its
# plan's Launches kept.
_FWD_PLANS = PlanCache()
_BWD_PLANS = PlanCache()


def _fwd_plan(x, channel_gate, spatial_gate, out):
    """The forward's Launch (called with x, M_c, M_s, out), or None for an empty x. The gates come
    as the caller gave them: M_c (N, C) or (N, C, 1, 1), M_s (N, 1, H, W) or (N, H, W)."""
    n, c, h, w = x.shape
    p = h * w
    if n * c * p == 0:
        return None
    acc = acc_dtype(x.dtype)
    if x.is_contiguous() and out.is_contiguous() and channel_gate.is_contiguous() and spatial_gate.is_contiguous():
        block = _FLAT_BYTES // x.element_size()
        return Launch(_cbam_gate_contig_kernel, (n * c, cdiv(p, block)), (c, p),
                      dict(BLOCK=block, ACC_DTYPE=acc, num_warps=4, **FP_FUSION), fresh=1)
    ss_h, ss_w, s_merged = pixel_strides(spatial_gate)
    gates = (channel_gate.stride(0), channel_gate.stride(1), spatial_gate.stride(0), ss_h, ss_w)
    if _flat_planes(x) and _flat_planes(out):
        block = _FLAT_BYTES // x.element_size()
        return Launch(_cbam_gate_flat_kernel, (n * c, cdiv(p, block)),
                      (c, p, w, x.stride(0), x.stride(1), out.stride(0), out.stride(1), *gates),
                      dict(S_MERGED=s_merged, BLOCK=block, ACC_DTYPE=acc, num_warps=4, **FP_FUSION), fresh=1)
    block_c, block_p = _blocks(x, p)
    *sx, x_merged = _strides4(x)
    *so, o_merged = _strides4(out)
    return Launch(_cbam_gate_fwd_kernel, (n, cdiv(p, block_p)), (c, p, w, *sx, *so, *gates),
                  dict(X_MERGED=x_merged, O_MERGED=o_merged, S_MERGED=s_merged,
                       BLOCK_C=block_c, BLOCK_P=block_p, ACC_DTYPE=acc, **FP_FUSION), fresh=1)


def _forward(x: torch.Tensor, channel_gate: torch.Tensor, spatial_gate: torch.Tensor) -> torch.Tensor:
    """The forward's work (the custom op's body, and the eager entry's): M_s * (M_c * x), laid out
    like x."""
    out = torch.empty_like(x)  # its strides follow from x's: part of the plan's key through x
    # every tensor's dtype is in the key: a Launch serves one combination of them
    key = (x.shape, x.stride(), channel_gate.stride(), spatial_gate.stride(), x.dtype, channel_gate.dtype,
           spatial_gate.dtype, _FLAT_BYTES)
    launch = _FWD_PLANS.get(key, MISSING)
    if launch is MISSING:
        launch = _FWD_PLANS.put(key, _fwd_plan(x, channel_gate, spatial_gate, out))
    if launch is not None:
        launch(x, channel_gate, spatial_gate, out)
    return out


@torch.library.custom_op("segkd::cbam_gate_triton", mutates_args=())
def cbam_gate_triton(x: torch.Tensor, channel_gate: torch.Tensor, spatial_gate: torch.Tensor) -> torch.Tensor:
    """x (N, C, H, W), channel_gate (N, C) or (N, C, 1, 1), spatial_gate (N, 1, H, W) or (N, H, W) ->
    M_s * (M_c * x), laid out like x."""
    return _forward(x, channel_gate, spatial_gate)


def _bwd_plan(grad, x, channel_gate, spatial_gate):
    """The backward for inputs laid out like these: a function (grad, x, M_c, M_s) -> (dx, dM_c,
    dM_s), each allocated and launched on with nothing left to decide per call."""
    n, c, h, w = x.shape
    p = h * w
    # the gates' gradients contiguous (empty_like keeps a contiguous gate's layout without being told)
    fmt = (torch.preserve_format if channel_gate.is_contiguous() and spatial_gate.is_contiguous()
           else torch.contiguous_format)
    if n * c * p == 0:
        def nothing(grad, x, channel_gate, spatial_gate):
            # no channel or no pixel: the sums over them are 0
            return (torch.empty_like(x), torch.zeros_like(channel_gate, memory_format=torch.contiguous_format),
                    torch.zeros_like(spatial_gate, memory_format=torch.contiguous_format))
        return nothing
    dx = torch.empty_like(x)  # for its strides, which follow from x's (part of the key)
    acc = acc_dtype(x.dtype)
    block_c, block_p = _blocks(x, p)
    n_pblocks = cdiv(p, block_p)
    c_per, slices = channel_slices(c, block_c, n * n_pblocks)
    grid = (n, n_pblocks, slices)
    consts = dict(BLOCK_C=block_c, BLOCK_P=block_p, ACC_DTYPE=acc, **FP_FUSION)
    # Partial rows exist only where a sum has more than one term (more than one pixel block for
    # dM_c, one channel slice for dM_s), otherwise the kernel writes that gradient itself in the
    # gate's dtype. Both partial buffers are one allocation: dM_c's rows, then dM_s's at dms_off.
    dmc_part = n * n_pblocks * c if n_pblocks > 1 else 0
    dms_part = slices * n * p if slices > 1 else 0
    dms_off = dmc_part if dms_part else 0
    if all(t.is_contiguous() for t in (grad, x, dx, channel_gate, spatial_gate)):
        main = Launch(_cbam_gate_bwd_contig_kernel, grid, (n, c, p, n_pblocks, c_per, dms_off), consts, fresh=3)
    else:
        ss_h, ss_w, s_merged = pixel_strides(spatial_gate)
        *sg, g_merged = _strides4(grad)
        *sx, x_merged = _strides4(x)
        *sd, d_merged = _strides4(dx)
        main = Launch(_cbam_gate_bwd_kernel, grid,
                      (n, c, p, w, n_pblocks, c_per, *sg, *sx, *sd, channel_gate.stride(0), channel_gate.stride(1),
                       spatial_gate.stride(0), ss_h, ss_w, dms_off),
                      dict(G_MERGED=g_merged, X_MERGED=x_merged, D_MERGED=d_merged, S_MERGED=s_merged, **consts),
                      fresh=3)
    empty_like = torch.empty_like
    keep = fmt is torch.preserve_format

    def gradients(x, channel_gate, spatial_gate):
        if keep:
            return empty_like(x), empty_like(channel_gate), empty_like(spatial_gate)
        return (empty_like(x), empty_like(channel_gate, memory_format=fmt),
                empty_like(spatial_gate, memory_format=fmt))

    if not (dmc_part or dms_part):
        def one_pass(grad, x, channel_gate, spatial_gate):
            dx, dmc, dms = gradients(x, channel_gate, spatial_gate)
            main(grad, x, channel_gate, spatial_gate, dx, dmc, dms)
            return dx, dmc, dms
        return one_pass
    dmc_programs = cdiv(n * c, _REDUCE_BLOCK) if dmc_part else 0
    programs = dmc_programs + (cdiv(n * p, _REDUCE_BLOCK) if dms_part else 0)
    reduce = Launch(_cbam_gate_reduce_kernel, (programs,), (n * c, n * p, c, n_pblocks, slices, dmc_programs, dms_off),
                    dict(BLOCK=_REDUCE_BLOCK, ACC_DTYPE=acc, **FP_FUSION), fresh=4)
    size, part_dtype = dmc_part + dms_part, acc_torch_dtype(x.dtype)
    # which gradients have partial rows (the others the main kernel writes itself)
    which = (bool(dmc_part), bool(dms_part))
    same_dtype = part_dtype == x.dtype

    def two_pass(grad, x, channel_gate, spatial_gate):
        if keep:  # (spelled out: the hottest plan of the benchmark shapes)
            dx, dmc, dms = empty_like(x), empty_like(channel_gate), empty_like(spatial_gate)
        else:
            dx, dmc, dms = gradients(x, channel_gate, spatial_gate)
        # x.new_empty: fewer arguments to parse than torch.empty(size, dtype=, device=)
        parts = x.new_empty(size) if same_dtype else x.new_empty(size, dtype=part_dtype)
        dmc_part = parts if which[0] else dmc
        dms_part = parts if which[1] else dms
        main(grad, x, channel_gate, spatial_gate, dx, dmc_part, dms_part)
        reduce(dmc_part, dms_part, dmc, dms)
        return dx, dmc, dms
    return two_pass


def _backward_impl(grad: torch.Tensor, x: torch.Tensor, channel_gate: torch.Tensor,
                   spatial_gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward's work (the backward custom op's body, and the eager backward's)."""
    key = (x.shape, x.stride(), grad.stride(), channel_gate.stride(), spatial_gate.stride(), x.dtype, grad.dtype,
           channel_gate.dtype, spatial_gate.dtype)
    run = _BWD_PLANS.get(key, MISSING)
    if run is MISSING:
        run = _BWD_PLANS.put(key, _bwd_plan(grad, x, channel_gate, spatial_gate))
    return run(grad, x, channel_gate, spatial_gate)


@torch.library.custom_op("segkd::cbam_gate_backward_triton", mutates_args=())
def cbam_gate_backward_triton(grad: torch.Tensor, x: torch.Tensor, channel_gate: torch.Tensor,
                              spatial_gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx like x, d channel_gate, d spatial_gate), each in its input's dtype and shape (the gates'
    gradients contiguous)."""
    return _backward_impl(grad, x, channel_gate, spatial_gate)


@cbam_gate_triton.register_fake
def _(x, channel_gate, spatial_gate):
    return torch.empty_like(x)


@cbam_gate_backward_triton.register_fake
def _(grad, x, channel_gate, spatial_gate):
    return (torch.empty_like(x), torch.empty_like(channel_gate, memory_format=torch.contiguous_format),
            torch.empty_like(spatial_gate, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    x, channel_gate, spatial_gate = ctx.saved_tensors
    if grad.dtype != x.dtype:
        grad = grad.to(x.dtype)
    # An eager backward (grad mode off: no double backward, whose error the op raises) runs the
    # kernels' wrapper directly, as the op's eager path would; tracing gets the op.
    if not _grad_enabled() and direct_ok(grad, x, channel_gate, spatial_gate):
        return _backward_impl(grad, x, channel_gate, spatial_gate)
    return cbam_gate_backward_triton(grad, x, channel_gate, spatial_gate)


cbam_gate_triton.register_autograd(_backward, setup_context=_setup_context)


def _gate_forward(ctx, x, channel_gate, spatial_gate):
    ctx.save_for_backward(x, channel_gate, spatial_gate)
    return _forward(x, channel_gate, spatial_gate)


# The eager-mode graph node of cbam_gate_eager: what the custom op's eager path builds from its
# registrations (ops/_eager.py), with the saving and the call of the forward's work written out.
_gate_apply = direct_node("segkd::cbam_gate_triton", _gate_forward, _backward)


def cbam_gate_eager(x: torch.Tensor, channel_gate: torch.Tensor, spatial_gate: torch.Tensor) -> torch.Tensor:
    """The public call's entry (api.py, tensors checked there, on one device): the custom op's eager
    fast path for exactly these three arguments, without its generic argument handling; the op
    itself wherever the dispatcher is needed (ops/_eager.direct_ok)."""
    if not direct_ok(x, channel_gate, spatial_gate):
        return cbam_gate_triton(x, channel_gate, spatial_gate)
    if _grad_enabled() and _any_requires_grad(x, channel_gate, spatial_gate):
        return _gate_apply(x, channel_gate, spatial_gate)
    return _forward(x, channel_gate, spatial_gate)
