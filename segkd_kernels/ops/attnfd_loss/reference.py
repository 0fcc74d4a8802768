"""AttnFD loss at one distillation point (docs/losses.md 6) in plain PyTorch."""

import torch

from ..._validation import compute_dtype

NORM_EPS = 1e-12  # a zero map is divided by eps instead of 0


def attnfd_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """sum((A_s / ||A_s||_F - A_t / ||A_t||_F)^2) / N, one Frobenius norm over the whole tensor.

    Kernels computing it from the three dot products must expand this same clamped form,
        (<s,s> / ns^2 + <t,t> / nt^2 - 2 <s,t> / (ns nt)) / N,  ns = max(||s||, eps), nt likewise,
    which equals 2 - 2 cos when neither map is zero and gives 1/N (not 2/N) for a zero map."""
    dtype = compute_dtype(student)
    s = student.to(dtype)
    t = teacher.detach().to(dtype)
    s_hat = s / s.norm().clamp_min(NORM_EPS)
    t_hat = t / t.norm().clamp_min(NORM_EPS)
    return ((s_hat - t_hat).square().sum() / student.shape[0]).to(student.dtype)
