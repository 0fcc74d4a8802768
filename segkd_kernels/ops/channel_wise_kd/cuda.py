"""channel_wise_kd on the hand-written CUDA kernel of csrc/channel_wise_kd.cu.

One op returns the loss and, when asked, d loss / d student for a unit upstream gradient, both
from the same pass over the inputs (the kernel has every softmax statistic at hand); the backward
hands that gradient out, scaled by the upstream one on the device (ops/_saved_grad.py).
"""

from __future__ import annotations

import torch

from .._cuda_common import cuda_lib, launch_args
from .._saved_grad import register_saved_grad_autograd, scale_in_place

OP = "channel_wise_kd"


def common_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    """The kernels read both inputs as one type: the student's, or fp32 when the two differ."""
    return student.dtype if teacher.dtype == student.dtype else torch.float32


def _inputs(student, teacher):
    if student.shape != teacher.shape or student.dim() != 4:
        raise ValueError(f"{OP}: expected two (N, C, H, W) tensors of one shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    dtype = common_dtype(student, teacher)
    args = launch_args(OP, student)
    s = student.detach().to(dtype).contiguous()
    t = teacher.detach().to(dtype).contiguous()
    args["dtype"] = launch_args(OP, s)["dtype"]
    return s, t, args


def _launch(lib, s, t, row_kl, grad, tau, args, grad_mult=None):
    n, c, h, w = s.shape
    rows = n * c
    if s.numel() == 0:  # an empty map (H*W = 0) has KL 0 and nothing to launch
        return
    # long rows: per-chunk statistics and counters of the persistent plan, or per-split statistics
    floats = lib.channel_wise_kd_workspace(rows, h * w, args["dtype"], args["device"])
    workspace = torch.empty(floats, dtype=torch.float32, device=s.device)
    ptr = lambda x: 0 if x is None else x.data_ptr()  # noqa: E731
    # d/ds of tau^2 / (N C) * KL_row = tau / (N C) * (softmax(s / tau) - softmax(t / tau))
    lib.channel_wise_kd_forward(s.data_ptr(), t.data_ptr(), ptr(row_kl), ptr(grad), ptr(workspace if floats else None),
                                floats, rows, h * w, float(tau), float(tau / max(rows, 1)), ptr(grad_mult), **args)


@torch.library.custom_op("segkd::channel_wise_kd_cuda", mutates_args=())
def channel_wise_kd_cuda(student: torch.Tensor, teacher: torch.Tensor, tau: float,
                         need_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, grad): loss 0-dim in the student's dtype; grad = d loss / d student for grad_output == 1
    (student's shape, contiguous, in the dtype the kernel reads: the student's, or fp32 when the
    teacher's differs; see ops/_saved_grad.py for its backward) when need_grad, else an empty tensor."""
    lib = cuda_lib(OP)
    s, t, args = _inputs(student, teacher)
    n, c, h, w = s.shape
    rows = n * c
    row_kl = torch.zeros(rows, dtype=torch.float32, device=s.device)
    grad = torch.empty_like(s) if need_grad else s.new_empty(0)
    _launch(lib, s, t, row_kl, grad if need_grad else None, tau, args)
    loss = (row_kl.sum() * (tau * tau / max(rows, 1))).to(student.dtype)
    return loss, grad


def _rescale(inputs, grad, grad_output):
    """grad (the saved gradient, in place) for grad_output (on the device), untouched when it is
    exactly 1: fp32 scaled, fp16/bf16 recomputed from the inputs and rounded once."""
    if inputs is None:
        scale_in_place(cuda_lib(OP), grad, grad_output, launch_args(OP, grad))
        return
    student, teacher, tau, _need_grad = inputs
    s, t, args = _inputs(student, teacher)
    _launch(cuda_lib(OP), s, t, None, grad, tau, args, grad_mult=grad_output)


@channel_wise_kd_cuda.register_fake
def _(student, teacher, tau, need_grad):
    grad = student.new_empty(student.shape if need_grad else (0,), dtype=common_dtype(student, teacher))
    return student.new_empty(()), grad


register_saved_grad_autograd(channel_wise_kd_cuda, OP, _rescale)
