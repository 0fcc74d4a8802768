"""sk.cross_image_kd: cross-image pixel-to-pixel similarity distillation (docs/losses.md 4)."""

import torch

from ..._backends import select_backend
from ..._validation import (check_positive, check_same_device, check_same_dims, check_teacher_dtype,
                             check_tensor, compute_dtype)
from .._api import op_backends
from . import reference
from .cuda import cross_image_kd_cuda

IMPLEMENTED, _triton = op_backends(__package__)


def cross_image_kd(student_feat: torch.Tensor, teacher_feat: torch.Tensor, tau: float = 0.1, *,
                   backend: str = "auto") -> torch.Tensor:
    """For every ordered image pair (i, j) of the batch, i == j included, the row-wise KL between
    softmax(teacher similarities / tau) and softmax(student similarities / tau) over the pixels of
    image j, averaged over rows and pairs. Features (N, C_s, H, W), (N, C_t, H, W).
    Teacher dtype: any floating dtype, converted to the computation dtype (fp32, fp64 for an fp64
    student); an fp64 teacher needs an fp64 student (ValueError: it would be rounded silently)."""
    check_tensor("student_feat", student_feat, rank=4)
    check_tensor("teacher_feat", teacher_feat, rank=4)
    check_same_dims("student_feat", student_feat, "teacher_feat", teacher_feat, dims=(0, 2, 3))
    check_same_device(student_feat=student_feat, teacher_feat=teacher_feat)
    check_teacher_dtype("student_feat", student_feat, "teacher_feat", teacher_feat)
    check_positive("tau", tau)
    name = select_backend("cross_image_kd", backend, IMPLEMENTED, student_feat)
    if name == "reference":
        return reference.cross_image_kd(student_feat, teacher_feat, tau)
    if name == "cuda":  # raw NCHW features: the cuda op normalises the pixels itself
        return cross_image_kd_cuda(student_feat, teacher_feat.detach(), float(tau))[0]
    # The kernels take unit features pixel-major, (N, P, C); normalising here keeps its gradient in
    # autograd. On a GPU fp16/bf16 go back to their dtype after the fp32 normalisation (tensor-core
    # operands); the interpreter computes in fp32 anyway (its bf16 tl.dot is wrong).
    kernel_dtype = student_feat.dtype if student_feat.is_cuda else compute_dtype(student_feat)
    a = reference.unit_pixels(student_feat).to(kernel_dtype).transpose(1, 2)
    b = reference.unit_pixels(teacher_feat.detach()).to(kernel_dtype).transpose(1, 2)
    return _triton.cross_image_kd_triton(a, b, float(tau))[0].to(student_feat.dtype)
