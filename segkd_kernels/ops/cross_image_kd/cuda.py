"""cross_image_kd on the hand-written CUDA kernels of csrc/cross_image_kd.cu (flash-style).

Forward: normalise the pixels of both feature maps (fp32 copies), then stream 32 x 32 similarity
tiles per ordered image pair, keeping running max / sum-exp per row; per-row KL and the two
log-sum-exps are written (O(N^2 P) memory, never O(P^2)). Backward recomputes the tiles from the
saved log-sum-exps and accumulates d loss / d normalised student, then the normalisation backward.
"""

from __future__ import annotations

import torch

from .._cuda_common import cuda_lib, launch_args
from ..pairwise_kd.cuda import normalize_pixels, normalize_pixels_backward

OP = "cross_image_kd"


def _check(student, teacher):
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[0] != teacher.shape[0] \
            or student.shape[2:] != teacher.shape[2:]:
        raise ValueError(f"{OP}: expected (N, C_s, H, W) and (N, C_t, H, W), got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")


@torch.library.custom_op("segkd::cross_image_kd_cuda", mutates_args=())
def cross_image_kd_cuda(student: torch.Tensor, teacher: torch.Tensor, tau: float
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss 0-dim in the student's dtype, lse (2, N, N, P) fp32: row log-sum-exps of S and T)."""
    lib = cuda_lib(OP)
    _check(student, teacher)
    args = launch_args(OP, student)
    launch_args(OP, teacher)
    s, t = student.detach().contiguous(), teacher.detach().contiguous()
    n, cs, h, w = s.shape
    ct, p = t.shape[1], h * w
    lse = torch.zeros(2, n, n, p, dtype=torch.float32, device=s.device)
    if n * p == 0:
        return student.new_zeros(()), lse
    a, _ = normalize_pixels(lib, s)
    b, _ = normalize_pixels(lib, t)
    row_kl = torch.empty(n, n, p, dtype=torch.float32, device=s.device)
    lib.cross_image_forward(a.data_ptr(), b.data_ptr(), row_kl.data_ptr(), lse.data_ptr(), n, cs, ct, p, float(tau),
                            device=args["device"], stream=args["stream"])
    loss = row_kl.double().sum() / (n * n * p)
    return loss.to(student.dtype), lse


@torch.library.custom_op("segkd::cross_image_kd_backward_cuda", mutates_args=())
def cross_image_kd_backward_cuda(grad_loss: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor,
                                 lse: torch.Tensor, tau: float) -> torch.Tensor:
    """d loss / d student (student's dtype, contiguous) for the upstream gradient grad_loss (0-dim)."""
    lib = cuda_lib(OP)
    _check(student, teacher)
    args = launch_args(OP, student)
    s, t = student.detach().contiguous(), teacher.detach().contiguous()
    n, cs, h, w = s.shape
    ct, p = t.shape[1], h * w
    if n * p == 0 or cs == 0:
        return torch.zeros_like(s)
    a, norm_s = normalize_pixels(lib, s)
    b, _ = normalize_pixels(lib, t)
    da = torch.zeros_like(a)
    g = grad_loss.detach().to(torch.float32).reshape(1).contiguous()
    lib.cross_image_backward(a.data_ptr(), b.data_ptr(), lse.contiguous().data_ptr(), g.data_ptr(), da.data_ptr(),
                             n, cs, ct, p, float(tau), device=args["device"], stream=args["stream"])
    return normalize_pixels_backward(lib, da, s, norm_s, False)


@cross_image_kd_cuda.register_fake
def _(student, teacher, tau):
    n, _, h, w = student.shape
    return student.new_empty(()), student.new_empty(2, n, n, h * w, dtype=torch.float32)


@cross_image_kd_backward_cuda.register_fake
def _(grad_loss, student, teacher, lse, tau):
    return student.new_empty(student.shape)


def _setup_context(ctx, inputs, output):
    student, teacher, tau = inputs
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(student, teacher, output[1])
    ctx.tau = tau


def _backward(ctx, grad_loss, _grad_lse):
    student, teacher, lse = ctx.saved_tensors
    if grad_loss is None:
        return None, None, None
    return cross_image_kd_backward_cuda(grad_loss, student, teacher, lse, ctx.tau), None, None


cross_image_kd_cuda.register_autograd(_backward, setup_context=_setup_context)
