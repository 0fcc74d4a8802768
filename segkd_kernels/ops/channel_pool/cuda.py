"""channel_pool on the hand-written CUDA kernels of csrc/channel_pool.cu.

Forward: [max over C, mean over C] of x * gate per pixel, x * gate never stored; the first maximal
channel per pixel (int32) is kept for the backward. Backward: dx and, with a gate, dgate (fp32 from
an in-block reduction; per-split partials added in a fixed order when rows are split over blocks).
"""

from __future__ import annotations

import torch

from .._cuda_common import cuda_lib, launch_args

OP = "channel_pool"


def _gate_f32(x: torch.Tensor, gate: torch.Tensor | None) -> torch.Tensor | None:
    if gate is None:
        return None
    n, c = x.shape[:2]
    if gate.numel() != n * c:
        raise ValueError(f"{OP}: gate must hold N * C = {n * c} values, got shape {tuple(gate.shape)}")
    return gate.detach().reshape(n, c).to(torch.float32).contiguous()


@torch.library.custom_op("segkd::channel_pool_cuda", mutates_args=())
def channel_pool_cuda(x: torch.Tensor, gate: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(out (N, 2, H, W) in x's dtype: [max, mean] over C of x * gate, argmax (N, H, W) int32)."""
    lib = cuda_lib(OP)
    if x.dim() != 4:
        raise ValueError(f"{OP}: expected x of shape (N, C, H, W), got {tuple(x.shape)}")
    args = launch_args(OP, x)
    xc = x.detach().contiguous()
    g = _gate_f32(xc, gate)
    n, c, h, w = xc.shape
    out = xc.new_empty(n, 2, h, w)
    argmax = torch.empty(n, h, w, dtype=torch.int32, device=x.device)
    if n * h * w > 0:
        if c == 0:
            raise ValueError(f"{OP}: C must be positive")
        lib.channel_pool_forward(xc.data_ptr(), 0 if g is None else g.data_ptr(), out.data_ptr(), argmax.data_ptr(),
                                 n, c, h * w, **args)
    return out, argmax


@torch.library.custom_op("segkd::channel_pool_backward_cuda", mutates_args=())
def channel_pool_backward_cuda(grad_out: torch.Tensor, argmax: torch.Tensor, x: torch.Tensor,
                               gate: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(dx in x's dtype, dgate (N, C) fp32; empty without a gate)."""
    lib = cuda_lib(OP)
    args = launch_args(OP, x)
    xc = x.detach().contiguous()
    g = _gate_f32(xc, gate)
    n, c, h, w = xc.shape
    go = grad_out.to(x.dtype).contiguous()
    dx = xc.new_empty(n, c, h, w)
    dgate = x.new_empty((n, c) if g is not None else (0,), dtype=torch.float32)
    if n * c > 0:
        if h * w == 0:
            dgate.zero_()
        else:
            # rows split over blocks (too few rows for two waves): per-split dgate partials, fp32
            floats = lib.channel_pool_backward_workspace(n, c, h * w, args["device"]) if g is not None else 0
            ws = torch.empty(floats, dtype=torch.float32, device=x.device) if floats else None
            lib.channel_pool_backward(go.data_ptr(), argmax.contiguous().data_ptr(), xc.data_ptr(),
                                      0 if g is None else g.data_ptr(), dx.data_ptr(),
                                      0 if g is None else dgate.data_ptr(), 0 if ws is None else ws.data_ptr(),
                                      floats, n, c, h * w, **args)
    return dx, dgate


@channel_pool_cuda.register_fake
def _(x, gate):
    n, c, h, w = x.shape
    return x.new_empty(n, 2, h, w), x.new_empty(n, h, w, dtype=torch.int32)


@channel_pool_backward_cuda.register_fake
def _(grad_out, argmax, x, gate):
    n, c = x.shape[:2]
    dgate = x.new_empty(n, c, dtype=torch.float32) if gate is not None else x.new_empty(0, dtype=torch.float32)
    return x.new_empty(x.shape), dgate


def _setup_context(ctx, inputs, output):
    x, gate = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(x, gate, output[1])
    ctx.has_gate = gate is not None


def _backward(ctx, grad_out, _grad_argmax):
    x, gate, argmax = ctx.saved_tensors
    if grad_out is None:
        return None, None
    dx, dgate = channel_pool_backward_cuda(grad_out, argmax, x, gate if ctx.has_gate else None)
    if not ctx.has_gate:
        return dx, None
    return dx, dgate.reshape(gate.shape).to(gate.dtype)


channel_pool_cuda.register_autograd(_backward, setup_context=_setup_context)
