"""sk.cross_image_kd: cross-image pixel-to-pixel similarity distillation (LOSSES.md 4)."""

import torch

from ..._backends import FLOAT_DTYPES, select_backend
from ..._validation import check_positive, check_same_device, check_same_dims, check_tensor
from . import reference

IMPLEMENTED = {"reference": FLOAT_DTYPES}


def cross_image_kd(student_feat: torch.Tensor, teacher_feat: torch.Tensor, tau: float = 0.1, *,
                   backend: str = "auto") -> torch.Tensor:
    """For every ordered image pair (i, j) of the batch, i == j included, the row-wise KL between
    softmax(teacher similarities / tau) and softmax(student similarities / tau) over the pixels of
    image j, averaged over rows and pairs. Features (N, C_s, H, W), (N, C_t, H, W)."""
    check_tensor("student_feat", student_feat, rank=4)
    check_tensor("teacher_feat", teacher_feat, rank=4)
    check_same_dims("student_feat", student_feat, "teacher_feat", teacher_feat, dims=(0, 2, 3))
    check_same_device(student_feat=student_feat, teacher_feat=teacher_feat)
    check_positive("tau", tau)
    select_backend("cross_image_kd", backend, IMPLEMENTED, student_feat)
    return reference.cross_image_kd(student_feat, teacher_feat, tau)
