"""Autograd glue shared by the triton and cuda custom ops of spatial_pool.

Both backends expose the same pair of ops:
  forward(x)                                  -> (avg, max, argmax)   argmax: int64 per (n, c)
  backward(grad_avg, grad_max, argmax, H, W)  -> dx
"""

import torch


def register(forward_op, backward_op) -> None:
    def setup_context(ctx, inputs, output):
        (x,) = inputs
        ctx.save_for_backward(output[2])
        ctx.x_dtype = x.dtype
        ctx.hw = (x.shape[2], x.shape[3])

    def backward(ctx, grad_avg, grad_max, _grad_argmax):
        (argmax,) = ctx.saved_tensors
        # Unused outputs may arrive as None; the kernels want both gradients in x's dtype.
        if grad_avg is None:
            grad_avg = argmax.new_zeros(argmax.shape, dtype=ctx.x_dtype)
        if grad_max is None:
            grad_max = argmax.new_zeros(argmax.shape, dtype=ctx.x_dtype)
        # (both backward ops make their arguments contiguous themselves)
        if grad_avg.dtype != ctx.x_dtype:
            grad_avg = grad_avg.to(ctx.x_dtype)
        if grad_max.dtype != ctx.x_dtype:
            grad_max = grad_max.to(ctx.x_dtype)
        return backward_op(grad_avg, grad_max, argmax, *ctx.hw)

    forward_op.register_autograd(backward, setup_context=setup_context)

    @forward_op.register_fake
    def _(x):
        n, c = x.shape[:2]
        return x.new_empty(n, c), x.new_empty(n, c), x.new_empty(n, c, dtype=torch.int64)

    @backward_op.register_fake
    def _(grad_avg, grad_max, argmax, h, w):
        return grad_avg.new_empty(*grad_avg.shape, h, w)
