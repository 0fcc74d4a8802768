"""Backward of ops whose forward already wrote the student gradient ds (Liger-style).

The backward must return ds * grad_output. When grad_output is exactly 1 (a plain
loss.backward()), returning ds itself saves a full read+write pass over it. Testing that needs a
host sync, which pays off from _SKIP_SCALE_MIN_NUMEL elements on (Liger-Kernel does the same), and
is only done in plain eager execution: under torch.compile, tracing or fake tensors there is no
data-dependent branch, the backward always multiplies.
"""

from __future__ import annotations

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_SKIP_SCALE_MIN_NUMEL = 1 << 22


def _eager(grad: torch.Tensor) -> bool:
    """Plain eager execution: no compile, no tracing or fake mode (grad holds real data)."""
    return (not torch.compiler.is_compiling() and type(grad) is torch.Tensor
            and _get_current_dispatch_mode() is None)


def scale_saved_grad(ds: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """ds * grad_output; ds itself when grad_output is 1 (autograd's reference counting keeps the
    saved ds safe from in-place accumulation, as for any returned gradient)."""
    if _eager(grad) and (ds.device.type == "cpu" or ds.numel() >= _SKIP_SCALE_MIN_NUMEL) and bool(grad == 1):
        return ds
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
