"""channel_wise_kd on the hand-written CUDA kernel of csrc/channel_wise_kd.cu.

One op returns the loss and, when asked, d loss / d student for a unit upstream gradient, both
from the same pass over the inputs (the kernel has every softmax statistic at hand); the backward
only scales that gradient by the upstream one.
"""

from __future__ import annotations

import torch

from .._cuda_common import cuda_lib, launch_args
from .._saved_grad import register_saved_grad_autograd

OP = "channel_wise_kd"


def common_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    """The kernels read both inputs as one type: the student's, or fp32 when the two differ."""
    return student.dtype if teacher.dtype == student.dtype else torch.float32


@torch.library.custom_op("segkd::channel_wise_kd_cuda", mutates_args=())
def channel_wise_kd_cuda(student: torch.Tensor, teacher: torch.Tensor, tau: float,
                         need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, grad): loss 0-dim in the student's dtype; grad = d loss / d student (student's shape,
    contiguous, fp32 whatever the input dtype, so that the backward rounds to the student's dtype
    once, after scaling by grad_output) when need_grad, else an empty tensor."""
    lib = cuda_lib(OP)
    if student.shape != teacher.shape or student.dim() != 4:
        raise ValueError(f"{OP}: expected two (N, C, H, W) tensors of one shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    dtype = common_dtype(student, teacher)
    args = launch_args(OP, student)
    s = student.detach().to(dtype).contiguous()
    t = teacher.detach().to(dtype).contiguous()
    args["dtype"] = launch_args(OP, s)["dtype"]
    n, c, h, w = s.shape
    rows = n * c
    row_kl = torch.zeros(rows, dtype=torch.float32, device=s.device)
    grad = torch.empty_like(s, dtype=torch.float32) if need_grad else s.new_empty(0, dtype=torch.float32)
    scale = tau * tau / max(rows, 1)
    if s.numel() > 0:  # an empty map (H*W = 0) has KL 0 and nothing to launch
        # few long rows are split over several blocks per row, with per-split statistics here
        floats = lib.channel_wise_kd_workspace(rows, h * w, args["dtype"], args["device"])
        workspace = torch.empty(floats, dtype=torch.float32, device=s.device)
        # d/ds of tau^2 / (N C) * KL_row = tau / (N C) * (softmax(s / tau) - softmax(t / tau))
        lib.channel_wise_kd_forward(s.data_ptr(), t.data_ptr(), row_kl.data_ptr(), grad.data_ptr() if need_grad else 0,
                                    workspace.data_ptr() if floats else 0, floats, rows, h * w, float(tau),
                                    float(tau / max(rows, 1)), **args)
    loss = (row_kl.sum() * scale).to(student.dtype)
    return loss, grad


@channel_wise_kd_cuda.register_fake
def _(student, teacher, tau, need_grad):
    grad = student.new_empty(student.shape if need_grad else (0,), dtype=torch.float32)
    return student.new_empty(()), grad


register_saved_grad_autograd(channel_wise_kd_cuda, OP)
