"""sk.channel_wise_kd: channel-wise distillation (CWD, docs/losses.md 1)."""

import torch

from ..._backends import select_backend
from ..._validation import (check_positive, check_same_device, check_same_shape, check_teacher_dtype,
                             check_tensor)
from .._api import op_backends
from . import reference
from .cuda import channel_wise_kd_cuda

IMPLEMENTED, _triton = op_backends(__package__)


def channel_wise_kd(student: torch.Tensor, teacher: torch.Tensor, tau: float = 4.0, *,
                    backend: str = "auto") -> torch.Tensor:
    """Channel-wise KD: softmax over the H*W positions of every (n, c) map, KL teacher || student,
    times tau^2 / (N*C). Inputs (N, C, H, W) of the same shape; returns a 0-dim tensor in the
    student's dtype, differentiable in the student only.
    Teacher dtype: any floating dtype, converted to the computation dtype (fp32, fp64 for an fp64
    student); an fp64 teacher needs an fp64 student (ValueError: it would be rounded silently)."""
    check_tensor("student", student, rank=4)
    check_tensor("teacher", teacher, rank=4)
    check_same_shape("student", student, "teacher", teacher)
    check_same_device(student=student, teacher=teacher)
    check_teacher_dtype("student", student, "teacher", teacher)
    check_positive("tau", tau)
    name = select_backend("channel_wise_kd", backend, IMPLEMENTED, student)
    if name == "triton":
        return _triton.channel_wise_kd(student, teacher, tau)
    if name == "cuda":
        needs_grad = torch.is_grad_enabled() and student.requires_grad
        return channel_wise_kd_cuda(student, teacher.detach(), float(tau), needs_grad)[0]
    return reference.channel_wise_kd(student, teacher, tau)
