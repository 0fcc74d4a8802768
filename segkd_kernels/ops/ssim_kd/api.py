"""sk.ssim_kd: SSIM between student and teacher feature maps (SSIM-KD, docs/losses.md 5)."""

import torch

from ..._backends import KERNEL_DTYPES, select_backend
from ..._validation import (check_bool, check_choice, check_positive, check_same_device, check_same_shape,
                             check_teacher_dtype, check_tensor)
from .._api import op_backends
from . import reference
from .cuda import ssim_kd_cuda

# fp64 stays on the reference (the kernels keep fp32 statistics)
IMPLEMENTED, _triton = op_backends(__package__, KERNEL_DTYPES)
PADDINGS = ("reflect", "zeros", "valid")
MIN_WINDOW, MAX_WINDOW = 3, 15


def check_options(window_size, sigma, data_range, padding) -> None:
    """The hyper-parameters alone (also checked by sk.nn.SSIMKD when it is built)."""
    if isinstance(window_size, bool) or not isinstance(window_size, int):
        raise ValueError(f"window_size: expected an odd int in [{MIN_WINDOW}, {MAX_WINDOW}], got {window_size!r}")
    if window_size % 2 == 0 or not MIN_WINDOW <= window_size <= MAX_WINDOW:
        raise ValueError(f"window_size: expected an odd int in [{MIN_WINDOW}, {MAX_WINDOW}], got {window_size}")
    check_choice("padding", padding, PADDINGS)
    check_positive("sigma", sigma)
    check_positive("data_range", data_range)


def _check_fits(window_size: int, padding: str, shape) -> None:
    h, w = shape[2], shape[3]
    if padding == "valid":
        needed = window_size  # the window must fit inside the map
    elif padding == "reflect":
        needed = window_size // 2 + 1  # reflection needs more pixels than the pad width
    else:
        return
    if h < needed or w < needed:
        raise ValueError(
            f"student_feat: spatial size {h}x{w} is too small for window_size={window_size} with "
            f"padding={padding!r} (needs at least {needed}x{needed}; padding='zeros' accepts any size)"
        )


def ssim_kd(student_feat: torch.Tensor, teacher_feat: torch.Tensor, *, window_size: int = 11,
            sigma: float = 1.5, data_range: float = 1.0, padding: str = "reflect", normalize: bool = True,
            backend: str = "auto") -> torch.Tensor:
    """mean of clamp((1 - SSIM) / 2, 0, 1) between student and teacher features (N, C, H, W) of
    the same shape, per channel with a Gaussian window. `normalize` min-max rescales each (n, c)
    map to [0, 1] first; `padding` is reflect (kornia), zeros (fused-ssim "same") or valid
    (pytorch-msssim). `normalize` must be a bool.
    Teacher dtype: any floating dtype, converted to the computation dtype (fp32, fp64 for an fp64
    student); an fp64 teacher needs an fp64 student (ValueError: it would be rounded silently)."""
    check_tensor("student_feat", student_feat, rank=4)
    check_tensor("teacher_feat", teacher_feat, rank=4)
    check_same_shape("student_feat", student_feat, "teacher_feat", teacher_feat)
    check_same_device(student_feat=student_feat, teacher_feat=teacher_feat)
    check_teacher_dtype("student_feat", student_feat, "teacher_feat", teacher_feat)
    check_options(window_size, sigma, data_range, padding)
    check_bool("normalize", normalize)
    _check_fits(window_size, padding, student_feat.shape)
    name = select_backend("ssim_kd", backend, IMPLEMENTED, student_feat)
    if name == "triton":
        # The kernels keep the three partial-derivative maps for the backward only when one will run.
        need_partials = torch.is_grad_enabled() and student_feat.requires_grad
        loss, _partials, _scales = _triton.ssim_kd_triton(student_feat, teacher_feat.detach(), window_size, float(sigma),
                                                  float(data_range), padding, bool(normalize), need_partials)
        return loss
    if name == "cuda":
        need_grad = torch.is_grad_enabled() and student_feat.requires_grad
        return ssim_kd_cuda(student_feat, teacher_feat.detach(), window_size, float(sigma), float(data_range),
                            padding, bool(normalize), need_grad)[0]
    return reference.ssim_kd(student_feat, teacher_feat, window_size, float(sigma), float(data_range),
                             padding, bool(normalize))
