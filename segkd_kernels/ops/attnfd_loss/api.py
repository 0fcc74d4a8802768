"""sk.attnfd_loss: the AttnFD distance between refined feature maps at one point (docs/losses.md 6)."""

import torch

from ..._backends import select_backend
from ..._validation import check_same_device, check_same_shape, check_teacher_dtype, check_tensor
from .._api import op_backends
from . import reference
from .cuda import attnfd_loss_cuda
from .reference import NORM_EPS

IMPLEMENTED, _triton = op_backends(__package__)


def loss_from_dots(dots: torch.Tensor, batch: int) -> torch.Tensor:
    """The reference's clamped form from fp64 [<s,s>, <t,t>, <s,t>]:
        (<s,s> / ns^2 + <t,t> / nt^2 - 2 <s,t> / (ns nt)) / N,   ns = max(||s||, eps), nt likewise.
    sqrt(max(<s,s>, eps^2)) is max(||s||, eps) with the reference's gradient (zero below eps) and
    no 0 * inf at a zero map. fp64 throughout: 2 - 2 cos cancels when the maps nearly agree."""
    ss, tt, st = dots.unbind()
    ns = ss.clamp_min(NORM_EPS ** 2).sqrt()
    nt = tt.clamp_min(NORM_EPS ** 2).sqrt()
    return (ss / ns.square() + tt / nt.square() - 2 * st / (ns * nt)) / batch


def attnfd_loss(student_refined: torch.Tensor, teacher_refined: torch.Tensor, *,
                backend: str = "auto") -> torch.Tensor:
    """(2 - 2 <A_s, A_t> / (||A_s|| ||A_t||)) / N for CBAM-refined maps of the same shape
    (the student's after the connector). The method's lambda (2) is applied by the caller.
    Teacher dtype: any floating dtype, converted to the computation dtype (fp32, fp64 for an fp64
    student); an fp64 teacher needs an fp64 student (ValueError: it would be rounded silently)."""
    check_tensor("student_refined", student_refined, rank=4)
    check_tensor("teacher_refined", teacher_refined, rank=4)
    check_same_shape("student_refined", student_refined, "teacher_refined", teacher_refined)
    check_same_device(student_refined=student_refined, teacher_refined=teacher_refined)
    check_teacher_dtype("student_refined", student_refined, "teacher_refined", teacher_refined)
    name = select_backend("attnfd_loss", backend, IMPLEMENTED, student_refined)
    if name == "reference":
        return reference.attnfd_loss(student_refined, teacher_refined)
    if name == "cuda":
        return attnfd_loss_cuda(student_refined, teacher_refined.detach())[0]
    return _triton.attnfd_loss_triton(student_refined, teacher_refined.detach(), NORM_EPS)[0]
