"""Backward of ops whose forward already wrote the student gradient ds (Liger-style).

The backward returns ds * grad_output, and must never read grad_output on the host (a device sync in
every backward, which stalls the host until the GPU has drained its queue).

Triton ops (scale_saved_grad): always one elementwise pass into a new tensor.

CUDA ops (register_saved_grad_autograd): the forward writes ds in the kernels' dtype (the student's)
and the backward fixes it on the device, where grad_output is read by the kernel's own threads: a
grad_output of exactly 1 (a plain loss.backward()) leaves ds untouched, so no pass over it at all;
any other value rescales it in place (the op's `rescale`): fp32 with segkd_kernels._cuda's
saved_grad_scale (one native pass, scale_in_place), fp16/bf16 by recomputing the gradient times
grad_output from the inputs (one rounding, as the reference; scaling the rounded ds would round twice, which the half-precision
error budget of docs/backends.md does not always absorb). ds itself is then handed out, which is only
safe when nothing can use ds after this backward:
  - the graph is not retained (a second backward would find ds already scaled, and a gradient handed
    out to .grad could change under it), read from the running graph task; otherwise the same fix
    runs on a copy of ds;
  - no graph of the backward itself is being built (create_graph: the result must be a
    differentiable expression of grad_output) and nothing traces the call (torch.compile, fake or
    functional tensors: a traced in-place kernel on a saved tensor is not a functional graph); then
    the backward is ds * grad_output in ds's dtype (in fp16/bf16 rounded twice).
Mixed student / teacher dtypes compute ds in fp32 and return ds * grad_output rounded once to the
student's dtype.
"""

from __future__ import annotations

import torch



def scale_saved_grad(ds: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """ds * grad_output, in ds's dtype, with no host read of grad_output."""
    return ds * grad.to(ds.dtype)


def _graph_is_retained() -> bool:
    """True when the running backward keeps its graph (retain_graph=True), or when that cannot be told
    (then the caller must not consume the saved tensors)."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):
        return True


def _traced(ds: torch.Tensor) -> bool:
    """Whether ds is not a plain tensor with real storage, or the call is being traced."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode  # noqa: PLC0415

    return (type(ds) is not torch.Tensor or torch._is_functional_tensor(ds) or ds.device.type == "meta"
            or torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None)


def scale_in_place(lib, ds: torch.Tensor, grad_output: torch.Tensor, args: dict) -> None:
    """ds *= grad_output on the device (fp32 arithmetic, ds's dtype), nothing when it is exactly 1."""
    lib.saved_grad_scale(ds.data_ptr(), grad_output.data_ptr(), ds.numel(), **args)


def register_saved_grad_autograd(op, op_name: str, rescale) -> None:
    """Autograd for a cuda custom op with inputs (student, ..., need_grad) and outputs (loss, ds)
    where ds is the student gradient for grad_output == 1, in the dtype the kernels computed in (the
    student's, or fp32 for mixed student / teacher dtypes), empty when need_grad is False.

    rescale(inputs, ds, grad_output) rewrites ds in place as the gradient for grad_output (a 0-dim
    tensor of ds's dtype, read on the device only), leaving it untouched when grad_output is exactly
    1; inputs are the op's inputs for fp16/bf16 ds (recomputed from them), None for fp32 ds (scaled).
    Every other input gets no gradient (the teacher is a target, the rest are options)."""

    def setup_context(ctx, inputs, output):
        ctx.need_grad = inputs[-1]
        ctx.student_dtype = inputs[0].dtype
        ctx.n_inputs = len(inputs)
        ctx.mark_non_differentiable(output[1])
        # the inputs are kept only where the backward may recompute from them
        ctx.recompute = output[1].dtype in (torch.float16, torch.bfloat16)
        if ctx.recompute:
            ctx.input_slots = [isinstance(x, torch.Tensor) for x in inputs]
            ctx.plain_inputs = [None if isinstance(x, torch.Tensor) else x for x in inputs]
            ctx.save_for_backward(output[1], *[x for x in inputs if isinstance(x, torch.Tensor)])
        else:
            ctx.save_for_backward(output[1])

    def backward(ctx, grad_loss, _grad_ds):
        ds, *saved = ctx.saved_tensors
        if not ctx.need_grad:
            raise RuntimeError(f"{op_name}: the cuda op ran with need_grad=False, so it has no gradient to return")
        rest = (None,) * (ctx.n_inputs - 1)
        if grad_loss is None:
            return (None, *rest)
        if ds.dtype != ctx.student_dtype or torch.is_grad_enabled() or _traced(ds) or _traced(grad_loss):
            return ((ds * grad_loss.to(ds.dtype)).to(ctx.student_dtype), *rest)
        out = ds if not _graph_is_retained() else ds.clone()
        g = grad_loss.detach().to(ds.dtype).contiguous()
        inputs = None
        if ctx.recompute:
            it = iter(saved)
            inputs = tuple(next(it) if slot else plain for slot, plain in zip(ctx.input_slots, ctx.plain_inputs))
        rescale(inputs, out, g)
        return (out, *rest)

    op.register_autograd(backward, setup_context=setup_context)
