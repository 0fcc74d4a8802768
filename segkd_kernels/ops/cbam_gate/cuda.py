"""cbam_gate on the hand-written CUDA kernels of csrc/channel_pool.cu: out = M_s * (M_c * x).

Forward: one elementwise pass, M_c * x never stored. Backward: one pass per (n, c) row for dx and
dM_c (in-block reduction; per-range partials added in a fixed order when rows are split over
blocks) and one pass per pixel for dM_s (sum over channels).
"""

from __future__ import annotations

import torch

from .._cuda_common import cuda_lib, launch_args

OP = "cbam_gate"


def _gates(x, channel_gate, spatial_gate):
    n, c, h, w = x.shape
    if channel_gate.numel() != n * c or spatial_gate.numel() != n * h * w:
        raise ValueError(f"{OP}: gates must hold N * C and N * H * W values for x of shape {tuple(x.shape)}, got "
                         f"{tuple(channel_gate.shape)} and {tuple(spatial_gate.shape)}")
    mc = channel_gate.detach().reshape(n, c).to(torch.float32).contiguous()
    ms = spatial_gate.detach().reshape(n, h * w).to(torch.float32).contiguous()
    return mc, ms


@torch.library.custom_op("segkd::cbam_gate_cuda", mutates_args=())
def cbam_gate_cuda(x: torch.Tensor, channel_gate: torch.Tensor, spatial_gate: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in x's dtype; channel_gate (N, C), spatial_gate (N, H, W)."""
    lib = cuda_lib(OP)
    if x.dim() != 4:
        raise ValueError(f"{OP}: expected x of shape (N, C, H, W), got {tuple(x.shape)}")
    args = launch_args(OP, x)
    xc = x.detach().contiguous()
    mc, ms = _gates(xc, channel_gate, spatial_gate)
    n, c, h, w = xc.shape
    out = torch.empty_like(xc)
    lib.cbam_gate_forward(xc.data_ptr(), mc.data_ptr(), ms.data_ptr(), out.data_ptr(), n, c, h * w, **args)
    return out


@torch.library.custom_op("segkd::cbam_gate_backward_cuda", mutates_args=())
def cbam_gate_backward_cuda(grad_out: torch.Tensor, x: torch.Tensor, channel_gate: torch.Tensor,
                            spatial_gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, d channel_gate (N, C) fp32, d spatial_gate (N, H, W) fp32)."""
    lib = cuda_lib(OP)
    args = launch_args(OP, x)
    xc = x.detach().contiguous()
    mc, ms = _gates(xc, channel_gate, spatial_gate)
    n, c, h, w = xc.shape
    g = grad_out.detach().to(x.dtype).contiguous()
    dx = torch.empty_like(xc)
    # the kernels write every value of both gate gradients; with no element to read (C or H*W 0)
    # nothing runs and the sums over the empty axis are 0
    alloc = torch.zeros if xc.numel() == 0 else torch.empty
    dmc = alloc(n, c, dtype=torch.float32, device=x.device)
    dms = alloc(n, h, w, dtype=torch.float32, device=x.device)
    # per-pixel-tile dM_c partials and per-channel-slice dM_s partials (fp32) where there are several
    floats = lib.cbam_gate_backward_workspace(n, c, h * w, args["device"])
    ws = torch.empty(floats, dtype=torch.float32, device=x.device) if floats else None
    lib.cbam_gate_backward(g.data_ptr(), xc.data_ptr(), mc.data_ptr(), ms.data_ptr(), dx.data_ptr(), dmc.data_ptr(),
                           dms.data_ptr(), 0 if ws is None else ws.data_ptr(), floats, n, c, h * w, **args)
    return dx, dmc, dms


@cbam_gate_cuda.register_fake
def _(x, channel_gate, spatial_gate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@cbam_gate_backward_cuda.register_fake
def _(grad_out, x, channel_gate, spatial_gate):
    n, c, h, w = x.shape
    return (x.new_empty(n, c, h, w), x.new_empty(n, c, dtype=torch.float32),
            x.new_empty(n, h, w, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    x, channel_gate, spatial_gate = ctx.saved_tensors
    if grad_out is None:
        return None, None, None
    dx, dmc, dms = cbam_gate_backward_cuda(grad_out, x, channel_gate, spatial_gate)
    return (dx, dmc.reshape(channel_gate.shape).to(channel_gate.dtype),
            dms.reshape(spatial_gate.shape).to(spatial_gate.dtype))


cbam_gate_cuda.register_autograd(_backward, setup_context=_setup_context)
