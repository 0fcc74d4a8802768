"""Backward of ops whose forward already wrote the student gradient ds (Liger-style).

The backward returns ds * grad_output, always as one elementwise pass into a new tensor.

Returning ds itself when grad_output is exactly 1 (a plain loss.backward()) would save that pass,
but deciding it needs the value of grad_output on the host: a device sync in every backward,
which stalls the host until the GPU has drained its queue and costs far more than the pass at
the shapes where it matters (an fp32 8x19x128x256 ds is 40 MB read and written, about 10 us of
HBM time). No device-side test can replace it: whether the result aliases ds is a host-side
decision, and scaling the saved ds in place (a kernel that skips the work when grad_output is 1)
would be wrong the second time a retained graph runs its backward, and would change a gradient
already handed out to .grad. So the multiply is unconditional: no sync, the same code path for
eager, compiled and traced execution, and ds itself is never handed out.
"""

from __future__ import annotations

import torch


def scale_saved_grad(ds: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """ds * grad_output, in ds's dtype, with no host read of grad_output."""
    return ds * grad.to(ds.dtype)


def register_saved_grad_autograd(op, op_name: str) -> None:
    """Autograd for a cuda custom op with inputs (student, ..., need_grad) and outputs (loss, ds)
    where ds is the student gradient for grad_output == 1 in fp32 (empty when need_grad is False).

    The backward scales ds in fp32 and returns it in the student's dtype: fp16/bf16 gradients are
    rounded once (a ds already rounded to the student's dtype would be rounded twice whenever
    grad_output != 1). Every other input gets no gradient (the teacher is a target, the rest are
    options)."""

    def setup_context(ctx, inputs, output):
        ctx.need_grad = inputs[-1]
        ctx.student_dtype = inputs[0].dtype
        ctx.n_inputs = len(inputs)
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])

    def backward(ctx, grad_loss, _grad_ds):
        (ds,) = ctx.saved_tensors
        if not ctx.need_grad:
            raise RuntimeError(f"{op_name}: the cuda op ran with need_grad=False, so it has no gradient to return")
        rest = (None,) * (ctx.n_inputs - 1)
        if grad_loss is None:
            return (None, *rest)
        return ((ds.float() * grad_loss.float()).to(ctx.student_dtype), *rest)

    op.register_autograd(backward, setup_context=setup_context)
