"""cross_image_kd on the hand-written CUDA kernels of csrc/cross_image_kd.cu (flash-style).

Forward: per-pixel norms of both feature maps, then similarity tiles per ordered image pair streamed
with running max / sum-exp per row (the dot products run on the raw inputs, the normalisation is one
fp32 scale per entry); per-row KL and the two log-sum-exps are written (O(N^2 P) memory, never
O(P^2)). Backward recomputes the tiles from the saved log-sum-exps and accumulates d loss / d
normalised student, then the normalisation backward. fp16 / bf16 with C_s <= 256 and C_t <= 512 run
the tensor-core kernels (64 x 32 tiles, resident row tiles, cp.async double buffers, each tile
computed once in the backward, column gradients added with fp32 atomics); fp32 with C_s <= 256 and
C_t <= 512 the same structure on tf32 tensor cores with the 3xTF32 split (32 x 16 tiles, one or two
column buffers as the shared memory allows); wider channels, or rows that do not fit the device's
shared memory, run 32 x 32 tiles on FMA (fp32) or wmma (16-bit S/T only). The launcher picks; see
the .cu header.
"""

from __future__ import annotations

import torch

from .._cuda_common import cuda_lib, launch_args
from ..pairwise_kd.cuda import normalize_pixels_backward, pixel_norms
from .reference import NORM_EPS

OP = "cross_image_kd"


def _check(student, teacher):
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[0] != teacher.shape[0] \
            or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"{OP}: expected (N, C_s, H, W) and (N, C_t, H, W), got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")


def _prepare(lib, student, teacher):
    """Contiguous inputs in one dtype, launch arguments, (norm_s, inv_s, inv_t) fp32 (N, P)."""
    _check(student, teacher)
    args = launch_args(OP, student)
    dtype = student.dtype if teacher.dtype == student.dtype else torch.float32
    s = student.detach().to(dtype).contiguous()
    t = teacher.detach().to(dtype).contiguous()
    args["dtype"] = launch_args(OP, s)["dtype"]
    norm_s, norm_t = pixel_norms(lib, s), pixel_norms(lib, t)
    inv_s = 1.0 / norm_s.clamp_min(NORM_EPS)
    inv_t = 1.0 / norm_t.clamp_min(NORM_EPS)
    return s, t, args, norm_s, inv_s, inv_t


@torch.library.custom_op("segkd::cross_image_kd_cuda", mutates_args=())
def cross_image_kd_cuda(student: torch.Tensor, teacher: torch.Tensor, tau: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss 0-dim in the student's dtype, lse (2, N, N, P) fp32: row log-sum-exps of S and T)."""
    lib = cuda_lib(OP)
    _check(student, teacher)
    n, cs, h, w = student.shape
    p = h * w
    lse = torch.zeros(2, n, n, p, dtype=torch.float32, device=student.device)
    if n * p == 0:
        launch_args(OP, student)
        return student.new_zeros(()), lse
    s, t, args, _norm_s, inv_s, inv_t = _prepare(lib, student, teacher)
    row_kl = torch.empty(n, n, p, dtype=torch.float32, device=s.device)
    lib.cross_image_forward(s.data_ptr(), t.data_ptr(), inv_s.data_ptr(), inv_t.data_ptr(), row_kl.data_ptr(),
                            lse.data_ptr(), n, cs, t.shape[1], p, float(tau), **args)
    loss = row_kl.double().sum() / (n * n * p)
    return loss.to(student.dtype), lse


@torch.library.custom_op("segkd::cross_image_kd_backward_cuda", mutates_args=())
def cross_image_kd_backward_cuda(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                                 lse: torch.Tensor, tau: float) -> torch.Tensor:
    """d loss / d student (kernel dtype, contiguous) for the upstream gradient grad_loss (0-dim)."""
    lib = cuda_lib(OP)
    _check(student, teacher)
    n, cs, h, w = student.shape
    p = h * w
    dtype = student.dtype if teacher.dtype == student.dtype else torch.float32
    if n * p * cs == 0:
        launch_args(OP, student)
        return torch.zeros(student.shape, dtype=dtype, device=student.device)
    s, t, args, norm_s, inv_s, inv_t = _prepare(lib, student, teacher)
    da = torch.zeros(n, cs, h, w, dtype=torch.float32, device=s.device)
    g = grad_loss.detach().to(torch.float32).reshape(1).contiguous()
    lib.cross_image_backward(s.data_ptr(), t.data_ptr(), inv_s.data_ptr(), inv_t.data_ptr(),
                             lse.contiguous().data_ptr(), g.data_ptr(), da.data_ptr(), n, cs, t.shape[1], p, float(tau),
                             **args)
    return normalize_pixels_backward(lib, da, s, norm_s, False)


@cross_image_kd_cuda.register_fake
def _(student, teacher, tau):
    n, _, h, w = student.shape
    return student.new_empty(()), student.new_empty(2, n, n, h * w, dtype=torch.float32)


@cross_image_kd_backward_cuda.register_fake
def _(grad_loss, student, teacher, lse, tau):
    dtype = student.dtype if teacher.dtype == student.dtype else torch.float32
    return student.new_empty(student.shape, dtype=dtype)


def _setup_context(ctx, inputs, output):
    student, teacher, tau = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(student, teacher, output[1])
    ctx.tau = tau
    ctx.student_dtype = student.dtype


def _backward(ctx, grad_loss, _grad_lse):
    student, teacher, lse = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None
    ds = cross_image_kd_backward_cuda(grad_loss, student, teacher, lse, ctx.tau)
    return ds.to(ctx.student_dtype), None, None


cross_image_kd_cuda.register_autograd(_backward, setup_context=_setup_context)
