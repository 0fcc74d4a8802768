"""attnfd_loss on the hand-written CUDA kernels of csrc/channel_pool.cu and csrc/attnfd_loss.cu.

The loss comes from three dot products <s,s>, <t,t>, <s,t> accumulated in fp64 per block and
combined in fp64 (one block, fixed order) with exactly the clamped form of reference.py,
    (<s,s> / ns^2 + <t,t> / nt^2 - 2 <s,t> / (ns nt)) / N,   ns = max(||s||, eps), nt likewise.
(Combining fp32 dots in fp32 as 2 - 2 cos is several % off near s == t.) The gradient is
alpha * s + beta * t with alpha, beta computed on the device from the saved dots (see
gradient_coefficients), so neither direction runs torch arithmetic on the host.
"""

from __future__ import annotations

import torch

from .._cuda_common import _DTYPE_CODES, cuda_lib, launch_args
from .reference import NORM_EPS

OP = "attnfd_loss"


def _common(student: torch.Tensor, teacher: torch.Tensor):
    if student.shape != teacher.shape:
        raise ValueError(f"{OP}: expected tensors of one shape, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    dtype = student.dtype if teacher.dtype == student.dtype else torch.float32
    args = launch_args(OP, student)
    s = student.detach().to(dtype).contiguous()
    t = teacher.detach().to(dtype).contiguous()
    if dtype != student.dtype:  # the student's dtype was checked by launch_args; float32 is supported
        args["dtype"] = _DTYPE_CODES[dtype]
    return s, t, args


@torch.library.custom_op("segkd::attnfd_loss_cuda", mutates_args=())
def attnfd_loss_cuda(student: torch.Tensor, teacher: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss 0-dim in the student's dtype, dots (3,) fp64: <s,s>, <t,t>, <s,t>).

    Two launches: the per-block partials (csrc/channel_pool.cu), then one block that sums them in a
    fixed order and writes the dots and the loss (csrc/attnfd_loss.cu); no torch arithmetic."""
    lib = cuda_lib(OP)
    s, t, args = _common(student, teacher)
    total = s.numel()
    blocks = lib.attnfd_num_partials(total) if total > 0 else 0
    partials = torch.empty(blocks, 3, dtype=torch.float64, device=s.device)
    if total > 0:
        lib.attnfd_dots(s.data_ptr(), t.data_ptr(), partials.data_ptr(), total, blocks, **args)
    loss = torch.empty((), dtype=student.dtype, device=s.device)
    dots = torch.empty(3, dtype=torch.float64, device=s.device)
    lib.attnfd_finish(partials.data_ptr(), blocks, loss.data_ptr(), dots.data_ptr(), max(student.shape[0], 1),
                      NORM_EPS, _DTYPE_CODES[student.dtype], args["device"], args["stream"])
    return loss, dots


@torch.library.custom_op("segkd::attnfd_loss_backward_cuda", mutates_args=())
def attnfd_loss_backward_cuda(student: torch.Tensor, teacher: torch.Tensor, dots: torch.Tensor,
                              grad: torch.Tensor) -> torch.Tensor:
    """ds = grad * (alpha * s + beta * t) in the kernel dtype, alpha and beta computed by the kernel
    from dots ((3,) fp64 on the device, as attnfd_loss_cuda returns them); grad: 0-dim."""
    lib = cuda_lib(OP)
    s, t, args = _common(student, teacher)
    ds = torch.empty_like(s)
    if s.numel() > 0:
        d = dots.to(torch.float64).contiguous()
        g = grad.to(s.dtype)
        lib.attnfd_backward_dots(s.data_ptr(), t.data_ptr(), d.data_ptr(), g.data_ptr(), ds.data_ptr(), s.numel(),
                                 max(student.shape[0], 1), NORM_EPS, **args)
    return ds


@attnfd_loss_cuda.register_fake
def _(student, teacher):
    return student.new_empty(()), student.new_empty(3, dtype=torch.float64)


@attnfd_loss_backward_cuda.register_fake
def _(student, teacher, dots, grad):
    dtype = student.dtype if teacher.dtype == student.dtype else torch.float32
    return student.new_empty(student.shape, dtype=dtype)


def gradient_coefficients(dots: torch.Tensor, batch: int) -> torch.Tensor:
    """(alpha, beta) with d loss / d s = alpha * s + beta * t, in fp64: the formula that
    attnfd_backward_dots_kernel (csrc/attnfd_loss.cu) evaluates on the device, stated in torch so the
    tests can check it against autograd.

    loss = (ss / ns^2 + tt / nt^2 - 2 st / (ns nt)) / N. Where ||s|| >= eps (torch.clamp_min passes
    the gradient there) ns = ||s|| and the ss-terms cancel exactly: alpha = 2 st / (N ns^3 nt).
    Below eps ns is the constant eps: alpha = 2 / (N ns^2)."""
    ss, tt, st = dots.unbind()
    norm_s = ss.sqrt()
    ns, nt = norm_s.clamp_min(NORM_EPS), tt.sqrt().clamp_min(NORM_EPS)
    alpha = torch.where(norm_s >= NORM_EPS, 2.0 * st / (ns * ns * ns * nt), 2.0 / (ns * ns)) / batch
    beta = -2.0 / (ns * nt) / batch
    return torch.stack([alpha, beta])


def _setup_context(ctx, inputs, output):
    student, teacher = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(student, teacher, output[1])
    ctx.student_dtype = student.dtype


def _backward(ctx, grad_loss, _grad_dots):
    student, teacher, dots = ctx.saved_tensors
    if grad_loss is None:
        return None, None
    ds = attnfd_loss_backward_cuda(student, teacher, dots, grad_loss)
    return ds.to(ctx.student_dtype), None


attnfd_loss_cuda.register_autograd(_backward, setup_context=_setup_context)
