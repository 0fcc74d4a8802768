"""sk.attnfd_loss: the AttnFD distance between refined feature maps at one point (LOSSES.md 6)."""

import torch

from ..._backends import FLOAT_DTYPES, select_backend
from ..._validation import check_same_device, check_same_shape, check_tensor
from . import reference

IMPLEMENTED = {"reference": FLOAT_DTYPES}


def attnfd_loss(student_refined: torch.Tensor, teacher_refined: torch.Tensor, *,
                backend: str = "auto") -> torch.Tensor:
    """(2 - 2 <A_s, A_t> / (||A_s|| ||A_t||)) / N for CBAM-refined maps of the same shape
    (the student's after the connector). The method's lambda (2) is applied by the caller."""
    check_tensor("student_refined", student_refined, rank=4)
    check_tensor("teacher_refined", teacher_refined, rank=4)
    check_same_shape("student_refined", student_refined, "teacher_refined", teacher_refined)
    check_same_device(student_refined=student_refined, teacher_refined=teacher_refined)
    select_backend("attnfd_loss", backend, IMPLEMENTED, student_refined)
    return reference.attnfd_loss(student_refined, teacher_refined)
