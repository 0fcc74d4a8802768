"""cbam_gate on the hand-written CUDA kernels of csrc/channel_pool.cu: out = M_s * (M_c * x).

Forward: one elementwise pass, M_c * x never stored. Backward: one pass per (n, c) row for dx and
dM_c (in-block reduction; per-range partials added in a fixed order when rows are split over
blocks) and one pass per pixel for dM_s (sum over channels).
"""

from __future__ import annotations

import torch

from .._cuda_common import cuda_lib, launch_args
from .._eager import direct_node, direct_ok

OP = "cbam_gate"

_grad_enabled = torch._C.is_grad_enabled
_any_requires_grad = torch._C._any_requires_grad


def _f32(t: torch.Tensor) -> torch.Tensor:
    """t as the kernels read a gate: fp32, contiguous (no copy when it already is, one otherwise).
    Not t.to(float32, memory_format=contiguous_format): for an fp32 strided view (a gate sliced
    out of a larger tensor) that returns the view itself, and the kernels would read its storage as
    if it were dense."""
    if t.dtype == torch.float32:
        return t.contiguous()
    out = torch.empty(t.shape, dtype=torch.float32, device=t.device)
    out.copy_(t)
    return out


def _gates(x, channel_gate, spatial_gate):
    """M_c and M_s as fp32 contiguous tensors: in memory (N, C) and (N, H * W) whether they come as
    (N, C) / (N, C, 1, 1) and (N, 1, H, W) / (N, H, W)."""
    n, c, h, w = x.shape
    if channel_gate.numel() != n * c or spatial_gate.numel() != n * h * w:
        raise ValueError(f"{OP}: gates must hold N * C and N * H * W values for x of shape {tuple(x.shape)}, got "
                         f"{tuple(channel_gate.shape)} and {tuple(spatial_gate.shape)}")
    return _f32(channel_gate), _f32(spatial_gate)


def _forward(x: torch.Tensor, channel_gate: torch.Tensor, spatial_gate: torch.Tensor) -> torch.Tensor:
    """The forward's work (the custom op's body, and the eager entry's)."""
    lib = cuda_lib(OP)
    if x.dim() != 4:
        raise ValueError(f"{OP}: expected x of shape (N, C, H, W), got {tuple(x.shape)}")
    args = launch_args(OP, x)
    xc = x.contiguous()
    mc, ms = _gates(xc, channel_gate, spatial_gate)
    n, c, h, w = xc.shape
    out = torch.empty_like(xc)
    lib.cbam_gate_forward(xc.data_ptr(), mc.data_ptr(), ms.data_ptr(), out.data_ptr(), n, c, h * w, **args)
    return out


@torch.library.custom_op("segkd::cbam_gate_cuda", mutates_args=())
def cbam_gate_cuda(x: torch.Tensor, channel_gate: torch.Tensor, spatial_gate: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in x's dtype; channel_gate (N, C) or (N, C, 1, 1), spatial_gate (N, 1, H, W) or
    (N, H, W)."""
    return _forward(x, channel_gate, spatial_gate)


def _backward_impl(grad_out: torch.Tensor, x: torch.Tensor, channel_gate: torch.Tensor,
                   spatial_gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The backward's work (the backward custom op's body, and the eager backward's)."""
    lib = cuda_lib(OP)
    args = launch_args(OP, x)
    xc = x.contiguous()
    mc, ms = _gates(xc, channel_gate, spatial_gate)
    n, c, h, w = xc.shape
    g = grad_out if grad_out.dtype == x.dtype else grad_out.to(x.dtype)
    g = g.contiguous()
    dx = torch.empty_like(xc)
    # the kernels write every value of both gate gradients; with no element to read (C or H*W 0)
    # nothing runs and the sums over the empty axis are 0
    alloc = torch.empty_like if n * c * h * w else torch.zeros_like
    # mc and ms: the gates' shapes, fp32 and contiguous, which *_like keeps with no arguments to parse
    dmc, dms = alloc(mc), alloc(ms)
    # per-pixel-tile dM_c partials and per-channel-slice dM_s partials (fp32) where there are several
    floats = lib.cbam_gate_backward_workspace(n, c, h * w, args["device"])
    ws = torch.empty(floats, dtype=torch.float32, device=x.device) if floats else None
    lib.cbam_gate_backward(g.data_ptr(), xc.data_ptr(), mc.data_ptr(), ms.data_ptr(), dx.data_ptr(), dmc.data_ptr(),
                           dms.data_ptr(), 0 if ws is None else ws.data_ptr(), floats, n, c, h * w, **args)
    return dx, dmc, dms


@torch.library.custom_op("segkd::cbam_gate_backward_cuda", mutates_args=())
def cbam_gate_backward_cuda(grad_out: torch.Tensor, x: torch.Tensor, channel_gate: torch.Tensor,
                            spatial_gate: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, d channel_gate, d spatial_gate): the gates' gradients fp32, in the gates'
    shapes."""
    return _backward_impl(grad_out, x, channel_gate, spatial_gate)


@cbam_gate_cuda.register_fake
def _(x, channel_gate, spatial_gate):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@cbam_gate_backward_cuda.register_fake
def _(grad_out, x, channel_gate, spatial_gate):
    n, c, h, w = x.shape
    return (x.new_empty(n, c, h, w), x.new_empty(channel_gate.shape, dtype=torch.float32),
            x.new_empty(spatial_gate.shape, dtype=torch.float32))


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad_out):
    x, channel_gate, spatial_gate = ctx.saved_tensors
    if grad_out is None:
        return None, None, None
    # An eager backward (grad mode off: no double backward, whose error the op raises) runs the
    # kernels' wrapper directly, as the op's eager path would; tracing gets the op.
    if not _grad_enabled() and direct_ok(grad_out, x, channel_gate, spatial_gate):
        dx, dmc, dms = _backward_impl(grad_out, x, channel_gate, spatial_gate)
    else:
        dx, dmc, dms = cbam_gate_backward_cuda(grad_out, x, channel_gate, spatial_gate)
    if dmc.dtype != channel_gate.dtype:
        dmc = dmc.to(channel_gate.dtype)
    if dms.dtype != spatial_gate.dtype:
        dms = dms.to(spatial_gate.dtype)
    return dx, dmc, dms


cbam_gate_cuda.register_autograd(_backward, setup_context=_setup_context)


def _gate_forward(ctx, x, channel_gate, spatial_gate):
    ctx.save_for_backward(x, channel_gate, spatial_gate)
    return _forward(x, channel_gate, spatial_gate)


# The eager-mode graph node of cbam_gate_cuda_eager: what the custom op's eager path builds from
# its registrations (ops/_eager.py), with the saving and the call of the forward's work written out.
_gate_apply = direct_node("segkd::cbam_gate_cuda", _gate_forward, _backward)


def cbam_gate_cuda_eager(x: torch.Tensor, channel_gate: torch.Tensor, spatial_gate: torch.Tensor) -> torch.Tensor:
    """The public call's entry (api.py, tensors checked there, on one device): the custom op's eager
    fast path for exactly these three arguments, without its generic argument handling; the op
    itself wherever the dispatcher is needed (ops/_eager.direct_ok)."""
    if not direct_ok(x, channel_gate, spatial_gate):
        return cbam_gate_cuda(x, channel_gate, spatial_gate)
    if _grad_enabled() and _any_requires_grad(x, channel_gate, spatial_gate):
        return _gate_apply(x, channel_gate, spatial_gate)
    return _forward(x, channel_gate, spatial_gate)
